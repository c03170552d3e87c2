//! `client_certificate.trust.crl_urls`: CRLs fetched over HTTP in the background, the way signing
//! keys are (`identity::provider`).
//!
//! - each URL has one fetcher, shared by every policy set that names it with the same timing (a
//!   reload keeps its last good CRL: no refusals while a new policy set fetches again);
//! - the fetcher's task fetches at start, then again every `crl_refresh`, or as soon as the CRL's
//!   `nextUpdate` is reached when that is earlier, never more often than [`MIN_REFETCH`] (or
//!   `crl_refresh`, when that is shorter); after a failure it retries after the same floor;
//! - one task per URL is the single flight: checks never fetch;
//! - a failed fetch, a body over [`MAX_CRL_BYTES`] or one that does not parse as CRLs keeps the
//!   last good CRL; failures are counted (`portcullis.crl.fetches`);
//! - the task holds a weak reference and ends when no policy set uses the fetcher any more.
//!
//! `serve` fetches in the background; `check` fetches each URL once, when asked
//! ([`CrlRegistry::fetch_unobtained`]), before it decides; `validate` never fetches (a URL's CRL
//! is then never obtained).
//!
//! Each CRL installed bumps [`generation`]: a verified chain cached under an older generation is
//! verified again, so a newly revoked certificate is refused at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use reqwest::Url;
use tokio::sync::oneshot;
use webpki::CertRevocationList;

use crate::identity::provider::FetchMode;

/// Largest CRL body accepted (checked on Content-Length and while reading).
pub const MAX_CRL_BYTES: usize = 8 * 1024 * 1024;

/// Least time between two fetches of one URL (unless `crl_refresh` is shorter).
pub const MIN_REFETCH: Duration = Duration::from_secs(30);

/// Default of `crl_refresh`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);

/// Default of `crl_fetch_timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Changes whenever a fetched CRL is installed anywhere in the process.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Whether a URL names a loopback host (where plain http is allowed, as for JWKS URLs).
pub fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

/// Timing of one URL's fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CrlTiming {
    /// `crl_refresh`.
    pub refresh: Duration,
    /// `crl_fetch_timeout`: one HTTP request, body included.
    pub timeout: Duration,
}

/// Fetch counts (`portcullis.crl.fetches`).
#[derive(Debug, Default)]
pub struct CrlStats {
    /// Fetches that installed a CRL.
    pub ok: AtomicU64,
    /// Fetches that failed (transport, status, size, unparsable body).
    pub failed: AtomicU64,
}

/// CRLs as obtained from one URL.
#[derive(Debug)]
pub struct Fetched {
    /// The CRLs of the body.
    pub crls: Vec<CertRevocationList<'static>>,
    /// The earliest `nextUpdate`, seconds since the epoch.
    pub next_update: Option<i64>,
}

/// One `crl_urls` entry.
pub struct UrlCrl {
    url: Url,
    timing: CrlTiming,
    http: Option<reqwest::Client>,
    current: ArcSwapOption<Fetched>,
    /// A background task fetches this URL.
    background: bool,
    /// Finished fetch attempts.
    attempts: AtomicU64,
    /// Counts under the API that first named this URL (and every later generation of it).
    totals: Arc<CrlStats>,
    _stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for UrlCrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlCrl")
            .field("url", &self.url.as_str())
            .field("obtained", &self.current.load().is_some())
            .finish_non_exhaustive()
    }
}

impl UrlCrl {
    /// The last good CRLs; `None` when none was ever obtained.
    pub fn current(&self) -> Option<Arc<Fetched>> {
        self.current.load_full()
    }

    /// The URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Whether the first fetch was attempted (or none will be: offline, no runtime).
    pub fn first_fetch_attempted(&self) -> bool {
        !self.background || self.attempts.load(Ordering::Acquire) > 0
    }

    async fn fetch_and_install(&self) -> Option<Option<i64>> {
        match self.fetch().await {
            Ok(fetched) => {
                let next = fetched.next_update;
                tracing::info!(url = %self.url, crls = fetched.crls.len(), result = "ok", "CRL fetched");
                self.current.store(Some(Arc::new(fetched)));
                GENERATION.fetch_add(1, Ordering::AcqRel);
                self.totals.ok.fetch_add(1, Ordering::Relaxed);
                Some(next)
            }
            Err(e) => {
                self.totals.failed.fetch_add(1, Ordering::Relaxed);
                let kept = self.current.load().is_some();
                tracing::warn!(url = %self.url, result = "error", error = %e, kept_last_good_crl = kept, "CRL could not be fetched");
                None
            }
        }
    }

    async fn fetch(&self) -> Result<Fetched, String> {
        let client = self.http.as_ref().ok_or("no HTTP client")?;
        let transport = |e: reqwest::Error| {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            s
        };
        let mut resp = client
            .get(self.url.clone())
            .timeout(self.timing.timeout)
            .header(
                reqwest::header::ACCEPT,
                "application/pkix-crl, application/x-pem-file",
            )
            .send()
            .await
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let too_large = || format!("the CRL is larger than {MAX_CRL_BYTES} bytes");
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_CRL_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_CRL_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let (crls, next_update) = super::trust::parse_crls(&body)?;
        if crls.is_empty() {
            return Err("no CRL in the body".into());
        }
        Ok(Fetched { crls, next_update })
    }
}

