//! One credential at runtime: obtaining tokens by its grant, the cache rules (single-flight,
//! refresh ahead, backoff, serve until expiry), and persisting rotated refresh tokens.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use backon::Retryable;

use crate::digest::Sha256;

use super::Shared;
use super::backend::Backend;
use super::cache::{Counters, Gate, Slot, Token, TokenCacheResult};
use super::clock::unix_secs;
use super::endpoint::{self, Issued, TokenError};
use super::fleet::Need;
use super::spec::{CredentialSpec, GrantKind};
use super::store::{ConnectionRecord, ConnectionState};
use crate::check::Io;

/// Token-exchange results kept at most (one per caller token).
const EXCHANGE_CACHE_CAPACITY: u64 = 10_000;
/// The connection of a credential that is not per user.
pub const DEFAULT_CONNECTION: &str = "default";

/// Why a request gets no credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// No token can be had now (503).
    Failed(String),
    /// The connection does not exist or needs consent again.
    NeedsConsent(String),
    /// No valid token is cached, and the caller asked not to wait for one ([`Io::Never`]).
    WouldWait,
}

/// A credential with its caches.
pub struct Credential {
    pub(super) spec: CredentialSpec,
    pub(super) fingerprint: [u8; 32],
    pub(super) shared: Arc<Shared>,
    pub(super) counters: Arc<Counters>,
    pub(super) kind: Kind,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.spec.name)
            .field("grant", &self.spec.grant)
            .finish_non_exhaustive()
    }
}

/// What the grant needs at runtime.
pub(super) enum Kind {
    /// `static` and `basic`: the header value's token part, fixed.
    Fixed(String),
    /// `client_credentials`: one shared slot.
    ClientCredentials(Arc<Slot>),
    /// `refresh_token`: slots per connection live in the registry (shared across reloads, so two
    /// versions of the config never refresh one connection at once).
    RefreshToken,
    /// `token_exchange`: results per caller token.
    TokenExchange(Box<Exchange>),
}

/// Token-exchange results per caller token, and the backoff after provider failures.
pub(super) struct Exchange {
    cache: moka::future::Cache<[u8; 32], Arc<Token>>,
    gate: Mutex<Gate>,
}

/// Expires token-exchange results when they stop being fresh by the injected clock (memory
/// hygiene; every read checks freshness itself).
struct FreshFor(Arc<dyn super::Clock>);

impl moka::Expiry<[u8; 32], Arc<Token>> for FreshFor {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Token>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(
            value
                .fresh_until
                .duration_since(self.0.now())
                .unwrap_or(Duration::ZERO),
        )
    }
}

