//! Choosing the API a request belongs to: hosts, path prefix on segment boundaries, methods and Envoy
//! per-route `context_extensions`. The first API in file order that matches wins.

use std::collections::HashMap;

/// How an API selects requests.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    /// Exact hosts (lower-case, no port) and `*.suffix` wildcards; empty = any host.
    pub hosts: Vec<HostPattern>,
    /// A normalised path prefix; `None` = any path.
    pub path_prefix: Option<String>,
    /// Upper-case methods; empty = any method.
    pub methods: Vec<String>,
    /// Every pair must be present in the request's context extensions.
    pub context_extensions: Vec<(String, String)>,
}

/// One entry of `match.hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`: stored as `.example.com`; matches `a.example.com`, not `example.com`.
    Suffix(String),
}

impl HostPattern {
    /// Parses a configured host; returns an error message for nonsense.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(suffix) = s.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.len() < 2 || suffix[1..].contains('*') {
                return Err(format!(
                    "`{s}`: a wildcard host must look like `*.example.com`"
                ));
            }
            return Ok(HostPattern::Suffix(suffix.to_string()));
        }
        if s.is_empty() || s.contains('*') || s.contains('/') {
            return Err(format!("`{s}` is not a host name"));
        }
        Ok(HostPattern::Exact(strip_port(&s).to_string()))
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Suffix(sfx) => {
                host.len() > sfx.len()
                    && host.as_bytes()[host.len() - sfx.len()..]
                        .eq_ignore_ascii_case(sfx.as_bytes())
            }
        }
    }
}

/// `host:port` -> `host`; `[v6]:port` -> `[v6]`; a bare IPv6 literal is left alone.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The request facts a matcher looks at.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `:method`
    pub method: &'a str,
    /// `:authority` without the port.
    pub host: &'a str,
    /// The normalised path, without query or fragment.
    pub path: &'a str,
    /// Envoy per-route context extensions.
    pub context_extensions: Option<&'a HashMap<String, String>>,
}

impl Matcher {
    /// Whether the request belongs to this API.
    pub fn matches(&self, t: &Target<'_>) -> bool {
        (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(t.host)))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path_has_prefix(t.path, p))
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(t.method)))
            && self.context_extensions.iter().all(|(k, v)| {
                t.context_extensions
                    .and_then(|ce| ce.get(k))
                    .is_some_and(|actual| actual == v)
            })
    }
}

/// `prefix` matches `path` on a segment boundary: `/orders` matches `/orders` and `/orders/1`, not
/// `/ordersX`. A prefix that ends in `/` matches everything below it.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" || prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

/// The path part of a request target, normalised so that one resource has one spelling:
/// the query and fragment are cut, percent-encoded unreserved characters are decoded, `//` collapses
/// and `.`/`..` segments are resolved (RFC 3986 section 5.2.4). Without this, `/public/../admin`
/// would be matched as `/public` while a backend that normalises serves `/admin`.
/// An encoded slash (`%2F`) is not a separator and stays encoded.
pub fn normalize_path(target: &str) -> std::borrow::Cow<'_, str> {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let raw = &target[..end];
    let needs_work = raw.contains("//")
        || raw.contains("/.")
        || raw.contains('%')
        || raw.contains('\\')
        || !raw.starts_with('/');
    if !needs_work {
        return std::borrow::Cow::Borrowed(raw);
    }
    let decoded = decode_unreserved(raw);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split(['/', '\\']) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = decoded.ends_with('/') && !out.is_empty();
    let mut path = String::with_capacity(decoded.len() + 1);
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() || trailing {
        path.push('/');
    }
    std::borrow::Cow::Owned(path)
}

fn decode_unreserved(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                    i += 3;
                    continue;
                }
                // Keep other escapes, upper-cased, so `%2f` and `%2F` are one spelling.
                out.push('%');
                out.push((b[i + 1] as char).to_ascii_uppercase());
                out.push((b[i + 2] as char).to_ascii_uppercase());
                i += 3;
                continue;
            }
        }
        // Safe to push char by char: we only split at ASCII bytes.
        let ch_len = utf8_len(b[i]);
        out.push_str(&s[i..(i + ch_len).min(s.len())]);
        i += ch_len;
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

/// An index over the APIs' path prefixes: only APIs whose prefix shares the request's first path
/// segment (plus those without a prefix) are tried, in file order.
#[derive(Debug, Default)]
pub struct ApiIndex {
    by_first_segment: HashMap<String, Vec<usize>>,
    any_path: Vec<usize>,
}

impl ApiIndex {
    /// Builds the index from each API's prefix, in file order.
    pub fn build<'a>(prefixes: impl Iterator<Item = Option<&'a str>>) -> Self {
        let mut index = ApiIndex::default();
        for (i, prefix) in prefixes.enumerate() {
            match prefix.map(first_segment).filter(|seg| !seg.is_empty()) {
                Some(seg) => index
                    .by_first_segment
                    .entry(seg.to_string())
                    .or_default()
                    .push(i),
                None => index.any_path.push(i),
            }
        }
        index
    }

    /// Candidate APIs for `path`, in file order.
    pub fn candidates<'s>(&'s self, path: &str) -> impl Iterator<Item = usize> + 's {
        let seg = self
            .by_first_segment
            .get(first_segment(path))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        merge_sorted(seg, &self.any_path)
    }
}

