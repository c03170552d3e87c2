//! Run-time subscriptions: made, suspended, regenerated and deleted through the admin API, like
//! API Management's subscriptions, and persisted in the store (the embedded file, or Redis shared
//! by every replica). Only SHA-256 hashes of the keys are kept; a generated key is shown once, in
//! the answer that made it.
//!
//! Every replica keeps the subscriptions in memory (a map by id, the source of truth for this
//! process) and publishes them to checks as an immutable [`KeyTable`], rebuilt after each batch of
//! changes. With Redis, a replica polls the store's change version every [`POLL`]: one `GET` when
//! nothing changed; else it reads only the ids changed since the version it has. Polling rather
//! than pub/sub alone: a message published while a replica was disconnected is lost for good,
//! while a version is read again on the next poll, so a replica can never miss a change (a
//! suspended or regenerated key refused late is a security fault).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::subscription::keys_file::valid_id;
use super::subscription::{
    KeyHash, KeyTable, KeyTableBuilder, State, SubscriptionStore, format_hash, hash_key, parse_hash,
};
use crate::credentials::Backend;
use crate::credentials::spec::{StoreLocation, StoreSpec};
use crate::credentials::store::redis::RedisStore;

/// How often a replica on Redis looks for other replicas' changes.
pub const POLL: Duration = Duration::from_millis(200);

/// A run-time subscription's state. `Cancelled` is final (APIM: a cancelled subscription cannot be
/// activated again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubState {
    /// Grants access.
    Active,
    /// Refused until activated again.
    Suspended,
    /// Refused for good.
    Cancelled,
}

impl SubState {
    /// As written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SubState::Active => "active",
            SubState::Suspended => "suspended",
            SubState::Cancelled => "cancelled",
        }
    }
}

/// What is persisted for one run-time subscription: hashes, never keys.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    state: SubState,
    scope: String,
    primary: String,
    secondary: String,
    created_at: u64,
    updated_at: u64,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("state", &self.state)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// One subscription in memory.
#[derive(Debug, Clone)]
struct Sub {
    state: SubState,
    scope: String,
    primary: KeyHash,
    secondary: KeyHash,
    created_at: u64,
    updated_at: u64,
    /// The store's revision of the record (compare-and-set across replicas).
    rev: u64,
}

impl Sub {
    fn record(&self) -> Record {
        Record {
            state: self.state,
            scope: self.scope.clone(),
            primary: format_hash(&self.primary),
            secondary: format_hash(&self.secondary),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    fn from_json(json: &[u8], rev: u64) -> Option<Sub> {
        let r: Record = serde_json::from_slice(json).ok()?;
        Some(Sub {
            state: r.state,
            primary: parse_hash(&r.primary)?,
            secondary: parse_hash(&r.secondary)?,
            scope: r.scope,
            created_at: r.created_at,
            updated_at: r.updated_at,
            rev,
        })
    }
}

/// A subscription as the admin API shows it: never a key or a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct View {
    /// The id.
    pub id: String,
    /// `active`, `suspended` or `cancelled`.
    pub state: &'static str,
    /// `all`, `product:NAME` or `api:NAME`.
    pub scope: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
}

/// A generated key, shown once. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct NewKey(String);

impl NewKey {
    fn generate() -> NewKey {
        // 256 bits from the operating system's generator (rand's thread RNG reseeds from it).
        NewKey(hex::encode(rand::random::<[u8; 32]>()))
    }

    /// The key, for the one answer that shows it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn hash(&self) -> KeyHash {
        hash_key(&self.0)
    }
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewKey(<redacted>)")
    }
}

/// A lifecycle action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Suspended -> active.
    Activate,
    /// Active -> suspended.
    Suspend,
    /// Active or suspended -> cancelled (final).
    Cancel,
}

impl Action {
    /// The action's name in the API path.
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "activate" => Some(Action::Activate),
            "suspend" => Some(Action::Suspend),
            "cancel" => Some(Action::Cancel),
            _ => None,
        }
    }

    /// As recorded in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Activate => "activate",
            Action::Suspend => "suspend",
            Action::Cancel => "cancel",
        }
    }

    fn next(self, from: SubState) -> Option<SubState> {
        match (self, from) {
            (Action::Activate, SubState::Suspended) => Some(SubState::Active),
            (Action::Suspend, SubState::Active) => Some(SubState::Suspended),
            (Action::Cancel, SubState::Active | SubState::Suspended) => Some(SubState::Cancelled),
            _ => None,
        }
    }
}

/// Which key of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The primary key.
    Primary,
    /// The secondary key.
    Secondary,
}

