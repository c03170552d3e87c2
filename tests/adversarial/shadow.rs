//! Shadow mode (`mode: shadow`) waives a deny but must send the request upstream exactly as enforce
//! mode shapes it: every header enforce mode would set or remove is removed, so a caller can never
//! supply one of them itself.

use crate::support::{compile_with_env, decide, request};

#[tokio::test]
async fn a_waived_deny_removes_every_header_enforce_mode_would_set() {
    let yaml = r#"
credentials:
  - { name: partner, grant: static, token: "${env:PARTNER_TOKEN}" }
identity_providers:
  - name: corp
    issuer: https://idp.example.com
    keys: [{ kty: oct, kid: k1, k: "${env:HMAC}", alg: HS256 }]
    algorithms: [HS256]
apis:
  - name: orders
    match: { path_prefix: /orders }
    jwt: { providers: [corp], audiences: [api://orders] }
    on_allow:
      set_headers: { x-user-id: "{jwt.sub}", x-api: "{api}" }
      remove_headers: [x-internal-debug]
      backend_credential: { name: partner, header: x-partner-auth }
    mode: shadow
"#;
    let p = compile_with_env(yaml, &|n| match n {
        "PARTNER_TOKEN" => Some("s3cret".into()),
        "HMAC" => Some("c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA".into()),
        _ => None,
    });
    // No token: the JWT check fails, shadow mode lets the request through.
    let s = decide(
        &p,
        &request(
            "GET",
            "api.example.com",
            "/orders/1",
            &[
                ("x-user-id", "admin"),
                ("x-api", "admin"),
                ("x-internal-debug", "1"),
                ("x-partner-auth", "forged"),
            ],
        ),
    )
    .await;
    assert_eq!(s.code, 0, "shadow mode allows: {s:?}");
    let mut removed = s.removed.clone();
    removed.sort();
    // Before: nothing but the key removal, so `x-user-id: admin` reached the backend.
    assert_eq!(
        removed,
        ["x-api", "x-internal-debug", "x-partner-auth", "x-user-id"]
    );
    assert!(!s.headers.contains_key("x-user-id"));
    assert!(!s.headers.contains_key("x-partner-auth"));
    assert!(s.headers.contains_key("x-portcullis-decision-id"));
}
