//! The token cache: one slot per credential connection holding the current access token, the
//! single-flight lock for fetching a new one, and the backoff gate after failures.
//!
//! Lifetime rules (API Management's): a token is *fresh* until `refresh_before_expiry` before it
//! expires, or until it expires when its whole lifetime is shorter. A fresh token is served as is.
//! Past that it is still served while it is valid, and a background refresh replaces it; an expired
//! token is never served.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use super::endpoint::Issued;

/// Delays between attempts after failures: exponential from 500 ms to 1 min, with jitter so that
/// many instances do not retry in step.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(60))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// An access token in the cache.
pub struct Token {
    /// The token itself.
    pub value: String,
    /// Settings digest of the credential that obtained it: a token from other settings is a miss.
    pub fingerprint: [u8; 32],
    /// When it was obtained.
    pub obtained_at: SystemTime,
    /// Served without refreshing until then.
    pub fresh_until: SystemTime,
    /// Never served from then on.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("fresh_until", &self.fresh_until)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// A token obtained at `now` whose lifetime ends at `expires_at`.
    pub fn new(
        value: String,
        fingerprint: [u8; 32],
        now: SystemTime,
        expires_at: SystemTime,
        refresh_before_expiry: Duration,
    ) -> Token {
        let lifetime = expires_at.duration_since(now).unwrap_or(Duration::ZERO);
        let fresh_until = if lifetime > refresh_before_expiry {
            expires_at - refresh_before_expiry
        } else {
            expires_at
        };
        Token {
            value,
            fingerprint,
            obtained_at: now,
            fresh_until,
            expires_at,
        }
    }

    /// From a token endpoint answer.
    pub fn issued(
        i: &Issued,
        fingerprint: [u8; 32],
        now: SystemTime,
        refresh_before_expiry: Duration,
    ) -> Token {
        Token::new(
            i.access_token.clone(),
            fingerprint,
            now,
            i.expires_at,
            refresh_before_expiry,
        )
    }

    /// Whether it may be served at `now`.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }

    /// Whether it may be served without refreshing.
    pub fn fresh_at(&self, now: SystemTime) -> bool {
        now < self.fresh_until
    }
}

/// No attempts before `until` after a failure; the delays grow exponentially while failures go on.
#[derive(Debug, Default)]
pub struct Gate {
    until: Option<SystemTime>,
    delays: Option<ExponentialBackoff>,
}

impl Gate {
    /// When the next attempt is allowed, if that is later than `now`.
    pub fn closed_until(&self, now: SystemTime) -> Option<SystemTime> {
        self.until.filter(|u| *u > now)
    }

    /// Records a failure at `now`.
    pub fn fail(&mut self, now: SystemTime) -> SystemTime {
        let d = self
            .delays
            .get_or_insert_with(|| backoff().build())
            .next()
            .unwrap_or(Duration::from_secs(60));
        let until = now + d;
        self.until = Some(until);
        until
    }

    /// Records a success.
    pub fn reset(&mut self) {
        self.until = None;
        self.delays = None;
    }
}

/// One connection's place in the cache.
#[derive(Default)]
pub struct Slot {
    /// The current token; read without locking on every request.
    pub token: ArcSwapOption<Token>,
    /// Held while fetching: concurrent misses wait for the one fetch instead of each fetching.
    pub fetch: tokio::sync::Mutex<()>,
    /// Backoff and the last failure.
    pub meta: Mutex<SlotMeta>,
    /// A background refresh is running.
    pub refreshing: AtomicBool,
    /// Refresh ahead of expiry even when no request asks (shared connections).
    pub proactive: AtomicBool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("token", &self.token.load())
            .finish_non_exhaustive()
    }
}

/// What a slot remembers about failures.
#[derive(Debug, Default)]
pub struct SlotMeta {
    /// Backoff after failures.
    pub gate: Gate,
    /// The last failure, safe to show.
    pub last_error: Option<String>,
    /// When a check last looked for the fleet's token while this slot was backing off
    /// (`store.redis`): at most one look per [`PEEK_INTERVAL`].
    pub last_peek: Option<std::time::Instant>,
}

/// While a slot backs off after a failure, how often a check may look in the shared store for a
/// token another replica obtained (so a replica recovers as soon as the fleet does, not when its
/// own backoff ends).
pub const PEEK_INTERVAL: Duration = Duration::from_millis(250);

