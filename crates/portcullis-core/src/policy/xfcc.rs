//! A strict parser for `x-forwarded-client-cert` (XFCC), the header in which Envoy forwards the
//! client certificate of the connection it accepted.
//!
//! Grammar (Envoy's `forward_client_cert_details` documentation and `mutateXfccRequestHeader`):
//! the header is a `,`-separated list of elements, one per proxy, the nearest proxy's last; an
//! element is a `;`-separated list of `key=value` pairs; keys are `By`, `Hash`, `Cert`, `Chain`,
//! `Subject`, `URI` and `DNS`, case-insensitive; a value may be double-quoted, and inside quotes a
//! backslash escapes the next character (`\"` is a quote). `,` `;` `=` are structural only
//! outside quotes.
//!
//! Why strict: under `APPEND_FORWARD` the proxy appends `,<its element>` to whatever the caller
//! sent, so the caller writes a prefix of the header. A lenient parser lets that prefix end inside
//! an open quote, which swallows the proxy's comma: the whole header becomes one element and the
//! caller's own `Cert=` is the one read. Here a value that opens a quote must close it and be
//! followed by a separator, so a prefix left open either never closes (refused) or is closed by the
//! proxy's own opening quote and then runs into the proxy's value (refused). The only header that
//! parses is one whose every comma is where a proxy put it.
//!
//! Refused, each with its own [`XfccErrorKind`]: bytes other than visible ASCII, space and tab; a
//! quote that is never closed; a quote, backslash, `=` or inner whitespace in an unquoted value;
//! anything but a separator after a closing quote; an empty header, element or pair; a pair without
//! `=`; a key Envoy does not write; `Hash`, `Cert`, `Chain` or `Subject` twice in one element.
//! `By`, `URI` and `DNS` may repeat: Envoy writes one pair per URI SAN of its own certificate and
//! per URI or DNS SAN of the client's. Whitespace (space, tab) is allowed only next to `,` and `;`
//! and at the ends, where proxies that join repeated headers with `", "` put it.
//!
//! Unknown keys are refused rather than skipped: the header is produced by machines (Envoy) and
//! Envoy writes only these seven, so anything else was written by someone else, and a key we do not
//! understand is exactly where a caller would hide structure it wants some other reader to see.

use std::borrow::Cow;
use std::fmt;

/// A parsed `x-forwarded-client-cert` header: at least one element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xfcc<'a> {
    /// The elements before the last, in header order (farthest proxy first). Only as trustworthy as
    /// the proxies that forwarded them.
    pub earlier: Vec<XfccElement<'a>>,
    /// The last element: the one the nearest (trusted) proxy added.
    pub nearest: XfccElement<'a>,
}

impl<'a> Xfcc<'a> {
    /// Every element in header order, the nearest proxy's last.
    pub fn elements(&self) -> impl Iterator<Item = &XfccElement<'a>> {
        self.earlier.iter().chain(std::iter::once(&self.nearest))
    }
}

/// One element: what one proxy said about the connection it accepted. Values are as written in the
/// header, quotes removed and escapes resolved; `cert` and `chain` are still URL-encoded PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XfccElement<'a> {
    /// `By`: URI SANs of the proxy's own certificate (one pair each).
    pub by: Vec<Cow<'a, str>>,
    /// `Hash`: hex SHA-256 of the client certificate.
    pub hash: Option<Cow<'a, str>>,
    /// `Cert`: the client certificate, URL-encoded PEM.
    pub cert: Option<Cow<'a, str>>,
    /// `Chain`: the client certificate chain, URL-encoded PEM.
    pub chain: Option<Cow<'a, str>>,
    /// `Subject`: the client certificate's subject (RFC 2253 as the proxy printed it).
    pub subject: Option<Cow<'a, str>>,
    /// `URI`: URI SANs of the client certificate (Envoy writes an empty one when there is none).
    pub uri: Vec<Cow<'a, str>>,
    /// `DNS`: DNS SANs of the client certificate.
    pub dns: Vec<Cow<'a, str>>,
}

