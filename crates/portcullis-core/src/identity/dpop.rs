//! RFC 9449 DPoP: sender-constrained access tokens.
//!
//! `Authorization: DPoP <token>` plus one `DPoP` header holding a proof: a compact JWS with
//! `typ: dpop+jwt`, an asymmetric `alg` from `jwt.dpop_algorithms`, and the public key it was signed
//! with in `jwk` (public members only). Its claims bind it to this request and this token:
//! `htm` (the method), `htu` (the request URL without query and fragment), `iat` (within
//! `dpop_max_age`, with `clock_skew`), `jti` (never seen before within the window: replays are
//! refused) and `ath` (base64url SHA-256 of the access token). The token's `cnf.jkt` must be the
//! RFC 7638 thumbprint of the proof's key.
//!
//! Whatever `jwt.dpop` says, a token with `cnf.jkt` is only accepted with a valid proof: a
//! DPoP-bound token sent as `Bearer` is refused (a stolen bound token is useless without its key).
//!
//! `htu` is compared with `<scheme>://<:authority><path>` as Envoy sent them: the scheme is
//! `attribute_context.request.http.scheme` (gRPC) or `X-Forwarded-Proto` (forward auth), `https`
//! when unknown. Both URLs are normalised by the WHATWG URL parser (host case, default port,
//! dot segments) before scheme, host, port and path are compared; query and fragment are ignored
//! (RFC 9449 section 4.3).
//!
//! Replays are caught in process ([`ReplayCache`]) and, when the replicas share a store, across
//! them ([`SharedReplay`], `SET NX` in Redis): a proof is accepted once in the whole fleet.
//!
//! Server-provided nonces (`use_dpop_nonce`) are not implemented.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::jose::{self, Algorithm};
use super::jwk::VerifyingKey;
use super::rules::{printable, quote};
use super::{JwtPolicy, Refusal, TokenLocation};
use crate::check::{CheckInput, Reason};
use crate::digest::Sha256;

/// Largest proof accepted, checked before any parsing.
pub const MAX_PROOF_BYTES: usize = 8 * 1024;
/// Default of `jwt.dpop_max_age`: how old a proof's `iat` may be.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// Default of `jwt.dpop_algorithms`.
pub const DEFAULT_ALGORITHMS: [Algorithm; 5] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::RS256,
    Algorithm::PS256,
];
/// Longest `jti` accepted.
const MAX_JTI_BYTES: usize = 256;
/// JWK members that only a private (or secret) key has.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
/// Most `jti`s remembered per process; when full, new proofs are refused (never a replay let through).
pub const MAX_REPLAY_ENTRIES: usize = 1_000_000;
const SHARDS: usize = 16;

/// `jwt.dpop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpopMode {
    /// `DPoP` tokens with their proof, and unbound `Bearer` tokens.
    Allowed,
    /// Only `DPoP` tokens with their proof.
    Required,
}

/// The DPoP rules of an API.
#[derive(Debug, Clone)]
pub struct DpopPolicy {
    /// `jwt.dpop`.
    pub mode: DpopMode,
    /// `jwt.dpop_max_age`.
    pub max_age: Duration,
    /// `jwt.dpop_algorithms`: asymmetric only.
    pub algorithms: Vec<Algorithm>,
}

impl Default for DpopPolicy {
    fn default() -> Self {
        DpopPolicy {
            mode: DpopMode::Allowed,
            max_age: DEFAULT_MAX_AGE,
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
        }
    }
}

impl DpopPolicy {
    /// The `algs` of the challenge: space-separated.
    pub fn algs(&self) -> String {
        let names: Vec<&str> = self.algorithms.iter().map(|a| a.as_str()).collect();
        names.join(" ")
    }
}

/// The request a proof must describe.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `http` or `https`; "" when unknown (then `https`).
    pub scheme: &'a str,
    /// `:authority`.
    pub host: &'a str,
    /// Path and query as sent (the query is ignored).
    pub path: &'a str,
    /// The access token sent with the proof.
    pub token: &'a str,
}

/// A proof that passed every check but replay.
#[derive(Debug, Clone)]
pub struct Proof {
    /// The proof's algorithm.
    pub alg: Algorithm,
    /// RFC 7638 thumbprint (base64url SHA-256) of the proof's key.
    pub thumbprint: String,
    /// The replay-cache key: SHA-256 over the thumbprint and `jti`.
    pub replay_key: [u8; 32],
}

