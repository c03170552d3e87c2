//! Opaque (reference) access tokens, validated by RFC 7662 token introspection.
//!
//! A provider with `introspection` asks its endpoint about tokens that are not JWS compact
//! (`tokens: opaque`, the default) or about every token (`tokens: all`). The answer's members are
//! the token's claims for the API's rules, exactly as a JWT's would be: audiences, issuer (an answer
//! without `iss` is taken as the provider's configured issuer), scopes, required claims, claim
//! headers. `exp`/`nbf`, when present, get the JWT lifetime checks with the API's `clock_skew`;
//! `require_expiration_time` applies to JWTs only.
//!
//! Answers are cached by the pair (provider, SHA-256 of the token), never the token itself:
//! `active: true` until the earlier of its `exp` and the provider's `cache_ttl`, `active: false`
//! for `negative_cache_ttl`, both measured on the check's clock. Failures are never cached. Checks
//! that need the same (provider, token) answer at once share one request: the cache's
//! `entry().or_insert_with_if` runs one initialiser per key and hands its result to every waiter.
//! Requests in flight are capped by `limits.max_concurrent_fetches`; over the cap a check fails
//! closed at once (`IdentityProviderUnavailable`) rather than queueing behind a slow endpoint.
//!
//! Whatever goes wrong with the endpoint (unreachable, `fetch_timeout`, non-2xx, a body over
//! [`MAX_RESPONSE_BYTES`], not JSON, `active` that is not a JSON boolean) is an error, and with no
//! cached answer the check answers `IdentityProviderUnavailable` (503): never an allow. Neither the
//! token nor the client secret appears in any error, log line, span or `Debug` output.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Url;
use serde_json::{Map, Value};

use super::provider::{FetchMode, FetchStats, Provider};
use super::rules::{numeric_date, printable};
use super::{JwtPolicy, Refusal, TokenInner, ValidToken};
use crate::check::{Io, Reason};
use crate::config::{self, ConfigErrors, Secret, Source};

/// Largest introspection response (or discovery document read for it) accepted.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Bytes of answers the introspection cache holds at most (estimated).
pub const CACHE_MAX_BYTES: u64 = 32 * 1024 * 1024;
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// How the client authenticates to the introspection endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded id and secret (RFC 6749 2.3.1).
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

/// Which tokens are introspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    /// Tokens that are not three-segment JWS compact.
    Opaque,
    /// Every token.
    All,
}

/// Where the endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Configured.
    Url(Url),
    /// `introspection_endpoint` of this discovery document.
    Discover(Url),
}

/// The `introspection` settings of a provider.
#[derive(Clone)]
pub struct IntrospectionSpec {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// `client_id`.
    pub client_id: String,
    /// `client_secret`.
    pub client_secret: Secret,
    /// `client_auth`.
    pub client_auth: ClientAuth,
    /// `tokens`.
    pub tokens: Tokens,
    /// Cap on how long an active answer is reused.
    pub cache_ttl: Duration,
    /// How long an inactive answer is reused.
    pub negative_ttl: Duration,
}

impl std::fmt::Debug for IntrospectionSpec {
    // The digest of a provider's settings formats this: every setting but the secret, which the
    // caller hashes on its own.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionSpec")
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("client_auth", &self.client_auth)
            .field("tokens", &self.tokens)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_ttl", &self.negative_ttl)
            .finish_non_exhaustive()
    }
}

impl IntrospectionSpec {
    /// Whether a token of this shape goes to introspection.
    pub fn accepts(&self, jws_shaped: bool) -> bool {
        self.tokens == Tokens::All || !jws_shaped
    }
}

