//! One identity provider and its signing keys: where they come from (OIDC discovery, a JWKS URI, a
//! file, the configuration), the last good key set, and the rules for fetching them again.
//!
//! Fetching rules (APIM's `openid-config` behaviour, made explicit):
//! - keys are fetched at start in the background and again every `cache_ttl`;
//! - a token whose `kid` is unknown triggers at most one re-fetch per `min_refetch_interval`, and
//!   concurrent checks share it (single flight: a thousand checks cause one fetch);
//! - a failed fetch keeps the last good keys; a provider that never obtained keys answers
//!   `IdentityProviderUnavailable` rather than calling every token invalid.
//!
//! The background task holds only a weak reference and a stop channel whose sender lives in the
//! provider: when a reload drops the provider, its task ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use reqwest::Url;
use tokio::sync::oneshot;

use super::jose::Algorithm;
use super::jwk::{self, JwksError, VerifyingKey};

/// Largest discovery or JWKS document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// What a registry may do on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchMode {
    /// Never fetch (`portcullis validate`).
    Offline,
    /// Fetch when a check needs keys; no background task (`portcullis check`).
    OnDemand,
    /// Fetch at start, refresh every `cache_ttl`, and on demand (`portcullis serve`).
    Background,
}

/// Where a provider's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `{issuer}/.well-known/openid-configuration` (or `discovery_url`) -> `jwks_uri`.
    Discovery(Url),
    /// A JWKS document at a URL.
    JwksUri(Url),
    /// A JWKS document in a local file, re-read like a remote one.
    File(PathBuf),
    /// Keys written in the configuration; never re-fetched.
    Inline,
}

impl KeySource {
    fn is_static(&self) -> bool {
        matches!(self, KeySource::Inline)
    }
}

/// Timing of fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchSettings {
    /// Period of the background refresh.
    pub cache_ttl: Duration,
    /// Least time between two fetches caused by checks (unknown `kid`, no keys yet).
    pub min_refetch_interval: Duration,
    /// Limit of one HTTP request, body included.
    pub fetch_timeout: Duration,
}

/// The keys a provider currently trusts.
#[derive(Debug)]
pub struct KeySet {
    /// The keys, in document order.
    pub keys: Vec<VerifyingKey>,
}

impl KeySet {
    /// Whether a key with this fingerprint is in the set.
    pub fn contains(&self, fingerprint: &[u8; 32]) -> bool {
        self.keys.iter().any(|k| &k.fingerprint == fingerprint)
    }

    fn same_keys(&self, other: &KeySet) -> bool {
        self.keys.len() == other.keys.len()
            && self.keys.iter().all(|k| other.contains(&k.fingerprint))
    }
}

/// Why keys could not be obtained. Never contains a secret: URLs and paths come from the config.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The registry is offline.
    #[error("fetching is disabled here (offline)")]
    Offline,
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
    /// Connecting, sending or reading failed, or the timeout passed.
    #[error("{url}: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// A non-2xx answer.
    #[error("{url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The document is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("{0}: the document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge(String),
    /// The discovery document is unusable.
    #[error("discovery document {url}: {message}")]
    Discovery {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The discovery document names another issuer.
    #[error("discovery document {url} names issuer `{found}`, the configuration `{expected}`")]
    IssuerMismatch {
        /// The URL.
        url: String,
        /// The configured issuer.
        expected: String,
        /// The document's issuer.
        found: String,
    },
    /// The JWKS document is unusable.
    #[error("JWKS {source_name}: {error}")]
    Jwks {
        /// URL or path.
        source_name: String,
        /// What is wrong.
        error: JwksError,
    },
    /// The JWKS file could not be read.
    #[error("{0}")]
    File(String),
}

/// Fetch counts of one provider (`portcullis.jwks.fetches`).
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Successful fetches.
    pub ok: AtomicU64,
    /// Failed fetches.
    pub failed: AtomicU64,
    /// Introspection requests answered `active: true` (`portcullis.introspection.requests`).
    pub introspection_active: AtomicU64,
    /// Introspection requests answered `active: false`.
    pub introspection_inactive: AtomicU64,
    /// Introspection requests without a usable answer.
    pub introspection_errors: AtomicU64,
}

struct RefetchState {
    /// When the last fetch (of any cause) started.
    last_attempt: Option<SystemTime>,
    /// `jwks_uri` from the last discovery document.
    jwks_uri: Option<Url>,
}