/// Checks a proof against the request and the token: everything but replay and `cnf.jkt`. The
/// error describes the structure, never the proof's or the token's content beyond 100 characters.
pub fn check_proof(
    proof: &str,
    expected: &Expected<'_>,
    policy: &DpopPolicy,
    skew: Duration,
    now: SystemTime,
) -> Result<Proof, String> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(format!(
            "the proof has {} bytes, more than {MAX_PROOF_BYTES}",
            proof.len()
        ));
    }
    let parsed = jose::parse(proof).map_err(|e| format!("the proof: {e}"))?;
    match parsed.header.get("typ") {
        Some(Value::String(t)) if t == "dpop+jwt" => {}
        _ => return Err("the proof's `typ` is not `dpop+jwt`".into()),
    }
    let alg = Algorithm::parse(&parsed.alg)
        .filter(|a| !a.is_hmac() && policy.algorithms.contains(a))
        .ok_or_else(|| {
            format!(
                "the proof's algorithm `{}` is not one of {}",
                printable(&parsed.alg),
                policy.algs()
            )
        })?;
    let jwk = parsed
        .header
        .get("jwk")
        .and_then(Value::as_object)
        .ok_or("the proof has no `jwk` object")?;
    if PRIVATE_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return Err("the proof's `jwk` holds private key members".into());
    }
    let key = VerifyingKey::from_jwk(&Value::Object(jwk.clone()), false)
        .map_err(|e| format!("the proof's `jwk`: {e}"))?;
    if !key.usable_for(alg) {
        return Err(format!("the proof's `jwk` is not a key for {alg}"));
    }
    let thumbprint = thumbprint(jwk)?;

    let claims = &parsed.claims;
    let text = |name: &str| -> Result<&str, String> {
        claims
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the proof has no `{name}` string"))
    };
    let jti = text("jti")?;
    if jti.is_empty() || jti.len() > MAX_JTI_BYTES {
        return Err(format!(
            "the proof's `jti` must have 1 to {MAX_JTI_BYTES} bytes"
        ));
    }
    let htm = text("htm")?;
    if htm != expected.method {
        return Err(format!(
            "the proof's `htm` `{}` is not the request's method {}",
            printable(htm),
            printable(expected.method)
        ));
    }
    check_htu(text("htu")?, expected)?;
    let iat = match claims.get("iat") {
        Some(Value::Number(n)) => n.as_f64().ok_or("the proof's `iat` is not a number")?,
        _ => return Err("the proof has no numeric `iat`".into()),
    };
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let skew_s = skew.as_secs_f64();
    if iat > now_s + skew_s {
        return Err(format!(
            "the proof was issued {}s in the future (clock_skew {}s)",
            (iat - now_s).ceil(),
            skew.as_secs()
        ));
    }
    if iat < now_s - policy.max_age.as_secs_f64() - skew_s {
        return Err(format!(
            "the proof was issued {}s ago, more than dpop_max_age {}s (clock_skew {}s)",
            (now_s - iat).floor(),
            policy.max_age.as_secs(),
            skew.as_secs()
        ));
    }
    let ath = text("ath")?;
    if ath != URL_SAFE_NO_PAD.encode(Sha256::digest(expected.token.as_bytes())) {
        return Err("the proof's `ath` is not the hash of the access token".into());
    }
    if !key.verify(alg, parsed.signing_input, &parsed.signature) {
        return Err("the proof's signature does not verify with its `jwk`".into());
    }
    let mut h = Sha256::new();
    h.update(thumbprint.as_bytes());
    h.update([0u8]);
    h.update(jti.as_bytes());
    Ok(Proof {
        alg,
        thumbprint,
        replay_key: h.finalize(),
    })
}

