//! JWT validation rules through the library: compile a config with inline keys, decide on requests
//! at an injected time, and look at what the client would see.

#[path = "jwt_common/mod.rs"]
mod keys;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portcullis::config::{self, ConfigErrors};
use portcullis::policy::{
    self, CheckInput, Decision, Denial, EvalOptions, Outcome, PolicySet, Runtime,
};
use serde_json::{Value, json};

const ISS: &str = "https://idp.test/corp";
const AUD: &str = "api://orders";

fn compile(yaml: &str, env: &[(&str, &str)]) -> Result<(PolicySet, Runtime), ConfigErrors> {
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let src = config::parse_with_env(yaml, Path::new("."), &lookup)?;
    let runtime = Runtime::offline();
    let (policy, _) = policy::compile(&src, &runtime)?;
    Ok((policy, runtime))
}

fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

async fn check_at(
    p: &PolicySet,
    path: &str,
    headers: &[(&str, &str)],
    now: SystemTime,
) -> Decision {
    let headers: portcullis::policy::Headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec().into()))
        .collect();
    let input = CheckInput {
        method: "GET",
        host: "api.example.com",
        path,
        scheme: "",
        headers: &headers,
        peer: None,
        peer_certificate: "",
        context_extensions: None,
    };
    p.decide(&input, EvalOptions { now, explain: true }).await
}

async fn bearer_at(p: &PolicySet, token: &str, now: SystemTime) -> Decision {
    check_at(
        p,
        "/orders/1",
        &[("authorization", &format!("Bearer {token}"))],
        now,
    )
    .await
}

async fn check(p: &PolicySet, token: &str) -> Decision {
    check_at(
        p,
        "/orders/1",
        &[("authorization", &format!("Bearer {token}"))],
        SystemTime::now(),
    )
    .await
}

fn denial(d: &Decision) -> &Denial {
    match &d.outcome {
        Outcome::Deny(den) => den,
        Outcome::Allow => panic!("allowed, expected a deny; steps: {:?}", d.steps),
    }
}

#[track_caller]
fn assert_deny(d: &Decision, reason: &str, status: u16) {
    let den = denial(d);
    assert_eq!(
        (den.reason.as_str(), den.status),
        (reason, status),
        "steps: {:?}",
        d.steps
    );
}

#[track_caller]
fn assert_allow(d: &Decision) {
    assert!(
        d.is_allow(),
        "denied: {:?}; steps: {:?}",
        d.outcome,
        d.steps
    );
}

fn header<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
    d.upstream_headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_str())
}

/// One provider with the given inline keys and one API `orders` with the given jwt settings.
fn config(keys: &[&Value], jwt_extra: &str) -> String {
    format!(
        r#"
identity_providers:
  - name: corp
    issuer: {ISS}
    keys: {keys}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt:
      providers: [corp]
      audiences: [{AUD}]
{jwt_extra}
    on_allow:
      set_headers: {{ x-user: "{{jwt.sub}}", x-roles: "{{jwt.roles}}" }}
"#,
        keys = Value::from(keys.iter().map(|k| (*k).clone()).collect::<Vec<_>>())
    )
}

fn good_claims() -> Value {
    keys::claims(ISS, AUD, "alice")
}

#[tokio::test]
async fn every_algorithm_is_accepted_with_its_key_and_claims_reach_headers() {
    let rsa = keys::rsa(0, Some("rsa"));
    let p256 = keys::p256(Some("p256"));
    let p384 = keys::p384(Some("p384"));
    let ed = keys::ed25519(Some("ed"));
    let (p, _rt) = compile(&config(&[&rsa.jwk, &p256.jwk, &p384.jwk, &ed.jwk], ""), &[]).unwrap();
    let mut claims = good_claims();
    claims["roles"] = json!(["admin", "writer"]);
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        let d = check(&p, &rsa.sign(json!({"alg": alg}), claims.clone())).await;
        assert_allow(&d);
        assert_eq!(header(&d, "x-user"), Some("alice"), "{alg}");
        assert_eq!(header(&d, "x-roles"), Some("admin,writer"), "{alg}");
    }
    for key in [&p256, &p384, &ed] {
        assert_allow(&check(&p, &key.token(claims.clone())).await);
    }
}