/// One identity provider.
pub struct Provider {
    /// Unique in the process: tells two generations of a same-named provider apart.
    pub id: u64,
    /// `identity_providers[].name`.
    pub name: Arc<str>,
    /// `identity_providers[].issuer`.
    pub issuer: String,
    /// Algorithms this provider's tokens may use.
    pub algorithms: Vec<Algorithm>,
    /// The Entra ID preset's tenant: its issuers replace `issuer`.
    pub entra: Option<super::entra::Tenant>,
    source: KeySource,
    settings: FetchSettings,
    mode: FetchMode,
    http: Option<reqwest::Client>,
    keys: ArcSwapOption<KeySet>,
    /// Single flight: whoever holds it fetches; the others wait, then use what it got.
    refetch: tokio::sync::Mutex<RefetchState>,
    /// Finished fetch attempts, successful or not; a waiter that sees it change knows a fetch
    /// happened while it waited.
    attempts: AtomicU64,
    /// Fetch counts of this provider.
    pub stats: FetchStats,
    /// RFC 7662 introspection of opaque tokens, when configured.
    pub introspection: Option<super::introspection::Introspector>,
    /// Fetch counts of every provider of this name the registry has held, for metrics: they
    /// survive a settings change, which replaces the provider.
    totals: Arc<FetchStats>,
    /// Dropped with the provider, which ends the background task.
    _stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Everything a provider is made of, from the configuration.
#[derive(Debug)]
pub struct ProviderSpec {
    /// Name.
    pub name: String,
    /// Issuer.
    pub issuer: String,
    /// The Entra ID preset's tenant.
    pub entra: Option<super::entra::Tenant>,
    /// Key source.
    pub source: KeySource,
    /// Keys known at compile time (inline keys, or the file's current contents).
    pub initial_keys: Option<KeySet>,
    /// Allowed algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Timing.
    pub settings: FetchSettings,
    /// `introspection`.
    pub introspection: Option<super::introspection::IntrospectionSpec>,
}

impl Provider {
    /// Creates a provider; in [`FetchMode::Background`] inside a tokio runtime, also its refresh task.
    pub fn new(
        spec: ProviderSpec,
        mode: FetchMode,
        http: Option<reqwest::Client>,
        totals: Arc<FetchStats>,
    ) -> Arc<Provider> {
        let background = mode == FetchMode::Background
            && !spec.source.is_static()
            && tokio::runtime::Handle::try_current().is_ok();
        let (stop_tx, stop_rx) = if background {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let first_fetch_now = !matches!(spec.source, KeySource::File(_));
        let introspection = spec.introspection.map(|i| {
            super::introspection::Introspector::new(
                i,
                Arc::from(spec.name.as_str()),
                spec.issuer.clone(),
                mode,
                http.clone(),
                spec.settings.fetch_timeout,
                totals.clone(),
            )
        });
        let provider = Arc::new(Provider {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: Arc::from(spec.name.as_str()),
            issuer: spec.issuer,
            algorithms: spec.algorithms,
            entra: spec.entra,
            source: spec.source,
            settings: spec.settings,
            mode,
            http,
            keys: ArcSwapOption::new(spec.initial_keys.map(Arc::new)),
            refetch: tokio::sync::Mutex::new(RefetchState {
                last_attempt: None,
                jwks_uri: None,
            }),
            attempts: AtomicU64::new(0),
            stats: FetchStats::default(),
            introspection,
            totals,
            _stop: stop_tx,
        });
        if let Some(stop) = stop_rx {
            tokio::spawn(refresh_task(
                Arc::downgrade(&provider),
                stop,
                first_fetch_now,
            ));
        }
        provider
    }

    /// The current keys; `None` when none were ever obtained.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// Whether `iss` is this provider's issuer (an Entra tenant has two).
    pub fn accepts_issuer(&self, iss: &str) -> bool {
        match &self.entra {
            Some(tenant) => tenant.issuer_form(iss).is_some(),
            None => iss == self.issuer,
        }
    }

    /// Whether a discovery document's `issuer` is the one asked for. An Entra tenant named by
    /// domain learns its GUID from it.
    fn discovery_issuer_ok(&self, found: &str) -> bool {
        match &self.entra {
            Some(tenant) => tenant.accept_discovery_issuer(found),
            None => found == self.issuer,
        }
    }

    /// Whether tokens of this algorithm may come from this provider.
    pub fn allows(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }

    /// Finished fetch attempts so far.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// Whether a check may cause a fetch here at all.
    pub fn can_refetch(&self) -> bool {
        self.mode != FetchMode::Offline && !self.source.is_static()
    }

    /// Whether the first fetch was attempted (or was not needed).
    pub fn first_fetch_attempted(&self) -> bool {
        self.source.is_static()
            || self.keys.load().is_some()
            || self.attempts() > 0
            || self.mode == FetchMode::Offline
    }

    /// Re-fetches because a check found no usable key. `seen_attempts` is [`Provider::attempts`] as
    /// the caller saw it before looking at the keys: if a fetch finished since, there is nothing to
    /// do. At most one fetch per `min_refetch_interval` (measured on `now`, the check's clock).
    pub async fn refetch_for_check(&self, now: SystemTime, seen_attempts: u64) {
        if !self.can_refetch() {
            return;
        }
        let mut state = self.refetch.lock().await;
        if self.attempts() != seen_attempts {
            return;
        }
        if let Some(last) = state.last_attempt {
            // A clock that went backwards counts as "just now": no fetch storm from clock steps.
            let elapsed = now.duration_since(last).unwrap_or(Duration::ZERO);
            if elapsed < self.settings.min_refetch_interval {
                tracing::debug!(provider = %self.name, "unknown key: re-fetch suppressed by min_refetch_interval");
                return;
            }
        }
        state.last_attempt = Some(now);
        // An unknown kid means the key set changed; the discovery document rarely does.
        self.fetch_and_install(&mut state, false).await;
    }

    /// The scheduled refresh: discovery again, then keys. True when it succeeded.
    async fn refresh_scheduled(&self) -> bool {
        let mut state = self.refetch.lock().await;
        state.last_attempt = Some(SystemTime::now());
        self.fetch_and_install(&mut state, true).await
    }

    /// Replaces the keys with ones read at compile time (a `jwks_file` on reload).
    pub fn offer_keys(&self, keys: KeySet) {
        let unchanged = self
            .keys
            .load()
            .as_ref()
            .is_some_and(|cur| cur.same_keys(&keys));
        if !unchanged {
            tracing::info!(provider = %self.name, keys = keys.keys.len(), "signing keys replaced from the configuration");
            self.keys.store(Some(Arc::new(keys)));
        }
    }

    async fn fetch_and_install(&self, state: &mut RefetchState, rediscover: bool) -> bool {
        use tracing::Instrument;
        // A child of the check span when a check triggered the fetch; its own trace otherwise.
        let span = tracing::info_span!("jwks.fetch", provider = %self.name);
        let result = self.fetch(state, rediscover).instrument(span).await;
        let ok = match result {
            Ok(parsed) => {
                for (name, why) in &parsed.skipped {
                    tracing::debug!(provider = %self.name, key = %name, reason = %why, "JWKS key skipped");
                }
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                self.totals.ok.fetch_add(1, Ordering::Relaxed);
                let keys = KeySet { keys: parsed.keys };
                tracing::info!(provider = %self.name, result = "ok", keys = keys.keys.len(), skipped = parsed.skipped.len(), "signing keys fetched");
                self.keys.store(Some(Arc::new(keys)));
                true
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.totals.failed.fetch_add(1, Ordering::Relaxed);
                let kept = self.keys.load().is_some();
                tracing::warn!(provider = %self.name, result = "error", error = %e, kept_last_good_keys = kept, "signing keys could not be fetched");
                false
            }
        };
        self.attempts.fetch_add(1, Ordering::AcqRel);
        ok
    }

    async fn fetch(
        &self,
        state: &mut RefetchState,
        rediscover: bool,
    ) -> Result<jwk::ParsedJwks, FetchError> {
        let jwks_from = |bytes: Vec<u8>, source_name: String| {
            jwk::parse_jwks(&bytes).map_err(|error| FetchError::Jwks { source_name, error })
        };
        if self.mode == FetchMode::Offline {
            return Err(FetchError::Offline);
        }
        let url = match &self.source {
            KeySource::Inline => return Err(FetchError::Offline),
            KeySource::File(path) => {
                let bytes = read_capped_file(path).await?;
                return jwks_from(bytes, path.display().to_string());
            }
            KeySource::JwksUri(url) => url.clone(),
            KeySource::Discovery(discovery) => match (&state.jwks_uri, rediscover) {
                (Some(u), false) => u.clone(),
                _ => {
                    let u = self.discover(discovery).await?;
                    state.jwks_uri = Some(u.clone());
                    u
                }
            },
        };
        let bytes = self.get(&url).await?;
        jwks_from(bytes, url.to_string())
    }

    async fn discover(&self, url: &Url) -> Result<Url, FetchError> {
        let bytes = self.get(url).await?;
        let bad = |message: String| FetchError::Discovery {
            url: url.to_string(),
            message,
        };
        let doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let issuer = doc
            .get("issuer")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no `issuer`".into()))?;
        // OpenID Connect Discovery 1.0, section 4.3: the issuer must be identical to the one asked for.
        if !self.discovery_issuer_ok(issuer) {
            return Err(FetchError::IssuerMismatch {
                url: url.to_string(),
                expected: self.issuer.clone(),
                found: issuer.chars().take(200).collect(),
            });
        }
        let jwks = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no `jwks_uri`".into()))?;
        let jwks = Url::parse(jwks).map_err(|e| bad(format!("`jwks_uri` is not a URL: {e}")))?;
        if !matches!(jwks.scheme(), "http" | "https") {
            return Err(bad("`jwks_uri` is not an http(s) URL".into()));
        }
        if url.scheme() == "https" && jwks.scheme() != "https" {
            return Err(bad(
                "`jwks_uri` is plain http in a document served over https".into(),
            ));
        }
        Ok(jwks)
    }

    async fn get(&self, url: &Url) -> Result<Vec<u8>, FetchError> {
        let transport = |e: reqwest::Error| FetchError::Transport {
            url: url.to_string(),
            message: error_chain(&e),
        };
        let client = self
            .http
            .as_ref()
            .ok_or_else(|| FetchError::Client("no HTTP client".into()))?;
        let req = client
            .get(url.clone())
            .timeout(self.settings.fetch_timeout)
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/jwk-set+json",
            );
        send_capped(req, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::Transport(e) => transport(e),
                BodyError::Status(status) => FetchError::Status {
                    url: url.to_string(),
                    status,
                },
                BodyError::TooLarge => FetchError::TooLarge(url.to_string()),
            })
    }
}