/// RFC 7638 thumbprint: base64url SHA-256 of the required members, in order, without spaces.
pub fn thumbprint(jwk: &Map<String, Value>) -> Result<String, String> {
    let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
    let members: &[&str] = match kty {
        "EC" => &["crv", "kty", "x", "y"],
        "RSA" => &["e", "kty", "n"],
        "OKP" => &["crv", "kty", "x"],
        _ => return Err("the proof's `jwk` has no thumbprint (kty)".into()),
    };
    let mut canonical = String::from("{");
    for (i, m) in members.iter().enumerate() {
        let v = jwk
            .get(*m)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the proof's `jwk` has no `{m}`"))?;
        if v.contains('=') {
            return Err(format!("the proof's `jwk` `{m}` is padded"));
        }
        if i > 0 {
            canonical.push(',');
        }
        canonical.push_str(&Value::String((*m).into()).to_string());
        canonical.push(':');
        canonical.push_str(&Value::String(v.into()).to_string());
    }
    canonical.push('}');
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

/// `htu` against the request: scheme, host, port and path; query and fragment ignored.
fn check_htu(htu: &str, e: &Expected<'_>) -> Result<(), String> {
    let got = url::Url::parse(htu).map_err(|_| "the proof's `htu` is not a URL".to_string())?;
    let scheme = if e.scheme.is_empty() {
        "https"
    } else {
        e.scheme
    };
    let path = e.path.split(['?', '#']).next().unwrap_or_default();
    let want = url::Url::parse(&format!("{scheme}://{}{path}", e.host))
        .map_err(|_| "the request has no URL form to compare `htu` with".to_string())?;
    let same = got.scheme() == want.scheme()
        && matches!(got.scheme(), "http" | "https")
        && got.username().is_empty()
        && got.password().is_none()
        && got.host_str() == want.host_str()
        && got.port_or_known_default() == want.port_or_known_default()
        && got.path() == want.path();
    if !same {
        return Err(format!(
            "the proof's `htu` `{}` is not the request's URL {}{}",
            printable(htu),
            printable(want.as_str()),
            if e.scheme.is_empty() {
                " (scheme unknown, https assumed)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

/// The `jti`s seen across replicas (`store.redis`): the first replica to record a proof's key
/// accepts it, every other (and a second use anywhere) refuses it.
pub trait SharedReplay: Send + Sync + std::fmt::Debug {
    /// Records `key` (SHA-256 over the proof key's thumbprint and `jti`: no secret) for `ttl`.
    /// `Ok(true)` on its first use anywhere, `Ok(false)` when it was already recorded; `Err` when
    /// the store did not answer (the check then fails closed).
    fn first_use(
        &self,
        key: [u8; 32],
        ttl: Duration,
    ) -> futures::future::BoxFuture<'_, Result<bool, String>>;
}

/// The `jti`s seen within their window, in process: first use wins, a second use is a replay.
#[derive(Debug)]
pub(crate) struct ReplayCache {
    shards: Vec<Mutex<Shard>>,
}

#[derive(Debug, Default)]
struct Shard {
    until: HashMap<[u8; 32], Instant>,
    order: VecDeque<(Instant, [u8; 32])>,
}

/// What the replay cache says of a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    First,
    Replayed,
    Full,
}

impl ReplayCache {
    pub(crate) fn new() -> Self {
        ReplayCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// Records `key` for `ttl` unless it is already there.
    pub(crate) fn first_use(&self, key: [u8; 32], ttl: Duration, now: Instant) -> Seen {
        let shard = &self.shards[usize::from(key[0]) % SHARDS];
        let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((t, k)) = s.order.front().copied() {
            if t > now {
                break;
            }
            s.order.pop_front();
            if s.until.get(&k).is_some_and(|u| *u <= now) {
                s.until.remove(&k);
            }
        }
        if s.until.get(&key).is_some_and(|u| *u > now) {
            return Seen::Replayed;
        }
        if s.until.len() >= MAX_REPLAY_ENTRIES / SHARDS {
            return Seen::Full;
        }
        let until = now + ttl;
        // (`order` may keep a key `forget` removed: it is skipped when it comes up.)
        s.until.insert(key, until);
        s.order.push_back((until, key));
        Seen::First
    }
}

impl ReplayCache {
    /// Removes `key` (a proof whose evaluation will run again).
    pub(crate) fn forget(&self, key: &[u8; 32]) {
        let shard = &self.shards[usize::from(key[0]) % SHARDS];
        shard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .until
            .remove(key);
    }
}

/// How the token was bound, for explanations and the decision log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// An unbound token (`Bearer`).
    None,
    /// A DPoP-bound token with a valid proof.
    Dpop,
}

impl Binding {
    /// The decision log's `token_binding`.
    pub fn as_str(self) -> &'static str {
        match self {
            Binding::None => "none",
            Binding::Dpop => "dpop",
        }
    }
}

impl JwtPolicy {
    /// Whether the request uses the `DPoP` scheme in the token's header (only with `jwt.dpop`).
    pub(super) fn dpop_scheme(&self, input: &CheckInput<'_>) -> bool {
        if self.dpop.is_none() {
            return false;
        }
        let TokenLocation::Header { name, .. } = &self.location else {
            return false;
        };
        input
            .header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|v| v.trim_start_matches([' ', '\t']))
            .and_then(|v| v.split_once([' ', '\t']))
            .is_some_and(|(s, _)| s.eq_ignore_ascii_case("DPoP"))
    }

    /// The token's binding against the request: `cnf.jkt` needs the `DPoP` scheme and a valid
    /// proof of that key, whatever `jwt.dpop` says.
    pub(super) fn check_binding(
        &self,
        input: &CheckInput<'_>,
        token: &str,
        claims: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<(Binding, Option<[u8; 32]>), Refusal> {
        let mismatch = |why: &str| Err((Reason::TokenBindingMismatch, why.to_string()));
        let jkt = match claims.get("cnf").and_then(|c| c.get("jkt")) {
            None => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return mismatch("the token's `cnf.jkt` is not a string"),
        };
        let dpop_scheme = self.dpop_scheme(input);
        let Some(policy) = &self.dpop else {
            return match jkt {
                Some(_) => mismatch(
                    "the token is DPoP-bound (`cnf.jkt`) and this API does not accept DPoP (jwt.dpop)",
                ),
                None => Ok((Binding::None, None)),
            };
        };
        let Some(jkt) = jkt else {
            if dpop_scheme {
                return mismatch(
                    "the DPoP scheme with a token that is not DPoP-bound (no `cnf.jkt`)",
                );
            }
            if policy.mode == DpopMode::Required {
                return mismatch(
                    "jwt.dpop is required: the token must be DPoP-bound and sent with the DPoP scheme",
                );
            }
            return Ok((Binding::None, None));
        };
        if !dpop_scheme {
            return mismatch("a DPoP-bound token (`cnf.jkt`) sent without the DPoP scheme");
        }
        let invalid = |why: String| Err((Reason::DpopProofInvalid, why));
        let proof = match input.header("dpop") {
            None => return invalid("no DPoP header".into()),
            Some(v) if v.len() > MAX_PROOF_BYTES => {
                return invalid(format!(
                    "the DPoP header has {} bytes, more than {MAX_PROOF_BYTES}",
                    v.len()
                ));
            }
            // Repeated headers arrive comma-joined; a compact JWS has no comma.
            Some(v) if v.contains(&b',') => return invalid("more than one DPoP header".into()),
            Some(v) => match std::str::from_utf8(v) {
                Ok(s) => s.trim_matches([' ', '\t']),
                Err(_) => return invalid("the DPoP header is not UTF-8".into()),
            },
        };
        let expected = Expected {
            method: input.method,
            scheme: input.scheme,
            host: input.host,
            path: input.path,
            token,
        };
        let checked = check_proof(proof, &expected, policy, self.clock_skew, now)
            .map_err(|e| (Reason::DpopProofInvalid, e))?;
        self.shared
            .signature_checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if checked.thumbprint != jkt {
            return mismatch("the token's `cnf.jkt` is not the thumbprint of the proof's key");
        }
        let ttl = self.replay_window(policy);
        match self
            .shared
            .dpop_replay
            .first_use(checked.replay_key, ttl, Instant::now())
        {
            Seen::First => Ok((Binding::Dpop, Some(checked.replay_key))),
            Seen::Replayed => invalid("the proof's `jti` was already used (replay)".into()),
            Seen::Full => invalid("too many proofs within the window to detect replays".into()),
        }
    }

    /// How long a proof's key is remembered: its `iat` window, both skews included.
    fn replay_window(&self, policy: &DpopPolicy) -> Duration {
        policy.max_age + 2 * self.clock_skew
    }

    /// The fleet-wide replay check of a proof this replica accepted (`proof_key`), when the
    /// replicas share a store. `Ok(false)`: it must wait for the store, and `io` says not to (the
    /// local record is dropped, since the evaluation will run again with the same proof).
    pub(super) async fn check_shared_replay(
        &self,
        proof_key: [u8; 32],
        io: crate::check::Io,
    ) -> Result<bool, Refusal> {
        let (Some(shared), Some(policy)) = (self.shared.shared_replay.get(), &self.dpop) else {
            return Ok(true);
        };
        if io == crate::check::Io::Never {
            self.shared.dpop_replay.forget(&proof_key);
            return Ok(false);
        }
        match shared
            .first_use(proof_key, self.replay_window(policy))
            .await
        {
            Ok(true) => Ok(true),
            Ok(false) => Err((
                Reason::DpopProofInvalid,
                "the proof's `jti` was already used, on another replica (replay)".into(),
            )),
            Err(e) => Err((
                Reason::ReplayProtectionUnavailable,
                format!("replays of the DPoP proof across replicas cannot be ruled out: {e}"),
            )),
        }
    }

    /// Forgets the proof `token` was accepted with: its evaluation stopped without a decision
    /// (`decide_now` would have to wait) and will run again, with the same proof.
    pub fn release_proof(&self, token: &super::ValidToken) {
        if let Some(key) = token.0.proof_key {
            self.shared.dpop_replay.forget(&key);
        }
    }

    /// The `WWW-Authenticate` challenge of a DPoP refusal (RFC 9449 section 7.1), when this API
    /// speaks DPoP.
    pub(super) fn dpop_challenge(&self, reason: Reason, api: &str) -> Option<String> {
        let algs = quote(
            &self
                .dpop
                .as_ref()
                .map_or_else(|| DpopPolicy::default().algs(), DpopPolicy::algs),
        );
        let realm = quote(api);
        match reason {
            Reason::DpopProofInvalid => Some(format!(
                "DPoP realm={realm}, error=\"invalid_dpop_proof\", algs={algs}"
            )),
            Reason::TokenBindingMismatch => Some(format!(
                "DPoP realm={realm}, error=\"invalid_token\", algs={algs}"
            )),
            Reason::TokenNotPresent
                if self
                    .dpop
                    .as_ref()
                    .is_some_and(|p| p.mode == DpopMode::Required) =>
            {
                Some(format!("DPoP realm={realm}, algs={algs}"))
            }
            _ => None,
        }
    }
}

/// `jwt.dpop`, `jwt.dpop_max_age` and `jwt.dpop_algorithms`, every error with its path. DPoP
/// needs the token in the `Authorization` header with a scheme.
pub(super) fn compile(
    cfg: &crate::config::Jwt,
    location: &TokenLocation,
    path: &str,
    errs: &mut crate::config::ConfigErrors,
) -> Option<DpopPolicy> {
    let Some(mode) = &cfg.dpop else {
        if cfg.dpop_max_age.is_some() || cfg.dpop_algorithms.is_some() {
            errs.push(
                format!("{path}.dpop"),
                "dpop_max_age and dpop_algorithms need `dpop: required` or `dpop: allowed`",
            );
        }
        return None;
    };
    let mode = match mode.as_str() {
        "required" => DpopMode::Required,
        "allowed" => DpopMode::Allowed,
        other => {
            errs.push(
                format!("{path}.dpop"),
                format!("`{other}` is not `required` or `allowed`"),
            );
            return None;
        }
    };
    let in_authorization = matches!(
        location,
        TokenLocation::Header { name, scheme: Some(_) } if name == "authorization"
    );
    if !in_authorization {
        errs.push(
            format!("{path}.dpop"),
            "DPoP tokens are read from the `authorization` header with a scheme: `from` must be that header",
        );
    }
    let max_age = match &cfg.dpop_max_age {
        None => DEFAULT_MAX_AGE,
        Some(s) => {
            let p = format!("{path}.dpop_max_age");
            let d = crate::config::duration(s, &p, errs).unwrap_or(DEFAULT_MAX_AGE);
            if d.is_zero() || d > Duration::from_secs(3600) {
                errs.push(p, "between 1s and 1h");
            }
            d
        }
    };
    let algorithms = match &cfg.dpop_algorithms {
        None => DEFAULT_ALGORITHMS.to_vec(),
        Some(list) => {
            if list.is_empty() {
                errs.push(
                    format!("{path}.dpop_algorithms"),
                    "list at least one algorithm",
                );
            }
            let mut out = Vec::new();
            for (i, name) in list.iter().enumerate() {
                let p = format!("{path}.dpop_algorithms[{i}]");
                match Algorithm::parse(name) {
                    Some(a) if a.is_hmac() => errs.push(
                        p,
                        format!("{a} is symmetric: a DPoP proof is signed with a private key"),
                    ),
                    Some(a) => out.push(a),
                    None => errs.push(
                        p,
                        format!("`{}` is not a supported algorithm", printable(name)),
                    ),
                }
            }
            out
        }
    };
    Some(DpopPolicy {
        mode,
        max_age,
        algorithms,
    })
}

#[cfg(test)]
mod tests;
