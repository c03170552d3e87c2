//! The request as the policy sees it: borrowed from the wire message, never copied.

use std::collections::HashMap;
use std::net::IpAddr;

/// Request headers: lower-case names; repeated headers comma-joined (as Envoy sends them). Values
/// are `Bytes` so that gRPC decoding hands out slices of the received message instead of copies.
pub type Headers = HashMap<String, bytes::Bytes>;

/// One request to decide on.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    /// `:method`
    pub method: &'a str,
    /// `:authority` (may carry a port).
    pub host: &'a str,
    /// The request target: path and query.
    pub path: &'a str,
    /// `http` or `https` as the proxy received the request (Envoy's `http.scheme`); "" when
    /// unknown. Only DPoP's `htu` reads it.
    pub scheme: &'a str,
    /// Request headers.
    pub headers: &'a Headers,
    /// The direct peer's address.
    pub peer: Option<IpAddr>,
    /// The verified client certificate as URL-encoded PEM (Envoy `include_peer_certificate`), or "".
    pub peer_certificate: &'a str,
    /// Envoy per-route context extensions.
    pub context_extensions: Option<&'a HashMap<String, String>>,
}

impl<'a> CheckInput<'a> {
    /// A header's value by lower-case name.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.get(name).map(|v| v.as_ref())
    }

    /// Total bytes of header names and values.
    pub fn header_bytes(&self) -> usize {
        self.headers.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}