/// Why a capped answer could not be read.
pub(crate) enum BodyError {
    /// Connecting, sending or reading failed, or the timeout passed.
    Transport(reqwest::Error),
    /// A non-2xx answer.
    Status(u16),
    /// The declared or the read length passed the cap.
    TooLarge,
}

/// Sends `req` and reads at most `max` bytes of a 2xx answer: the declared length is checked
/// before reading, the read length while reading (a body never costs more than the cap).
pub(crate) async fn send_capped(
    req: reqwest::RequestBuilder,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut resp = req.send().await.map_err(BodyError::Transport)?;
    if !resp.status().is_success() {
        return Err(BodyError::Status(resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads a JWKS file of at most [`MAX_DOCUMENT_BYTES`].
pub async fn read_capped_file(path: &std::path::Path) -> Result<Vec<u8>, FetchError> {
    let err = |e: std::io::Error| FetchError::File(format!("cannot read {}: {e}", path.display()));
    // Bounded while reading too: a device or a growing file stops at the cap.
    let owned = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        crate::config::limits::read_bytes_at_most(&owned, MAX_DOCUMENT_BYTES as u64)
    })
    .await
    .map_err(|e| err(std::io::Error::other(e)))?;
    match read.map_err(err)? {
        Some(bytes) => Ok(bytes),
        None => Err(FetchError::TooLarge(path.display().to_string())),
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); the chain says it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn refresh_task(
    provider: Weak<Provider>,
    mut stop: oneshot::Receiver<()>,
    mut fetch_now: bool,
) {
    let mut wait = match provider.upgrade() {
        Some(p) if !fetch_now => p.settings.cache_ttl,
        Some(_) => Duration::ZERO,
        None => return,
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // The sender lives in the provider: this resolves when the provider is dropped.
            _ = &mut stop => return,
        }
        let Some(p) = provider.upgrade() else { return };
        // A check may have fetched first (before this task ever ran): that was the first fetch.
        if fetch_now && p.attempts() > 0 && p.keys().is_some() {
            fetch_now = false;
            wait = p.settings.cache_ttl;
            continue;
        }
        fetch_now = false;
        wait = if p.refresh_scheduled().await {
            p.settings.cache_ttl
        } else {
            p.settings.min_refetch_interval
        };
    }
}
