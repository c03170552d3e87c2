//! A counting fake OpenID Provider on 127.0.0.1: a discovery document and a JWKS that tests can
//! change, delay or break, and that counts every request.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

#[derive(Default)]
struct Shared {
    base: String,
    issuer: Mutex<String>,
    jwks: Mutex<Value>,
    jwks_hits: AtomicUsize,
    discovery_hits: AtomicUsize,
    failing: AtomicBool,
    delay_ms: AtomicU64,
}

/// The fake provider. Dropping it does not stop the server; it lives as long as the test runtime.
#[derive(Clone)]
pub struct FakeIdp {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub issuer: String,
    shared: Arc<Shared>,
}

impl FakeIdp {
    /// Starts serving `jwks` at `/jwks` and discovery at `/.well-known/openid-configuration`.
    pub async fn start(jwks: Value) -> FakeIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer = format!("http://{addr}");
        let shared = Arc::new(Shared {
            base: issuer.clone(),
            issuer: Mutex::new(issuer.clone()),
            jwks: Mutex::new(jwks),
            ..Default::default()
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(keys))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeIdp {
            addr,
            issuer,
            shared,
        }
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.issuer)
    }

    /// Publishes another key set.
    pub fn set_jwks(&self, jwks: Value) {
        *self.shared.jwks.lock().unwrap() = jwks;
    }

    /// Makes the discovery document name another issuer.
    pub fn set_discovery_issuer(&self, issuer: &str) {
        *self.shared.issuer.lock().unwrap() = issuer.to_string();
    }

    /// Answers 500 to every request while true.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// Holds every answer this long (to make concurrent checks overlap a fetch).
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// JWKS requests so far.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_hits.load(Ordering::SeqCst)
    }

    /// Discovery requests so far.
    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_hits.load(Ordering::SeqCst)
    }

    /// Waits (up to 10 s) until `cond` holds.
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&FakeIdp) -> bool) {
        for _ in 0..1000 {
            if cond(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }
}

async fn pause(s: &Shared) -> Option<Response> {
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    s.failing
        .load(Ordering::SeqCst)
        .then(|| (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response())
}

async fn discovery(State(s): State<Arc<Shared>>) -> Response {
    s.discovery_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = pause(&s).await {
        return r;
    }
    let issuer = s.issuer.lock().unwrap().clone();
    // The JWKS lives on this server whatever issuer the document claims.
    json_response(&json!({"issuer": issuer, "jwks_uri": format!("{}/jwks", s.base)}))
}

async fn keys(State(s): State<Arc<Shared>>) -> Response {
    s.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = pause(&s).await {
        return r;
    }
    let jwks = s.jwks.lock().unwrap().clone();
    json_response(&jwks)
}

fn json_response(v: &Value) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}