impl Credential {
    pub(super) fn new(spec: CredentialSpec, shared: Arc<Shared>) -> Credential {
        let fingerprint = spec.fingerprint();
        let counters = shared.counters(&spec.name);
        let kind = match spec.grant {
            GrantKind::Static | GrantKind::Basic => Kind::Fixed(
                spec.fixed_value
                    .as_ref()
                    .map(|s| s.expose().to_string())
                    .unwrap_or_default(),
            ),
            GrantKind::ClientCredentials => {
                let slot = shared.slot(&spec.name, DEFAULT_CONNECTION);
                // One token shared by every request: kept warm, refreshed ahead of expiry.
                slot.proactive
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Kind::ClientCredentials(slot)
            }
            GrantKind::RefreshToken => Kind::RefreshToken,
            GrantKind::TokenExchange => Kind::TokenExchange(Box::new(Exchange {
                cache: moka::future::Cache::builder()
                    .max_capacity(EXCHANGE_CACHE_CAPACITY)
                    .expire_after(FreshFor(shared.clock.clone()))
                    .build(),
                gate: Mutex::new(Gate::default()),
            })),
        };
        Credential {
            spec,
            fingerprint,
            shared,
            counters,
            kind,
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The grant.
    pub fn grant(&self) -> GrantKind {
        self.spec.grant
    }

    pub(super) fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    pub(super) fn client(&self) -> Result<&reqwest::Client, TokenError> {
        self.shared
            .http
            .get_or_init(endpoint::http_client)
            .as_ref()
            .map_err(|e| TokenError::Client(e.clone()))
    }

    /// The token of a slot: from the cache when valid, else fetched once for all concurrent
    /// callers. `connection` names the refresh-token connection (ignored by client credentials).
    pub(super) async fn slot_token(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        connection: &str,
        io: Io,
    ) -> Result<Arc<Token>, Unavailable> {
        let now = self.now();
        if let Some(t) = slot.valid(&self.fingerprint, now) {
            self.counters.add(TokenCacheResult::Hit);
            if !t.fresh_at(now) {
                self.spawn_refresh(slot, connection);
            }
            return Ok(t);
        }
        if io == Io::Never {
            return Err(Unavailable::WouldWait);
        }
        self.counters.add(TokenCacheResult::Miss);
        let _one_fetch = slot.fetch.lock().await;
        let now = self.now();
        // Whoever held the lock before us may have fetched it.
        if let Some(t) = slot.valid(&self.fingerprint, now) {
            return Ok(t);
        }
        let gate = {
            let m = slot.meta();
            m.gate
                .closed_until(now)
                .map(|until| (until, m.last_error.clone()))
        };
        if let Some((until, last)) = gate {
            if let Some(t) = self.peek_shared(slot, connection).await {
                self.install(slot, t.clone(), connection);
                return Ok(t);
            }
            let last = last.unwrap_or_else(|| "the last attempt failed".into());
            return Err(Unavailable::Failed(format!(
                "{last}; next attempt in {}",
                wait(now, until)
            )));
        }
        // Per-user connections fetch per caller: the process-wide cap keeps a crowd of callers from
        // opening a request each. Over it, fail fast; the gate is not touched (no backoff for all).
        let Some(_permit) = self.shared.try_fetch_permit() else {
            self.counters.add(TokenCacheResult::Error);
            return Err(Unavailable::Failed(TokenError::Busy.to_string()));
        };
        match self.obtain(connection, now, Need::Valid).await {
            Ok(token) => {
                let token = Arc::new(token);
                self.install(slot, token.clone(), connection);
                Ok(token)
            }
            Err(e) => Err(self.failed(slot, &e, now)),
        }
    }

    /// Stores a token and, for shared connections, schedules its refresh ahead of expiry.
    pub(super) fn install(self: &Arc<Self>, slot: &Arc<Slot>, token: Arc<Token>, connection: &str) {
        slot.set(token.clone());
        if !slot.proactive.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let slot = slot.clone();
        let clock = self.shared.clock.clone();
        let connection = connection.to_string();
        rt.spawn(async move {
            clock.sleep_until(token.fresh_until).await;
            // Only if this token is still the current one, and the credential still configured.
            let current = slot.token.load_full();
            if current.is_some_and(|c| Arc::ptr_eq(&c, &token))
                && let Some(cred) = weak.upgrade()
            {
                cred.spawn_refresh(&slot, &connection);
            }
        });
    }

    fn failed(&self, slot: &Slot, e: &TokenError, now: SystemTime) -> Unavailable {
        self.counters.add(TokenCacheResult::Error);
        let mut m = slot.meta();
        let until = m.gate.fail(now);
        m.last_error = Some(e.to_string());
        tracing::warn!(credential = %self.spec.name, error = %e, retry_in = %wait(now, until), "backend credential: token request failed");
        match e {
            TokenError::RefreshTokenRejected(_) => Unavailable::NeedsConsent(e.to_string()),
            _ => Unavailable::Failed(format!("{e}; next attempt in {}", wait(now, until))),
        }
    }

    /// Refreshes in the background (once at a time per slot), retrying with backoff while the
    /// current token is still valid. The request that noticed is not delayed.
    fn spawn_refresh(self: &Arc<Self>, slot: &Arc<Slot>, connection: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !slot.begin_refresh() {
            return;
        }
        let weak = Arc::downgrade(self);
        let slot = slot.clone();
        let connection = connection.to_string();
        let clock = self.shared.clock.clone();
        let fingerprint = self.fingerprint;
        rt.spawn(async move {
            refresh_with_backoff(weak, slot.clone(), connection, clock, fingerprint).await;
            slot.end_refresh();
        });
    }

    /// A new token for a slot: shared by the fleet when the store is Redis (client credentials and
    /// refresh-token connections), else fetched by this process.
    async fn obtain(
        &self,
        connection: &str,
        now: SystemTime,
        need: Need,
    ) -> Result<Token, TokenError> {
        let fleet = matches!(
            self.spec.grant,
            GrantKind::ClientCredentials | GrantKind::RefreshToken
        );
        match self.shared.store().and_then(Backend::redis) {
            Some(r) if fleet => self.fleet_obtain(r, connection, need).await,
            _ => self.fetch(connection, now).await,
        }
    }

    /// While this slot backs off: the fleet's token, if another replica has a valid one (looked for
    /// at most once per [`super::cache::PEEK_INTERVAL`], so a slow or absent Redis costs one
    /// check at a time, not every check).
    async fn peek_shared(&self, slot: &Slot, connection: &str) -> Option<Arc<Token>> {
        let r = self.shared.store().and_then(Backend::redis)?;
        if !matches!(
            self.spec.grant,
            GrantKind::ClientCredentials | GrantKind::RefreshToken
        ) {
            return None;
        }
        {
            let mut m = slot.meta();
            let now = std::time::Instant::now();
            if m.last_peek
                .is_some_and(|p| now.duration_since(p) < super::cache::PEEK_INTERVAL)
            {
                return None;
            }
            m.last_peek = Some(now);
        }
        let t = r.token(&self.spec.name, connection).await.ok()??;
        (t.fingerprint == self.fingerprint && t.valid_at(self.now())).then(|| Arc::new(t))
    }

    /// Obtains a new token by the grant. For refresh tokens, a rotated refresh token is persisted
    /// before this returns, so the new access token is never used unless the rotation is durable.
    pub(super) async fn fetch(
        &self,
        connection: &str,
        now: SystemTime,
    ) -> Result<Token, TokenError> {
        let client = self.client()?;
        let issued = match self.spec.grant {
            GrantKind::ClientCredentials => {
                endpoint::request(
                    client,
                    &self.spec,
                    endpoint::client_credentials_form(&self.spec),
                    now,
                    false,
                )
                .await?
            }
            GrantKind::RefreshToken => self.refresh(client, connection, now).await?,
            _ => {
                return Err(TokenError::Client(
                    "this grant has no cached connection".into(),
                ));
            }
        };
        Ok(Token::issued(
            &issued,
            self.fingerprint,
            now,
            self.spec.refresh_before_expiry,
        ))
    }

    async fn refresh(
        &self,
        client: &reqwest::Client,
        connection: &str,
        now: SystemTime,
    ) -> Result<Issued, TokenError> {
        let store = self
            .shared
            .store()
            .and_then(Backend::file)
            .ok_or_else(|| TokenError::Client("the store is not open".into()))?;
        // A rotated refresh token the store could not keep last time: the provider has already
        // spent the stored one, so this one is written first, and nothing is sent until it is.
        if let Some(unstored) = self.shared.take_unstored(&self.spec.name, connection) {
            if let Err(e) = self
                .shared
                .persist(&self.spec.name, connection, unstored.clone())
                .await
            {
                self.shared
                    .keep_unstored(&self.spec.name, connection, unstored);
                return Err(TokenError::Store(e));
            }
            tracing::info!(credential = %self.spec.name, connection = %connection, "the rotated refresh token is stored now");
        }
        let mut record = store
            .get(&self.spec.name, connection)
            .ok_or_else(|| TokenError::RefreshTokenRejected("no connection".into()))?;
        let rt = usable_refresh_token(&record)?;
        match self.send_refresh(client, &rt, now).await {
            Ok(issued) => {
                let (rotated, changed) = apply_refresh(&mut record, &issued, &rt, now);
                if changed {
                    // Fail closed: the access token is not used unless the rotation is durable.
                    // The rotated token is kept in memory so the connection is not lost with it.
                    if let Err(e) = self
                        .shared
                        .persist(&self.spec.name, connection, record.clone())
                        .await
                    {
                        if rotated {
                            self.shared
                                .keep_unstored(&self.spec.name, connection, record);
                        }
                        tracing::error!(credential = %self.spec.name, connection = %connection, error = %e, "the store cannot be written: the rotated refresh token is kept in memory until it can be");
                        return Err(TokenError::Store(e));
                    }
                }
                Ok(issued)
            }
            Err(e) => {
                if apply_refresh_failure(&mut record, &e, now)
                    && let Err(pe) = self
                        .shared
                        .persist(&self.spec.name, connection, record)
                        .await
                {
                    tracing::error!(credential = %self.spec.name, error = %pe, "cannot record the connection's state");
                }
                Err(e)
            }
        }
    }

    /// Sends a refresh token to the token endpoint (the caller has made sure it may be spent).
    pub(super) async fn send_refresh(
        &self,
        client: &reqwest::Client,
        refresh_token: &str,
        now: SystemTime,
    ) -> Result<Issued, TokenError> {
        let form = endpoint::refresh_form(&self.spec, refresh_token);
        endpoint::request(client, &self.spec, form, now, true).await
    }

    /// RFC 8693: exchanges the caller's validated token; results are cached per caller token and
    /// never outlive it.
    pub(super) async fn exchange(
        &self,
        subject: &str,
        subject_exp: Option<SystemTime>,
        io: Io,
    ) -> Result<Arc<Token>, Unavailable> {
        let Kind::TokenExchange(ex) = &self.kind else {
            return Err(Unavailable::Failed(
                "not a token exchange credential".into(),
            ));
        };
        let (cache, gate) = (&ex.cache, &ex.gate);
        let now = self.now();
        if subject_exp.is_some_and(|e| e <= now) {
            return Err(Unavailable::Failed("the caller's token has expired".into()));
        }
        // The audience is part of the credential's settings, so the caller token's hash is the key.
        let key: [u8; 32] = Sha256::digest(subject.as_bytes());
        if let Some(t) = cache.get(&key).await {
            if t.fingerprint == self.fingerprint && t.fresh_at(now) {
                self.counters.add(TokenCacheResult::Hit);
                return Ok(t);
            }
            cache.invalidate(&key).await;
        }
        if io == Io::Never {
            return Err(Unavailable::WouldWait);
        }
        self.counters.add(TokenCacheResult::Miss);
        let closed = lock(gate).closed_until(now);
        if let Some(until) = closed {
            return Err(Unavailable::Failed(format!(
                "token exchange failed recently; next attempt in {}",
                wait(now, until)
            )));
        }
        let fetch = async {
            // One request per distinct caller token: capped process-wide, failing fast.
            let _permit = self.shared.try_fetch_permit().ok_or(TokenError::Busy)?;
            let client = self.client()?;
            let issued = endpoint::request(
                client,
                &self.spec,
                endpoint::exchange_form(&self.spec, subject),
                now,
                false,
            )
            .await?;
            let expires_at = subject_exp.map_or(issued.expires_at, |e| e.min(issued.expires_at));
            Ok::<_, TokenError>(Arc::new(Token::new(
                issued.access_token,
                self.fingerprint,
                now,
                expires_at,
                self.spec.refresh_before_expiry,
            )))
        };
        // Concurrent misses for the same caller token share one exchange.
        match cache.try_get_with(key, fetch).await {
            Ok(t) => {
                lock(gate).reset();
                Ok(t)
            }
            Err(e) => {
                self.counters.add(TokenCacheResult::Error);
                // A refused caller token is the caller's problem, not the provider's: no backoff.
                if e.is_transient() {
                    lock(gate).fail(now);
                }
                tracing::warn!(credential = %self.spec.name, error = %e, "backend credential: token exchange failed");
                Err(Unavailable::Failed(e.to_string()))
            }
        }
    }

    /// Number of cached token-exchange results.
    pub(super) fn exchange_entries(&self) -> Option<u64> {
        match &self.kind {
            Kind::TokenExchange(ex) => Some(ex.cache.entry_count()),
            _ => None,
        }
    }

    /// Seeds the `default` connection from a configured `refresh_token`, unless the store already
    /// holds one seeded from the same value (then the store's, possibly rotated, token wins).
    pub(super) async fn seed_configured_refresh_token(&self) {
        let Some(rt) = &self.spec.refresh_token else {
            return;
        };
        let Some(store) = self.shared.store() else {
            return;
        };
        let digest = hex::encode(Sha256::digest(rt.expose().as_bytes()));
        if let Backend::File(file) = store
            && file
                .get(&self.spec.name, DEFAULT_CONNECTION)
                .is_some_and(|r| r.seeded_from.as_deref() == Some(digest.as_str()))
        {
            return;
        }
        let now = unix_secs(self.now());
        let record = ConnectionRecord {
            state: ConnectionState::Connected,
            refresh_token: Some(rt.expose().to_string()),
            refresh_token_expires_at: None,
            error: None,
            seeded_from: Some(digest.clone()),
            issuer: None,
            subject: None,
            created_at: now,
            updated_at: now,
        };
        let slot = self.shared.slot(&self.spec.name, DEFAULT_CONNECTION);
        let _one_fetch = slot.fetch.lock().await;
        let written = match store {
            Backend::File(_) => self
                .shared
                .persist(&self.spec.name, DEFAULT_CONNECTION, record)
                .await
                .map(|()| true),
            Backend::Redis(r) => {
                super::fleet::seed(r, &self.spec.name, DEFAULT_CONNECTION, &digest, &record).await
            }
        };
        match written {
            Ok(false) => {}
            Ok(true) => {
                slot.clear();
                tracing::info!(credential = %self.spec.name, "connection `default` seeded from the configured refresh_token");
            }
            Err(e) => {
                tracing::error!(credential = %self.spec.name, error = %e, "cannot store the configured refresh_token")
            }
        }
    }
}

/// The refresh token a connection record holds, or why it cannot be refreshed.
pub(super) fn usable_refresh_token(record: &ConnectionRecord) -> Result<String, TokenError> {
    match (&record.state, &record.refresh_token) {
        (ConnectionState::NeedsConsent, _) | (_, None) => {
            Err(TokenError::RefreshTokenRejected("no refresh token".into()))
        }
        (_, Some(rt)) => Ok(rt.clone()),
    }
}

/// Applies a refresh answer to the record that sent `sent`: whether the refresh token rotated, and
/// whether the record changed (and must be stored before the access token is used).
pub(super) fn apply_refresh(
    record: &mut ConnectionRecord,
    issued: &Issued,
    sent: &str,
    now: SystemTime,
) -> (bool, bool) {
    let rotated = issued.refresh_token.as_ref().is_some_and(|new| new != sent);
    let changed = rotated || record.state != ConnectionState::Connected;
    if changed {
        if let Some(new) = &issued.refresh_token {
            record.refresh_token = Some(new.clone());
        }
        if let Some(exp) = issued.refresh_token_expires_at {
            record.refresh_token_expires_at = Some(unix_secs(exp));
        }
        record.state = ConnectionState::Connected;
        record.error = None;
        record.updated_at = unix_secs(now);
    }
    (rotated, changed)
}

/// What a failed refresh makes of the connection: needs consent (the token was refused), an error
/// (a configuration problem), or nothing (transient trouble at the provider changes nothing).
pub(super) fn apply_refresh_failure(
    record: &mut ConnectionRecord,
    e: &TokenError,
    now: SystemTime,
) -> bool {
    let state = match e {
        TokenError::RefreshTokenRejected(_) => ConnectionState::NeedsConsent,
        e if !e.is_transient() => ConnectionState::Error,
        _ => return false,
    };
    record.state = state;
    record.error = Some(e.to_string());
    record.updated_at = unix_secs(now);
    true
}

/// Retries a background refresh with exponential backoff and jitter (`backon`), on the injected
/// clock, while the error is transient and the current token still valid; after that, requests take
/// over (and deny rather than serve an expired token).
async fn refresh_with_backoff(
    weak: Weak<Credential>,
    slot: Arc<Slot>,
    connection: String,
    clock: Arc<dyn super::Clock>,
    fingerprint: [u8; 32],
) {
    let attempt = {
        let slot = slot.clone();
        move || refresh_attempt(weak.clone(), slot.clone(), connection.clone())
    };
    let _ = attempt
        .retry(super::cache::backoff())
        .sleep(clock_sleeper(clock.clone()))
        .when(while_valid(slot, clock, fingerprint))
        .await;
}

fn clock_sleeper(
    clock: Arc<dyn super::Clock>,
) -> impl Fn(Duration) -> super::clock::Sleep + Send + Sync + 'static {
    move |d| clock.sleep_until(clock.now() + d)
}

fn while_valid(
    slot: Arc<Slot>,
    clock: Arc<dyn super::Clock>,
    fingerprint: [u8; 32],
) -> impl FnMut(&TokenError) -> bool + Send + 'static {
    move |e| e.is_transient() && slot.valid(&fingerprint, clock.now()).is_some()
}

