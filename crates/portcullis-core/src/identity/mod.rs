//! JWT validation with `validate-jwt` parity: identity providers, their keys, and per-API rules.
//!
//! Order of one validation (each step ends the check on failure):
//! 1. extract the token (header with scheme, custom header, query parameter or cookie);
//! 2. refuse it when larger than `limits.max_token_bytes`, before any parsing;
//! 3. look its SHA-256 up in the verified-token cache, else: parse (three unpadded base64url
//!    segments, JSON without duplicate members, no `crit`), check `alg` against the providers'
//!    allow-lists (never `none`), find the key (`kid`, one single-flight re-fetch when unknown) and
//!    verify the signature;
//! 4. lifetime (`exp`, `nbf`, `clock_skew`, `require_expiration_time`) against the check's clock;
//! 5. audiences, 6. issuer, 7. scopes, 8. required claims: on every use, cached or not.

mod cache;
mod compile;
pub mod jose;
pub mod jwk;
pub mod provider;
/// The outcome of one pass over the candidate keys.
enum KeySearch<'p> {
    /// This provider's key with this fingerprint verified the signature.
    Verified(&'p Arc<Provider>, [u8; 32]),
    /// No key verified: how many were tried, and which providers have no keys yet.
    NotVerified {
        tried: usize,
        unavailable: Vec<Arc<str>>,
    },
}

fn verified(
    p: &Arc<Provider>,
    fingerprint: [u8; 32],
    parsed: jose::Parsed<'_>,
    exp: Option<f64>,
    nbf: Option<f64>,
    alg: Algorithm,
    token_len: usize,
) -> (Verified, Arc<Provider>) {
    let v = Verified::new(p.id, fingerprint, parsed.claims, exp, nbf, alg, token_len);
    (v, p.clone())
}

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::check::{CheckInput, Denial, Failure, Io, Reason};
use cache::{TokenCache, Verified};
pub use compile::{compile_jwt, compile_providers};
use jose::Algorithm;
use provider::{FetchMode, Provider};

/// Identity providers and the verified-token cache; lives across reloads, so a reload that leaves a
/// provider's settings alone keeps its keys (no fetch) and its verified tokens.
pub struct Registry {
    mode: FetchMode,
    /// Providers by the digest of their settings. Weak: the policy sets own them, and a provider no
    /// policy uses any more is dropped (ending its refresh task).
    providers: Mutex<HashMap<[u8; 32], Weak<Provider>>>,
    /// Fetch counts by provider name, across every generation of that provider.
    fetch_totals: Mutex<std::collections::BTreeMap<String, Arc<provider::FetchStats>>>,
    shared: Arc<Shared>,
    http: OnceLock<Option<reqwest::Client>>,
}

/// State every JWT policy of a registry shares.
#[derive(Debug)]
pub(crate) struct Shared {
    cache: TokenCache,
    signature_checks: AtomicU64,
    cache_hits: AtomicU64,
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

