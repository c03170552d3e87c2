//! The credentials of a process, across reloads: what is published, the store, the connection
//! slots and counters, start-up, and upgrading a store written before connection ids were
//! namespaced.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use super::backend::Backend;
use super::cache::{Counters, Slot};
use super::clock::{Clock, SystemClock};
use super::consent;
use super::credential::{Credential, DEFAULT_CONNECTION};
use super::spec;
use super::spec::StoreLocation;
use super::store::redis::RedisStore;
use super::store::{ConnectionRecord, Store, StoreError};
use super::{BackendCredentialPolicy, ConnectionRef, CredentialSet, SetInner};
use crate::config::{ConfigErrors, Source};

/// How long start-up waits for the credentials the config uses (each fetch is also bounded by its
/// credential's `timeout`; a slower one finishes in the background).
const PREFETCH_WAIT: Duration = Duration::from_secs(5);
/// Default of `limits.max_concurrent_fetches`.
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 64;

/// Credentials and their token caches; lives across reloads.
#[derive(Debug, Clone)]
pub struct Registry {
    pub(super) shared: Arc<Shared>,
}

/// What every credential of every config version shares.
pub(crate) struct Shared {
    pub(crate) clock: Arc<dyn Clock>,
    pub(super) http: OnceLock<Result<reqwest::Client, String>>,
    pub(super) store: OnceLock<Backend>,
    /// Slots by credential name, then connection id.
    pub(super) slots: RwLock<HashMap<String, HashMap<String, Arc<Slot>>>>,
    pub(super) counters: Mutex<HashMap<String, Arc<Counters>>>,
    pub(super) by_fingerprint: Mutex<HashMap<[u8; 32], Weak<Credential>>>,
    /// The credentials of the config in force (published after it compiled without error).
    pub(super) current: Mutex<Arc<SetInner>>,
    pub(crate) consents: Mutex<HashMap<String, consent::PendingConsent>>,
    /// Token endpoint requests in flight, capped by `limits.max_concurrent_fetches`, with the cap
    /// it was made for. A reload that changes the cap installs a new semaphore; requests holding a
    /// permit of the old one finish on it.
    pub(super) fetches: Mutex<(usize, Arc<tokio::sync::Semaphore>)>,
    /// Connection records with a rotated refresh token that the provider issued (so the stored
    /// one is spent) but the store could not write. Kept in memory and written before the
    /// connection's next refresh, which never spends the stale stored token.
    pub(super) unstored: Mutex<HashMap<(String, String), ConnectionRecord>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("clock", &self.clock)
            .field("store", &self.store.get())
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::with_clock(Arc::new(SystemClock))
    }
}

pub(super) fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every value behind these locks is replaced whole; a panic elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn store(&self) -> Option<&Backend> {
        self.store.get()
    }

    /// The slot of a connection, created on first use.
    pub(crate) fn slot(&self, credential: &str, connection: &str) -> Arc<Slot> {
        if let Some(s) = self.existing_slot(credential, connection) {
            return s;
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(credential.to_string())
            .or_default()
            .entry(connection.to_string())
            .or_default()
            .clone()
    }

    pub(crate) fn existing_slot(&self, credential: &str, connection: &str) -> Option<Arc<Slot>> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots
            .get(credential)
            .and_then(|c| c.get(connection))
            .cloned()
    }

    pub(super) fn counters(&self, credential: &str) -> Arc<Counters> {
        locked(&self.counters)
            .entry(credential.to_string())
            .or_default()
            .clone()
    }

    /// Writes a connection record durably, off the async threads.
    pub(crate) async fn persist(
        &self,
        credential: &str,
        connection: &str,
        record: ConnectionRecord,
    ) -> Result<(), String> {
        let store = self
            .store()
            .ok_or_else(|| "the store is not open".to_string())?;
        store.put(credential, connection, record).await
    }

    /// Remembers a record the store could not write (see `unstored`).
    pub(crate) fn keep_unstored(
        &self,
        credential: &str,
        connection: &str,
        record: ConnectionRecord,
    ) {
        locked(&self.unstored).insert((credential.to_string(), connection.to_string()), record);
    }

    /// Takes the record the store could not write, if any.
    pub(crate) fn take_unstored(
        &self,
        credential: &str,
        connection: &str,
    ) -> Option<ConnectionRecord> {
        locked(&self.unstored).remove(&(credential.to_string(), connection.to_string()))
    }

    pub(super) fn current(&self) -> Arc<SetInner> {
        locked(&self.current).clone()
    }

    /// A permit for one request to a token endpoint, or `None` when `limits.max_concurrent_fetches`
    /// are in flight (the caller fails fast rather than queueing behind a slow provider).
    pub(crate) fn try_fetch_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = locked(&self.fetches).1.clone();
        sem.try_acquire_owned().ok()
    }

    /// A permit for a background request, waiting for one (nobody waits on a background refresh).
    pub(crate) async fn fetch_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = locked(&self.fetches).1.clone();
        // The semaphore is never closed: `None` cannot happen, and would only mean "no cap".
        sem.acquire_owned().await.ok()
    }
}

