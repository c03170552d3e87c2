//! The request as the policy sees it: borrowed from the wire message, never copied.

use std::collections::HashMap;
use std::net::IpAddr;

use bytes::Bytes;

/// One request header: its lower-case name and its value, both slices of the received message
/// when the request came over gRPC.
///
/// On the wire this is exactly an entry of ext_authz's `map<string, bytes> headers`, which
/// protobuf encodes as a repeated message `{string key = 1; bytes value = 2;}`; decoding it as a
/// list of these (with the name kept as bytes) costs no `String`, no hashing and no table per
/// request. A map would also keep the last of two entries with the same name without a word; a
/// list lets [`CheckInput::header_bytes`] refuse that instead.
///
/// The protobuf form is behind the `wire` feature (the service's); the Envoy module goes without.
#[derive(Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "wire", derive(prost::Message))]
#[cfg_attr(not(feature = "wire"), derive(Debug, Default))]
pub struct RequestHeader {
    /// The name, lower-case (the map entry's `key`).
    #[cfg_attr(feature = "wire", prost(bytes = "bytes", tag = "1"))]
    pub name: Bytes,
    /// The value (the map entry's `value`).
    #[cfg_attr(feature = "wire", prost(bytes = "bytes", tag = "2"))]
    pub value: Bytes,
}

impl RequestHeader {
    /// A header from its name and value.
    pub fn new(name: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        RequestHeader {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// Request headers as an owned list: lower-case names, each once (repeated headers comma-joined,
/// as Envoy sends them). The adapters that do not decode a `CheckRequest` (the HTTP listener, the
/// Envoy module, `portcullis check`) build one; a [`CheckInput`] borrows it as a slice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<RequestHeader>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// No headers, with room for `n`.
    pub fn with_capacity(n: usize) -> Self {
        Headers(Vec::with_capacity(n))
    }

    /// A header's value by exact (lower-case) name.
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        find(&self.0, name).map(|h| &h.value)
    }

    /// Whether a header is present.
    pub fn contains_key(&self, name: &str) -> bool {
        find(&self.0, name).is_some()
    }

    /// Sets a header, replacing one of the same name.
    pub fn insert(&mut self, name: String, value: Bytes) {
        let name = Bytes::from(name);
        match self.0.iter_mut().find(|h| h.name == name) {
            Some(h) => h.value = value,
            None => self.0.push(RequestHeader { name, value }),
        }
    }

    /// Adds a value to a header: a second value is comma-joined to the first, as a proxy folds a
    /// repeated header.
    pub fn append(&mut self, name: impl Into<Bytes>, value: &[u8]) {
        let name = name.into();
        match self.0.iter_mut().find(|h| h.name == name) {
            Some(h) => {
                let mut joined = Vec::with_capacity(h.value.len() + 1 + value.len());
                joined.extend_from_slice(&h.value);
                joined.push(b',');
                joined.extend_from_slice(value);
                h.value = joined.into();
            }
            None => self.0.push(RequestHeader {
                name,
                value: Bytes::copy_from_slice(value),
            }),
        }
    }

    /// Headers as a proxy forwards them: a repeated name's values comma-joined into its first
    /// entry, in order.
    pub fn folded(headers: impl IntoIterator<Item = RequestHeader>) -> Self {
        let headers = headers.into_iter();
        let mut out = Vec::with_capacity(headers.size_hint().0);
        let mut seen = 0u64;
        for h in headers {
            let bit = 1u64 << fingerprint(&h.name);
            if seen & bit != 0
                && let Some(first) = out
                    .iter_mut()
                    .find(|o: &&mut RequestHeader| o.name == h.name)
            {
                let mut joined = Vec::with_capacity(first.value.len() + 1 + h.value.len());
                joined.extend_from_slice(&first.value);
                joined.push(b',');
                joined.extend_from_slice(&h.value);
                first.value = joined.into();
                continue;
            }
            seen |= bit;
            out.push(h);
        }
        Headers(out)
    }
}

impl std::ops::Deref for Headers {
    type Target = [RequestHeader];

    fn deref(&self) -> &[RequestHeader] {
        &self.0
    }
}

impl std::ops::Index<&str> for Headers {
    type Output = Bytes;

    fn index(&self, name: &str) -> &Bytes {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no header `{name}`"),
        }
    }
}

impl From<Headers> for Vec<RequestHeader> {
    fn from(h: Headers) -> Self {
        h.0
    }
}

impl FromIterator<(String, Bytes)> for Headers {
    /// Later entries replace earlier ones of the same name, as a map's would.
    fn from_iter<I: IntoIterator<Item = (String, Bytes)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.insert(k, v);
        }
        h
    }
}

impl<const N: usize> From<[(String, Bytes); N]> for Headers {
    fn from(entries: [(String, Bytes); N]) -> Self {
        entries.into_iter().collect()
    }
}

fn find<'h>(headers: &'h [RequestHeader], name: &str) -> Option<&'h RequestHeader> {
    headers.iter().find(|h| h.name == name.as_bytes())
}

/// Why a header list is not one a proxy sends. The text is safe to show the caller: it names the
/// rule, never the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHeaders {
    /// Two entries have the same name: which one a backend reads is not ours to guess.
    Repeated,
    /// A name is empty, has a byte that is not visible ASCII, or an upper-case letter (a backend
    /// reads names without regard to case, so it would read the header this one shadows or is
    /// shadowed by). Proxies send lower-case tokens.
    BadName,
}

