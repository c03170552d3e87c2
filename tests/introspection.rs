//! Opaque access tokens by RFC 7662 token introspection: through the real server (gRPC and
//! forward-auth) and through the library at an injected time, against a fake endpoint that counts
//! every request (tests/introspection_common).

#[path = "common/mod.rs"]
mod common;
#[path = "introspection_common/mod.rs"]
mod fake;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Seen, TestServer, get, seen};

type Client =
    portcullis::proto::auth::authorization_client::AuthorizationClient<tonic::transport::Channel>;
use fake::{CLIENT_ID, CLIENT_SECRET, FakeIntrospection};
use portcullis::config::{self, ConfigErrors};
use portcullis::policy::{self, CheckInput, Decision, EvalOptions, Outcome, PolicySet, Runtime};
use serde_json::json;

const SECRET_ENV: &str = "INTROSPECTION_SECRET";

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A provider `idp` of `fake` with `introspection` settings `extra` (YAML lines under it), and an
/// API `orders` with `jwt_extra` (YAML lines under `jwt`).
fn yaml(fake: &FakeIntrospection, secret: &str, extra: &str, jwt_extra: &str) -> String {
    format!(
        r#"
identity_providers:
  - name: idp
    issuer: "{iss}"
    jwks_uri: "{iss}/jwks"
    introspection:
      url: "{url}"
      client_id: {CLIENT_ID}
      client_secret: {secret}
{extra}
apis:
  - name: orders
    match: {{path_prefix: /orders}}
    jwt:
      providers: [idp]
{jwt_extra}
    on_allow:
      set_headers: {{x-user: "{{jwt.sub}}", x-client: "{{jwt.client_id}}"}}
"#,
        iss = fake.issuer,
        url = fake.url(),
    )
}

/// The real server on [`yaml`] with the client secret read from a file; keep the file.
async fn serve(fake: &FakeIntrospection, jwt_extra: &str) -> (TestServer, tempfile::NamedTempFile) {
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), CLIENT_SECRET).unwrap();
    let secret = format!("${{file:{}}}", secret_file.path().display());
    let srv = TestServer::start(&yaml(fake, &secret, "", jwt_extra)).await;
    (srv, secret_file)
}

/// A gRPC check of `GET /orders/1` with `token` as a Bearer token.
async fn ask(client: &mut Client, token: &str) -> Seen {
    let req = get("/orders/1").header("authorization", &format!("Bearer {token}"));
    seen(&client.check(req.request()).await.unwrap().into_inner())
}

fn compile_with(yaml: &str, runtime: Runtime) -> Result<(Arc<PolicySet>, Runtime), ConfigErrors> {
    let lookup = |name: &str| (name == SECRET_ENV).then(|| CLIENT_SECRET.to_string());
    let src = config::parse_with_env(yaml, Path::new("."), &lookup)?;
    let (policy, _) = policy::compile(&src, &runtime)?;
    runtime.publish(&policy);
    Ok((Arc::new(policy), runtime))
}

fn compile(yaml: &str) -> (Arc<PolicySet>, Runtime) {
    compile_with(yaml, Runtime::on_demand()).unwrap_or_else(|e| panic!("{e}"))
}

fn secret_ref() -> String {
    format!("\"${{env:{SECRET_ENV}}}\"")
}

async fn check_at(p: &PolicySet, token: &str, now: SystemTime) -> Decision {
    let headers: portcullis::policy::Headers = [(
        "authorization".to_string(),
        format!("Bearer {token}").into_bytes().into(),
    )]
    .into();
    let input = CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/1",
        scheme: "",
        headers: &headers,
        peer: None,
        peer_certificate: "",
        context_extensions: None,
    };
    p.decide(&input, EvalOptions { now, explain: true }).await
}

fn outcome(d: &Decision) -> String {
    match &d.outcome {
        Outcome::Allow => "allow".into(),
        Outcome::Deny(den) => format!("{} {}", den.status, den.reason.as_str()),
    }
}

fn header<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
    d.upstream_headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_str())
}