    fn with_mode(mode: FetchMode) -> Self {
        Registry {
            mode,
            providers: Mutex::new(HashMap::new()),
            fetch_totals: Mutex::new(std::collections::BTreeMap::new()),
            shared: Arc::new(Shared {
                cache: TokenCache::new(cache::MAX_BYTES),
                signature_checks: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
            }),
            http: OnceLock::new(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            signature_verifications: self.shared.signature_checks.load(Ordering::Relaxed),
            cache_hits: self.shared.cache_hits.load(Ordering::Relaxed),
        }
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
    fn fetch_totals(&self, name: &str) -> Arc<provider::FetchStats> {
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

    fn live_providers(&self) -> Vec<Arc<Provider>> {
        let map = self.providers.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter_map(Weak::upgrade).collect()
    }

    /// The HTTP client for key fetches, built once. `None` when offline or when it cannot be built
    /// (then every fetch fails and says so).
    fn http(&self) -> Option<reqwest::Client> {
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

/// The providers of one compiled config, by name.
#[derive(Debug)]
pub struct ProviderSet {
    by_name: HashMap<String, Arc<Provider>>,
    /// Names of providers with configuration errors (already reported).
    broken: std::collections::HashSet<String>,
    shared: Arc<Shared>,
}

/// Where an API reads its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenLocation {
    /// A header; with a scheme (`Authorization: Bearer <token>`) or bare.
    Header {
        name: String,
        scheme: Option<String>,
    },
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
}

/// `scopes: {all: [...]}` or `{any: [...]}`.
#[derive(Debug)]
pub(crate) struct ScopeRule {
    all: bool,
    values: Vec<String>,
}

/// One `required_claims[]` entry.
#[derive(Debug)]
pub(crate) struct ClaimRule {
    name: String,
    values: Vec<String>,
    any: bool,
    separator: Option<String>,
}

/// The JWT rules of one API.
#[derive(Debug)]
pub struct JwtPolicy {
    providers: Vec<Arc<Provider>>,
    location: TokenLocation,
    audiences: Option<Vec<String>>,
    /// `None`: the issuer of the provider whose key verified the token.
    issuers: Option<Vec<String>>,
    scopes: Option<ScopeRule>,
    claims: Vec<ClaimRule>,
    clock_skew: Duration,
    require_exp: bool,
    failed_status: u16,
    failed_message: Option<String>,
    shared: Arc<Shared>,
}

/// A token that passed every rule of an API. Cheap to clone.
#[derive(Clone)]
pub struct ValidToken(Arc<TokenInner>);

struct TokenInner {
    raw: String,
    claims: Arc<Map<String, Value>>,
    provider: Arc<str>,
    alg: Algorithm,
    from_cache: bool,
}

impl std::fmt::Debug for ValidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("ValidToken")
            .field("subject", &self.subject())
            .field("provider", &self.0.provider)
            .finish_non_exhaustive()
    }
}

impl ValidToken {
    /// The token's claims.
    pub fn claims(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0.claims
    }

    /// The `sub` claim.
    pub fn subject(&self) -> Option<&str> {
        self.0.claims.get("sub").and_then(|v| v.as_str())
    }

    /// The token as presented (for token exchange; never logged).
    pub fn raw(&self) -> &str {
        &self.0.raw
    }

    /// The provider whose key verified the signature.
    pub fn provider(&self) -> &str {
        &self.0.provider
    }

    /// A one-line description for explanations (never the token).
    pub fn describe(&self) -> String {
        format!(
            "token of `{}`, {} signature by provider `{}`{}",
            printable(self.subject().unwrap_or("?")),
            self.0.alg,
            self.0.provider,
            if self.0.from_cache {
                " (verified earlier, cached)"
            } else {
                ""
            }
        )
    }
}

/// A refusal before the reason's response is shaped.
type Refusal = (Reason, String);

enum Extracted<'a> {
    Missing,
    Invalid(String),
    Token(Cow<'a, str>),
}

impl JwtPolicy {
    /// Validates the request's token against this API's rules. `now` is the check's clock: the
    /// token's lifetime and the re-fetch interval are measured on it. `Ok(None)` only with
    /// [`Io::Never`]: the token's key is not among the keys held, and finding it needs a fetch.
    pub async fn validate(
        &self,
        input: &CheckInput<'_>,
        now: SystemTime,
        api: &str,
        max_token_bytes: usize,
        io: Io,
    ) -> Result<Option<ValidToken>, Failure> {
        self.run(input, now, max_token_bytes, io)
            .await
            .map_err(|(reason, detail)| self.failure(reason, detail, api))
    }

    async fn run(
        &self,
        input: &CheckInput<'_>,
        now: SystemTime,
        max_token_bytes: usize,
        io: Io,
    ) -> Result<Option<ValidToken>, Refusal> {
        let token = match self.extract(input) {
            Extracted::Missing => {
                return Err((
                    Reason::TokenNotPresent,
                    format!("no token in {}", self.location_name()),
                ));
            }
            Extracted::Invalid(why) => return Err((Reason::JwtInvalid, why)),
            Extracted::Token(t) => t,
        };
        // Before any parsing, hashing or crypto: an oversized token costs nothing.
        if token.len() > max_token_bytes {
            return Err((
                Reason::JwtInvalid,
                format!(
                    "the token has {} bytes, more than limits.max_token_bytes ({max_token_bytes})",
                    token.len()
                ),
            ));
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (verified, provider, from_cache) = match self.cached(&hash) {
            Some((v, p)) => {
                self.shared.cache_hits.fetch_add(1, Ordering::Relaxed);
                (v, p, true)
            }
            None => {
                let Some((v, p)) = self.verify(&token, now, io).await? else {
                    return Ok(None);
                };
                (Arc::new(v), p, false)
            }
        };
        self.check_lifetime(&verified, now)?;
        if !from_cache {
            self.shared.cache.insert(hash, verified.clone());
        }
        self.check_rules(&verified.claims, &provider)?;
        Ok(Some(ValidToken(Arc::new(TokenInner {
            raw: token.into_owned(),
            claims: verified.claims.clone(),
            provider: provider.name.clone(),
            alg: verified.alg,
            from_cache,
        }))))
    }

    /// A cached verification this API may use: by a provider it trusts, with a key that provider
    /// still has.
    fn cached(&self, hash: &[u8; 32]) -> Option<(Arc<Verified>, Arc<Provider>)> {
        let v = self.shared.cache.get(hash)?;
        let provider = self.providers.iter().find(|p| p.id == v.provider_id)?;
        let key_present = provider
            .keys()
            .is_some_and(|ks| ks.contains(&v.key_fingerprint));
        if !key_present {
            // The key was rotated out: the token must be verified again (and will fail).
            self.shared.cache.remove(hash);
            return None;
        }
        Some((v, provider.clone()))
    }

    /// The verified token and the provider whose key verified it; `Ok(None)` when a key must be
    /// fetched and `io` forbids it.
    async fn verify(
        &self,
        token: &str,
        now: SystemTime,
        io: Io,
    ) -> Result<Option<(Verified, Arc<Provider>)>, Refusal> {
        let parsed = jose::parse(token).map_err(|e| (Reason::JwtInvalid, e.to_string()))?;
        let Some(alg) = Algorithm::parse(&parsed.alg) else {
            let shown = printable(&parsed.alg);
            return Err((
                Reason::JwtInvalid,
                format!("algorithm `{shown}` is not accepted"),
            ));
        };
        let providers: Vec<&Arc<Provider>> =
            self.providers.iter().filter(|p| p.allows(alg)).collect();
        if providers.is_empty() {
            return Err((
                Reason::JwtInvalid,
                format!("algorithm {alg} is not allowed by the API's identity providers"),
            ));
        }
        let exp = numeric_date(&parsed.claims, "exp")?;
        let nbf = numeric_date(&parsed.claims, "nbf")?;
        let kid = parsed.kid.as_deref();

        let mut refetched = false;
        loop {
            let seen: Vec<u64> = providers.iter().map(|p| p.attempts()).collect();
            let search = self.search_keys(&providers, alg, &parsed, |k| {
                kid.is_none() || k.kid.as_deref() == kid
            });
            let (candidates, unavailable) = match search {
                KeySearch::Verified(p, fingerprint) => {
                    return Ok(Some(verified(
                        p,
                        fingerprint,
                        parsed,
                        exp,
                        nbf,
                        alg,
                        token.len(),
                    )));
                }
                KeySearch::NotVerified { tried, unavailable } => (tried, unavailable),
            };
            if candidates > 0 {
                return Err((
                    Reason::TokenSignatureInvalid,
                    format!("no {} key{} verifies the signature", alg, kid_note(kid)),
                ));
            }
            let refetchable: Vec<(&&Arc<Provider>, u64)> = providers
                .iter()
                .zip(seen)
                .filter(|(p, _)| p.can_refetch())
                .collect();
            if refetched || refetchable.is_empty() {
                // APIM: "If no keys match the claim, API Management will attempt each specified
                // key": keys without a `kid` of the right kind get their chance.
                if kid.is_some() {
                    let search = self.search_keys(&providers, alg, &parsed, |k| k.kid.is_none());
                    let tried = match search {
                        KeySearch::Verified(p, fingerprint) => {
                            return Ok(Some(verified(
                                p,
                                fingerprint,
                                parsed,
                                exp,
                                nbf,
                                alg,
                                token.len(),
                            )));
                        }
                        KeySearch::NotVerified { tried, .. } => tried,
                    };
                    if tried > 0 {
                        return Err((
                            Reason::TokenSignatureInvalid,
                            format!(
                                "no key has{} and no key without a `kid` verifies the signature",
                                kid_note(kid)
                            ),
                        ));
                    }
                }
                if !unavailable.is_empty() {
                    let names: Vec<&str> = unavailable.iter().map(|n| &**n).collect();
                    return Err((
                        Reason::IdentityProviderUnavailable,
                        format!(
                            "the signing keys of provider `{}` have not been obtained",
                            names.join("`, `")
                        ),
                    ));
                }
                return Err((
                    Reason::TokenSignatureKeyNotFound,
                    format!("no {alg} key{}", kid_note(kid)),
                ));
            }
            // Unknown key: one re-fetch per provider (single flight, rate-limited), then look again.
            if io == Io::Never {
                return Ok(None);
            }
            futures::future::join_all(
                refetchable
                    .iter()
                    .map(|(p, seen)| p.refetch_for_check(now, *seen)),
            )
            .await;
            refetched = true;
        }
    }

    /// Tries every key of `providers` that is usable for `alg` and that `wanted` accepts, in order;
    /// the first key whose signature verifies wins. Every trial is counted.
    fn search_keys<'p>(
        &self,
        providers: &[&'p Arc<Provider>],
        alg: Algorithm,
        parsed: &jose::Parsed<'_>,
        wanted: impl Fn(&jwk::VerifyingKey) -> bool,
    ) -> KeySearch<'p> {
        let mut tried = 0usize;
        let mut unavailable = Vec::new();
        for p in providers {
            let Some(keys) = p.keys() else {
                unavailable.push(p.name.clone());
                continue;
            };
            for key in keys.keys.iter().filter(|k| k.usable_for(alg) && wanted(k)) {
                tried += 1;
                self.shared.signature_checks.fetch_add(1, Ordering::Relaxed);
                if key.verify(alg, parsed.signing_input, &parsed.signature) {
                    return KeySearch::Verified(p, key.fingerprint);
                }
            }
        }
        KeySearch::NotVerified { tried, unavailable }
    }

    fn check_lifetime(&self, v: &Verified, now: SystemTime) -> Result<(), Refusal> {
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let skew = self.clock_skew.as_secs_f64();
        match v.exp {
            None if self.require_exp => {
                return Err((
                    Reason::JwtInvalid,
                    "the token has no `exp` and require_expiration_time is on".into(),
                ));
            }
            // Microsoft.IdentityModel's rule, which APIM applies: expired when exp < now - skew.
            Some(exp) if exp < now_s - skew => {
                return Err((
                    Reason::TokenExpired,
                    format!(
                        "expired {}s ago (clock_skew {}s)",
                        (now_s - exp).floor(),
                        self.clock_skew.as_secs()
                    ),
                ));
            }
            _ => {}
        }
        if let Some(nbf) = v.nbf
            && nbf > now_s + skew
        {
            return Err((
                Reason::TokenNotYetValid,
                format!(
                    "valid only in {}s (clock_skew {}s)",
                    (nbf - now_s).ceil(),
                    self.clock_skew.as_secs()
                ),
            ));
        }
        Ok(())
    }

    fn check_rules(&self, claims: &Map<String, Value>, provider: &Provider) -> Result<(), Refusal> {
        if let Some(audiences) = &self.audiences {
            let matches = |s: &str| audiences.iter().any(|a| a == s);
            let ok = match claims.get("aud") {
                Some(Value::String(s)) => matches(s),
                Some(Value::Array(items)) => items.iter().any(|v| v.as_str().is_some_and(matches)),
                _ => false,
            };
            if !ok {
                return Err((
                    Reason::TokenAudienceNotAllowed,
                    format!(
                        "audience {} is not one of {}",
                        shown_claim(claims.get("aud")),
                        audiences.join(", ")
                    ),
                ));
            }
        }
        let iss = claims.get("iss").and_then(Value::as_str);
        let issuer_ok = match (&self.issuers, iss) {
            (_, None) => false,
            (Some(list), Some(iss)) => list.iter().any(|i| i == iss),
            // By default a token must come from the issuer of the provider that verified it, so one
            // provider's key cannot vouch for another issuer's tokens.
            (None, Some(iss)) => iss == provider.issuer,
        };
        if !issuer_ok {
            return Err((
                Reason::TokenIssuerNotAllowed,
                format!("issuer {} is not allowed", shown_claim(claims.get("iss"))),
            ));
        }
        if let Some(rule) = &self.scopes {
            let granted = token_scopes(claims);
            let ok = if rule.all {
                rule.values.iter().all(|s| granted.contains(&s.as_str()))
            } else {
                rule.values.iter().any(|s| granted.contains(&s.as_str()))
            };
            if !ok {
                let want = if rule.all { "all of" } else { "one of" };
                return Err((
                    Reason::InsufficientScope,
                    format!(
                        "the token's scopes [{}] do not include {want} [{}]",
                        granted.join(" "),
                        rule.values.join(" ")
                    ),
                ));
            }
        }
        self.check_claims(claims)
    }

    fn check_claims(&self, claims: &Map<String, Value>) -> Result<(), Refusal> {
        let values: Vec<Option<Vec<String>>> = self
            .claims
            .iter()
            .map(|r| claim_values(claims, &r.name, r.separator.as_deref()))
            .collect();
        let missing: Vec<&str> = self
            .claims
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(r, _)| r.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err((
                Reason::TokenClaimNotFound,
                format!(
                    "JWT token is missing the following claims: {}. Access denied.",
                    missing.join(", ")
                ),
            ));
        }
        for (rule, have) in self.claims.iter().zip(values.iter().flatten()) {
            if rule.values.is_empty() {
                continue;
            }
            let ok = if rule.any {
                rule.values.iter().any(|v| have.contains(v))
            } else {
                rule.values.iter().all(|v| have.contains(v))
            };
            if !ok {
                let shown: String = have
                    .join(rule.separator.as_deref().unwrap_or(","))
                    .chars()
                    .take(200)
                    .collect();
                return Err((
                    Reason::TokenClaimValueNotAllowed,
                    format!(
                        "Claim {} value of {} is not allowed. Access denied.",
                        rule.name, shown
                    ),
                ));
            }
        }
        Ok(())
    }

    fn extract<'a>(&self, input: &CheckInput<'a>) -> Extracted<'a> {
        match &self.location {
            TokenLocation::Header { name, scheme } => {
                let Some(raw) = input.header(name) else {
                    return Extracted::Missing;
                };
                let Ok(value) = std::str::from_utf8(raw) else {
                    return Extracted::Invalid(format!("the `{name}` header is not UTF-8"));
                };
                let value = value.trim_matches([' ', '\t']);
                if value.is_empty() {
                    return Extracted::Missing;
                }
                let Some(scheme) = scheme else {
                    return Extracted::Token(Cow::Borrowed(value));
                };
                let (given, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
                if !given.eq_ignore_ascii_case(scheme) {
                    return Extracted::Invalid(format!(
                        "the `{name}` header does not use the `{scheme}` scheme"
                    ));
                }
                let token = rest.trim_start_matches([' ', '\t']);
                if token.is_empty() {
                    Extracted::Missing
                } else {
                    Extracted::Token(Cow::Borrowed(token))
                }
            }
            TokenLocation::Query(name) => {
                match crate::check::query::query_param(input.path, name) {
                    Err(_) => {
                        Extracted::Invalid(format!("the `{name}` query parameter appears twice"))
                    }
                    Ok(None) => Extracted::Missing,
                    Ok(Some(v)) if v.is_empty() => Extracted::Missing,
                    Ok(Some(v)) => match String::from_utf8(v) {
                        Ok(s) => Extracted::Token(Cow::Owned(s)),
                        Err(_) => {
                            Extracted::Invalid(format!("the `{name}` query parameter is not UTF-8"))
                        }
                    },
                }
            }
            TokenLocation::Cookie(name) => {
                let Some(raw) = input.header("cookie") else {
                    return Extracted::Missing;
                };
                let Ok(header) = std::str::from_utf8(raw) else {
                    return Extracted::Invalid("the cookie header is not UTF-8".into());
                };
                let mut found: Option<&'a str> = None;
                for pair in header.split(';') {
                    let Some((k, v)) = pair.trim().split_once('=') else {
                        continue;
                    };
                    if k.trim() != name {
                        continue;
                    }
                    let v = v.trim();
                    let v = v
                        .strip_prefix('"')
                        .and_then(|s| s.strip_suffix('"'))
                        .unwrap_or(v);
                    match found {
                        Some(prev) if prev != v => {
                            return Extracted::Invalid(format!(
                                "the `{name}` cookie is sent more than once"
                            ));
                        }
                        _ => found = Some(v),
                    }
                }
                match found {
                    None | Some("") => Extracted::Missing,
                    Some(t) => Extracted::Token(Cow::Borrowed(t)),
                }
            }
        }
    }

