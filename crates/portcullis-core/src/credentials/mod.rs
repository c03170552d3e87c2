//! Backend credentials, modelled on API Management's credential manager: grants (client
//! credentials, refresh-token connections obtained by consent, RFC 8693 token exchange, static and
//! basic), a token cache with refresh ahead of expiry, an encrypted store for refresh tokens, and
//! the header injected upstream on allow.
//!
//! Lifetimes: a [`Registry`] lives as long as the process (the policy's `Runtime` holds it); each
//! compiled config gets a [`CredentialSet`] whose credentials are reused from the registry when their
//! settings did not change, so a reload keeps cached tokens. Connection slots (tokens of refresh-token
//! connections) live in the registry keyed by credential name and connection id, so two versions of
//! one credential never refresh the same connection at once (which would spend a rotated refresh
//! token twice).

mod cache;
pub mod clock;
mod consent;
mod credential;
pub mod endpoint;
pub mod spec;
pub mod store;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use crate::check::template::{Context, RenderError, Template};
use crate::check::{Denial, Failure, Header, Io, Reason};
use crate::config::{self, ConfigErrors, Source};

pub use cache::TokenCacheResult;
use cache::{Counters, Slot};
pub use clock::{Clock, ManualClock, SystemClock};
pub use consent::{AdminError, CallbackOutcome, ConnectionUser};
use credential::{Credential, DEFAULT_CONNECTION, Kind, Unavailable};
use spec::StoreSpec;
pub use spec::{GrantKind, per_user_connection_id};
pub use store::{ConnectionRecord, ConnectionState, Store, StoreError};

/// How long start-up waits for the credentials the config uses (each fetch is also bounded by its
/// credential's `timeout`; a slower one finishes in the background).
const PREFETCH_WAIT: Duration = Duration::from_secs(5);
/// Default of `limits.max_concurrent_fetches`.
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 64;

/// Credentials and their token caches; lives across reloads.
#[derive(Debug, Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