#[tokio::test]
async fn grpc_and_forward_auth_allow_an_active_token_and_refuse_an_inactive_one() {
    let fake = FakeIntrospection::start().await;
    let exp = unix(SystemTime::now()) + 3600;
    fake.activate(
        "opaque-good",
        json!({"sub": "alice", "aud": ["api://orders", "x"], "scope": "orders:read orders:write", "tid": "t1", "exp": exp}),
    );
    let (srv, _secret) = serve(
        &fake,
        "      audiences: [api://orders]\n      scopes: {all: [orders:read]}\n      required_claims: [{name: tid, values: [t1]}]",
    )
    .await;
    let mut client = srv.client().await;

    let s = ask(&mut client, "opaque-good").await;
    assert_eq!(s.code, 0, "{s:?}");
    assert_eq!(s.headers["x-user"].0, "alice");
    assert_eq!(s.headers["x-client"].0, "svc");

    let s = ask(&mut client, "opaque-revoked").await;
    assert_eq!((s.code, s.status), (16, Some(401)), "{s:?}");
    let body = s.body.unwrap();
    assert_eq!(body["reason"], "TokenNotActive");
    assert_eq!(body["message"], "Token is not active.");
    assert_eq!(
        s.headers["www-authenticate"].0,
        r#"Bearer realm="orders", error="invalid_token""#
    );

    // Forward-auth: the same decisions over the HTTP listener.
    let base = format!("http://{}", srv.running.addrs.http.unwrap());
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{base}/authz/orders/1"))
        .header("authorization", "Bearer opaque-good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-user"], "alice");
    let r = http
        .get(format!("{base}/authz/orders/1"))
        .header("authorization", "Bearer opaque-revoked")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="orders", error="invalid_token""#
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "TokenNotActive");

    // Two distinct tokens, each asked once (the good one was cached for forward-auth).
    assert_eq!(fake.requests(), 2);
    let s = &fake.seen()[0];
    assert_eq!(s.form["token"], "opaque-good");
    assert_eq!(s.form["token_type_hint"], "access_token");
    assert_eq!(s.accept.as_deref(), Some("application/json"));
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_answer_feeds_every_rule_of_the_api() {
    let fake = FakeIntrospection::start().await;
    let now = SystemTime::now();
    let t = unix(now);
    let (p, _rt) = compile(&yaml(
        &fake,
        &secret_ref(),
        "",
        "      audiences: [api://orders]\n      scopes: {all: [orders:read]}\n      required_claims: [{name: tid}]\n      clock_skew: 30s",
    ));
    let good = json!({"sub": "alice", "aud": "api://orders", "scope": "orders:read", "tid": "t1"});
    let cases = [
        ("ok", json!({}), "allow"),
        (
            "scope",
            json!({"scope": "orders:write"}),
            "403 InsufficientScope",
        ),
        (
            "aud",
            json!({"aud": "api://other"}),
            "401 TokenAudienceNotAllowed",
        ),
        (
            "iss",
            json!({"iss": "https://evil.test"}),
            "401 TokenIssuerNotAllowed",
        ),
        ("claim", json!({"tid": null}), "403 TokenClaimNotFound"),
        ("expired", json!({"exp": t - 31}), "401 TokenExpired"),
        ("skewed", json!({"exp": t - 29}), "allow"),
        ("early", json!({"nbf": t + 31}), "401 TokenNotYetValid"),
    ];
    for (name, change, want) in cases {
        let mut answer = good.clone();
        for (k, v) in change.as_object().unwrap() {
            answer[k] = v.clone();
        }
        fake.activate(name, answer);
        let d = check_at(&p, name, now).await;
        assert_eq!(outcome(&d), want, "{name}");
    }
    // `iss` absent: the provider's configured issuer.
    fake.set(
        "no-iss",
        json!({"active": true, "sub": "bob", "aud": "api://orders", "scope": "orders:read", "tid": "t"}),
    );
    let d = check_at(&p, "no-iss", now).await;
    assert_eq!(outcome(&d), "allow");
    assert_eq!(header(&d, "x-user"), Some("bob"));
}

