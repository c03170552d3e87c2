//! Header value templates for `on_allow.set_headers`: literal text with `{jwt.<claim>}`,
//! `{subscription.id}`, `{client_ip}`, `{cert.thumbprint}` and `{api}` placeholders, parsed once at
//! compile time.

use std::net::IpAddr;

use serde_json::Value;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(Var),
}

/// A placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// `{jwt.<claim>}`: a claim of the validated token.
    Claim(String),
    /// `{subscription.id}`
    SubscriptionId,
    /// `{client_ip}`
    ClientIp,
    /// `{cert.thumbprint}`: SHA-1, upper-case hex.
    CertThumbprint,
    /// `{api}`: the matched API's name.
    Api,
}

/// The values a template can draw on for one request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Context<'a> {
    /// The validated token's claims.
    pub claims: Option<&'a serde_json::Map<String, Value>>,
    /// The subscription whose key was presented.
    pub subscription_id: Option<&'a str>,
    /// The caller's address.
    pub client_ip: Option<IpAddr>,
    /// The client certificate's SHA-1 digest (its thumbprint).
    pub cert_sha1: Option<&'a [u8; 20]>,
    /// The matched API.
    pub api: &'a str,
    /// The caller's validated token itself (for token exchange; never rendered into headers).
    pub raw_token: Option<&'a str>,
}

impl Context<'_> {
    /// The validated token's `iss` (the identity provider that vouched for the caller), when it is
    /// a non-empty string. Per-user backend connections are keyed by it.
    pub fn issuer(&self) -> Option<&str> {
        self.claims?
            .get("iss")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// Why a template produced no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// A placeholder has no value for this request: the header is left unset.
    Missing,
    /// The value would contain CR, LF or another control character: refused.
    ControlCharacter,
}

impl Template {
    /// Parses `text`; `{{` and `}}` write literal braces.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("unclosed `{{` in `{text}`")),
                        }
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Var(parse_var(name.trim())?));
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` in `{text}` (write `}}}}` for a literal brace)"
                    ));
                }
                c if c.is_control() => {
                    return Err("templates may not contain control characters".to_string());
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Literal(lit));
        }
        Ok(Template { parts })
    }

    /// Whether any placeholder reads token claims.
    pub fn uses_claims(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Var(Var::Claim(_))))
    }

    /// Whether any placeholder reads the client certificate.
    pub fn uses_cert(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Var(Var::CertThumbprint)))
    }

    /// Renders the template for one request.
    pub fn render(&self, ctx: &Context<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Var(v) => render_var(v, ctx, &mut out)?,
            }
        }
        if out.chars().any(|c| c.is_control()) {
            return Err(RenderError::ControlCharacter);
        }
        Ok(out)
    }
}

fn parse_var(name: &str) -> Result<Var, String> {
    Ok(match name {
        "subscription.id" => Var::SubscriptionId,
        "client_ip" => Var::ClientIp,
        "cert.thumbprint" => Var::CertThumbprint,
        "api" => Var::Api,
        _ => match name.strip_prefix("jwt.") {
            Some(claim) if !claim.is_empty() => Var::Claim(claim.to_string()),
            _ => {
                return Err(format!(
                    "unknown placeholder `{{{name}}}`: use {{jwt.<claim>}}, {{subscription.id}}, {{client_ip}}, {{cert.thumbprint}} or {{api}}"
                ));
            }
        },
    })
}

fn render_var(v: &Var, ctx: &Context<'_>, out: &mut String) -> Result<(), RenderError> {
    use std::fmt::Write;
    match v {
        Var::SubscriptionId => out.push_str(ctx.subscription_id.ok_or(RenderError::Missing)?),
        Var::ClientIp => {
            let _ = write!(out, "{}", ctx.client_ip.ok_or(RenderError::Missing)?);
        }
        Var::CertThumbprint => out.push_str(&hex::encode_upper(
            ctx.cert_sha1.ok_or(RenderError::Missing)?,
        )),
        Var::Api => out.push_str(ctx.api),
        Var::Claim(name) => {
            let claims = ctx.claims.ok_or(RenderError::Missing)?;
            let value = claim(claims, name).ok_or(RenderError::Missing)?;
            write_claim(value, out)?;
        }
    }
    Ok(())
}

/// Looks a claim up by its full name first (claim names may contain dots, like URIs), then as a
/// dotted path into nested objects.
pub fn claim<'a>(claims: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

fn write_claim(v: &Value, out: &mut String) -> Result<(), RenderError> {
    match v {
        Value::Null => return Err(RenderError::Missing),
        Value::String(s) => out.push_str(s),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(RenderError::Missing);
            }
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                }
            }
        }
        Value::Object(_) => out.push_str(&v.to_string()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_claims_arrays_and_facts() {
        let c = claims(
            json!({"sub": "alice", "roles": ["a", "b"], "n": 3, "https://x.io/tid": "t1", "addr": {"country": "NL"}}),
        );
        let ctx = Context {
            claims: Some(&c),
            subscription_id: Some("contoso"),
            client_ip: Some("10.0.0.1".parse().unwrap()),
            cert_sha1: None,
            api: "orders",
            raw_token: None,
        };
        let t = |s: &str| Template::parse(s).unwrap().render(&ctx);
        assert_eq!(t("{jwt.sub}").unwrap(), "alice");
        assert_eq!(t("{jwt.roles}").unwrap(), "a,b");
        assert_eq!(t("n={jwt.n}").unwrap(), "n=3");
        assert_eq!(t("{jwt.https://x.io/tid}").unwrap(), "t1");
        assert_eq!(t("{jwt.addr.country}").unwrap(), "NL");
        assert_eq!(
            t("{subscription.id}@{client_ip} {api} {{lit}}").unwrap(),
            "contoso@10.0.0.1 orders {lit}"
        );
        assert_eq!(t("{jwt.missing}"), Err(RenderError::Missing));
        assert_eq!(t("{cert.thumbprint}"), Err(RenderError::Missing));
    }

    #[test]
    fn control_characters_are_refused() {
        let c = claims(json!({"evil": "a\r\nx-admin: true", "tab": "a\tb"}));
        let ctx = Context {
            claims: Some(&c),
            api: "x",
            ..Default::default()
        };
        assert_eq!(
            Template::parse("{jwt.evil}").unwrap().render(&ctx),
            Err(RenderError::ControlCharacter)
        );
        assert_eq!(
            Template::parse("{jwt.tab}").unwrap().render(&ctx),
            Err(RenderError::ControlCharacter)
        );
    }

    #[test]
    fn bad_templates_are_config_errors() {
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown placeholder")
        );
        assert!(
            Template::parse("{jwt.sub")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(Template::parse("a}").unwrap_err().contains("unmatched"));
        assert!(Template::parse("{jwt.}").is_err());
        assert!(Template::parse("{jwt.sub}").unwrap().uses_claims());
    }
}
