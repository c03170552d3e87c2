//! Helpers for integration tests: start the real server on 127.0.0.1:0 and talk gRPC to it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use portcullis::proto::auth::authorization_client::AuthorizationClient;
use portcullis::proto::auth::{AttributeContext, CheckRequest, CheckResponse, attribute_context};
use portcullis::proto::core::{Address, SocketAddress, address};
use portcullis::server::{self, Running};
use tonic::transport::Channel;

/// A server running on a temporary config file.
pub struct TestServer {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl TestServer {
    pub async fn start(yaml: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.yaml");
        std::fs::write(&config, with_listen(yaml)).unwrap();
        let running = server::start(&config)
            .await
            .unwrap_or_else(|e| panic!("start: {e}"));
        TestServer {
            running,
            dir,
            config,
        }
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://{}", self.running.addrs.grpc))
            .await
            .unwrap()
    }

    pub fn write_config(&self, yaml: &str) {
        // Write-then-rename, as editors and ConfigMaps do, so the watcher never sees half a file.
        let tmp = self.dir.path().join(".portcullis.yaml.tmp");
        std::fs::write(&tmp, with_listen(yaml)).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }
}

fn with_listen(yaml: &str) -> String {
    if yaml.contains("listen:") {
        yaml.to_string()
    } else {
        format!("listen: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}\n{yaml}")
    }
}

/// A request as Envoy would send it.
pub struct Http {
    pub method: &'static str,
    pub host: &'static str,
    pub path: String,
    pub headers: portcullis::policy::Headers,
    pub peer: &'static str,
    pub certificate: String,
    pub context_extensions: HashMap<String, String>,
}

pub fn get(path: &str) -> Http {
    Http {
        method: "GET",
        host: "api.example.com",
        path: path.to_string(),
        headers: Default::default(),
        peer: "10.1.2.3",
        certificate: String::new(),
        context_extensions: HashMap::new(),
    }
}

impl Http {
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers
            .insert(k.to_string(), v.as_bytes().to_vec().into());
        self
    }

    pub fn request(&self) -> CheckRequest {
        let mut headers = self.headers.clone();
        headers.insert(":method".into(), self.method.as_bytes().to_vec().into());
        headers.insert(":path".into(), self.path.as_bytes().to_vec().into());
        headers.insert(":authority".into(), self.host.as_bytes().to_vec().into());
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(attribute_context::Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: self.peer.to_string(),
                            port_specifier: Some(
                                portcullis::proto::core::socket_address::PortSpecifier::PortValue(
                                    40000,
                                ),
                            ),
                            ..Default::default()
                        })),
                    }),
                    certificate: self.certificate.clone(),
                    ..Default::default()
                }),
                request: Some(attribute_context::Request {
                    time: None,
                    http: Some(attribute_context::HttpRequest {
                        id: "1".into(),
                        method: self.method.into(),
                        headers: headers.into(),
                        path: self.path.clone(),
                        host: self.host.into(),
                        scheme: "http".into(),
                        protocol: "HTTP/1.1".into(),
                        ..Default::default()
                    }),
                }),
                context_extensions: self.context_extensions.clone(),
                ..Default::default()
            }),
        }
    }
}

/// What a user sees of a CheckResponse.
#[derive(Debug)]
pub struct Seen {
    pub code: i32,
    pub status: Option<i32>,
    pub headers: HashMap<String, (String, Option<bool>)>,
    pub body: Option<serde_json::Value>,
    pub removed: Vec<String>,
    pub removed_query: Vec<String>,
    /// `dynamic_metadata` as JSON (`null` when absent), decoded by prost's own `Struct`.
    pub metadata: serde_json::Value,
}