/// Checks `identity_providers[i].introspection`; `None` after reporting its errors.
pub(super) fn compile_spec(
    src: &Source,
    cfg: &config::Introspection,
    provider: &config::IdentityProvider,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<IntrospectionSpec> {
    let before = errs.0.len();
    let endpoint = match &cfg.url {
        Some(u) => super::compile::http_url(u, format!("{path}.url"), errs).map(Endpoint::Url),
        None => {
            let discovery = match &provider.discovery_url {
                Some(u) => Url::parse(u).ok(),
                None => Url::parse(&format!(
                    "{}/.well-known/openid-configuration",
                    provider.issuer.trim_end_matches('/')
                ))
                .ok(),
            };
            match discovery {
                Some(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                    Some(Endpoint::Discover(u))
                }
                _ => {
                    errs.push(
                        format!("{path}.url"),
                        "is required: the issuer is not an http(s) URL and no discovery_url is given, so the introspection_endpoint cannot be discovered",
                    );
                    None
                }
            }
        }
    };
    if cfg.client_id.is_empty() || cfg.client_id.chars().any(char::is_control) {
        errs.push(
            format!("{path}.client_id"),
            "must be non-empty text without control characters",
        );
    }
    let secret_path = format!("{path}.client_secret");
    if !src.substituted.contains(&secret_path) {
        errs.push(
            &secret_path,
            "the client secret must not be written in the file: read it with ${env:NAME} or ${file:PATH}",
        );
    } else if cfg.client_secret.expose().is_empty() {
        errs.push(&secret_path, "is empty");
    }
    let client_auth = match cfg.client_auth.as_deref() {
        None | Some("client_secret_basic") => ClientAuth::Basic,
        Some("client_secret_post") => ClientAuth::Post,
        Some(o) => {
            errs.push(
                format!("{path}.client_auth"),
                format!(
                    "`{}`: use client_secret_basic or client_secret_post",
                    printable(o)
                ),
            );
            ClientAuth::Basic
        }
    };
    let tokens = match cfg.tokens.as_deref() {
        None | Some("opaque") => Tokens::Opaque,
        Some("all") => Tokens::All,
        Some(o) => {
            errs.push(
                format!("{path}.tokens"),
                format!("`{}`: use opaque or all", printable(o)),
            );
            Tokens::Opaque
        }
    };
    let cache_ttl = super::compile::duration(
        cfg.cache_ttl.as_deref(),
        DEFAULT_CACHE_TTL,
        format!("{path}.cache_ttl"),
        errs,
    );
    let negative_ttl = super::compile::duration(
        cfg.negative_cache_ttl.as_deref(),
        DEFAULT_NEGATIVE_TTL,
        format!("{path}.negative_cache_ttl"),
        errs,
    );
    if cache_ttl > Duration::from_secs(3600) {
        errs.push(
            format!("{path}.cache_ttl"),
            "at most 1h: a revoked token is accepted until its answer ends",
        );
    }
    if negative_ttl > Duration::from_secs(300) {
        errs.push(format!("{path}.negative_cache_ttl"), "at most 5m");
    }
    if errs.0.len() > before {
        return None;
    }
    Some(IntrospectionSpec {
        endpoint: endpoint?,
        client_id: cfg.client_id.clone(),
        client_secret: cfg.client_secret.clone(),
        client_auth,
        tokens,
        cache_ttl,
        negative_ttl,
    })
}

/// Whether a token has the shape of a JWS in compact serialisation: three base64url segments
/// (the signature may be empty, so an unsigned token still goes to the signature check and is
/// refused there).
///
/// Runs on every check with a token, over the whole token: the alphabet test is a branch-free fold
/// the compiler turns into vector compares (about a tenth of the instructions of a per-byte `all`).
pub fn is_jws_compact(token: &str) -> bool {
    fn b64(s: &str) -> bool {
        s.bytes().fold(true, |ok, b| {
            // `b | 0x20` is in `a..=z` exactly for ASCII letters of either case.
            let letter = (b | 0x20).wrapping_sub(b'a') < 26;
            let digit = b.wrapping_sub(b'0') < 10;
            ok & (letter | digit | (b == b'-') | (b == b'_'))
        })
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => {
            !h.is_empty() && !p.is_empty() && b64(h) && b64(p) && b64(s)
        }
        _ => false,
    }
}

/// Why the endpoint gave no usable answer. Never contains the token or the secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IntrospectionError {
    /// The registry does not fetch.
    #[error("introspection is disabled here (offline)")]
    Offline,
    /// `limits.max_concurrent_fetches` requests are in flight; nothing was sent.
    #[error("too many requests in flight (limits.max_concurrent_fetches)")]
    Busy,
    /// Connecting, sending or reading failed, or `fetch_timeout` passed.
    #[error("{url}: {message}")]
    Transport {
        /// The endpoint.
        url: String,
        /// What failed.
        message: String,
    },
    /// A non-2xx answer.
    #[error("{url}: HTTP {status}")]
    Status {
        /// The endpoint.
        url: String,
        /// The status.
        status: u16,
    },
    /// The body is larger than [`MAX_RESPONSE_BYTES`].
    #[error("{0}: the answer is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge(String),
    /// The body is not what RFC 7662 describes.
    #[error("{url}: {message}")]
    Invalid {
        /// The endpoint.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// No endpoint could be discovered.
    #[error("discovery document {url}: {message}")]
    Discovery {
        /// The discovery URL.
        url: String,
        /// What is wrong.
        message: String,
    },
}

/// One provider's introspection client.
pub struct Introspector {
    /// The settings.
    pub spec: IntrospectionSpec,
    name: Arc<str>,
    issuer: String,
    http: Option<reqwest::Client>,
    fetch_timeout: Duration,
    /// The discovered endpoint (a failed discovery is tried again by the next request).
    discovered: tokio::sync::OnceCell<Url>,
    totals: Arc<FetchStats>,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspector")
            .field("provider", &self.name)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Introspector {
    /// The introspection client of provider `name`.
    pub fn new(
        spec: IntrospectionSpec,
        name: Arc<str>,
        issuer: String,
        mode: FetchMode,
        http: Option<reqwest::Client>,
        fetch_timeout: Duration,
        totals: Arc<FetchStats>,
    ) -> Self {
        Introspector {
            spec,
            name,
            issuer,
            http: if mode == FetchMode::Offline {
                None
            } else {
                http
            },
            fetch_timeout,
            discovered: tokio::sync::OnceCell::new(),
            totals,
        }
    }

    /// Asks the endpoint about `token`; the answer is valid from `now` (the check's clock).
    async fn ask(&self, token: &str, now: SystemTime) -> Result<Answer, IntrospectionError> {
        use tracing::Instrument;
        // The span names the provider only: never the token.
        let span = tracing::info_span!("introspection", provider = %self.name);
        let result = self.request(token, now).instrument(span).await;
        let (counter, label) = match &result {
            Ok(Answer::Active { .. }) => (&self.totals.introspection_active, "active"),
            Ok(_) => (&self.totals.introspection_inactive, "inactive"),
            Err(_) => (&self.totals.introspection_errors, "error"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match &result {
            Err(e) => {
                tracing::warn!(provider = %self.name, result = label, error = %e, "token introspection failed")
            }
            Ok(_) => tracing::debug!(provider = %self.name, result = label, "token introspected"),
        }
        result
    }

    async fn request(&self, token: &str, now: SystemTime) -> Result<Answer, IntrospectionError> {
        let client = self.http.as_ref().ok_or(IntrospectionError::Offline)?;
        let url = match &self.spec.endpoint {
            Endpoint::Url(u) => u.clone(),
            Endpoint::Discover(d) => self
                .discovered
                .get_or_try_init(|| self.discover(client, d))
                .await?
                .clone(),
        };
        let mut form = vec![("token", token), ("token_type_hint", "access_token")];
        let mut req = client
            .post(url.clone())
            .timeout(self.fetch_timeout)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        let secret = self.spec.client_secret.expose();
        match self.spec.client_auth {
            ClientAuth::Basic => {
                use base64::Engine;
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let basic = base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{}",
                    enc(&self.spec.client_id),
                    enc(secret)
                ));
                let mut value = reqwest::header::HeaderValue::try_from(format!("Basic {basic}"))
                    .map_err(|_| IntrospectionError::Invalid {
                        url: url.to_string(),
                        message: "the client credentials cannot be sent in a header".into(),
                    })?;
                value.set_sensitive(true);
                req = req.header(reqwest::header::AUTHORIZATION, value);
            }
            ClientAuth::Post => {
                form.push(("client_id", &self.spec.client_id));
                form.push(("client_secret", secret));
            }
        }
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let bytes = read_capped(req.body(body), &url).await?;
        parse_answer(&bytes, &url, &self.issuer, now, &self.spec)
    }

    async fn discover(
        &self,
        client: &reqwest::Client,
        url: &Url,
    ) -> Result<Url, IntrospectionError> {
        let bad = |message: String| IntrospectionError::Discovery {
            url: url.to_string(),
            message,
        };
        let req = client
            .get(url.clone())
            .timeout(self.fetch_timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        let bytes = read_capped(req, url).await?;
        let doc: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not JSON".into()))?;
        match doc.get("issuer").and_then(Value::as_str) {
            Some(i) if i == self.issuer => {}
            Some(i) => {
                return Err(bad(format!(
                    "names issuer `{}`, the configuration `{}`",
                    printable(i),
                    self.issuer
                )));
            }
            None => return Err(bad("no `issuer`".into())),
        }
        let endpoint = doc
            .get("introspection_endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `introspection_endpoint`".into()))?;
        let endpoint = Url::parse(endpoint)
            .map_err(|_| bad("`introspection_endpoint` is not a URL".into()))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(bad("`introspection_endpoint` is not an http(s) URL".into()));
        }
        if url.scheme() == "https" && endpoint.scheme() != "https" {
            return Err(bad(
                "`introspection_endpoint` is plain http in a document served over https".into(),
            ));
        }
        Ok(endpoint)
    }
}

/// Sends `req` and reads at most [`MAX_RESPONSE_BYTES`] of a 2xx answer.
async fn read_capped(
    req: reqwest::RequestBuilder,
    url: &Url,
) -> Result<Vec<u8>, IntrospectionError> {
    let transport = |e: reqwest::Error| IntrospectionError::Transport {
        url: url.to_string(),
        message: if e.is_timeout() {
            "no answer within fetch_timeout".into()
        } else if e.is_connect() {
            "connection failed".into()
        } else {
            e.without_url().to_string()
        },
    };
    super::provider::send_capped(req, MAX_RESPONSE_BYTES)
        .await
        .map_err(|e| match e {
            super::provider::BodyError::Transport(e) => transport(e),
            super::provider::BodyError::Status(status) => IntrospectionError::Status {
                url: url.to_string(),
                status,
            },
            super::provider::BodyError::TooLarge => IntrospectionError::TooLarge(url.to_string()),
        })
}

/// Reads an RFC 7662 answer. `active` must be the JSON boolean `true` for an active token; an
/// answer without `iss` is the configured issuer's.
fn parse_answer(
    bytes: &[u8],
    url: &Url,
    issuer: &str,
    now: SystemTime,
    spec: &IntrospectionSpec,
) -> Result<Answer, IntrospectionError> {
    let invalid = |message: &str| IntrospectionError::Invalid {
        url: url.to_string(),
        message: message.to_string(),
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|_| invalid("the answer is not JSON"))?;
    let Value::Object(mut claims) = v else {
        return Err(invalid("the answer is not a JSON object"));
    };
    match claims.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            return Ok(Answer::Inactive {
                until: now + spec.negative_ttl,
            });
        }
        _ => return Err(invalid("`active` is not a JSON boolean")),
    }
    let exp = numeric_date(&claims, "exp").map_err(|_| invalid("`exp` is not a number"))?;
    let nbf = numeric_date(&claims, "nbf").map_err(|_| invalid("`nbf` is not a number"))?;
    if !claims.contains_key("iss") {
        claims.insert("iss".into(), Value::from(issuer));
    }
    let mut until = now + spec.cache_ttl;
    if let Some(exp) = exp
        && let Ok(at) = Duration::try_from_secs_f64(exp.max(0.0))
    {
        until = until.min(UNIX_EPOCH + at);
    }
    let weight = u32::try_from(bytes.len().saturating_add(256)).unwrap_or(u32::MAX);
    Ok(Answer::Active {
        claims: Arc::new(claims),
        exp,
        nbf,
        until,
        weight,
    })
}

