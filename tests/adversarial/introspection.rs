//! Hostile introspection answers and hostile opaque tokens: each is refused (never an allow), the
//! endpoint's misbehaviour fails closed within `fetch_timeout`, a JWS-shaped forgery is decided by
//! its signature without being sent anywhere, a token that is not a bearer token is refused before
//! any request, and neither the token nor the client secret reaches the decision's details.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis::config;
use portcullis::policy::{self, CheckInput, Decision, EvalOptions, Outcome, PolicySet, Runtime};
use serde_json::json;

use crate::fake::{CLIENT_SECRET, FakeIntrospection};

fn compile(fake: &FakeIntrospection, extra: &str) -> (PolicySet, Runtime) {
    let yaml = format!(
        r#"
identity_providers:
  - name: idp
    issuer: "{iss}"
    jwks_uri: "{iss}/jwks"
    fetch_timeout: 500ms
    introspection:
      url: "{iss}/introspect"
      client_id: rs
      client_secret: ${{env:SECRET}}
{extra}
apis:
  - name: orders
    match: {{path_prefix: /orders}}
    jwt: {{providers: [idp]}}
"#,
        iss = fake.issuer
    );
    let lookup = |name: &str| (name == "SECRET").then(|| CLIENT_SECRET.to_string());
    let src = config::parse_with_env(&yaml, Path::new("."), &lookup).unwrap();
    let runtime = Runtime::on_demand();
    let (policy, _) = policy::compile(&src, &runtime).unwrap_or_else(|e| panic!("{e}"));
    runtime.publish(&policy);
    (policy, runtime)
}

async fn check(p: &PolicySet, authorization: &[u8]) -> Decision {
    let headers: portcullis::policy::Headers =
        [("authorization".to_string(), authorization.to_vec().into())].into();
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
    let now = SystemTime::now();
    p.decide(&input, EvalOptions { now, explain: true }).await
}

fn reason(d: &Decision) -> &'static str {
    match &d.outcome {
        Outcome::Allow => "allow",
        Outcome::Deny(den) => den.reason.as_str(),
    }
}

/// Everything a user or an operator sees of a decision.
fn shown(d: &Decision) -> String {
    let body = match &d.outcome {
        Outcome::Deny(den) => den.body("id"),
        Outcome::Allow => String::new(),
    };
    format!("{d:?}\n{}\n{body}", portcullis::cli::explain_text(d))
}

