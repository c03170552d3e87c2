//! The checks after the signature: lifetime (`exp`, `nbf`, skew), issuer, audience, scopes and
//! required claims, and how a refusal is shaped into the client's answer (APIM's messages, RFC 6750
//! challenges).

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::provider::Provider;
use super::{ClaimRule, JwtPolicy, Refusal};
use crate::check::{Denial, Failure, Reason};

impl JwtPolicy {
    /// `exp`/`nbf` against `now` with the API's skew; `require_exp` is the JWT rule
    /// (`require_expiration_time`), off for introspected tokens.
    pub(super) fn check_lifetime(
        &self,
        exp: Option<f64>,
        nbf: Option<f64>,
        require_exp: bool,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let skew = self.clock_skew.as_secs_f64();
        match exp {
            None if require_exp => {
                return Err((
                    Reason::JwtInvalid,
                    "the token has no `exp` and require_expiration_time is on".into(),
                ));
            }
            // Microsoft.IdentityModel's rule, which APIM applies: expired when exp < now - skew.
            Some(exp) if exp < now_s - skew => {
                return Err((
                    Reason::TokenExpired,
                    format!(
                        "expired {}s ago (clock_skew {}s)",
                        (now_s - exp).floor(),
                        self.clock_skew.as_secs()
                    ),
                ));
            }
            _ => {}
        }
        if let Some(nbf) = nbf
            && nbf > now_s + skew
        {
            return Err((
                Reason::TokenNotYetValid,
                format!(
                    "valid only in {}s (clock_skew {}s)",
                    (nbf - now_s).ceil(),
                    self.clock_skew.as_secs()
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn check_rules(
        &self,
        claims: &Map<String, Value>,
        provider: &Provider,
    ) -> Result<(), Refusal> {
        // A preset's rules (Entra ID) first: they hold whichever API the provider serves.
        if let (Some(tenant), Some(rules)) = (&provider.entra, self.entra_rules(provider.id)) {
            rules.check(claims, tenant, &provider.name)?;
        }
        if let Some(audiences) = &self.audiences {
            let matches = |s: &str| audiences.iter().any(|a| a == s);
            let ok = match claims.get("aud") {
                Some(Value::String(s)) => matches(s),
                Some(Value::Array(items)) => items.iter().any(|v| v.as_str().is_some_and(matches)),
                _ => false,
            };
            if !ok {
                return Err((
                    Reason::TokenAudienceNotAllowed,
                    format!(
                        "audience {} is not one of {}",
                        shown_claim(claims.get("aud")),
                        audiences.join(", ")
                    ),
                ));
            }
        }
        let iss = claims.get("iss").and_then(Value::as_str);
        let issuer_ok = match (&self.issuers, iss) {
            (_, None) => false,
            (Some(list), Some(iss)) => list.iter().any(|i| i == iss),
            // By default a token must come from the issuer of the provider that verified it, so one
            // provider's key cannot vouch for another issuer's tokens.
            (None, Some(iss)) => provider.accepts_issuer(iss),
        };
        if !issuer_ok {
            return Err((
                Reason::TokenIssuerNotAllowed,
                format!("issuer {} is not allowed", shown_claim(claims.get("iss"))),
            ));
        }
        if let Some(rule) = &self.scopes {
            let granted = || scope_iter(claims);
            // Checked on the token's own iterator: nothing is collected on the way to an allow.
            let ok = if rule.all {
                rule.values.iter().all(|s| granted().any(|g| g == s))
            } else {
                granted().any(|g| rule.values.iter().any(|s| s == g))
            };
            if !ok {
                let granted: Vec<&str> = granted().collect();
                let want = if rule.all { "all of" } else { "one of" };
                return Err((
                    Reason::InsufficientScope,
                    format!(
                        "the token's scopes [{}] do not include {want} [{}]",
                        granted.join(" "),
                        rule.values.join(" ")
                    ),
                ));
            }
        }
        check_claim_rules(&self.claims, claims)
    }

    /// Shapes a refusal: `failed_status`/`failed_message` for the 401 class, RFC 6750 challenges.
    pub(super) fn failure(&self, reason: Reason, detail: String, api: &str) -> Failure {
        let mut denial = Denial::new(reason);
        let realm = quote(api);
        match reason {
            Reason::TokenNotPresent
            | Reason::JwtInvalid
            | Reason::TokenSignatureInvalid
            | Reason::TokenSignatureKeyNotFound
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::TokenAudienceNotAllowed
            | Reason::TokenIssuerNotAllowed
            | Reason::TokenNotActive
            | Reason::TokenCertificateBindingMismatch
            | Reason::DpopProofInvalid
            | Reason::TokenBindingMismatch => {
                denial.status = self.failed_status;
                if let Some(m) = &self.failed_message {
                    denial.message = m.clone();
                }
                if denial.status == 401 {
                    // RFC 6750 3.1: a request without a token gets a challenge without an error code.
                    denial.www_authenticate = Some(if reason == Reason::TokenNotPresent {
                        format!("Bearer realm={realm}")
                    } else {
                        format!("Bearer realm={realm}, error=\"invalid_token\"")
                    });
                    if let Some(c) = self.dpop_challenge(reason, api) {
                        denial.www_authenticate = Some(c);
                    }
                }
            }
            Reason::InsufficientScope => {
                let scope = self
                    .scopes
                    .as_ref()
                    .map(|s| s.values.join(" "))
                    .unwrap_or_default();
                denial.www_authenticate = Some(format!(
                    "Bearer realm={realm}, error=\"insufficient_scope\", scope={}",
                    quote(&scope)
                ));
            }
            Reason::TokenClaimNotFound | Reason::TokenClaimValueNotAllowed => {
                // APIM's messages name the claims; they say nothing about the token itself.
                denial.message = detail.clone();
            }
            _ => {}
        }
        Failure { denial, detail }
    }
}

/// `required_claims`: every rule's claim present, with its values.
pub(super) fn check_claim_rules(
    rules: &[ClaimRule],
    claims: &Map<String, Value>,
) -> Result<(), Refusal> {
    let values: Vec<Option<Vec<Cow<'_, str>>>> = rules
        .iter()
        .map(|r| claim_values(claims, &r.name, r.separator.as_deref()))
        .collect();
    let missing: Vec<&str> = rules
        .iter()
        .zip(&values)
        .filter(|(_, v)| v.is_none())
        .map(|(r, _)| r.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err((
            Reason::TokenClaimNotFound,
            format!(
                "JWT token is missing the following claims: {}. Access denied.",
                missing.join(", ")
            ),
        ));
    }
    for (rule, have) in rules.iter().zip(values.iter().flatten()) {
        if rule.values.is_empty() {
            continue;
        }
        let has = |v: &String| have.iter().any(|h| h == v);
        let ok = if rule.any {
            rule.values.iter().any(has)
        } else {
            rule.values.iter().all(has)
        };
        if !ok {
            let shown: String = have
                .join(rule.separator.as_deref().unwrap_or(","))
                .chars()
                .take(200)
                .collect();
            return Err((
                Reason::TokenClaimValueNotAllowed,
                format!(
                    "Claim {} value of {} is not allowed. Access denied.",
                    rule.name, shown
                ),
            ));
        }
    }
    Ok(())
}

/// `exp`/`nbf`: absent, or a JSON number of seconds since the epoch.
pub(super) fn numeric_date(
    claims: &Map<String, Value>,
    name: &str,
) -> Result<Option<f64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| (Reason::JwtInvalid, format!("`{name}` is not a number"))),
        Some(_) => Err((Reason::JwtInvalid, format!("`{name}` is not a number"))),
    }
}

/// Scopes from `scp` and `scope`: space-separated strings or arrays of strings.
/// The token's scopes (`scp`, then `scope`; space-separated strings or arrays of strings), without
/// allocating: the `dynamic_metadata` of every allow lists them.
pub fn scope_iter(claims: &Map<String, Value>) -> impl Iterator<Item = &str> + Clone {
    ["scp", "scope"]
        .into_iter()
        .filter_map(|name| claims.get(name))
        .flat_map(|v| {
            let (one, many) = match v {
                Value::String(s) => (Some(s.as_str()), None),
                Value::Array(items) => (None, Some(items.iter().filter_map(Value::as_str))),
                _ => (None, None),
            };
            one.into_iter().chain(many.into_iter().flatten())
        })
        .flat_map(|s| s.split(' '))
        .filter(|s| !s.is_empty())
}

/// A claim's values for `required_claims`: `None` when absent (or null, or an empty array).
/// Borrowed from the token where they are strings: checked on every request.
pub(super) fn claim_values<'a>(
    claims: &'a Map<String, Value>,
    name: &str,
    separator: Option<&str>,
) -> Option<Vec<Cow<'a, str>>> {
    let v = crate::check::template::claim(claims, name)?;
    let mut out = Vec::new();
    let mut push = |v: &'a Value| match v {
        Value::String(s) => match separator {
            Some(sep) => out.extend(s.split(sep).map(|p| Cow::Borrowed(p.trim()))),
            None => out.push(Cow::Borrowed(s.as_str())),
        },
        Value::Null => {}
        other => out.push(Cow::Owned(other.to_string())),
    };
    match v {
        Value::Null => return None,
        Value::Array(items) if items.is_empty() => return None,
        Value::Array(items) => items.iter().for_each(&mut push),
        other => push(other),
    }
    Some(out)
}

pub(super) fn kid_note(kid: Option<&str>) -> String {
    match kid {
        Some(k) => format!(" with kid `{}`", printable(k)),
        None => String::new(),
    }
}

/// A claim for a detail line, bounded and without control characters.
pub(super) fn shown_claim(v: Option<&Value>) -> String {
    match v {
        None => "(none)".into(),
        Some(Value::String(s)) => format!("`{}`", printable(s)),
        Some(other) => printable(&other.to_string()),
    }
}

/// Text from a token for a detail line: at most 100 characters, control characters escaped.
pub(super) fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(100).flat_map(char::escape_default).collect();
    if s.chars().count() > 100 {
        out.push('…');
    }
    out
}

/// An RFC 7230 quoted-string.
pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}