#[tokio::test]
async fn hmac_keys_come_from_the_environment_and_enable_hs_algorithms() {
    let hs = keys::hmac(Some("shared"), 64);
    let secret = hs.secret_b64();
    let yaml = config(&[&json!({"kid": "shared", "k": "${env:JWT_SECRET}"})], "");
    let (p, _rt) = compile(&yaml, &[("JWT_SECRET", &secret)]).unwrap();
    for alg in ["HS256", "HS384", "HS512"] {
        assert_allow(&check(&p, &hs.sign(json!({"alg": alg}), good_claims())).await);
    }
    let other = keys::hmac(Some("shared"), 64);
    assert_deny(
        &check(&p, &other.token(good_claims())).await,
        "TokenSignatureInvalid",
        401,
    );

    // Written in the file, the secret is refused with its path.
    let plain = config(&[&json!({"kid": "shared", "k": secret})], "");
    let errs = compile(&plain, &[]).unwrap_err().to_string();
    assert!(
        errs.contains(
            "identity_providers[0].keys[0]: an HMAC secret must not be written in the file"
        ),
        "{errs}"
    );
}

#[tokio::test]
async fn where_the_token_is_read() {
    let rsa = keys::rsa(0, Some("k"));
    let token = rsa.token(good_claims());
    let (p, _rt) = compile(&config(&[&rsa.jwk], ""), &[]).unwrap();
    let now = SystemTime::now();
    let go = |headers: Vec<(&'static str, String)>| {
        let p = &p;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            check_at(p, "/orders/1", &h, now).await
        }
    };
    assert_allow(&go(vec![("authorization", format!("Bearer {token}"))]).await);
    assert_allow(&go(vec![("authorization", format!("bearer   {token}"))]).await);
    let missing = go(vec![]).await;
    assert_deny(&missing, "TokenNotPresent", 401);
    assert_eq!(denial(&missing).message, "JWT not present.");
    assert_eq!(
        denial(&missing).www_authenticate.as_deref(),
        Some(r#"Bearer realm="orders""#),
        "RFC 6750 3.1: no error code without a token"
    );
    assert_deny(
        &go(vec![("authorization", "Bearer".into())]).await,
        "TokenNotPresent",
        401,
    );
    assert_deny(
        &go(vec![("authorization", "  ".into())]).await,
        "TokenNotPresent",
        401,
    );
    let basic = go(vec![("authorization", format!("Basic {token}"))]).await;
    assert_deny(&basic, "JwtInvalid", 401);
    assert_eq!(
        denial(&basic).www_authenticate.as_deref(),
        Some(r#"Bearer realm="orders", error="invalid_token""#)
    );
    assert_deny(
        &go(vec![("authorization", token.clone())]).await,
        "JwtInvalid",
        401,
    );

    // A custom header carries the bare token; `Bearer ` there fails (APIM).
    let yaml = config(&[&rsa.jwk], "      from: { header: X-Token }");
    let (p2, _rt2) = compile(&yaml, &[]).unwrap();
    assert_allow(&check_at(&p2, "/orders/1", &[("x-token", &token)], now).await);
    assert_deny(
        &check_at(
            &p2,
            "/orders/1",
            &[("x-token", &format!("Bearer {token}"))],
            now,
        )
        .await,
        "JwtInvalid",
        401,
    );

    let yaml = config(&[&rsa.jwk], "      from: { query: access_token }");
    let (p3, _rt3) = compile(&yaml, &[]).unwrap();
    assert_allow(
        &check_at(
            &p3,
            &format!("/orders/1?x=1&access_token={token}"),
            &[],
            now,
        )
        .await,
    );
    assert_deny(
        &check_at(&p3, "/orders/1?access_token=", &[], now).await,
        "TokenNotPresent",
        401,
    );

    let yaml = config(&[&rsa.jwk], "      from: { cookie: session }");
    let (p4, _rt4) = compile(&yaml, &[]).unwrap();
    assert_allow(
        &check_at(
            &p4,
            "/orders/1",
            &[("cookie", &format!("a=b; session={token}; c=d"))],
            now,
        )
        .await,
    );
    assert_deny(
        &check_at(&p4, "/orders/1", &[("cookie", "a=b")], now).await,
        "TokenNotPresent",
        401,
    );
    let twice = format!("session={token}; session=other");
    assert_deny(
        &check_at(&p4, "/orders/1", &[("cookie", &twice)], now).await,
        "JwtInvalid",
        401,
    );
}

#[tokio::test]
async fn lifetime_boundaries_are_exact_with_and_without_skew() {
    let rsa = keys::rsa(0, Some("k"));
    let t: i64 = 1_900_000_000;
    let token = |exp: Option<i64>, nbf: Option<i64>| {
        let mut c = json!({"iss": ISS, "aud": AUD, "sub": "alice"});
        if let Some(e) = exp {
            c["exp"] = e.into();
        }
        if let Some(n) = nbf {
            c["nbf"] = n.into();
        }
        rsa.token(c)
    };
    let (skew60, _r1) = compile(&config(&[&rsa.jwk], "      clock_skew: 60s"), &[]).unwrap();
    let (skew0, _r2) = compile(&config(&[&rsa.jwk], ""), &[]).unwrap();
    // exp: expired when exp < now - skew (Microsoft.IdentityModel's rule).
    assert_deny(
        &bearer_at(&skew60, &token(Some(t - 61), None), at(t)).await,
        "TokenExpired",
        401,
    );
    assert_allow(&bearer_at(&skew60, &token(Some(t - 60), None), at(t)).await);
    assert_allow(&bearer_at(&skew60, &token(Some(t - 59), None), at(t)).await);
    assert_deny(
        &bearer_at(&skew0, &token(Some(t - 1), None), at(t)).await,
        "TokenExpired",
        401,
    );
    assert_allow(&bearer_at(&skew0, &token(Some(t), None), at(t)).await);
    // nbf: not yet valid when nbf > now + skew.
    assert_deny(
        &bearer_at(&skew60, &token(Some(t + 600), Some(t + 61)), at(t)).await,
        "TokenNotYetValid",
        401,
    );
    assert_allow(&bearer_at(&skew60, &token(Some(t + 600), Some(t + 60)), at(t)).await);
    assert_allow(&bearer_at(&skew60, &token(Some(t + 600), Some(t + 59)), at(t)).await);
    assert_deny(
        &bearer_at(&skew0, &token(Some(t + 600), Some(t + 1)), at(t)).await,
        "TokenNotYetValid",
        401,
    );
    // exp is required by default.
    assert_deny(
        &bearer_at(&skew0, &token(None, None), at(t)).await,
        "JwtInvalid",
        401,
    );
    let (optional, _r3) = compile(
        &config(&[&rsa.jwk], "      require_expiration_time: false"),
        &[],
    )
    .unwrap();
    assert_allow(&bearer_at(&optional, &token(None, None), at(t)).await);
    // A non-numeric exp is malformed.
    let mut c = good_claims();
    c["exp"] = "tomorrow".into();
    assert_deny(
        &bearer_at(&skew0, &rsa.token(c), at(t)).await,
        "JwtInvalid",
        401,
    );
}

#[tokio::test]
async fn audiences_and_issuers() {
    let rsa = keys::rsa(0, Some("k"));
    let (p, _rt) = compile(&config(&[&rsa.jwk], ""), &[]).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good_claims();
        f(&mut c);
        rsa.token(c)
    };
    assert_allow(&check(&p, &with(&|c| c["aud"] = json!(["api://other", AUD]))).await);
    assert_deny(
        &check(&p, &with(&|c| c["aud"] = json!("api://inventory"))).await,
        "TokenAudienceNotAllowed",
        401,
    );
    assert_deny(
        &check(&p, &with(&|c| c["aud"] = json!(["api://inventory"]))).await,
        "TokenAudienceNotAllowed",
        401,
    );
    assert_deny(
        &check(
            &p,
            &with(&|c| {
                c.as_object_mut()
                    .unwrap()
                    .remove("aud")
                    .map(|_| ())
                    .unwrap()
            }),
        )
        .await,
        "TokenAudienceNotAllowed",
        401,
    );
    // Default issuers: the provider's own.
    assert_deny(
        &check(&p, &with(&|c| c["iss"] = json!("https://evil.test"))).await,
        "TokenIssuerNotAllowed",
        401,
    );
    assert_deny(
        &check(
            &p,
            &with(&|c| {
                c.as_object_mut()
                    .unwrap()
                    .remove("iss")
                    .map(|_| ())
                    .unwrap()
            }),
        )
        .await,
        "TokenIssuerNotAllowed",
        401,
    );

    // No `audiences`: any audience; explicit `issuers` replace the default.
    let yaml = config(
        &[&rsa.jwk],
        "      issuers: [https://other.test, https://idp.test/corp]",
    )
    .replace(&format!("      audiences: [{AUD}]\n"), "");
    let (open, _rt2) = compile(&yaml, &[]).unwrap();
    assert_allow(&check(&open, &with(&|c| c["aud"] = json!("anything"))).await);
    assert_allow(&check(&open, &with(&|c| c["iss"] = json!("https://other.test"))).await);
    assert_deny(
        &check(&open, &with(&|c| c["iss"] = json!("https://third.test"))).await,
        "TokenIssuerNotAllowed",
        401,
    );
}

