//! What the request-line tables share: a policy compiled in process and decided on wire to wire.
#![allow(dead_code)]

use portcullis::config;
use portcullis::policy::{self, PolicySet, RequestHeader, Runtime};
use portcullis::proto::auth::CheckRequest;

use crate::common::{Seen, get, seen};

/// `demo-key-123`, hashed.
pub const KEY_HASH: &str =
    "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873";
pub const KEY: &str = "demo-key-123";

/// An open `/public`, a key-protected `/admin` and `admin.example.com`, and an open catch-all: the
/// shape in which a request read differently by portcullis and the backend becomes an allow.
pub fn layered(extra: &str) -> String {
    format!(
        r#"
{extra}
subscriptions:
  keys: [{{ id: demo, primary: "{KEY_HASH}" }}]
apis:
  - name: admin-host
    match: {{ hosts: [admin.example.com] }}
    subscription_required: true
    on_allow: {{ set_headers: {{ x-api: "{{api}}" }} }}
  - name: admin
    match: {{ path_prefix: /admin }}
    subscription_required: true
    on_allow: {{ set_headers: {{ x-api: "{{api}}" }} }}
  - name: public
    match: {{ path_prefix: /public }}
    on_allow: {{ set_headers: {{ x-api: "{{api}}" }} }}
  - name: catch-all
    match: {{}}
    on_allow: {{ set_headers: {{ x-api: "{{api}}" }} }}
"#
    )
}

/// Compiles `yaml` offline (no network), with `${env:NAME}` answered by `env`.
pub fn compile_with_env(yaml: &str, env: &dyn Fn(&str) -> Option<String>) -> PolicySet {
    let src = config::parse_with_env(yaml, std::path::Path::new("."), env)
        .unwrap_or_else(|e| panic!("{e}"));
    policy::compile(&src, &Runtime::offline())
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

pub fn compile(yaml: &str) -> PolicySet {
    compile_with_env(yaml, &|_| None)
}

/// A CheckRequest as Envoy sends it, with any method, host and target.
pub fn request(method: &str, host: &str, target: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut h = get(target);
    for (k, v) in headers {
        h = h.header(k, v);
    }
    let mut req = h.request();
    let http = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("get() builds HTTP attributes");
    http.method = method.to_string();
    http.host = host.to_string();
    http.headers
        .retain(|h| h.name != ":method" && h.name != ":authority");
    http.headers
        .push(RequestHeader::new(":method", method.to_string()));
    http.headers
        .push(RequestHeader::new(":authority", host.to_string()));
    req
}

/// Decides wire to wire, as the gRPC listener does.
pub async fn decide(policy: &PolicySet, req: &CheckRequest) -> Seen {
    seen(&portcullis::server::grpc::decide(policy, req).await)
}

/// The answer a user sees, in one comparable value: `allow <api>` (the API's name from the
/// `x-api` header the policies set) or `deny <status> <reason>`.
pub fn verdict(s: &Seen) -> String {
    match &s.body {
        None if s.code == 0 => match s.headers.get("x-api") {
            Some((api, _)) => format!("allow {api}"),
            None => "allow".into(),
        },
        Some(body) => format!(
            "deny {} {}",
            s.status.unwrap_or_default(),
            body["reason"].as_str().unwrap_or("?")
        ),
        None => format!("code {}", s.code),
    }
}