/// What every credential of every config version shares.
pub(crate) struct Shared {
    pub(crate) clock: Arc<dyn Clock>,
    http: OnceLock<Result<reqwest::Client, String>>,
    store: OnceLock<Arc<Store>>,
    /// Slots by credential name, then connection id.
    slots: RwLock<HashMap<String, HashMap<String, Arc<Slot>>>>,
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    by_fingerprint: Mutex<HashMap<[u8; 32], Weak<Credential>>>,
    /// The credentials of the config in force (published after it compiled without error).
    current: Mutex<Arc<SetInner>>,
    pub(crate) consents: Mutex<HashMap<String, consent::PendingConsent>>,
    /// Token endpoint requests in flight, capped by `limits.max_concurrent_fetches`, with the cap
    /// it was made for. A reload that changes the cap installs a new semaphore; requests holding a
    /// permit of the old one finish on it.
    fetches: Mutex<(usize, Arc<tokio::sync::Semaphore>)>,
    /// Connection records with a rotated refresh token that the provider issued (so the stored
    /// one is spent) but the store could not write. Kept in memory and written before the
    /// connection's next refresh, which never spends the stale stored token.
    unstored: Mutex<HashMap<(String, String), ConnectionRecord>>,
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

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every value behind these locks is replaced whole; a panic elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn store(&self) -> Option<&Arc<Store>> {
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

    fn counters(&self, credential: &str) -> Arc<Counters> {
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
            .cloned()
            .ok_or_else(|| "the store is not open".to_string())?;
        let (c, k) = (credential.to_string(), connection.to_string());
        tokio::task::spawn_blocking(move || store.put(&c, &k, &record))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
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

    fn current(&self) -> Arc<SetInner> {
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
            && open.path() != spec.path
        {
            tracing::warn!(store = %spec.path.display(), open = %open.path().display(), "`store` changed: it applies after a restart");
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
            let spec = spec.clone();
            let path = spec.path.clone();
            let uses = ConnectionUse::of(used.iter().copied());
            let store = tokio::task::spawn_blocking(move || {
                Store::open_with(&spec.path, &spec.key, |ids| {
                    refuse_ambiguous(&spec.path, &uses.ambiguous(ids))
                })
            })
            .await
            .map_err(|e| StoreError::Io {
                path,
                detail: e.to_string(),
            })??;
            tracing::info!(store = %store.path().display(), connections = store_len(&store, &current), "store opened");
            if store.has_legacy_connection_ids() {
                // `open_with` found nothing ambiguous: every old record keeps its id as a fixed one.
                store.mark_connection_ids_namespaced()?;
                tracing::info!(store = %store.path().display(), connections = store.ids().len(), "store upgraded to namespaced connection ids (existing connections kept as fixed ones)");
            }
            let _ = self.shared.store.set(Arc::new(store));
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
        let _ = self.shared.store.set(Arc::new(store));
        Ok(())
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

/// Which connections the config's APIs use, by credential: the ones used per user, and the fixed
/// ids named.
#[derive(Debug, Default)]
struct ConnectionUse {
    per_user: std::collections::BTreeSet<String>,
    fixed: BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl ConnectionUse {
    fn of<'p>(used: impl IntoIterator<Item = &'p BackendCredentialPolicy>) -> ConnectionUse {
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
    fn ambiguous(&self, ids: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
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
    let store = Store::open(&spec.path, &spec.key).map_err(|e| e.to_string())?;
    if !store.has_legacy_connection_ids() {
        return Ok(format!(
            "store {}: connection ids are already namespaced; nothing to do",
            spec.path.display()
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
        spec.path.display(),
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

/// The credentials of one compiled config.
#[derive(Debug, Default, Clone)]
pub struct CredentialSet {
    inner: Arc<SetInner>,
}

#[derive(Debug)]
struct SetInner {
    by_name: BTreeMap<String, Arc<Credential>>,
    store: Option<StoreSpec>,
    /// `limits.max_concurrent_fetches`.
    max_fetches: usize,
}

impl Default for SetInner {
    fn default() -> Self {
        SetInner {
            by_name: BTreeMap::new(),
            store: None,
            max_fetches: DEFAULT_MAX_CONCURRENT_FETCHES,
        }
    }
}

/// `on_allow.backend_credential` of one API.
#[derive(Debug)]
pub struct BackendCredentialPolicy {
    credential: Arc<Credential>,
    header: String,
    /// The header value is `prefix + token + suffix` (`format` split at `{token}`).
    prefix: String,
    suffix: String,
    connection: ConnectionRef,
}

#[derive(Debug, Clone)]
enum ConnectionRef {
    /// The credential has no connections (client credentials, token exchange, static, basic).
    None,
    /// One configured connection of a refresh-token credential.
    Fixed { id: String, slot: Arc<Slot> },
    /// The caller's own connection, e.g. `{jwt.sub}`.
    PerUser(Template),
}

impl BackendCredentialPolicy {
    /// The configured credential's name.
    pub fn credential_name(&self) -> &str {
        self.credential.name()
    }

    /// The request header that carries the credential upstream.
    pub fn header_name(&self) -> &str {
        &self.header
    }

    fn header(&self, token: &str) -> Header {
        let mut value = String::with_capacity(self.prefix.len() + token.len() + self.suffix.len());
        value.push_str(&self.prefix);
        value.push_str(token);
        value.push_str(&self.suffix);
        Header {
            name: self.header.clone(),
            value,
            sensitive: true,
        }
    }

    fn fail(&self, reason: Reason, detail: impl std::fmt::Display) -> Failure {
        Failure {
            denial: Denial::new(reason),
            detail: format!("credential `{}`: {detail}", self.credential.name()),
        }
    }

    /// The header carrying the credential. With `dry_run`, nothing is fetched and the value is a
    /// placeholder (for `portcullis check`).
    pub async fn header_for(&self, ctx: &Context<'_>, dry_run: bool) -> Result<Header, Failure> {
        match self.header_with(ctx, dry_run, Io::Wait).await {
            Ok(Some(h)) => Ok(h),
            Ok(None) => Err(self.fail(Reason::Internal, "a waiting lookup returned no token")),
            Err(f) => Err(f),
        }
    }

    /// [`Self::header_for`], waiting for a token fetch only when `io` allows: `Ok(None)` when no
    /// valid token is cached and `io` is [`Io::Never`] (nothing is fetched or counted then).
    pub async fn header_with(
        &self,
        ctx: &Context<'_>,
        dry_run: bool,
        io: Io,
    ) -> Result<Option<Header>, Failure> {
        let connection: Option<Cow<'_, str>> = match &self.connection {
            ConnectionRef::None => None,
            ConnectionRef::Fixed { id, .. } => Some(Cow::Borrowed(id)),
            ConnectionRef::PerUser(t) => Some(Cow::Owned(self.per_user_id(t, ctx)?)),
        };
        if dry_run {
            // `check` shows that a credential would be injected, never a value, and fetches nothing.
            return Ok(Some(Header {
                name: self.header.clone(),
                value: String::new(),
                sensitive: true,
            }));
        }
        let cred = &self.credential;
        let result = match &cred.kind {
            Kind::Fixed(v) => return Ok(Some(self.header(v))),
            Kind::ClientCredentials(slot) => cred.slot_token(slot, DEFAULT_CONNECTION, io).await,
            Kind::RefreshToken => {
                self.connection_token(connection.as_deref().unwrap_or(DEFAULT_CONNECTION), io)
                    .await
            }
            Kind::TokenExchange(_) => match ctx.raw_token {
                Some(subject) => {
                    let exp = ctx
                        .claims
                        .and_then(|c| c.get("exp"))
                        .and_then(endpoint::claim_time);
                    cred.exchange(subject, exp, io).await
                }
                None => Err(Unavailable::Failed(
                    "token exchange needs the caller's validated token".into(),
                )),
            },
        };
        match result {
            Ok(token) => Ok(Some(self.header(&token.value))),
            Err(Unavailable::WouldWait) => Ok(None),
            Err(Unavailable::Failed(d)) => Err(self.fail(Reason::BackendCredentialUnavailable, d)),
            Err(Unavailable::NeedsConsent(d)) => {
                let per_user = matches!(self.connection, ConnectionRef::PerUser(_));
                let reason = if per_user {
                    Reason::BackendCredentialConsentRequired
                } else {
                    Reason::BackendCredentialUnavailable
                };
                let id = connection.as_deref().unwrap_or(DEFAULT_CONNECTION);
                Err(self.fail(
                    reason,
                    format_args!("connection `{id}` needs consent ({d})"),
                ))
            }
        }
    }

    /// The caller's own connection id: `user:` + digest of (token `iss`, rendered template), a
    /// namespace no fixed id can spell (see [`spec::per_user_connection_id`]). Without an issuer
    /// or a value there is no caller to key it by: 403 consent required, nothing fetched.
    fn per_user_id(&self, t: &Template, ctx: &Context<'_>) -> Result<String, Failure> {
        let subject = match t.render(ctx) {
            Ok(s) if !s.is_empty() => s,
            Ok(_) | Err(RenderError::Missing) => {
                return Err(self.fail(
                    Reason::BackendCredentialConsentRequired,
                    "the caller's token has no claim naming a connection",
                ));
            }
            Err(RenderError::ControlCharacter) => {
                return Err(self.fail(
                    Reason::BackendCredentialConsentRequired,
                    "the caller's connection id is not usable (control characters)",
                ));
            }
        };
        let Some(issuer) = ctx.issuer() else {
            return Err(self.fail(
                Reason::BackendCredentialConsentRequired,
                "the caller's token has no `iss`: a per-user connection is keyed by issuer and subject",
            ));
        };
        Ok(spec::per_user_connection_id(issuer, &subject))
    }

    async fn connection_token(&self, id: &str, io: Io) -> Result<Arc<cache::Token>, Unavailable> {
        let cred = &self.credential;
        let shared = &cred.shared;
        let slot = match &self.connection {
            ConnectionRef::Fixed { slot, .. } => Some(slot.clone()),
            _ => shared.existing_slot(cred.name(), id),
        };
        let now = shared.clock.now();
        let cached = slot
            .as_ref()
            .is_some_and(|s| s.valid(&cred.fingerprint, now).is_some());
        if !cached && io == Io::Never {
            return Err(Unavailable::WouldWait);
        }
        if !cached {
            let Some(store) = shared.store() else {
                return Err(Unavailable::Failed(
                    "the store is not open (a `store` added by a reload applies after a restart)"
                        .into(),
                ));
            };
            let usable = |r: Option<ConnectionRecord>| {
                r.is_some_and(|r| {
                    r.state != ConnectionState::NeedsConsent && r.refresh_token.is_some()
                })
            };
            if !usable(store.get(cred.name(), id)) {
                if id == DEFAULT_CONNECTION && cred.spec.refresh_token.is_some() {
                    cred.seed_configured_refresh_token().await;
                }
                if !usable(store.get(cred.name(), id)) {
                    return Err(Unavailable::NeedsConsent("no refresh token".into()));
                }
            }
        }
        let slot = slot.unwrap_or_else(|| shared.slot(cred.name(), id));
        cred.slot_token(&slot, id, io).await
    }

    fn prefetch_handle(&self) -> Prefetch {
        Prefetch {
            credential: self.credential.clone(),
            connection: self.connection.clone(),
        }
    }
}

/// A credential to obtain at start.
struct Prefetch {
    credential: Arc<Credential>,
    connection: ConnectionRef,
}

impl Prefetch {
    async fn prefetch(self) {
        let cred = &self.credential;
        let result = match (&cred.kind, &self.connection) {
            (Kind::ClientCredentials(slot), _) => {
                Some(cred.slot_token(slot, DEFAULT_CONNECTION, Io::Wait).await)
            }
            (Kind::RefreshToken, ConnectionRef::Fixed { id, slot }) => {
                let connected = cred.shared.store().is_some_and(|s| {
                    s.get(cred.name(), id)
                        .is_some_and(|r| r.state != ConnectionState::NeedsConsent)
                });
                if connected {
                    Some(cred.slot_token(slot, id, Io::Wait).await)
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(Err(e)) = result {
            tracing::warn!(credential = %cred.name(), problem = ?e, "backend credential not obtained at start; requests will retry");
        }
    }
}

/// Compiles `credentials` and `store`.
pub fn compile_credentials(
    src: &Source,
    registry: &Registry,
    errs: &mut ConfigErrors,
) -> CredentialSet {
    let store = spec::compile_store(src, errs);
    let has_store = src.file.store.is_some();
    let shared = &registry.shared;
    let mut by_name = BTreeMap::new();
    let mut by_fp = locked(&shared.by_fingerprint);
    by_fp.retain(|_, w| w.strong_count() > 0);
    for (i, c) in src.file.credentials.iter().enumerate() {
        let Some(spec) = spec::compile_credential(i, c, has_store, errs) else {
            continue;
        };
        if by_name.contains_key(&spec.name) {
            errs.push(
                format!("credentials[{i}].name"),
                format!("`{}` names two credentials", spec.name),
            );
            continue;
        }
        let fp = spec.fingerprint();
        // Unchanged settings: the same credential, with its cached tokens.
        let cred = match by_fp.get(&fp).and_then(Weak::upgrade) {
            Some(c) => c,
            None => {
                let c = Arc::new(Credential::new(spec.clone(), shared.clone()));
                by_fp.insert(fp, Arc::downgrade(&c));
                c
            }
        };
        by_name.insert(spec.name, cred);
    }
    let max_fetches = match src.file.limits.max_concurrent_fetches {
        Some(0) => {
            errs.push("limits.max_concurrent_fetches", "must be greater than 0");
            DEFAULT_MAX_CONCURRENT_FETCHES
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONCURRENT_FETCHES,
    };
    CredentialSet {
        inner: Arc::new(SetInner {
            by_name,
            store,
            max_fetches,
        }),
    }
}

/// Compiles one API's `on_allow.backend_credential`.
pub fn compile_backend_credential(
    cfg: &config::BackendCredential,
    path: &str,
    api_has_jwt: bool,
    set: &CredentialSet,
    errs: &mut ConfigErrors,
) -> Option<BackendCredentialPolicy> {
    let before = errs.0.len();
    let Some(credential) = set.inner.by_name.get(&cfg.name).cloned() else {
        errs.push(
            format!("{path}.name"),
            format!("no credential is named `{}`", cfg.name),
        );
        return None;
    };
    let header = cfg
        .header
        .as_deref()
        .unwrap_or("authorization")
        .to_ascii_lowercase();
    if header.is_empty()
        || !header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        errs.push(
            format!("{path}.header"),
            format!("`{header}` is not a header name"),
        );
    } else if header == "host" || header == crate::check::DECISION_ID_HEADER {
        errs.push(
            format!("{path}.header"),
            format!("`{header}` cannot carry a credential"),
        );
    }
    let default_format = if credential.grant() == GrantKind::Basic {
        "Basic {token}"
    } else {
        "Bearer {token}"
    };
    let (prefix, suffix) = match parse_format(cfg.format.as_deref().unwrap_or(default_format)) {
        Ok(p) => p,
        Err(e) => {
            errs.push(format!("{path}.format"), e);
            (String::new(), String::new())
        }
    };
    let connection = match (&cfg.connection, credential.grant()) {
        (None, GrantKind::RefreshToken) => ConnectionRef::Fixed {
            id: DEFAULT_CONNECTION.into(),
            slot: credential
                .shared
                .slot(credential.name(), DEFAULT_CONNECTION),
        },
        (None, _) => ConnectionRef::None,
        (Some(_), g) if g != GrantKind::RefreshToken => {
            errs.push(
                format!("{path}.connection"),
                format!(
                    "only `refresh_token` credentials have connections; `{}` is `{}`",
                    cfg.name,
                    g.as_str()
                ),
            );
            ConnectionRef::None
        }
        (Some(c), _) => match Template::parse(c) {
            Ok(t) if t.uses_claims() => {
                if !api_has_jwt {
                    errs.push(
                        format!("{path}.connection"),
                        "uses {jwt.*} but the API has no `jwt` section",
                    );
                }
                ConnectionRef::PerUser(t)
            }
            // A per-user connection is keyed by the validated token's issuer; without a claim
            // there is no token to take it from.
            Ok(_) if c.contains('{') => {
                errs.push(
                    format!("{path}.connection"),
                    "a per-user connection is keyed by the caller's token (issuer and a claim): use a {jwt.*} claim, e.g. \"{jwt.sub}\"",
                );
                ConnectionRef::None
            }
            Ok(_) if spec::valid_fixed_connection_id(c) => ConnectionRef::Fixed {
                id: c.clone(),
                slot: credential.shared.slot(credential.name(), c),
            },
            Ok(_) => {
                errs.push(
                    format!("{path}.connection"),
                    format!("`{c}`: a fixed connection id is 1 to 128 letters, digits, `.`, `_` or `-` (per-user connections are written as a template, e.g. \"{{jwt.sub}}\")"),
                );
                ConnectionRef::None
            }
            Err(e) => {
                errs.push(format!("{path}.connection"), e);
                ConnectionRef::None
            }
        },
    };
    if let ConnectionRef::Fixed { slot, .. } = &connection {
        // A shared connection is kept warm: refreshed ahead of expiry even without traffic.
        slot.proactive
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if credential.grant() == GrantKind::TokenExchange && !api_has_jwt {
        errs.push(path, format!("credential `{}` exchanges the caller's token, but the API has no `jwt` section to validate one", cfg.name));
    }
    if errs.0.len() > before {
        return None;
    }
    Some(BackendCredentialPolicy {
        credential,
        header,
        prefix,
        suffix,
        connection,
    })
}

/// Splits `format` at its one `{token}`; `{{` and `}}` are literal braces.
fn parse_format(format: &str) -> Result<(String, String), String> {
    let mut done: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                cur.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                cur.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                if name.trim() != "token" {
                    return Err(format!("`{{{name}}}`: the only placeholder is {{token}}"));
                }
                done.push(std::mem::take(&mut cur));
            }
            '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
            c if c.is_control() => return Err("must not contain control characters".into()),
            c => cur.push(c),
        }
    }
    match <[String; 1]>::try_from(done) {
        Ok([prefix]) => Ok((prefix, cur)),
        Err(_) => Err("must contain {token} exactly once, e.g. \"Bearer {token}\"".into()),
    }
}

#[cfg(test)]
mod tests;
