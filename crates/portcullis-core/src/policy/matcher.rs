//! Choosing the API a request belongs to: hosts, path prefix on segment boundaries, methods and Envoy
//! per-route `context_extensions`. The first API in file order that matches wins.

use std::collections::HashMap;

use super::canonical;

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
    /// Parses a configured host; returns an error message for nonsense. Exact hosts are brought to
    /// the canonical form requests are (lower-case, no port, no trailing dot).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(suffix) = s.strip_prefix("*.") {
            return match canonical::host(suffix) {
                Ok(c) if !c.is_empty() && !suffix.contains([':', '[']) => {
                    Ok(HostPattern::Suffix(format!(".{c}")))
                }
                _ => Err(format!(
                    "`{s}`: a wildcard host must look like `*.example.com`"
                )),
            };
        }
        if s.contains('*') {
            return Err(format!(
                "`{s}`: a wildcard host must look like `*.example.com`"
            ));
        }
        match canonical::host(s) {
            Ok(c) if !c.is_empty() => Ok(HostPattern::Exact(c.into_owned())),
            Ok(_) => Err("a host must not be empty".into()),
            Err(e) => Err(format!("`{s}`: {e}")),
        }
    }

    /// Whether `host` (canonical: lower-case, no port) matches.
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(sfx) => host.len() > sfx.len() && host.ends_with(sfx.as_str()),
        }
    }
}

/// The request facts a matcher looks at.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `:method`
    pub method: &'a str,
    /// The canonical host: lower-case, without port.
    pub host: &'a str,
    /// The canonical path, without query.
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
/// `/ordersX`. A prefix that ends in `/` matches everything below it. Both are canonical
/// ([`canonical::path`]), so one resource has one spelling on either side.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" || prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
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
    }

    #[test]
    fn hosts_exact_wildcard_and_port() {
        let host = |h: &str| canonical::host(h).unwrap().into_owned();
        let exact = HostPattern::parse("API.example.com").unwrap();
        assert!(exact.matches("api.example.com"));
        assert!(exact.matches(&host("api.EXAMPLE.com:8443")));
        assert!(exact.matches(&host("api.example.com.")));
        assert!(!exact.matches("xapi.example.com"));
        assert_eq!(
            HostPattern::parse("api.example.com.:443").unwrap(),
            HostPattern::Exact("api.example.com".into())
        );
        let wild = HostPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("aexample.com"));
        assert!(HostPattern::parse("*example.com").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("*.example.com:443").is_err());
        assert!(HostPattern::parse("x@api.example.com").is_err());
        assert!(HostPattern::parse("").is_err());
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
            method: "GET",
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
        fn index_candidates_equal_full_scan(prefixes in proptest::collection::vec(proptest::option::of("/[ab]{0,2}(/[ab]{1,2})?"), 0..12), path in "/[ab]{0,2}(/[ab]{0,2})?") {
            let idx = ApiIndex::build(prefixes.iter().map(|p| p.as_deref()));
            let first = prefixes.iter().position(|p| p.as_deref().is_none_or(|p| path_has_prefix(&path, p)));
            let via_index = idx.candidates(&path).find(|&i| prefixes[i].as_deref().is_none_or(|p| path_has_prefix(&path, p)));
            prop_assert_eq!(via_index, first);
        }
    }
}
