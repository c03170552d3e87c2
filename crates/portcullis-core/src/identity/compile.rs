//! `identity_providers` and `apis[].jwt` from the configuration, every error with its path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::digest::Sha256;
use reqwest::Url;
use serde_json::Value;

use super::jose::{Algorithm, KeyKind};
use super::jwk::{self, VerifyingKey};
use super::provider::{FetchSettings, KeySet, KeySource, Provider, ProviderSpec};
use super::{ClaimRule, JwtPolicy, ProviderSet, Registry, ScopeRule, TokenLocation};
use crate::config::{self, ConfigErrors, Source};

const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(300);
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Compiles `identity_providers`. A provider whose settings equal those of a live one (from the
/// configuration being replaced) is that provider, with its keys: a reload fetches nothing for it.
pub fn compile_providers(
    src: &Source,
    registry: &Registry,
    errs: &mut ConfigErrors,
) -> ProviderSet {
    let mut set = ProviderSet {
        by_name: HashMap::new(),
        broken: HashSet::new(),
        shared: registry.shared.clone(),
        entra: HashMap::new(),
        notes: Vec::new(),
    };
    if let Some(n) = src.file.limits.max_concurrent_fetches.filter(|n| *n > 0) {
        // Introspection requests share `limits.max_concurrent_fetches` with token endpoint requests
        // (0 is reported by the credentials' compile).
        registry.shared.set_max_fetches(n);
    }
    let mut live = registry.providers.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|_, p| p.strong_count() > 0);
    for (i, cfg) in src.file.identity_providers.iter().enumerate() {
        let path = format!("identity_providers[{i}]");
        let name_taken = set.by_name.contains_key(&cfg.name);
        if cfg.name.trim().is_empty() {
            errs.push(format!("{path}.name"), "must not be empty");
        } else if name_taken {
            errs.push(
                format!("{path}.name"),
                format!("`{}` names two identity providers", cfg.name),
            );
        }
        let rules = cfg
            .entra
            .as_ref()
            .map(|e| super::entra::compile_rules(e, &format!("{path}.entra"), errs));
        let spec = provider_spec(src, cfg, &path, errs);
        let (Some((spec, digest)), None | Some(Some(_))) = (spec, &rules) else {
            set.broken.insert(cfg.name.clone());
            continue;
        };
        if name_taken {
            continue;
        }
        let provider = match live.get(&digest).and_then(Weak::upgrade) {
            Some(existing) => {
                if let Some(keys) = spec.initial_keys
                    && matches!(spec.source, KeySource::File(_))
                {
                    existing.offer_keys(keys);
                }
                existing
            }
            None => {
                let totals = registry.fetch_totals(&cfg.name);
                let p = Provider::new(spec, registry.mode, registry.http(), totals);
                live.insert(digest, Arc::downgrade(&p));
                p
            }
        };
        if let (Some(rules), Some(tenant)) = (rules.flatten(), &provider.entra) {
            set.notes.push(format!(
                "identity provider `{}`: Microsoft Entra ID {}; {}",
                cfg.name,
                tenant.describe(),
                rules.describe()
            ));
            set.entra.insert(cfg.name.clone(), rules);
        }
        set.by_name.insert(cfg.name.clone(), provider);
    }
    set
}

pub(super) fn duration(
    value: Option<&str>,
    default: Duration,
    path: String,
    errs: &mut ConfigErrors,
) -> Duration {
    let Some(s) = value else { return default };
    match crate::config::duration(s, &path, errs) {
        Some(d) if d.is_zero() => {
            errs.push(path, "must be greater than 0");
            default
        }
        Some(d) => d,
        None => default,
    }
}

pub(super) fn http_url(s: &str, path: String, errs: &mut ConfigErrors) -> Option<Url> {
    match Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
            if u.scheme() == "http" && !is_loopback(&u) {
                tracing::warn!(url = %u, "signing keys over plain http can be replaced in transit; use https");
            }
            Some(u)
        }
        Ok(_) => {
            errs.push(path, format!("`{s}` is not an http:// or https:// URL"));
            None
        }
        Err(e) => {
            errs.push(path, format!("`{s}` is not a URL ({e})"));
            None
        }
    }
}

