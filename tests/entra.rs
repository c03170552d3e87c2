//! The Microsoft Entra ID preset (`identity_providers[].entra`, APIM's `validate-azure-ad-token`)
//! with Entra-shaped v1.0 and v2.0 tokens signed by local keys: through the real server over gRPC
//! and forward-auth, a tenant named by domain learning its GUID from a local discovery document,
//! and `portcullis check` explaining a refusal. No network.

mod common;
#[path = "jwt_common/fake_idp.rs"]
mod fake_idp;
#[path = "jwt_common/mod.rs"]
mod keys;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::SystemTime;

use common::{TestServer, decide_bearer, get, seen};
use fake_idp::FakeIdp;
use portcullis::config;
use portcullis::policy::{self, Outcome, PolicySet, Runtime};
use serde_json::{Value, json};

const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const OTHER_TID: &str = "f8cdef31-a31e-4b4a-93e4-5f571e91255a";
const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
const OTHER_CLIENT: &str = "99999999-2222-3333-4444-555555555555";
const BACKEND: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

fn v1_iss(tid: &str) -> String {
    format!("https://sts.windows.net/{tid}/")
}

fn v2_iss(tid: &str) -> String {
    format!("https://login.microsoftonline.com/{tid}/v2.0")
}

/// A v1.0 access token as Entra writes it: issuer `sts.windows.net`, `aud` the application ID URI,
/// the client in `appid`.
fn v1_claims(extra: Value) -> Value {
    let t = keys::now();
    let mut c = json!({"iss": v1_iss(TID), "aud": format!("api://{BACKEND}"), "sub": "user-1", "tid": TID,
        "ver": "1.0", "appid": CLIENT, "appidacr": "1", "iat": t, "nbf": t - 5, "exp": t + 3600});
    merge(&mut c, extra);
    c
}

/// A v2.0 access token: issuer `{endpoint}/{tid}/v2.0`, `aud` the client id, the client in `azp`.
fn v2_claims(extra: Value) -> Value {
    let t = keys::now();
    let mut c = json!({"iss": v2_iss(TID), "aud": BACKEND, "sub": "user-2", "tid": TID,
        "ver": "2.0", "azp": CLIENT, "azpacr": "1", "iat": t, "nbf": t - 5, "exp": t + 3600});
    merge(&mut c, extra);
    c
}

fn merge(c: &mut Value, extra: Value) {
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
}

fn config_with(key_source: &str) -> String {
    format!(
        r#"
identity_providers:
  - name: aad
    {key_source}
    entra:
      tenant_id: {TID}
      client_application_ids: ["{CLIENT}"]
      backend_application_ids: ["{BACKEND}"]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [aad] }}
    on_allow: {{ set_headers: {{ x-client: "{{jwt.sub}}" }} }}
"#
    )
}

/// (token or none, gRPC code, HTTP status, reason, message, www-authenticate).
type Case = (
    &'static str,
    Option<String>,
    i32,
    u16,
    &'static str,
    String,
    Option<&'static str>,
);