impl Registry {
    /// A registry whose token lifetimes are judged by `clock` (tests inject a [`ManualClock`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Registry {
        Registry {
            shared: Arc::new(Shared {
                clock,
                http: OnceLock::new(),
                store: OnceLock::new(),
                slots: RwLock::new(HashMap::new()),
                counters: Mutex::new(HashMap::new()),
                by_fingerprint: Mutex::new(HashMap::new()),
                current: Mutex::new(Arc::new(SetInner::default())),
                consents: Mutex::new(HashMap::new()),
                unstored: Mutex::new(HashMap::new()),
                fetches: Mutex::new((
                    DEFAULT_MAX_CONCURRENT_FETCHES,
                    Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_CONCURRENT_FETCHES)),
                )),
            }),
        }
    }

    /// Makes `set` the credentials in force (called once its config compiled without error).
    pub fn publish(&self, set: &CredentialSet) {
        if let (Some(open), Some(spec)) = (self.shared.store(), &set.inner.store)
            && open.describe() != spec.location.describe()
        {
            tracing::warn!(store = %spec.location.describe(), open = %open.describe(), "`store` changed: it applies after a restart");
        }
        {
            let mut slots = self.shared.slots.write().unwrap_or_else(|p| p.into_inner());
            slots.retain(|name, _| set.inner.by_name.contains_key(name));
        }
        {
            let mut fetches = locked(&self.shared.fetches);
            if fetches.0 != set.inner.max_fetches {
                *fetches = (
                    set.inner.max_fetches,
                    Arc::new(tokio::sync::Semaphore::new(set.inner.max_fetches)),
                );
            }
        }
        *locked(&self.shared.current) = set.inner.clone();
    }

    /// Opens the store (when configured) and obtains the tokens of `used` (the backend credentials
    /// the APIs use), so the first request does not pay for them. Fetch failures are logged, not
    /// fatal: the cache retries. A store that cannot be opened (wrong key, corrupt file, in use) is
    /// fatal.
    pub async fn start<'p>(
        &self,
        used: impl IntoIterator<Item = &'p BackendCredentialPolicy>,
    ) -> Result<(), StoreError> {
        let used: Vec<&BackendCredentialPolicy> = used.into_iter().collect();
        let current = self.shared.current();
        if let (Some(spec), None) = (&current.store, self.shared.store()) {
            let backend = match &spec.location {
                StoreLocation::File(path) => {
                    let store = open_file(path, &spec.key, &used).await?;
                    tracing::info!(store = %store.path().display(), connections = store_len(&store, &current), "store opened");
                    Backend::File(Arc::new(store))
                }
                StoreLocation::Redis(redis) => {
                    let store = Arc::new(RedisStore::connect(redis, &spec.key).await?);
                    tracing::info!(store = %store.describe(), replica = %store.replica(), "shared store connected");
                    self.listen(&store);
                    Backend::Redis(store)
                }
            };
            let _ = self.shared.store.set(backend);
        }
        for cred in current.by_name.values() {
            cred.seed_configured_refresh_token().await;
        }
        let tasks: Vec<_> = used
            .iter()
            .map(|bc| {
                let bc = bc.prefetch_handle();
                tokio::spawn(async move { bc.prefetch().await })
            })
            .collect();
        let _ = tokio::time::timeout(PREFETCH_WAIT, futures::future::join_all(tasks)).await;
        Ok(())
    }

    /// Opens the store directly (tests and tools); `start` does this from the config.
    pub fn open_store(&self, path: &std::path::Path, key: &[u8; 32]) -> Result<(), StoreError> {
        let store = Store::open(path, key)?;
        let _ = self.shared.store.set(Backend::File(Arc::new(store)));
        Ok(())
    }

    /// Drops this replica's copy of a connection's token when another replica says so (after a
    /// consent or a deletion there), for as long as the registry lives.
    fn listen(&self, store: &Arc<RedisStore>) {
        let weak = Arc::downgrade(&self.shared);
        let store = store.clone();
        tokio::spawn(async move {
            store
                .listen(|credential, id| {
                    let Some(shared) = weak.upgrade() else {
                        return false;
                    };
                    if let Some(slot) = shared.existing_slot(credential, id) {
                        slot.clear();
                        tracing::debug!(credential = %credential, connection = %id, "token dropped at another replica's request");
                    }
                    true
                })
                .await;
        });
    }

    /// The open store (file or Redis), once [`Registry::start`] opened it.
    pub fn backend(&self) -> Option<Backend> {
        self.shared.store().cloned()
    }

    /// The shared store, once open, when it is `store.redis`.
    pub fn shared_store(&self) -> Option<Arc<RedisStore>> {
        self.shared.store().and_then(Backend::redis).cloned()
    }

    /// `portcullis.store.operations` by op and result (`store.redis` only).
    pub fn store_operations(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.shared
            .store()
            .and_then(Backend::redis)
            .map(|r| r.operations())
            .unwrap_or_default()
    }

    /// `portcullis.store.leases` by outcome (`store.redis` only).
    pub fn store_leases(&self) -> Vec<(&'static str, u64)> {
        self.shared
            .store()
            .and_then(Backend::redis)
            .map(|r| r.leases())
            .unwrap_or_default()
    }

    /// `portcullis.token_cache.requests` by credential and result (`hit`, `miss`, `refresh`, `error`).
    pub fn token_cache_requests(&self) -> Vec<(String, &'static str, u64)> {
        let counters = locked(&self.shared.counters);
        let mut out: Vec<_> = counters
            .iter()
            .flat_map(|(name, c)| {
                c.snapshot()
                    .into_iter()
                    .map(move |(r, n)| (name.clone(), r, n))
            })
            .collect();
        out.sort();
        out
    }
}