#[tokio::test]
async fn answers_are_cached_until_min_exp_ttl_and_a_revoked_token_ends_with_its_entry() {
    let fake = FakeIntrospection::start().await;
    let (p, rt) = compile(&yaml(
        &fake,
        &secret_ref(),
        "      cache_ttl: 60s\n      negative_cache_ttl: 10s",
        "",
    ));
    let now = SystemTime::now();
    fake.activate("tok", json!({"sub": "alice"}));
    for _ in 0..20 {
        assert_eq!(outcome(&check_at(&p, "tok", now).await), "allow");
    }
    assert_eq!(fake.requests(), 1, "one request for many checks");
    assert_eq!(rt.identity.stats().introspection_cache_hits, 19);
    let text = portcullis::cli::explain_text(&check_at(&p, "tok", now).await);
    assert!(
        text.contains("introspected by provider `idp` (cached)"),
        "{text}"
    );

    // Revoked at the provider: still allowed until the entry ends (cache_ttl), then refused.
    fake.set("tok", json!({"active": false}));
    let almost = now + Duration::from_secs(59);
    assert_eq!(outcome(&check_at(&p, "tok", almost).await), "allow");
    assert_eq!(fake.requests(), 1);
    let after = now + Duration::from_secs(60);
    assert_eq!(
        outcome(&check_at(&p, "tok", after).await),
        "401 TokenNotActive"
    );
    assert_eq!(fake.requests(), 2);

    // Negative answers: reused for negative_cache_ttl.
    for _ in 0..5 {
        assert_eq!(
            outcome(&check_at(&p, "unknown", now).await),
            "401 TokenNotActive"
        );
    }
    assert_eq!(fake.requests(), 3);
    check_at(&p, "unknown", now + Duration::from_secs(10)).await;
    assert_eq!(fake.requests(), 4);

    // `exp` before cache_ttl ends the entry earlier.
    let exp = unix(now) + 30;
    fake.activate("short", json!({"exp": exp}));
    assert_eq!(outcome(&check_at(&p, "short", now).await), "allow");
    assert_eq!(
        outcome(&check_at(&p, "short", now + Duration::from_secs(29)).await),
        "allow"
    );
    assert_eq!(fake.requests(), 5);
    assert_eq!(
        outcome(&check_at(&p, "short", now + Duration::from_secs(31)).await),
        "401 TokenExpired"
    );
    assert_eq!(fake.requests(), 6, "the ended entry was asked again");

    let counts = rt.identity.introspection_requests();
    assert_eq!(counts, vec![("idp".to_string(), 3, 3, 0)]);
}

#[tokio::test]
async fn concurrent_checks_of_one_new_token_make_one_request() {
    let fake = FakeIntrospection::start().await;
    fake.set_delay(Duration::from_millis(300));
    fake.activate("burst", json!({"sub": "alice"}));
    let (p, _rt) = compile(&yaml(&fake, &secret_ref(), "", ""));
    let now = SystemTime::now();
    let checks = (0..64).map(|_| {
        let p = p.clone();
        tokio::spawn(async move { outcome(&check_at(&p, "burst", now).await) })
    });
    for r in futures::future::join_all(checks).await {
        assert_eq!(r.unwrap(), "allow");
    }
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn an_endpoint_outage_fails_closed_and_is_not_cached() {
    let fake = FakeIntrospection::start().await;
    fake.activate("tok", json!({"sub": "alice"}));
    fake.set_raw(Some((500, b"{}".to_vec())));
    let (srv, _secret) = serve(&fake, "").await;
    let mut client = srv.client().await;
    let s = ask(&mut client, "tok").await;
    assert_eq!((s.code, s.status), (14, Some(503)), "{s:?}");
    assert_eq!(s.body.unwrap()["reason"], "IdentityProviderUnavailable");
    // Recovered: the failure was not remembered.
    fake.set_raw(None);
    assert_eq!(ask(&mut client, "tok").await.code, 0);
    assert_eq!(fake.requests(), 2);
    srv.running.shutdown().await.unwrap();

    // Nobody listening at all.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}/introspect", closed.local_addr().unwrap());
    drop(closed);
    let (p, rt) = compile(&yaml(&fake, &secret_ref(), "", "").replace(&fake.url(), &dead));
    let d = check_at(&p, "tok", SystemTime::now()).await;
    assert_eq!(outcome(&d), "503 IdentityProviderUnavailable");
    assert_eq!(rt.identity.introspection_requests()[0].3, 1);
}

#[tokio::test]
async fn client_secret_basic_and_post_reach_the_endpoint() {
    for (setting, want) in [
        ("", "basic"),
        ("      client_auth: client_secret_basic", "basic"),
        ("      client_auth: client_secret_post", "post"),
    ] {
        let fake = FakeIntrospection::start().await;
        fake.activate("tok", json!({}));
        let (p, _rt) = compile(&yaml(&fake, &secret_ref(), setting, ""));
        assert_eq!(
            outcome(&check_at(&p, "tok", SystemTime::now()).await),
            "allow"
        );
        let seen = fake.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].auth,
            (want, CLIENT_ID.to_string(), CLIENT_SECRET.to_string()),
            "{setting}"
        );
        assert_eq!(seen[0].form.contains_key("client_secret"), want == "post");
    }
}