#[tokio::test]
async fn scopes_all_and_any_with_rfc6750_challenge() {
    let rsa = keys::rsa(0, Some("k"));
    let token = |scope: Value, claim: &str| {
        let mut c = good_claims();
        c[claim] = scope;
        rsa.token(c)
    };
    let (all, _r1) = compile(
        &config(
            &[&rsa.jwk],
            "      scopes: { all: [orders.read, orders.write] }",
        ),
        &[],
    )
    .unwrap();
    assert_allow(
        &check(
            &all,
            &token(json!("openid orders.write orders.read"), "scope"),
        )
        .await,
    );
    assert_allow(&check(&all, &token(json!(["orders.read", "orders.write"]), "scp")).await);
    let d = check(&all, &token(json!("orders.read"), "scp")).await;
    assert_deny(&d, "InsufficientScope", 403);
    assert_eq!(d.reason().unwrap().grpc_code(), 7);
    assert_eq!(
        denial(&d).www_authenticate.as_deref(),
        Some(
            r#"Bearer realm="orders", error="insufficient_scope", scope="orders.read orders.write""#
        )
    );
    let (any, _r2) = compile(
        &config(
            &[&rsa.jwk],
            "      scopes: { any: [orders.read, orders.admin] }",
        ),
        &[],
    )
    .unwrap();
    assert_allow(&check(&any, &token(json!("orders.read"), "scp")).await);
    assert_deny(
        &check(&any, &token(json!("inventory.read"), "scp")).await,
        "InsufficientScope",
        403,
    );
    assert_deny(
        &check(&any, &rsa.token(good_claims())).await,
        "InsufficientScope",
        403,
    );
}