impl XfccElement<'_> {
    /// Whether the element holds no pair at all (it would serialise to an empty element).
    pub fn is_empty(&self) -> bool {
        self.by.is_empty()
            && self.hash.is_none()
            && self.cert.is_none()
            && self.chain.is_none()
            && self.subject.is_none()
            && self.uri.is_empty()
            && self.dns.is_empty()
    }
}

/// A key Envoy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XfccKey {
    /// `By`
    By,
    /// `Hash`
    Hash,
    /// `Cert`
    Cert,
    /// `Chain`
    Chain,
    /// `Subject`
    Subject,
    /// `URI`
    Uri,
    /// `DNS`
    Dns,
}

impl XfccKey {
    fn parse(key: &str) -> Option<XfccKey> {
        const KEYS: [(&str, XfccKey); 7] = [
            ("By", XfccKey::By),
            ("Hash", XfccKey::Hash),
            ("Cert", XfccKey::Cert),
            ("Chain", XfccKey::Chain),
            ("Subject", XfccKey::Subject),
            ("URI", XfccKey::Uri),
            ("DNS", XfccKey::Dns),
        ];
        KEYS.iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, k)| *k)
    }

    /// The key as Envoy spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            XfccKey::By => "By",
            XfccKey::Hash => "Hash",
            XfccKey::Cert => "Cert",
            XfccKey::Chain => "Chain",
            XfccKey::Subject => "Subject",
            XfccKey::Uri => "URI",
            XfccKey::Dns => "DNS",
        }
    }
}

/// Why a header was refused, and where (a byte offset into the header). Never carries header text:
/// the header holds certificates, and details end up in logs and explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("x-forwarded-client-cert is malformed: {kind} at byte {at}")]
pub struct XfccError {
    /// What is wrong.
    pub kind: XfccErrorKind,
    /// Byte offset into the header where it was found.
    pub at: usize,
}

/// What is wrong with a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XfccErrorKind {
    /// A byte that is not visible ASCII, space or tab.
    ByteNotAllowed,
    /// A quote opened here is never closed.
    UnbalancedQuote,
    /// A quote in the middle of an unquoted value.
    QuoteInUnquotedValue,
    /// A backslash outside quotes (escapes exist only inside them).
    BackslashOutsideQuotes,
    /// A second `=` in an unquoted value.
    EqualsInUnquotedValue,
    /// Whitespace inside an unquoted value, or between `=` and the value.
    WhitespaceInUnquotedValue,
    /// Something other than `;`, `,` or the end after a closing quote.
    AfterClosingQuote,
    /// An element with nothing in it (empty header, `,,`, a leading or trailing comma).
    EmptyElement,
    /// A pair with nothing in it (`;;`, a leading or trailing semicolon).
    EmptyPair,
    /// A pair without `=`.
    PairWithoutEquals,
    /// A key Envoy does not write.
    UnknownKey,
    /// A key that may appear once per element appears again.
    DuplicateKey(XfccKey),
}

