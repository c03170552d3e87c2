//! Backend credentials against a local fake token endpoint: the cache under faults (down, slow,
//! 500, invalid JSON, no access_token, expires_in 0), single-flight, refresh ahead, serve until
//! expiry then 503, reloads, injection over gRPC, `check`, and store start-up errors.
//!
//! Time is a `ManualClock`: expiry and refresh-ahead are reached by moving it, not by sleeping.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::{TestServer, get, seen};
use portcullis::config;
use portcullis::credentials::{Clock, ManualClock, Registry};
use portcullis::policy::{self, Decision, Outcome, PolicySet, Runtime};

/// (authorization header, form body) of one token request.
type Form = (Option<String>, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Down,
    Slow,
    Status500,
    InvalidJson,
    NoAccessToken,
    ExpiresZero,
}

/// A token endpoint whose behaviour the test switches; every answer closes its connection, so
/// "down" really refuses the next request.
#[derive(Clone)]
struct Fake {
    addr: SocketAddr,
    /// Requests that reached the endpoint.
    hits: Arc<AtomicUsize>,
    mode: Arc<Mutex<Mode>>,
    expires_in: Arc<AtomicU64>,
    forms: Arc<Mutex<Vec<Form>>>,
    server: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Fake {
    async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Ok)),
            expires_in: Arc::new(AtomicU64::new(600)),
            forms: Arc::default(),
            server: Arc::default(),
        };
        fake.serve(listener);
        fake
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let me = self.clone();
        let app = Router::new().route(
            "/token",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let me = me.clone();
                async move { me.answer(headers, body).await }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }

    async fn answer(&self, headers: HeaderMap, body: String) -> axum::response::Response {
        let n = self.hits.fetch_add(1, Ordering::SeqCst) + 1;
        let auth = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        self.forms.lock().unwrap().push((auth, body));
        let mode = *self.mode.lock().unwrap();
        let close = [
            ("connection", "close"),
            ("content-type", "application/json"),
        ];
        let ok = serde_json::json!({"access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": self.expires_in.load(Ordering::SeqCst)});
        match mode {
            Mode::Ok | Mode::Down => (close, ok.to_string()).into_response(),
            Mode::Slow => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                (close, ok.to_string()).into_response()
            }
            Mode::Status500 => (
                StatusCode::INTERNAL_SERVER_ERROR,
                close,
                r#"{"error":"server_error"}"#,
            )
                .into_response(),
            Mode::InvalidJson => (close, "<html>oops</html>").into_response(),
            Mode::NoAccessToken => {
                (close, r#"{"token_type":"Bearer","expires_in":600}"#).into_response()
            }
            Mode::ExpiresZero => (
                close,
                format!(r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":0}}"#),
            )
                .into_response(),
        }
    }

    async fn set(&self, mode: Mode) {
        let was = std::mem::replace(&mut *self.mode.lock().unwrap(), mode);
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

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }
}

fn yaml(fake: &Fake, extra: &str) -> String {
    format!(
        r#"
credentials:
  - name: backend
    grant: client_credentials
    token_url: {url}
    client_id: portcullis
    client_secret: "s3cret/+:x"
    scope: api://backend/.default
    timeout: 300ms
{extra}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    on_allow: {{ backend_credential: {{ name: backend }} }}
"#,
        url = fake.url()
    )
}

