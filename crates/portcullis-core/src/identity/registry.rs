//! The identity providers of a process and what they share: key fetch modes, the HTTP client,
//! the verified-token cache and the counts telemetry reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use super::cache::{self, TokenCache};
use super::provider::{self, FetchMode, Provider};

/// Default of `limits.max_concurrent_fetches` (the credentials' default: identity does not use
/// that module).
const DEFAULT_MAX_FETCHES: usize = 64;

/// Identity providers and the verified-token cache; lives across reloads, so a reload that leaves a
/// provider's settings alone keeps its keys (no fetch) and its verified tokens.
pub struct Registry {
    pub(super) mode: FetchMode,
    /// Providers by the digest of their settings. Weak: the policy sets own them, and a provider no
    /// policy uses any more is dropped (ending its refresh task).
    pub(super) providers: Mutex<HashMap<[u8; 32], Weak<Provider>>>,
    /// Fetch counts by provider name, across every generation of that provider.
    pub(super) fetch_totals: Mutex<BTreeMap<String, Arc<provider::FetchStats>>>,
    pub(super) shared: Arc<Shared>,
    pub(super) http: OnceLock<Option<reqwest::Client>>,
}

/// State every JWT policy of a registry shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(super) cache: TokenCache,
    pub(super) signature_checks: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    /// Introspection answers by (provider, token hash).
    pub(super) introspection: super::introspection::IntrospectionCache,
    pub(super) introspection_hits: AtomicU64,
    /// Introspection requests in flight, capped by `limits.max_concurrent_fetches` (the same cap as
    /// token endpoint requests, on a semaphore of its own), with the cap it was made for.
    pub(super) fetches: Mutex<(usize, Arc<tokio::sync::Semaphore>)>,
    /// DPoP proof `jti`s seen within their window.
    pub(super) dpop_replay: super::dpop::ReplayCache,
    /// The same, across replicas, once the shared store is open.
    pub(super) shared_replay: OnceLock<Arc<dyn super::dpop::SharedReplay>>,
}

impl Shared {
    /// A permit for one introspection request, or `None` when the cap is reached (the check fails
    /// closed at once rather than queueing behind a slow endpoint).
    pub(super) fn try_fetch_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = self
            .fetches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone();
        sem.try_acquire_owned().ok()
    }

    /// Applies `limits.max_concurrent_fetches`; requests holding a permit of the old cap finish.
    pub(super) fn set_max_fetches(&self, max: usize) {
        let mut f = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
        if f.0 != max {
            *f = (max, Arc::new(tokio::sync::Semaphore::new(max)));
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("mode", &self.mode)
            .field("providers", &self.live_providers().len())
            .finish_non_exhaustive()
    }
}

impl Default for Registry {
    /// A registry for the service: keys are fetched at start, refreshed in the background and
    /// re-fetched on demand.
    fn default() -> Self {
        Registry::with_mode(FetchMode::Background)
    }
}

/// Counters of a registry, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// Signature verifications performed (each key tried counts).
    pub signature_verifications: u64,
    /// Checks answered from the verified-token cache.
    pub cache_hits: u64,
    /// Introspection answers reused from the introspection cache.
    pub introspection_cache_hits: u64,
}

/// The state of one live provider (`portcullis.jwks.fetches` and readiness).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    /// Its name.
    pub name: String,
    /// Keys currently trusted; `None` when none were ever obtained.
    pub keys: Option<usize>,
    /// Successful fetches.
    pub fetches_ok: u64,
    /// Failed fetches.
    pub fetches_failed: u64,
    /// Whether the first fetch was attempted (or none is needed).
    pub first_fetch_attempted: bool,
}

impl Registry {
    /// A registry that never fetches (`portcullis validate`).
    pub fn offline() -> Self {
        Registry::with_mode(FetchMode::Offline)
    }

    /// A registry that fetches keys when a check needs them and runs nothing in the background
    /// (`portcullis check`).
    pub fn on_demand() -> Self {
        Registry::with_mode(FetchMode::OnDemand)
    }

