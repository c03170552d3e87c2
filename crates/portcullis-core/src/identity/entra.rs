//! Microsoft Entra ID as a provider preset: APIM's `validate-azure-ad-token`.
//!
//! `identity_providers[].entra: {tenant_id, ...}` expands to the tenant's discovery document and
//! its two issuer forms, and adds rules that apply whenever this provider's key verified a token,
//! on top of the API's own `jwt` rules:
//! - `iss` is the tenant's v1.0 (`https://sts.windows.net/{tid}/`) or v2.0
//!   (`{authentication_endpoint}/{tid}/v2.0`) issuer. Entra signs every tenant's tokens with the
//!   same keys, so the issuer is what tells tenants apart;
//! - `ver` is `1.0` or `2.0` and agrees with the issuer form; it says which claim names the client
//!   (`appid` in v1.0 tokens, `azp` in v2.0 ones): a token without it, or whose `ver` and issuer
//!   disagree, is refused rather than read one way or the other;
//! - `tid`, when present, is the tenant's GUID;
//! - `aud` is one of `backend_application_ids` (as written or as `api://{id}`) or `audiences`;
//! - the client is one of `client_application_ids`; then `required_claims` as in `validate-jwt`.
//!
//! Multi-tenant issuers (`common`, `organizations`, `consumers`) carry a `{tenantid}` placeholder
//! and need a per-tenant allow-list: not supported.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use reqwest::Url;
use serde_json::{Map, Value};

use super::rules::{check_claim_rules, printable, shown_claim};
use super::{ClaimRule, Refusal};
use crate::check::Reason;
use crate::config::{self, ConfigErrors};

/// The public cloud's authentication endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://login.microsoftonline.com";

/// Tenant ids that name no tenant.
const MULTI_TENANT: [&str; 3] = ["common", "organizations", "consumers"];

/// Entra's token versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVersion {
    /// `ver: "1.0"`, issuer `https://sts.windows.net/{tid}/`; the client is `appid`.
    V1,
    /// `ver: "2.0"`, issuer `{endpoint}/{tid}/v2.0`; the client is `azp`.
    V2,
}

impl TokenVersion {
    fn ver(self) -> &'static str {
        match self {
            TokenVersion::V1 => "1.0",
            TokenVersion::V2 => "2.0",
        }
    }

    /// The claim naming the client application.
    fn client_claim(self) -> &'static str {
        match self {
            TokenVersion::V1 => "appid",
            TokenVersion::V2 => "azp",
        }
    }
}

/// One tenant's issuers; lives in the provider (its identity), learns the GUID of a tenant named
/// by domain from the discovery document.
#[derive(Debug)]
pub struct Tenant {
    /// `https://login.microsoftonline.com`: scheme and host, no trailing slash.
    endpoint: String,
    /// As configured (a GUID or a domain), lower case.
    tenant_id: String,
    /// The v1.0 issuer's origin for this cloud, when known.
    v1_origin: Option<&'static str>,
    /// The tenant's GUID: the configured one, or learned from the discovery document.
    guid: ArcSwapOption<String>,
}

impl Tenant {
    /// The tenant's GUID, when known.
    pub fn guid(&self) -> Option<Arc<String>> {
        self.guid.load_full()
    }

    fn v1_issuer(&self, guid: &str) -> Option<String> {
        self.v1_origin.map(|o| format!("{o}/{guid}/"))
    }

    fn v2_issuer(&self, guid: &str) -> String {
        format!("{}/{guid}/v2.0", self.endpoint)
    }

    /// Which of the tenant's issuer forms `iss` is; `None`: not this tenant's (or the GUID of a
    /// tenant named by domain is not known yet).
    pub fn issuer_form(&self, iss: &str) -> Option<TokenVersion> {
        let guid = self.guid()?;
        if iss == self.v2_issuer(&guid) {
            Some(TokenVersion::V2)
        } else if self.v1_issuer(&guid).is_some_and(|v1| iss == v1) {
            Some(TokenVersion::V1)
        } else {
            None
        }
    }