impl Which {
    /// `primary` or `secondary`.
    pub fn parse(s: &str) -> Option<Which> {
        match s {
            "primary" => Some(Which::Primary),
            "secondary" => Some(Which::Secondary),
            _ => None,
        }
    }

    /// As written in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Which::Primary => "primary",
            Which::Secondary => "secondary",
        }
    }
}

/// Why an admin call on subscriptions failed. Messages name the id, never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// No store is configured: run-time subscriptions would not survive a restart.
    #[error("run-time subscriptions need a `store` (`store.path` or `store.redis`)")]
    NoStore,
    /// No run-time subscription has this id.
    #[error("no run-time subscription `{0}`")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The id exists, the state does not allow the action, or another replica changed it first.
    #[error("{0}")]
    Conflict(String),
    /// The store did not take the change.
    #[error("the store failed: {0}")]
    Store(String),
}

impl SubscriptionError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            SubscriptionError::NoStore | SubscriptionError::NotFound(_) => 404,
            SubscriptionError::BadRequest(_) => 400,
            SubscriptionError::Conflict(_) => 409,
            SubscriptionError::Store(_) => 503,
        }
    }
}

/// The run-time subscriptions of this process, and the table checks read.
#[derive(Debug, Default)]
pub struct RuntimeSubscriptions {
    table: Arc<ArcSwap<KeyTable>>,
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    subs: Mutex<BTreeMap<String, Sub>>,
    backend: Mutex<Option<Backend>>,
    /// Serialises this process's writes (the embedded file's single writer; fewer conflicts on
    /// Redis).
    writes: tokio::sync::Mutex<()>,
    /// Bumped on every change to `subs`; `built` is the change count the table was built from.
    changes: AtomicU64,
    built: AtomicU64,
    rebuild: Mutex<()>,
    /// The Redis change version this process has applied.
    version: AtomicU64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the value whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RuntimeSubscriptions {
    /// The table checks read (shared by every policy set).
    pub fn table(&self) -> Arc<ArcSwap<KeyTable>> {
        self.table.clone()
    }

    /// Whether a store holds them.
    pub fn is_stored(&self) -> bool {
        locked(&self.inner.backend).is_some()
    }

    /// Number of run-time subscriptions.
    pub fn len(&self) -> usize {
        locked(&self.inner.subs).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads every run-time subscription from `backend` and, with Redis, follows other replicas'
    /// changes for as long as this value lives.
    pub async fn start(&self, backend: Backend) -> Result<usize, String> {
        let (rows, version) = backend.subscriptions().await?;
        {
            let mut subs = locked(&self.inner.subs);
            subs.clear();
            for (id, json, rev) in rows {
                match Sub::from_json(&json, rev) {
                    Some(s) if valid_id(&id) => {
                        subs.insert(id, s);
                    }
                    _ => {
                        tracing::warn!(subscription = %id, "a stored run-time subscription is malformed; ignored")
                    }
                }
            }
        }
        self.inner.version.store(version, Ordering::Relaxed);
        self.inner.changes.fetch_add(1, Ordering::Relaxed);
        let follow = backend.redis().is_some();
        *locked(&self.inner.backend) = Some(backend);
        self.publish().await;
        if follow {
            self.follow();
        }
        Ok(self.len())
    }

    /// For `check` and `validate`: reads the run-time subscriptions once from `store`, changing
    /// nothing in it (a file that does not exist is not created). The embedded file cannot be read
    /// while a running service holds it: then the error says so.
    pub async fn read_once(&self, store: &StoreSpec) -> Result<usize, String> {
        let backend = match &store.location {
            StoreLocation::File(path) => {
                if !path.exists() {
                    return Ok(0);
                }
                match crate::credentials::Store::open(path, &store.key) {
                    Ok(s) => Backend::File(Arc::new(s)),
                    Err(crate::credentials::StoreError::Locked { .. }) => {
                        return Err(format!(
                            "{} is in use by the running service: ask its admin API (GET /admin/subscriptions/ID)",
                            path.display()
                        ));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            StoreLocation::Redis(spec) => Backend::Redis(Arc::new(
                RedisStore::connect(spec, &store.key)
                    .await
                    .map_err(|e| e.to_string())?,
            )),
        };
        let (rows, _) = backend.subscriptions().await?;
        {
            let mut subs = locked(&self.inner.subs);
            for (id, json, rev) in rows {
                if let Some(s) = Sub::from_json(&json, rev).filter(|_| valid_id(&id)) {
                    subs.insert(id, s);
                }
            }
        }
        self.inner.changes.fetch_add(1, Ordering::Relaxed);
        self.publish().await;
        Ok(self.len())
    }

    /// Polls the shared store for other replicas' changes while `self` lives.
    fn follow(&self) {
        let weak = Arc::downgrade(&self.inner);
        let table = Arc::downgrade(&self.table);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(inner), Some(table)) = (weak.upgrade(), table.upgrade()) else {
                    return;
                };
                let me = RuntimeSubscriptions { table, inner };
                if let Err(e) = me.poll().await {
                    tracing::debug!(problem = %e, "run-time subscriptions: polling the shared store failed; retrying");
                }
            }
        });
    }

    /// Applies the changes made since the version this process has (Redis); whether any.
    pub async fn poll(&self) -> Result<bool, String> {
        let Some(Backend::Redis(redis)) = locked(&self.inner.backend).clone() else {
            return Ok(false);
        };
        let since = self.inner.version.load(Ordering::Relaxed);
        let Some((changes, upto)) = redis.subscription_changes(since).await? else {
            return Ok(false);
        };
        {
            let mut subs = locked(&self.inner.subs);
            for (id, value) in changes {
                match value.and_then(|(json, rev)| Sub::from_json(&json, rev)) {
                    Some(s) => {
                        subs.insert(id, s);
                    }
                    None => {
                        subs.remove(&id);
                    }
                }
            }
        }
        self.inner.version.fetch_max(upto, Ordering::Relaxed);
        self.inner.changes.fetch_add(1, Ordering::Relaxed);
        self.publish().await;
        Ok(true)
    }

    /// Rebuilds the table checks read, unless a rebuild since the last change already did. Runs
    /// on a blocking thread: 100,000 subscriptions take milliseconds.
    async fn publish(&self) {
        let inner = self.inner.clone();
        let table = self.table.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let old = {
                let _one = locked(&inner.rebuild);
                let wanted = inner.changes.load(Ordering::Acquire);
                if inner.built.load(Ordering::Acquire) >= wanted {
                    return;
                }
                let built = {
                    let subs = locked(&inner.subs);
                    let mut b = KeyTableBuilder::with_capacity(subs.len(), subs.len() * 2);
                    for (id, s) in subs.iter() {
                        let state = if s.state == SubState::Active {
                            State::Active
                        } else {
                            State::Inactive
                        };
                        b.push(id, state, &s.scope, &[s.primary, s.secondary]);
                    }
                    b.finish().0
                };
                let old = table.swap(Arc::new(built));
                inner.built.store(wanted, Ordering::Release);
                old
            };
            // Outside the lock: the next rebuild need not wait for this one's readers.
            super::subscription::retire(old);
        })
        .await;
    }

    fn backend(&self) -> Result<Backend, SubscriptionError> {
        locked(&self.inner.backend)
            .clone()
            .ok_or(SubscriptionError::NoStore)
    }

    fn view(id: &str, s: &Sub) -> View {
        View {
            id: id.to_string(),
            state: s.state.as_str(),
            scope: s.scope.clone(),
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }

    /// One run-time subscription.
    pub fn get(&self, id: &str) -> Option<View> {
        locked(&self.inner.subs).get(id).map(|s| Self::view(id, s))
    }

    /// Up to `limit` run-time subscriptions after id `after`, by id.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Vec<View> {
        let subs = locked(&self.inner.subs);
        let range = match after {
            Some(a) => {
                subs.range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            }
            None => subs.range::<str, _>(..),
        };
        range.take(limit).map(|(id, s)| Self::view(id, s)).collect()
    }

    /// Writes `sub` for `id` at the revision it was read with (`None`: new), then publishes it.
    async fn write(
        &self,
        backend: &Backend,
        id: &str,
        mut sub: Sub,
        expected: Option<u64>,
    ) -> Result<(), SubscriptionError> {
        let json = serde_json::to_vec(&sub.record())
            .map_err(|e| SubscriptionError::Store(e.to_string()))?;
        match backend
            .put_subscription(id, json, expected)
            .await
            .map_err(SubscriptionError::Store)?
        {
            Some(rev) => sub.rev = rev,
            None if expected.is_none() => {
                return Err(SubscriptionError::Conflict(format!(
                    "a subscription `{id}` exists"
                )));
            }
            None => {
                return Err(SubscriptionError::Conflict(format!(
                    "subscription `{id}` was changed by another replica meanwhile; read it and try again"
                )));
            }
        }
        locked(&self.inner.subs).insert(id.to_string(), sub);
        self.inner.changes.fetch_add(1, Ordering::Relaxed);
        self.publish().await;
        Ok(())
    }

    /// Creates a subscription; its two keys are in the answer and nowhere else.
    pub async fn create(
        &self,
        id: &str,
        scope: &str,
        state: SubState,
        configured: &SubscriptionStore,
    ) -> Result<(View, NewKey, NewKey), SubscriptionError> {
        if !valid_id(id) {
            return Err(SubscriptionError::BadRequest(
                "an id is 1 to 128 of A-Z a-z 0-9 . _ - ~ : @".into(),
            ));
        }
        configured
            .check_scope(scope)
            .map_err(|e| SubscriptionError::BadRequest(format!("scope `{scope}`: {e}")))?;
        if state == SubState::Cancelled {
            return Err(SubscriptionError::BadRequest(
                "a subscription is created active or suspended".into(),
            ));
        }
        let backend = self.backend()?;
        let _w = self.inner.writes.lock().await;
        if configured.is_configured(id) {
            return Err(SubscriptionError::Conflict(format!(
                "`{id}` is a configured subscription (subscriptions.keys or keys_file)"
            )));
        }
        if locked(&self.inner.subs).contains_key(id) {
            return Err(SubscriptionError::Conflict(format!(
                "a subscription `{id}` exists"
            )));
        }
        let (primary, secondary) = (NewKey::generate(), NewKey::generate());
        let t = now();
        let sub = Sub {
            state,
            scope: scope.to_string(),
            primary: primary.hash(),
            secondary: secondary.hash(),
            created_at: t,
            updated_at: t,
            rev: 0,
        };
        let view = Self::view(id, &sub);
        self.write(&backend, id, sub, None).await?;
        Ok((view, primary, secondary))
    }

    fn current(&self, id: &str) -> Result<Sub, SubscriptionError> {
        if !valid_id(id) {
            return Err(SubscriptionError::NotFound(
                "(an id is 1 to 128 of A-Z a-z 0-9 . _ - ~ : @)".into(),
            ));
        }
        locked(&self.inner.subs)
            .get(id)
            .cloned()
            .ok_or_else(|| SubscriptionError::NotFound(id.to_string()))
    }

    /// Activates, suspends or cancels.
    pub async fn transition(&self, id: &str, action: Action) -> Result<View, SubscriptionError> {
        let backend = self.backend()?;
        let _w = self.inner.writes.lock().await;
        let mut sub = self.current(id)?;
        let Some(next) = action.next(sub.state) else {
            return Err(SubscriptionError::Conflict(format!(
                "subscription `{id}` is {}: it cannot be {}",
                sub.state.as_str(),
                match action {
                    Action::Activate => "activated",
                    Action::Suspend => "suspended",
                    Action::Cancel => "cancelled",
                }
            )));
        };
        let expected = sub.rev;
        sub.state = next;
        sub.updated_at = now();
        let view = Self::view(id, &sub);
        self.write(&backend, id, sub, Some(expected)).await?;
        Ok(view)
    }

    /// Replaces one key; the new key is in the answer and nowhere else. The old one is refused
    /// from the moment this returns (on this replica; on the others within [`POLL`]).
    pub async fn regenerate(
        &self,
        id: &str,
        which: Which,
    ) -> Result<(View, NewKey), SubscriptionError> {
        let backend = self.backend()?;
        let _w = self.inner.writes.lock().await;
        let mut sub = self.current(id)?;
        if sub.state == SubState::Cancelled {
            return Err(SubscriptionError::Conflict(format!(
                "subscription `{id}` is cancelled"
            )));
        }
        let key = NewKey::generate();
        match which {
            Which::Primary => sub.primary = key.hash(),
            Which::Secondary => sub.secondary = key.hash(),
        }
        let expected = sub.rev;
        sub.updated_at = now();
        let view = Self::view(id, &sub);
        self.write(&backend, id, sub, Some(expected)).await?;
        Ok((view, key))
    }

    /// Deletes a subscription.
    pub async fn delete(&self, id: &str) -> Result<(), SubscriptionError> {
        let backend = self.backend()?;
        let _w = self.inner.writes.lock().await;
        let sub = self.current(id)?;
        let done = backend
            .delete_subscription(id, sub.rev)
            .await
            .map_err(SubscriptionError::Store)?;
        if !done && backend.redis().is_some() {
            return Err(SubscriptionError::Conflict(format!(
                "subscription `{id}` was changed by another replica meanwhile; read it and try again"
            )));
        }
        locked(&self.inner.subs).remove(id);
        self.inner.changes.fetch_add(1, Ordering::Relaxed);
        self.publish().await;
        Ok(())
    }
}