#[tokio::test]
async fn required_claims_with_apim_messages() {
    let rsa = keys::rsa(0, Some("k"));
    let rules = r#"      required_claims:
        - { name: roles, values: [admin, writer], match: any }
        - { name: tid, values: [t1, t2], match: all, separator: "," }
        - { name: department }"#;
    let (p, _rt) = compile(&config(&[&rsa.jwk], rules), &[]).unwrap();
    let token = |roles: Value, tid: Value, dept: bool| {
        let mut c = good_claims();
        if !roles.is_null() {
            c["roles"] = roles;
        }
        if !tid.is_null() {
            c["tid"] = tid;
        }
        if dept {
            c["department"] = "sales".into();
        }
        rsa.token(c)
    };
    assert_allow(
        &check(
            &p,
            &token(json!(["reader", "writer"]), json!("t1, t2"), true),
        )
        .await,
    );
    assert_allow(&check(&p, &token(json!("admin"), json!(["t2", "t1,t3"]), true)).await);

    let missing = check(&p, &token(Value::Null, json!("t1,t2"), false)).await;
    assert_deny(&missing, "TokenClaimNotFound", 403);
    assert_eq!(
        denial(&missing).message,
        "JWT token is missing the following claims: roles, department. Access denied."
    );
    assert!(denial(&missing).www_authenticate.is_none());

    let wrong = check(&p, &token(json!(["reader"]), json!("t1,t2"), true)).await;
    assert_deny(&wrong, "TokenClaimValueNotAllowed", 403);
    assert_eq!(
        denial(&wrong).message,
        "Claim roles value of reader is not allowed. Access denied."
    );
    let partial = check(&p, &token(json!("admin"), json!("t1"), true)).await;
    assert_deny(&partial, "TokenClaimValueNotAllowed", 403);
    assert_eq!(
        denial(&partial).message,
        "Claim tid value of t1 is not allowed. Access denied."
    );
    // An empty array is no value at all.
    assert_deny(
        &check(&p, &token(json!([]), json!("t1,t2"), true)).await,
        "TokenClaimNotFound",
        403,
    );
}

