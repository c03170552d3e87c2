//! One canonical view of the request: the method, host and path every check, template, log line and
//! `portcullis check` sees. A proxy forwards what the client wrote; a backend may read the same bytes
//! differently from the matcher (decode `%2F` into a separator, resolve `..`, cut Tomcat's `;params`,
//! fold full-width letters). So anything two readers could disagree on is refused here, with 400, and
//! everything else is brought to one spelling. README "Canonical requests" lists the rules.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use icu_normalizer::ComposingNormalizerBorrowed;

/// What to do with `%2F` (an encoded `/`) in a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Refuse the request (the default): a backend that decodes `%2F` reads another path.
    #[default]
    Reject,
    /// Keep `%2F` as data inside its segment, for backends that never decode it into a separator.
    Keep,
}

/// How requests are canonicalised (`request:` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestRules {
    /// `request.escaped_slashes`.
    pub escaped_slashes: EscapedSlashes,
}

/// Where forward-auth (`/authz/` on the HTTP listener) reads the request it decides on
/// (`forward_auth.source`). A header the proxy sets is authoritative when it is present: empty or
/// unreadable is a 400, never a fall-back to another header a client could have written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardAuthSource {
    /// `X-Forwarded-Method`, `-Host` and `-Uri` when any of them is present (then all three are
    /// required), else the request itself.
    #[default]
    Auto,
    /// Always the three `X-Forwarded-*` headers (nginx `auth_request`, Traefik `forwardAuth`).
    ForwardedHeaders,
    /// Always the request itself: its method, `Host` and path after `/authz` (Envoy `http_service`);
    /// `X-Forwarded-*` headers are never read.
    Request,
}

/// Why a request has no canonical form. The text is safe to show the caller: it names the rule,
/// never the offending bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCanonical {
    /// The path or query breaks a rule.
    Path(&'static str),
    /// The host breaks a rule.
    Host(&'static str),
    /// The method is not an HTTP token.
    Method,
}

impl std::fmt::Display for NotCanonical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotCanonical::Path(why) => write!(f, "the request path {why}"),
            NotCanonical::Host(why) => write!(f, "the request host {why}"),
            NotCanonical::Method => f.write_str("the request method is not an HTTP token"),
        }
    }
}

/// The canonical request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical<'a> {
    /// Upper-case.
    pub method: Cow<'a, str>,
    /// Lower-case, without port or trailing dot; IPv6 literals in brackets, compressed; may be empty
    /// only when the proxy sent no host at all.
    pub host: Cow<'a, str>,
    /// The canonical path (see [`path`]).
    pub path: Cow<'a, str>,
    /// The raw query, without `?`; "" when there is none.
    pub query: &'a str,
}

/// Canonicalises a request line: `target` is the path and query as the proxy sent them.
pub fn request<'a>(
    method_in: &'a str,
    host_in: &'a str,
    target: &'a str,
    rules: RequestRules,
) -> Result<Canonical<'a>, NotCanonical> {
    let method = method(method_in)?;
    let host = host(host_in)?;
    let (raw_path, query) = target.split_once('?').unwrap_or((target, ""));
    if !query.bytes().all(is_visible_ascii) {
        return Err(NotCanonical::Path(
            "has a query with bytes that are not visible ASCII",
        ));
    }
    if query.contains('#') {
        return Err(NotCanonical::Path("has a fragment"));
    }
    let path = path(raw_path, rules)?;
    Ok(Canonical {
        method,
        host,
        path,
        query,
    })
}

/// An HTTP method: an RFC 9110 token, upper-cased (the matcher compares methods case-insensitively
/// so that `post` can never slip past a `methods: [POST]` API to a backend that reads it as POST).
pub fn method(m: &str) -> Result<Cow<'_, str>, NotCanonical> {
    if m.is_empty() || !m.bytes().all(is_tchar) {
        return Err(NotCanonical::Method);
    }
    if m.bytes().any(|b| b.is_ascii_lowercase()) {
        Ok(Cow::Owned(m.to_ascii_uppercase()))
    } else {
        Ok(Cow::Borrowed(m))
    }
}

/// Characters that stand for themselves in a canonical path; every other byte is written `%XX`.
/// RFC 3986 `pchar` without `%` (always an escape) and `;` (refused).
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b)
}