/// A cached answer.
#[derive(Debug)]
pub(crate) enum Answer {
    /// `active: true`: the answer's members, reusable until `until` (the check's clock).
    Active {
        claims: Arc<Map<String, Value>>,
        exp: Option<f64>,
        nbf: Option<f64>,
        until: SystemTime,
        weight: u32,
    },
    /// `active: false`, reusable until `until`.
    Inactive { until: SystemTime },
    /// No usable answer: handed to the checks that waited for it, never reused.
    Failed(IntrospectionError),
}

impl Answer {
    fn reusable_at(&self, now: SystemTime) -> bool {
        match self {
            Answer::Active { until, .. } | Answer::Inactive { until } => now < *until,
            Answer::Failed(_) => false,
        }
    }
}

type Key = (u64, [u8; 32]);

/// (provider id, SHA-256 of the token) -> answer.
pub(crate) struct IntrospectionCache {
    inner: moka::future::Cache<Key, Arc<Answer>>,
}

impl std::fmt::Debug for IntrospectionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

struct UntilReusable;

impl moka::Expiry<Key, Arc<Answer>> for UntilReusable {
    fn expire_after_create(&self, _k: &Key, v: &Arc<Answer>, _now: Instant) -> Option<Duration> {
        // Only frees memory: whether an entry may be used is decided on the check's clock.
        let left = |until: &SystemTime| {
            until
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                + Duration::from_secs(5)
        };
        Some(match &**v {
            Answer::Active { until, .. } | Answer::Inactive { until } => {
                left(until).min(Duration::from_secs(3605))
            }
            Answer::Failed(_) => Duration::ZERO,
        })
    }

