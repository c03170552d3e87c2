//! The verified-token cache: a token whose signature was verified is not verified again.
//!
//! What is cached is only what does not depend on the API or the time: which provider and which key
//! verified the signature, and the decoded claims. Everything else runs on every use: the lifetime
//! against the check's `now`, and each API's audience, issuer, scope and claim rules. An entry
//! is used only while the key that verified it is still in its provider's current key set, and only
//! by an API that trusts that provider, so removing a key (or a provider) ends its tokens at once.
//!
//! Entries are keyed by SHA-256 of the token, never the token itself. moka bounds the cache by the
//! bytes the entries hold and expires each entry when its token does.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Bytes of entries the cache holds at most (weights are estimates: about twice the token size).
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Longest time an entry is kept, whatever its token's `exp`.
const MAX_AGE: Duration = Duration::from_secs(3600);
/// How long an entry for a token without `exp` (`require_expiration_time: false`) is kept.
const NO_EXP_AGE: Duration = Duration::from_secs(300);

/// What a signature verification established.
#[derive(Debug)]
pub struct Verified {
    /// [`super::provider::Provider::id`] of the provider whose key verified it.
    pub provider_id: u64,
    /// Fingerprint of that key.
    pub key_fingerprint: [u8; 32],
    /// The claims.
    pub claims: Arc<Map<String, Value>>,
    /// `exp`, seconds since the epoch.
    pub exp: Option<f64>,
    /// `nbf`, seconds since the epoch.
    pub nbf: Option<f64>,
    /// `alg` and `kid`, for explanations.
    pub alg: super::jose::Algorithm,
    /// Approximate bytes held.
    weight: u32,
}

impl Verified {
    /// A verification result; `token_len` sizes its weight.
    pub fn new(
        provider_id: u64,
        key_fingerprint: [u8; 32],
        claims: Map<String, Value>,
        exp: Option<f64>,
        nbf: Option<f64>,
        alg: super::jose::Algorithm,
        token_len: usize,
    ) -> Self {
        let weight =
            u32::try_from(token_len.saturating_mul(2).saturating_add(256)).unwrap_or(u32::MAX);
        Verified {
            provider_id,
            key_fingerprint,
            claims: Arc::new(claims),
            exp,
            nbf,
            alg,
            weight,
        }
    }
}

/// Token hash -> verification.
pub struct TokenCache {
    inner: moka::sync::Cache<[u8; 32], Arc<Verified>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

struct UntilExp;

impl moka::Expiry<[u8; 32], Arc<Verified>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        v: &Arc<Verified>,
        _now: Instant,
    ) -> Option<Duration> {
        let age = match v.exp {
            Some(exp) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                // Lifetime is checked on every use anyway; this only frees memory. A little slack
                // keeps entries for `exp + clock_skew` useful without tracking each API's skew.
                Duration::try_from_secs_f64((exp - now).max(0.0) + 60.0).unwrap_or(MAX_AGE)
            }
            None => NO_EXP_AGE,
        };
        Some(age.min(MAX_AGE))
    }
}

impl TokenCache {
    /// An empty cache holding at most `max_bytes` (estimated).
    pub fn new(max_bytes: u64) -> Self {
        TokenCache {
            inner: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k, v: &Arc<Verified>| v.weight)
                .expire_after(UntilExp)
                .build(),
        }
    }

    /// The verification of the token with this hash, if cached.
    pub fn get(&self, hash: &[u8; 32]) -> Option<Arc<Verified>> {
        self.inner.get(hash)
    }

    /// Remembers a verification.
    pub fn insert(&self, hash: [u8; 32], v: Arc<Verified>) {
        self.inner.insert(hash, v);
    }

    /// Forgets a token (its key is gone).
    pub fn remove(&self, hash: &[u8; 32]) {
        self.inner.invalidate(hash);
    }
}