    pub(super) fn with_mode(mode: FetchMode) -> Self {
        Registry {
            mode,
            providers: Mutex::new(HashMap::new()),
            fetch_totals: Mutex::new(BTreeMap::new()),
            shared: Arc::new(Shared {
                cache: TokenCache::new(cache::MAX_BYTES),
                signature_checks: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                introspection: super::introspection::IntrospectionCache::new(
                    super::introspection::CACHE_MAX_BYTES,
                ),
                introspection_hits: AtomicU64::new(0),
                fetches: Mutex::new((
                    DEFAULT_MAX_FETCHES,
                    Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_FETCHES)),
                )),
                dpop_replay: super::dpop::ReplayCache::new(),
                shared_replay: OnceLock::new(),
            }),
            http: OnceLock::new(),
        }
    }

    /// Checks DPoP replays across replicas through `shared` too, from now on (set once, when the
    /// shared store opens; later calls change nothing).
    pub fn share_replays(&self, shared: Arc<dyn super::dpop::SharedReplay>) {
        let _ = self.shared.shared_replay.set(shared);
    }

    /// Counters.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            signature_verifications: self.shared.signature_checks.load(Ordering::Relaxed),
            cache_hits: self.shared.cache_hits.load(Ordering::Relaxed),
            introspection_cache_hits: self.shared.introspection_hits.load(Ordering::Relaxed),
        }
    }

    /// `portcullis.introspection.requests`: (provider name, active, inactive, error) of every
    /// provider name this registry has held, counted across settings changes.
    pub fn introspection_requests(&self) -> Vec<(String, u64, u64, u64)> {
        let totals = self.fetch_totals.lock().unwrap_or_else(|p| p.into_inner());
        totals
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.introspection_active.load(Ordering::Relaxed),
                    s.introspection_inactive.load(Ordering::Relaxed),
                    s.introspection_errors.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// `portcullis.jwks.fetches`: (provider name, successful fetches, failed fetches) of every
    /// provider name this registry has held, counted across settings changes.
    pub fn jwks_fetches(&self) -> Vec<(String, u64, u64)> {
        let totals = self.fetch_totals.lock().unwrap_or_else(|p| p.into_inner());
        totals
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.ok.load(Ordering::Relaxed),
                    s.failed.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// The running fetch counts of provider `name`, shared by its generations.
    pub(super) fn fetch_totals(&self, name: &str) -> Arc<provider::FetchStats> {
        let mut totals = self.fetch_totals.lock().unwrap_or_else(|p| p.into_inner());
        totals.entry(name.to_string()).or_default().clone()
    }

    /// Every provider some policy set still uses.
    pub fn providers(&self) -> Vec<ProviderStatus> {
        self.live_providers()
            .iter()
            .map(|p| ProviderStatus {
                name: p.name.to_string(),
                keys: p.keys().map(|k| k.keys.len()),
                fetches_ok: p.stats.ok.load(Ordering::Relaxed),
                fetches_failed: p.stats.failed.load(Ordering::Relaxed),
                first_fetch_attempted: p.first_fetch_attempted(),
            })
            .collect()
    }

    /// Whether every provider attempted its first fetch (for a readiness probe).
    pub fn first_fetch_attempted(&self) -> bool {
        self.live_providers()
            .iter()
            .all(|p| p.first_fetch_attempted())
    }

    pub(super) fn live_providers(&self) -> Vec<Arc<Provider>> {
        let map = self.providers.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter_map(Weak::upgrade).collect()
    }

    /// The HTTP client for key fetches, built once. `None` when offline or when it cannot be built
    /// (then every fetch fails and says so).
    pub(crate) fn http(&self) -> Option<reqwest::Client> {
        if self.mode == FetchMode::Offline {
            return None;
        }
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
                    .redirect(redirect_policy())
                    .connect_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| tracing::error!(error = %e, "cannot build the HTTP client for key fetches"))
                    .ok()
            })
            .clone()
    }
}

/// At most three redirects, and never from https to plain http: keys fetched over https must not be
/// downgraded to a channel anyone on the path can rewrite.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            attempt.error("redirect from https to http refused")
        } else if attempt.previous().len() > 3 {
            attempt.error("more than 3 redirects")
        } else {
            attempt.follow()
        }
    })
}
