//! `compile()`: the configuration file becomes an immutable [`PolicySet`]. Every value is checked
//! here, every error is collected with its path, and nothing is left for the request path to parse.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::config::{self, ConfigErrors, Settings, Source, positive};
use crate::credentials;
use crate::identity;

use super::canonical::{self, EscapedSlashes, ForwardAuthSource, RequestRules};
use super::cert::{self, CertPolicy, Dn, Identity, normalize_serial};
use super::ip::{self, ClientIpSource, IpSet};
use super::matcher::{ApiIndex, HostPattern, Matcher};
use super::subscription;
use super::{Api, IpFilter, Limits, PolicySet, Summary};
use crate::check::template::Template;

/// State that outlives one policy set: key caches and token caches survive reloads, so a reload
/// costs no JWKS or token fetch for providers and credentials whose settings did not change.
#[derive(Debug, Default)]
pub struct Runtime {
    /// Identity providers and their key caches.
    pub identity: identity::Registry,
    /// Backend credentials and their token caches.
    pub credentials: credentials::Registry,
    /// Fetchers of `client_certificate.trust.crl_urls`.
    pub crl: cert::crl::CrlRegistry,
    /// Subscriptions made through the admin API, and their table.
    pub subscriptions: super::runtime_keys::RuntimeSubscriptions,
}

impl Runtime {
    /// A runtime that fetches nothing (`validate`): providers get no keys from the network.
    pub fn offline() -> Self {
        Runtime {
            identity: identity::Registry::offline(),
            crl: cert::crl::CrlRegistry::offline(),
            ..Runtime::default()
        }
    }

    /// Makes the credentials `policy` was compiled with the ones in force: the store it names,
    /// the fetch limit, and which credentials the admin API and consent see. Compiling changes
    /// nothing; this is the step that does, taken by whoever puts `policy` into service.
    pub fn publish(&self, policy: &PolicySet) {
        self.credentials.publish(&policy.credentials);
    }

    /// Opens the store and obtains the backend credentials `policy` uses
    /// ([`credentials::Registry::start`]); with `store.redis`, DPoP replays are checked across the
    /// replicas from then on. Call after [`Runtime::publish`].
    pub async fn start(&self, policy: &PolicySet) -> Result<(), credentials::StoreError> {
        self.credentials.start(policy.backend_credentials()).await?;
        if let Some(backend) = self.credentials.backend() {
            let fail = |detail: String| match &backend {
                credentials::Backend::Redis(r) => credentials::StoreError::Redis {
                    url: r.describe().to_string(),
                    detail: format!("run-time subscriptions: {detail}"),
                },
                credentials::Backend::File(f) => credentials::StoreError::Io {
                    path: f.path().to_path_buf(),
                    detail: format!("run-time subscriptions: {detail}"),
                },
            };
            let n = self
                .subscriptions
                .start(backend.clone())
                .await
                .map_err(fail)?;
            tracing::info!(subscriptions = n, "run-time subscriptions loaded");
        }
        if let Some(redis) = self.credentials.shared_store() {
            self.identity
                .share_replays(Arc::new(SharedStoreReplay(redis)));
        }
        Ok(())
    }

    /// A runtime for `check`: signing keys are fetched when the check needs them, CRLs of
    /// `crl_urls` when asked ([`cert::crl::CrlRegistry::fetch_unobtained`]); nothing runs in the
    /// background.
    pub fn on_demand() -> Self {
        Runtime {
            identity: identity::Registry::on_demand(),
            crl: cert::crl::CrlRegistry::on_demand(),
            ..Runtime::offline()
        }
    }
}

/// DPoP replays recorded in the shared store, where every replica sees them.
#[derive(Debug)]
struct SharedStoreReplay(Arc<credentials::store::redis::RedisStore>);

impl identity::dpop::SharedReplay for SharedStoreReplay {
    fn first_use(
        &self,
        key: [u8; 32],
        ttl: std::time::Duration,
    ) -> futures::future::BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move { self.0.first_use(&key, ttl).await })
    }
}

