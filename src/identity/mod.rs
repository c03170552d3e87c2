//! JWT validation with `validate-jwt` parity: identity providers, their keys, and per-API rules.
//!
//! (Placeholder until JWT validation lands: an API with a `jwt` section is a config error.)

use std::time::SystemTime;

use crate::config::{self, ConfigErrors, Source};
use crate::policy::{CheckInput, Denial};

/// Identity providers and their key caches; lives across reloads.
#[derive(Debug, Default)]
pub struct Registry {}

/// The providers of one compiled config.
#[derive(Debug, Default)]
pub struct ProviderSet {}

/// The JWT rules of one API.
#[derive(Debug)]
pub struct JwtPolicy {}

/// A token that passed every rule of an API.
#[derive(Debug)]
pub struct ValidToken {
    raw: String,
    claims: serde_json::Map<String, serde_json::Value>,
}

/// Why a token was refused, as the client will see it.
#[derive(Debug)]
pub struct JwtFailure {
    /// The response.
    pub denial: Denial,
    /// Detail for explanations and logs; never the token.
    pub detail: String,
}

impl ValidToken {
    /// The token's claims.
    pub fn claims(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.claims
    }

    /// The `sub` claim.
    pub fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(|v| v.as_str())
    }

    /// The token as presented.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// A one-line description for explanations (never the token).
    pub fn describe(&self) -> String {
        format!("token of `{}`", self.subject().unwrap_or("?"))
    }
}

impl JwtPolicy {
    /// Validates the request's token against this API's rules.
    pub async fn validate(
        &self,
        _input: &CheckInput<'_>,
        _now: SystemTime,
        _api: &str,
        _max: usize,
    ) -> Result<ValidToken, JwtFailure> {
        Err(JwtFailure {
            denial: Denial::new(crate::policy::Reason::Internal),
            detail: "JWT validation is not available".into(),
        })
    }
}

/// Compiles `identity_providers`.
pub fn compile_providers(
    src: &Source,
    _registry: &Registry,
    errs: &mut ConfigErrors,
) -> ProviderSet {
    if !src.file.identity_providers.is_empty() {
        errs.push(
            "identity_providers",
            "JWT validation is not available in this build",
        );
    }
    ProviderSet::default()
}

/// Compiles one API's `jwt` section.
pub fn compile_jwt(
    _cfg: &config::Jwt,
    path: &str,
    _api: &str,
    _providers: &ProviderSet,
    errs: &mut ConfigErrors,
) -> Option<JwtPolicy> {
    errs.push(path, "JWT validation is not available in this build");
    None
}
