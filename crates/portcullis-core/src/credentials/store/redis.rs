//! `store.redis`: the store every replica shares, on Redis (or Valkey, or a managed service's
//! primary endpoint).
//!
//! Redis only ever sees ciphertext: every value is sealed exactly as in the embedded store
//! (AES-256-GCM under `store.key`, a fresh nonce per write, the value's identity as associated
//! data), so a value cannot be moved to another key undetected. Key names carry credential names
//! and connection ids (per-user ids are digests), never a secret.
//!
//! | key (after the prefix) | value |
//! |---|---|
//! | `meta:key_check` | a known plaintext, sealed: tells a wrong `store.key` at start |
//! | `conn:<credential>:<id>` | hash: `v` version, `d` sealed record, `f` in-flight marker (the replica that sent its refresh token and has not yet stored the answer) |
//! | `conns:<credential>` | set of connection ids (the admin list) |
//! | `lease:<credential>:<id>` | `<replica>:<n>`, the fencing value of the one replica obtaining a token for it (`PX`) |
//! | `token:<credential>:<id>` | the shared access token, sealed (`PX` until it expires) |
//! | `consent:<sha256 of state>` | a pending consent, sealed (`PX` 10 minutes, taken with `GETDEL`) |
//! | channel `events` | `clear <replica> <credential> <id>`: drop the local token of that connection |
//!
//! Every call is bounded by `store.redis.timeout`; the connection manager reconnects in the
//! background with backoff. Counters (`portcullis.store.operations`, `portcullis.store.leases`) are
//! read by telemetry at collection time.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, RedisResult, Script};
use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use serde::{Deserialize, Serialize};

use super::super::cache::Token;
use super::super::spec::RedisSpec;
use super::{
    ConnectionRecord, KEY_CHECK, KEY_CHECK_PLAINTEXT, StoreError, aad, open_sealed, record_key,
    seal_with,
};
use crate::config::limits::{MAX_PEM_FILE_BYTES, read_bytes_at_most};

/// How long start-up keeps trying to reach Redis before giving up.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// A connection's record as Redis holds it.
#[derive(Debug, Clone)]
pub struct RecordState {
    /// Incremented by every write.
    pub version: i64,
    /// The record.
    pub record: ConnectionRecord,
    /// The replica that sent the record's refresh token and has not stored the answer yet.
    pub marker: Option<String>,
}

/// Releases the lease only if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// Sets the in-flight marker: only while holding the lease, on the version read, with no marker.
const MARK: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[2] then return -2 end
if redis.call('HEXISTS', KEYS[1], 'f') == 1 then return -2 end
redis.call('HSET', KEYS[1], 'f', ARGV[3])
return redis.call('HINCRBY', KEYS[1], 'v', 1)";

/// Writes (or, with an empty value, only clears the marker) when the marker is the caller's.
const OWNER_WRITE: &str = r"
if redis.call('HGET', KEYS[1], 'f') ~= ARGV[1] then return -1 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'd', ARGV[2]) end
redis.call('HDEL', KEYS[1], 'f')
return redis.call('HINCRBY', KEYS[1], 'v', 1)";

/// Writes the record while holding the lease, on the version read (the marker is kept).
const LEASE_WRITE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[2] then return -2 end
redis.call('HSET', KEYS[1], 'd', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return redis.call('HINCRBY', KEYS[1], 'v', 1)";

/// Writes a run-time subscription (KEYS: subs, revisions, version, changes; ARGV: id, sealed record,
/// expected revision or "" for absent); returns the new revision, or -1 on a conflict.
const SUB_PUT: &str = r"
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[3] == '' then
  if cur then return -1 end
elseif cur ~= ARGV[3] then
  return -1
end
local rev = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local v = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[4], v, ARGV[1])
return rev";

/// Deletes a run-time subscription at the expected revision (ARGV: id, revision); 1 if deleted.
const SUB_DELETE: &str = r"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local v = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[4], v, ARGV[1])
return 1";

