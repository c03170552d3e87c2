//! Where an API reads its token: a header (with or without a scheme), a query parameter or a
//! cookie, read one way and refused when ambiguous.

use std::borrow::Cow;

use super::{Extracted, JwtPolicy, TokenLocation};
use crate::check::CheckInput;

impl JwtPolicy {
    pub(super) fn extract<'a>(&self, input: &CheckInput<'a>) -> Extracted<'a> {
        match &self.location {
            TokenLocation::Header { name, scheme } => {
                let Some(raw) = input.header(name) else {
                    return Extracted::Missing;
                };
                let Ok(value) = std::str::from_utf8(raw) else {
                    return Extracted::Invalid(format!("the `{name}` header is not UTF-8"));
                };
                let value = value.trim_matches([' ', '\t']);
                if value.is_empty() {
                    return Extracted::Missing;
                }
                let Some(scheme) = scheme else {
                    return Extracted::Token(Cow::Borrowed(value));
                };
                let (given, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
                let dpop = self.dpop.is_some() && given.eq_ignore_ascii_case("DPoP");
                if !given.eq_ignore_ascii_case(scheme) && !dpop {
                    return Extracted::Invalid(format!(
                        "the `{name}` header does not use the `{scheme}` scheme"
                    ));
                }
                let token = rest.trim_start_matches([' ', '\t']);
                if token.is_empty() {
                    Extracted::Missing
                } else {
                    Extracted::Token(Cow::Borrowed(token))
                }
            }
            TokenLocation::Query(name) => {
                match crate::check::query::query_param(input.path, name) {
                    Err(_) => {
                        Extracted::Invalid(format!("the `{name}` query parameter appears twice"))
                    }
                    Ok(None) => Extracted::Missing,
                    Ok(Some(v)) if v.is_empty() => Extracted::Missing,
                    Ok(Some(v)) => match String::from_utf8(v) {
                        Ok(s) => Extracted::Token(Cow::Owned(s)),
                        Err(_) => {
                            Extracted::Invalid(format!("the `{name}` query parameter is not UTF-8"))
                        }
                    },
                }
            }
            TokenLocation::Cookie(name) => {
                let Some(raw) = input.header("cookie") else {
                    return Extracted::Missing;
                };
                let Ok(header) = std::str::from_utf8(raw) else {
                    return Extracted::Invalid("the cookie header is not UTF-8".into());
                };
                let mut found: Option<&'a str> = None;
                for pair in header.split(';') {
                    let Some((k, v)) = pair.trim().split_once('=') else {
                        continue;
                    };
                    if k.trim() != name {
                        continue;
                    }
                    let v = v.trim();
                    let v = v
                        .strip_prefix('"')
                        .and_then(|s| s.strip_suffix('"'))
                        .unwrap_or(v);
                    match found {
                        Some(prev) if prev != v => {
                            return Extracted::Invalid(format!(
                                "the `{name}` cookie is sent more than once"
                            ));
                        }
                        _ => found = Some(v),
                    }
                }
                match found {
                    None | Some("") => Extracted::Missing,
                    Some(t) => Extracted::Token(Cow::Borrowed(t)),
                }
            }
        }
    }

    /// The request header the token is read from (`cookie` for a cookie); `None` for a query
    /// parameter, which rides in the path. For what the proxy must send (`portcullis envoy-config`).
    pub(crate) fn token_header(&self) -> Option<&str> {
        match &self.location {
            TokenLocation::Header { name, .. } => Some(name),
            TokenLocation::Cookie(_) => Some("cookie"),
            TokenLocation::Query(_) => None,
        }
    }

    /// The query parameter the token is read from, if that is where it is.
    pub(crate) fn token_query(&self) -> Option<&str> {
        match &self.location {
            TokenLocation::Query(q) => Some(q),
            _ => None,
        }
    }

    pub(super) fn location_name(&self) -> String {
        match &self.location {
            TokenLocation::Header {
                name,
                scheme: Some(s),
            } => format!("the `{name}` header ({s} scheme)"),
            TokenLocation::Header { name, scheme: None } => format!("the `{name}` header"),
            TokenLocation::Query(q) => format!("the `{q}` query parameter"),
            TokenLocation::Cookie(c) => format!("the `{c}` cookie"),
        }
    }
}
