//! Fetching signing keys from a counting fake provider on 127.0.0.1: single flight, the re-fetch
//! interval, failures, key removal, reloads, the background refresh, and the command line.

mod common;
#[path = "jwt_common/fake_idp.rs"]
mod fake_idp;
#[path = "jwt_common/mod.rs"]
mod keys;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{TestServer, decide_bearer as decide, get, seen};
use fake_idp::FakeIdp;
use portcullis::config;
use portcullis::policy::{self, Decision, Outcome, PolicySet, Runtime};
use serde_json::Value;

const AUD: &str = "api://orders";

fn provider_yaml(idp: &FakeIdp, source: &str, extra: &str) -> String {
    let src = match source {
        "discovery" => String::new(),
        _ => format!("\n    jwks_uri: \"{}\"", idp.jwks_uri()),
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
        iss = idp.issuer
    )
}

fn compile_on_demand(yaml: &str) -> (Arc<PolicySet>, Runtime) {
    let src = config::parse(yaml, Path::new(".")).unwrap();
    let runtime = Runtime::on_demand();
    let (policy, _) = policy::compile(&src, &runtime).unwrap();
    (Arc::new(policy), runtime)
}

fn reason(d: &Decision) -> &'static str {
    match &d.outcome {
        Outcome::Allow => "allow",
        Outcome::Deny(den) => den.reason.as_str(),
    }
}

/// `n` checks of `token` at once, each its own task; the reasons they got, counted.
async fn concurrently(
    p: &Arc<PolicySet>,
    token: &str,
    now: SystemTime,
    n: usize,
) -> HashMap<&'static str, usize> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (p, token) = (p.clone(), token.to_string());
            tokio::spawn(async move { reason(&decide(&p, &token, now).await) })
        })
        .collect();
    let mut counts = HashMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    counts
}