#[tokio::test]
async fn the_endpoint_is_discovered_from_the_issuer() {
    let fake = FakeIntrospection::start().await;
    fake.activate("a", json!({}));
    fake.activate("b", json!({}));
    let cfg =
        yaml(&fake, &secret_ref(), "", "").replace(&format!("      url: \"{}\"\n", fake.url()), "");
    assert!(!cfg.contains("/introspect"));
    let (p, _rt) = compile(&cfg);
    let now = SystemTime::now();
    assert_eq!(outcome(&check_at(&p, "a", now).await), "allow");
    assert_eq!(outcome(&check_at(&p, "b", now).await), "allow");
    assert_eq!((fake.discovery_requests(), fake.requests()), (1, 2));
}

#[tokio::test]
async fn several_providers_are_asked_in_order_and_the_first_active_answer_wins() {
    let a = FakeIntrospection::start().await;
    let b = FakeIntrospection::start().await;
    b.activate("b-token", json!({"sub": "from-b"}));
    let provider = |name: &str, f: &FakeIntrospection| {
        format!(
            "  - name: {name}\n    issuer: \"{}\"\n    introspection: {{url: \"{}\", client_id: {CLIENT_ID}, client_secret: {}}}\n",
            f.issuer,
            f.url(),
            secret_ref()
        )
    };
    let cfg = format!(
        "identity_providers:\n{}{}apis:\n  - name: orders\n    match: {{path_prefix: /orders}}\n    jwt: {{providers: [a, b]}}\n",
        provider("a", &a),
        provider("b", &b)
    );
    let (p, _rt) = compile(&cfg);
    let now = SystemTime::now();
    let d = check_at(&p, "b-token", now).await;
    assert_eq!(outcome(&d), "allow");
    assert!(portcullis::cli::explain_text(&d).contains("introspected by provider `b`"));
    assert_eq!((a.requests(), b.requests()), (1, 1));
    // A token answered by one provider is not another's: the pair is the cache key.
    assert_eq!(
        outcome(&check_at(&p, "nobody", now).await),
        "401 TokenNotActive"
    );
    // One provider cannot answer: no "not active" verdict, fail closed.
    a.set_raw(Some((502, Vec::new())));
    assert_eq!(
        outcome(&check_at(&p, "other", now).await),
        "503 IdentityProviderUnavailable"
    );
}

#[tokio::test]
async fn requests_in_flight_are_capped_by_max_concurrent_fetches() {
    let fake = FakeIntrospection::start().await;
    fake.set_delay(Duration::from_millis(500));
    fake.activate("one", json!({}));
    fake.activate("two", json!({}));
    let cfg = format!(
        "limits: {{max_concurrent_fetches: 1}}\n{}",
        yaml(&fake, &secret_ref(), "", "")
    );
    let (p, _rt) = compile(&cfg);
    let now = SystemTime::now();
    let (d1, d2) = tokio::join!(check_at(&p, "one", now), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        check_at(&p, "two", now).await
    });
    assert_eq!(outcome(&d1), "allow");
    assert_eq!(outcome(&d2), "503 IdentityProviderUnavailable");
    assert_eq!(fake.requests(), 1, "the second was refused before sending");
}