/// Writes the record only if it is still at the version read (0: absent); clears any marker.
const PUT_IF_VERSION: &str = r"
if (redis.call('HGET', KEYS[1], 'v') or '0') ~= ARGV[1] then return -2 end
redis.call('HSET', KEYS[1], 'd', ARGV[2])
redis.call('HDEL', KEYS[1], 'f')
redis.call('SADD', KEYS[2], ARGV[3])
return redis.call('HINCRBY', KEYS[1], 'v', 1)";

/// A shared access token as sealed in `token:`.
#[derive(Serialize, Deserialize)]
struct SharedToken {
    value: String,
    fingerprint: String,
    obtained_at_ms: u64,
    fresh_until_ms: u64,
    expires_at_ms: u64,
}

/// Lease outcomes, as counted (`portcullis.store.leases{outcome}`).
const LEASE_OUTCOMES: [&str; 4] = ["acquired", "busy", "lost", "error"];

/// The open Redis store.
pub struct RedisStore {
    conn: ConnectionManager,
    client: redis::Client,
    cipher: LessSafeKey,
    prefix: String,
    timeout: Duration,
    display: String,
    replica: String,
    fences: AtomicU64,
    scripts: Scripts,
    operations: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    leases: [AtomicU64; 4],
}

struct Scripts {
    release: Script,
    mark: Script,
    owner_write: Script,
    lease_write: Script,
    put_if_version: Script,
    sub_put: Script,
    sub_delete: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.display)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// A Redis error as a message: the kind and text, never the URL's user information.
fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        return "no answer in time".into();
    }
    if e.is_connection_refusal() {
        return "connection refused".into();
    }
    e.to_string()
}

