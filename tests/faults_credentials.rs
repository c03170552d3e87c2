//! Fault matrix of the token endpoint (backend credentials): flapping while a token is cached, and
//! the cap on concurrent token requests (`limits.max_concurrent_fetches`) that per-caller grants
//! (token exchange) would otherwise exceed. Down at start, down while cached, slow, garbage and
//! recovery are in tests/credentials.rs (`every_fault_keeps_the_cache_safe`); not repeated here.

mod faults_common;
#[path = "jwt_common/mod.rs"]
mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use faults_common::{Mode, Upstream, eventually};
use portcullis::config;
use portcullis::credentials::{Clock, ManualClock, Registry};
use portcullis::policy::{self, CheckInput, Decision, EvalOptions, Outcome, PolicySet, Runtime};

fn compile(text: &str, runtime: &Runtime) -> PolicySet {
    let src = config::parse(text, std::path::Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    policy::compile(&src, runtime)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

async fn decide(policy: &PolicySet, bearer: &str, now: SystemTime) -> Decision {
    let headers: HashMap<String, Vec<u8>> = [(
        "authorization".to_string(),
        format!("Bearer {bearer}").into_bytes(),
    )]
    .into();
    let input = CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/1",
        headers: &headers,
        peer: Some("10.0.0.1".parse().unwrap()),
        peer_certificate: "",
        context_extensions: None,
    };
    policy
        .decide(
            &input,
            EvalOptions {
                now,
                explain: false,
            },
        )
        .await
}

/// The injected `authorization` upstream, or "status reason".
fn injected(d: &Decision) -> Result<String, String> {
    match &d.outcome {
        Outcome::Allow => Ok(d
            .upstream_headers
            .iter()
            .find(|h| h.name == "authorization")
            .expect("an injected authorization header")
            .value
            .clone()),
        Outcome::Deny(den) => {
            assert!(d.upstream_headers.is_empty(), "a deny sends nothing upstream");
            Err(format!("{} {}", den.status, den.reason.as_str()))
        }
    }
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
        let got = h.await.unwrap().unwrap_or_else(|e| panic!("caller {i}: {e}"));
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
        .err()
        .expect("0 is refused")
        .to_string();
    assert!(
        errs.contains("limits.max_concurrent_fetches: must be greater than 0"),
        "{errs}"
    );
}
