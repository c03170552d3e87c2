//! The request as the policy sees it, read from Envoy's header map and connection the way the
//! ext_authz path reads a `CheckRequest` (`portcullis::server::grpc`), so that both modes decide
//! on the same input:
//!
//! - headers: every request header, pseudo-headers included, lower-case names, repeated headers
//!   comma-joined, without `x-envoy-auth-partial-body` (Envoy's ext_authz drops it too);
//! - method, host and path: `:method`, `:authority`, `:path`;
//! - scheme: `x-forwarded-proto` (what ext_authz sends as `http.scheme`);
//! - peer: Envoy's `source.address` (the downstream remote address after `use_remote_address`
//!   and `xff_num_trusted_hops`, as ext_authz's `source.address`);
//! - client certificate: none here. The 1.40 ABI exposes the peer's subject, SANs and SHA-256
//!   digest but not the certificate itself, which `client_certificate` rules parse; Envoy writes it
//!   into `x-forwarded-client-cert` instead (`SANITIZE_SET` with `cert: true`, see
//!   deploy/envoy/dynamic-module.yaml) for rules with `trust_forwarded_client_cert: true`. Without
//!   it such APIs see no certificate and fail closed (`ClientCertificateMissing`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use portcullis_core::check::{CheckInput, Headers, RequestHeader};

/// A request, owned: it outlives the hook when the decision has to wait for a fetch.
#[derive(Debug, Clone, Default)]
pub struct OwnedRequest {
    /// `:method`
    pub method: String,
    /// `:authority`
    pub host: String,
    /// `:path` (with the query)
    pub path: String,
    /// `x-forwarded-proto`, or "".
    pub scheme: String,
    /// All headers.
    pub headers: Headers,
    /// The downstream peer's address.
    pub peer: Option<IpAddr>,
    /// The route's context extensions.
    pub context_extensions: Option<HashMap<String, String>>,
}

/// A header ext_authz never forwards (it is Envoy's own, for partial bodies).
const ENVOY_AUTH_PARTIAL_BODY: &str = "x-envoy-auth-partial-body";

impl OwnedRequest {
    /// Builds the request from its headers (`for_each` calls its argument with every header),
    /// Envoy's `source.address` and the route's context extensions; `Err` names what is missing
    /// (the ext_authz path's "no method or path").
    pub fn read(
        for_each: impl FnOnce(&mut dyn FnMut(&[u8], &[u8])),
        source_address: Option<&[u8]>,
        context_extensions: Option<HashMap<String, String>>,
    ) -> Result<Self, &'static str> {
        // Every name and value copied into one buffer, then handed out as slices of it: one
        // allocation for all the headers instead of two per header.
        let mut arena = Vec::with_capacity(2048);
        let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(32);
        for_each(&mut |k: &[u8], v: &[u8]| {
            // Envoy's header names are lower-case already (HTTP/2 requires it, HTTP/1 is
            // normalised); anything else is lower-cased as ext_authz's map has it.
            let start = arena.len();
            arena.extend(k.iter().map(u8::to_ascii_lowercase));
            let name_end = arena.len();
            if &arena[start..] == ENVOY_AUTH_PARTIAL_BODY.as_bytes() {
                arena.truncate(start);
                return;
            }
            arena.extend_from_slice(v);
            spans.push((start, name_end, arena.len()));
        });
        let arena = bytes::Bytes::from(arena);
        let headers = Headers::folded(spans.into_iter().map(|(start, name_end, end)| {
            RequestHeader::new(arena.slice(start..name_end), arena.slice(name_end..end))
        }));
        let text = |name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let method = text(":method");
        let path = text(":path");
        if method.is_empty() || path.is_empty() {
            return Err("no method or path");
        }
        let host = text(":authority");
        let scheme = text("x-forwarded-proto");
        let peer = source_address.and_then(parse_peer);
        Ok(OwnedRequest {
            method,
            host,
            path,
            scheme,
            headers,
            peer,
            context_extensions,
        })
    }

    /// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all
    /// zero), to put the decision in the caller's trace.
    pub fn trace_id(&self) -> Option<String> {
        let v = std::str::from_utf8(self.headers.get("traceparent")?).ok()?;
        let mut parts = v.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace, 32)
            && hex(span, 16)
            && hex(flags, 2)
            && trace.bytes().any(|b| b != b'0')
            && span.bytes().any(|b| b != b'0')
            && (version != "00" || parts.next().is_none());
        valid.then(|| trace.to_string())
    }

    /// Borrowed as the policy's input.
    pub fn input(&self) -> CheckInput<'_> {
        CheckInput {
            method: &self.method,
            host: &self.host,
            path: &self.path,
            scheme: &self.scheme,
            headers: &self.headers,
            peer: self.peer,
            peer_certificate: "",
            context_extensions: self.context_extensions.as_ref(),
        }
    }
}

/// `source.address` is `ip:port` since Envoy 1.40 (`[v6]:port` for IPv6); a bare IP is read too.
fn parse_peer(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?;
    s.parse::<SocketAddr>()
        .map(|a| a.ip())
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn from_parts(
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        source: Option<&[u8]>,
        ctx: Option<HashMap<String, String>>,
    ) -> Result<OwnedRequest, &'static str> {
        OwnedRequest::read(
            |f| {
                for (k, v) in &headers {
                    f(k, v)
                }
            },
            source,
            ctx,
        )
    }

    #[test]
    fn headers_are_joined_lower_cased_and_pseudo_headers_kept() {
        let r = from_parts(
            vec![
                h(":method", "GET"),
                h(":path", "/a?b=1"),
                h(":authority", "api.example.com"),
                h("X-Multi", "a"),
                h("x-multi", "b"),
                h("x-envoy-auth-partial-body", "true"),
                h("x-forwarded-proto", "https"),
            ],
            Some(b"203.0.113.10:54321"),
            None,
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/a?b=1");
        assert_eq!(r.host, "api.example.com");
        assert_eq!(r.scheme, "https");
        assert_eq!(r.headers["x-multi"].as_ref(), b"a,b");
        assert_eq!(r.headers[":method"].as_ref(), b"GET");
        assert!(!r.headers.contains_key("x-envoy-auth-partial-body"));
        assert_eq!(r.peer, Some("203.0.113.10".parse().unwrap()));
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let with = |tp: &str| {
            let mut r = OwnedRequest::default();
            r.headers
                .insert("traceparent".into(), tp.to_string().into());
            r.trace_id()
        };
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            with(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        assert_eq!(
            with(&format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32))),
            None
        );
        assert_eq!(with(&format!("00-{id}-0000000000000000-01")), None);
        assert_eq!(
            with(&format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase())),
            None
        );
        assert_eq!(with(&format!("ff-{id}-00f067aa0ba902b7-01")), None);
        assert_eq!(with("garbage"), None);
        assert_eq!(OwnedRequest::default().trace_id(), None);
    }

    #[test]
    fn peers_in_every_form_and_missing_pseudo_headers() {
        assert_eq!(parse_peer(b"[::1]:80"), Some("::1".parse().unwrap()));
        assert_eq!(parse_peer(b"10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_peer(b"pipe:/x"), None);
        let err = from_parts(vec![h(":path", "/")], None, None).unwrap_err();
        assert_eq!(err, "no method or path");
    }
}
