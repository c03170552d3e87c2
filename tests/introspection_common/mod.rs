//! A counting fake RFC 7662 introspection endpoint on 127.0.0.1, with a discovery document naming it:
//! tests set the answer per token, break it, slow it, or make it answer any body, and read what
//! each request carried (client authentication, form).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "rs";
pub const CLIENT_SECRET: &str = "rs-s3cret-value";

/// One request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `basic`, `post`, or `none`, with the client id and secret it carried.
    pub auth: (&'static str, String, String),
    pub form: HashMap<String, String>,
    pub accept: Option<String>,
}

#[derive(Default)]
struct Shared {
    base: String,
    answers: Mutex<HashMap<String, Value>>,
    raw: Mutex<Option<(u16, Vec<u8>)>>,
    requests: AtomicUsize,
    discovery: AtomicUsize,
    delay_ms: AtomicU64,
    seen: Mutex<Vec<Seen>>,
}

#[derive(Clone)]
pub struct FakeIntrospection {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub issuer: String,
    shared: Arc<Shared>,
}

impl FakeIntrospection {
    pub async fn start() -> FakeIntrospection {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer = format!("http://{addr}");
        let shared = Arc::new(Shared {
            base: issuer.clone(),
            ..Default::default()
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route(
                "/jwks",
                get(|| async { json_response(&json!({"keys": []})) }),
            )
            .route("/introspect", post(introspect))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeIntrospection {
            addr,
            issuer,
            shared,
        }
    }

    pub fn url(&self) -> String {
        format!("{}/introspect", self.issuer)
    }

    /// The answer for `token` (default `{"active": false}`).
    pub fn set(&self, token: &str, answer: Value) {
        self.shared
            .answers
            .lock()
            .unwrap()
            .insert(token.to_string(), answer);
    }

    /// An active answer from this issuer with these extra members.
    pub fn activate(&self, token: &str, extra: Value) {
        let mut a = json!({"active": true, "iss": self.issuer, "client_id": "svc"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        self.set(token, a);
    }

    /// Answers every request with this status and body while set.
    pub fn set_raw(&self, raw: Option<(u16, Vec<u8>)>) {
        *self.shared.raw.lock().unwrap() = raw;
    }

    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn discovery_requests(&self) -> usize {
        self.shared.discovery.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }
}

async fn discovery(State(s): State<Arc<Shared>>) -> Response {
    s.discovery.fetch_add(1, Ordering::SeqCst);
    json_response(&json!({
        "issuer": s.base,
        "jwks_uri": format!("{}/jwks", s.base),
        "introspection_endpoint": format!("{}/introspect", s.base),
    }))
}

async fn introspect(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let auth = match headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        Some(b) => {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default();
            let text = String::from_utf8(decoded).unwrap_or_default();
            let (id, secret) = text.split_once(':').unwrap_or_default();
            let dec = |s: &str| {
                form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            ("basic", dec(id), dec(secret))
        }
        None => match (form.get("client_id"), form.get("client_secret")) {
            (Some(i), Some(s)) => ("post", i.clone(), s.clone()),
            _ => ("none", String::new(), String::new()),
        },
    };
    let authenticated = auth.1 == CLIENT_ID && auth.2 == CLIENT_SECRET;
    s.seen.lock().unwrap().push(Seen {
        auth,
        form: form.clone(),
        accept: headers
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
    });
    if let Some((status, body)) = s.raw.lock().unwrap().clone() {
        return (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            body,
        )
            .into_response();
    }
    if !authenticated {
        return (StatusCode::UNAUTHORIZED, "invalid_client").into_response();
    }
    let token = form.get("token").cloned().unwrap_or_default();
    let answer = s
        .answers
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .unwrap_or_else(|| json!({"active": false}));
    json_response(&answer)
}

fn json_response(v: &Value) -> Response {
    ([("content-type", "application/json")], v.to_string()).into_response()
}