pub fn seen(r: &CheckResponse) -> Seen {
    use portcullis::proto::auth::check_response::HttpResponse;
    let code = r.status.as_ref().map_or(0, |s| s.code);
    let mut s = Seen {
        code,
        status: None,
        headers: HashMap::new(),
        body: None,
        removed: vec![],
        removed_query: vec![],
        metadata: metadata(r),
    };
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            for h in &ok.headers {
                let hv = h.header.as_ref().unwrap();
                s.headers
                    .insert(hv.key.clone(), (hv.value.clone(), h.append));
            }
            s.removed = ok.headers_to_remove.clone();
            s.removed_query = ok.query_parameters_to_remove.clone();
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            s.status = d.status.as_ref().map(|st| st.code);
            for h in &d.headers {
                let hv = h.header.as_ref().unwrap();
                s.headers
                    .insert(hv.key.clone(), (hv.value.clone(), h.append));
            }
            s.body = serde_json::from_str(&d.body).ok();
        }
        _ => {}
    }
    s
}

/// A response's `dynamic_metadata` as JSON (`null` when absent), decoded from the wire by prost's
/// own `google.protobuf.Struct`.
pub fn metadata(r: &CheckResponse) -> serde_json::Value {
    let Some(raw) = &r.dynamic_metadata else {
        return serde_json::Value::Null;
    };
    let s = raw.decode_struct().expect("a google.protobuf.Struct");
    serde_json::Value::Object(s.fields.into_iter().map(|(k, v)| (k, json_of(v))).collect())
}

fn json_of(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    match v.kind {
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(json_of).collect()),
        Some(Kind::StructValue(s)) => {
            Value::Object(s.fields.into_iter().map(|(k, v)| (k, json_of(v))).collect())
        }
        Some(Kind::NullValue(_)) | None => Value::Null,
    }
}

/// Decides in process, without a server, on `GET api.example.com/orders/1` from 10.0.0.1 carrying
/// `authorization: Bearer {token}`, at `now`.
pub async fn decide_bearer(
    policy: &portcullis::policy::PolicySet,
    token: &str,
    now: std::time::SystemTime,
) -> portcullis::policy::Decision {
    let headers: portcullis::policy::Headers = [(
        "authorization".to_string(),
        format!("Bearer {token}").into_bytes().into(),
    )]
    .into();
    let input = portcullis::policy::CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/1",
        scheme: "",
        headers: &headers,
        peer: Some("10.0.0.1".parse().expect("literal")),
        peer_certificate: "",
        context_extensions: None,
    };
    policy
        .decide(
            &input,
            portcullis::policy::EvalOptions {
                now,
                explain: false,
            },
        )
        .await
}

/// The injected `authorization` upstream, or "status reason".
pub fn injected(d: &portcullis::policy::Decision) -> Result<String, String> {
    match &d.outcome {
        portcullis::policy::Outcome::Allow => Ok(d
            .upstream_headers
            .iter()
            .find(|h| h.name == "authorization")
            .expect("an injected authorization header")
            .value
            .clone()),
        portcullis::policy::Outcome::Deny(den) => {
            assert!(
                d.upstream_headers.is_empty(),
                "a deny sends nothing upstream"
            );
            Err(format!("{} {}", den.status, den.reason.as_str()))
        }
    }
}

/// Runs `portcullis validate` on `yaml` (written to a file of its own), which must refuse it:
/// asserts exit 2 and returns what it printed on stderr.
pub fn validate_refuses(yaml: &str) -> String {
    refuses("validate", yaml)
}

/// Runs `portcullis <subcommand> --config FILE` with `yaml` in FILE, which must refuse it: asserts
/// exit 2 and returns what it printed on stderr.
pub fn refuses(subcommand: &str, yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([subcommand, "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

/// Runs `portcullis serve --config CONFIG`, which must refuse to start: asserts exit 2 and returns
/// what it printed on stderr.
pub fn serve_refuses(config: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

/// One admin API call, with a bearer token when given: the status and the body as text.
pub async fn admin_call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let mut request = reqwest::Client::new().request(method.parse().unwrap(), url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let resp = request.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Creates a subscription through the admin API at `base` (`http://.../admin/subscriptions`); the
/// creation answer, which holds the only copy of its keys.
pub async fn create_subscription(
    base: &str,
    token: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let (status, text) = admin_call("POST", base, Some(token), Some(body)).await;
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}