/// Compiles what [`config::load_pruned`] (or its siblings) read. When the file had structural
/// errors (an unknown field, a value of the wrong type) and the rest of it could still be read, that
/// rest is compiled too, offline and without publishing anything, so its errors (an invalid address,
/// an unknown provider) are reported with the structural ones in one run instead of one stage at a
/// time. An error of the later stage at a path that a structural error already names (or one above
/// or below it, which the removal of that value can cause) is left out.
pub fn compile_loaded(
    loaded: Result<Source, config::LoadFailure>,
    runtime: &Runtime,
) -> Result<(PolicySet, Settings), ConfigErrors> {
    match loaded {
        Ok(src) => compile(&src, runtime),
        Err(f) => Err(every_error(f)),
    }
}

/// Every error of a file that did not load: its structural errors, then those of compiling what
/// could be read without them (see [`compile_loaded`]).
pub fn every_error(failure: config::LoadFailure) -> ConfigErrors {
    let mut errs = failure.errors;
    if let Some(src) = failure.pruned
        && let Err(later) = compile(&src, &Runtime::offline())
    {
        let structural: Vec<String> = errs.0.iter().map(|e| e.path.clone()).collect();
        let related = |a: &str, b: &str| {
            let under = |x: &str, y: &str| {
                x.len() > y.len()
                    && x.starts_with(y)
                    && matches!(x.as_bytes()[y.len()], b'.' | b'[')
            };
            a == b || under(a, b) || under(b, a)
        };
        errs.0.extend(
            later
                .0
                .into_iter()
                .filter(|e| !structural.iter().any(|p| related(p, &e.path))),
        );
    }
    errs
}