fn minutes(m: u64) -> Duration {
    Duration::from_secs(60 * m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_checks_with_an_unknown_kid_cause_one_fetch_and_the_interval_is_honoured() {
    let k1 = keys::rsa(0, Some("k1"));
    let k2 = keys::rsa(1, Some("k2"));
    let k3 = keys::rsa(2, Some("k3"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    let (p, _rt) = compile_on_demand(&provider_yaml(&idp, "jwks_uri", ""));
    let claims = keys::claims(&idp.issuer, AUD, "alice");
    let t0 = SystemTime::now();

    assert_eq!(
        reason(&decide(&p, &k1.token(claims.clone()), t0).await),
        "allow"
    );
    assert_eq!(idp.jwks_fetches(), 1, "the first check fetched the keys");

    // The provider rotates in k2. Slow answers make all checks overlap the one fetch.
    idp.set_jwks(keys::jwks(&[&k1, &k2]));
    idp.set_delay(Duration::from_millis(300));
    let counts = concurrently(&p, &k2.token(claims.clone()), t0 + minutes(10), 1000).await;
    assert_eq!(counts, HashMap::from([("allow", 1000)]));
    assert_eq!(
        idp.jwks_fetches(),
        2,
        "1000 checks with a new kid: exactly one fetch"
    );

    // A kid the provider never published, within min_refetch_interval (5m) of the last fetch.
    idp.set_delay(Duration::ZERO);
    let k3_token = k3.token(claims.clone());
    let counts = concurrently(
        &p,
        &k3_token,
        t0 + minutes(10) + Duration::from_secs(1),
        1000,
    )
    .await;
    assert_eq!(counts, HashMap::from([("TokenSignatureKeyNotFound", 1000)]));
    assert_eq!(
        idp.jwks_fetches(),
        2,
        "no fetch inside min_refetch_interval"
    );

    // Past the interval: one more fetch for all of them together.
    idp.set_delay(Duration::from_millis(300));
    let counts = concurrently(&p, &k3_token, t0 + minutes(16), 1000).await;
    assert_eq!(counts, HashMap::from([("TokenSignatureKeyNotFound", 1000)]));
    assert_eq!(idp.jwks_fetches(), 3);
}

#[tokio::test]
async fn a_failed_fetch_keeps_the_last_good_keys() {
    let k1 = keys::rsa(0, Some("k1"));
    let k3 = keys::rsa(2, Some("k3"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    let (p, rt) = compile_on_demand(&provider_yaml(&idp, "jwks_uri", ""));
    let claims = keys::claims(&idp.issuer, AUD, "alice");
    let t0 = SystemTime::now();
    assert_eq!(
        reason(&decide(&p, &k1.token(claims.clone()), t0).await),
        "allow"
    );

    idp.set_failing(true);
    let d = decide(&p, &k3.token(claims.clone()), t0 + minutes(10)).await;
    assert_eq!(idp.jwks_fetches(), 2, "the unknown kid asked once");
    assert_eq!(
        reason(&d),
        "TokenSignatureKeyNotFound",
        "keys were obtained before: not an outage"
    );
    let status = &rt.identity.providers()[0];
    assert_eq!(
        (status.keys, status.fetches_ok, status.fetches_failed),
        (Some(1), 1, 1)
    );

    // A token never seen before (so not cached) still verifies with the kept key.
    let mut other = claims.clone();
    other["sub"] = "bob".into();
    assert_eq!(
        reason(&decide(&p, &k1.token(other), t0 + minutes(11)).await),
        "allow"
    );
}

#[tokio::test]
async fn removing_a_key_ends_its_cached_tokens() {
    let k1 = keys::rsa(0, Some("k1"));
    let k2 = keys::rsa(1, Some("k2"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    let (p, rt) = compile_on_demand(&provider_yaml(&idp, "jwks_uri", ""));
    let claims = keys::claims(&idp.issuer, AUD, "alice");
    let t0 = SystemTime::now();
    let old = k1.token(claims.clone());
    assert_eq!(reason(&decide(&p, &old, t0).await), "allow");
    assert_eq!(reason(&decide(&p, &old, t0).await), "allow");
    let hits = rt.identity.stats().cache_hits;
    assert!(hits >= 1, "the second check was a cache hit");

    // Rotation with removal: a token of the new key makes the provider learn the new set.
    idp.set_jwks(keys::jwks(&[&k2]));
    assert_eq!(
        reason(&decide(&p, &k2.token(claims.clone()), t0 + minutes(10)).await),
        "allow"
    );
    assert_eq!(idp.jwks_fetches(), 2);
    // The cached token of the removed key is not served from the cache any more.
    assert_eq!(
        reason(&decide(&p, &old, t0 + minutes(10)).await),
        "TokenSignatureKeyNotFound"
    );
    assert_eq!(rt.identity.stats().cache_hits, hits);
}

#[tokio::test]
async fn discovery_finds_the_jwks_and_checks_the_issuer() {
    let k1 = keys::rsa(0, Some("k1"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    let (p, _rt) = compile_on_demand(&provider_yaml(&idp, "discovery", ""));
    let claims = keys::claims(&idp.issuer, AUD, "alice");
    assert_eq!(
        reason(&decide(&p, &k1.token(claims.clone()), SystemTime::now()).await),
        "allow"
    );
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (1, 1));

    // A discovery document naming another issuer is refused: no keys, so no decision on tokens.
    let spoofed = FakeIdp::start(keys::jwks(&[&k1])).await;
    spoofed.set_discovery_issuer("https://someone-else.test");
    let (p2, rt2) = compile_on_demand(&provider_yaml(&spoofed, "discovery", ""));
    let mut c = claims.clone();
    c["iss"] = spoofed.issuer.clone().into();
    let d = decide(&p2, &k1.token(c), SystemTime::now()).await;
    assert_eq!(reason(&d), "IdentityProviderUnavailable");
    assert_eq!(spoofed.jwks_fetches(), 0);
    assert_eq!(rt2.identity.providers()[0].keys, None);
}

#[tokio::test]
async fn a_provider_that_never_obtained_keys_answers_503_until_it_does() {
    let k1 = keys::rsa(0, Some("k1"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    idp.set_failing(true);
    let srv = TestServer::start(&provider_yaml(
        &idp,
        "jwks_uri",
        "\n    min_refetch_interval: 100ms",
    ))
    .await;
    idp.wait_until("the first fetch attempt", |i| i.jwks_fetches() >= 1)
        .await;
    let token = k1.token(keys::claims(&idp.issuer, AUD, "alice"));
    let mut client = srv.client().await;
    let req = || {
        get("/orders/1")
            .header("authorization", &format!("Bearer {token}"))
            .request()
    };
    let r = seen(&client.check(req()).await.unwrap().into_inner());
    assert_eq!((r.code, r.status), (14, Some(503)), "{r:?}");
    assert_eq!(
        r.body.as_ref().unwrap()["reason"],
        "IdentityProviderUnavailable"
    );
    assert!(
        !r.headers.contains_key("www-authenticate"),
        "an outage is not the token's fault"
    );

    // The provider comes back: the background retry (every min_refetch_interval) picks it up.
    idp.set_failing(false);
    let mut allowed = false;
    for _ in 0..200 {
        if seen(&client.check(req()).await.unwrap().into_inner()).code == 0 {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        allowed,
        "keys were never obtained after the provider recovered"
    );
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_provider_and_replaces_a_changed_one() {
    let k1 = keys::rsa(0, Some("k1"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    let base = provider_yaml(&idp, "jwks_uri", "\n    cache_ttl: 1h");
    let srv = TestServer::start(&base).await;
    idp.wait_until("the first fetch", |i| i.jwks_fetches() == 1)
        .await;
    let token = k1.token(keys::claims(&idp.issuer, AUD, "alice"));
    let check = || async {
        let mut client = srv.client().await;
        seen(
            &client
                .check(
                    get("/orders/1")
                        .header("authorization", &format!("Bearer {token}"))
                        .request(),
                )
                .await
                .unwrap()
                .into_inner(),
        )
        .code
    };
    assert_eq!(check().await, 0);

    // Another API added, the provider untouched: no fetch, and the verified token stays cached.
    let hits = srv.running.state.runtime.identity.stats().cache_hits;
    srv.write_config(&format!(
        "{base}  - name: health\n    match: {{ path_prefix: /health }}\n"
    ));
    let summary = srv.running.reload().await.unwrap();
    assert_eq!(summary.apis, 2);
    assert_eq!(check().await, 0);
    assert_eq!(
        idp.jwks_fetches(),
        1,
        "an unchanged provider keeps its keys over a reload"
    );
    assert_eq!(
        srv.running.state.runtime.identity.stats().cache_hits,
        hits + 1
    );

    // The provider's settings change: it starts fresh with one fetch; the old one is gone.
    srv.write_config(&base.replace("cache_ttl: 1h", "cache_ttl: 2h"));
    srv.running.reload().await.unwrap();
    idp.wait_until("the new provider's fetch", |i| i.jwks_fetches() == 2)
        .await;
    assert_eq!(check().await, 0);
    let live = srv.running.state.runtime.identity.providers();
    assert_eq!(live.len(), 1, "{live:?}");
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_background_refresh_runs_every_cache_ttl_and_stops_with_its_provider() {
    let k1 = keys::rsa(0, Some("k1"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    let fast = provider_yaml(&idp, "jwks_uri", "\n    cache_ttl: 50ms");
    let srv = TestServer::start(&fast).await;
    idp.wait_until("three scheduled fetches", |i| i.jwks_fetches() >= 3)
        .await;

    // Replaced by a provider that refreshes hourly: the fast task must end with its provider.
    srv.write_config(&fast.replace("cache_ttl: 50ms", "cache_ttl: 1h"));
    srv.running.reload().await.unwrap();
    let provider_fetches = || {
        srv.running
            .state
            .runtime
            .identity
            .providers()
            .iter()
            .map(|p| p.fetches_ok)
            .sum::<u64>()
    };
    idp.wait_until("the new provider's first fetch", |_| {
        provider_fetches() == 1
    })
    .await;
    let settled = idp.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        idp.jwks_fetches(),
        settled,
        "a dropped provider's refresh task kept fetching"
    );
    srv.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_fetches_nothing_and_check_fetches_keys() {
    let k1 = keys::rsa(0, Some("k1"));
    let idp = FakeIdp::start(keys::jwks(&[&k1])).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.yaml");
    std::fs::write(&cfg, provider_yaml(&idp, "discovery", "")).unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis");

    let out = tokio::process::Command::new(bin)
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 identity providers"));
    assert_eq!(
        (idp.discovery_fetches(), idp.jwks_fetches()),
        (0, 0),
        "validate fetches nothing"
    );

    let token = k1.token(keys::claims(&idp.issuer, AUD, "alice"));
    let out = tokio::process::Command::new(bin)
        .args(["check", "--config"])
        .arg(&cfg)
        .args(["--url", "http://api.example.com/orders/1", "-H"])
        .arg(format!("authorization: Bearer {token}"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("token of `alice`"), "{stdout}");
    assert!(
        !stdout.contains(token.rsplit('.').next().unwrap()),
        "check printed the token"
    );
    assert_eq!((idp.discovery_fetches(), idp.jwks_fetches()), (1, 1));

    let mut c = keys::claims(&idp.issuer, AUD, "alice");
    c["aud"] = Value::from("api://inventory");
    let out = tokio::process::Command::new(bin)
        .args(["check", "--config"])
        .arg(&cfg)
        .args(["--url", "http://api.example.com/orders/1", "-H"])
        .arg(format!("authorization: Bearer {}", k1.token(c)))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("TokenAudienceNotAllowed"));
}