/// A path (without query) in canonical form, or why it has none.
///
/// Refused: a path not starting with `/`; any byte that is not visible ASCII; a malformed `%` escape;
/// `\` and `;`, raw or encoded (Windows and Tomcat/Spring read them as a separator and a path
/// parameter); an encoded `/` (unless `escaped_slashes: keep`); an encoded `%` (double encoding);
/// an encoded control character; escapes that do not decode to UTF-8; text that Unicode
/// compatibility normalisation (NFKC) would change (full-width `／` or `ａ`, ligatures, decomposed
/// accents: a backend that folds them reads another path); `.` and `..` segments, raw or encoded,
/// and empty segments (`//`) except a single trailing `/`: backends differ on all three.
///
/// The result is `/`-separated segments in which every escape that a backend could decode has been
/// decoded, and only bytes that cannot stand in a path raw (space, `?`, `#`, non-ASCII, ...) are
/// written as upper-case `%XX`; `%2F` too under `escaped_slashes: keep`. So one resource has one
/// spelling, and `path(path(p)) == path(p)`.
pub fn path(raw: &str, rules: RequestRules) -> Result<Cow<'_, str>, NotCanonical> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(NotCanonical::Path("does not start with `/`"));
    }
    // Fast path: nothing to decode or re-encode; only the segment rules remain.
    if b[1..].iter().all(|&c| is_plain(c) || c == b'/') {
        check_segments(raw)?;
        return Ok(Cow::Borrowed(raw));
    }
    // Decode every escape into bytes, remembering which `/` were encoded.
    let mut decoded: Vec<u8> = Vec::with_capacity(b.len());
    let mut escaped_slash: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if !is_visible_ascii(c) {
            return Err(NotCanonical::Path(
                "has a byte that is not visible ASCII (encode it)",
            ));
        }
        match c {
            b'\\' => return Err(NotCanonical::Path("has a `\\`")),
            b';' => return Err(NotCanonical::Path("has a `;` (a path parameter)")),
            b'#' => return Err(NotCanonical::Path("has a fragment")),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(NotCanonical::Path("has a malformed `%` escape"));
                };
                let d = (h * 16 + l) as u8;
                match d {
                    b'/' if rules.escaped_slashes == EscapedSlashes::Keep => {
                        escaped_slash.push(decoded.len());
                    }
                    b'/' => return Err(NotCanonical::Path("has an encoded `/` (%2F)")),
                    b'\\' => return Err(NotCanonical::Path("has an encoded `\\` (%5C)")),
                    b';' => return Err(NotCanonical::Path("has an encoded `;` (%3B)")),
                    b'%' => {
                        return Err(NotCanonical::Path(
                            "has an encoded `%` (%25: double encoding)",
                        ));
                    }
                    d if d < 0x20 || d == 0x7f => {
                        return Err(NotCanonical::Path("has an encoded control character"));
                    }
                    _ => {}
                }
                decoded.push(d);
                i += 3;
            }
            c => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    let Ok(text) = std::str::from_utf8(&decoded) else {
        return Err(NotCanonical::Path("has escapes that are not UTF-8"));
    };
    if !text.is_ascii() {
        if text.chars().any(char::is_control) {
            return Err(NotCanonical::Path("has an encoded control character"));
        }
        const NFKC: ComposingNormalizerBorrowed<'static> = ComposingNormalizerBorrowed::new_nfkc();
        if !NFKC.is_normalized(text) {
            return Err(NotCanonical::Path(
                "has characters that Unicode normalisation (NFKC) changes",
            ));
        }
    }
    // The segment rules apply to the decoded text: `%2e%2e` is `..`. An encoded slash (kept) is
    // data, so split only at the raw ones.
    let mut out = String::with_capacity(decoded.len() + 8);
    let mut kept = escaped_slash.iter().peekable();
    for (at, &c) in decoded.iter().enumerate() {
        if kept.peek() == Some(&&at) {
            kept.next();
            out.push_str("%2F");
        } else if c == b'/' || is_plain(c) {
            out.push(c as char);
        } else {
            push_escape(&mut out, c);
        }
    }
    // Encoded slashes were written `%2F`, so splitting the result at `/` sees the real segments.
    check_segments(&out)?;
    Ok(Cow::Owned(out))
}

fn push_escape(out: &mut String, c: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(c >> 4)] as char);
    out.push(HEX[usize::from(c & 0xf)] as char);
}

/// Dot segments and empty segments (a trailing `/` excepted). `p` starts with `/`.
fn check_segments(p: &str) -> Result<(), NotCanonical> {
    let body = &p[1..];
    let body = body.strip_suffix('/').unwrap_or(body);
    if body.is_empty() {
        return if p.len() <= 1 {
            Ok(())
        } else {
            Err(NotCanonical::Path("has an empty segment (`//`)"))
        };
    }
    for seg in body.split('/') {
        match seg {
            "" => return Err(NotCanonical::Path("has an empty segment (`//`)")),
            "." | ".." => return Err(NotCanonical::Path("has a `.` or `..` segment")),
            _ => {}
        }
    }
    Ok(())
}