    /// The discovery document's `issuer`: the v2.0 form, with the configured GUID, or with any GUID
    /// when the tenant is named by domain (that GUID is then the tenant's).
    pub fn accept_discovery_issuer(&self, found: &str) -> bool {
        if let Some(guid) = self.guid()
            && is_guid(&self.tenant_id)
        {
            return found == self.v2_issuer(&guid);
        }
        let Some(middle) = found
            .strip_prefix(self.endpoint.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_suffix("/v2.0"))
        else {
            return false;
        };
        if !is_guid(middle) || middle.bytes().any(|b| b.is_ascii_uppercase()) {
            return false;
        }
        if self.guid().as_deref().map(String::as_str) != Some(middle) {
            tracing::info!(tenant = %self.tenant_id, guid = %middle, "Entra tenant named by domain: its GUID learned from the discovery document");
            self.guid.store(Some(Arc::new(middle.to_string())));
        }
        true
    }

    /// The issuers, for explanations.
    pub fn describe(&self) -> String {
        let shown = |guid: &str| match self.v1_issuer(guid) {
            Some(v1) => format!("{v1} (v1.0) and {} (v2.0)", self.v2_issuer(guid)),
            None => format!(
                "{} (v2.0 only: no v1.0 issuer is known for this endpoint)",
                self.v2_issuer(guid)
            ),
        };
        match self.guid() {
            Some(g) if *g == self.tenant_id => format!("tenant {g}: issuers {}", shown(&g)),
            Some(g) => format!("tenant {} ({g}): issuers {}", self.tenant_id, shown(&g)),
            None => format!(
                "tenant {}: issuers {}, the GUID learned from the discovery document",
                self.tenant_id,
                shown("{GUID}")
            ),
        }
    }
}

/// What the preset sets on the provider.
#[derive(Debug)]
pub(super) struct Expanded {
    /// The provider's issuer: the v2.0 form with the tenant as configured.
    pub issuer: String,
    /// `{endpoint}/{tenant}/v2.0/.well-known/openid-configuration`.
    pub discovery_url: String,
    pub tenant: Tenant,
}

/// Expands `entra` into the provider's issuer, discovery URL and tenant.
pub(super) fn expand(
    cfg: &config::IdentityProvider,
    e: &config::Entra,
    path: &str,
    errs: &mut ConfigErrors,
) -> Option<Expanded> {
    let before = errs.0.len();
    let epath = format!("{path}.entra");
    if !cfg.issuer.is_empty() {
        errs.push(
            format!("{path}.issuer"),
            "the `entra` preset sets the issuers (the tenant's v1.0 and v2.0 forms): leave `issuer` out",
        );
    }
    let endpoint = match e.authentication_endpoint.as_deref() {
        None => Some(DEFAULT_ENDPOINT.to_string()),
        Some(s) => endpoint(s, &format!("{epath}.authentication_endpoint"), errs),
    };
    let tenant_id = e.tenant_id.trim().to_ascii_lowercase();
    let tpath = format!("{epath}.tenant_id");
    if MULTI_TENANT.contains(&tenant_id.as_str()) {
        errs.push(
            &tpath,
            format!(
                "`{tenant_id}` is not one tenant: multi-tenant tokens carry each tenant's own issuer, which would need a per-tenant allow-list (not supported); give one tenant's GUID or domain name"
            ),
        );
    } else if !is_guid(&tenant_id) && !is_domain(&tenant_id) {
        errs.push(
            &tpath,
            format!(
                "`{}` is neither a GUID nor a domain name",
                printable(&e.tenant_id)
            ),
        );
    } else if !is_guid(&tenant_id) {
        let explicit = [
            cfg.keys.as_ref().map(|_| "keys"),
            cfg.jwks_file.as_ref().map(|_| "jwks_file"),
            cfg.jwks_uri.as_ref().map(|_| "jwks_uri"),
        ];
        if let Some(source) = explicit.into_iter().flatten().next() {
            errs.push(
                &tpath,
                format!(
                    "`{tenant_id}` is a domain name: tokens name the tenant by its GUID, which only the discovery document tells, and with `{source}` there is none; give the tenant's GUID"
                ),
            );
        }
    }
    let endpoint = endpoint?;
    if errs.0.len() > before {
        return None;
    }
    let v1_origin = v1_origin(&endpoint);
    let guid = is_guid(&tenant_id).then(|| Arc::new(tenant_id.clone()));
    Some(Expanded {
        issuer: format!("{endpoint}/{tenant_id}/v2.0"),
        discovery_url: format!("{endpoint}/{tenant_id}/v2.0/.well-known/openid-configuration"),
        tenant: Tenant {
            endpoint,
            tenant_id,
            v1_origin,
            guid: ArcSwapOption::new(guid),
        },
    })
}