fn first_segment(path: &str) -> &str {
    let p = path.strip_prefix('/').unwrap_or(path);
    p.split('/').next().unwrap_or("")
}

fn merge_sorted<'a>(a: &'a [usize], b: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || match (a.get(i), b.get(j)) {
        (Some(&x), Some(&y)) if x < y => {
            i += 1;
            Some(x)
        }
        (_, Some(&y)) => {
            j += 1;
            Some(y)
        }
        (Some(&x), None) => {
            i += 1;
            Some(x)
        }
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_on_segment_boundaries() {
        assert!(path_has_prefix("/orders", "/orders"));
        assert!(path_has_prefix("/orders/1", "/orders"));
        assert!(!path_has_prefix("/ordersX", "/orders"));
        assert!(!path_has_prefix("/order", "/orders"));
        assert!(path_has_prefix("/orders/1", "/orders/"));
        assert!(!path_has_prefix("/orders", "/orders/"));
        assert!(path_has_prefix("/anything", "/"));
        assert_eq!(normalize_path("/orders?x=1"), "/orders");
        assert!(path_has_prefix(&normalize_path("/orders?x=1"), "/orders"));
    }

    #[test]
    fn normalisation_defeats_traversal() {
        assert_eq!(normalize_path("/public/../admin"), "/admin");
        assert_eq!(normalize_path("/public/%2e%2e/admin"), "/admin");
        assert_eq!(normalize_path("//admin//x/"), "/admin/x/");
        assert_eq!(normalize_path("/a/./b"), "/a/b");
        assert_eq!(normalize_path("/../../"), "/");
        assert_eq!(normalize_path("/%6Frders"), "/orders");
        assert_eq!(normalize_path("/a%2fb"), "/a%2Fb");
        assert_eq!(normalize_path("/a\\..\\admin"), "/admin");
        assert_eq!(normalize_path("/é/x"), "/é/x");
        assert_eq!(normalize_path("/x%"), "/x%");
        assert_eq!(normalize_path("/x%4"), "/x%4");
        assert_eq!(normalize_path(""), "/");
    }

    #[test]
    fn hosts_exact_wildcard_and_port() {
        let exact = HostPattern::parse("API.example.com").unwrap();
        assert!(exact.matches("api.example.com"));
        assert!(exact.matches(strip_port("api.EXAMPLE.com:8443")));
        assert!(!exact.matches("xapi.example.com"));
        let wild = HostPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("aexample.com"));
        assert!(HostPattern::parse("*example.com").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }

    #[test]
    fn matcher_uses_every_field() {
        let ce: HashMap<String, String> = [("api".to_string(), "orders".to_string())].into();
        let m = Matcher {
            hosts: vec![HostPattern::parse("api.example.com").unwrap()],
            path_prefix: Some("/orders".into()),
            methods: vec!["GET".into()],
            context_extensions: vec![("api".into(), "orders".into())],
        };
        let t = Target {
            method: "get",
            host: "api.example.com",
            path: "/orders/1",
            context_extensions: Some(&ce),
        };
        assert!(m.matches(&t));
        assert!(!m.matches(&Target {
            method: "POST",
            ..t
        }));
        assert!(!m.matches(&Target { host: "other", ..t }));
        assert!(!m.matches(&Target {
            path: "/ordersX",
            ..t
        }));
        assert!(!m.matches(&Target {
            context_extensions: None,
            ..t
        }));
    }

    #[test]
    fn index_keeps_file_order() {
        let idx =
            ApiIndex::build([Some("/b"), None, Some("/a/x"), Some("/a"), Some("/")].into_iter());
        assert_eq!(
            idx.candidates("/a/x/1").collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(idx.candidates("/b").collect::<Vec<_>>(), vec![0, 1, 4]);
        assert_eq!(idx.candidates("/zzz").collect::<Vec<_>>(), vec![1, 4]);
    }

    proptest! {
        #[test]
        fn normalize_is_idempotent_and_rooted(s in "[a-z./%2eE\\\\?]{0,30}") {
            let once = normalize_path(&s).into_owned();
            prop_assert!(once.starts_with('/'));
            prop_assert!(!once.split('/').any(|seg| seg == ".." || seg == "."));
            prop_assert_eq!(normalize_path(&once).into_owned(), once.clone());
        }

        #[test]
        fn index_candidates_equal_full_scan(prefixes in proptest::collection::vec(proptest::option::of("/[ab]{0,2}(/[ab]{1,2})?"), 0..12), path in "/[ab]{0,2}(/[ab]{0,2})?") {
            let idx = ApiIndex::build(prefixes.iter().map(|p| p.as_deref()));
            let first = prefixes.iter().position(|p| p.as_deref().is_none_or(|p| path_has_prefix(&path, p)));
            let via_index = idx.candidates(&path).find(|&i| prefixes[i].as_deref().is_none_or(|p| path_has_prefix(&path, p)));
            prop_assert_eq!(via_index, first);
        }
    }
}