/// A host (`:authority` or `Host`) in canonical form: lower-case, the port and one trailing dot
/// removed, IPv6 literals compressed in brackets. Refused: anything that is not a DNS name (labels of
/// letters, digits, `-` and `_`, 1-63 bytes, 253 in all) or an IP literal: user info (`x@host`),
/// spaces and tabs, percent escapes, non-ASCII (IDNs travel as `xn--` labels), a name whose last label
/// is numeric but which is no dotted-quad IPv4 address (`0x7f.1`, `2130706433`, `010.0.0.1`: URL
/// parsers read those as IPv4 numbers), an empty or non-numeric port. An empty host (the proxy sent
/// none) stays empty and matches only APIs without `hosts`.
pub fn host(h: &str) -> Result<Cow<'_, str>, NotCanonical> {
    if h.is_empty() {
        return Ok(Cow::Borrowed(""));
    }
    if let Some(rest) = h.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err(NotCanonical::Host("has an unclosed `[`"));
        };
        check_port(after)?;
        let Ok(ip) = inside.parse::<Ipv6Addr>() else {
            return Err(NotCanonical::Host("is not an IPv6 literal"));
        };
        return Ok(Cow::Owned(format!("[{ip}]")));
    }
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    if let Some(p) = port {
        check_port_digits(p)?;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(NotCanonical::Host("is not a host name"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(NotCanonical::Host("is not a host name or IP literal"));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x") || last.starts_with("0X")
    {
        // Numeric: only a plain dotted quad, which std parses strictly (no octal, hex or short forms).
        return match name.parse::<Ipv4Addr>() {
            Ok(ip) if ip.to_string() == name => Ok(lower(name)),
            _ => Err(NotCanonical::Host("is a numeric name but no IPv4 address")),
        };
    }
    Ok(lower(name))
}

fn lower(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

fn check_port(after: &str) -> Result<(), NotCanonical> {
    match after.strip_prefix(':') {
        None if after.is_empty() => Ok(()),
        None => Err(NotCanonical::Host("has text after the IPv6 literal")),
        Some(p) => check_port_digits(p),
    }
}

fn check_port_digits(p: &str) -> Result<(), NotCanonical> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NotCanonical::Host("has a port that is not a number"));
    }
    match p.parse::<u32>() {
        Ok(n) if n <= 65535 => Ok(()),
        _ => Err(NotCanonical::Host("has a port over 65535")),
    }
}

