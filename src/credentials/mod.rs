//! Backend credentials: the token cache, grants and the encrypted store.
//!
//! (Placeholder until the credential manager lands: a `credentials` section is a config error.)

use crate::config::{self, ConfigErrors, Source};
use crate::policy::template::Context;
use crate::policy::{Denial, Header};

/// Credentials and their token caches; lives across reloads.
#[derive(Debug, Default)]
pub struct Registry {}

/// The credentials of one compiled config.
#[derive(Debug, Default)]
pub struct CredentialSet {}

/// `on_allow.backend_credential` of one API.
#[derive(Debug)]
pub struct BackendCredentialPolicy {
    name: String,
}

/// Why no credential could be injected.
#[derive(Debug)]
pub struct CredentialFailure {
    /// The response.
    pub denial: Denial,
    /// Detail for explanations and logs; never a secret.
    pub detail: String,
}

impl BackendCredentialPolicy {
    /// The configured credential's name.
    pub fn credential_name(&self) -> &str {
        &self.name
    }

    /// The header carrying the credential. With `dry_run`, nothing is fetched and the value is a
    /// placeholder (for `portcullis check`).
    pub async fn header_for(
        &self,
        _ctx: &Context<'_>,
        _dry_run: bool,
    ) -> Result<Header, CredentialFailure> {
        Err(CredentialFailure {
            denial: Denial::new(crate::policy::Reason::BackendCredentialUnavailable),
            detail: "not available".into(),
        })
    }
}

/// Compiles `credentials` and `store`.
pub fn compile_credentials(
    src: &Source,
    _registry: &Registry,
    errs: &mut ConfigErrors,
) -> CredentialSet {
    if !src.file.credentials.is_empty() {
        errs.push(
            "credentials",
            "backend credentials are not available in this build",
        );
    }
    CredentialSet::default()
}

/// Compiles one API's `on_allow.backend_credential`.
pub fn compile_backend_credential(
    _cfg: &config::BackendCredential,
    path: &str,
    _api_has_jwt: bool,
    _set: &CredentialSet,
    errs: &mut ConfigErrors,
) -> Option<BackendCredentialPolicy> {
    errs.push(path, "backend credentials are not available in this build");
    None
}