async fn refresh_attempt(
    weak: Weak<Credential>,
    slot: Arc<Slot>,
    connection: String,
) -> Result<(), TokenError> {
    // A reload that changed the credential's settings ends the refresh of the old version.
    let Some(cred) = weak.upgrade() else {
        return Ok(());
    };
    let _one_fetch = slot.fetch.lock().await;
    let now = cred.now();
    if slot
        .valid(&cred.fingerprint, now)
        .is_some_and(|t| t.fresh_at(now))
    {
        return Ok(());
    }
    // A background refresh waits for a permit: no caller waits on it.
    let _permit = cred.shared.fetch_permit().await;
    cred.counters.add(TokenCacheResult::Refresh);
    match cred.obtain(&connection, now, Need::Fresh).await {
        Ok(token) => {
            cred.install(&slot, Arc::new(token), &connection);
            Ok(())
        }
        Err(e) => {
            cred.failed(&slot, &e, now);
            Err(e)
        }
    }
}

fn lock(gate: &Mutex<Gate>) -> std::sync::MutexGuard<'_, Gate> {
    // Plain data; a panic while it was held cannot leave it inconsistent.
    gate.lock().unwrap_or_else(|p| p.into_inner())
}

/// "3s" for messages.
fn wait(now: SystemTime, until: SystemTime) -> String {
    let d = until.duration_since(now).unwrap_or(Duration::ZERO);
    humantime::format_duration(Duration::from_millis(
        d.as_millis().min(u128::from(u64::MAX)) as u64 / 100 * 100,
    ))
    .to_string()
}
