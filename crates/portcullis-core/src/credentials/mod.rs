//! Backend credentials, modelled on API Management's credential manager: grants (client
//! credentials, refresh-token connections obtained by consent, RFC 8693 token exchange, static and
//! basic), a token cache with refresh ahead of expiry, an encrypted store for refresh tokens, and
//! the header injected upstream on allow.
//!
//! Lifetimes: a [`Registry`] lives as long as the process (the policy's `Runtime` holds it); each
//! compiled config gets a [`CredentialSet`] whose credentials are reused from the registry when their
//! settings did not change, so a reload keeps cached tokens. Connection slots (tokens of refresh-token
//! connections) live in the registry keyed by credential name and connection id, so two versions of
//! one credential never refresh the same connection at once (which would spend a rotated refresh
//! token twice).

mod backend;
mod cache;
pub mod clock;
mod compile;
mod consent;
mod credential;
pub mod endpoint;
mod fleet;
mod registry;
pub mod spec;
pub mod store;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::check::template::{Context, RenderError, Template};
use crate::check::{Denial, Failure, Header, Io, Reason};

pub use backend::Backend;
use cache::Slot;
pub use cache::TokenCacheResult;
pub use clock::{Clock, ManualClock, SystemClock};
pub use compile::{compile_backend_credential, compile_credentials};
pub use consent::{AdminError, CallbackOutcome, ConnectionUser};
use credential::{Credential, DEFAULT_CONNECTION, Kind, Unavailable};
pub(crate) use registry::Shared;
pub use registry::{DEFAULT_MAX_CONCURRENT_FETCHES, LegacyAction, Registry, upgrade_legacy_store};
use spec::StoreSpec;
pub use spec::{GrantKind, StoreLocation, per_user_connection_id};
pub use store::{ConnectionRecord, ConnectionState, Store, StoreError};

/// The credentials of one compiled config.
#[derive(Debug, Default, Clone)]
pub struct CredentialSet {
    inner: Arc<SetInner>,
}

#[derive(Debug)]
struct SetInner {
    by_name: BTreeMap<String, Arc<Credential>>,
    store: Option<StoreSpec>,
    /// `limits.max_concurrent_fetches`.
    max_fetches: usize,
}

impl CredentialSet {
    /// `store`, as configured.
    pub fn store_spec(&self) -> Option<&StoreSpec> {
        self.inner.store.as_ref()
    }
}

impl Default for SetInner {
    fn default() -> Self {
        SetInner {
            by_name: BTreeMap::new(),
            store: None,
            max_fetches: DEFAULT_MAX_CONCURRENT_FETCHES,
        }
    }
}

/// `on_allow.backend_credential` of one API.
#[derive(Debug)]
pub struct BackendCredentialPolicy {
    credential: Arc<Credential>,
    header: String,
    /// The header value is `prefix + token + suffix` (`format` split at `{token}`).
    prefix: String,
    suffix: String,
    connection: ConnectionRef,
}

#[derive(Debug, Clone)]
enum ConnectionRef {
    /// The credential has no connections (client credentials, token exchange, static, basic).
    None,
    /// One configured connection of a refresh-token credential.
    Fixed { id: String, slot: Arc<Slot> },
    /// The caller's own connection, e.g. `{jwt.sub}`.
    PerUser(Template),
}

impl BackendCredentialPolicy {
    /// The configured credential's name.
    pub fn credential_name(&self) -> &str {
        self.credential.name()
    }

    /// The request header that carries the credential upstream.
    pub fn header_name(&self) -> &str {
        &self.header
    }

    fn header(&self, token: &str) -> Header {
        let mut value = String::with_capacity(self.prefix.len() + token.len() + self.suffix.len());
        value.push_str(&self.prefix);
        value.push_str(token);
        value.push_str(&self.suffix);
        Header {
            name: self.header.clone(),
            value,
            sensitive: true,
        }
    }

    fn fail(&self, reason: Reason, detail: impl std::fmt::Display) -> Failure {
        Failure {
            denial: Denial::new(reason),
            detail: format!("credential `{}`: {detail}", self.credential.name()),
        }
    }

    /// The header carrying the credential. With `dry_run`, nothing is fetched and the value is a
    /// placeholder (for `portcullis check`).
    pub async fn header_for(&self, ctx: &Context<'_>, dry_run: bool) -> Result<Header, Failure> {
        match self.header_with(ctx, dry_run, Io::Wait).await {
            Ok(Some(h)) => Ok(h),
            Ok(None) => Err(self.fail(Reason::Internal, "a waiting lookup returned no token")),
            Err(f) => Err(f),
        }
    }

