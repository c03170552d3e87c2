//! `store.redis` against a real `redis-server` (Debian's; started here on a free loopback port with
//! its own directory): several replicas (each its own `Runtime`, as separate processes would be)
//! share one rotating refresh-token connection, consent and client-credentials tokens; one replica
//! refreshes at a time; a replica that died mid-refresh is never replayed; Redis down serves cached
//! tokens and denies what needs Redis; Redis restarted with AOF loses nothing; Redis sees only
//! ciphertext.
//!
//! Without `redis-server` these tests skip with a message, except under `CI=true`, where they fail.
//! The token endpoint is a local fake with the behaviour that matters here: every refresh rotates
//! the refresh token, and a spent one is answered `invalid_grant` and revokes the grant (reuse
//! detection, as oidc-provider, Auth0 and Okta do).

mod redis_common;

use std::time::Duration;

use portcullis::config;
use portcullis::credentials::Registry;
use portcullis::policy::{self, Runtime};
use redis_common::{
    CLIENT_SECRET, Idp, KEY_A, KEY_B, RedisServer, clock, env_with, replica, setup, try_replica,
    yaml,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_rotating_connection_and_refresh_it_once_per_period() {
    let Some((redis, idp, clock, replicas)) = setup(3, false).await else {
        return;
    };

    for period in 0..4 {
        // Concurrent checks on every replica: all allowed, all with the one current token.
        let checks = replicas
            .iter()
            .flat_map(|r| (0..20).map(move |_| r))
            .map(|r| r.check("/orders/1", &clock));
        let answers = futures::future::join_all(checks).await;
        let tokens: std::collections::BTreeSet<String> = answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|e| panic!("period {period}: denied: {e}")))
            .collect();
        assert_eq!(
            tokens.len(),
            1,
            "period {period}: one token for the fleet: {tokens:?}"
        );
        let (refreshes, invalid) = idp.with(|s| (s.refreshes, s.invalid_grants));
        assert_eq!(
            refreshes,
            period + 1,
            "one refresh per period for the whole fleet"
        );
        assert_eq!(invalid, 0, "no refresh token was ever replayed");
        // Past the refresh point (600 s tokens, refreshed 180 s ahead): every replica's background
        // refresh wakes at once; one refreshes, the others take its token.
        clock.advance(Duration::from_secs(430));
        tokio::time::sleep(Duration::from_millis(50)).await;
        for r in &replicas {
            for _ in 0..100 {
                let t = r.check("/orders/1", &clock).await.unwrap();
                if t != *tokens.first().unwrap() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let leases: u64 = replicas
        .iter()
        .map(|r| r.lease_outcomes().get("acquired").copied().unwrap_or(0))
        .sum();
    assert!(
        leases >= 4,
        "every refresh was made under the lease: {leases}"
    );
    assert_eq!(idp.with(|s| s.invalid_grants), 0);
    assert!(
        idp.with(|s| s.current.is_some()),
        "the grant was never revoked"
    );

    // Redis holds only ciphertext: no refresh token, access token or client secret in any key or
    // value under the prefix.
    let dump = redis.dump().await;
    assert!(
        dump.iter()
            .any(|(k, _)| k.starts_with("portcullis:conn:crm:")),
        "{dump:?}"
    );
    let spent = idp.with(|s| s.spent.clone());
    for (k, v) in &dump {
        let text = String::from_utf8_lossy(v);
        for secret in spent
            .iter()
            .map(String::as_str)
            .chain(["tok-", CLIENT_SECRET, "rt-"])
        {
            assert!(
                !k.contains(secret) && !text.contains(secret),
                "`{secret}` in {k}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_credentials_are_fetched_once_for_the_fleet() {
    let Some((_redis, idp, clock, replicas)) = setup(3, false).await else {
        return;
    };
    let mut seen = std::collections::BTreeSet::new();
    for r in &replicas {
        for _ in 0..10 {
            seen.insert(r.check("/machine/1", &clock).await.unwrap());
        }
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        idp.with(|s| s.client_credentials),
        1,
        "one fetch per token lifetime for the fleet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_died_after_sending_the_refresh_token_is_never_replayed() {
    let Some((redis, idp, clock, replicas)) = setup(2, false).await else {
        return;
    };
    replicas[0].check("/orders/1", &clock).await.unwrap();
    assert_eq!(idp.with(|s| s.refreshes), 1);

    // What a replica killed between sending the refresh token and storing the answer leaves.
    redis
        .cmd(&["HSET", "portcullis:conn:crm:default", "f", "4242.deadbeef"])
        .await;
    clock.advance(Duration::from_secs(601));
    let denied = replicas[1].check("/orders/1", &clock).await.unwrap_err();
    assert!(
        denied.starts_with("503 BackendCredentialUnavailable"),
        "{denied}"
    );
    assert_eq!(
        idp.with(|s| s.refreshes),
        1,
        "the possibly spent token was not sent"
    );
    let listed = replicas[0]
        .runtime
        .credentials
        .admin_connections("crm", None)
        .await
        .unwrap();
    assert_eq!(
        listed["connections"][0]["state"], "needs_consent",
        "{listed}"
    );
    assert_eq!(idp.with(|s| s.invalid_grants), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_holder_that_stops_loses_the_lease_after_its_ttl() {
    let Some((redis, idp, clock, replicas)) = setup(2, false).await else {
        return;
    };
    // A holder that died before sending anything: its lease (TTL = timeout 2 s + 5 s) blocks the
    // others until it runs out, then one of them refreshes.
    redis
        .cmd(&[
            "SET",
            "portcullis:lease:crm:default",
            "4242.deadbeef:0",
            "PX",
            "1500",
        ])
        .await;
    let t = replicas[1].check("/orders/1", &clock).await;
    assert!(
        t.is_ok(),
        "served once the dead holder's lease ran out: {t:?}"
    );
    assert_eq!(idp.with(|s| (s.refreshes, s.invalid_grants)), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consent_started_on_one_replica_completes_on_another_and_every_replica_uses_it() {
    let Some((redis, idp, _, replicas)) = setup(3, false).await else {
        return;
    };
    let started = replicas[0]
        .runtime
        .credentials
        .start_consent("crm", "partner", None, None)
        .await
        .unwrap();
    let login = url::Url::parse(started["login_url"].as_str().unwrap()).unwrap();
    let state = login
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    // Redis keeps the consent under the digest of its state, sealed: neither the state nor the
    // PKCE verifier is readable there.
    let dump = redis.dump().await;
    let consent = dump
        .iter()
        .find(|(k, _)| k.starts_with("portcullis:consent:"))
        .expect("kept in Redis");
    assert!(
        !consent.0.contains(&state) && !String::from_utf8_lossy(&consent.1).contains("partner")
    );

    let done = replicas[1]
        .runtime
        .credentials
        .complete_consent(Some(&state), Some("the-code"), None)
        .await
        .unwrap();
    assert_eq!(done.connection, "partner");
    assert!(
        replicas[2]
            .runtime
            .credentials
            .complete_consent(Some(&state), Some("the-code"), None)
            .await
            .is_err(),
        "a state is single use across the fleet"
    );
    for r in &replicas {
        let listed = r
            .runtime
            .credentials
            .admin_connections("crm", None)
            .await
            .unwrap();
        let partner = listed["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "partner")
            .unwrap_or_else(|| panic!("every replica lists it: {listed}"));
        assert_eq!(partner["state"], "connected");
    }
    assert_eq!(idp.with(|s| s.codes), 1);

    // Deleted through one replica: gone for all of them.
    replicas[2]
        .runtime
        .credentials
        .delete_connection("crm", "partner")
        .await
        .unwrap();
    for r in &replicas {
        let listed = r
            .runtime
            .credentials
            .admin_connections("crm", None)
            .await
            .unwrap();
        assert!(
            !listed["connections"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["id"] == "partner"),
            "{listed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_serves_cached_tokens_denies_what_needs_it_and_loses_nothing_with_aof() {
    let Some((mut redis, idp, clock, replicas)) = setup(2, true).await else {
        return;
    };
    let token = replicas[0].check("/orders/1", &clock).await.unwrap();

    redis.kill();
    // Cached and valid: still allowed, on both replicas (the second took the shared token).
    assert_eq!(replicas[0].check("/orders/1", &clock).await.unwrap(), token);
    // Expired: a refresh needs the shared record, so it is denied, never replayed.
    clock.advance(Duration::from_secs(601));
    let denied = replicas[1].check("/orders/1", &clock).await.unwrap_err();
    assert!(
        denied.starts_with("503 BackendCredentialUnavailable"),
        "{denied}"
    );
    let refreshes = idp.with(|s| s.refreshes);
    assert_eq!(refreshes, 1, "nothing was sent without the store");
    // Client credentials carry no rotation: fetched by the replica itself.
    assert!(replicas[1].check("/machine/1", &clock).await.is_ok());

    // Back (AOF, appendfsync always): the rotated refresh token is still there; no new consent. A
    // replica that starts now refreshes it and shares the token.
    redis.restart();
    let newcomer = replica(&yaml(&redis, &idp), &clock, KEY_A).await;
    let fresh = newcomer.check("/orders/1", &clock).await.unwrap();
    assert_ne!(fresh, token);
    assert_eq!(idp.with(|s| (s.refreshes, s.invalid_grants)), (2, 0));
    // The replica that was denied is still backing off (its clock has not moved), yet it serves the
    // fleet's token at once: a check looks in Redis while the slot backs off (at most every 250 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(replicas[1].check("/orders/1", &clock).await, Ok(fresh));
    assert_eq!(idp.with(|s| (s.refreshes, s.invalid_grants)), (2, 0));
    let ops = replicas[1].runtime.credentials.store_operations();
    assert!(
        ops.iter()
            .any(|(_, r, n)| (*r == "error" || *r == "timeout") && *n > 0),
        "the outage is counted: {ops:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_at_start_and_nothing_is_written() {
    let Some((redis, idp, clock, _first)) = setup(1, false).await else {
        return;
    };
    let before = redis.dump().await;
    let src = config::parse_with_env(
        &yaml(&redis, &idp),
        std::path::Path::new("."),
        &env_with(KEY_B),
    )
    .unwrap();
    let runtime = Runtime {
        credentials: Registry::with_clock(clock.clone()),
        ..Runtime::default()
    };
    let policy = policy::compile(&src, &runtime).unwrap().0;
    runtime.publish(&policy);
    let err = runtime
        .credentials
        .start(policy.backend_credentials())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("wrong key"), "{err}");
    assert!(
        err.contains(&format!("redis://127.0.0.1:{}/0", redis.port)),
        "{err}"
    );
    assert!(!err.contains(KEY_B) && !err.contains(KEY_A), "{err}");
    let mut after = redis.dump().await;
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(
        before.len(),
        after.len(),
        "nothing was written with the wrong key"
    );
}

#[test]
fn store_redis_settings_are_checked_with_their_paths() {
    let env = |name: &str| match name {
        "K" => Some(KEY_A.to_string()),
        "PW" => Some("hunter2-redis".to_string()),
        _ => None,
    };
    let errors = |store: &str| {
        let text = format!("store:\n{store}\n  key: \"${{env:K}}\"\n");
        let src = config::parse_with_env(&text, std::path::Path::new("."), &env).unwrap();
        match policy::compile(&src, &Runtime::offline()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(
        errors("  redis: { url: \"redis://cache:6379/0\", password: \"${env:PW}\" }"),
        ""
    );
    for (store, needle) in [
        (
            "  path: a.db\n  redis: { url: \"redis://h:6379/0\" }",
            "store: give `path`",
        ),
        (
            "  redis: { url: \"redis+sentinel://h:26379/mymaster\" }",
            "store.redis.url: Redis Sentinel is not supported",
        ),
        (
            "  redis: { url: \"http://h:6379/0\" }",
            "store.redis.url: `http://` is not a Redis URL",
        ),
        (
            "  redis: { url: \"redis://:hunter2@h:6379/0\" }",
            "store.redis.url: a password must not be written in the file",
        ),
        (
            "  redis: { url: \"redis://h:6379/0\", password: hunter2 }",
            "store.redis.password: the password must not be written",
        ),
        (
            "  redis: { url: \"redis://h:6379/zero\" }",
            "store.redis.url: the path is the database number",
        ),
        (
            "  redis: { url: \"redis://h:6379/0\", tls: { ca_file: ca.pem } }",
            "store.redis.tls: applies to rediss:// URLs only",
        ),
        (
            "  redis: { url: \"rediss://h:6380/0\", tls: { cert_file: c.pem } }",
            "store.redis.tls: `cert_file` and `key_file` go together",
        ),
        (
            "  redis: { url: \"redis://h:6379/0\", timeout: 0s }",
            "store.redis.timeout: must be more than 0",
        ),
        (
            "  redis: { url: \"redis://h:6379/0\", prefix: \"a b\" }",
            "store.redis.prefix",
        ),
    ] {
        let e = errors(store);
        assert!(e.contains(needle), "`{needle}` missing for {store}:\n{e}");
        assert!(!e.contains("hunter2"), "a password is never shown: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let pki = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = pki.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "redis test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf("127.0.0.1");
    let (client_pem, client_key) = leaf("portcullis.example.com");
    let ca_file = write("ca.pem", ca.pem());
    let (server_pem, server_key) = (
        write("server.pem", server_pem),
        write("server.key", server_key),
    );
    let (client_pem, client_key) = (
        write("client.pem", client_pem),
        write("client.key", client_key),
    );

    let Some(redis) = RedisServer::start_with(false, |port| {
        [
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &server_pem,
            "--tls-key-file",
            &server_key,
            "--tls-ca-cert-file",
            &ca_file,
            "--tls-auth-clients",
            "yes",
        ]
        .map(String::from)
        .to_vec()
    }) else {
        return;
    };
    let idp = Idp::start("rt-seed").await;
    let clock = clock();
    let text = |tls: &str| {
        format!(
            r#"
store:
  redis: {{ url: "rediss://127.0.0.1:{port}/0", tls: {tls}, timeout: 300ms }}
  key: "${{env:STORE_KEY}}"
credentials:
  - {{ name: machine, grant: client_credentials, token_url: "{url}", client_id: portcullis, client_secret: "${{env:CLIENT_SECRET}}" }}
apis:
  - {{ name: machine, match: {{ path_prefix: /machine }}, on_allow: {{ backend_credential: {{ name: machine }} }} }}
"#,
            port = redis.port,
            url = idp.url()
        )
    };
    let full = text(&format!(
        "{{ ca_file: {ca_file}, cert_file: {client_pem}, key_file: {client_key} }}"
    ));
    let a = try_replica(&full, &clock, KEY_A).await.unwrap();
    let b = try_replica(&full, &clock, KEY_A).await.unwrap();
    let token = a.check("/machine/1", &clock).await.unwrap();
    assert_eq!(
        b.check("/machine/1", &clock).await.unwrap(),
        token,
        "shared over TLS"
    );
    assert_eq!(idp.with(|s| s.client_credentials), 1);

    // Without the client certificate Redis refuses the handshake; without the private CA the
    // server is not trusted. Both stop start-up with the URL (and no key or password) named.
    for (tls, why) in [
        // Redis closes the handshake: nothing says it will not work next time.
        (format!("{{ ca_file: {ca_file} }}"), "unreachable: "),
        // A server this replica does not trust is refused at once.
        (
            format!("{{ cert_file: {client_pem}, key_file: {client_key} }}"),
            "refused: invalid peer certificate",
        ),
    ] {
        let err = match try_replica(&text(&tls), &clock, KEY_A).await {
            Ok(_) => panic!("started with tls {tls}"),
            Err(e) => e,
        };
        assert!(
            err.starts_with(&format!("store rediss://127.0.0.1:{}/0: {why}", redis.port)),
            "{err}"
        );
    }
}
