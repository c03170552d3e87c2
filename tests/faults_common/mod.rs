//! Fakes for the fault tests: an upstream on 127.0.0.1 (an OpenID Provider's discovery and JWKS, or
//! a token endpoint) whose behaviour a test switches, that counts every request it receives, can
//! hold requests until released, and can be taken down so that connecting is refused.
#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::watch;

/// What the upstream does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers normally.
    Ok,
    /// Nobody listens: connecting is refused.
    Down,
    /// Holds every request until [`Upstream::release`], then answers normally.
    Hold,
    /// HTTP 500.
    Error,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with a body that never ends (chunked, no length): only a reader with a cap stops.
    Endless,
    /// 200 announcing a 2 MiB body.
    Oversized,
    /// 200 with a JWKS of 101 valid keys (JWKS only).
    TooManyKeys,
}

struct Shared {
    mode: Mutex<Mode>,
    jwks: Mutex<Value>,
    issuer: String,
    /// Requests received, by path kind.
    jwks_hits: AtomicUsize,
    discovery_hits: AtomicUsize,
    token_hits: AtomicUsize,
    /// Requests being held right now.
    held: AtomicUsize,
    /// Body bytes handed to the connection by `Endless` answers.
    streamed: Arc<AtomicU64>,
    release: watch::Sender<u64>,
    expires_in: AtomicU64,
    /// The refresh token the provider accepts now; each refresh rotates it (`rt-<request>`).
    refresh_token: Mutex<String>,
    /// Refresh tokens presented, in order, and whether each was accepted.
    refreshes: Mutex<Vec<(String, bool)>>,
}

/// A fake upstream. Every answer closes its connection, so `Down` refuses the very next request.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, also the issuer of the discovery document.
    pub base: String,
    shared: Arc<Shared>,
    server: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Upstream {
    /// Starts answering: discovery, `/jwks` (serving `jwks`) and `/token`.
    pub async fn start(jwks: Value) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("http://{addr}");
        let up = Upstream {
            addr,
            base: base.clone(),
            shared: Arc::new(Shared {
                mode: Mutex::new(Mode::Ok),
                jwks: Mutex::new(jwks),
                issuer: base,
                jwks_hits: AtomicUsize::new(0),
                discovery_hits: AtomicUsize::new(0),
                token_hits: AtomicUsize::new(0),
                held: AtomicUsize::new(0),
                streamed: Arc::new(AtomicU64::new(0)),
                release: watch::channel(0).0,
                expires_in: AtomicU64::new(600),
                refresh_token: Mutex::new("rt-0".into()),
                refreshes: Mutex::default(),
            }),
            server: Arc::default(),
        };
        up.serve(listener);
        up
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .with_state(self.shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.base)
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.base)
    }

    /// Switches the behaviour; `Down` closes the listener, leaving it binds the same port again.
    pub async fn set(&self, mode: Mode) {
        let was = std::mem::replace(&mut *self.shared.mode.lock().unwrap(), mode);
        if mode == Mode::Down && was != Mode::Down {
            let task = self.server.lock().unwrap().take();
            if let Some(t) = task {
                t.abort();
                let _ = t.await;
            }
        } else if mode != Mode::Down && was == Mode::Down {
            let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
            self.serve(listener);
        }
    }

    /// Publishes another key set.
    pub fn set_jwks(&self, jwks: Value) {
        *self.shared.jwks.lock().unwrap() = jwks;
    }

    /// `expires_in` of issued tokens.
    pub fn set_expires_in(&self, secs: u64) {
        self.shared.expires_in.store(secs, Ordering::SeqCst);
    }

    /// Refresh tokens presented so far, in order, with whether each was accepted.
    pub fn refreshes(&self) -> Vec<(String, bool)> {
        self.shared.refreshes.lock().unwrap().clone()
    }

    /// Lets every held request (and later ones, until the mode changes) answer.
    pub async fn release(&self) {
        self.set(Mode::Ok).await;
        self.shared.release.send_modify(|n| *n += 1);
    }

    pub fn jwks_hits(&self) -> usize {
        self.shared.jwks_hits.load(Ordering::SeqCst)
    }

    pub fn discovery_hits(&self) -> usize {
        self.shared.discovery_hits.load(Ordering::SeqCst)
    }

    pub fn token_hits(&self) -> usize {
        self.shared.token_hits.load(Ordering::SeqCst)
    }

    /// Requests being held now.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Body bytes `Endless` answers produced (what a reader could have consumed at most).
    pub fn streamed(&self) -> u64 {
        self.shared.streamed.load(Ordering::SeqCst)
    }
}