    /// [`Self::header_for`], waiting for a token fetch only when `io` allows: `Ok(None)` when no
    /// valid token is cached and `io` is [`Io::Never`] (nothing is fetched or counted then).
    pub async fn header_with(
        &self,
        ctx: &Context<'_>,
        dry_run: bool,
        io: Io,
    ) -> Result<Option<Header>, Failure> {
        let connection: Option<Cow<'_, str>> = match &self.connection {
            ConnectionRef::None => None,
            ConnectionRef::Fixed { id, .. } => Some(Cow::Borrowed(id)),
            ConnectionRef::PerUser(t) => Some(Cow::Owned(self.per_user_id(t, ctx)?)),
        };
        if dry_run {
            // `check` shows that a credential would be injected, never a value, and fetches nothing.
            return Ok(Some(Header {
                name: self.header.clone(),
                value: String::new(),
                sensitive: true,
            }));
        }
        let cred = &self.credential;
        let result = match &cred.kind {
            Kind::Fixed(v) => return Ok(Some(self.header(v))),
            Kind::ClientCredentials(slot) => cred.slot_token(slot, DEFAULT_CONNECTION, io).await,
            Kind::RefreshToken => {
                self.connection_token(connection.as_deref().unwrap_or(DEFAULT_CONNECTION), io)
                    .await
            }
            Kind::TokenExchange(_) => match ctx.raw_token {
                Some(subject) => {
                    let exp = ctx
                        .claims
                        .and_then(|c| c.get("exp"))
                        .and_then(endpoint::claim_time);
                    cred.exchange(subject, exp, io).await
                }
                None => Err(Unavailable::Failed(
                    "token exchange needs the caller's validated token".into(),
                )),
            },
        };
        match result {
            Ok(token) => Ok(Some(self.header(&token.value))),
            Err(Unavailable::WouldWait) => Ok(None),
            Err(Unavailable::Failed(d)) => Err(self.fail(Reason::BackendCredentialUnavailable, d)),
            Err(Unavailable::NeedsConsent(d)) => {
                let per_user = matches!(self.connection, ConnectionRef::PerUser(_));
                let reason = if per_user {
                    Reason::BackendCredentialConsentRequired
                } else {
                    Reason::BackendCredentialUnavailable
                };
                let id = connection.as_deref().unwrap_or(DEFAULT_CONNECTION);
                Err(self.fail(
                    reason,
                    format_args!("connection `{id}` needs consent ({d})"),
                ))
            }
        }
    }

    /// The caller's own connection id: `user:` + digest of (token `iss`, rendered template), a
    /// namespace no fixed id can spell (see [`spec::per_user_connection_id`]). Without an issuer
    /// or a value there is no caller to key it by: 403 consent required, nothing fetched.
    fn per_user_id(&self, t: &Template, ctx: &Context<'_>) -> Result<String, Failure> {
        let subject = match t.render(ctx) {
            Ok(s) if !s.is_empty() => s,
            Ok(_) | Err(RenderError::Missing) => {
                return Err(self.fail(
                    Reason::BackendCredentialConsentRequired,
                    "the caller's token has no claim naming a connection",
                ));
            }
            Err(RenderError::ControlCharacter) => {
                return Err(self.fail(
                    Reason::BackendCredentialConsentRequired,
                    "the caller's connection id is not usable (control characters)",
                ));
            }
        };
        let Some(issuer) = ctx.issuer() else {
            return Err(self.fail(
                Reason::BackendCredentialConsentRequired,
                "the caller's token has no `iss`: a per-user connection is keyed by issuer and subject",
            ));
        };
        Ok(spec::per_user_connection_id(issuer, &subject))
    }

    async fn connection_token(&self, id: &str, io: Io) -> Result<Arc<cache::Token>, Unavailable> {
        let cred = &self.credential;
        let shared = &cred.shared;
        let slot = match &self.connection {
            ConnectionRef::Fixed { slot, .. } => Some(slot.clone()),
            _ => shared.existing_slot(cred.name(), id),
        };
        let now = shared.clock.now();
        let cached = slot
            .as_ref()
            .is_some_and(|s| s.valid(&cred.fingerprint, now).is_some());
        if !cached && io == Io::Never {
            return Err(Unavailable::WouldWait);
        }
        if !cached {
            let Some(store) = shared.store() else {
                return Err(Unavailable::Failed(
                    "the store is not open (a `store` added by a reload applies after a restart)"
                        .into(),
                ));
            };
            let usable = |r: Option<ConnectionRecord>| {
                r.is_some_and(|r| {
                    r.state != ConnectionState::NeedsConsent && r.refresh_token.is_some()
                })
            };
            if !usable(
                store
                    .get(cred.name(), id)
                    .await
                    .map_err(Unavailable::Failed)?,
            ) {
                if id == DEFAULT_CONNECTION && cred.spec.refresh_token.is_some() {
                    cred.seed_configured_refresh_token().await;
                }
                if !usable(
                    store
                        .get(cred.name(), id)
                        .await
                        .map_err(Unavailable::Failed)?,
                ) {
                    return Err(Unavailable::NeedsConsent("no refresh token".into()));
                }
            }
        }
        let slot = slot.unwrap_or_else(|| shared.slot(cred.name(), id));
        cred.slot_token(&slot, id, io).await
    }

    fn prefetch_handle(&self) -> Prefetch {
        Prefetch {
            credential: self.credential.clone(),
            connection: self.connection.clone(),
        }
    }
}

/// A credential to obtain at start.
struct Prefetch {
    credential: Arc<Credential>,
    connection: ConnectionRef,
}

impl Prefetch {
    async fn prefetch(self) {
        let cred = &self.credential;
        let result = match (&cred.kind, &self.connection) {
            (Kind::ClientCredentials(slot), _) => {
                Some(cred.slot_token(slot, DEFAULT_CONNECTION, Io::Wait).await)
            }
            (Kind::RefreshToken, ConnectionRef::Fixed { id, slot }) => {
                let connected = match cred.shared.store() {
                    Some(s) => s
                        .get(cred.name(), id)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|r| r.state != ConnectionState::NeedsConsent),
                    None => false,
                };
                if connected {
                    Some(cred.slot_token(slot, id, Io::Wait).await)
                } else {
                    None
                }
            }
            _ => None,
        };
        if let Some(Err(e)) = result {
            tracing::warn!(credential = %cred.name(), problem = ?e, "backend credential not obtained at start; requests will retry");
        }
    }
}

#[cfg(test)]
mod tests;
