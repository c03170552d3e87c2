//! The compiled policy set and how a request is evaluated against it.
//!
//! Order inside one API (product contract, section 3): match -> ip_filter -> subscription key ->
//! client certificate -> JWT -> backend credential -> allow. The first failing check decides.

pub mod canonical;
pub mod cert;
mod compile;
mod explain;
pub mod ip;
pub mod matcher;
mod reads;
pub mod runtime_keys;
pub mod subscription;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
pub mod xfcc;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use futures::FutureExt;

use crate::check::{Io, Metadata};
use explain::{Evaluation, Seen};

pub use crate::check::{
    CheckInput, Decision, Denial, Header, Headers, Outcome, Reason, RequestHeader, Step, StepResult,
};
use crate::credentials::BackendCredentialPolicy;
use crate::identity::JwtPolicy;
use crate::identity::binding::CertificateBinding;
pub use compile::{Runtime, compile, compile_loaded, every_error};
pub use reads::RequestReads;

use crate::check::query;
use crate::check::template::{self, Template};
use canonical::{ForwardAuthSource, NotCanonical, RequestRules};
use cert::{CertFailure, CertPolicy, ClientCert};
use ip::{ClientIpSource, IpSet};
use matcher::{ApiIndex, Matcher, Target};
use subscription::{KeyCheck, SubscriptionStore};

/// Caps on untrusted input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total header bytes of one request.
    pub max_header_bytes: usize,
    /// Largest token.
    pub max_token_bytes: usize,
    /// Largest client certificate (URL-encoded PEM).
    pub max_certificate_bytes: usize,
    /// Checks evaluated at once.
    pub max_concurrent_checks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 96 * 1024,
            max_token_bytes: 16 * 1024,
            max_certificate_bytes: 32 * 1024,
            max_concurrent_checks: 4096,
        }
    }
}

/// An immutable, precomputed policy set. Swapped whole on reload.
#[derive(Debug)]
pub struct PolicySet {
    apis: Vec<Api>,
    index: ApiIndex,
    unmatched_allow: bool,
    /// Send the decision's facts as `dynamic_metadata`.
    dynamic_metadata: bool,
    client_ip: ClientIpSource,
    request_rules: RequestRules,
    /// Where forward-auth reads the request it decides on.
    pub forward_auth: ForwardAuthSource,
    subscriptions: SubscriptionStore,
    /// Input caps.
    pub limits: Limits,
    /// Counts for `validate` and logs.
    pub summary: Summary,
    /// Certificates already parsed, by their exact encoded text: a client sends the same certificate
    /// on every request, and X.509 parsing with two digests costs more than the rest of a decision.
    /// Keyed by the full text (compared for equality), so two certificates can never share an entry.
    cert_cache: CertCache,
    /// The backend credentials this set was compiled with, published by [`Runtime::publish`].
    credentials: crate::credentials::CredentialSet,
}

/// Parsed certificates by their encoded text. foldhash rather than SipHash: the key is 1-2 KiB of
/// public text hashed on every request, and equality on the full text (not the hash) decides a hit.
type CertCache = moka::sync::Cache<String, Arc<ClientCert>, foldhash::fast::RandomState>;

/// Weight budget of the parsed-certificate cache, in encoded bytes (about 4,000 typical certificates).
const CERT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// An empty parsed-certificate cache.
pub(crate) fn cert_cache() -> CertCache {
    moka::sync::Cache::builder()
        .max_capacity(CERT_CACHE_BYTES)
        .weigher(|k: &String, _| u32::try_from(k.len()).unwrap_or(u32::MAX))
        .build_with_hasher(foldhash::fast::RandomState::default())
}

/// What a policy set holds, for `portcullis validate` and the reload log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// APIs.
    pub apis: usize,
    /// Identity providers.
    pub providers: usize,
    /// Subscriptions.
    pub subscriptions: usize,
    /// Subscription keys (primary and secondary).
    pub keys: usize,
    /// Backend credentials.
    pub credentials: usize,
    /// Products.
    pub products: usize,
    /// What presets expanded to (an Entra ID provider's issuers and rules), one line each.
    pub notes: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} APIs, {} identity providers, {} subscriptions ({} keys), {} products, {} credentials",
            self.apis,
            self.providers,
            self.subscriptions,
            self.keys,
            self.products,
            self.credentials
        )
    }
}