    fn expire_after_update(
        &self,
        k: &Key,
        v: &Arc<Answer>,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, v, now)
    }
}

impl IntrospectionCache {
    pub(crate) fn new(max_bytes: u64) -> Self {
        IntrospectionCache {
            inner: moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k, v: &Arc<Answer>| match &**v {
                    Answer::Active { weight, .. } => *weight,
                    _ => 128,
                })
                .expire_after(UntilReusable)
                .build(),
        }
    }

    /// The answer for `key` usable at `now`, without asking anyone.
    async fn cached(&self, key: &Key, now: SystemTime) -> Option<Arc<Answer>> {
        self.inner.get(key).await.filter(|a| a.reusable_at(now))
    }

    /// The answer for `key`: cached, or asked once for every check that wants it now. The flag says
    /// whether it came from the cache.
    async fn get_or_ask(
        &self,
        key: Key,
        now: SystemTime,
        ask: impl std::future::Future<Output = Arc<Answer>>,
    ) -> (Arc<Answer>, bool) {
        let entry = self
            .inner
            .entry(key)
            .or_insert_with_if(ask, |a| !a.reusable_at(now))
            .await;
        let fresh = entry.is_fresh();
        (entry.into_value(), !fresh)
    }
}

impl JwtPolicy {
    /// Validates an opaque token (or any token, for `tokens: all`) by asking `providers` in order:
    /// the first active answer wins and its members go through the API's rules. `Ok(None)`: an
    /// answer is needed and `io` forbids asking.
    pub(super) async fn introspected(
        &self,
        token: &str,
        hash: &[u8; 32],
        providers: &[&Arc<Provider>],
        now: SystemTime,
        io: Io,
    ) -> Result<Option<ValidToken>, Refusal> {
        // Before anything is sent: a bearer token is visible ASCII (RFC 6750 2.1, b64token and
        // more); whitespace or control characters mean the request is not what it seems.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                Reason::JwtInvalid,
                "the token has characters a bearer token cannot have".into(),
            ));
        }
        let mut failed: Vec<String> = Vec::new();
        let mut inactive = Vec::new();
        for p in providers {
            let Some(intro) = p.introspection.as_ref() else {
                continue;
            };
            let key = (p.id, *hash);
            let cache = &self.shared.introspection;
            let (answer, from_cache) = match cache.cached(&key, now).await {
                Some(a) => (a, true),
                None if io == Io::Never => return Ok(None),
                None => {
                    let ask = async {
                        let Some(_permit) = self.shared.try_fetch_permit() else {
                            intro
                                .totals
                                .introspection_errors
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(provider = %p.name, result = "error", "token introspection refused: limits.max_concurrent_fetches requests in flight");
                            return Arc::new(Answer::Failed(IntrospectionError::Busy));
                        };
                        Arc::new(match intro.ask(token, now).await {
                            Ok(a) => a,
                            Err(e) => Answer::Failed(e),
                        })
                    };
                    cache.get_or_ask(key, now, ask).await
                }
            };
            if from_cache {
                self.shared
                    .introspection_hits
                    .fetch_add(1, Ordering::Relaxed);
            }
            match &*answer {
                Answer::Active {
                    claims, exp, nbf, ..
                } => {
                    self.check_lifetime(*exp, *nbf, false, now)?;
                    self.check_rules(claims, p)?;
                    return Ok(Some(ValidToken(Arc::new(TokenInner {
                        raw: token.to_string(),
                        claims: claims.clone(),
                        provider: p.name.clone(),
                        alg: None,
                        from_cache,
                        binding: super::dpop::Binding::None,
                        proof_key: None,
                    }))));
                }
                Answer::Inactive { .. } => inactive.push(p.name.to_string()),
                Answer::Failed(e) => failed.push(format!("`{}`: {e}", p.name)),
            }
        }
        if !failed.is_empty() {
            // One provider could not answer: its "active" might have been the one that counts.
            return Err((
                Reason::IdentityProviderUnavailable,
                format!("token introspection failed: {}", failed.join("; ")),
            ));
        }
        Err((
            Reason::TokenNotActive,
            format!(
                "introspection by provider `{}` says the token is not active",
                inactive.join("`, `")
            ),
        ))
    }
}
