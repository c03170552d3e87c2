//! Fault matrix of the identity provider (discovery and JWKS): refused, down during traffic, slow
//! beyond `fetch_timeout`, garbage, an endless or oversized body, too many keys. Each test asserts
//! the decision a caller sees, recovery when the fault ends, and how many requests reached the
//! provider. (Single flight for unknown kids, 500s and the background refresh are in
//! tests/jwt_jwks.rs; they are not repeated here.)

mod common;
mod faults_common;
#[path = "jwt_common/mod.rs"]
mod keys;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{Seen, TestServer, get, seen};
use faults_common::{Mode, Upstream, eventually};
use portcullis::config;
use portcullis::identity::ProviderStatus;
use portcullis::policy::{self, Outcome, PolicySet, Runtime};

const AUD: &str = "api://orders";

fn yaml(up: &Upstream, source: &str, extra: &str) -> String {
    let src = match source {
        "discovery" => String::new(),
        _ => format!("\n    jwks_uri: \"{}\"", up.jwks_uri()),
    };
    format!(
        r#"
identity_providers:
  - name: corp
    issuer: "{iss}"{src}{extra}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"] }}
"#,
        iss = up.base
    )
}

fn status(srv: &TestServer) -> ProviderStatus {
    srv.running.state.runtime.identity.providers()[0].clone()
}

fn attempts(s: &ProviderStatus) -> u64 {
    s.fetches_ok + s.fetches_failed
}

async fn check(srv: &TestServer, token: &str) -> Seen {
    let mut client = srv.client().await;
    let req = get("/orders/1")
        .header("authorization", &format!("Bearer {token}"))
        .request();
    seen(&client.check(req).await.unwrap().into_inner())
}

/// `n` checks at once over one connection; every answer.
async fn burst(srv: &TestServer, token: &str, n: usize) -> Vec<Seen> {
    let client = srv.client().await;
    let calls = (0..n).map(|_| {
        let mut client = client.clone();
        let req = get("/orders/1")
            .header("authorization", &format!("Bearer {token}"))
            .request();
        async move { seen(&client.check(req).await.unwrap().into_inner()) }
    });
    futures::future::join_all(calls).await
}

fn assert_unavailable(r: &Seen) {
    assert_eq!((r.code, r.status), (14, Some(503)), "{r:?}");
    assert_eq!(
        r.body.as_ref().unwrap()["reason"],
        "IdentityProviderUnavailable",
        "{r:?}"
    );
    assert!(
        !r.headers.contains_key("www-authenticate"),
        "an outage is not the token's fault: {r:?}"
    );
}