    fn location_name(&self) -> String {
        match &self.location {
            TokenLocation::Header {
                name,
                scheme: Some(s),
            } => format!("the `{name}` header ({s} scheme)"),
            TokenLocation::Header { name, scheme: None } => format!("the `{name}` header"),
            TokenLocation::Query(q) => format!("the `{q}` query parameter"),
            TokenLocation::Cookie(c) => format!("the `{c}` cookie"),
        }
    }

    /// Shapes a refusal: `failed_status`/`failed_message` for the 401 class, RFC 6750 challenges.
    fn failure(&self, reason: Reason, detail: String, api: &str) -> Failure {
        let mut denial = Denial::new(reason);
        let realm = quote(api);
        match reason {
            Reason::TokenNotPresent
            | Reason::JwtInvalid
            | Reason::TokenSignatureInvalid
            | Reason::TokenSignatureKeyNotFound
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::TokenAudienceNotAllowed
            | Reason::TokenIssuerNotAllowed => {
                denial.status = self.failed_status;
                if let Some(m) = &self.failed_message {
                    denial.message = m.clone();
                }
                if denial.status == 401 {
                    // RFC 6750 3.1: a request without a token gets a challenge without an error code.
                    denial.www_authenticate = Some(if reason == Reason::TokenNotPresent {
                        format!("Bearer realm={realm}")
                    } else {
                        format!("Bearer realm={realm}, error=\"invalid_token\"")
                    });
                }
            }
            Reason::InsufficientScope => {
                let scope = self
                    .scopes
                    .as_ref()
                    .map(|s| s.values.join(" "))
                    .unwrap_or_default();
                denial.www_authenticate = Some(format!(
                    "Bearer realm={realm}, error=\"insufficient_scope\", scope={}",
                    quote(&scope)
                ));
            }
            Reason::TokenClaimNotFound | Reason::TokenClaimValueNotAllowed => {
                // APIM's messages name the claims; they say nothing about the token itself.
                denial.message = detail.clone();
            }
            _ => {}
        }
        Failure { denial, detail }
    }
}