fn compile(text: &str, runtime: &Runtime) -> PolicySet {
    let src = config::parse(text, std::path::Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    policy::compile(&src, runtime)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

fn runtime(clock: &Arc<ManualClock>) -> Runtime {
    Runtime {
        credentials: Registry::with_clock(clock.clone()),
        ..Runtime::default()
    }
}

async fn decide(policy: &PolicySet, clock: &ManualClock) -> Decision {
    common::decide_bearer(policy, "caller-token", clock.now()).await
}

/// The injected `authorization`, or the deny reason.
fn injected(d: &Decision) -> Result<String, String> {
    match &d.outcome {
        Outcome::Allow => {
            let h = d
                .upstream_headers
                .iter()
                .find(|h| h.name == "authorization")
                .expect("an authorization header");
            assert!(h.sensitive, "credentials are marked sensitive");
            Ok(h.value.clone())
        }
        Outcome::Deny(den) => {
            assert!(
                d.upstream_headers.is_empty(),
                "a deny sends nothing upstream"
            );
            Err(format!("{} {}", den.status, den.reason))
        }
    }
}

fn counter(runtime: &Runtime, result: &str) -> u64 {
    runtime
        .credentials
        .token_cache_requests()
        .into_iter()
        .find(|(c, r, _)| c == "backend" && *r == result)
        .map_or(0, |(_, _, n)| n)
}

/// Waits (bounded) for something a background task does.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_keeps_the_cache_safe() {
    for mode in [
        Mode::Down,
        Mode::Slow,
        Mode::Status500,
        Mode::InvalidJson,
        Mode::NoAccessToken,
        Mode::ExpiresZero,
    ] {
        let fake = Fake::start().await;
        let clock = ManualClock::new(SystemTime::now());
        let rt = runtime(&clock);
        let policy = compile(&yaml(&fake, ""), &rt);

        // Cold, with the fault: 503, and a second request within the backoff costs nothing.
        fake.set(mode).await;
        assert_eq!(
            injected(&decide(&policy, &clock).await),
            Err("503 BackendCredentialUnavailable".into()),
            "{mode:?}"
        );
        let after_first = fake.hits();
        assert_eq!(
            injected(&decide(&policy, &clock).await),
            Err("503 BackendCredentialUnavailable".into()),
            "{mode:?}"
        );
        assert_eq!(
            fake.hits(),
            after_first,
            "{mode:?}: backoff, no new request"
        );

        // Healthy again: 1,000 concurrent checks, exactly one token request.
        fake.set(Mode::Ok).await;
        clock.advance(Duration::from_secs(120));
        let before = fake.hits();
        let decisions = futures::future::join_all((0..1000).map(|_| decide(&policy, &clock))).await;
        assert_eq!(fake.hits(), before + 1, "{mode:?}: single flight");
        let token = injected(&decisions[0]).unwrap();
        assert!(
            decisions.iter().all(|d| injected(d).as_ref() == Ok(&token)),
            "{mode:?}"
        );
        let hits_before = counter(&rt, "hit");
        for _ in 0..100 {
            assert_eq!(
                injected(&decide(&policy, &clock).await).as_ref(),
                Ok(&token)
            );
        }
        assert_eq!(fake.hits(), before + 1, "{mode:?}: served from the cache");
        assert!(counter(&rt, "hit") >= hits_before + 100);

        // Into the refresh window (3m before expiry) with the fault: the background refresh fails,
        // the still-valid token keeps being served.
        fake.set(mode).await;
        let errors = counter(&rt, "error");
        clock.advance(Duration::from_secs(450));
        assert_eq!(
            injected(&decide(&policy, &clock).await).as_ref(),
            Ok(&token),
            "{mode:?}: serve until expiry"
        );
        eventually("a failed background refresh", || {
            counter(&rt, "refresh") >= 1 && counter(&rt, "error") > errors
        })
        .await;
        assert_eq!(
            injected(&decide(&policy, &clock).await).as_ref(),
            Ok(&token),
            "{mode:?}"
        );

        // Past expiry: never the expired token.
        clock.advance(Duration::from_secs(151));
        assert_eq!(
            injected(&decide(&policy, &clock).await),
            Err("503 BackendCredentialUnavailable".into()),
            "{mode:?}: no expired token"
        );

        // Recovery after the backoff.
        fake.set(Mode::Ok).await;
        clock.advance(Duration::from_secs(120));
        let fresh =
            injected(&decide(&policy, &clock).await).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_ne!(fresh, token, "{mode:?}");
        assert!(fresh.starts_with("Bearer tok-"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_replaces_the_token_before_it_expires() {
    let fake = Fake::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let rt = runtime(&clock);
    let policy = compile(&yaml(&fake, ""), &rt);
    // Fetched at start, so the first request does not pay.
    rt.publish(&policy);
    rt.credentials
        .start(policy.backend_credentials())
        .await
        .unwrap();
    assert_eq!(fake.hits(), 1);
    assert_eq!(
        injected(&decide(&policy, &clock).await),
        Ok("Bearer tok-1".into())
    );
    assert_eq!(fake.hits(), 1);
    assert_eq!(counter(&rt, "miss"), 1, "only the start-up fetch missed");

    // No traffic: the shared token is refreshed in the background 3 minutes before expiry.
    clock.advance(Duration::from_secs(419));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.hits(), 1, "still fresh");
    clock.advance(Duration::from_secs(2));
    eventually("a proactive refresh", || fake.hits() == 2).await;
    eventually("the new token", || counter(&rt, "refresh") == 1).await;
    assert_eq!(
        injected(&decide(&policy, &clock).await),
        Ok("Bearer tok-2".into())
    );
    // The form: client credentials with HTTP Basic (form-encoded id and secret) and the scope.
    let (auth, body) = fake.forms.lock().unwrap()[0].clone();
    use base64::Engine;
    let expected = base64::engine::general_purpose::STANDARD.encode("portcullis:s3cret%2F%2B%3Ax");
    assert_eq!(auth.as_deref(), Some(format!("Basic {expected}").as_str()));
    assert_eq!(
        body,
        "grant_type=client_credentials&scope=api%3A%2F%2Fbackend%2F.default"
    );
}

#[tokio::test]
async fn a_token_shorter_than_refresh_before_expiry_is_used_to_its_expiry() {
    let fake = Fake::start().await;
    fake.expires_in.store(60, Ordering::SeqCst);
    let clock = ManualClock::new(SystemTime::now());
    let rt = runtime(&clock);
    let policy = compile(&yaml(&fake, ""), &rt);
    assert_eq!(
        injected(&decide(&policy, &clock).await),
        Ok("Bearer tok-1".into())
    );
    clock.advance(Duration::from_secs(59));
    assert_eq!(
        injected(&decide(&policy, &clock).await),
        Ok("Bearer tok-1".into())
    );
    assert_eq!(fake.hits(), 1);
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        injected(&decide(&policy, &clock).await),
        Ok("Bearer tok-2".into()),
        "expired: fetched again"
    );
}

#[tokio::test]
async fn a_reload_with_unchanged_settings_keeps_the_token() {
    let fake = Fake::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let rt = runtime(&clock);
    let first = compile(&yaml(&fake, ""), &rt);
    assert_eq!(
        injected(&decide(&first, &clock).await),
        Ok("Bearer tok-1".into())
    );
    let second = compile(&format!("{}\nunmatched: allow\n", yaml(&fake, "")), &rt);
    drop(first);
    assert_eq!(
        injected(&decide(&second, &clock).await),
        Ok("Bearer tok-1".into())
    );
    assert_eq!(fake.hits(), 1, "no fetch for an unchanged credential");
    let changed = compile(
        &yaml(&fake, "").replace("api://backend/.default", "api://other/.default"),
        &rt,
    );
    assert_eq!(
        injected(&decide(&changed, &clock).await),
        Ok("Bearer tok-2".into()),
        "new settings, new token"
    );
}

#[tokio::test]
async fn ten_thousand_checks_cost_a_handful_of_token_requests() {
    let fake = Fake::start().await;
    let clock = ManualClock::new(SystemTime::now());
    let rt = runtime(&clock);
    let policy = compile(&yaml(&fake, ""), &rt);
    rt.publish(&policy);
    rt.credentials
        .start(policy.backend_credentials())
        .await
        .unwrap();
    // 10,000 checks spread over 1,000 s (tokens live 600 s, refreshed 180 s early).
    for _ in 0..100 {
        let ds = futures::future::join_all((0..100).map(|_| decide(&policy, &clock))).await;
        assert!(ds.iter().all(|d| d.is_allow()));
        clock.advance(Duration::from_secs(10));
        tokio::task::yield_now().await;
    }
    let n = fake.hits();
    println!("10000 checks over 1000 s cost {n} token endpoint requests");
    assert!((2..=4).contains(&n), "{n} token requests");
}

#[tokio::test]
async fn injected_over_grpc_replacing_the_callers_authorization() {
    let fake = Fake::start().await;
    let text = format!(
        r#"{}
  - name: legacy
    match: {{ path_prefix: /legacy }}
    on_allow: {{ backend_credential: {{ name: legacy-basic }} }}
  - name: custom
    match: {{ path_prefix: /custom }}
    on_allow:
      set_headers: {{ x-backend-token: "from-caller" }}
      backend_credential: {{ name: fixed, header: X-Backend-Token, format: "Token {{token}}" }}
"#,
        yaml(
            &fake,
            r#"  - { name: legacy-basic, grant: basic, username: svc, password: "p@ss:word" }
  - { name: fixed, grant: static, token: "static-token-1" }"#
        )
    );
    let srv = TestServer::start(&text).await;
    let mut client = srv.client().await;
    let r = seen(
        &client
            .check(
                get("/orders/1")
                    .header("authorization", "Bearer caller")
                    .request(),
            )
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(r.code, 0);
    assert_eq!(
        r.headers["authorization"],
        ("Bearer tok-1".to_string(), Some(false)),
        "replaces the caller's header"
    );
    let r = seen(
        &client
            .check(get("/legacy/x").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(r.headers["authorization"].0, "Basic c3ZjOnBAc3M6d29yZA==");
    let r = seen(
        &client
            .check(get("/custom/x").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(r.headers["x-backend-token"].0, "Token static-token-1");
    assert_eq!(fake.hits(), 1, "fetched once, at start");
    // `portcullis.token_cache.requests` on /metrics, by credential name and result; never a token.
    let http = srv.running.addrs.http.expect("an HTTP listener");
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("portcullis_token_cache_requests")
                && l.contains("credential=\"backend\"")
                && l.contains("result=\"hit\"")
        })
        .unwrap_or_else(|| panic!("no token cache metric in:\n{metrics}"));
    assert!(!line.ends_with(" 0"), "{line}");
    assert!(!metrics.contains("tok-1"));
    // No `admin` section: no admin API.
    let admin = reqwest::get(format!("http://{http}/admin/credentials"))
        .await
        .unwrap();
    assert_eq!(admin.status(), 404);

    // The endpoint failing from start: 503 as a CheckResponse with gRPC code 14.
    let down = Fake::start().await;
    down.set(Mode::Status500).await;
    let srv2 = TestServer::start(&yaml(&down, "")).await;
    let mut c2 = srv2.client().await;
    let r = seen(
        &c2.check(get("/orders/1").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!((r.code, r.status), (14, Some(503)));
    let body = r.body.unwrap();
    assert_eq!(body["reason"], "BackendCredentialUnavailable");
    assert!(!body.to_string().contains("s3cret"));
    srv.running.shutdown().await.unwrap();
    srv2.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn check_shows_a_credential_would_be_injected_without_fetching_or_showing_it() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.yaml");
    std::fs::write(&cfg, yaml(&fake, "")).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "check",
            "--url",
            "http://api.example.com/orders/1",
            "-H",
            "authorization: Bearer caller",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("authorization: <redacted credential>"),
        "{stdout}"
    );
    assert!(stdout.contains("credential `backend`"), "{stdout}");
    assert_eq!(fake.hits(), 0, "check fetches nothing");
}

#[test]
fn configuration_errors_name_their_path() {
    let text = r#"
store: { path: s.db, key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" }
credentials:
  - { name: a, grant: client_credentials, client_id: x }
  - { name: b, grant: magic }
  - { name: c, grant: static, token: t }
  - { name: e, grant: static, token: t, scope: nope }
  - { name: "bad name", grant: basic, username: "u:x", password: p }
  - { name: d, grant: client_credentials, token_url: "ftp://x/token", client_id: x, client_secret: y, timeout: soon }
apis:
  - name: x
    on_allow: { backend_credential: { name: missing } }
  - name: y
    on_allow: { backend_credential: { name: c, format: "Bearer" } }
  - name: z
    on_allow: { backend_credential: { name: c, connection: alice } }
"#;
    let src = config::parse(text, std::path::Path::new(".")).unwrap();
    let errs = policy::compile(&src, &Runtime::offline())
        .unwrap_err()
        .to_string();
    for needle in [
        "store.key: the key must not be written in the file",
        "credentials[0].token_url: is required for grant `client_credentials`",
        "credentials[0].client_secret: is required",
        "credentials[1].grant: `magic`",
        "credentials[3].scope: is not used by grant `static`",
        "credentials[4].name:",
        "credentials[4].username: must not contain `:`",
        "credentials[5].token_url: `ftp://x/token` must be an http:// or https:// URL",
        "credentials[5].timeout: `soon` is not a duration",
        "apis[0].on_allow.backend_credential.name: no credential is named `missing`",
        "apis[1].on_allow.backend_credential.format: must contain {token} exactly once",
        "apis[2].on_allow.backend_credential.connection: only `refresh_token` credentials have connections",
    ] {
        assert!(errs.contains(needle), "missing `{needle}` in:\n{errs}");
    }
}

#[test]
fn store_keys_and_refresh_tokens_need_a_proper_store() {
    let env = |name: &str| match name {
        "SHORT_KEY" => Some("c2hvcnQ=".to_string()),
        _ => None,
    };
    let text = r#"
store: { path: s.db, key: "${env:SHORT_KEY}" }
credentials:
  - { name: crm, grant: refresh_token, token_url: "http://127.0.0.1:1/token", client_id: x, client_secret: y, authorize_url: "http://127.0.0.1:1/auth" }
"#;
    let src = config::parse_with_env(text, std::path::Path::new("."), &env).unwrap();
    let errs = policy::compile(&src, &Runtime::offline())
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("store.key: must be 32 bytes (256 bits) in base64, this is 5 bytes"),
        "{errs}"
    );
    assert!(!errs.contains("c2hvcnQ"), "the key is never printed");
    assert!(
        errs.contains("credentials[0]: consent needs both `authorize_url` and `redirect_uri`"),
        "{errs}"
    );
    let no_store = "credentials:\n  - { name: crm, grant: refresh_token, token_url: \"http://127.0.0.1:1/token\", client_id: x, client_secret: y }\n";
    let src = config::parse(no_store, std::path::Path::new(".")).unwrap();
    let errs = policy::compile(&src, &Runtime::offline())
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("credentials[0].grant: `refresh_token` needs a `store`"),
        "{errs}"
    );
}

fn store_config(dir: &std::path::Path, key: &str) -> String {
    std::fs::write(dir.join("store.key"), key).unwrap();
    r#"
store: { path: data/portcullis.db, key: "${file:store.key}" }
credentials:
  - { name: crm, grant: refresh_token, token_url: "http://127.0.0.1:1/token", client_id: x, client_secret: y }
apis:
  - name: crm
    on_allow: { backend_credential: { name: crm } }
"#
    .to_string()
}

fn base64_key(k: &str) -> [u8; 32] {
    portcullis::credentials::store::decode_key(k).unwrap()
}

const KEY_A: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const KEY_B: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

#[tokio::test]
async fn a_wrong_store_key_or_a_corrupt_store_stops_start_up_and_leaves_the_file() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.yaml");
    let db = dir.path().join("data/portcullis.db");
    std::fs::write(
        &cfg,
        format!(
            "listen: {{grpc: 127.0.0.1:0}}\n{}",
            store_config(dir.path(), KEY_A)
        ),
    )
    .unwrap();
    // The store as a previous run left it (created with key A, holding a connection).
    {
        let store = portcullis::credentials::Store::open(&db, &base64_key(KEY_A)).unwrap();
        let record = portcullis::credentials::ConnectionRecord {
            state: portcullis::credentials::ConnectionState::Connected,
            refresh_token: Some("rt".into()),
            refresh_token_expires_at: None,
            error: None,
            seeded_from: None,
            issuer: None,
            subject: None,
            created_at: 1,
            updated_at: 1,
        };
        store.put("crm", "default", &record).unwrap();
    }
    let digest = sha2::Sha256::digest(std::fs::read(&db).unwrap());

    std::fs::write(
        &cfg,
        format!(
            "listen: {{grpc: 127.0.0.1:0}}\n{}",
            store_config(dir.path(), KEY_B)
        ),
    )
    .unwrap();
    let err = portcullis::server::start(&cfg)
        .await
        .err()
        .expect("a wrong key must not start")
        .to_string();
    assert!(err.contains("wrong key"), "{err}");
    assert!(err.contains("portcullis.db"), "{err}");
    assert!(!err.contains(KEY_A) && !err.contains(KEY_B));
    assert_eq!(
        sha2::Sha256::digest(std::fs::read(&db).unwrap()),
        digest,
        "byte for byte untouched"
    );

    // The binary: exit 2 with the message.
    assert!(common::serve_refuses(&cfg).contains("wrong key"));

    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().skip(512).step_by(7) {
        *b ^= 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "listen: {{grpc: 127.0.0.1:0}}\n{}",
            store_config(dir.path(), KEY_A)
        ),
    )
    .unwrap();
    let err = portcullis::server::start(&cfg)
        .await
        .err()
        .expect("a corrupt store must not start")
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), bytes, "left untouched");
}