/// Compiles a loaded configuration. Every error is reported, each with its path.
pub fn compile(src: &Source, runtime: &Runtime) -> Result<(PolicySet, Settings), ConfigErrors> {
    let f = &src.file;
    let mut errs = ConfigErrors::default();
    let settings = config::settings::compile_settings(src, &mut errs);

    let client_ip = match (f.client_ip.from.as_deref(), f.client_ip.trusted_hops) {
        (None | Some("peer"), None) => ClientIpSource::Peer,
        (None | Some("peer"), Some(_)) => {
            errs.push(
                "client_ip.trusted_hops",
                "only meaningful with `from: x-forwarded-for`",
            );
            ClientIpSource::Peer
        }
        (Some("x-forwarded-for"), hops) => ClientIpSource::ForwardedFor {
            trusted_hops: hops.unwrap_or(0),
        },
        (Some(other), _) => {
            errs.push(
                "client_ip.from",
                format!("`{other}`: use `peer` or `x-forwarded-for`"),
            );
            ClientIpSource::Peer
        }
    };

    let request_rules = RequestRules {
        escaped_slashes: match f.request.escaped_slashes.as_deref() {
            None | Some("reject") => EscapedSlashes::Reject,
            Some("keep") => EscapedSlashes::Keep,
            Some(other) => {
                errs.push(
                    "request.escaped_slashes",
                    format!("`{other}`: use `reject` or `keep`"),
                );
                EscapedSlashes::Reject
            }
        },
    };
    let forward_auth = match f.forward_auth.source.as_deref() {
        None | Some("auto") => ForwardAuthSource::Auto,
        Some("forwarded_headers") => ForwardAuthSource::ForwardedHeaders,
        Some("request") => ForwardAuthSource::Request,
        Some(other) => {
            errs.push(
                "forward_auth.source",
                format!("`{other}`: use `auto`, `forwarded_headers` or `request`"),
            );
            ForwardAuthSource::Auto
        }
    };

    let d = Limits::default();
    let limits = Limits {
        max_header_bytes: positive(
            f.limits.max_header_bytes,
            d.max_header_bytes,
            "limits.max_header_bytes",
            &mut errs,
        ),
        max_token_bytes: positive(
            f.limits.max_token_bytes,
            d.max_token_bytes,
            "limits.max_token_bytes",
            &mut errs,
        ),
        max_certificate_bytes: positive(
            f.limits.max_certificate_bytes,
            d.max_certificate_bytes,
            "limits.max_certificate_bytes",
            &mut errs,
        ),
        max_concurrent_checks: positive(
            f.limits.max_concurrent_checks,
            d.max_concurrent_checks,
            "limits.max_concurrent_checks",
            &mut errs,
        ),
    };

    // Names first: products and keys refer to APIs by name.
    let mut api_names: HashMap<&str, usize> = HashMap::new();
    for (i, api) in f.apis.iter().enumerate() {
        if api.name.trim().is_empty() {
            errs.push(format!("apis[{i}].name"), "must not be empty");
        } else if let Some(first) = api_names.insert(&api.name, i) {
            errs.push(
                format!("apis[{i}].name"),
                format!("`{}` is already the name of apis[{first}]", api.name),
            );
        }
    }

    let mut product_apis: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut open_apis: HashSet<usize> = HashSet::new();
    for (i, p) in f.products.iter().enumerate() {
        let path = format!("products[{i}]");
        let mut members = Vec::new();
        for (j, name) in p.apis.iter().enumerate() {
            match api_names.get(name.as_str()) {
                Some(&idx) => members.push(idx),
                None => errs.push(
                    format!("{path}.apis[{j}]"),
                    format!("no API is named `{name}`"),
                ),
            }
        }
        members.sort_unstable();
        members.dedup();
        if p.subscription_required == Some(false) {
            open_apis.extend(members.iter().copied());
        }
        if product_apis.insert(&p.name, members).is_some() {
            errs.push(
                format!("{path}.name"),
                format!("`{}` names two products", p.name),
            );
        }
    }

    let subscriptions = subscription::compile_subscriptions(
        src,
        &api_names,
        &product_apis,
        runtime.subscriptions.table(),
        &mut errs,
    );
    let providers = identity::compile_providers(src, &runtime.identity, &mut errs);
    let credentials = credentials::compile_credentials(src, &runtime.credentials, &mut errs);

    let shared = ApiShared {
        src,
        request_rules,
        open_apis: &open_apis,
        providers: &providers,
        credentials: &credentials,
        runtime,
        dynamic_metadata: f.dynamic_metadata.unwrap_or(true),
    };
    let mut apis = Vec::with_capacity(f.apis.len());
    for (i, a) in f.apis.iter().enumerate() {
        let api = compile_api(i, a, &shared, &mut errs);
        if let Some(api) = api {
            apis.push(api);
        }
    }

    let unmatched_allow = match f.unmatched.as_deref() {
        None | Some("deny") => false,
        Some("allow") => true,
        Some(other) => {
            errs.push("unmatched", format!("`{other}`: use `deny` or `allow`"));
            false
        }
    };

    if !errs.is_empty() {
        return Err(errs);
    }
    let (subs, keys) = subscriptions.counts();
    let summary = Summary {
        apis: apis.len(),
        providers: f.identity_providers.len(),
        subscriptions: subs,
        keys,
        credentials: f.credentials.len(),
        products: f.products.len(),
        notes: providers
            .notes()
            .iter()
            .cloned()
            .chain(f.apis.iter().enumerate().filter_map(|(i, a)| {
                let c = a.client_certificate.as_ref()?;
                (c.trust_forwarded_client_cert == Some(true) && c.trust.is_none()).then(|| {
                    format!(
                        "warning: apis[{i}].client_certificate trusts x-forwarded-client-cert without `trust`: \
                         a certificate anyone can make with the right names passes; add `trust: {{ca_files: [...]}}`"
                    )
                })
            }))
            .collect(),
    };
    let index = ApiIndex::build(apis.iter().map(|a: &Api| a.matcher.path_prefix.as_deref()));
    let policy = PolicySet {
        apis,
        index,
        unmatched_allow,
        dynamic_metadata: shared.dynamic_metadata,
        client_ip,
        request_rules,
        forward_auth,
        subscriptions,
        limits,
        summary,
        cert_cache: super::cert_cache(),
        credentials,
    };
    // `compile` returns both only when there were no errors.
    Ok((
        policy,
        settings.expect("settings are Some when no error was recorded"),
    ))
}