fn cases(key: &keys::TestKey, stranger: &keys::TestKey) -> Vec<Case> {
    let invalid = Some(r#"Bearer realm="orders", error="invalid_token""#);
    vec![
        (
            "v1 token",
            Some(key.token(v1_claims(json!({})))),
            0,
            200,
            "",
            String::new(),
            None,
        ),
        (
            "v2 token",
            Some(key.token(v2_claims(json!({})))),
            0,
            200,
            "",
            String::new(),
            None,
        ),
        (
            "no token",
            None,
            16,
            401,
            "TokenNotPresent",
            "JWT not present.".into(),
            Some(r#"Bearer realm="orders""#),
        ),
        (
            "another tenant, same keys (Entra signs for every tenant)",
            Some(key.token(v2_claims(
                json!({"iss": v2_iss(OTHER_TID), "tid": OTHER_TID}),
            ))),
            16,
            401,
            "TokenIssuerNotAllowed",
            "Invalid JWT.".into(),
            invalid,
        ),
        (
            "another backend",
            Some(key.token(v2_claims(json!({"aud": OTHER_CLIENT})))),
            16,
            401,
            "TokenAudienceNotAllowed",
            "Invalid JWT.".into(),
            invalid,
        ),
        (
            "another client (v2.0: azp)",
            Some(key.token(v2_claims(json!({"azp": OTHER_CLIENT})))),
            7,
            403,
            "TokenClaimValueNotAllowed",
            format!("Claim azp value of {OTHER_CLIENT} is not allowed. Access denied."),
            None,
        ),
        (
            "another client (v1.0: appid)",
            Some(key.token(v1_claims(json!({"appid": OTHER_CLIENT, "azp": CLIENT})))),
            7,
            403,
            "TokenClaimValueNotAllowed",
            format!("Claim appid value of {OTHER_CLIENT} is not allowed. Access denied."),
            None,
        ),
        (
            "no ver",
            Some(key.token(v1_claims(json!({"ver": null})))),
            16,
            401,
            "JwtInvalid",
            "Invalid JWT.".into(),
            invalid,
        ),
        (
            "a key not in the tenant's JWKS",
            Some(stranger.token(v2_claims(json!({})))),
            16,
            401,
            "TokenSignatureKeyNotFound",
            "Invalid JWT.".into(),
            invalid,
        ),
    ]
}

#[tokio::test]
async fn entra_tokens_over_grpc_and_forward_auth() {
    let key = keys::rsa(0, Some("entra-key-1"));
    let stranger = keys::rsa(1, Some("elsewhere"));
    let yaml = config_with(&format!("keys: [{}]", key.jwk));
    let srv = TestServer::start(&yaml).await;
    let mut client = srv.client().await;
    let base = format!("http://{}", srv.running.addrs.http.unwrap());
    let http = reqwest::Client::new();
    for (name, token, code, status, reason, message, challenge) in cases(&key, &stranger) {
        let mut req = get("/orders/1");
        if let Some(t) = &token {
            req = req.header("authorization", &format!("Bearer {t}"));
        }
        let s = seen(&client.check(req.request()).await.unwrap().into_inner());
        assert_eq!(s.code, code, "{name}: {s:?}");
        let mut fwd = http.get(format!("{base}/authz/orders/1"));
        if let Some(t) = &token {
            fwd = fwd.bearer_auth(t);
        }
        let r = fwd.send().await.unwrap();
        assert_eq!(r.status(), status, "{name} (forward-auth)");
        let r_challenge = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        if code == 0 {
            assert!(s.headers["x-client"].0.starts_with("user-"), "{name}");
            assert!(
                r.headers()["x-client"]
                    .to_str()
                    .unwrap()
                    .starts_with("user-")
            );
            continue;
        }
        let body = s.body.as_ref().expect("a deny body");
        assert_eq!(s.status, Some(i32::from(status)), "{name}");
        assert_eq!(body["reason"], reason, "{name}");
        assert_eq!(body["message"], message.as_str(), "{name}");
        assert_eq!(
            s.headers.get("www-authenticate").map(|h| h.0.as_str()),
            challenge,
            "{name}"
        );
        assert_eq!(r_challenge.as_deref(), challenge, "{name} (forward-auth)");
        let fbody: Value = r.json().await.unwrap();
        assert_eq!(fbody["reason"], reason, "{name} (forward-auth)");
        assert_eq!(fbody["message"], message.as_str(), "{name} (forward-auth)");
    }
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_from_a_jwks_file_and_the_apis_own_rules_on_top() {
    let key = keys::rsa(0, Some("entra-key-1"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, keys::jwks(&[&key]).to_string()).unwrap();
    // The API's own rules narrow further; its `issuers` cannot widen the preset's tenant.
    let yaml = config_with(&format!("jwks_file: \"{}\"", file.display())).replace(
        "jwt: { providers: [aad] }",
        &format!(
            "jwt: {{ providers: [aad], issuers: [\"{}\", \"{}\"], scopes: {{ any: [Orders.Read] }} }}",
            v2_iss(OTHER_TID),
            v2_iss(TID)
        ),
    );
    let src = config::parse(&yaml, Path::new(".")).unwrap();
    let (p, _) = policy::compile(&src, &Runtime::offline()).unwrap();
    let reason = |d: &policy::Decision| match &d.outcome {
        Outcome::Allow => "allow".to_string(),
        Outcome::Deny(den) => den.reason.as_str().to_string(),
    };
    let now = SystemTime::now();
    let ok = key.token(v2_claims(json!({"scp": "Orders.Read"})));
    assert_eq!(reason(&decide_bearer(&p, &ok, now).await), "allow");
    let no_scope = key.token(v2_claims(json!({})));
    assert_eq!(
        reason(&decide_bearer(&p, &no_scope, now).await),
        "InsufficientScope"
    );
    let other = key.token(v2_claims(
        json!({"iss": v2_iss(OTHER_TID), "tid": OTHER_TID, "scp": "Orders.Read"}),
    ));
    assert_eq!(
        reason(&decide_bearer(&p, &other, now).await),
        "TokenIssuerNotAllowed"
    );
    // v1.0 form of the tenant: the preset accepts it, the API's `issuers` does not list it.
    let v1 = key.token(v1_claims(json!({"scp": "Orders.Read"})));
    assert_eq!(
        reason(&decide_bearer(&p, &v1, now).await),
        "TokenIssuerNotAllowed"
    );
}

/// A tenant named by domain: tokens carry its GUID, learned from the v2.0 discovery document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_named_by_domain_learns_its_guid_from_discovery() {
    let key = keys::rsa(0, Some("entra-key-1"));
    let idp = FakeIdp::start(keys::jwks(&[&key])).await;
    idp.set_discovery_issuer(&v2_iss(TID));
    let yaml = format!(
        r#"
identity_providers:
  - name: aad
    discovery_url: "{}/.well-known/openid-configuration"
    entra: {{ tenant_id: contoso.onmicrosoft.com, audiences: ["api://{BACKEND}", "{BACKEND}"] }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [aad] }}
"#,
        idp.issuer
    );
    let src = config::parse(&yaml, Path::new(".")).unwrap();
    let runtime = Runtime::on_demand();
    let (p, _) = policy::compile(&src, &runtime).unwrap();
    let p: Arc<PolicySet> = Arc::new(p);
    let reason = |d: &policy::Decision| match &d.outcome {
        Outcome::Allow => "allow".to_string(),
        Outcome::Deny(den) => den.reason.as_str().to_string(),
    };
    let now = SystemTime::now();
    for claims in [v1_claims(json!({})), v2_claims(json!({}))] {
        assert_eq!(
            reason(&decide_bearer(&p, &key.token(claims), now).await),
            "allow"
        );
    }
    let other = key.token(v2_claims(
        json!({"iss": v2_iss(OTHER_TID), "tid": OTHER_TID}),
    ));
    assert_eq!(
        reason(&decide_bearer(&p, &other, now).await),
        "TokenIssuerNotAllowed"
    );
    // The domain itself is never an issuer tokens may carry.
    let by_domain = key.token(v2_claims(json!({"iss": v2_iss("contoso.onmicrosoft.com")})));
    assert_eq!(
        reason(&decide_bearer(&p, &by_domain, now).await),
        "TokenIssuerNotAllowed"
    );
    // Compiled before any fetch: the explanation says where the GUID comes from.
    assert!(
        p.summary
            .notes
            .iter()
            .any(|n| n.contains("contoso.onmicrosoft.com")
                && n.contains("learned from the discovery document")),
        "{:?}",
        p.summary.notes
    );
}

/// A discovery document that names no single tenant gives no keys: the provider stays unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_document_of_another_shape_gives_no_keys() {
    let key = keys::rsa(0, Some("entra-key-1"));
    let idp = FakeIdp::start(keys::jwks(&[&key])).await;
    idp.set_discovery_issuer("https://login.microsoftonline.com/{tenantid}/v2.0");
    let yaml = format!(
        r#"
identity_providers:
  - name: aad
    discovery_url: "{}/.well-known/openid-configuration"
    entra: {{ tenant_id: {TID}, client_application_ids: ["{CLIENT}"] }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [aad] }}
"#,
        idp.issuer
    );
    let src = config::parse(&yaml, Path::new(".")).unwrap();
    let (p, _) = policy::compile(&src, &Runtime::on_demand()).unwrap();
    let d = decide_bearer(&p, &key.token(v2_claims(json!({}))), SystemTime::now()).await;
    match &d.outcome {
        Outcome::Deny(den) => assert_eq!(den.reason.as_str(), "IdentityProviderUnavailable"),
        Outcome::Allow => panic!("allowed without keys"),
    }
    // The tenant's own document is accepted.
    idp.set_discovery_issuer(&v2_iss(TID));
    let (p, _) = policy::compile(&src, &Runtime::on_demand()).unwrap();
    let d = decide_bearer(&p, &key.token(v2_claims(json!({}))), SystemTime::now()).await;
    assert!(d.is_allow(), "{:?}", d.outcome);
}

#[test]
fn check_and_validate_explain_the_preset() {
    let key = keys::rsa(0, Some("entra-key-1"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.yaml");
    std::fs::write(&cfg, config_with(&format!("keys: [{}]", key.jwk))).unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis");

    let out = Command::new(bin)
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    for needle in [
        "identity provider `aad`: Microsoft Entra ID tenant",
        &v1_iss(TID),
        &v2_iss(TID),
        &format!("api://{BACKEND}"),
        "appid in v1.0 tokens, azp in v2.0",
    ] {
        assert!(stdout.contains(needle), "missing {needle} in:\n{stdout}");
    }

    let token = key.token(v2_claims(
        json!({"iss": v2_iss(OTHER_TID), "tid": OTHER_TID}),
    ));
    let out = Command::new(bin)
        .args(["check", "--config"])
        .arg(&cfg)
        .args(["--url", "https://api.example.com/orders/1", "-H"])
        .arg(format!("authorization: Bearer {token}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for needle in ["TokenIssuerNotAllowed", "Entra provider `aad`", OTHER_TID] {
        assert!(stdout.contains(needle), "missing {needle} in:\n{stdout}");
    }
}
