//! Fault matrix of the token endpoint (backend credentials): flapping while a token is cached, and
//! the cap on concurrent token requests (`limits.max_concurrent_fetches`) that per-caller grants
//! (token exchange) would otherwise exceed. Down at start, down while cached, slow, garbage and
//! recovery are in tests/credentials.rs (`every_fault_keeps_the_cache_safe`); not repeated here.

mod common;
mod faults_common;
#[path = "jwt_common/mod.rs"]
mod keys;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::decide_bearer as decide;
use common::injected;
use faults_common::{Mode, Upstream, eventually};
use portcullis::config;
use portcullis::credentials::{Clock, ManualClock, Registry};
use portcullis::policy::{self, PolicySet, Runtime};

/// A policy put into service on `runtime` (compiled, then its credentials published).
fn compile(text: &str, runtime: &Runtime) -> PolicySet {
    let src = config::parse(text, std::path::Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    let policy = policy::compile(&src, runtime)
        .unwrap_or_else(|e| panic!("{e}"))
        .0;
    runtime.publish(&policy);
    policy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_token_endpoint_costs_backoff_bounded_requests_and_the_token_is_served() {
    let up = Upstream::start(serde_json::json!({"keys": []})).await;
    let clock = ManualClock::new(SystemTime::now());
    let rt = Runtime {
        credentials: Registry::with_clock(clock.clone()),
        ..Runtime::default()
    };
    let policy = compile(
        &format!(
            r#"
credentials:
  - {{ name: backend, grant: client_credentials, token_url: "{}", client_id: c, client_secret: s, timeout: 2s }}
apis:
  - name: orders
    on_allow: {{ backend_credential: {{ name: backend }} }}
"#,
            up.token_url()
        ),
        &rt,
    );
    let token = injected(&decide(&policy, "caller", clock.now()).await).unwrap();
    assert_eq!(up.token_hits(), 1);

    // Into the refresh window (the token lives 600 s): the endpoint flaps between a 500 and
    // garbage for 40 s of clock while 100 checks arrive every second.
    let before = up.token_hits();
    up.set(Mode::Error).await;
    clock.advance(Duration::from_secs(450));
    for step in 0..40 {
        up.set(if step % 2 == 0 {
            Mode::Error
        } else {
            Mode::Garbage
        })
        .await;
        for _ in 0..100 {
            assert_eq!(
                injected(&decide(&policy, "caller", clock.now()).await).as_ref(),
                Ok(&token),
                "stale but valid: served"
            );
        }
        clock.advance(Duration::from_secs(1));
        // Let a refresh woken by the clock run before the next step.
        tokio::task::yield_now().await;
    }
    let during = up.token_hits() - before;
    // Backoff from 500 ms doubling (with jitter): about log2(40 s / 0.5 s) + 1 attempts, not 4,000.
    assert!(
        (1..=12).contains(&during),
        "{during} token requests during 40 s of flapping"
    );

    // It stays up: the next retry (at most a minute of backoff later) refreshes.
    up.set(Mode::Ok).await;
    clock.advance(Duration::from_secs(61));
    let mut fresh = token.clone();
    for _ in 0..500 {
        fresh = injected(&decide(&policy, "caller", clock.now()).await).unwrap();
        if fresh != token {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(fresh, token, "refreshed once the endpoint stayed up");
}

fn exchange_yaml(up: &Upstream, issuer: &str, jwk: &serde_json::Value, limits: &str) -> String {
    format!(
        r#"
{limits}
identity_providers:
  - name: corp
    issuer: "{issuer}"
    keys: [{jwk}]
credentials:
  - {{ name: obo, grant: token_exchange, token_url: "{url}", client_id: c, client_secret: s, audience: api://inventory, timeout: 10s }}
apis:
  - name: orders
    jwt: {{ providers: [corp], audiences: [api://orders] }}
    on_allow: {{ backend_credential: {{ name: obo }} }}
"#,
        url = up.token_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_requests_are_capped_and_the_excess_fails_fast() {
    let key = keys::rsa(0, Some("k1"));
    let issuer = "https://idp.test/corp";
    let up = Upstream::start(serde_json::json!({"keys": []})).await;
    let rt = Runtime::default();
    let policy = Arc::new(compile(
        &exchange_yaml(
            &up,
            issuer,
            &key.jwk,
            "limits: { max_concurrent_fetches: 3 }",
        ),
        &rt,
    ));
    let caller = |i: usize| key.token(keys::claims(issuer, "api://orders", &format!("user-{i}")));

    // Three callers' exchanges are held by a slow provider: the cap is reached.
    up.set(Mode::Hold).await;
    let held: Vec<_> = (0..3)
        .map(|i| {
            let (p, t) = (policy.clone(), caller(i));
            tokio::spawn(async move { injected(&decide(&p, &t, SystemTime::now()).await) })
        })
        .collect();
    eventually("three held token requests", || up.held() == 3).await;

    // Ten more distinct callers: each is answered at once (while the three still wait) with 503,
    // and none of them reached the provider.
    for i in 3..13 {
        // (Bounded only so that a missing cap fails this test instead of hanging it.)
        let d = tokio::time::timeout(
            Duration::from_secs(20),
            decide(&policy, &caller(i), SystemTime::now()),
        )
        .await
        .expect("over the cap, a check must not wait for the provider");
        assert_eq!(
            injected(&d),
            Err("503 BackendCredentialUnavailable".to_string()),
            "caller {i}"
        );
    }
    assert_eq!(up.token_hits(), 3, "the excess never reached the provider");
    assert_eq!(up.held(), 3);

    // The provider answers: the held callers get their own tokens, and the cap admits again.
    up.release().await;
    for (i, h) in held.into_iter().enumerate() {
        let got = h
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("caller {i}: {e}"));
        assert!(got.starts_with("Bearer tok-"), "{got}");
    }
    let got = injected(&decide(&policy, &caller(20), SystemTime::now()).await).unwrap();
    assert!(got.starts_with("Bearer tok-4-"), "{got}");
    // The refused callers were not backed off: one of them now succeeds too.
    let got = injected(&decide(&policy, &caller(3), SystemTime::now()).await).unwrap();
    assert!(got.starts_with("Bearer tok-5-"), "{got}");
}

#[test]
fn max_concurrent_fetches_must_be_positive() {
    let src = config::parse(
        "limits: { max_concurrent_fetches: 0 }\napis: [{name: a}]\n",
        std::path::Path::new("."),
    )
    .unwrap();
    let errs = policy::compile(&src, &Runtime::offline())
        .expect_err("0 is refused")
        .to_string();
    assert!(
        errs.contains("limits.max_concurrent_fetches: must be greater than 0"),
        "{errs}"
    );
}

const STORE_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// Starts the binary on `cfg`. The shell ignores SIGXFSZ before exec, so a file size limit set
/// later makes writes fail with EFBIG instead of killing the process.
fn serve(cfg: &std::path::Path) -> (faults_common::KillOnDrop, String, String) {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; exec \"$0\" serve --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .arg(cfg)
        .env("CRM_RT", "rt-0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (grpc, http) = faults_common::listeners(&mut child);
    (faults_common::KillOnDrop(child), grpc, http)
}

/// Sets the process's file size limit: `0` makes every write to a regular file fail.
fn file_size_limit(child: &faults_common::KillOnDrop, soft: &str) {
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", child.0.id()))
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "prlimit");
}

async fn check_grpc(grpc: &str) -> Result<String, String> {
    let mut client = portcullis::proto::auth::authorization_client::AuthorizationClient::connect(
        format!("http://{grpc}"),
    )
    .await
    .unwrap();
    let mut req = portcullis::proto::auth::CheckRequest::default();
    let mut http = portcullis::proto::auth::attribute_context::HttpRequest {
        method: "GET".into(),
        path: "/crm/1".into(),
        host: "api.example.com".into(),
        ..Default::default()
    };
    for (k, v) in [
        (":method", "GET"),
        (":path", "/crm/1"),
        (":authority", "api.example.com"),
    ] {
        http.headers
            .push(portcullis::policy::RequestHeader::new(k, v));
    }
    req.attributes = Some(portcullis::proto::auth::AttributeContext {
        request: Some(portcullis::proto::auth::attribute_context::Request {
            time: None,
            http: Some(http),
        }),
        ..Default::default()
    });
    let r = client.check(req).await.unwrap().into_inner();
    use portcullis::proto::auth::check_response::HttpResponse;
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => Ok(ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "authorization")
            .map(|h| h.value.clone())
            .unwrap_or_default()),
        Some(HttpResponse::DeniedResponse(d)) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            Err(format!(
                "{} {}",
                d.status.map_or(0, |s| s.code),
                body["reason"].as_str().unwrap_or_default()
            ))
        }
        other => panic!("unexpected answer: {other:?}"),
    }
}

/// `portcullis_token_cache_requests` with `result="error"`, from /metrics.
async fn token_errors(http: &str) -> f64 {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("portcullis_token_cache_requests") && l.contains("result=\"error\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_the_store_cannot_write_fails_closed_and_is_not_lost() {
    let up = Upstream::start(serde_json::json!({"keys": []})).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("store.key"), STORE_KEY).unwrap();
    let cfg = dir.path().join("p.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
listen: {{ grpc: 127.0.0.1:0, http: 127.0.0.1:0 }}
store: {{ path: data/portcullis.db, key: "${{file:store.key}}" }}
credentials:
  - {{ name: crm, grant: refresh_token, token_url: "{}", client_id: c, client_secret: s, refresh_token: "${{env:CRM_RT}}", timeout: 5s }}
apis:
  - name: crm
    on_allow: {{ backend_credential: {{ name: crm }} }}
"#,
            up.token_url()
        ),
    )
    .unwrap();
    // The provider is down at start, so the refresh token is seeded into the store unspent.
    up.set(Mode::Down).await;
    let (mut child, grpc, http) = serve(&cfg);
    assert_eq!(
        check_grpc(&grpc).await,
        Err("503 BackendCredentialUnavailable".into())
    );

    // The store becomes unwritable, then the provider comes back and rotates the refresh token
    // on the next refresh: the access token is not used (503), never an allow.
    file_size_limit(&child, "0");
    up.set(Mode::Ok).await;
    let mut answers = 0;
    while up.refreshes().is_empty() {
        assert_eq!(
            check_grpc(&grpc).await,
            Err("503 BackendCredentialUnavailable".into())
        );
        answers += 1;
        assert!(answers < 2000, "the provider was never asked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.refreshes(), [("rt-0".to_string(), true)]);

    // While the store stays unwritable, later attempts (the backoff lets one through now and
    // then) write the kept token first and fail without spending anything at the provider.
    let errors = token_errors(&http).await;
    let mut answers = 0;
    while token_errors(&http).await < errors + 1.0 {
        assert_eq!(
            check_grpc(&grpc).await,
            Err("503 BackendCredentialUnavailable".into())
        );
        answers += 1;
        assert!(answers < 2000, "no further attempt");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.refreshes().len(),
        1,
        "nothing more was sent to the provider"
    );

    // Writable again: the kept token is stored, then used; the connection was never lost.
    file_size_limit(&child, "unlimited");
    let mut answers = 0;
    let token = loop {
        match check_grpc(&grpc).await {
            Ok(t) => break t,
            Err(e) => assert_eq!(e, "503 BackendCredentialUnavailable"),
        }
        answers += 1;
        assert!(answers < 2000, "never recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(token, "Bearer tok-2");
    assert_eq!(
        up.refreshes(),
        [("rt-0".to_string(), true), ("rt-1".to_string(), true)]
    );
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(child.0.wait().unwrap().code(), Some(0));

    // After a restart, the store holds the newest refresh token.
    let (mut child, grpc, _) = serve(&cfg);
    assert_eq!(check_grpc(&grpc).await, Ok("Bearer tok-3".into()));
    assert_eq!(up.refreshes().last(), Some(&("rt-2".to_string(), true)));
    std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}