/// `authentication_endpoint`: an https origin, nothing after it.
fn endpoint(s: &str, path: &str, errs: &mut ConfigErrors) -> Option<String> {
    match Url::parse(s) {
        Ok(u)
            if u.scheme() == "https"
                && u.host_str().is_some()
                && matches!(u.path(), "" | "/")
                && u.query().is_none()
                && u.fragment().is_none()
                && u.username().is_empty()
                && u.password().is_none() =>
        {
            Some(u.origin().ascii_serialization())
        }
        _ => {
            errs.push(
                path,
                format!(
                    "`{}` is not an https:// origin such as {DEFAULT_ENDPOINT}",
                    printable(s)
                ),
            );
            None
        }
    }
}

/// The v1.0 issuer's origin of the cloud whose authentication endpoint this is: v1.0 tokens are
/// issued by `sts.windows.net` in the public and US Government clouds, by `sts.chinacloudapi.cn`
/// in the cloud operated by 21Vianet. Unknown endpoints get the v2.0 form only.
fn v1_origin(endpoint: &str) -> Option<&'static str> {
    match endpoint.strip_prefix("https://")? {
        "login.microsoftonline.com" | "login.microsoftonline.us" | "login.windows.net" => {
            Some("https://sts.windows.net")
        }
        "login.partner.microsoftonline.cn" | "login.chinacloudapi.cn" => {
            Some("https://sts.chinacloudapi.cn")
        }
        _ => None,
    }
}