#[tokio::test]
async fn failed_status_and_message_apply_to_the_401_class_only() {
    let rsa = keys::rsa(0, Some("k"));
    let extra = "      failed_status: 403\n      failed_message: Unauthorized. Access token is missing or invalid.\n      required_claims: [{ name: roles }]";
    let (p, _rt) = compile(&config(&[&rsa.jwk], extra), &[]).unwrap();
    let mut c = good_claims();
    c["aud"] = "api://inventory".into();
    let d = check(&p, &rsa.token(c)).await;
    assert_deny(&d, "TokenAudienceNotAllowed", 403);
    assert_eq!(
        denial(&d).message,
        "Unauthorized. Access token is missing or invalid."
    );
    assert!(
        denial(&d).www_authenticate.is_none(),
        "a Bearer challenge belongs to 401 only"
    );
    let d = check(&p, &rsa.token(good_claims())).await;
    assert_deny(&d, "TokenClaimNotFound", 403);
    assert_eq!(
        denial(&d).message,
        "JWT token is missing the following claims: roles. Access denied."
    );
}

#[tokio::test]
async fn keys_without_kid_are_tried_when_the_kid_is_unknown() {
    let rsa = keys::rsa(0, None);
    // APIM style: `n` and `e` only, no `kty`, no `kid`.
    let bare = json!({"n": rsa.jwk["n"], "e": rsa.jwk["e"]});
    let (p, _rt) = compile(&config(&[&bare], ""), &[]).unwrap();
    assert_allow(
        &check(
            &p,
            &rsa.sign(json!({"alg": "RS256", "kid": "whatever"}), good_claims()),
        )
        .await,
    );
    assert_allow(&check(&p, &rsa.token(good_claims())).await);
    let other = keys::rsa(1, None);
    assert_deny(
        &check(
            &p,
            &other.sign(json!({"alg": "RS256", "kid": "x"}), good_claims()),
        )
        .await,
        "TokenSignatureInvalid",
        401,
    );

    // With only kid-bearing keys, an unknown kid is "key not found" (offline: no re-fetch).
    let keyed = keys::rsa(0, Some("a"));
    let (p2, _rt2) = compile(&config(&[&keyed.jwk], ""), &[]).unwrap();
    let d = check(
        &p2,
        &keyed.sign(json!({"alg": "RS256", "kid": "b"}), good_claims()),
    )
    .await;
    assert_deny(&d, "TokenSignatureKeyNotFound", 401);
    assert_eq!(
        denial(&d).www_authenticate.as_deref(),
        Some(r#"Bearer realm="orders", error="invalid_token""#)
    );
}

#[tokio::test]
async fn one_providers_key_cannot_vouch_for_another_issuer() {
    let a = keys::rsa(0, Some("a"));
    let b = keys::rsa(1, Some("b"));
    let yaml = format!(
        r#"
identity_providers:
  - {{ name: a, issuer: "https://a.test", keys: [{}] }}
  - {{ name: b, issuer: "https://b.test", keys: [{}] }}
apis:
  - name: both
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [a, b] }}
  - name: only-a
    match: {{ path_prefix: /a }}
    jwt: {{ providers: [a] }}
"#,
        a.jwk, b.jwk
    );
    let (p, _rt) = compile(&yaml, &[]).unwrap();
    let claims = |iss: &str| keys::claims(iss, AUD, "alice");
    assert_allow(&check(&p, &a.token(claims("https://a.test"))).await);
    assert_allow(&check(&p, &b.token(claims("https://b.test"))).await);
    assert_deny(
        &check(&p, &b.token(claims("https://a.test"))).await,
        "TokenIssuerNotAllowed",
        401,
    );
    // A token verified (and cached) for `both` with b's key is not accepted by an API trusting only a.
    let tb = b.token(claims("https://b.test"));
    assert_allow(&check(&p, &tb).await);
    let d = check_at(
        &p,
        "/a/1",
        &[("authorization", &format!("Bearer {tb}"))],
        SystemTime::now(),
    )
    .await;
    assert_deny(&d, "TokenSignatureKeyNotFound", 401);
}