fn is_visible_ascii(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: RequestRules = RequestRules {
        escaped_slashes: EscapedSlashes::Reject,
    };
    const KEEP: RequestRules = RequestRules {
        escaped_slashes: EscapedSlashes::Keep,
    };

    fn ok(p: &str) -> String {
        path(p, R)
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
            .into_owned()
    }

    fn refused(p: &str) -> bool {
        path(p, R).is_err()
    }

    #[test]
    fn plain_paths_are_borrowed_and_unchanged() {
        for p in [
            "/",
            "/orders",
            "/orders/1",
            "/orders/",
            "/a-b_c.d~e/f:g@h!$&'()*+,=",
        ] {
            assert!(matches!(path(p, R), Ok(Cow::Borrowed(x)) if x == p), "{p}");
        }
    }

    #[test]
    fn decodes_what_a_backend_would_decode() {
        assert_eq!(ok("/%6Frders"), "/orders");
        assert_eq!(ok("/a%2cb"), "/a,b");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/a%3fb"), "/a%3Fb");
        assert_eq!(ok("/caf%C3%A9"), "/caf%C3%A9");
        assert_eq!(ok("/x%7e"), "/x~");
        assert_eq!(ok("/a\"b"), "/a%22b");
    }

    #[test]
    fn refuses_what_readers_disagree_on() {
        for p in [
            "/public/..%2Fadmin/secret",
            "/public/%2e%2e/admin",
            "/public/../admin",
            "/public/./x",
            "/public/.",
            "/public/..",
            "//admin",
            "/public//x",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "/a;b",
            "/admin;jsessionid=1/x",
            "/public/..;/admin",
            "/a%3Bb",
            "/a%252Fb",
            "/a%25",
            "/x%",
            "/x%4",
            "/x%zz",
            "/a%00b",
            "/a%0Ab",
            "/a%7Fb",
            "/a%C2%85b",
            "/a%C0%AEb",
            "/a%ffb",
            "/a%EF%BC%8Fadmin",
            "/%EF%BD%81dmin",
            "/e%CC%81",
            "/a\u{ff}b",
            "/a b",
            "/a\tb",
            "/a#b",
            "",
            "admin",
            "*",
        ] {
            assert!(refused(p), "{p:?} was accepted as {:?}", path(p, R));
        }
    }

    #[test]
    fn escaped_slashes_keep_is_data_inside_a_segment() {
        assert_eq!(path("/a%2fb", KEEP).unwrap(), "/a%2Fb");
        assert_eq!(path("/a%2F..", KEEP).unwrap(), "/a%2F..");
        assert!(path("/a/%2e%2e/b", KEEP).is_err());
        assert_eq!(path("/a/%2e%2e%2Fb", KEEP).unwrap(), "/a/..%2Fb");
        assert!(path("/a%252F", KEEP).is_err());
    }

    #[test]
    fn trailing_slash_is_kept_and_root_is_fine() {
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/a/"), "/a/");
        assert!(refused("/a//"));
    }

    #[test]
    fn request_splits_the_query_and_checks_it() {
        let c = request("get", "API.example.com:443", "/orders?x=1&y=%2F", R).unwrap();
        assert_eq!(c.method, "GET");
        assert_eq!(c.host, "api.example.com");
        assert_eq!(c.path, "/orders");
        assert_eq!(c.query, "x=1&y=%2F");
        assert!(request("GET", "h", "/a?x=\u{ff}", R).is_err());
        assert!(request("GET", "h", "/a?x#y", R).is_err());
        assert!(request("G ET", "h", "/", R).is_err());
        assert!(request("", "h", "/", R).is_err());
    }

    #[test]
    fn hosts() {
        let h = |s| host(s).map(Cow::into_owned);
        assert_eq!(h("admin.example.com").unwrap(), "admin.example.com");
        assert_eq!(h("Admin.Example.COM").unwrap(), "admin.example.com");
        assert_eq!(h("admin.example.com.").unwrap(), "admin.example.com");
        assert_eq!(h("admin.example.com.:443").unwrap(), "admin.example.com");
        assert_eq!(h("admin.example.com:8443").unwrap(), "admin.example.com");
        assert_eq!(h("10.1.2.3:80").unwrap(), "10.1.2.3");
        assert_eq!(h("[::1]:80").unwrap(), "[::1]");
        assert_eq!(h("[2001:DB8:0:0::1]").unwrap(), "[2001:db8::1]");
        assert_eq!(h("xn--bcher-kva.example").unwrap(), "xn--bcher-kva.example");
        assert_eq!(h("my_host.internal").unwrap(), "my_host.internal");
        assert_eq!(h("").unwrap(), "");
        for bad in [
            " admin.example.com",
            "\tadmin.example.com",
            "admin.example.com ",
            "x@admin.example.com",
            "admin.example.com..",
            ".admin.example.com",
            "admin..example.com",
            "admin%2eexample.com",
            "admin.example.com:",
            "admin.example.com:x",
            "admin.example.com:65536",
            "admin.example.com:443:443",
            "ａdmin.example.com",
            "admin.example.com/x",
            "-admin.example.com",
            "::1",
            "[::1",
            "[::1]x",
            "[fe80::1%25eth0]",
            "2130706433",
            "0x7f.0.0.1",
            "127.1",
            "010.0.0.1",
            "1.2.3.4.5",
            "*.example.com",
        ] {
            assert!(h(bad).is_err(), "{bad:?} was accepted as {:?}", h(bad));
        }
    }

    proptest! {
        #[test]
        fn path_never_panics_and_is_idempotent(s in "/[a-zA-Z0-9./%;\\\\ ?#~+éａ-]{0,40}") {
            for rules in [R, KEEP] {
                if let Ok(once) = path(&s, rules) {
                    let once = once.into_owned();
                    prop_assert!(once.starts_with('/'));
                    prop_assert!(!once.split('/').any(|seg| seg == ".." || seg == "."));
                    let twice = path(&once, rules);
                    prop_assert_eq!(twice.as_deref(), Ok(once.as_str()));
                }
            }
        }

        #[test]
        fn path_never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = path(&s, R);
            let _ = host(&s);
            let _ = method(&s);
        }

        #[test]
        fn host_is_idempotent(s in "[a-zA-Z0-9.:\\[\\]_-]{0,30}") {
            if let Ok(once) = host(&s) {
                let once = once.into_owned();
                prop_assert_eq!(host(&once).map(Cow::into_owned), Ok(once));
            }
        }

        #[test]
        fn encodings_of_one_path_agree(segs in proptest::collection::vec("[a-z0-9]{1,4}", 1..4)) {
            // Percent-encoding any plain character never changes the canonical form.
            let plain = format!("/{}", segs.join("/"));
            let encoded: String = plain
                .bytes()
                .map(|b| if b == b'/' { "/".to_string() } else { format!("%{b:02x}") })
                .collect();
            prop_assert_eq!(ok(&encoded), plain);
        }
    }
}