/// 8-4-4-4-12 hexadecimal digits.
pub(crate) fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A DNS name of at least two labels (`contoso.onmicrosoft.com`), lower case.
fn is_domain(s: &str) -> bool {
    s.len() <= 253
        && s.contains('.')
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The preset's rules, applied whenever its provider verified a token.
#[derive(Debug)]
pub(crate) struct Rules {
    /// `client_application_ids`, lower case.
    clients: Vec<String>,
    /// `backend_application_ids` (and their `api://` forms) and `audiences`.
    audiences: Vec<String>,
    claims: Vec<ClaimRule>,
}

/// Compiles the rules of `entra`.
pub(super) fn compile_rules(
    e: &config::Entra,
    epath: &str,
    errs: &mut ConfigErrors,
) -> Option<Arc<Rules>> {
    let before = errs.0.len();
    let guids = |list: &[String], key: &str, errs: &mut ConfigErrors| -> Vec<String> {
        let mut out = Vec::new();
        for (j, id) in list.iter().enumerate() {
            let id = id.trim().to_ascii_lowercase();
            if is_guid(&id) {
                out.push(id);
            } else {
                errs.push(
                    format!("{epath}.{key}[{j}]"),
                    format!(
                        "`{}` is not an application (client) id, which is a GUID",
                        printable(&list[j])
                    ),
                );
            }
        }
        out
    };
    let clients = guids(&e.client_application_ids, "client_application_ids", errs);
    let mut audiences = Vec::new();
    for id in guids(&e.backend_application_ids, "backend_application_ids", errs) {
        // v1.0 tokens carry the application ID URI, by default `api://{id}`; v2.0 ones the id.
        audiences.push(format!("api://{id}"));
        audiences.push(id);
    }
    for (j, a) in e.audiences.iter().enumerate() {
        if a.is_empty() {
            errs.push(format!("{epath}.audiences[{j}]"), "must not be empty");
        }
        audiences.push(a.clone());
    }
    if e.client_application_ids.is_empty()
        && e.backend_application_ids.is_empty()
        && e.audiences.is_empty()
    {
        errs.push(
            epath,
            "give client_application_ids, or audiences or backend_application_ids: without any, every application of the tenant would pass",
        );
    }
    let claims = super::compile::claim_rules(&e.required_claims, epath, errs);
    if errs.0.len() > before {
        return None;
    }
    Some(Arc::new(Rules {
        clients,
        audiences,
        claims,
    }))
}

impl Rules {
    /// The rules in one line, for `portcullis validate`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.audiences.is_empty() {
            parts.push(format!("aud one of [{}]", self.audiences.join(", ")));
        }
        if !self.clients.is_empty() {
            parts.push(format!(
                "client (appid in v1.0 tokens, azp in v2.0) one of [{}]",
                self.clients.join(", ")
            ));
        }
        if !self.claims.is_empty() {
            let names: Vec<&str> = self.claims.iter().map(|c| c.name.as_str()).collect();
            parts.push(format!("required claims {}", names.join(", ")));
        }
        parts.join("; ")
    }

    /// The preset's rules on a token its provider verified.
    pub(super) fn check(
        &self,
        claims: &Map<String, Value>,
        tenant: &Tenant,
        provider: &str,
    ) -> Result<(), Refusal> {
        let iss = claims.get("iss").and_then(Value::as_str);
        let Some(form) = iss.and_then(|i| tenant.issuer_form(i)) else {
            return Err((
                Reason::TokenIssuerNotAllowed,
                format!(
                    "issuer {} is not one of Entra provider `{provider}`'s ({})",
                    shown_claim(claims.get("iss")),
                    tenant.describe()
                ),
            ));
        };
        let guid = tenant.guid().unwrap_or_default();
        match claims.get("tid") {
            None => {}
            Some(Value::String(t)) if t.eq_ignore_ascii_case(&guid) => {}
            Some(other) => {
                return Err((
                    Reason::TokenIssuerNotAllowed,
                    format!("`tid` {} is not tenant {guid}", shown_claim(Some(other))),
                ));
            }
        }
        let version = match claims.get("ver").and_then(Value::as_str) {
            Some("1.0") => TokenVersion::V1,
            Some("2.0") => TokenVersion::V2,
            _ => {
                return Err((
                    Reason::JwtInvalid,
                    format!(
                        "`ver` is {}, not 1.0 or 2.0: an Entra token says which version it is, and so which claim names its client",
                        shown_claim(claims.get("ver"))
                    ),
                ));
            }
        };
        if version != form {
            return Err((
                Reason::TokenIssuerNotAllowed,
                format!(
                    "`ver` {} with the v{} issuer {}: Entra issues v{} tokens under the other form",
                    version.ver(),
                    form.ver(),
                    shown_claim(claims.get("iss")),
                    version.ver()
                ),
            ));
        }
        if !self.audiences.is_empty() {
            let matches = |s: &str| self.audiences.iter().any(|a| a == s);
            let ok = match claims.get("aud") {
                Some(Value::String(s)) => matches(s),
                Some(Value::Array(items)) => items.iter().any(|v| v.as_str().is_some_and(matches)),
                _ => false,
            };
            if !ok {
                return Err((
                    Reason::TokenAudienceNotAllowed,
                    format!(
                        "audience {} is not one of Entra provider `{provider}`'s: {}",
                        shown_claim(claims.get("aud")),
                        self.audiences.join(", ")
                    ),
                ));
            }
        }
        if !self.clients.is_empty() {
            let name = version.client_claim();
            match claims.get(name) {
                Some(Value::String(c))
                    if self.clients.iter().any(|a| a.eq_ignore_ascii_case(c)) => {}
                None | Some(Value::Null) => {
                    return Err((
                        Reason::TokenClaimNotFound,
                        format!(
                            "JWT token is missing the following claims: {name}. Access denied."
                        ),
                    ));
                }
                Some(other) => {
                    let shown = match other {
                        Value::String(s) => printable(s),
                        v => printable(&v.to_string()),
                    };
                    return Err((
                        Reason::TokenClaimValueNotAllowed,
                        format!("Claim {name} value of {shown} is not allowed. Access denied."),
                    ));
                }
            }
        }
        check_claim_rules(&self.claims, claims)
    }
}

#[cfg(test)]
mod tests;
