//! The shared store (`store.redis`) in hostile hands: someone who can write to Redis but does not
//! hold `store.key` (a shared Redis, a leaked password, another deployment on the same prefix).
//! They can deny service (delete keys, forge a marker: every one of those fails closed), but they
//! cannot make portcullis inject another connection's or another credential's token, redeem a
//! consent they forged, or replay one under another `state`. Every value is sealed with its own
//! key name as associated data; what does not open is never used.
//!
//! Real `redis-server` (skipped with a message without it, failed under `CI=true`).

use std::time::Duration;

use sha2::Digest;

use crate::redis_common::{RedisServer, Replica, setup, yaml};

async fn consent(r: &Replica, connection: &str) -> String {
    let started = r
        .runtime
        .credentials
        .start_consent("crm", connection, None, None)
        .await
        .unwrap();
    let login = url::Url::parse(started["login_url"].as_str().unwrap()).unwrap();
    login
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned()
}

fn consent_key(state: &str) -> String {
    format!(
        "portcullis:consent:{}",
        hex::encode(sha2::Sha256::digest(state.as_bytes()))
    )
}

async fn get(redis: &RedisServer, key: &str) -> Vec<u8> {
    let mut c = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

async fn hget(redis: &RedisServer, key: &str, field: &str) -> Vec<u8> {
    let mut c = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut c)
        .await
        .unwrap()
}

async fn set_raw(redis: &RedisServer, key: &str, field: Option<&str>, value: &[u8]) {
    let mut c = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut cmd = match field {
        Some(f) => {
            let mut c = redis::cmd("HSET");
            c.arg(key).arg(f);
            c
        }
        None => {
            let mut c = redis::cmd("SET");
            c.arg(key);
            c
        }
    };
    let _: redis::Value = cmd.arg(value).query_async(&mut c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_moved_to_another_connection_is_never_used() {
    let Some((redis, idp, clock, fleet)) = setup(2, false).await else {
        return;
    };
    // A second connection, by consent.
    let state = consent(&fleet[0], "partner").await;
    fleet[0]
        .runtime
        .credentials
        .complete_consent(Some(&state), Some("code"), None)
        .await
        .unwrap();
    let refreshes = idp.with(|s| s.refreshes);
    // partner's sealed record written over default's: the attacker wants `/orders` (default) to
    // run on partner's refresh token.
    let partner = hget(&redis, "portcullis:conn:crm:partner", "d").await;
    set_raw(&redis, "portcullis:conn:crm:default", Some("d"), &partner).await;
    redis.cmd(&["DEL", "portcullis:token:crm:default"]).await;
    // A replica with nothing cached reads the record: it does not open under default's identity.
    let fresh =
        crate::redis_common::replica(&yaml(&redis, &idp), &clock, crate::redis_common::KEY_A).await;
    let answer = fresh.check("/orders/1", &clock).await;
    assert_eq!(
        answer,
        Err("503 BackendCredentialUnavailable".into()),
        "a moved record is refused, not used"
    );
    assert_eq!(
        idp.with(|s| s.refreshes),
        refreshes,
        "partner's refresh token was not sent for default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_moved_from_another_credential_is_never_injected() {
    let Some((redis, idp, clock, fleet)) = setup(1, false).await else {
        return;
    };
    let machine = fleet[0].check("/machine/1", &clock).await.unwrap();
    // The client-credentials token sealed for `machine`, placed where `crm`'s token lives.
    let sealed = get(&redis, "portcullis:token:machine:default").await;
    redis.cmd(&["DEL", "portcullis:token:crm:default"]).await;
    set_raw(&redis, "portcullis:token:crm:default", None, &sealed).await;
    let fresh =
        crate::redis_common::replica(&yaml(&redis, &idp), &clock, crate::redis_common::KEY_A).await;
    let crm = fresh.check("/orders/1", &clock).await.unwrap();
    assert_ne!(crm, machine, "another credential's token is never injected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_or_replayed_consents_are_refused() {
    let Some((redis, idp, _, fleet)) = setup(2, false).await else {
        return;
    };
    let creds = |i: usize| &fleet[i].runtime.credentials;

    // A state the attacker made up, with a value they wrote: nothing opens it.
    let forged = "attacker-chosen-state";
    set_raw(
        &redis,
        &consent_key(forged),
        None,
        b"\x01garbage-not-sealed",
    )
    .await;
    let e = creds(1)
        .complete_consent(Some(forged), Some("code"), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400, "{e}");

    // A genuine pending consent copied under another state's key: sealed for its own state only.
    let a = consent(&fleet[0], "alpha").await;
    let b = consent(&fleet[0], "beta").await;
    let sealed_a = get(&redis, &consent_key(&a)).await;
    set_raw(&redis, &consent_key(&b), None, &sealed_a).await;
    let e = creds(1)
        .complete_consent(Some(&b), Some("code"), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400, "{e}");
    assert_eq!(
        idp.with(|s| s.codes),
        0,
        "no code was redeemed for a forged consent"
    );

    // The genuine one works once, on any replica, and never twice.
    creds(1)
        .complete_consent(Some(&a), Some("code"), None)
        .await
        .unwrap();
    let again = creds(0)
        .complete_consent(Some(&a), Some("code"), None)
        .await
        .unwrap_err();
    assert_eq!(again.status(), 400, "{again}");
    assert_eq!(idp.with(|s| s.codes), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_in_flight_marker_denies_and_sends_nothing() {
    let Some((redis, idp, clock, fleet)) = setup(1, false).await else {
        return;
    };
    fleet[0].check("/orders/1", &clock).await.unwrap();
    let refreshes = idp.with(|s| s.refreshes);
    redis
        .cmd(&["HSET", "portcullis:conn:crm:default", "f", "1.forged"])
        .await;
    clock.advance(Duration::from_secs(601));
    assert_eq!(
        fleet[0].check("/orders/1", &clock).await,
        Err("503 BackendCredentialUnavailable".into()),
        "fails closed"
    );
    assert_eq!(idp.with(|s| s.refreshes), refreshes, "nothing was sent");
}
