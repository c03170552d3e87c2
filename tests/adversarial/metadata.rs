//! The decision's `dynamic_metadata` is read by Envoy's RBAC, rate limits and router as facts
//! portcullis vouches for: nothing a check did not establish may appear in it, and nothing the caller
//! sends can shape it.

use crate::support::{compile_with_env, decide, request};

const YAML: &str = r#"
identity_providers:
  - name: corp
    issuer: https://idp.example.com
    keys: [{ kty: oct, kid: k1, k: "${env:HMAC}", alg: HS256 }]
    algorithms: [HS256]
apis:
  - name: orders
    match: { path_prefix: /orders }
    jwt: { providers: [corp], audiences: [api://orders], scopes: { all: [orders:read] } }
    on_allow:
      metadata: { tenant: "{jwt.tid}" }
    mode: shadow
"#;

/// (what is tried, the request's headers, the metadata the decision must carry besides its id)
type Case = (&'static str, Vec<(&'static str, String)>, serde_json::Value);

const HMAC: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA";

fn hs256(payload: &serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#),
        b64(payload.to_string().as_bytes())
    );
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(HMAC)
        .expect("base64url");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    format!(
        "{input}.{}",
        b64(ring::hmac::sign(&key, input.as_bytes()).as_ref())
    )
}

#[tokio::test]
async fn only_what_the_checks_established_reaches_the_metadata() {
    let p = compile_with_env(YAML, &|n| (n == "HMAC").then(|| HMAC.to_string()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |scope: &str| {
        serde_json::json!({
            "iss": "https://idp.example.com", "aud": "api://orders", "sub": "admin",
            "client_id": "trusted-client", "tid": "contoso", "scope": scope,
            "exp": now + 600,
        })
    };
    let good = hs256(&claims("orders:read"));
    let (head, rest) = good.split_once('.').unwrap();
    let (_, sig) = rest.rsplit_once('.').unwrap();
    // The signature of one payload on another: the claims are never verified.
    let forged = format!(
        "{head}.{}.{sig}",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            claims("orders:read orders:admin").to_string()
        )
    );
    let cases: &[Case] = &[
        (
            "a forged signature in shadow mode: allowed, but no claim of it is a fact",
            vec![("authorization", format!("Bearer {forged}"))],
            serde_json::json!({"api": "orders", "shadow_reason": "TokenSignatureInvalid"}),
        ),
        (
            "a valid token that fails the scope rule: its claims are not facts either",
            vec![(
                "authorization",
                format!("Bearer {}", hs256(&claims("orders:write"))),
            )],
            serde_json::json!({"api": "orders", "shadow_reason": "InsufficientScope"}),
        ),
        (
            "the caller's own decision id header is not the decision's id",
            vec![
                ("authorization", format!("Bearer {good}")),
                ("x-portcullis-decision-id", "0".repeat(32)),
            ],
            serde_json::json!({
                "api": "orders", "subject": "admin", "issuer": "https://idp.example.com",
                "client_id": "trusted-client", "scopes": ["orders:read"], "tenant": "contoso",
            }),
        ),
    ];
    for (what, headers, want) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let s = decide(
            &p,
            &request("GET", "api.example.com", "/orders/1", &headers),
        )
        .await;
        assert_eq!(s.code, 0, "{what}: shadow mode allows");
        let mut got = s.metadata.clone();
        let id = got
            .as_object_mut()
            .and_then(|m| m.remove("decision_id"))
            .unwrap_or_default();
        assert_eq!(
            id.as_str(),
            Some(s.headers["x-portcullis-decision-id"].0.as_str()),
            "{what}"
        );
        assert_ne!(id.as_str(), Some("0".repeat(32).as_str()), "{what}");
        assert_eq!(&got, want, "{what}");
    }
}