/// One compiled API.
#[derive(Debug)]
pub(crate) struct Api {
    pub name: Arc<str>,
    pub matcher: Matcher,
    /// `None`: subscription keys are not looked at; `Some(required)`: a present key is validated,
    /// and a missing one is refused when required.
    pub subscription: Option<bool>,
    pub ip_filter: Option<IpFilter>,
    pub cert: Option<CertPolicy>,
    pub jwt: Option<JwtPolicy>,
    pub set_headers: Vec<(String, Template)>,
    /// `on_allow.metadata`: extra `dynamic_metadata` entries.
    pub metadata: Vec<(String, Template)>,
    pub remove_headers: Vec<String>,
    pub backend_credential: Option<BackendCredentialPolicy>,
    pub shadow: bool,
}

/// A compiled `ip_filter`.
#[derive(Debug)]
pub(crate) struct IpFilter {
    pub forbid: bool,
    pub set: IpSet,
}

/// How to evaluate.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// The time checks compare against.
    pub now: SystemTime,
    /// Record every step (for `portcullis check`).
    pub explain: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            now: SystemTime::now(),
            explain: false,
        }
    }
}

impl PolicySet {
    /// Where keys are read, and every subscription (inline, keys file, run-time).
    pub fn subscriptions(&self) -> &SubscriptionStore {
        &self.subscriptions
    }

    /// Decides on a request. Never panics and never allows by accident: a panic anywhere in the
    /// evaluation becomes a deny with reason `Internal`.
    pub async fn decide(&self, input: &CheckInput<'_>, opts: EvalOptions) -> Decision {
        deny_on_panic(async {
            self.evaluate(input, opts, Io::Wait)
                .await
                .unwrap_or_else(|| Decision::internal(None))
        })
        .await
    }