pub(super) fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What every API of one file is compiled against.
struct ApiShared<'a> {
    src: &'a Source,
    request_rules: RequestRules,
    open_apis: &'a HashSet<usize>,
    providers: &'a identity::ProviderSet,
    credentials: &'a credentials::CredentialSet,
    /// For `crl_urls`.
    runtime: &'a Runtime,
    /// `dynamic_metadata` (top level).
    dynamic_metadata: bool,
}

fn compile_api(
    i: usize,
    a: &config::Api,
    shared: &ApiShared<'_>,
    errs: &mut ConfigErrors,
) -> Option<Api> {
    let ApiShared {
        src,
        request_rules,
        open_apis,
        providers,
        credentials,
        runtime,
        dynamic_metadata,
    } = *shared;
    let path = format!("apis[{i}]");
    let before = errs.0.len();

    let mut hosts = Vec::new();
    for (j, h) in a.matcher.hosts.iter().flatten().enumerate() {
        match HostPattern::parse(h) {
            Ok(p) => hosts.push(p),
            Err(e) => errs.push(format!("{path}.match.hosts[{j}]"), e),
        }
    }
    // A prefix is written in the same canonical form as request paths, so `/caf%C3%A9` and `/café`
    // configure one prefix, and a prefix no request could ever have is an error.
    let path_prefix = a.matcher.path_prefix.as_deref().and_then(|p| {
        if !p.starts_with('/') {
            errs.push(
                format!("{path}.match.path_prefix"),
                format!("`{p}` must start with `/`"),
            );
            return None;
        }
        if p.contains(['?', '#']) {
            errs.push(
                format!("{path}.match.path_prefix"),
                "a path prefix has no query or fragment",
            );
            return None;
        }
        match canonical::path(p, request_rules) {
            Ok(c) => Some(c.into_owned()),
            Err(e) => {
                errs.push(format!("{path}.match.path_prefix"), format!("`{p}`: {e}"));
                None
            }
        }
    });
    let mut methods = Vec::new();
    for (j, m) in a.matcher.methods.iter().flatten().enumerate() {
        if m.is_empty() || !m.bytes().all(is_token_char) {
            errs.push(
                format!("{path}.match.methods[{j}]"),
                format!("`{m}` is not an HTTP method"),
            );
        }
        methods.push(m.to_ascii_uppercase());
    }
    let context_extensions: Vec<(String, String)> = a
        .matcher
        .context_extensions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();

    let ip_filter = a.ip_filter.as_ref().map(|f| {
        let forbid = match f.action.as_str() {
            "allow" => false,
            "forbid" => true,
            other => {
                errs.push(
                    format!("{path}.ip_filter.action"),
                    format!("`{other}`: use `allow` or `forbid`"),
                );
                false
            }
        };
        if f.addresses.is_empty() {
            errs.push(
                format!("{path}.ip_filter.addresses"),
                "list at least one address, CIDR or range",
            );
        }
        let mut ranges = Vec::with_capacity(f.addresses.len());
        for (j, entry) in f.addresses.iter().enumerate() {
            match ip::parse_entry(entry) {
                Ok(r) => ranges.push(r),
                Err(e) => errs.push(format!("{path}.ip_filter.addresses[{j}]"), e),
            }
        }
        IpFilter {
            forbid,
            set: IpSet::from_ranges(ranges),
        }
    });

    let cert = a.client_certificate.as_ref().map(|c| {
        let mut identities = Vec::new();
        for (j, id) in c.identities.iter().enumerate() {
            let ipath = format!("{path}.client_certificate.identities[{j}]");
            let mut identity = Identity::default();
            if let Some(t) = &id.thumbprint {
                match Identity::parse_thumbprint(t) {
                    Ok(t) => identity.thumbprint = Some(t),
                    Err(e) => errs.push(format!("{ipath}.thumbprint"), e),
                }
            }
            for (field, value, slot) in [
                ("subject", &id.subject, &mut identity.subject),
                (
                    "issuer_subject",
                    &id.issuer_subject,
                    &mut identity.issuer_subject,
                ),
            ] {
                if let Some(v) = value {
                    match Dn::parse(v) {
                        Ok(dn) => *slot = Some(dn),
                        Err(e) => errs.push(format!("{ipath}.{field}"), e),
                    }
                }
            }
            if let Some(s) = &id.serial_number {
                match normalize_serial(s) {
                    Some(s) => identity.serial_number = Some(s),
                    None => errs.push(
                        format!("{ipath}.serial_number"),
                        format!("`{s}` is not a hex serial number"),
                    ),
                }
            }
            identity.common_name = id.common_name.as_ref().map(|s| s.to_lowercase());
            identity.dns_name = id.dns_name.as_ref().map(|s| s.to_ascii_lowercase());
            if let Some(t) = &id.issuer_thumbprint {
                match Identity::parse_thumbprint(t) {
                    Ok(t) if c.trust.is_some() => identity.issuer_thumbprint = Some(t),
                    Ok(_) => errs.push(
                        format!("{ipath}.issuer_thumbprint"),
                        "needs `client_certificate.trust`: without a verified chain, anyone can name any issuer",
                    ),
                    Err(e) => errs.push(format!("{ipath}.issuer_thumbprint"), e),
                }
            }
            if let Some(u) = &id.uri {
                if cert::plain_uri(u) {
                    identity.uri = Some(u.clone());
                } else {
                    errs.push(
                        format!("{ipath}.uri"),
                        format!("`{u}` is not an absolute URI without percent-encoding, query, fragment, dot or empty segments"),
                    );
                }
            }
            if let Some(p) = &id.uri_prefix {
                let base = p.strip_suffix('/').unwrap_or_default();
                if !p.ends_with('/') || !cert::plain_uri(base) {
                    errs.push(
                        format!("{ipath}.uri_prefix"),
                        format!("`{p}` must be a URI ending with `/` (e.g. `spiffe://example.org/ns/payments/`), so `.../ns/a` never matches `.../ns/ab`"),
                    );
                } else {
                    identity.uri_prefix = Some(p.clone());
                }
            }
            if id.thumbprint.is_none()
                && id.subject.is_none()
                && id.issuer_subject.is_none()
                && id.common_name.is_none()
                && id.serial_number.is_none()
                && id.dns_name.is_none()
                && id.issuer_thumbprint.is_none()
                && id.uri.is_none()
                && id.uri_prefix.is_none()
            {
                errs.push(&ipath, "an identity needs at least one field");
            }
            identities.push(identity);
        }
        let trust = c
            .trust
            .as_ref()
            .and_then(|t| {
                let tpath = format!("{path}.client_certificate.trust");
                compile_trust(src, t, (a.name.as_str(), runtime), &tpath, errs)
            });
        CertPolicy {
            identities,
            validate_not_before: c.validate_not_before.unwrap_or(true),
            validate_not_after: c.validate_not_after.unwrap_or(true),
            trust_xfcc: c.trust_forwarded_client_cert.unwrap_or(false),
            trust,
        }
    });

    let jwt = a
        .jwt
        .as_ref()
        .and_then(|j| identity::compile_jwt(j, &format!("{path}.jwt"), &a.name, providers, errs));

    let mut set_headers = Vec::new();
    for (name, value) in &a.on_allow.set_headers {
        let hpath = format!("{path}.on_allow.set_headers.{name}");
        let lname = name.to_ascii_lowercase();
        if lname.is_empty() || !lname.bytes().all(is_token_char) {
            errs.push(&hpath, format!("`{name}` is not a header name"));
            continue;
        }
        if lname == "host" || lname.starts_with(':') {
            errs.push(&hpath, "the host and pseudo-headers cannot be set");
            continue;
        }
        if let Some(t) = api_template(a, value, &hpath, errs) {
            set_headers.push((lname, t));
        }
    }
    let mut metadata = Vec::new();
    for (name, value) in &a.on_allow.metadata {
        let mpath = format!("{path}.on_allow.metadata.{name}");
        if !dynamic_metadata {
            errs.push(&mpath, "`dynamic_metadata: false` sends no metadata");
            continue;
        }
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            errs.push(
                &mpath,
                format!("`{name}`: a metadata name is letters, digits, `_`, `-` and `.` (Envoy reads `:` as a path separator)"),
            );
            continue;
        }
        if crate::check::metadata::STANDARD_KEYS.contains(&name.as_str()) {
            errs.push(
                &mpath,
                format!("`{name}` is one of the facts portcullis sends itself"),
            );
            continue;
        }
        if let Some(t) = api_template(a, value, &mpath, errs) {
            metadata.push((name.clone(), t));
        }
    }
    let mut remove_headers = Vec::new();
    for (j, h) in a.on_allow.remove_headers.iter().enumerate() {
        let l = h.to_ascii_lowercase();
        if l.is_empty() || !l.bytes().all(is_token_char) {
            errs.push(
                format!("{path}.on_allow.remove_headers[{j}]"),
                format!("`{h}` is not a header name (Envoy cannot remove pseudo-headers or host)"),
            );
        } else if l == "host" {
            errs.push(
                format!("{path}.on_allow.remove_headers[{j}]"),
                "Envoy does not remove `host`",
            );
        } else {
            remove_headers.push(l);
        }
    }
    let backend_credential = a.on_allow.backend_credential.as_ref().and_then(|b| {
        credentials::compile_backend_credential(
            b,
            &format!("{path}.on_allow.backend_credential"),
            a.jwt.is_some(),
            credentials,
            errs,
        )
    });

    let shadow = match a.mode.as_deref() {
        None | Some("enforce") => false,
        Some("shadow") => true,
        Some(o) => {
            errs.push(
                format!("{path}.mode"),
                format!("`{o}`: use `enforce` or `shadow`"),
            );
            false
        }
    };
    let subscription = match (a.subscription_required, open_apis.contains(&i)) {
        (Some(true), true) => Some(false),
        (other, _) => other,
    };
    if errs.0.len() > before {
        return None;
    }
    Some(Api {
        name: Arc::from(a.name.as_str()),
        matcher: Matcher {
            hosts,
            path_prefix,
            methods,
            context_extensions,
        },
        subscription,
        ip_filter,
        cert,
        jwt,
        set_headers,
        metadata,
        remove_headers,
        backend_credential,
        shadow,
    })
}

