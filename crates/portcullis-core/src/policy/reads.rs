//! What a compiled policy set reads from a request and writes back: the facts a proxy's
//! configuration is generated from (`portcullis envoy-config`), so the proxy sends exactly what a
//! decision can depend on and lets through exactly what portcullis sets.
//!
//! Every entry here mirrors a read in [`super::PolicySet::evaluate`] and the steps it calls; a new
//! read of `CheckInput::header` must be added here too (tests/envoy_config.rs pins the lists).

use std::collections::{BTreeMap, BTreeSet};

use super::PolicySet;
use super::ip::ClientIpSource;

/// What the policy set reads from a request and sets on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestReads {
    /// Request headers (lower-case) whose presence or value can change a decision or what it
    /// sets upstream, each with why it is read (`token header (apis a, b)`). The method, host and
    /// path (with its query) are always read, from the request line, and are not listed.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Query parameters read (they arrive in the path, which the proxy always sends).
    pub query_parameters: BTreeSet<String>,
    /// Some API has a `client_certificate` rule: the proxy must send the verified peer certificate.
    pub peer_certificate: bool,
    /// Headers an allow may set upstream (`on_allow.set_headers`, backend credentials), besides
    /// the decision id every answer carries.
    pub upstream_headers: BTreeSet<String>,
    /// Headers an allow may remove from the request (key header, `on_allow.remove_headers`, and
    /// every header enforce mode sets, on a shadow-mode or unrendered value).
    pub removed_headers: BTreeSet<String>,
}

/// Header -> why -> which APIs (empty for a reason that holds for every request).
#[derive(Default)]
struct Reads(BTreeMap<String, BTreeMap<String, Vec<String>>>);

impl Reads {
    fn read(&mut self, header: &str, why: &str, api: Option<&str>) {
        let apis = self
            .0
            .entry(header.to_ascii_lowercase())
            .or_default()
            .entry(why.to_string())
            .or_default();
        if let Some(api) = api {
            apis.push(api.to_string());
        }
    }

    fn into_headers(self) -> BTreeMap<String, Vec<String>> {
        self.0
            .into_iter()
            .map(|(header, whys)| {
                let whys = whys
                    .into_iter()
                    .map(|(why, apis)| match apis.len() {
                        0 => why,
                        1 => format!("{why} (api {})", apis[0]),
                        _ => format!("{why} (apis {})", apis.join(", ")),
                    })
                    .collect();
                (header, whys)
            })
            .collect()
    }
}

impl PolicySet {
    /// What this policy set reads from a request and sets on it.
    pub fn request_reads(&self) -> RequestReads {
        let mut r = RequestReads::default();
        let mut reads = Reads::default();
        // Read before any API is chosen: the client address is a fact of every decision
        // (ip_filter, `{client_ip}` templates, the decision log).
        if let ClientIpSource::ForwardedFor { trusted_hops } = self.client_ip {
            reads.read(
                "x-forwarded-for",
                &format!("client_ip.from: x-forwarded-for, trusted_hops: {trusted_hops}"),
                None,
            );
        }
        for api in &self.apis {
            let name = Some(&*api.name);
            if api.subscription.is_some() {
                let store = &self.subscriptions;
                reads.read(&store.header, "subscription key", name);
                r.query_parameters.insert(store.query.clone());
                if store.remove_key {
                    r.removed_headers.insert(store.header.clone());
                }
            }
            if let Some(cert) = &api.cert {
                r.peer_certificate = true;
                if cert.trust_xfcc {
                    reads.read(
                        "x-forwarded-client-cert",
                        "client_certificate from a forwarded certificate",
                        name,
                    );
                }
            }
            if let Some(jwt) = &api.jwt {
                match (jwt.token_header(), jwt.token_query()) {
                    (Some("cookie"), _) => reads.read("cookie", "token cookie", name),
                    (Some(h), _) => reads.read(h, "token header", name),
                    (None, Some(q)) => {
                        r.query_parameters.insert(q.to_string());
                    }
                    (None, None) => {}
                }
            }
            for (header, _) in &api.set_headers {
                r.upstream_headers.insert(header.clone());
                // Removed when its value cannot be rendered, and on a waived deny.
                r.removed_headers.insert(header.clone());
            }
            r.removed_headers.extend(api.remove_headers.iter().cloned());
            if let Some(bc) = &api.backend_credential {
                r.upstream_headers.insert(bc.header_name().to_string());
                if api.shadow {
                    r.removed_headers.insert(bc.header_name().to_string());
                }
            }
        }
        r.headers = reads.into_headers();
        r
    }
}