impl fmt::Display for XfccErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XfccErrorKind::ByteNotAllowed => {
                f.write_str("a byte other than visible ASCII, space or tab")
            }
            XfccErrorKind::UnbalancedQuote => f.write_str("a quote that is never closed"),
            XfccErrorKind::QuoteInUnquotedValue => f.write_str("a quote inside an unquoted value"),
            XfccErrorKind::BackslashOutsideQuotes => f.write_str("a backslash outside quotes"),
            XfccErrorKind::EqualsInUnquotedValue => f.write_str("`=` inside an unquoted value"),
            XfccErrorKind::WhitespaceInUnquotedValue => {
                f.write_str("whitespace inside an unquoted value")
            }
            XfccErrorKind::AfterClosingQuote => {
                f.write_str("a character other than `;` or `,` after a closing quote")
            }
            XfccErrorKind::EmptyElement => f.write_str("an empty element"),
            XfccErrorKind::EmptyPair => f.write_str("an empty pair"),
            XfccErrorKind::PairWithoutEquals => f.write_str("a pair without `=`"),
            XfccErrorKind::UnknownKey => {
                f.write_str("a key other than By, Hash, Cert, Chain, Subject, URI, DNS")
            }
            XfccErrorKind::DuplicateKey(k) => write!(f, "a second `{}` in one element", k.as_str()),
        }
    }
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Parses a whole `x-forwarded-client-cert` header. Linear in its length; the caller caps the
/// length.
pub fn parse(header: &[u8]) -> Result<Xfcc<'_>, XfccError> {
    let err = |kind, at| XfccError { kind, at };
    let allowed = |b: u8| b == b'\t' || (0x20..=0x7e).contains(&b);
    // A fold without early exit, which the compiler vectorises (the header carries a whole
    // URL-encoded certificate, often two); the position is looked for only when there is one.
    if !header.iter().fold(true, |ok, &b| ok & allowed(b))
        && let Some(at) = header.iter().position(|&b| !allowed(b))
    {
        return Err(err(XfccErrorKind::ByteNotAllowed, at));
    }
    // Every byte is ASCII now, so this cannot fail; mapped anyway rather than unwrapped.
    let s = std::str::from_utf8(header)
        .map_err(|e| err(XfccErrorKind::ByteNotAllowed, e.valid_up_to()))?;
    let b = s.as_bytes();
    let mut elements = Vec::new();
    let mut pos = 0;
    loop {
        let element_start = pos;
        let mut element = XfccElement::default();
        loop {
            while pos < b.len() && is_ows(b[pos]) {
                pos += 1;
            }
            if pos == b.len() || b[pos] == b',' || b[pos] == b';' {
                let first_pair = element.is_empty();
                return Err(if first_pair && (pos == b.len() || b[pos] == b',') {
                    err(XfccErrorKind::EmptyElement, element_start)
                } else {
                    err(XfccErrorKind::EmptyPair, pos)
                });
            }
            let key_start = pos;
            while pos < b.len() && !matches!(b[pos], b'=' | b',' | b';') {
                pos += 1;
            }
            if pos == b.len() || b[pos] != b'=' {
                return Err(err(XfccErrorKind::PairWithoutEquals, key_start));
            }
            let key = XfccKey::parse(&s[key_start..pos])
                .ok_or_else(|| err(XfccErrorKind::UnknownKey, key_start))?;
            pos += 1;
            let value = if pos < b.len() && b[pos] == b'"' {
                let (value, end) = quoted(s, pos)?;
                pos = end;
                while pos < b.len() && is_ows(b[pos]) {
                    pos += 1;
                }
                if pos < b.len() && !matches!(b[pos], b',' | b';') {
                    return Err(err(XfccErrorKind::AfterClosingQuote, pos));
                }
                value
            } else {
                let (value, end) = unquoted(s, pos)?;
                pos = end;
                Cow::Borrowed(value)
            };
            store(&mut element, key, value).map_err(|kind| err(kind, key_start))?;
            // Here pos is at the end, at `,` or at `;`.
            if pos == b.len() {
                return Ok(Xfcc {
                    earlier: elements,
                    nearest: element,
                });
            }
            pos += 1;
            if b[pos - 1] == b',' {
                break;
            }
        }
        elements.push(element);
    }
}

/// A quoted value starting at the quote at `open`: the value and the offset after the closing quote.
fn quoted(s: &str, open: usize) -> Result<(Cow<'_, str>, usize), XfccError> {
    let b = s.as_bytes();
    let mut i = open + 1;
    let mut owned: Option<String> = None;
    let mut run_start = i;
    // The next quote or backslash, by memchr: a quoted value is usually a whole certificate.
    while let Some(next) = memchr::memchr2(b'"', b'\\', &b[i..]) {
        i += next;
        if b[i] == b'"' {
            let value = match owned {
                None => Cow::Borrowed(&s[run_start..i]),
                Some(mut o) => {
                    o.push_str(&s[run_start..i]);
                    Cow::Owned(o)
                }
            };
            return Ok((value, i + 1));
        }
        // A backslash: the next character stands for itself.
        if i + 1 == b.len() {
            break;
        }
        let o = owned.get_or_insert_with(String::new);
        o.push_str(&s[run_start..i]);
        // ASCII only (checked up front), so one byte is one character.
        o.push(char::from(b[i + 1]));
        i += 2;
        run_start = i;
    }
    Err(XfccError {
        kind: XfccErrorKind::UnbalancedQuote,
        at: open,
    })
}