fn is_loopback(u: &Url) -> bool {
    match u.host_str() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback()),
        None => false,
    }
}

/// Checks one provider's settings; returns its spec and the digest that identifies it.
fn provider_spec(
    src: &Source,
    cfg: &config::IdentityProvider,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<(ProviderSpec, [u8; 32])> {
    let before = errs.0.len();
    let entra = cfg
        .entra
        .as_ref()
        .map(|e| super::entra::expand(cfg, e, path, errs));
    let issuer = match &entra {
        Some(expanded) => expanded
            .as_ref()
            .map(|x| x.issuer.clone())
            .unwrap_or_default(),
        None => {
            if cfg.issuer.trim().is_empty() {
                errs.push(format!("{path}.issuer"), "must not be empty");
            }
            cfg.issuer.clone()
        }
    };
    let settings = FetchSettings {
        cache_ttl: duration(
            cfg.cache_ttl.as_deref(),
            DEFAULT_CACHE_TTL,
            format!("{path}.cache_ttl"),
            errs,
        ),
        min_refetch_interval: duration(
            cfg.min_refetch_interval.as_deref(),
            DEFAULT_MIN_REFETCH,
            format!("{path}.min_refetch_interval"),
            errs,
        ),
        fetch_timeout: duration(
            cfg.fetch_timeout.as_deref(),
            DEFAULT_FETCH_TIMEOUT,
            format!("{path}.fetch_timeout"),
            errs,
        ),
    };
    if settings.fetch_timeout > Duration::from_secs(60) {
        errs.push(
            format!("{path}.fetch_timeout"),
            "at most 60s: checks may wait for a fetch",
        );
    }

    let sources: Vec<&str> = [
        cfg.discovery_url.as_ref().map(|_| "discovery_url"),
        cfg.jwks_uri.as_ref().map(|_| "jwks_uri"),
        cfg.jwks_file.as_ref().map(|_| "jwks_file"),
        cfg.keys.as_ref().map(|_| "keys"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if sources.len() > 1 {
        errs.push(
            path,
            format!("give one key source, not {}", sources.join(" and ")),
        );
    }

    let introspection = cfg.introspection.as_ref().and_then(|i| {
        super::introspection::compile_spec(src, i, cfg, &format!("{path}.introspection"), errs)
    });
    let mut initial_keys = None;
    let mut identity_extra = String::new();
    let source = if let Some(keys) = &cfg.keys {
        let mut parsed = Vec::new();
        if keys.is_empty() {
            errs.push(format!("{path}.keys"), "list at least one key");
        }
        for (j, k) in keys.iter().enumerate() {
            let kpath = format!("{path}.keys[{j}]");
            match inline_key(src, k, &kpath) {
                Ok(key) => parsed.push(key),
                Err(msg) => errs.push(kpath, msg),
            }
        }
        // The keys (secrets included) identify the provider; only their digest is kept.
        identity_extra = serde_json::to_string(keys).unwrap_or_default();
        initial_keys = Some(KeySet { keys: parsed });
        KeySource::Inline
    } else if let Some(file) = &cfg.jwks_file {
        let resolved = src.resolve(file);
        let max = super::provider::MAX_DOCUMENT_BYTES as u64;
        match crate::config::limits::read_bytes_at_most(&resolved, max) {
            Err(e) => errs.push(
                format!("{path}.jwks_file"),
                format!("cannot read {}: {e}", resolved.display()),
            ),
            Ok(None) => {
                errs.push(
                    format!("{path}.jwks_file"),
                    format!(
                        "{} is larger than {} bytes",
                        resolved.display(),
                        super::provider::MAX_DOCUMENT_BYTES
                    ),
                );
            }
            Ok(Some(bytes)) => match jwk::parse_jwks(&bytes) {
                Ok(p) => initial_keys = Some(KeySet { keys: p.keys }),
                Err(e) => errs.push(
                    format!("{path}.jwks_file"),
                    format!("{}: {e}", resolved.display()),
                ),
            },
        }
        KeySource::File(resolved)
    } else if let Some(u) = &cfg.jwks_uri {
        http_url(u, format!("{path}.jwks_uri"), errs)
            .map(KeySource::JwksUri)
            .unwrap_or(KeySource::Inline)
    } else if cfg.introspection.is_some() && cfg.discovery_url.is_none() && !discovers_keys(cfg) {
        // Introspection only: no signing keys (every token is introspected, or the issuer has no
        // discovery document to find keys in); a JWS-shaped token meets an empty key set.
        initial_keys = Some(KeySet { keys: Vec::new() });
        KeySource::Inline
    } else {
        let url = match &cfg.discovery_url {
            Some(u) => http_url(u, format!("{path}.discovery_url"), errs),
            None if entra.is_some() => entra
                .as_ref()
                .and_then(|e| e.as_ref())
                .and_then(|e| Url::parse(&e.discovery_url).ok()),
            None => {
                let derived = format!(
                    "{}/.well-known/openid-configuration",
                    cfg.issuer.trim_end_matches('/')
                );
                match Url::parse(&derived) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
                    _ => {
                        errs.push(
                            format!("{path}.issuer"),
                            format!("`{}` is not an http(s) URL, so no discovery document can be derived from it: give jwks_uri, jwks_file, keys or discovery_url", cfg.issuer),
                        );
                        None
                    }
                }
            }
        };
        url.map(KeySource::Discovery).unwrap_or(KeySource::Inline)
    };

    let has_hmac = initial_keys
        .as_ref()
        .is_some_and(|ks| ks.keys.iter().any(|k| k.kind() == KeyKind::Hmac));
    let algorithms = match &cfg.algorithms {
        None => Algorithm::ALL
            .into_iter()
            .filter(|a| !a.is_hmac() || has_hmac)
            .collect(),
        Some(list) => {
            if list.is_empty() {
                errs.push(
                    format!("{path}.algorithms"),
                    "list at least one algorithm (or leave `algorithms` out)",
                );
            }
            let mut out = Vec::new();
            for (j, name) in list.iter().enumerate() {
                let apath = format!("{path}.algorithms[{j}]");
                match Algorithm::parse(name) {
                    Some(a) if a.is_hmac() && !has_hmac => {
                        errs.push(
                            apath,
                            format!("{a} needs an HMAC key (`kty: oct`) in this provider's `keys`"),
                        );
                    }
                    Some(a) => out.push(a),
                    None if name.eq_ignore_ascii_case("none") => errs.push(
                        apath,
                        "`none` is never accepted: unsigned tokens are always refused",
                    ),
                    None => errs.push(
                        apath,
                        format!(
                            "`{name}` is not supported; use {}",
                            Algorithm::ALL.map(|a| a.as_str()).join(", ")
                        ),
                    ),
                }
            }
            out.sort();
            out.dedup();
            out
        }
    };
    if errs.0.len() > before {
        return None;
    }
    if let Some(i) = &introspection {
        // The secret identifies the provider too; only the digest keeps it.
        identity_extra.push_str(&format!("{i:?}"));
        identity_extra.push_str(i.client_secret.expose());
    }

    let mut h = Sha256::new();
    for part in [
        cfg.name.as_str(),
        if entra.is_some() { "entra" } else { "" },
        issuer.as_str(),
        &format!("{source:?}"),
        &identity_extra,
        &format!("{settings:?}"),
        &format!("{algorithms:?}"),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest: [u8; 32] = h.finalize();
    Some((
        ProviderSpec {
            name: cfg.name.clone(),
            issuer,
            entra: entra.flatten().map(|e| e.tenant),
            source,
            initial_keys,
            algorithms,
            settings,
            introspection,
        },
        digest,
    ))
}

/// Whether a provider with `introspection` and no key source of its own still verifies JWTs with
/// keys discovered from its issuer: with `tokens: opaque` and an http(s) issuer, yes.
fn discovers_keys(cfg: &config::IdentityProvider) -> bool {
    let opaque = cfg
        .introspection
        .as_ref()
        .is_some_and(|i| matches!(i.tokens.as_deref(), None | Some("opaque")));
    opaque
        && Url::parse(&cfg.issuer)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

/// One inline key. `{kid, k}` is an HMAC secret and `{n, e}` an RSA key without writing `kty`.
fn inline_key(src: &Source, v: &Value, path: &str) -> Result<VerifyingKey, String> {
    let mut v = v.clone();
    let Some(obj) = v.as_object_mut() else {
        return Err("a key is a JWK object".into());
    };
    if !obj.contains_key("kty") {
        if obj.contains_key("k") {
            obj.insert("kty".into(), Value::from("oct"));
        } else if obj.contains_key("n") {
            obj.insert("kty".into(), Value::from("RSA"));
        }
    }
    if obj.get("kty").and_then(Value::as_str) == Some("oct")
        && !src.substituted.contains(&format!("{path}.k"))
    {
        return Err("an HMAC secret must not be written in the file: read `k` with ${env:NAME} or ${file:PATH}".into());
    }
    if obj.contains_key("d") || obj.contains_key("p") {
        return Err("this is a private key: give the public key only".into());
    }
    VerifyingKey::from_jwk(&v, true).map_err(|e| e.to_string())
}

/// Compiles one API's `jwt` section.
pub fn compile_jwt(
    cfg: &config::Jwt,
    path: &str,
    _api: &str,
    providers: &ProviderSet,
    errs: &mut ConfigErrors,
) -> Option<JwtPolicy> {
    let before = errs.0.len();
    let mut chosen: Vec<Arc<Provider>> = Vec::new();
    let mut entra = Vec::new();
    if cfg.providers.is_empty() {
        errs.push(
            format!("{path}.providers"),
            "name at least one identity provider",
        );
    }
    for (j, name) in cfg.providers.iter().enumerate() {
        match providers.by_name.get(name) {
            Some(p) if chosen.iter().any(|c| Arc::ptr_eq(c, p)) => errs.push(
                format!("{path}.providers[{j}]"),
                format!("`{name}` is listed twice"),
            ),
            Some(p) => {
                if let Some(rules) = providers.entra.get(name) {
                    entra.push((p.id, rules.clone()));
                }
                chosen.push(p.clone());
            }
            // A provider with errors of its own is not in the set; its errors are reported already.
            None if providers.broken.contains(name) => {}
            None => errs.push(
                format!("{path}.providers[{j}]"),
                format!("no identity provider is named `{name}`"),
            ),
        }
    }

    let location = match &cfg.from {
        None => TokenLocation::Header {
            name: "authorization".into(),
            scheme: Some("Bearer".into()),
        },
        Some(f) => {
            let fpath = format!("{path}.from");
            let given = [f.header.is_some(), f.query.is_some(), f.cookie.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if given != 1 {
                errs.push(&fpath, "give exactly one of `header`, `query`, `cookie`");
            }
            if f.scheme.is_some() && f.header.is_none() {
                errs.push(
                    format!("{fpath}.scheme"),
                    "a scheme only applies to a header",
                );
            }
            if let Some(s) = &f.scheme
                && (s.is_empty() || !s.bytes().all(is_token_char))
            {
                errs.push(
                    format!("{fpath}.scheme"),
                    format!("`{s}` is not an authentication scheme"),
                );
            }
            if let Some(h) = &f.header {
                let lower = h.to_ascii_lowercase();
                if lower.is_empty() || !lower.bytes().all(is_token_char) {
                    errs.push(
                        format!("{fpath}.header"),
                        format!("`{h}` is not a header name"),
                    );
                }
                // `authorization` carries a scheme unless told otherwise; a custom header carries
                // the bare token (APIM: a `Bearer ` prefix there makes the token fail).
                let scheme = f
                    .scheme
                    .clone()
                    .or_else(|| (lower == "authorization").then(|| "Bearer".to_string()));
                TokenLocation::Header {
                    name: lower,
                    scheme,
                }
            } else if let Some(q) = &f.query {
                if q.is_empty() {
                    errs.push(format!("{fpath}.query"), "must not be empty");
                }
                TokenLocation::Query(q.clone())
            } else if let Some(c) = &f.cookie {
                if c.is_empty() || !c.bytes().all(is_token_char) {
                    errs.push(
                        format!("{fpath}.cookie"),
                        format!("`{c}` is not a cookie name"),
                    );
                }
                TokenLocation::Cookie(c.clone())
            } else {
                TokenLocation::Header {
                    name: "authorization".into(),
                    scheme: Some("Bearer".into()),
                }
            }
        }
    };

    let audiences = cfg.audiences.as_ref().map(|list| {
        if list.is_empty() {
            errs.push(
                format!("{path}.audiences"),
                "list at least one audience (or leave `audiences` out)",
            );
        }
        for (j, a) in list.iter().enumerate() {
            if a.is_empty() {
                errs.push(format!("{path}.audiences[{j}]"), "must not be empty");
            }
        }
        list.clone()
    });
    // `issuers: []` means the default, as in the documented example.
    let issuers = cfg.issuers.as_ref().filter(|l| !l.is_empty()).map(|list| {
        for (j, i) in list.iter().enumerate() {
            if i.is_empty() {
                errs.push(format!("{path}.issuers[{j}]"), "must not be empty");
            }
        }
        list.clone()
    });

    let scopes = cfg.scopes.as_ref().and_then(|s| {
        let spath = format!("{path}.scopes");
        let (all, values) = match (&s.all, &s.any) {
            (Some(v), None) => (true, v),
            (None, Some(v)) => (false, v),
            _ => {
                errs.push(&spath, "give exactly one of `all`, `any`");
                return None;
            }
        };
        let key = if all { "all" } else { "any" };
        if values.is_empty() {
            errs.push(format!("{spath}.{key}"), "list at least one scope");
        }
        for (j, v) in values.iter().enumerate() {
            if v.is_empty() || v.contains(char::is_whitespace) {
                errs.push(
                    format!("{spath}.{key}[{j}]"),
                    format!("`{v}` is not a scope (one word, no spaces)"),
                );
            }
        }
        Some(ScopeRule {
            all,
            values: values.clone(),
        })
    });

    let claims = claim_rules(&cfg.required_claims, path, errs);

    let clock_skew = match &cfg.clock_skew {
        None => Duration::ZERO,
        Some(s) => {
            let d =
                crate::config::duration(s, &format!("{path}.clock_skew"), errs).unwrap_or_default();
            if d > Duration::from_secs(3600) {
                errs.push(format!("{path}.clock_skew"), "at most 1h");
            }
            d
        }
    };
    let failed_status = cfg.failed_status.unwrap_or(401);
    let certificate_bound_required = match cfg.certificate_bound.as_deref() {
        None | Some("if_present") => false,
        Some("required") => true,
        Some(other) => {
            errs.push(
                format!("{path}.certificate_bound"),
                format!("`{other}`: use `if_present` or `required`"),
            );
            false
        }
    };
    if !(400..=599).contains(&failed_status) {
        errs.push(
            format!("{path}.failed_status"),
            format!("{failed_status} is not an error status (400-599)"),
        );
    }
    if let Some(m) = &cfg.failed_message
        && m.chars().any(char::is_control)
    {
        errs.push(
            format!("{path}.failed_message"),
            "must not contain control characters",
        );
    }
    let dpop = super::dpop::compile(cfg, &location, path, errs);
    if errs.0.len() > before {
        return None;
    }
    Some(JwtPolicy {
        providers: chosen,
        location,
        audiences,
        issuers,
        scopes,
        claims,
        clock_skew,
        require_exp: cfg.require_expiration_time.unwrap_or(true),
        failed_status,
        failed_message: cfg.failed_message.clone(),
        shared: providers.shared.clone(),
        entra,
        certificate_bound_required,
        dpop,
    })
}

/// `required_claims` (of an API's `jwt`, or of a preset), every error with its path.
pub(super) fn claim_rules(
    list: &[config::RequiredClaim],
    path: &str,
    errs: &mut ConfigErrors,
) -> Vec<ClaimRule> {
    let mut claims = Vec::new();
    for (j, c) in list.iter().enumerate() {
        let cpath = format!("{path}.required_claims[{j}]");
        if c.name.is_empty() {
            errs.push(format!("{cpath}.name"), "must not be empty");
        }
        let any = match c.match_.as_deref() {
            None | Some("all") => false,
            Some("any") => true,
            Some(o) => {
                errs.push(
                    format!("{cpath}.match"),
                    format!("`{o}`: use `all` or `any`"),
                );
                false
            }
        };
        if c.separator.as_deref() == Some("") {
            errs.push(format!("{cpath}.separator"), "must not be empty");
        }
        claims.push(ClaimRule {
            name: c.name.clone(),
            values: c.values.clone(),
            any,
            separator: c.separator.clone(),
        });
    }
    claims
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