/// Polls `cond` every 10 ms, up to 20 s; panics naming `what` when it never holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn close(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn json_response(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// Applies the mode; `None` means "answer normally".
async fn fault(s: &Shared) -> Option<Response> {
    let mode = *s.mode.lock().unwrap();
    match mode {
        Mode::Ok | Mode::Down | Mode::TooManyKeys => None,
        Mode::Hold => {
            let mut rx = s.release.subscribe();
            let seen = *rx.borrow_and_update();
            s.held.fetch_add(1, Ordering::SeqCst);
            let _ = rx.wait_for(|n| *n != seen).await;
            s.held.fetch_sub(1, Ordering::SeqCst);
            None
        }
        Mode::Error => Some((StatusCode::INTERNAL_SERVER_ERROR, "down").into_response()),
        Mode::Garbage => Some(
            (
                [(header::CONTENT_TYPE, "application/json")],
                "<html>\u{0}\u{1}not json{{{",
            )
                .into_response(),
        ),
        Mode::Endless => {
            let streamed = s.streamed.clone();
            let chunk = axum::body::Bytes::from(vec![b' '; 64 * 1024]);
            let stream = futures::stream::repeat_with(move || {
                streamed.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                Ok::<_, std::io::Error>(chunk.clone())
            });
            Some(
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::from_stream(stream),
                )
                    .into_response(),
            )
        }
        Mode::Oversized => {
            let mut r = (
                [(header::CONTENT_TYPE, "application/json")],
                vec![b' '; 2 * 1024 * 1024],
            )
                .into_response();
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(2 * 1024 * 1024));
            Some(r)
        }
    }
}

async fn discovery(State(s): State<Arc<Shared>>) -> Response {
    s.discovery_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = fault(&s).await {
        return close(r);
    }
    close(json_response(
        &json!({"issuer": s.issuer, "jwks_uri": format!("{}/jwks", s.issuer)}),
    ))
}

async fn jwks(State(s): State<Arc<Shared>>) -> Response {
    s.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = fault(&s).await {
        return close(r);
    }
    let mode = *s.mode.lock().unwrap();
    let mut doc = s.jwks.lock().unwrap().clone();
    if mode == Mode::TooManyKeys {
        // The real keys plus padding to 101: well-formed, just too many.
        let keys = doc["keys"].as_array_mut().unwrap();
        let filler = keys[0].clone();
        while keys.len() <= 100 {
            let mut k = filler.clone();
            k["kid"] = format!("filler-{}", keys.len()).into();
            keys.push(k);
        }
    }
    close(json_response(&doc))
}

async fn token(State(s): State<Arc<Shared>>, body: String) -> Response {
    let n = s.token_hits.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(r) = fault(&s).await {
        return close(r);
    }
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str) == Some("refresh_token") {
        // Rotation as strict providers do it: the presented token must be the current one, and
        // a successful refresh replaces it.
        let presented = form.get("refresh_token").cloned().unwrap_or_default();
        let mut current = s.refresh_token.lock().unwrap();
        let ok = presented == *current;
        s.refreshes.lock().unwrap().push((presented, ok));
        if !ok {
            return close(
                (
                    StatusCode::BAD_REQUEST,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"error":"invalid_grant"}"#,
                )
                    .into_response(),
            );
        }
        *current = format!("rt-{n}");
        return close(json_response(&json!({
            "access_token": format!("tok-{n}"),
            "token_type": "Bearer",
            "expires_in": s.expires_in.load(Ordering::SeqCst),
            "refresh_token": *current,
        })));
    }
    // The subject token's last characters make exchanged tokens tell their callers apart.
    let subject = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("subject_token="))
        .map(|t| t.chars().rev().take(8).collect::<String>())
        .unwrap_or_default();
    close(json_response(&json!({
        "access_token": format!("tok-{n}-{subject}"),
        "token_type": "Bearer",
        "expires_in": s.expires_in.load(Ordering::SeqCst),
    })))
}

/// Reads the binary's log on a thread (so its pipe never fills) and hands over the listener lines.
pub fn listeners(child: &mut std::process::Child) -> (String, String) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let debug = std::env::var_os("FAULTS_LOG");
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(path) = &debug {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                let _ = writeln!(f, "{line}");
            }
            if line.contains("listening") {
                let _ = tx.send(line);
            }
        }
    });
    let addr = |line: &str| {
        let rest = &line[line.find("addr=").expect("addr=") + 5..];
        rest.split_whitespace()
            .next()
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    let mut grpc = None;
    let mut http = None;
    while grpc.is_none() || http.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the listener log lines");
        if line.contains("grpc") {
            grpc = Some(addr(&line));
        } else {
            http = Some(addr(&line));
        }
    }
    (grpc.unwrap(), http.unwrap())
}

/// A child process killed when dropped, so a failing test leaves no server behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