/// Opens the embedded store, refusing a legacy file whose connection ids are ambiguous for `used`,
/// and upgrades one that is not.
async fn open_file(
    path: &std::path::Path,
    key: &[u8; 32],
    used: &[&BackendCredentialPolicy],
) -> Result<Store, StoreError> {
    let (path, key) = (path.to_path_buf(), *key);
    let uses = ConnectionUse::of(used.iter().copied());
    let p = path.clone();
    let store = tokio::task::spawn_blocking(move || {
        Store::open_with(&p, &key, |ids| refuse_ambiguous(&p, &uses.ambiguous(ids)))
    })
    .await
    .map_err(|e| StoreError::Io {
        path,
        detail: e.to_string(),
    })??;
    if store.has_legacy_connection_ids() {
        // `open_with` found nothing ambiguous: every old record keeps its id as a fixed one.
        store.mark_connection_ids_namespaced()?;
        tracing::info!(store = %store.path().display(), connections = store.ids().len(), "store upgraded to namespaced connection ids (existing connections kept as fixed ones)");
    }
    Ok(store)
}

/// Which connections the config's APIs use, by credential: the ones used per user, and the fixed
/// ids named.
#[derive(Debug, Default)]
struct ConnectionUse {
    per_user: std::collections::BTreeSet<String>,
    fixed: BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl ConnectionUse {
    pub(super) fn of<'p>(
        used: impl IntoIterator<Item = &'p BackendCredentialPolicy>,
    ) -> ConnectionUse {
        let mut uses = ConnectionUse::default();
        for bc in used {
            let name = bc.credential.name().to_string();
            match &bc.connection {
                ConnectionRef::PerUser(_) => {
                    uses.per_user.insert(name);
                }
                ConnectionRef::Fixed { id, .. } => {
                    uses.fixed.entry(name).or_default().insert(id.clone());
                }
                ConnectionRef::None => {}
            }
        }
        uses
    }

    /// The connections of a store written before connection ids were namespaced that this config
    /// would read differently now, by credential: any id that is not a fixed name, and, of a
    /// credential some API uses per user, any id but `default` and the fixed ids the config
    /// names (such an id was a user's bare `sub`, of no known issuer, or a shared connection).
    ///
    /// Every other old record keeps its id as a fixed connection, which is safe: fixed ids are
    /// names, which per-user ids (`user:` + digest) cannot equal, so no caller reaches an old
    /// record and no old record can pose as a user's.
    pub(super) fn ambiguous(&self, ids: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (credential, id) in ids {
            let named = id == DEFAULT_CONNECTION
                || self
                    .fixed
                    .get(credential)
                    .is_some_and(|ids| ids.contains(id));
            if !spec::valid_fixed_connection_id(id)
                || (self.per_user.contains(credential) && !named)
            {
                out.entry(credential.clone()).or_default().push(id.clone());
            }
        }
        out
    }
}

