//! A real `redis-server` on a free loopback port with its own directory, a token endpoint that
//! rotates refresh tokens and detects their reuse, and "replicas" (one `Runtime` each, as separate
//! processes would have) sharing `store.redis`: the harness of `store_redis.rs` and the adversarial
//! `shared_store.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use portcullis::config;
use portcullis::credentials::{Clock, ManualClock, Registry};
use portcullis::policy::{self, PolicySet, Runtime};

pub const KEY_A: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
pub const KEY_B: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
pub const CLIENT_SECRET: &str = "cs-9f8e7d6c5b4a";

/// A `redis-server` of this test's own, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    aof: bool,
    /// Extra arguments (TLS); with `--tls-port` the plain port is off.
    extra: Vec<String>,
}

impl RedisServer {
    /// `None` (after saying why) when redis-server is not installed, outside CI.
    pub fn start(aof: bool) -> Option<RedisServer> {
        RedisServer::start_with(aof, |_| Vec::new())
    }

    /// [`RedisServer::start`] with extra arguments made from the chosen port (e.g. `--tls-port`).
    pub fn start_with(aof: bool, extra: impl FnOnce(u16) -> Vec<String>) -> Option<RedisServer> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        if !found {
            assert!(
                std::env::var("CI").is_err(),
                "redis-server is not installed (apt-get install redis-server); CI must have it"
            );
            eprintln!("SKIP: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            aof,
            extra: extra(port),
        };
        s.restart();
        Some(s)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let tls = self.extra.iter().any(|a| a == "--tls-port");
        let mut cmd = Command::new("redis-server");
        let plain = if tls {
            "0".to_string()
        } else {
            self.port.to_string()
        };
        cmd.args(["--port", &plain, "--bind", "127.0.0.1"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--daemonize", "no"]);
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..200 {
            let up = if tls {
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                self.ping()
            };
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf).is_ok_and(|n| &buf[..n] == b"+PONG\r\n")
    }

    /// `kill -9`: with AOF and `appendfsync always`, every acknowledged write is on disk.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    /// Every key under the prefix with its value(s), raw bytes.
    pub async fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let mut c = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("portcullis:*")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut out = Vec::new();
        for k in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap();
            let bytes: Vec<u8> = match kind.as_str() {
                "string" => redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap(),
                "hash" => {
                    let m: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                        .arg(&k)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    m.into_iter()
                        .flat_map(|(f, v)| [f.into_bytes(), v].concat())
                        .collect()
                }
                "set" => {
                    let m: Vec<String> = redis::cmd("SMEMBERS")
                        .arg(&k)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    m.join(",").into_bytes()
                }
                "zset" => {
                    let m: Vec<String> = redis::cmd("ZRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    m.join(",").into_bytes()
                }
                other => panic!("unexpected type {other} of {k}"),
            };
            out.push((k, bytes));
        }
        out
    }

    pub async fn cmd(&self, args: &[&str]) -> redis::Value {
        let mut c = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the token endpoint saw.
#[derive(Default)]
pub struct IdpState {
    pub n: usize,
    /// The one refresh token that works now.
    pub current: Option<String>,
    /// Refresh tokens already spent (a replay revokes the grant).
    pub spent: Vec<String>,
    pub refreshes: usize,
    pub invalid_grants: usize,
    pub client_credentials: usize,
    pub codes: usize,
    /// Held before answering a refresh (a slow provider).
    pub delay: Duration,
}

/// A token endpoint that rotates refresh tokens and detects their reuse.
#[derive(Clone)]
pub struct Idp {
    pub addr: SocketAddr,
    state: Arc<Mutex<IdpState>>,
}

impl Idp {
    pub async fn start(initial_refresh_token: &str) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idp = Idp {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(IdpState {
                current: Some(initial_refresh_token.to_string()),
                ..IdpState::default()
            })),
        };
        let me = idp.clone();
        let app = Router::new().route(
            "/token",
            axum::routing::post(move |body: String| {
                let me = me.clone();
                async move { me.answer(body).await }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        idp
    }

    async fn answer(&self, body: String) -> axum::response::Response {
        let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        let delay = self.state.lock().unwrap().delay;
        let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
        if grant == "refresh_token" && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state.lock().unwrap();
        s.n += 1;
        let n = s.n;
        let ok = |rt: Option<String>| {
            let mut v = serde_json::json!({"access_token": format!("tok-{n}"), "token_type": "Bearer", "expires_in": 600});
            if let Some(rt) = rt {
                v["refresh_token"] = rt.into();
            }
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                v.to_string(),
            )
                .into_response()
        };
        let invalid_grant = || {
            (
                StatusCode::BAD_REQUEST,
                [("content-type", "application/json")],
                r#"{"error":"invalid_grant"}"#,
            )
                .into_response()
        };
        match grant {
            "refresh_token" => {
                s.refreshes += 1;
                let given = form.get("refresh_token").cloned().unwrap_or_default();
                if s.current.as_deref() == Some(given.as_str()) {
                    s.spent.push(given);
                    let next = format!("rt-{n}");
                    s.current = Some(next.clone());
                    ok(Some(next))
                } else {
                    s.invalid_grants += 1;
                    if s.spent.contains(&given) {
                        // Reuse detection: the whole grant is revoked.
                        s.current = None;
                    }
                    invalid_grant()
                }
            }
            "authorization_code" => {
                s.codes += 1;
                let next = format!("rt-consent-{n}");
                s.current = Some(next.clone());
                ok(Some(next))
            }
            "client_credentials" => {
                s.client_credentials += 1;
                ok(None)
            }
            _ => invalid_grant(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut IdpState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

pub fn yaml(redis: &RedisServer, idp: &Idp) -> String {
    format!(
        r#"
store:
  redis: {{ url: "{redis}", timeout: 300ms }}
  key: "${{env:STORE_KEY}}"
credentials:
  - name: crm
    grant: refresh_token
    token_url: {url}
    authorize_url: http://127.0.0.1:9/authorize
    redirect_uri: https://authz.example.com/admin/callback
    client_id: portcullis
    client_secret: "${{env:CLIENT_SECRET}}"
    refresh_token: "${{env:SEED_RT}}"
    timeout: 2s
  - name: machine
    grant: client_credentials
    token_url: {url}
    client_id: portcullis
    client_secret: "${{env:CLIENT_SECRET}}"
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    on_allow: {{ backend_credential: {{ name: crm }} }}
  - name: machine
    match: {{ path_prefix: /machine }}
    on_allow: {{ backend_credential: {{ name: machine }} }}
"#,
        redis = redis.url(),
        url = idp.url()
    )
}

pub fn env_with(key: &'static str) -> impl Fn(&str) -> Option<String> {
    move |name: &str| match name {
        "STORE_KEY" => Some(key.to_string()),
        "CLIENT_SECRET" => Some(CLIENT_SECRET.to_string()),
        "SEED_RT" => Some("rt-seed".to_string()),
        _ => None,
    }
}

/// One replica: its own registry and policy, as a separate process would have.
pub struct Replica {
    pub runtime: Runtime,
    pub policy: PolicySet,
}

pub async fn replica(text: &str, clock: &Arc<ManualClock>, key: &'static str) -> Replica {
    try_replica(text, clock, key)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A replica, or why it did not start (the store's error).
pub async fn try_replica(
    text: &str,
    clock: &Arc<ManualClock>,
    key: &'static str,
) -> Result<Replica, String> {
    let src = config::parse_with_env(text, std::path::Path::new("."), &env_with(key))
        .unwrap_or_else(|e| panic!("{e}"));
    let runtime = Runtime {
        credentials: Registry::with_clock(clock.clone()),
        ..Runtime::default()
    };
    let policy = policy::compile(&src, &runtime)
        .unwrap_or_else(|e| panic!("{e}"))
        .0;
    runtime.publish(&policy);
    runtime.start(&policy).await.map_err(|e| e.to_string())?;
    Ok(Replica { runtime, policy })
}

impl Replica {
    /// The injected credential, or "status reason".
    pub async fn check(&self, path: &str, clock: &ManualClock) -> Result<String, String> {
        let headers: portcullis::policy::Headers = Default::default();
        let input = portcullis::policy::CheckInput {
            method: "GET",
            host: "api.example.com",
            path,
            scheme: "",
            headers: &headers,
            peer: Some("10.0.0.1".parse().unwrap()),
            peer_certificate: "",
            context_extensions: None,
        };
        let d = self
            .policy
            .decide(
                &input,
                portcullis::policy::EvalOptions {
                    now: clock.now(),
                    explain: false,
                },
            )
            .await;
        match &d.outcome {
            portcullis::policy::Outcome::Allow => Ok(d
                .upstream_headers
                .iter()
                .find(|h| h.name == "authorization")
                .map(|h| h.value.clone())
                .expect("an allow carries the credential")),
            portcullis::policy::Outcome::Deny(den) => Err(format!("{} {}", den.status, den.reason)),
        }
    }

    pub fn lease_outcomes(&self) -> HashMap<&'static str, u64> {
        self.runtime
            .credentials
            .store_leases()
            .into_iter()
            .collect()
    }
}

pub async fn fleet(n: usize, text: &str, clock: &Arc<ManualClock>) -> Vec<Replica> {
    // Started together, as a rollout does: the configured refresh token is seeded once.
    let starts = (0..n).map(|_| replica(text, clock, KEY_A));
    futures::future::join_all(starts).await
}

pub fn clock() -> Arc<ManualClock> {
    ManualClock::new(SystemTime::now())
}

/// What most shared-store tests start with: a Redis, the token endpoint (whose current refresh
/// token is the one the config seeds), a clock, and `n` replicas of [`yaml`]; `None` (after saying
/// why) without redis-server, outside CI. Keep the `RedisServer`: dropping it stops Redis.
pub async fn setup(
    n: usize,
    aof: bool,
) -> Option<(RedisServer, Idp, Arc<ManualClock>, Vec<Replica>)> {
    let redis = RedisServer::start(aof)?;
    let idp = Idp::start("rt-seed").await;
    let clock = clock();
    let replicas = fleet(n, &yaml(&redis, &idp), &clock).await;
    Some((redis, idp, clock, replicas))
}