impl std::fmt::Display for BadHeaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadHeaders::Repeated => "a request header name is repeated",
            BadHeaders::BadName => "a request header name is not a lower-case token",
        })
    }
}

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
    pub headers: &'a [RequestHeader],
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
        find(self.headers, name).map(|h| h.value.as_ref())
    }

    /// Total bytes of header names and values, once the list is known to be unambiguous: every
    /// name lower-case and none repeated.
    pub fn header_bytes(&self) -> Result<usize, BadHeaders> {
        let mut total = 0;
        // Names seen, by a 6-bit fingerprint: only a fingerprint seen before costs a scan.
        let mut seen = 0u64;
        for (i, h) in self.headers.iter().enumerate() {
            let name = &h.name[..];
            total += name.len() + h.value.len();
            // Folded rather than `any`: no branch per byte, so the loop vectorises.
            let bad = name.iter().fold(name.is_empty(), |bad, &b| {
                bad | !(0x21..=0x7e).contains(&b) | b.is_ascii_uppercase()
            });
            if bad {
                return Err(BadHeaders::BadName);
            }
            let bit = 1u64 << fingerprint(name);
            if seen & bit != 0 && self.headers[..i].iter().any(|o| o.name == name) {
                return Err(BadHeaders::Repeated);
            }
            seen |= bit;
        }
        Ok(total)
    }
}

/// Six bits of a header name: its length and three of its bytes, mixed.
fn fingerprint(name: &[u8]) -> u32 {
    let (Some(&first), Some(&last)) = (name.first(), name.last()) else {
        return 0;
    };
    let mid = name[name.len() / 2];
    let x = (name.len() as u32)
        .wrapping_mul(0x9e37_79b9)
        .wrapping_add(u32::from(first) << 16 | u32::from(mid) << 8 | u32::from(last))
        .wrapping_mul(0x85eb_ca6b);
    x >> 26
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(headers: &[RequestHeader]) -> CheckInput<'_> {
        CheckInput {
            method: "GET",
            host: "h",
            path: "/",
            scheme: "",
            headers,
            peer: None,
            peer_certificate: "",
            context_extensions: None,
        }
    }

    fn list(names: &[&str]) -> Vec<RequestHeader> {
        names
            .iter()
            .map(|n| RequestHeader::new(n.to_string(), "v"))
            .collect()
    }

    #[test]
    fn a_repeated_name_is_refused_wherever_it_is() {
        let names: Vec<String> = (0..40).map(|i| format!("x-header-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let unique = list(&names);
        assert_eq!(
            input(&unique).header_bytes(),
            Ok(names.iter().map(|n| n.len() + 1).sum())
        );
        for first in 0..names.len() {
            for second in first + 1..=names.len() {
                let mut l = unique.clone();
                l.insert(second, l[first].clone());
                assert_eq!(
                    input(&l).header_bytes(),
                    Err(BadHeaders::Repeated),
                    "{first} repeated at {second}"
                );
            }
        }
    }

    #[test]
    fn a_name_that_is_not_a_lower_case_token_is_refused() {
        for name in [
            "Authorization",
            "x-Api-Key",
            "X",
            "aUTHORIZATION",
            "",
            "a b",
            "x\u{e9}",
            "a\0",
        ] {
            let l = list(&["accept", name]);
            assert_eq!(
                input(&l).header_bytes(),
                Err(BadHeaders::BadName),
                "{name:?}"
            );
        }
        let l = vec![RequestHeader::new(&b"x-\xff"[..], "v")];
        assert_eq!(input(&l).header_bytes(), Err(BadHeaders::BadName));
        // Pseudo-headers are names as Envoy sends them.
        let l = list(&[":authority", ":path", "x-b3-traceid"]);
        assert!(input(&l).header_bytes().is_ok());
        // Values are not names: upper case there is data.
        let l = vec![RequestHeader::new("authorization", "Bearer X")];
        assert_eq!(input(&l).header_bytes(), Ok(21));
    }

    #[cfg(feature = "wire")]
    #[test]
    fn the_wire_form_is_a_map_entry() {
        use prost::Message;
        // `map<string, bytes>` entry {key: "a", value: "b"}: field 1 and field 2, length-delimited.
        let entry = [0x0a, 1, b'a', 0x12, 1, b'b'];
        let h = RequestHeader::decode(&entry[..]).unwrap();
        assert_eq!(h, RequestHeader::new("a", "b"));
        assert_eq!(h.encode_to_vec(), entry);
    }

    #[test]
    fn folding_joins_repeated_names_in_order() {
        let names: Vec<String> = (0..40).map(|i| format!("x-header-{i}")).collect();
        let mut list: Vec<RequestHeader> = names
            .iter()
            .map(|n| RequestHeader::new(n.clone(), "a"))
            .collect();
        list.extend(
            names
                .iter()
                .rev()
                .map(|n| RequestHeader::new(n.clone(), "b")),
        );
        let h = Headers::folded(list);
        assert_eq!(h.len(), 40);
        for (got, n) in h.iter().zip(&names) {
            assert_eq!(got.name.as_ref(), n.as_bytes());
            assert_eq!(got.value.as_ref(), b"a,b");
        }
        assert!(input(&h).header_bytes().is_ok());
    }

    #[test]
    fn owned_headers_keep_one_entry_per_name() {
        let mut h = Headers::new();
        h.insert("a".into(), "1".into());
        h.insert("a".into(), "2".into());
        h.append("b", b"x");
        h.append("b", b"y");
        assert_eq!(h.len(), 2);
        assert_eq!(h["a"].as_ref(), b"2");
        assert_eq!(h["b"].as_ref(), b"x,y");
        assert!(h.contains_key("b") && !h.contains_key("c"));
        assert_eq!(input(&h).header("b"), Some(&b"x,y"[..]));
    }
}