#[tokio::test]
async fn hostile_answers_are_never_an_allow() {
    let fake = FakeIntrospection::start().await;
    let (p, _rt) = compile(&fake, "");
    let huge = format!(r#"{{"active": true, "pad": "{}"}}"#, "x".repeat(200 * 1024));
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let foreign = format!(r#"{{"active": true, "iss": "https://evil.test", "exp": {exp}}}"#);
    let cases: &[(&str, u16, &str, &str)] = &[
        (
            "active as a string",
            200,
            r#"{"active": "true"}"#,
            "IdentityProviderUnavailable",
        ),
        (
            "active as a number",
            200,
            r#"{"active": 1}"#,
            "IdentityProviderUnavailable",
        ),
        (
            "no active",
            200,
            r#"{"sub": "alice"}"#,
            "IdentityProviderUnavailable",
        ),
        (
            "not an object",
            200,
            r#"[{"active": true}]"#,
            "IdentityProviderUnavailable",
        ),
        (
            "not JSON",
            200,
            "active=true",
            "IdentityProviderUnavailable",
        ),
        (
            "exp as a string",
            200,
            r#"{"active": true, "exp": "never"}"#,
            "IdentityProviderUnavailable",
        ),
        (
            "active with a foreign iss",
            200,
            &foreign,
            "TokenIssuerNotAllowed",
        ),
        ("a huge answer", 200, &huge, "IdentityProviderUnavailable"),
        (
            "active, but an error status",
            500,
            r#"{"active": true}"#,
            "IdentityProviderUnavailable",
        ),
        (
            "active, but a redirect status",
            302,
            r#"{"active": true}"#,
            "IdentityProviderUnavailable",
        ),
    ];
    for (i, (name, status, body, want)) in cases.iter().enumerate() {
        fake.set_raw(Some((*status, body.as_bytes().to_vec())));
        // A new token each time: no answer is reused.
        let d = check(&p, format!("Bearer opaque-{i}").as_bytes()).await;
        assert_eq!(reason(&d), *want, "{name}");
    }
}

#[tokio::test]
async fn a_slow_endpoint_is_bounded_by_fetch_timeout() {
    let fake = FakeIntrospection::start().await;
    fake.activate("slow", json!({}));
    fake.set_delay(Duration::from_secs(5));
    let (p, _rt) = compile(&fake, "");
    let started = Instant::now();
    let d = check(&p, b"Bearer slow").await;
    assert_eq!(reason(&d), "IdentityProviderUnavailable");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(shown(&d).contains("fetch_timeout"), "{}", shown(&d));
}

#[tokio::test]
async fn a_jws_shaped_forgery_is_not_sent_to_introspection_in_opaque_mode() {
    let fake = FakeIntrospection::start().await;
    let (p, _rt) = compile(&fake, "");
    // An unsigned token, and one with a made-up signature, that an endpoint might call active.
    for forged in [
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
        "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJhZG1pbiJ9.c2ln",
    ] {
        fake.activate(forged, json!({"sub": "admin"}));
        let d = check(&p, format!("Bearer {forged}").as_bytes()).await;
        assert_ne!(reason(&d), "allow", "{forged}");
    }
    assert_eq!(fake.requests(), 0);
    // With `tokens: all` the same token is the endpoint's to judge.
    let (all, _rt) = compile(&fake, "      tokens: all");
    let forged = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJhZG1pbiJ9.c2ln";
    assert_eq!(
        reason(&check(&all, format!("Bearer {forged}").as_bytes()).await),
        "allow"
    );
    assert_eq!(fake.requests(), 1);
}

#[tokio::test]
async fn a_token_with_whitespace_or_control_characters_is_refused_before_any_request() {
    let fake = FakeIntrospection::start().await;
    let (p, _rt) = compile(&fake, "");
    for header in [
        &b"Bearer abc\x01def"[..],
        b"Bearer abc\x7fdef",
        b"Bearer abc\tdef",
        b"Bearer abc def",
        b"Bearer abc\xc2\xa0def",
    ] {
        let d = check(&p, header).await;
        assert_ne!(reason(&d), "allow", "{header:?}");
        assert_ne!(reason(&d), "TokenNotActive", "{header:?}");
    }
    assert_eq!(fake.requests(), 0);
}

#[tokio::test]
async fn neither_the_token_nor_the_secret_reaches_a_decision() {
    let fake = FakeIntrospection::start().await;
    let token = "opaque-token-value-that-must-stay-private";
    let (p, rt) = compile(&fake, "");
    let mut everything = format!("{p:?}\n{rt:?}\n");
    let answers = [
        None,
        Some((401, br#"{"error": "invalid_client"}"#.to_vec())),
        Some((200, br#"{"active": "yes"}"#.to_vec())),
    ];
    for (i, raw) in answers.into_iter().enumerate() {
        fake.set_raw(raw);
        // A new token each time (an inactive answer is cached).
        let header = format!("Bearer {token}{i}");
        everything.push_str(&shown(&check(&p, header.as_bytes()).await));
    }
    fake.set_raw(None);
    fake.activate(token, json!({"iss": "https://evil.test"}));
    let d = check(&p, format!("Bearer {token}").as_bytes()).await;
    assert_eq!(reason(&d), "TokenIssuerNotAllowed");
    everything.push_str(&shown(&d));
    assert!(!everything.contains(token), "{everything}");
    assert!(!everything.contains(CLIENT_SECRET), "{everything}");
    assert_eq!(fake.requests(), 4);
}