/// The start-up refusal of a legacy store with ambiguous connections (the first credential's).
fn refuse_ambiguous(
    path: &std::path::Path,
    ambiguous: &BTreeMap<String, Vec<String>>,
) -> Result<(), StoreError> {
    let Some((credential, ids)) = ambiguous.iter().next() else {
        return Ok(());
    };
    let mut sample: Vec<String> = ids.iter().take(5).map(|i| format!("`{i}`")).collect();
    if ids.len() > 5 {
        sample.push("...".into());
    }
    Err(StoreError::LegacyConnections {
        path: path.into(),
        credential: credential.clone(),
        count: ids.len(),
        sample: sample.join(", "),
    })
}

/// What `portcullis upgrade-store` does with one credential's ambiguous legacy connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyAction {
    /// The operator states they are the users of the identity provider `issuer`: each id becomes
    /// the subject of a per-user connection of that issuer.
    Adopt {
        /// The `iss` of those users' tokens.
        issuer: String,
    },
    /// Delete them (their users consent again).
    Drop,
}

/// `portcullis upgrade-store`: applies `action` to the ambiguous legacy connections of
/// `credential` in the store the config names (the service must be stopped: the file is opened
/// for writing), then marks the store upgraded if nothing ambiguous is left. `used` are the
/// backend credentials the config's APIs use. Returns what it did.
pub fn upgrade_legacy_store<'p>(
    src: &Source,
    used: impl IntoIterator<Item = &'p BackendCredentialPolicy>,
    credential: &str,
    action: &LegacyAction,
) -> Result<String, String> {
    let mut errs = ConfigErrors::default();
    let spec = spec::compile_store(src, &mut errs)
        .ok_or_else(|| "the config has no usable `store`".to_string())?;
    if let LegacyAction::Adopt { issuer } = action
        && issuer.is_empty()
    {
        return Err("`--issuer` must not be empty".into());
    }
    let StoreLocation::File(path) = &spec.location else {
        return Ok(
            "the store is `store.redis`: connection ids there were always namespaced; nothing to do"
                .into(),
        );
    };
    let store = Store::open(path, &spec.key).map_err(|e| e.to_string())?;
    if !store.has_legacy_connection_ids() {
        return Ok(format!(
            "store {}: connection ids are already namespaced; nothing to do",
            path.display()
        ));
    }
    let mut ambiguous = ConnectionUse::of(used).ambiguous(&store.ids());
    let ids = ambiguous.remove(credential).unwrap_or_default();
    let mut done = Vec::new();
    for id in &ids {
        match action {
            LegacyAction::Drop => {
                store.delete(credential, id).map_err(|e| e.to_string())?;
                done.push(format!("deleted `{id}`"));
            }
            LegacyAction::Adopt { issuer } => {
                let Some(mut record) = store.get(credential, id) else {
                    continue;
                };
                let to = spec::per_user_connection_id(issuer, id);
                record.issuer = Some(issuer.clone());
                record.subject = Some(id.clone());
                store
                    .rename(credential, id, &to, &record)
                    .map_err(|e| e.to_string())?;
                done.push(format!("`{id}` -> `{to}` (issuer {issuer}, subject {id})"));
            }
        }
    }
    let mut out = format!(
        "store {}: credential `{credential}`: {} connection(s)",
        path.display(),
        done.len()
    );
    for d in &done {
        out.push_str("\n  ");
        out.push_str(d);
    }
    if ambiguous.is_empty() {
        store
            .mark_connection_ids_namespaced()
            .map_err(|e| e.to_string())?;
        out.push_str("\nthe store is upgraded: `portcullis serve` will start on it");
    } else {
        let left: Vec<String> = ambiguous
            .iter()
            .map(|(c, ids)| format!("`{c}` ({})", ids.len()))
            .collect();
        out.push_str(&format!(
            "\nstill ambiguous, run again for: {}",
            left.join(", ")
        ));
    }
    Ok(out)
}

fn store_len(store: &Store, set: &SetInner) -> usize {
    set.by_name.keys().map(|n| store.count(n)).sum()
}