impl RedisStore {
    /// Connects (trying for up to 10 s), checks that `key` opens the store's key check (writing it
    /// into an empty store), and returns the store. Every failure names the URL without its user
    /// information.
    pub async fn connect(spec: &RedisSpec, key: &[u8; 32]) -> Result<RedisStore, StoreError> {
        let fail = |detail: String| StoreError::Redis {
            url: spec.display.clone(),
            detail,
        };
        let cipher = UnboundKey::new(&AES_256_GCM, key)
            .map(LessSafeKey::new)
            .map_err(|_| fail("invalid key length".into()))?;
        let client = client(spec).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(spec.timeout))
            .set_response_timeout(Some(spec.timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(5));
        let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
        let conn = loop {
            let attempt = tokio::time::timeout(
                spec.timeout * 4,
                ConnectionManager::new_with_config(client.clone(), config.clone()),
            )
            .await;
            let e = match attempt {
                Ok(Ok(mut c)) => {
                    match tokio::time::timeout(
                        spec.timeout,
                        redis::cmd("PING").query_async::<String>(&mut c),
                    )
                    .await
                    {
                        Ok(Ok(_)) => break c,
                        Ok(Err(e)) => describe(&e),
                        Err(_) => "no answer in time".into(),
                    }
                }
                Ok(Err(e)) => describe(&e),
                Err(_) => "no answer in time".into(),
            };
            // A refused login, a missing permission or a server certificate this replica does not
            // trust will not fix itself: say so at once.
            let permanent = [
                "WRONGPASS",
                "NOAUTH",
                "NOPERM",
                "AuthenticationFailed",
                "invalid username-password",
                "invalid peer certificate",
            ]
            .iter()
            .any(|p| e.contains(p));
            if permanent {
                return Err(fail(format!("refused: {e}")));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(fail(format!("unreachable: {e}")));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let replica = format!("{}.{:08x}", std::process::id(), rand::random::<u32>());
        let store = RedisStore {
            conn,
            client,
            cipher,
            prefix: spec.prefix.clone(),
            timeout: spec.timeout,
            display: spec.display.clone(),
            replica,
            fences: AtomicU64::new(0),
            scripts: Scripts {
                release: Script::new(RELEASE),
                mark: Script::new(MARK),
                owner_write: Script::new(OWNER_WRITE),
                lease_write: Script::new(LEASE_WRITE),
                put_if_version: Script::new(PUT_IF_VERSION),
                sub_put: Script::new(SUB_PUT),
                sub_delete: Script::new(SUB_DELETE),
            },
            operations: Mutex::new(BTreeMap::new()),
            leases: Default::default(),
        };
        store.check_key().await.map_err(fail)?;
        Ok(store)
    }

    async fn check_key(&self) -> Result<(), String> {
        let key = self.key("meta:key_check");
        let identity = aad("meta", KEY_CHECK);
        let sealed =
            seal_with(&self.cipher, &identity, KEY_CHECK_PLAINTEXT).ok_or("encryption failed")?;
        let mut c = self.conn.clone();
        let _: Option<String> = self
            .timed("key_check", c.set_options(&key, sealed, set_nx()))
            .await?;
        let stored: Option<Vec<u8>> = self.timed("key_check", c.get(&key)).await?;
        match stored.and_then(|s| open_sealed(&self.cipher, &identity, &s)) {
            Some(p) if p == KEY_CHECK_PLAINTEXT => Ok(()),
            _ => Err(
                "wrong key: `store.key` does not decrypt this store (nothing was written)".into(),
            ),
        }
    }

    /// The URL without user information.
    pub fn describe(&self) -> &str {
        &self.display
    }

    /// This process's id among the replicas (`<pid>.<random>`), the owner of its markers.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn conn_key(&self, credential: &str, id: &str) -> String {
        self.key(&format!("conn:{credential}:{id}"))
    }

    fn set_key(&self, credential: &str) -> String {
        self.key(&format!("conns:{credential}"))
    }

    fn lease_key(&self, credential: &str, id: &str) -> String {
        self.key(&format!("lease:{credential}:{id}"))
    }

    fn token_key(&self, credential: &str, id: &str) -> String {
        self.key(&format!("token:{credential}:{id}"))
    }

    fn count(&self, op: &'static str, result: &'static str) {
        let mut ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        *ops.entry((op, result)).or_default() += 1;
    }

    fn lease_outcome(&self, outcome: &'static str) {
        if let Some(i) = LEASE_OUTCOMES.iter().position(|o| *o == outcome) {
            self.leases[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `portcullis.store.operations`: (op, result, count).
    pub fn operations(&self) -> Vec<(&'static str, &'static str, u64)> {
        let ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
        ops.iter().map(|((o, r), n)| (*o, *r, *n)).collect()
    }

    /// `portcullis.store.leases`: (outcome, count), outcomes that happened.
    pub fn leases(&self) -> Vec<(&'static str, u64)> {
        LEASE_OUTCOMES
            .iter()
            .zip(&self.leases)
            .map(|(o, n)| (*o, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Runs one Redis call within the timeout, counting it.
    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => {
                self.count(op, "ok");
                Ok(v)
            }
            Ok(Err(e)) => {
                let timeout = e.is_timeout();
                self.count(op, if timeout { "timeout" } else { "error" });
                Err(format!("the shared store failed ({})", describe(&e)))
            }
            Err(_) => {
                self.count(op, "timeout");
                Err(format!(
                    "the shared store did not answer within {:?}",
                    self.timeout
                ))
            }
        }
    }

    fn seal_record(
        &self,
        credential: &str,
        id: &str,
        r: &ConnectionRecord,
    ) -> Result<Vec<u8>, String> {
        let json = serde_json::to_vec(r).map_err(|e| e.to_string())?;
        seal_with(
            &self.cipher,
            &aad("connections", &record_key(credential, id)),
            &json,
        )
        .ok_or_else(|| "encryption failed".into())
    }

    /// One connection's record, version and marker.
    pub async fn get(&self, credential: &str, id: &str) -> Result<Option<RecordState>, String> {
        let mut c = self.conn.clone();
        let (v, d, f): (Option<i64>, Option<Vec<u8>>, Option<String>) = self
            .timed(
                "get",
                redis::cmd("HMGET")
                    .arg(self.conn_key(credential, id))
                    .arg("v")
                    .arg("d")
                    .arg("f")
                    .query_async(&mut c),
            )
            .await?;
        let Some(d) = d else {
            return Ok(None);
        };
        let record = self.open_record(credential, id, &d)?;
        Ok(Some(RecordState {
            version: v.unwrap_or(0),
            record,
            marker: f,
        }))
    }

    fn open_record(
        &self,
        credential: &str,
        id: &str,
        d: &[u8],
    ) -> Result<ConnectionRecord, String> {
        open_sealed(
            &self.cipher,
            &aad("connections", &record_key(credential, id)),
            d,
        )
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or_else(|| {
            format!(
                "the record of connection `{id}` of `{credential}` does not open with `store.key` (altered, or written with another key)"
            )
        })
    }

    /// Every connection of a credential, by id (records that do not open are left out and logged).
    pub async fn list(&self, credential: &str) -> Result<Vec<(String, ConnectionRecord)>, String> {
        let mut c = self.conn.clone();
        let mut ids: Vec<String> = self
            .timed("list", c.smembers(self.set_key(credential)))
            .await?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hget(self.conn_key(credential, id), "d");
        }
        let values: Vec<Option<Vec<u8>>> = self.timed("list", pipe.query_async(&mut c)).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, d) in ids.into_iter().zip(values) {
            let Some(d) = d else { continue };
            match self.open_record(credential, &id, &d) {
                Ok(r) => out.push((id, r)),
                Err(e) => {
                    tracing::error!(store = %self.display, problem = %e, "skipping a connection record")
                }
            }
        }
        Ok(out)
    }

    /// Writes a record whatever its version, clearing any marker (consent: a new grant supersedes
    /// whatever was in flight).
    pub async fn put(
        &self,
        credential: &str,
        id: &str,
        r: &ConnectionRecord,
    ) -> Result<(), String> {
        let sealed = self.seal_record(credential, id, r)?;
        let key = self.conn_key(credential, id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&key, "d", sealed)
            .ignore()
            .hdel(&key, "f")
            .ignore()
            .hincr(&key, "v", 1)
            .ignore()
            .sadd(self.set_key(credential), id)
            .ignore();
        let mut c = self.conn.clone();
        self.timed("put", pipe.query_async::<()>(&mut c)).await
    }

    /// Writes a record only if it is still at `version` (0: absent). False when it changed.
    pub async fn put_if_version(
        &self,
        credential: &str,
        id: &str,
        version: i64,
        r: &ConnectionRecord,
    ) -> Result<bool, String> {
        let sealed = self.seal_record(credential, id, r)?;
        let keys = [self.conn_key(credential, id), self.set_key(credential)];
        let version = version.to_string();
        let args: [&[u8]; 3] = [version.as_bytes(), &sealed, id.as_bytes()];
        Ok(self.cas(&self.scripts.put_if_version, &keys, &args).await? >= 0)
    }

    /// Runs one compare-and-set script: its result (negative: the condition did not hold).
    async fn cas(&self, script: &Script, keys: &[String], args: &[&[u8]]) -> Result<i64, String> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(*a);
        }
        let mut c = self.conn.clone();
        let n: i64 = self.timed("cas", invocation.invoke_async(&mut c)).await?;
        if n < 0 {
            let mut ops = self.operations.lock().unwrap_or_else(|p| p.into_inner());
            *ops.entry(("cas", "conflict")).or_default() += 1;
        }
        Ok(n)
    }

    /// Writes a record while holding the lease `fence`, if still at `version` (a marker is kept).
    pub async fn lease_write(
        &self,
        credential: &str,
        id: &str,
        fence: &str,
        version: i64,
        r: &ConnectionRecord,
    ) -> Result<bool, String> {
        let sealed = self.seal_record(credential, id, r)?;
        let keys = [
            self.conn_key(credential, id),
            self.lease_key(credential, id),
            self.set_key(credential),
        ];
        let version = version.to_string();
        let args: [&[u8]; 4] = [fence.as_bytes(), version.as_bytes(), &sealed, id.as_bytes()];
        Ok(self.cas(&self.scripts.lease_write, &keys, &args).await? >= 0)
    }

    /// Sets this replica's in-flight marker before its refresh token is sent: only while holding
    /// the lease, on the version read and with no marker. Returns the new version, or `None`.
    pub async fn mark(
        &self,
        credential: &str,
        id: &str,
        fence: &str,
        version: i64,
    ) -> Result<Option<i64>, String> {
        let keys = [
            self.conn_key(credential, id),
            self.lease_key(credential, id),
        ];
        let version = version.to_string();
        let args: [&[u8]; 3] = [
            fence.as_bytes(),
            version.as_bytes(),
            self.replica.as_bytes(),
        ];
        let n = self.cas(&self.scripts.mark, &keys, &args).await?;
        Ok((n >= 0).then_some(n))
    }

    /// Stores the answer to this replica's refresh (or, with `None`, only clears its marker):
    /// only while the marker is still this replica's. False when a consent or a deletion took the
    /// connection meanwhile.
    pub async fn owner_write(
        &self,
        credential: &str,
        id: &str,
        r: Option<&ConnectionRecord>,
    ) -> Result<bool, String> {
        let sealed = match r {
            Some(r) => self.seal_record(credential, id, r)?,
            None => Vec::new(),
        };
        let keys = [self.conn_key(credential, id)];
        let args: [&[u8]; 2] = [self.replica.as_bytes(), &sealed];
        Ok(self.cas(&self.scripts.owner_write, &keys, &args).await? >= 0)
    }

    /// Deletes a connection, its shared token and its place in the list. Returns whether it existed.
    pub async fn delete(&self, credential: &str, id: &str) -> Result<bool, String> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.conn_key(credential, id))
            .del(self.token_key(credential, id))
            .ignore()
            .srem(self.set_key(credential), id)
            .ignore();
        let mut c = self.conn.clone();
        let (n,): (i64,) = self.timed("delete", pipe.query_async(&mut c)).await?;
        Ok(n > 0)
    }

    /// Takes the lease of a connection for `ttl`: `Some(fence)` when this replica holds it now,
    /// `None` when another does.
    pub async fn lease(
        &self,
        credential: &str,
        id: &str,
        ttl: Duration,
    ) -> Result<Option<String>, String> {
        let fence = format!(
            "{}:{}",
            self.replica,
            self.fences.fetch_add(1, Ordering::Relaxed)
        );
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(ttl.as_millis().max(1) as u64));
        let mut c = self.conn.clone();
        let result: Result<Option<String>, String> = self
            .timed(
                "lease",
                c.set_options(self.lease_key(credential, id), &fence, opts),
            )
            .await;
        match result {
            Ok(Some(_)) => {
                self.lease_outcome("acquired");
                Ok(Some(fence))
            }
            Ok(None) => {
                self.lease_outcome("busy");
                Ok(None)
            }
            Err(e) => {
                self.lease_outcome("error");
                Err(e)
            }
        }
    }

    /// Releases the lease if it is still `fence`'s (after its TTL another replica may hold it).
    pub async fn release(&self, credential: &str, id: &str, fence: &str) {
        let mut c = self.conn.clone();
        let n: Result<i64, String> = self
            .timed(
                "release",
                self.scripts
                    .release
                    .key(self.lease_key(credential, id))
                    .arg(fence)
                    .invoke_async(&mut c),
            )
            .await;
        if n == Ok(0) {
            self.lease_outcome("lost");
            tracing::warn!(credential = %credential, connection = %id, "the lease ran out before the token was obtained; another replica may have taken it");
        }
    }

    /// The shared access token of a connection, if any.
    pub async fn token(&self, credential: &str, id: &str) -> Result<Option<Token>, String> {
        let mut c = self.conn.clone();
        let sealed: Option<Vec<u8>> = self
            .timed("token_get", c.get(self.token_key(credential, id)))
            .await?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let opened = open_sealed(
            &self.cipher,
            &aad("tokens", &record_key(credential, id)),
            &sealed,
        )
        .and_then(|p| serde_json::from_slice::<SharedToken>(&p).ok());
        let mut fingerprint = [0u8; 32];
        let Some(t) =
            opened.filter(|t| hex::decode_to_slice(&t.fingerprint, &mut fingerprint).is_ok())
        else {
            // Altered, moved from another key or sealed with another key: never used; the next
            // token obtained replaces it.
            tracing::error!(store = %self.display, credential = %credential, "a shared token does not open with `store.key`; ignoring it");
            return Ok(None);
        };
        Ok(Some(Token {
            value: t.value,
            fingerprint,
            obtained_at: from_millis(t.obtained_at_ms),
            fresh_until: from_millis(t.fresh_until_ms),
            expires_at: from_millis(t.expires_at_ms),
        }))
    }

    /// Shares an access token until it expires.
    pub async fn put_token(&self, credential: &str, id: &str, t: &Token) -> Result<(), String> {
        let shared = SharedToken {
            value: t.value.clone(),
            fingerprint: hex::encode(t.fingerprint),
            obtained_at_ms: millis(t.obtained_at),
            fresh_until_ms: millis(t.fresh_until),
            expires_at_ms: millis(t.expires_at),
        };
        let json = serde_json::to_vec(&shared).map_err(|e| e.to_string())?;
        let sealed = seal_with(
            &self.cipher,
            &aad("tokens", &record_key(credential, id)),
            &json,
        )
        .ok_or("encryption failed")?;
        let ttl = t
            .expires_at
            .duration_since(t.obtained_at)
            .unwrap_or(Duration::ZERO)
            .as_millis()
            .max(1) as u64;
        let mut c = self.conn.clone();
        self.timed(
            "token_put",
            c.pset_ex::<_, _, ()>(self.token_key(credential, id), sealed, ttl),
        )
        .await
    }

    /// Records a DPoP proof's replay key (a SHA-256 digest, no secret) for `ttl` unless some
    /// replica already did: `true` on its first use in the fleet.
    pub async fn first_use(&self, replay_key: &[u8; 32], ttl: Duration) -> Result<bool, String> {
        let opts = set_nx().with_expiration(redis::SetExpiry::PX(ttl.as_millis().max(1) as u64));
        let mut c = self.conn.clone();
        let set: Option<String> = self
            .timed(
                "dpop_replay",
                c.set_options(
                    self.key(&format!("dpop:{}", hex::encode(replay_key))),
                    1,
                    opts,
                ),
            )
            .await?;
        Ok(set.is_some())
    }

    /// Keeps a pending consent, sealed, under the digest of its `state` for `ttl`.
    pub async fn put_consent(
        &self,
        state_digest: &str,
        plaintext: &[u8],
        ttl: Duration,
    ) -> Result<(), String> {
        let sealed = seal_with(&self.cipher, &aad("consent", state_digest), plaintext)
            .ok_or("encryption failed")?;
        let mut c = self.conn.clone();
        self.timed(
            "consent_put",
            c.pset_ex::<_, _, ()>(
                self.key(&format!("consent:{state_digest}")),
                sealed,
                ttl.as_millis().max(1) as u64,
            ),
        )
        .await
    }

    /// Takes a pending consent (single use: `GETDEL`).
    pub async fn take_consent(&self, state_digest: &str) -> Result<Option<Vec<u8>>, String> {
        let mut c = self.conn.clone();
        let sealed: Option<Vec<u8>> = self
            .timed(
                "consent_take",
                c.get_del(self.key(&format!("consent:{state_digest}"))),
            )
            .await?;
        Ok(sealed.and_then(|s| open_sealed(&self.cipher, &aad("consent", state_digest), &s)))
    }

    fn channel(&self) -> String {
        self.key("events")
    }

    fn subs_keys(&self) -> [String; 4] {
        [
            self.key("subs"),
            self.key("subs:rev"),
            self.key("subs:version"),
            self.key("subs:changes"),
        ]
    }

    fn open_subscription(&self, id: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        open_sealed(&self.cipher, &aad("subscriptions", id), sealed)
    }

    /// Every run-time subscription (opened JSON, revision) and the change version, read in one
    /// transaction. A record that does not open under the key is skipped and logged (refused,
    /// never trusted).
    pub async fn subscriptions(&self) -> Result<(Vec<(String, Vec<u8>, u64)>, u64), String> {
        let [subs, revs, version, _] = self.subs_keys();
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().hgetall(&subs).hgetall(&revs).get(&version);
        type Rows = (HashMap<String, Vec<u8>>, HashMap<String, u64>, Option<u64>);
        let (rows, revs, version): Rows = self
            .timed("subscriptions", pipe.query_async(&mut c))
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, sealed) in rows {
            match self.open_subscription(&id, &sealed) {
                Some(json) => {
                    let rev = revs.get(&id).copied().unwrap_or(0);
                    out.push((id, json, rev));
                }
                None => {
                    tracing::warn!(subscription = %id, "a run-time subscription in the shared store does not open under `store.key`; ignored")
                }
            }
        }
        Ok((out, version.unwrap_or(0)))
    }

    /// The run-time subscriptions changed after version `since`: each id with its record and
    /// revision (`None`: deleted), and the version they are current at. `Ok(None)` when nothing
    /// changed (one `GET`).
    #[allow(clippy::type_complexity)]
    pub async fn subscription_changes(
        &self,
        since: u64,
    ) -> Result<Option<(Vec<(String, Option<(Vec<u8>, u64)>)>, u64)>, String> {
        let [subs, revs, version, changes] = self.subs_keys();
        let mut c = self.conn.clone();
        let now: Option<u64> = self.timed("subscriptions_version", c.get(&version)).await?;
        let now = now.unwrap_or(0);
        if now <= since {
            return Ok(None);
        }
        let ids: Vec<(String, u64)> = self
            .timed(
                "subscriptions_changes",
                c.zrangebyscore_withscores(&changes, format!("({since}"), "+inf"),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Some((Vec::new(), now)));
        }
        let names: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HMGET")
            .arg(&subs)
            .arg(&names)
            .cmd("HMGET")
            .arg(&revs)
            .arg(&names);
        let (rows, rs): (Vec<Option<Vec<u8>>>, Vec<Option<u64>>) = self
            .timed("subscriptions_changes", pipe.query_async(&mut c))
            .await?;
        let upto = ids.iter().map(|(_, v)| *v).max().unwrap_or(now).max(since);
        let mut out = Vec::with_capacity(ids.len());
        for ((id, _), (row, rev)) in ids.into_iter().zip(rows.into_iter().zip(rs)) {
            let value = match (row, rev) {
                (Some(sealed), Some(rev)) => match self.open_subscription(&id, &sealed) {
                    Some(json) => Some((json, rev)),
                    None => {
                        tracing::warn!(subscription = %id, "a run-time subscription in the shared store does not open under `store.key`; refused");
                        None
                    }
                },
                _ => None,
            };
            out.push((id, value));
        }
        Ok(Some((out, upto)))
    }

    /// Writes a run-time subscription if its revision is `expected` (`None`: only if absent), bumps
    /// the change version and records the id as changed at it, in one script. `Ok(None)` on a
    /// conflict, else the new revision.
    pub async fn put_subscription(
        &self,
        id: &str,
        json: &[u8],
        expected: Option<u64>,
    ) -> Result<Option<u64>, String> {
        let sealed =
            seal_with(&self.cipher, &aad("subscriptions", id), json).ok_or("encryption failed")?;
        let [subs, revs, version, changes] = self.subs_keys();
        let mut c = self.conn.clone();
        let mut inv = self.scripts.sub_put.prepare_invoke();
        inv.key(&subs)
            .key(&revs)
            .key(&version)
            .key(&changes)
            .arg(id)
            .arg(sealed)
            .arg(expected.map(|r| r.to_string()).unwrap_or_default());
        let rev: i64 = self
            .timed("subscription_put", inv.invoke_async(&mut c))
            .await?;
        Ok(u64::try_from(rev).ok())
    }

    /// Deletes a run-time subscription if its revision is `expected`; whether it did.
    pub async fn delete_subscription(&self, id: &str, expected: u64) -> Result<bool, String> {
        let [subs, revs, version, changes] = self.subs_keys();
        let mut c = self.conn.clone();
        let mut inv = self.scripts.sub_delete.prepare_invoke();
        inv.key(&subs)
            .key(&revs)
            .key(&version)
            .key(&changes)
            .arg(id)
            .arg(expected.to_string());
        let done: i64 = self
            .timed("subscription_delete", inv.invoke_async(&mut c))
            .await?;
        Ok(done == 1)
    }

    /// Tells the other replicas to drop their local token of a connection (after a consent or a
    /// deletion). Best effort: a replica that misses it keeps its token until it is refreshed.
    pub async fn publish_clear(&self, credential: &str, id: &str) {
        let msg = format!("clear {} {credential} {id}", self.replica);
        let mut c = self.conn.clone();
        if let Err(e) = self
            .timed("publish", c.publish::<_, _, i64>(self.channel(), msg))
            .await
        {
            tracing::warn!(credential = %credential, connection = %id, problem = %e, "could not tell the other replicas to drop their token");
        }
    }

    /// Listens for other replicas' `clear` events, calling `on_clear(credential, id)` for each,
    /// reconnecting with backoff, until `on_clear` returns false.
    pub async fn listen(&self, on_clear: impl Fn(&str, &str) -> bool) {
        let mut delay = Duration::from_millis(500);
        loop {
            let session = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(self.timeout * 4, session).await {
                Ok(Ok(pubsub)) => {
                    delay = Duration::from_millis(500);
                    use futures::StreamExt;
                    let mut messages = pubsub.into_on_message();
                    while let Some(m) = messages.next().await {
                        let Ok(text) = m.get_payload::<String>() else {
                            continue;
                        };
                        let mut parts = text.split(' ');
                        if let (Some("clear"), Some(from), Some(credential), Some(id)) =
                            (parts.next(), parts.next(), parts.next(), parts.next())
                            && from != self.replica
                            && !on_clear(credential, id)
                        {
                            return;
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(store = %self.display, problem = %describe(&e), "event subscription failed; retrying")
                }
                Err(_) => {
                    tracing::debug!(store = %self.display, "event subscription timed out; retrying")
                }
            }
            if !on_clear("", "") {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
}

fn set_nx() -> redis::SetOptions {
    redis::SetOptions::default().conditional_set(redis::ExistenceCheck::NX)
}

fn client(spec: &RedisSpec) -> Result<redis::Client, String> {
    let info = spec
        .url
        .expose()
        .into_connection_info()
        .map_err(|e| format!("not a usable Redis URL ({:?})", e.kind()))?;
    let mut settings = info.redis_settings().clone();
    if let Some(u) = &spec.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = &spec.password {
        settings = settings.set_password(p.expose());
    }
    let info = info.set_redis_settings(settings);
    if !spec.display.starts_with("rediss:") {
        return redis::Client::open(info).map_err(|e| describe(&e));
    }
    let read = |p: &std::path::Path| -> Result<Vec<u8>, String> {
        read_bytes_at_most(p, MAX_PEM_FILE_BYTES)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .ok_or_else(|| format!("{}: larger than 1 MiB", p.display()))
    };
    let root_cert = spec.ca_file.as_deref().map(read).transpose()?;
    let client_tls = match &spec.client_cert {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        None => None,
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| describe(&e))
}