/// The wait after a fetch: `refresh`, or until `nextUpdate` when earlier, never under the floor.
fn next_wait(timing: CrlTiming, next_update: Option<Option<i64>>) -> Duration {
    let floor = MIN_REFETCH.min(timing.refresh);
    match next_update {
        None => floor,
        Some(None) => timing.refresh,
        Some(Some(t)) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let until = Duration::from_secs(t.saturating_sub(now).max(0) as u64);
            until.clamp(floor, timing.refresh.max(floor))
        }
    }
}

async fn refresh_task(crl: Weak<UrlCrl>, mut stop: oneshot::Receiver<()>) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // The sender lives in the fetcher: this resolves when the fetcher is dropped.
            _ = &mut stop => return,
        }
        let Some(c) = crl.upgrade() else { return };
        let outcome = c.fetch_and_install().await;
        c.attempts.fetch_add(1, Ordering::AcqRel);
        wait = next_wait(c.timing, outcome);
    }
}

/// The CRL fetchers of a process: one per URL and timing, shared across reloads.
#[derive(Debug)]
pub struct CrlRegistry {
    mode: FetchMode,
    fetchers: Mutex<HashMap<(String, CrlTiming), Weak<UrlCrl>>>,
    /// Fetch counts by API name.
    totals: Mutex<BTreeMap<String, Arc<CrlStats>>>,
}

impl Default for CrlRegistry {
    fn default() -> Self {
        CrlRegistry::with_mode(FetchMode::Background)
    }
}

impl CrlRegistry {
    /// A registry that never fetches (`validate`): CRLs of URLs are never obtained.
    pub fn offline() -> Self {
        CrlRegistry::with_mode(FetchMode::Offline)
    }

    /// A registry that fetches only when asked ([`CrlRegistry::fetch_unobtained`]; `check`).
    pub fn on_demand() -> Self {
        CrlRegistry::with_mode(FetchMode::OnDemand)
    }

    /// Fetches, once and concurrently, every URL in use whose CRL was never obtained (`check`,
    /// before it decides). Nothing in other modes.
    pub async fn fetch_unobtained(&self) {
        if self.mode != FetchMode::OnDemand {
            return;
        }
        let pending: Vec<Arc<UrlCrl>> = {
            let map = self.fetchers.lock().unwrap_or_else(|p| p.into_inner());
            map.values()
                .filter_map(Weak::upgrade)
                .filter(|c| c.current.load().is_none())
                .collect()
        };
        futures::future::join_all(pending.iter().map(|c| async move {
            c.fetch_and_install().await;
            c.attempts.fetch_add(1, Ordering::AcqRel);
        }))
        .await;
    }

    fn with_mode(mode: FetchMode) -> Self {
        CrlRegistry {
            mode,
            fetchers: Mutex::new(HashMap::new()),
            totals: Mutex::new(BTreeMap::new()),
        }
    }

    /// The fetcher of `url` for `api`, reused when a live one has the same timing. Without a tokio
    /// runtime or offline, nothing is fetched.
    pub fn fetcher(
        &self,
        api: &str,
        url: &Url,
        timing: CrlTiming,
        http: impl FnOnce() -> Option<reqwest::Client>,
    ) -> Arc<UrlCrl> {
        let mut map = self.fetchers.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        let key = (url.to_string(), timing);
        if let Some(live) = map.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        let background =
            self.mode == FetchMode::Background && tokio::runtime::Handle::try_current().is_ok();
        let totals = self
            .totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(api.to_string())
            .or_default()
            .clone();
        let (tx, rx) = if background {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let crl = Arc::new(UrlCrl {
            url: url.clone(),
            timing,
            http: if self.mode == FetchMode::Offline {
                None
            } else {
                http()
            },
            current: ArcSwapOption::empty(),
            background,
            attempts: AtomicU64::new(0),
            totals,
            _stop: tx,
        });
        if let Some(rx) = rx {
            tokio::spawn(refresh_task(Arc::downgrade(&crl), rx));
        }
        map.insert(key, Arc::downgrade(&crl));
        crl
    }

    /// Whether every fetcher in use attempted its first fetch (for the readiness probe).
    pub fn first_fetch_attempted(&self) -> bool {
        let map = self.fetchers.lock().unwrap_or_else(|p| p.into_inner());
        map.values()
            .filter_map(Weak::upgrade)
            .all(|c| c.first_fetch_attempted())
    }

    /// `(api, successes, failures)` of every API that named a CRL URL (`portcullis.crl.fetches`).
    pub fn fetches(&self) -> Vec<(String, u64, u64)> {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(api, s)| {
                (
                    api.clone(),
                    s.ok.load(Ordering::Relaxed),
                    s.failed.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_honours_next_update_refresh_and_the_floor() {
        let t = CrlTiming {
            refresh: Duration::from_secs(3600),
            timeout: DEFAULT_TIMEOUT,
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(next_wait(t, Some(None)), Duration::from_secs(3600));
        assert_eq!(
            next_wait(t, None),
            MIN_REFETCH,
            "a failure retries at the floor"
        );
        let w = next_wait(t, Some(Some(now + 600)));
        assert!(w <= Duration::from_secs(600) && w > Duration::from_secs(590));
        assert_eq!(
            next_wait(t, Some(Some(now - 5))),
            MIN_REFETCH,
            "stale: floor"
        );
        assert_eq!(next_wait(t, Some(Some(now + 86_400))), t.refresh);
        let short = CrlTiming {
            refresh: Duration::from_secs(1),
            timeout: DEFAULT_TIMEOUT,
        };
        assert_eq!(next_wait(short, None), Duration::from_secs(1));
    }
}