/// Reads `client_certificate.trust`: the CA, intermediate and CRL files, each error at its path,
/// and starts (or reuses) the fetchers of its CRL URLs.
fn compile_trust(
    src: &Source,
    t: &config::CertTrust,
    (api, runtime): (&str, &Runtime),
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<Arc<cert::trust::Trust>> {
    let before = errs.0.len();
    let mut read = |field: &str, files: &[String]| {
        let mut out = Vec::new();
        for (j, f) in files.iter().enumerate() {
            let fpath = format!("{path}.{field}[{j}]");
            let resolved = src.resolve(f);
            match config::limits::read_bytes_at_most(&resolved, cert::trust::MAX_FILE_BYTES) {
                Ok(Some(bytes)) => out.push((fpath, bytes)),
                Ok(None) => errs.push(
                    fpath,
                    format!(
                        "{} is larger than {} bytes",
                        resolved.display(),
                        cert::trust::MAX_FILE_BYTES
                    ),
                ),
                Err(e) => errs.push(fpath, format!("cannot read {}: {e}", resolved.display())),
            }
        }
        out
    };
    let ca = read("ca_files", &t.ca_files);
    let intermediates = read("intermediate_files", &t.intermediate_files);
    let crls = read("crl_files", &t.crl_files);
    if t.ca_files.is_empty() {
        errs.push(format!("{path}.ca_files"), "list at least one CA file");
    }
    let mut urls = Vec::new();
    for (j, u) in t.crl_urls.iter().enumerate() {
        let upath = format!("{path}.crl_urls[{j}]");
        match reqwest::Url::parse(u) {
            // Plain http too: distribution points are usually http (RFC 5280), and a CRL is signed
            // by its CA and verified with the chain, so a network attacker can only withhold it
            // (last good kept, then refused as stale) or replay an older one (refused past its
            // `nextUpdate`), never forge one.
            Ok(url) if matches!(url.scheme(), "https" | "http") && url.host_str().is_some() => {
                urls.push(url)
            }
            Ok(_) => errs.push(upath, format!("`{u}` is not an http:// or https:// URL")),
            Err(e) => errs.push(upath, format!("`{u}` is not a URL ({e})")),
        }
    }
    let duration = |value: Option<&str>, default, field: &str, errs: &mut ConfigErrors| {
        let Some(s) = value else { return default };
        match config::duration(s, &format!("{path}.{field}"), errs) {
            Some(d) if d.is_zero() => {
                errs.push(format!("{path}.{field}"), "must be greater than 0");
                default
            }
            Some(d) => d,
            None => default,
        }
    };
    let timing = cert::crl::CrlTiming {
        refresh: duration(
            t.crl_refresh.as_deref(),
            cert::crl::DEFAULT_REFRESH,
            "crl_refresh",
            errs,
        ),
        timeout: duration(
            t.crl_fetch_timeout.as_deref(),
            cert::crl::DEFAULT_TIMEOUT,
            "crl_fetch_timeout",
            errs,
        ),
    };
    let has_crls = !t.crl_files.is_empty() || !t.crl_urls.is_empty();
    let revocation = t.validate_revocation.unwrap_or(has_crls);
    if revocation && !has_crls {
        errs.push(
            format!("{path}.validate_revocation"),
            "needs `crl_files` or `crl_urls`: with no CRL every status is unknown",
        );
    }
    let unknown_revocation_allows = match t.unknown_revocation.as_deref() {
        None | Some("deny") => false,
        Some("allow") => true,
        Some(other) => {
            errs.push(
                format!("{path}.unknown_revocation"),
                format!("`{other}`: use `deny` or `allow`"),
            );
            false
        }
    };
    if errs.0.len() > before {
        return None;
    }
    match cert::trust::Trust::compile(cert::trust::TrustFiles {
        ca,
        intermediates,
        crls,
        crl_urls: urls
            .iter()
            .map(|u| {
                runtime
                    .crl
                    .fetcher(api, u, timing, || runtime.identity.http())
            })
            .collect(),
        revocation,
        unknown_revocation_allows,
    }) {
        Ok(t) => Some(Arc::new(t)),
        Err(list) => {
            for (p, e) in list {
                errs.push(p, e);
            }
            None
        }
    }
}

/// A template of `on_allow`, checked against what the API validates.
fn api_template(
    a: &config::Api,
    value: &str,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<Template> {
    match Template::parse(value) {
        Ok(t) => {
            if t.uses_claims() && a.jwt.is_none() {
                errs.push(path, "uses {jwt.*} but the API has no `jwt` section");
            }
            if t.uses_cert() && a.client_certificate.is_none() {
                errs.push(
                    path,
                    "uses {cert.*} but the API has no `client_certificate` section",
                );
            }
            Some(t)
        }
        Err(e) => {
            errs.push(path, e);
            None
        }
    }
}