    /// Decides on this thread without waiting, for callers with no async runtime on it (the
    /// in-process Envoy module): `Some` when everything the decision needs is at hand (no key or
    /// backend token to fetch, or all of them cached), `None` when it would have to wait; then
    /// call [`PolicySet::decide`] where waiting is possible. Nothing is fetched, and nothing
    /// counted twice, on the `None` path. Like `decide`, a panic is a deny with reason `Internal`.
    /// Renewing a cached token ahead of its expiry runs on a tokio runtime: called where none is
    /// entered, a token near its end is still used, and renewed by the next `decide`.
    pub fn decide_now(&self, input: &CheckInput<'_>, opts: EvalOptions) -> Option<Decision> {
        let evaluate = || self.evaluate(input, opts, Io::Never).now_or_never();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(evaluate)) {
            // `now_or_never` is `None` when some step was not ready at once (a lock held by a
            // fetch in flight): that, too, is waiting.
            Ok(d) => d.flatten(),
            Err(_) => {
                tracing::error!("panic while evaluating a check; denied with Internal");
                Some(Decision::internal(None))
            }
        }
    }

    /// The decision; `None` only with [`Io::Never`], when a step would have to wait for a fetch.
    async fn evaluate(
        &self,
        input: &CheckInput<'_>,
        opts: EvalOptions,
        io: Io,
    ) -> Option<Decision> {
        let mut d = Decision::new();
        let mut ev = Evaluation {
            d: &mut d,
            explain: opts.explain,
            io,
            would_wait: false,
            seen: Seen::default(),
        };
        let client_ip = ip::client_ip(self.client_ip, input.peer, input.header("x-forwarded-for"));
        ev.d.facts.client_ip = client_ip;

        let header_bytes = match input.header_bytes() {
            Ok(n) => n,
            Err(e) => {
                ev.fail("request", Reason::InvalidRequest, || e.to_string());
                ev.d.outcome = Outcome::Deny(
                    Denial::new(Reason::InvalidRequest).with_message(format!("Bad request: {e}.")),
                );
                return Some(self.finish(ev.seen, d));
            }
        };
        if header_bytes > self.limits.max_header_bytes {
            ev.fail("limits", Reason::RequestHeadersTooLarge, || {
                format!(
                    "{header_bytes} header bytes, limit {}",
                    self.limits.max_header_bytes
                )
            });
            ev.d.outcome = Outcome::Deny(Denial::new(Reason::RequestHeadersTooLarge));
            return Some(self.finish(ev.seen, d));
        }

        // Every check below sees the canonical request, never the bytes as sent.
        let req = match canonical::request(input.method, input.host, input.path, self.request_rules)
        {
            Ok(req) => req,
            Err(e) => {
                let reason = match e {
                    NotCanonical::Path(_) => Reason::RequestPathNotCanonical,
                    NotCanonical::Host(_) => Reason::RequestHostNotCanonical,
                    NotCanonical::Method => Reason::InvalidRequest,
                };
                ev.fail("request", reason, || e.to_string());
                ev.d.outcome =
                    Outcome::Deny(Denial::new(reason).with_message(format!("Bad request: {e}.")));
                return Some(self.finish(ev.seen, d));
            }
        };
        // Shown only when canonicalisation changed something the caller wrote.
        if ev.explain
            && (req.path != input.path.split('?').next().unwrap_or_default()
                || req.host != input.host
                || req.method != input.method)
        {
            ev.pass("request", || {
                format!("read as {} {}{}", req.method, req.host, req.path)
            });
        }
        let path = &req.path;
        let target = Target {
            method: &req.method,
            host: &req.host,
            path,
            context_extensions: input.context_extensions,
        };
        let Some(api) = self
            .index
            .candidates(path)
            .map(|i| (i, &self.apis[i]))
            .find(|(_, a)| a.matcher.matches(&target))
        else {
            if self.unmatched_allow {
                ev.pass("match", || {
                    format!(
                        "no API matches {} {}{}; unmatched: allow",
                        target.method, target.host, path
                    )
                });
            } else {
                ev.fail("match", Reason::NoMatchingApi, || {
                    format!("no API matches {} {}{}", target.method, target.host, path)
                });
                ev.d.outcome = Outcome::Deny(Denial::new(Reason::NoMatchingApi));
            }
            return Some(self.finish(ev.seen, d));
        };
        let (api_index, api) = api;
        ev.d.api = Some(api.name.clone());
        ev.pass("match", || format!("API `{}`", api.name));

        match self
            .evaluate_api(api_index, api, input, client_ip, opts, &mut ev)
            .await
        {
            Ok(()) => {}
            // Neither a deny nor one to waive: the caller decides again, waiting.
            Err(_) if ev.would_wait => {
                // Evaluated again, waiting, with the same DPoP proof: not a replay.
                if let (Some(jwt), Some(token)) = (&api.jwt, &ev.seen.token) {
                    jwt.release_proof(token);
                }
                return None;
            }
            Err(denial) if api.shadow => {
                tracing::info!(api = %api.name, reason = %denial.reason, decision_id = %ev.d.id, "shadow mode: deny not enforced");
                ev.d.waived = Some(denial.reason);
                // The request goes upstream as enforce mode would send it, less what the failed
                // checks would have added: every header enforce mode sets or removes is removed,
                // so a caller can never supply one (`x-user-id: admin`) on a waived deny. Only
                // the key removal, decided before any check could fail, is already in place.
                ev.d.upstream_headers.clear();
                ev.d.metadata = Metadata::new();
                ev.d.remove_headers
                    .extend(api.set_headers.iter().map(|(name, _)| name.clone()));
                ev.d.remove_headers
                    .extend(api.remove_headers.iter().cloned());
                if let Some(bc) = &api.backend_credential {
                    ev.d.remove_headers.push(bc.header_name().to_string());
                }
                ev.d.remove_headers.sort_unstable();
                ev.d.remove_headers.dedup();
            }
            Err(denial) => {
                ev.d.upstream_headers.clear();
                ev.d.metadata = Metadata::new();
                ev.d.remove_headers.clear();
                ev.d.remove_query.clear();
                ev.d.outcome = Outcome::Deny(denial);
                return Some(self.finish(ev.seen, d));
            }
        }
        Some(self.finish(ev.seen, d))
    }

    async fn evaluate_api(
        &self,
        api_index: usize,
        api: &Api,
        input: &CheckInput<'_>,
        client_ip: Option<IpAddr>,
        opts: EvalOptions,
        ev: &mut Evaluation<'_>,
    ) -> Result<(), Denial> {
        // 1. Caller address.
        match &api.ip_filter {
            None => ev.skip("ip_filter"),
            Some(f) => {
                let Some(ip) = client_ip else {
                    return Err(ev.deny("ip_filter", Reason::FailedToParseCallerIp, || {
                        "the caller's address could not be established".into()
                    }));
                };
                let listed = f.set.contains(ip);
                match (f.forbid, listed) {
                    (false, false) => {
                        let msg = format!("Caller IP address {ip} is not allowed. Access denied.");
                        return Err(ev.deny_with(
                            "ip_filter",
                            Denial::new(Reason::CallerIpNotAllowed).with_message(msg),
                            || format!("{ip} is not listed (action: allow)"),
                        ));
                    }
                    (true, true) => {
                        return Err(ev.deny("ip_filter", Reason::CallerIpBlocked, || {
                            format!("{ip} is listed (action: forbid)")
                        }));
                    }
                    _ => ev.pass("ip_filter", || format!("{ip} passes")),
                }
            }
        }

        // 2. Subscription key.
        let mut subscription_id: Option<subscription::SubscriptionId> = None;
        match api.subscription {
            None => ev.skip("subscription"),
            Some(required) => {
                let store = &self.subscriptions;
                let header_key = input.header(&store.header).filter(|v| !v.is_empty());
                let challenge = || {
                    format!(
                        "AzureApiManagementKey realm=\"{}\",name=\"{}\",type=\"header\"",
                        api.name, store.header
                    )
                };
                let Ok(query_key) = query::query_param(input.path, &store.query) else {
                    let denial =
                        Denial::new(Reason::SubscriptionKeyInvalid).with_challenge(challenge());
                    return Err(ev.deny_with("subscription", denial, || {
                        format!(
                            "the `{}` query parameter appears more than once",
                            store.query
                        )
                    }));
                };
                let key = header_key.or(query_key.as_deref());
                match store.check(api_index, key, required) {
                    KeyCheck::Valid(sub) => {
                        ev.pass("subscription", || format!("subscription `{}`", sub.id));
                        subscription_id = Some(sub.id);
                        ev.seen.product = sub.product;
                    }
                    KeyCheck::NotNeeded => {
                        ev.pass("subscription", || "no key, none required".into())
                    }
                    KeyCheck::Missing => {
                        let denial = Denial::new(Reason::SubscriptionKeyNotFound)
                            .with_challenge(challenge());
                        return Err(ev.deny_with("subscription", denial, || {
                            format!(
                                "no `{}` header or `{}` query parameter",
                                store.header, store.query
                            )
                        }));
                    }
                    KeyCheck::Invalid => {
                        let denial =
                            Denial::new(Reason::SubscriptionKeyInvalid).with_challenge(challenge());
                        return Err(ev.deny_with("subscription", denial, || {
                            "the key is unknown, inactive or not for this API".into()
                        }));
                    }
                }
                if store.remove_key {
                    if input.header(&store.header).is_some() {
                        ev.d.remove_headers.push(store.header.clone());
                    }
                    if query_key.is_some() {
                        ev.d.remove_query.push(store.query.clone());
                    }
                }
            }
        }
        ev.d.facts.subscription_id = subscription_id.clone();

        // 3. Client certificate.
        let mut client_cert: Option<Arc<ClientCert>> = None;
        match &api.cert {
            None => ev.skip("client_certificate"),
            Some(policy) => {
                let (cert, chain) =
                    self.read_certificate(policy, input)
                        .map_err(|(reason, detail)| {
                            ev.deny("client_certificate", reason, move || detail)
                        })?;
                match policy.check(&cert, chain.as_deref(), opts.now) {
                    Ok(()) => ev.pass("client_certificate", || {
                        format!(
                            "thumbprint {}{}",
                            cert.thumbprint(),
                            match &policy.trust {
                                Some(t) if t.checks_revocation() => {
                                    ", chain trusted, not revoked"
                                }
                                Some(_) => ", chain trusted",
                                None => "",
                            }
                        )
                    }),
                    Err(CertFailure::NotTrusted(why)) => {
                        return Err(ev.deny(
                            "client_certificate",
                            Reason::ClientCertificateNotTrusted,
                            move || why,
                        ));
                    }
                    Err(CertFailure::Revoked) => {
                        return Err(ev.deny(
                            "client_certificate",
                            Reason::ClientCertificateRevoked,
                            || "a certificate of the chain is revoked".into(),
                        ));
                    }
                    Err(CertFailure::NotMatched) => {
                        return Err(ev.deny(
                            "client_certificate",
                            Reason::ClientCertificateIdentityNotMatched,
                            || format!("thumbprint {} matches no identity", cert.thumbprint()),
                        ));
                    }
                    Err(CertFailure::Expired) => {
                        return Err(ev.deny(
                            "client_certificate",
                            Reason::ClientCertificateExpired,
                            || "past not-after".into(),
                        ));
                    }
                    Err(CertFailure::NotYetValid) => {
                        return Err(ev.deny(
                            "client_certificate",
                            Reason::ClientCertificateNotYetValid,
                            || "before not-before".into(),
                        ));
                    }
                }
                ev.seen.cert = Some(cert.clone());
                client_cert = Some(cert);
            }
        }

        // 4. JWT.
        let mut token = None;
        match &api.jwt {
            None => ev.skip("jwt"),
            Some(jwt) => match jwt
                .validate(
                    input,
                    opts.now,
                    &api.name,
                    self.limits.max_token_bytes,
                    ev.io,
                )
                .await
            {
                Ok(None) => return Err(ev.would_wait()),
                Ok(Some(valid)) => {
                    // RFC 8705: the certificate the client-certificate step read, else Envoy's
                    // verified peer certificate, parsed only for a bound token (or when binding
                    // is required).
                    let cert_sha256 = if jwt.wants_certificate(&valid) {
                        match &client_cert {
                            Some(c) => Some(c.sha256),
                            None if !input.peer_certificate.is_empty() => self
                                .parse_certificate(input.peer_certificate)
                                .ok()
                                .map(|c| c.sha256),
                            None => None,
                        }
                    } else {
                        None
                    };
                    let binding = jwt
                        .check_certificate_binding(&valid, cert_sha256.as_ref(), &api.name)
                        .map_err(|failure| {
                            ev.d.facts.token_binding = Some("refused");
                            let detail = failure.detail.clone();
                            ev.deny_with("jwt", failure.denial, move || detail)
                        })?;
                    ev.pass("jwt", || match binding {
                        CertificateBinding::Bound => {
                            format!("{}, {}", valid.describe(), binding.as_str())
                        }
                        CertificateBinding::Unbound => valid.describe(),
                    });
                    ev.d.facts.subject = valid.subject().map(str::to_string);
                    ev.d.facts.token_binding = Some(match (binding, valid.binding().as_str()) {
                        (CertificateBinding::Bound, "dpop") => "certificate+dpop",
                        (CertificateBinding::Bound, _) => "certificate",
                        (CertificateBinding::Unbound, dpop) => dpop,
                    });
                    ev.seen.token = Some(valid.clone());
                    token = Some(valid);
                }
                Err(failure) => {
                    if matches!(
                        failure.denial.reason,
                        Reason::DpopProofInvalid | Reason::TokenBindingMismatch
                    ) {
                        ev.d.facts.token_binding = Some("refused");
                    }
                    let detail = failure.detail.clone();
                    return Err(ev.deny_with("jwt", failure.denial, move || detail));
                }
            },
        }

        // 5. Headers for upstream, built before the credential so a refused value costs no token.
        let ctx = template::Context {
            claims: token.as_ref().map(|t| t.claims()),
            subscription_id: subscription_id.as_deref(),
            client_ip,
            cert_sha1: client_cert.as_deref().map(|c| &c.sha1),
            api: &api.name,
            raw_token: token.as_ref().map(|t| t.raw()),
        };
        for (name, tpl) in &api.set_headers {
            match tpl.render(&ctx) {
                Ok(value) => ev.d.upstream_headers.push(Header {
                    name: name.clone(),
                    value,
                    sensitive: false,
                }),
                // The caller must not be able to supply the header we would have set.
                Err(template::RenderError::Missing) => ev.d.remove_headers.push(name.clone()),
                Err(template::RenderError::ControlCharacter) => {
                    return Err(ev.deny("on_allow", Reason::HeaderValueNotAllowed, || {
                        format!("the value for `{name}` contains control characters")
                    }));
                }
            }
        }
        ev.d.remove_headers
            .extend(api.remove_headers.iter().cloned());
        if self.dynamic_metadata {
            for (name, tpl) in &api.metadata {
                // Missing: the entry is left out; control characters: left out by `Metadata`.
                if let Ok(value) = tpl.render(&ctx) {
                    ev.d.metadata.string(name, &value);
                }
            }
        }

        // 6. Backend credential.
        match &api.backend_credential {
            None => ev.skip("backend_credential"),
            Some(bc) => match bc.header_with(&ctx, ev.explain, ev.io).await {
                Ok(None) => return Err(ev.would_wait()),
                Ok(Some(header)) => {
                    ev.pass("backend_credential", || {
                        format!(
                            "`{}` would carry credential `{}`",
                            header.name,
                            bc.credential_name()
                        )
                    });
                    ev.d.upstream_headers.retain(|h| h.name != header.name);
                    ev.d.remove_headers.retain(|h| *h != header.name);
                    ev.d.upstream_headers.push(header);
                }
                Err(failure) => {
                    let detail = failure.detail.clone();
                    return Err(ev.deny_with("backend_credential", failure.denial, move || detail));
                }
            },
        }
        Ok(())
    }

    /// Adds the `dynamic_metadata` of a decision made without evaluating a request (a CheckRequest
    /// too incomplete to read): its id and reason.
    pub fn with_metadata(&self, d: Decision) -> Decision {
        self.finish(Seen::default(), d)
    }

    /// Adds the standard facts to the decision's `dynamic_metadata` (documented in the README,
    /// "Identity for the rest of Envoy"): on every answer the API and the decision id; on a deny
    /// its reason; on an allow what the checks established. Never a token, key or secret.
    fn finish(&self, seen: Seen, mut d: Decision) -> Decision {
        if !self.dynamic_metadata {
            return d;
        }
        let m = &mut d.metadata;
        if let Some(api) = &d.api {
            m.string("api", api);
        }
        m.string("decision_id", &d.id);
        match &d.outcome {
            Outcome::Deny(denial) => {
                m.string("reason", denial.reason.as_str());
                return d;
            }
            Outcome::Allow => {}
        }
        if let Some(reason) = d.waived {
            m.string("shadow_reason", reason.as_str());
        }
        if let Some(id) = &d.facts.subscription_id {
            m.string("subscription_id", id);
        }
        if let Some(product) = &seen.product {
            m.string("product", product);
        }
        if let Some(binding) = d.facts.token_binding.filter(|b| *b != "none") {
            m.string("token_binding", binding);
        }
        if let Some(token) = &seen.token {
            let claims = token.claims();
            let text = |name: &str| claims.get(name).and_then(serde_json::Value::as_str);
            if let Some(sub) = text("sub") {
                m.string("subject", sub);
            }
            if let Some(iss) = text("iss") {
                m.string("issuer", iss);
            }
            if let Some(client) = text("client_id")
                .or_else(|| text("azp"))
                .or_else(|| text("appid"))
            {
                m.string("client_id", client);
            }
            let scopes = crate::identity::scope_iter(claims);
            if scopes.clone().next().is_some() {
                m.strings("scopes", scopes);
            }
        }
        if let Some(cert) = &seen.cert {
            let mut hex = [0u8; 40];
            // The thumbprint's form ({cert.thumbprint}), without a String.
            if hex::encode_to_slice(cert.sha1, &mut hex).is_ok() {
                hex.make_ascii_uppercase();
            }
            if let Ok(thumbprint) = std::str::from_utf8(&hex) {
                m.string("client_certificate_thumbprint", thumbprint);
            }
        }
        d
    }

    /// The canonical request line without the query, `GET api.example.com/orders/1`, for the
    /// decision log; `None` when the request has no canonical form.
    pub fn request_line(&self, method: &str, host: &str, target: &str) -> Option<String> {
        let c = canonical::request(method, host, target, self.request_rules).ok()?;
        Some(format!("{} {}{}", c.method, c.host, c.path))
    }

    /// Names of every API, in file order.
    pub fn api_names(&self) -> impl Iterator<Item = &str> {
        self.apis.iter().map(|a| &*a.name)
    }

    /// `store`, as configured (where run-time subscriptions live).
    pub fn store_spec(&self) -> Option<&crate::credentials::spec::StoreSpec> {
        self.credentials.store_spec()
    }

    /// The backend credentials the APIs use, to fetch them before the first request.
    pub fn backend_credentials(&self) -> impl Iterator<Item = &BackendCredentialPolicy> {
        self.apis
            .iter()
            .filter_map(|a| a.backend_credential.as_ref())
    }
}

/// Runs an evaluation; a panic inside it becomes a deny with reason `Internal` instead of a dropped
/// stream (which the proxy might turn into an allow under `failure_mode_allow`).
pub(crate) async fn deny_on_panic(
    evaluation: impl std::future::Future<Output = Decision>,
) -> Decision {
    match std::panic::AssertUnwindSafe(evaluation)
        .catch_unwind()
        .await
    {
        Ok(d) => d,
        Err(_) => {
            tracing::error!("panic while evaluating a check; denied with Internal");
            Decision::internal(None)
        }
    }
}