#[tokio::test]
async fn offline_checks_wait_rather_than_ask() {
    let fake = FakeIntrospection::start().await;
    fake.activate("tok", json!({}));
    let (p, _rt) = compile(&yaml(&fake, &secret_ref(), "", ""));
    let headers: portcullis::policy::Headers =
        [("authorization".to_string(), b"Bearer tok".to_vec().into())].into();
    let input = CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/1",
        scheme: "",
        headers: &headers,
        peer: None,
        peer_certificate: "",
        context_extensions: None,
    };
    let opts = EvalOptions {
        now: SystemTime::now(),
        explain: false,
    };
    assert!(
        p.decide_now(&input, opts).is_none(),
        "a miss needs a request"
    );
    assert_eq!(fake.requests(), 0);
    assert_eq!(outcome(&p.decide(&input, opts).await), "allow");
    let d = p.decide_now(&input, opts).expect("cached now");
    assert_eq!(outcome(&d), "allow");
}

#[test]
fn config_errors_are_reported_with_their_paths() {
    let cases: &[(&str, &str)] = &[
        (
            "client_secret: plain-text",
            "identity_providers[0].introspection.client_secret: the client secret must not be written in the file",
        ),
        (
            "client_auth: private_key_jwt",
            "identity_providers[0].introspection.client_auth: `private_key_jwt`: use client_secret_basic or client_secret_post",
        ),
        (
            "tokens: jwt",
            "identity_providers[0].introspection.tokens: `jwt`: use opaque or all",
        ),
        (
            "url: ftp://x/introspect",
            "identity_providers[0].introspection.url: `ftp://x/introspect` is not an http:// or https:// URL",
        ),
        (
            "cache_ttl: 0s",
            "identity_providers[0].introspection.cache_ttl: must be greater than 0",
        ),
        (
            "cache_ttl: 2h",
            "identity_providers[0].introspection.cache_ttl: at most 1h",
        ),
        (
            "negative_cache_ttl: soon",
            "identity_providers[0].introspection.negative_cache_ttl: `soon` is not a duration",
        ),
        (
            "client_id: \"\"",
            "identity_providers[0].introspection.client_id: must be non-empty",
        ),
    ];
    for (line, want) in cases {
        let key = line.split(':').next().unwrap();
        let mut fields = vec![
            "url: https://idp.test/introspect".to_string(),
            "client_id: rs".to_string(),
            format!("client_secret: {}", secret_ref()),
        ];
        fields.retain(|f| !f.starts_with(&format!("{key}:")));
        fields.push(line.to_string());
        let cfg = format!(
            "identity_providers:\n  - name: idp\n    issuer: https://idp.test\n    introspection:\n{}\napis:\n  - name: orders\n    match: {{path_prefix: /orders}}\n    jwt: {{providers: [idp]}}\n",
            fields
                .iter()
                .map(|f| format!("      {f}\n"))
                .collect::<String>()
        );
        let errs = compile_with(&cfg, Runtime::offline())
            .err()
            .unwrap_or_else(|| panic!("{line}: accepted"))
            .to_string();
        assert!(errs.contains(want), "{line}: {errs}");
        assert!(!errs.contains(CLIENT_SECRET), "{errs}");
    }
    // No URL and nothing to discover it from.
    let cfg = format!(
        "identity_providers:\n  - name: idp\n    issuer: corp-idp\n    introspection: {{client_id: rs, client_secret: {}}}\n",
        secret_ref()
    );
    let errs = compile_with(&cfg, Runtime::offline())
        .err()
        .unwrap()
        .to_string();
    assert!(
        errs.contains("identity_providers[0].introspection.url: is required"),
        "{errs}"
    );
    // With a URL, such an issuer is fine: no keys, no discovery.
    let cfg = format!(
        "identity_providers:\n  - name: idp\n    issuer: corp-idp\n    introspection: {{url: https://idp.test/i, client_id: rs, client_secret: {}}}\n",
        secret_ref()
    );
    compile_with(&cfg, Runtime::offline()).unwrap();
    // An unknown setting.
    let cfg = "identity_providers:\n  - name: idp\n    issuer: https://idp.test\n    introspection: {client_id: rs, client_secret: x, lifetime: 5m}\n";
    let errs = compile_with(cfg, Runtime::offline())
        .err()
        .unwrap()
        .to_string();
    assert!(errs.contains("lifetime"), "{errs}");
}