/// An unquoted value starting at `start`: the value without trailing whitespace and the offset of
/// the separator (or end) that ends it.
fn unquoted(s: &str, start: usize) -> Result<(&str, usize), XfccError> {
    let b = s.as_bytes();
    let err = |kind, at| XfccError { kind, at };
    let mut i = start;
    let mut value_end = start;
    let mut whitespace_at = None;
    while i < b.len() && !matches!(b[i], b',' | b';') {
        match b[i] {
            b'"' => return Err(err(XfccErrorKind::QuoteInUnquotedValue, i)),
            b'\\' => return Err(err(XfccErrorKind::BackslashOutsideQuotes, i)),
            b'=' => return Err(err(XfccErrorKind::EqualsInUnquotedValue, i)),
            c if is_ows(c) => {
                whitespace_at.get_or_insert(i);
            }
            _ => {
                if let Some(at) = whitespace_at {
                    return Err(err(XfccErrorKind::WhitespaceInUnquotedValue, at));
                }
                value_end = i + 1;
            }
        }
        i += 1;
    }
    Ok((&s[start..value_end], i))
}

fn store<'a>(
    e: &mut XfccElement<'a>,
    key: XfccKey,
    value: Cow<'a, str>,
) -> Result<(), XfccErrorKind> {
    let slot = match key {
        XfccKey::By => {
            e.by.push(value);
            return Ok(());
        }
        XfccKey::Uri => {
            e.uri.push(value);
            return Ok(());
        }
        XfccKey::Dns => {
            e.dns.push(value);
            return Ok(());
        }
        XfccKey::Hash => &mut e.hash,
        XfccKey::Cert => &mut e.cert,
        XfccKey::Chain => &mut e.chain,
        XfccKey::Subject => &mut e.subject,
    };
    if slot.is_some() {
        return Err(XfccErrorKind::DuplicateKey(key));
    }
    *slot = Some(value);
    Ok(())
}

/// Writes the header back in Envoy's form: pairs in Envoy's order, `Cert`, `Chain` and `Subject`
/// always quoted, other values quoted when they would not survive unquoted. What this writes,
/// [`parse`] reads back to the same value.
impl fmt::Display for Xfcc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.elements().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl fmt::Display for XfccElement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut pair = |f: &mut fmt::Formatter<'_>, key: XfccKey, value: &str, always_quote| {
            if !first {
                f.write_str(";")?;
            }
            first = false;
            f.write_str(key.as_str())?;
            f.write_str("=")?;
            let needs_quotes = always_quote
                || value
                    .bytes()
                    .any(|c| matches!(c, b',' | b';' | b'=' | b'"' | b'\\') || is_ows(c));
            if !needs_quotes {
                return f.write_str(value);
            }
            f.write_str("\"")?;
            for c in value.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")
        };
        for v in &self.by {
            pair(f, XfccKey::By, v, false)?;
        }
        if let Some(v) = &self.hash {
            pair(f, XfccKey::Hash, v, false)?;
        }
        if let Some(v) = &self.cert {
            pair(f, XfccKey::Cert, v, true)?;
        }
        if let Some(v) = &self.chain {
            pair(f, XfccKey::Chain, v, true)?;
        }
        if let Some(v) = &self.subject {
            pair(f, XfccKey::Subject, v, true)?;
        }
        for v in &self.uri {
            pair(f, XfccKey::Uri, v, false)?;
        }
        for v in &self.dns {
            pair(f, XfccKey::Dns, v, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