/// `exp`/`nbf`: absent, or a JSON number of seconds since the epoch.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| (Reason::JwtInvalid, format!("`{name}` is not a number"))),
        Some(_) => Err((Reason::JwtInvalid, format!("`{name}` is not a number"))),
    }
}

/// Scopes from `scp` and `scope`: space-separated strings or arrays of strings.
fn token_scopes(claims: &Map<String, Value>) -> Vec<&str> {
    let mut out = Vec::new();
    for name in ["scp", "scope"] {
        match claims.get(name) {
            Some(Value::String(s)) => out.extend(s.split(' ').filter(|s| !s.is_empty())),
            Some(Value::Array(items)) => out.extend(
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .flat_map(|s| s.split(' '))
                    .filter(|s| !s.is_empty()),
            ),
            _ => {}
        }
    }
    out
}

/// A claim's values for `required_claims`: `None` when absent (or null, or an empty array).
fn claim_values(
    claims: &Map<String, Value>,
    name: &str,
    separator: Option<&str>,
) -> Option<Vec<String>> {
    let v = crate::check::template::claim(claims, name)?;
    let mut out = Vec::new();
    let mut push = |v: &Value| match v {
        Value::String(s) => match separator {
            Some(sep) => out.extend(s.split(sep).map(|p| p.trim().to_string())),
            None => out.push(s.clone()),
        },
        Value::Null => {}
        other => out.push(other.to_string()),
    };
    match v {
        Value::Null => return None,
        Value::Array(items) if items.is_empty() => return None,
        Value::Array(items) => items.iter().for_each(&mut push),
        other => push(other),
    }
    Some(out)
}

fn kid_note(kid: Option<&str>) -> String {
    match kid {
        Some(k) => format!(" with kid `{}`", printable(k)),
        None => String::new(),
    }
}

/// A claim for a detail line, bounded and without control characters.
fn shown_claim(v: Option<&Value>) -> String {
    match v {
        None => "(none)".into(),
        Some(Value::String(s)) => format!("`{}`", printable(s)),
        Some(other) => printable(&other.to_string()),
    }
}

/// Text from a token for a detail line: at most 100 characters, control characters escaped.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(100).flat_map(char::escape_default).collect();
    if s.chars().count() > 100 {
        out.push('…');
    }
    out
}

/// An RFC 7230 quoted-string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}
