//! The decision's facts as ext_authz `dynamic_metadata`, through the real server over gRPC: what
//! Envoy's access logs, RBAC, rate limits and Lua read (`envoy.filters.http.ext_authz` namespace).

mod common;
#[path = "jwt_common/mod.rs"]
mod keys;

use common::{TestServer, get, metadata};
use portcullis::proto::auth::CheckResponse;
use serde_json::json;

const ISS: &str = "https://idp.test/corp";
const AUD: &str = "api://orders";
const KEY_HASH: &str = "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"; // demo-key-123

fn config(key: &keys::TestKey, extra_top: &str, on_allow_extra: &str, mode: &str) -> String {
    format!(
        r#"
{extra_top}
identity_providers:
  - name: corp
    issuer: {ISS}
    keys: [{jwk}]
products:
  - name: gold
    apis: [orders]
subscriptions:
  keys: [{{ id: sub-42, scope: "product:gold", primary: "{KEY_HASH}" }}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    subscription_required: true
    mode: {mode}
    jwt:
      providers: [corp]
      audiences: [{AUD}]
      scopes: {{ all: [orders:read] }}
    on_allow:
      set_headers: {{ x-user: "{{jwt.sub}}" }}
{on_allow_extra}
"#,
        jwk = key.jwk
    )
}

fn token(key: &keys::TestKey, sub: &str, scope: &str) -> String {
    let mut c = keys::claims(ISS, AUD, sub);
    c["scope"] = json!(scope);
    c["azp"] = json!("portal-spa");
    key.token(c)
}

/// `GET /orders/1` with this `authorization` value and the subscription key.
async fn ask(
    client: &mut portcullis::proto::auth::authorization_client::AuthorizationClient<
        tonic::transport::Channel,
    >,
    authorization: &str,
) -> CheckResponse {
    let req = get("/orders/1")
        .header("authorization", authorization)
        .header("ocp-apim-subscription-key", "demo-key-123")
        .request();
    client.check(req).await.unwrap().into_inner()
}

fn decision_id(r: &CheckResponse) -> String {
    common::seen(r).headers["x-portcullis-decision-id"]
        .0
        .clone()
}

#[tokio::test]
async fn allow_carries_the_facts_and_deny_its_reason() {
    let key = keys::rsa(0, Some("k1"));
    let srv = TestServer::start(&config(
        &key,
        "",
        "      metadata: { tenant: \"{jwt.tid}\", plan: gold, who: \"{jwt.sub}@{api}\" }",
        "enforce",
    ))
    .await;
    let mut client = srv.client().await;

    let mut claims = keys::claims(ISS, AUD, "alice");
    claims["scope"] = json!("orders:read orders:write");
    claims["azp"] = json!("portal-spa");
    claims["tid"] = json!("contoso");
    let bearer = format!("Bearer {}", key.token(claims));
    let allow = ask(&mut client, &bearer).await;
    assert_eq!(common::seen(&allow).code, 0);
    assert_eq!(
        metadata(&allow),
        json!({
            "api": "orders",
            "decision_id": decision_id(&allow),
            "subscription_id": "sub-42",
            "product": "gold",
            "subject": "alice",
            "issuer": ISS,
            "client_id": "portal-spa",
            "scopes": ["orders:read", "orders:write"],
            "tenant": "contoso",
            "plan": "gold",
            "who": "alice@orders",
        })
    );

    // A deny: the API, the decision id and the reason; nothing the failed checks had established.
    let deny = ask(
        &mut client,
        &format!("Bearer {}", token(&key, "bob", "other")),
    )
    .await;
    let seen = common::seen(&deny);
    assert_eq!((seen.code, seen.status), (7, Some(403)));
    assert_eq!(
        metadata(&deny),
        json!({"api": "orders", "decision_id": decision_id(&deny), "reason": "InsufficientScope"})
    );

    // No API: no `api` entry.
    let unmatched = client
        .check(get("/elsewhere").request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        metadata(&unmatched),
        json!({"decision_id": decision_id(&unmatched), "reason": "NoMatchingApi"})
    );
    srv.running.shutdown().await.unwrap();
}

/// A claim's control characters could forge an access-log line or a header where the metadata is
/// used: such a value is left out, the rest of the facts stay.
#[tokio::test]
async fn values_with_control_characters_are_left_out() {
    let key = keys::rsa(0, Some("k1"));
    let srv = TestServer::start(&config(
        &key,
        "",
        "      metadata: { tenant: \"{jwt.tid}\" }",
        "enforce",
    ))
    .await;
    let mut client = srv.client().await;
    let mut claims = keys::claims(ISS, AUD, "eve\nx-admin: true");
    claims["scope"] = json!("orders:read");
    claims["tid"] = json!("t1\r\nforged");
    let bearer = format!("Bearer {}", key.token(claims));
    let r = ask(&mut client, &bearer).await;
    // The header from {jwt.sub} is refused as before; the metadata never carries the value.
    let m = metadata(&r);
    assert!(m.get("subject").is_none(), "{m}");
    assert!(m.get("tenant").is_none(), "{m}");
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn shadow_mode_names_the_waived_reason() {
    let key = keys::rsa(0, Some("k1"));
    let srv = TestServer::start(&config(
        &key,
        "",
        "      metadata: { plan: gold }",
        "shadow",
    ))
    .await;
    let mut client = srv.client().await;
    let r = ask(
        &mut client,
        &format!("Bearer {}", token(&key, "bob", "other")),
    )
    .await;
    assert_eq!(common::seen(&r).code, 0, "shadow mode allows");
    // What enforce mode would add on allow (`plan`) is not sent on a waived deny; what was
    // established before the failing check is.
    assert_eq!(
        metadata(&r),
        json!({
            "api": "orders",
            "decision_id": decision_id(&r),
            "shadow_reason": "InsufficientScope",
            "subscription_id": "sub-42",
            "product": "gold",
        })
    );
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn dynamic_metadata_false_sends_none() {
    let key = keys::rsa(0, Some("k1"));
    let srv = TestServer::start(&config(&key, "dynamic_metadata: false", "", "enforce")).await;
    let mut client = srv.client().await;
    let r = ask(
        &mut client,
        &format!("Bearer {}", token(&key, "alice", "orders:read")),
    )
    .await;
    assert_eq!(common::seen(&r).code, 0);
    assert!(r.dynamic_metadata.is_none());
    srv.running.shutdown().await.unwrap();
}

#[test]
fn metadata_settings_are_checked_with_their_paths() {
    let key = keys::rsa(0, Some("k1"));
    let cases = [
        (
            config(&key, "", "      metadata: { \"a:b\": x }", "enforce"),
            "apis[0].on_allow.metadata.a:b",
            "path separator",
        ),
        (
            config(
                &key,
                "",
                "      metadata: { subject: \"{jwt.email}\" }",
                "enforce",
            ),
            "apis[0].on_allow.metadata.subject",
            "facts portcullis sends itself",
        ),
        (
            config(
                &key,
                "",
                "      metadata: { c: \"{cert.thumbprint}\" }",
                "enforce",
            ),
            "apis[0].on_allow.metadata.c",
            "no `client_certificate` section",
        ),
        (
            config(
                &key,
                "dynamic_metadata: false",
                "      metadata: { c: x }",
                "enforce",
            ),
            "apis[0].on_allow.metadata.c",
            "sends no metadata",
        ),
        (
            config(&key, "dynamic_metadata: maybe", "", "enforce"),
            "dynamic_metadata",
            "",
        ),
    ];
    for (i, (yaml, path, why)) in cases.iter().enumerate() {
        let stderr = common::validate_refuses(yaml);
        assert!(
            stderr.contains(path) && stderr.contains(why),
            "case {i}: expected `{path}` ({why}) in:\n{stderr}"
        );
    }
}

/// `portcullis check` shows what Envoy would receive, without the per-run decision id.
#[test]
fn check_explains_the_metadata() {
    let key = keys::rsa(0, Some("k1"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        config(&key, "", "      metadata: { plan: gold }", "enforce"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(&file)
        .args([
            "--method",
            "GET",
            "--url",
            "http://api.example.com/orders/1",
        ])
        .args(["-H", "ocp-apim-subscription-key: demo-key-123"])
        .args([
            "-H",
            &format!(
                "authorization: Bearer {}",
                token(&key, "alice", "orders:read")
            ),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("dynamic metadata (envoy.filters.http.ext_authz):\n"),
        "{stdout}"
    );
    assert!(stdout.contains("  api: orders\n"), "{stdout}");
    assert!(stdout.contains("  subject: alice\n"), "{stdout}");
    assert!(stdout.contains("  scopes: [orders:read]\n"), "{stdout}");
    assert!(stdout.contains("  plan: gold\n"), "{stdout}");
    assert!(!stdout.contains("decision_id"), "{stdout}");
}