/// Fetches that may start in `elapsed`: the one under way, then one per `min_refetch_interval`
/// (background retry) plus one for the checks, whatever their number.
fn fetch_bound(elapsed: Duration, interval: Duration) -> u64 {
    2 + 2 * (elapsed.as_millis() / interval.as_millis()) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_at_start_fails_closed_without_a_stampede_and_recovers_without_restart() {
    let k1 = keys::rsa(0, Some("k1"));
    let up = Upstream::start(keys::jwks(&[&k1])).await;
    up.set(Mode::Down).await;
    let interval = Duration::from_millis(300);
    let srv = TestServer::start(&yaml(
        &up,
        "jwks_uri",
        "\n    min_refetch_interval: 300ms\n    fetch_timeout: 2s",
    ))
    .await;
    eventually("the first fetch to fail", || {
        status(&srv).fetches_failed >= 1
    })
    .await;
    let token = k1.token(keys::claims(&up.base, AUD, "alice"));

    let before = attempts(&status(&srv));
    let started = Instant::now();
    let answers = burst(&srv, &token, 200).await;
    let elapsed = started.elapsed();
    for r in &answers {
        assert_unavailable(r);
    }
    let during = attempts(&status(&srv)) - before;
    assert!(
        during <= fetch_bound(elapsed, interval),
        "200 checks caused {during} fetches in {elapsed:?}: a stampede"
    );
    assert_eq!(status(&srv).keys, None);

    // The provider comes up: the background retry obtains the keys, no restart.
    up.set(Mode::Ok).await;
    eventually("keys after the provider came up", || {
        status(&srv).keys == Some(1)
    })
    .await;
    let r = check(&srv, &token).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(up.jwks_hits() >= 1);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_during_traffic_keeps_the_last_good_keys() {
    let k1 = keys::rsa(0, Some("k1"));
    let k2 = keys::rsa(1, Some("k2"));
    let up = Upstream::start(keys::jwks(&[&k1])).await;
    // Discovery, so the scheduled refresh asks for the document and then the keys.
    let srv = TestServer::start(&yaml(
        &up,
        "discovery",
        "\n    cache_ttl: 300ms\n    min_refetch_interval: 300ms\n    fetch_timeout: 2s",
    ))
    .await;
    eventually("the first keys", || status(&srv).keys == Some(1)).await;
    let claims = keys::claims(&up.base, AUD, "alice");
    assert_eq!(check(&srv, &k1.token(claims.clone())).await.code, 0);

    up.set(Mode::Down).await;
    let failed = status(&srv).fetches_failed;
    // A token with an unknown kid asks for a re-fetch, which is refused: the kid stays unknown.
    let r = check(&srv, &k2.token(claims.clone())).await;
    assert_eq!(r.code, 16, "{r:?}");
    assert_eq!(
        r.body.as_ref().unwrap()["reason"],
        "TokenSignatureKeyNotFound"
    );
    eventually("failed refreshes while down", || {
        status(&srv).fetches_failed >= failed + 2
    })
    .await;
    // Tokens never seen before (so not from the verified-token cache) verify with the kept key.
    for sub in ["bob", "carol", "dave"] {
        let r = check(&srv, &k1.token(keys::claims(&up.base, AUD, sub))).await;
        assert_eq!(r.code, 0, "{sub}: {r:?}");
    }
    assert_eq!(status(&srv).keys, Some(1));

    // Back up with a rotated key set: the new key is picked up.
    up.set_jwks(keys::jwks(&[&k1, &k2]));
    up.set(Mode::Ok).await;
    eventually("the rotated keys", || status(&srv).keys == Some(2)).await;
    let mut other = claims.clone();
    other["sub"] = "erin".into();
    assert_eq!(check(&srv, &k2.token(other)).await.code, 0);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slower_than_fetch_timeout_answers_unavailable_instead_of_hanging() {
    let k1 = keys::rsa(0, Some("k1"));
    let up = Upstream::start(keys::jwks(&[&k1])).await;
    up.set(Mode::Hold).await;
    let interval = Duration::from_millis(300);
    let srv = TestServer::start(&yaml(
        &up,
        "jwks_uri",
        "\n    min_refetch_interval: 300ms\n    fetch_timeout: 200ms",
    ))
    .await;
    eventually("a fetch held by the provider", || up.held() >= 1).await;
    let token = k1.token(keys::claims(&up.base, AUD, "alice"));
    let before = up.jwks_hits();
    let started = Instant::now();
    // Every check completes (none waits for the provider beyond fetch_timeout) and fails closed.
    let answers = burst(&srv, &token, 50).await;
    let elapsed = started.elapsed();
    for r in &answers {
        assert_unavailable(r);
    }
    let during = (up.jwks_hits() - before) as u64;
    assert!(
        during <= fetch_bound(elapsed, interval),
        "50 checks caused {during} requests in {elapsed:?}"
    );

    up.release().await;
    eventually("keys once the provider is fast again", || {
        status(&srv).keys == Some(1)
    })
    .await;
    assert_eq!(check(&srv, &token).await.code, 0);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_first_key_fetch_but_not_for_a_provider_that_is_down() {
    let k1 = keys::rsa(0, Some("k1"));
    let up = Upstream::start(keys::jwks(&[&k1])).await;
    up.set(Mode::Hold).await;
    let srv = TestServer::start(&yaml(&up, "jwks_uri", "\n    fetch_timeout: 30s")).await;
    let readyz = format!("http://{}/readyz", srv.running.addrs.http.unwrap());
    eventually("the first fetch held by the provider", || up.held() >= 1).await;
    let r = reqwest::get(&readyz).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("identity provider"));
    // /healthz is liveness: it answers regardless.
    let health = readyz.replace("/readyz", "/healthz");
    assert_eq!(reqwest::get(&health).await.unwrap().status(), 200);

    up.release().await;
    wait_ready(&readyz).await;
    let token = k1.token(keys::claims(&up.base, AUD, "alice"));
    assert_eq!(check(&srv, &token).await.code, 0);
    srv.running.shutdown().await.unwrap();

    // A provider that is down: its first attempt fails at once, readiness follows, checks fail closed.
    let down = Upstream::start(keys::jwks(&[&k1])).await;
    down.set(Mode::Down).await;
    let srv = TestServer::start(&yaml(&down, "jwks_uri", "")).await;
    wait_ready(&format!(
        "http://{}/readyz",
        srv.running.addrs.http.unwrap()
    ))
    .await;
    let token = k1.token(keys::claims(&down.base, AUD, "alice"));
    assert_unavailable(&check(&srv, &token).await);
    srv.running.shutdown().await.unwrap();
}

async fn wait_ready(readyz: &str) {
    let mut status = 0;
    for _ in 0..400 {
        status = reqwest::get(readyz).await.unwrap().status().as_u16();
        if status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{readyz} still answers {status}");
}

fn compile_on_demand(yaml: &str) -> (Arc<PolicySet>, Runtime) {
    let src = config::parse(yaml, Path::new(".")).unwrap();
    let runtime = Runtime::on_demand();
    let (policy, _) = policy::compile(&src, &runtime).unwrap();
    (Arc::new(policy), runtime)
}

async fn decide(p: &PolicySet, token: &str, now: SystemTime) -> String {
    let d = common::decide_bearer(p, token, now).await;
    match &d.outcome {
        Outcome::Allow => "allow".into(),
        Outcome::Deny(den) => format!("{} {}", den.status, den.reason.as_str()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_documents_are_refused_and_the_last_good_keys_kept() {
    let k1 = keys::rsa(0, Some("k1"));
    let k2 = keys::rsa(1, Some("k2"));
    let up = Upstream::start(keys::jwks(&[&k1, &k2])).await;
    let (p, rt) = compile_on_demand(&yaml(&up, "discovery", "\n    fetch_timeout: 10s"));
    let t0 = SystemTime::now();
    let minutes = |m: u64| t0 + Duration::from_secs(60 * m);
    let mut claims = keys::claims(&up.base, AUD, "alice");
    // Valid all day: the checks below are minutes apart.
    claims["exp"] = (keys::now() + 86_400).into();
    let good = k1.token(claims.clone());

    // No keys yet and an unusable document: fail closed with 503, never allow.
    for (i, mode) in [Mode::Garbage, Mode::TooManyKeys].into_iter().enumerate() {
        up.set(mode).await;
        assert_eq!(
            decide(&p, &good, minutes(10 * i as u64)).await,
            "503 IdentityProviderUnavailable",
            "{mode:?}"
        );
    }
    up.set(Mode::Ok).await;
    up.set_jwks(keys::jwks(&[&k1]));
    assert_eq!(decide(&p, &good, minutes(20)).await, "allow");

    // Keys are in hand; k2 tokens ask for a re-fetch, which each fault spoils. (Each check is
    // 10 minutes after the last, past min_refetch_interval, so each asks exactly once.)
    let k2_token = k2.token(claims.clone());
    let mut at = 30;
    for mode in [
        Mode::Garbage,
        Mode::Endless,
        Mode::Oversized,
        Mode::TooManyKeys,
        Mode::Error,
    ] {
        up.set(mode).await;
        up.set_jwks(keys::jwks(&[&k1, &k2]));
        let hits = up.jwks_hits();
        let failed = rt.identity.providers()[0].fetches_failed;
        assert_eq!(
            decide(&p, &k2_token, minutes(at)).await,
            "401 TokenSignatureKeyNotFound",
            "{mode:?}: the document was refused"
        );
        assert_eq!(up.jwks_hits(), hits + 1, "{mode:?}: one request");
        let s = &rt.identity.providers()[0];
        assert_eq!(
            (s.keys, s.fetches_failed),
            (Some(1), failed + 1),
            "{mode:?}"
        );
        let mut other = claims.clone();
        other["sub"] = format!("{mode:?}").into();
        assert_eq!(
            decide(&p, &k1.token(other), minutes(at)).await,
            "allow",
            "{mode:?}: the last good key still verifies"
        );
        at += 10;
    }
    // The endless body was abandoned at the 1 MiB cap (plus what sat in socket buffers), not read
    // until fetch_timeout.
    assert!(
        up.streamed() < 16 * 1024 * 1024,
        "{} bytes were produced for a capped reader",
        up.streamed()
    );

    // Recovery: a good document with k2.
    up.set(Mode::Ok).await;
    assert_eq!(decide(&p, &k2_token, minutes(at)).await, "allow");
    assert_eq!(rt.identity.providers()[0].keys, Some(2));
}