impl Slot {
    /// The token, if it was obtained with these settings and is still valid at `now`.
    pub fn valid(&self, fingerprint: &[u8; 32], now: SystemTime) -> Option<std::sync::Arc<Token>> {
        self.token
            .load_full()
            .filter(|t| t.fingerprint == *fingerprint && t.valid_at(now))
    }

    /// Locks the metadata (never held across an await).
    pub fn meta(&self) -> std::sync::MutexGuard<'_, SlotMeta> {
        // Plain data; a panic while it was held cannot leave it inconsistent.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a new token and forgets past failures.
    pub fn set(&self, token: std::sync::Arc<Token>) {
        self.token.store(Some(token));
        let mut m = self.meta();
        m.gate.reset();
        m.last_error = None;
    }

    /// Forgets the token (connection deleted or re-consented).
    pub fn clear(&self) {
        self.token.store(None);
        self.meta().gate.reset();
    }

    /// Marks a background refresh as running; false when one already is.
    pub fn begin_refresh(&self) -> bool {
        !self.refreshing.swap(true, Ordering::AcqRel)
    }

    /// Marks the background refresh as finished.
    pub fn end_refresh(&self) {
        self.refreshing.store(false, Ordering::Release);
    }
}

/// The `result` of a backend credential lookup (`portcullis.token_cache.requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCacheResult {
    /// A cached token was used.
    Hit = 0,
    /// No usable token was cached; one was obtained.
    Miss = 1,
    /// A cached token was renewed ahead of expiry (count the refresh, not the hit it served).
    Refresh = 2,
    /// No token could be obtained.
    Error = 3,
}

impl TokenCacheResult {
    /// `hit`, `miss`, `refresh` or `error`.
    pub const fn as_str(self) -> &'static str {
        match self {
            TokenCacheResult::Hit => "hit",
            TokenCacheResult::Miss => "miss",
            TokenCacheResult::Refresh => "refresh",
            TokenCacheResult::Error => "error",
        }
    }
}

/// `portcullis.token_cache.requests` of one credential, by result. Telemetry reads them at
/// collection time ([`super::Registry::token_cache_requests`]).
#[derive(Debug, Default)]
pub struct Counters {
    counts: [AtomicU64; 4],
}

impl Counters {
    /// Adds one.
    pub fn add(&self, result: TokenCacheResult) {
        self.counts[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts as (result, value).
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        [
            TokenCacheResult::Hit,
            TokenCacheResult::Miss,
            TokenCacheResult::Refresh,
            TokenCacheResult::Error,
        ]
        .map(|r| (r.as_str(), self.counts[r as usize].load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn fresh_until_refresh_before_expiry_or_to_expiry_when_shorter() {
        let long = Token::new(
            "x".into(),
            [0; 32],
            t(1000),
            t(1600),
            Duration::from_secs(180),
        );
        assert_eq!(long.fresh_until, t(1420));
        let short = Token::new(
            "x".into(),
            [0; 32],
            t(1000),
            t(1120),
            Duration::from_secs(180),
        );
        assert_eq!(
            short.fresh_until,
            t(1120),
            "a lifetime shorter than refresh_before_expiry is used to its expiry"
        );
        assert!(long.valid_at(t(1599)) && !long.valid_at(t(1600)));
        assert!(long.fresh_at(t(1419)) && !long.fresh_at(t(1420)));
    }

    #[test]
    fn the_gate_backs_off_exponentially_and_resets() {
        let mut g = Gate::default();
        assert_eq!(g.closed_until(t(0)), None);
        let first = g.fail(t(0)).duration_since(t(0)).unwrap();
        assert!(
            first >= Duration::from_millis(500) && first <= Duration::from_secs(1),
            "{first:?}"
        );
        assert!(g.closed_until(t(0)).is_some());
        let mut last = first;
        for _ in 0..4 {
            last = g.fail(t(0)).duration_since(t(0)).unwrap();
        }
        assert!(last >= Duration::from_secs(8), "grows: {last:?}");
        for _ in 0..20 {
            last = g.fail(t(0)).duration_since(t(0)).unwrap();
        }
        assert!(last <= Duration::from_secs(120), "capped: {last:?}");
        g.reset();
        assert_eq!(g.closed_until(t(0)), None);
    }
}
