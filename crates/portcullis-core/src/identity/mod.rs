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
//!
//! Opaque tokens (not JWS compact), and every token of a provider with `tokens: all`, take the
//! introspection path instead of steps 3 and 4's signature: see [`introspection`].

pub mod binding;
mod cache;
mod compile;
pub mod dpop;
pub mod entra;
mod extract;
pub mod introspection;
pub mod jose;
pub mod jwk;
pub mod provider;
mod registry;
mod rules;
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
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::digest::Sha256;
use serde_json::{Map, Value};

use crate::check::{CheckInput, Failure, Io, Reason};
use cache::Verified;
pub use compile::{compile_jwt, compile_providers};
use jose::Algorithm;
use provider::Provider;
pub(crate) use registry::Shared;
pub use registry::{ProviderStatus, Registry, RegistryStats};
pub use rules::scope_iter;
use rules::{kid_note, numeric_date, printable};

/// The providers of one compiled config, by name.
#[derive(Debug)]
pub struct ProviderSet {
    by_name: HashMap<String, Arc<Provider>>,
    /// Names of providers with configuration errors (already reported).
    broken: std::collections::HashSet<String>,
    shared: Arc<Shared>,
    /// Rules of the providers with a preset (`entra`), by name.
    entra: HashMap<String, Arc<entra::Rules>>,
    /// What presets expanded to, for `portcullis validate`.
    notes: Vec<String>,
}

impl ProviderSet {
    /// What the providers' presets expanded to, one line each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
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
    /// RFC 8705 `certificate_bound: required`: tokens without `cnf.x5t#S256` are refused.
    certificate_bound_required: bool,
    shared: Arc<Shared>,
    /// Preset rules (Entra ID) of providers, by provider id.
    entra: Vec<(u64, Arc<entra::Rules>)>,
    /// `dpop`, `dpop_max_age`, `dpop_algorithms`: `None` when DPoP is not accepted.
    dpop: Option<dpop::DpopPolicy>,
}

impl JwtPolicy {
    fn entra_rules(&self, provider_id: u64) -> Option<&entra::Rules> {
        self.entra
            .iter()
            .find(|(id, _)| *id == provider_id)
            .map(|(_, r)| &**r)
    }
}

/// A token that passed every rule of an API. Cheap to clone.
#[derive(Clone)]
pub struct ValidToken(Arc<TokenInner>);

struct TokenInner {
    raw: String,
    claims: Arc<Map<String, Value>>,
    provider: Arc<str>,
    /// `None`: introspected.
    alg: Option<Algorithm>,
    from_cache: bool,
    /// How the token is bound to the request (RFC 9449 DPoP).
    binding: dpop::Binding,
    /// The replay-cache key of the DPoP proof it was accepted with.
    proof_key: Option<[u8; 32]>,
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

    /// How the token is bound to the request: `none` or `dpop`.
    pub fn binding(&self) -> dpop::Binding {
        self.0.binding
    }

    /// A one-line description for explanations (never the token).
    pub fn describe(&self) -> String {
        let mut d = self.describe_token();
        if self.0.binding == dpop::Binding::Dpop {
            d.push_str(", DPoP proof valid (cnf.jkt matches the proof's key, jti first use)");
        }
        d
    }

    fn describe_token(&self) -> String {
        let Some(alg) = self.0.alg else {
            return format!(
                "token of `{}`, introspected by provider `{}`{}",
                printable(self.subject().unwrap_or("?")),
                self.0.provider,
                if self.0.from_cache { " (cached)" } else { "" }
            );
        };
        format!(
            "token of `{}`, {} signature by provider `{}`{}",
            printable(self.subject().unwrap_or("?")),
            alg,
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
        let valid = self
            .run(input, now, max_token_bytes, io)
            .await
            .map_err(|(reason, detail)| self.failure(reason, detail, api))?;
        let Some(mut valid) = valid else {
            return Ok(None);
        };
        let (binding, proof_key) = self
            .check_binding(input, valid.raw(), valid.claims(), now)
            .map_err(|(reason, detail)| self.failure(reason, detail, api))?;
        if let Some(key) = proof_key {
            let decided = self
                .check_shared_replay(key, io)
                .await
                .map_err(|(reason, detail)| self.failure(reason, detail, api))?;
            if !decided {
                return Ok(None);
            }
        }
        if let Some(inner) = Arc::get_mut(&mut valid.0) {
            inner.binding = binding;
            inner.proof_key = proof_key;
        }
        Ok(Some(valid))
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
        let hash: [u8; 32] = Sha256::digest(token.as_bytes());
        // Opaque tokens (and every token, for `tokens: all`) go to the providers that introspect.
        // A JWS-shaped token is verified by its signature whenever the API has a provider that is
        // not `tokens: all`.
        let jws = introspection::is_jws_compact(&token);
        let introspecting: Vec<&Arc<Provider>> = self
            .providers
            .iter()
            .filter(|p| {
                p.introspection
                    .as_ref()
                    .is_some_and(|i| i.spec.accepts(jws))
            })
            .collect();
        let verifies = |p: &&Arc<Provider>| {
            p.introspection
                .as_ref()
                .is_none_or(|i| i.spec.tokens != introspection::Tokens::All)
        };
        if !introspecting.is_empty() && (!jws || !self.providers.iter().any(|p| verifies(&p))) {
            return self
                .introspected(&token, &hash, &introspecting, now, io)
                .await;
        }
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
        self.check_lifetime(verified.exp, verified.nbf, self.require_exp, now)?;
        if !from_cache {
            self.shared.cache.insert(hash, verified.clone());
        }
        self.check_rules(&verified.claims, &provider)?;
        Ok(Some(ValidToken(Arc::new(TokenInner {
            raw: token.into_owned(),
            claims: verified.claims.clone(),
            provider: provider.name.clone(),
            alg: Some(verified.alg),
            from_cache,
            binding: dpop::Binding::None,
            proof_key: None,
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
}