#[tokio::test]
async fn verified_tokens_are_cached_but_every_api_checks_its_own_rules() {
    let rsa = keys::rsa(0, Some("k"));
    let yaml = format!(
        r#"
identity_providers:
  - {{ name: corp, issuer: "{ISS}", keys: [{}] }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"], scopes: {{ all: [orders.read] }} }}
  - name: inventory
    match: {{ path_prefix: /inventory }}
    jwt: {{ providers: [corp], audiences: ["api://inventory"] }}
"#,
        rsa.jwk
    );
    let (p, rt) = compile(&yaml, &[]).unwrap();
    let mut c = good_claims();
    c["scp"] = "orders.read".into();
    let t = c["exp"].as_i64().unwrap();
    let token = rsa.token(c);
    let bearer = format!("Bearer {token}");
    let now = SystemTime::now();

    let before = rt.identity.stats();
    assert_allow(&check_at(&p, "/orders/1", &[("authorization", &bearer)], now).await);
    let first = rt.identity.stats();
    assert_eq!(
        first.signature_verifications,
        before.signature_verifications + 1
    );
    let d = check_at(&p, "/orders/2", &[("authorization", &bearer)], now).await;
    assert_allow(&d);
    assert!(
        d.steps.iter().any(|s| s.detail.contains("cached")),
        "{:?}",
        d.steps
    );
    let second = rt.identity.stats();
    assert_eq!(
        second.signature_verifications, first.signature_verifications,
        "a cache hit verifies nothing"
    );
    assert_eq!(second.cache_hits, first.cache_hits + 1);

    // The cached token still meets each API's own audience rule.
    assert_deny(
        &check_at(&p, "/inventory/1", &[("authorization", &bearer)], now).await,
        "TokenAudienceNotAllowed",
        401,
    );
    // And its lifetime is checked on every use, against the check's clock.
    assert_deny(
        &check_at(&p, "/orders/3", &[("authorization", &bearer)], at(t + 1)).await,
        "TokenExpired",
        401,
    );
    // A tampered copy is not the cached token.
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut sig_bytes = sig.as_bytes().to_vec();
    sig_bytes[10] = if sig_bytes[10] == b'A' { b'B' } else { b'A' };
    let tampered = format!("Bearer {head}.{}", String::from_utf8(sig_bytes).unwrap());
    assert_deny(
        &check_at(&p, "/orders/4", &[("authorization", &tampered)], now).await,
        "TokenSignatureInvalid",
        401,
    );
}

#[tokio::test]
async fn explanations_never_show_the_token() {
    let rsa = keys::rsa(0, Some("k"));
    let (p, _rt) = compile(&config(&[&rsa.jwk], ""), &[]).unwrap();
    let token = rsa.token(good_claims());
    let d = check(&p, &token).await;
    let text = portcullis::cli::explain_text(&d);
    assert!(text.contains("token of `alice`"), "{text}");
    let sig = token.rsplit('.').next().unwrap();
    assert!(!text.contains(sig) && !format!("{d:?}").contains(sig));
    let mut c = good_claims();
    c["aud"] = "x".into();
    let bad = rsa.token(c);
    let d = check(&p, &bad).await;
    assert!(!portcullis::cli::explain_text(&d).contains(bad.rsplit('.').next().unwrap()));
    assert!(
        !denial(&d)
            .body("id")
            .contains(bad.rsplit('.').next().unwrap())
    );
}

#[test]
fn config_errors_are_reported_with_their_paths() {
    let rsa = keys::rsa(0, Some("k"));
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
identity_providers:
  - {{ name: many, issuer: "https://a.test", jwks_uri: "https://a.test/keys", keys: [{jwk}] }}
  - {{ name: times, issuer: "https://b.test", cache_ttl: soon, min_refetch_interval: 0s, fetch_timeout: 2m }}
  - {{ name: algs, issuer: "https://c.test", algorithms: [RS256, none, HS256, XS999] }}
  - {{ name: file, issuer: "https://d.test", jwks_file: missing.json }}
  - {{ name: notaurl, issuer: "corp" }}
  - {{ name: private, issuer: "https://e.test", keys: [{{ kty: RSA, n: AQAB, e: AQAB, d: AQAB }}] }}
  - {{ name: small, issuer: "https://f.test", keys: [{{ kty: RSA, n: wcHB, e: AQAB }}] }}
  - {{ name: ok, issuer: "https://g.test", jwks_uri: "ftp://g.test/keys" }}
apis:
  - name: a
    jwt:
      providers: [nobody, many]
      from: {{ header: x-token, query: t }}
      audiences: []
      scopes: {{ all: [a], any: [b] }}
      required_claims: [{{ name: roles, match: some, separator: "" }}]
      clock_skew: forever
      failed_status: 200
  - name: b
    jwt: {{ providers: [], from: {{ query: t, scheme: Bearer }}, scopes: {{ all: ["two words"] }} }}
"#,
        jwk = rsa.jwk
    );
    let src = config::parse(&yaml, dir.path()).unwrap();
    let errs = policy::compile(&src, &Runtime::offline())
        .unwrap_err()
        .to_string();
    for needle in [
        "identity_providers[0]: give one key source, not jwks_uri and keys",
        "identity_providers[1].cache_ttl: `soon` is not a duration",
        "identity_providers[1].min_refetch_interval: must be greater than 0",
        "identity_providers[1].fetch_timeout: at most 60s",
        "identity_providers[2].algorithms[1]: `none` is never accepted",
        "identity_providers[2].algorithms[2]: HS256 needs an HMAC key",
        "identity_providers[2].algorithms[3]: `XS999` is not supported",
        "identity_providers[3].jwks_file: cannot read",
        "identity_providers[4].issuer: `corp` is not an http(s) URL",
        "identity_providers[5].keys[0]: this is a private key",
        "identity_providers[6].keys[0]: an RSA key of 24 bits",
        "identity_providers[7].jwks_uri: `ftp://g.test/keys` is not an http:// or https:// URL",
        "apis[0].jwt.providers[0]: no identity provider is named `nobody`",
        "apis[0].jwt.from: give exactly one of `header`, `query`, `cookie`",
        "apis[0].jwt.audiences: list at least one audience",
        "apis[0].jwt.scopes: give exactly one of `all`, `any`",
        "apis[0].jwt.required_claims[0].match: `some`: use `all` or `any`",
        "apis[0].jwt.required_claims[0].separator: must not be empty",
        "apis[0].jwt.clock_skew: `forever` is not a duration",
        "apis[0].jwt.failed_status: 200 is not an error status",
        "apis[1].jwt.providers: name at least one identity provider",
        "apis[1].jwt.from.scheme: a scheme only applies to a header",
        "apis[1].jwt.scopes.all[0]: `two words` is not a scope",
    ] {
        assert!(errs.contains(needle), "missing `{needle}` in:\n{errs}");
    }
    // A provider with errors of its own is not reported again as unknown.
    assert!(
        !errs.contains("no identity provider is named `many`"),
        "{errs}"
    );
}

#[test]
fn a_jwks_file_is_read_at_compile_time() {
    let rsa = keys::rsa(0, Some("k"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.json"),
        keys::jwks(&[&rsa]).to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("bad.json"), "{\"keys\": 3}").unwrap();
    let yaml = |file: &str| {
        format!(
            "identity_providers: [{{ name: f, issuer: \"{ISS}\", jwks_file: {file} }}]\napis: [{{ name: a, jwt: {{ providers: [f] }} }}]\n"
        )
    };
    let ok = config::parse(&yaml("keys.json"), dir.path()).unwrap();
    let (policy, _) = policy::compile(&ok, &Runtime::offline()).unwrap();
    assert_eq!(policy.summary.providers, 1);
    let bad = config::parse(&yaml("bad.json"), dir.path()).unwrap();
    let errs = policy::compile(&bad, &Runtime::offline())
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("identity_providers[0].jwks_file:") && errs.contains("not a JWKS document"),
        "{errs}"
    );
}
