//! Connections and consent, as API Management's credential manager runs them: an operator asks for
//! a login URL for a connection, the user consents at the provider, the provider redirects to
//! `/admin/callback` with a code, and portcullis redeems it (PKCE S256) and stores the refresh token
//! encrypted. The HTTP side is `server::admin`; this is the logic, with answers as JSON values.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::digest::Sha256;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::Registry;
use super::backend::Backend;
use super::cache::Token;
use super::clock::{rfc3339, unix_secs};
use super::credential::{Credential, Kind};
use super::endpoint;
use super::registry::locked;
use super::spec::{self, GrantKind};
use super::store::{ConnectionRecord, ConnectionState};

/// How long a login URL (its `state` and PKCE verifier) stays redeemable.
pub const CONSENT_TTL: Duration = Duration::from_secs(600);
/// Consents pending at once; more are refused rather than growing memory without bound.
const MAX_PENDING: usize = 1_000;

/// A consent in progress, kept server-side under its `state` (in Redis, sealed, with `store.redis`,
/// so the provider's redirect may land on any replica).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct PendingConsent {
    credential: String,
    connection: String,
    verifier: String,
    #[serde(with = "unix_time")]
    expires_at: SystemTime,
    redirect_after: Option<String>,
    /// A per-user connection's (issuer, subject), recorded with it so the admin list shows whose.
    user: Option<(String, String)>,
}

/// The user a per-user connection belongs to, as the admin API names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionUser {
    /// The `iss` of the user's tokens (the identity provider's issuer).
    pub issuer: String,
    /// The user's subject: the value the API's `connection` template renders (e.g. `sub`).
    pub subject: String,
}

impl ConnectionUser {
    /// The user's connection id.
    pub fn connection_id(&self) -> String {
        spec::per_user_connection_id(&self.issuer, &self.subject)
    }
}

/// What the admin API says about a connection id it was given.
const CONNECTION_ID_RULE: &str = "a connection id is a fixed name (1 to 128 letters, digits, `.`, `_` or `-`) or a per-user id `user:` + 43 characters (GET /admin/credentials/{name}/connections?issuer=..&subject=.. shows a user's)";

/// Checks an admin-API connection id and the user given with it: a per-user id must come with
/// the issuer and subject it is derived from, a fixed one with neither.
fn check_connection(connection: &str, user: Option<&ConnectionUser>) -> Result<(), AdminError> {
    if !spec::valid_connection_id(connection) {
        return Err(AdminError::BadRequest(CONNECTION_ID_RULE.into()));
    }
    match (spec::is_per_user_connection_id(connection), user) {
        (false, None) => Ok(()),
        (false, Some(_)) => Err(AdminError::BadRequest(format!(
            "`{connection}` is a fixed (shared) connection: it has no `issuer` and `subject`"
        ))),
        (true, None) => Err(AdminError::BadRequest(
            "a per-user connection's consent names its user: give {\"issuer\": ..., \"subject\": ...}".into(),
        )),
        (true, Some(u)) if u.connection_id() == connection => Ok(()),
        (true, Some(_)) => Err(AdminError::BadRequest(format!(
            "`{connection}` is not the connection of that issuer and subject"
        ))),
    }
}

/// Why an admin request failed; the message is safe to return.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No such credential or connection.
    #[error("{0}")]
    NotFound(String),
    /// The request is not valid for this credential.
    #[error("{0}")]
    BadRequest(String),
    /// The provider or the store failed.
    #[error("{0}")]
    Unavailable(String),
}

impl AdminError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::NotFound(_) => 404,
            AdminError::BadRequest(_) => 400,
            AdminError::Unavailable(_) => 502,
        }
    }
}

/// What the callback achieved.
#[derive(Debug)]
pub struct CallbackOutcome {
    /// The credential.
    pub credential: String,
    /// The connection now connected.
    pub connection: String,
    /// Where the operator asked to be sent afterwards.
    pub redirect_after: Option<String>,
}

fn token_json(t: Option<&Token>, now: SystemTime) -> Value {
    match t.filter(|t| t.valid_at(now)) {
        Some(t) => {
            json!({"obtained_at": rfc3339(t.obtained_at), "refresh_at": rfc3339(t.fresh_until), "expires_at": rfc3339(t.expires_at)})
        }
        None => Value::Null,
    }
}

fn secs_json(s: Option<u64>) -> Value {
    s.map_or(Value::Null, |s| {
        Value::String(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s)))
    })
}

impl Registry {
    fn credential(&self, name: &str) -> Result<Arc<Credential>, AdminError> {
        self.shared
            .current()
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| AdminError::NotFound(format!("no credential is named `{name}`")))
    }

    /// `GET /admin/credentials`: every credential, its grant, state and token times; never a secret.
    pub async fn admin_credentials(&self) -> Value {
        let now = self.shared.clock.now();
        let current = self.shared.current();
        let mut list: Vec<Value> = Vec::with_capacity(current.by_name.len());
        for c in current.by_name.values() {
            let records = match (&c.kind, self.shared.store()) {
                (Kind::RefreshToken, Some(s)) => Some(s.list(c.name()).await),
                _ => None,
            };
            list.push({
                let mut v = json!({"name": c.name(), "grant": c.grant().as_str()});
                match &c.kind {
                    Kind::Fixed(_) => v["state"] = json!("connected"),
                    Kind::ClientCredentials(slot) => {
                        let token = slot.valid(&c.fingerprint, now);
                        let error = slot.meta().last_error.clone();
                        v["state"] = json!(match (&token, &error) {
                            (Some(_), _) => "connected",
                            (None, Some(_)) => "error",
                            (None, None) => "idle",
                        });
                        v["token"] = token_json(token.as_deref(), now);
                        v["last_error"] = json!(error);
                    }
                    Kind::RefreshToken => {
                        let (records, store_error) = match records {
                            Some(Ok(r)) => (r, None),
                            Some(Err(e)) => (Vec::new(), Some(e)),
                            None => (Vec::new(), None),
                        };
                        let count = |st: ConnectionState| {
                            records.iter().filter(|(_, r)| r.state == st).count()
                        };
                        let (ok, consent, error) = (
                            count(ConnectionState::Connected),
                            count(ConnectionState::NeedsConsent),
                            count(ConnectionState::Error),
                        );
                        v["state"] = json!(if records.is_empty() || consent > 0 {
                            "needs_consent"
                        } else if error > 0 {
                            "error"
                        } else {
                            "connected"
                        });
                        v["connections"] =
                            json!({"connected": ok, "needs_consent": consent, "error": error});
                        if let Some(e) = store_error {
                            v["state"] = json!("error");
                            v["last_error"] = json!(e);
                        }
                    }
                    Kind::TokenExchange(_) => {
                        v["state"] = json!("connected");
                        v["cached_tokens"] = json!(c.exchange_entries());
                    }
                }
                v
            });
        }
        json!({ "credentials": list })
    }

    /// `GET /admin/credentials/{name}/connections`; with `user`
    /// (`?issuer=..&subject=..`), only that user's connection, and its `id` even before it exists
    /// (to start its consent).
    pub async fn admin_connections(
        &self,
        name: &str,
        user: Option<&ConnectionUser>,
    ) -> Result<Value, AdminError> {
        let c = self.credential(name)?;
        let only = user.map(ConnectionUser::connection_id);
        let now = self.shared.clock.now();
        let list: Vec<Value> = match &c.kind {
            Kind::RefreshToken => {
                let store = self
                    .shared
                    .store()
                    .ok_or_else(|| AdminError::Unavailable("the store is not open".into()))?;
                store
                    .list(name)
                    .await
                    .map_err(AdminError::Unavailable)?
                    .into_iter()
                    .filter(|(id, _)| only.as_ref().is_none_or(|o| o == id))
                    .map(|(id, r)| {
                        let token = self
                            .shared
                            .existing_slot(name, &id)
                            .and_then(|s| s.valid(&c.fingerprint, now));
                        let per_user = spec::is_per_user_connection_id(&id);
                        json!({
                            "id": id,
                            "kind": if per_user { "per_user" } else { "fixed" },
                            "issuer": r.issuer,
                            "subject": r.subject,
                            "state": r.state.as_str(),
                            "error": r.error,
                            "access_token": token_json(token.as_deref(), now),
                            "refresh_token_expires_at": secs_json(r.refresh_token_expires_at),
                            "created_at": secs_json(Some(r.created_at)),
                            "updated_at": secs_json(Some(r.updated_at)),
                        })
                    })
                    .collect()
            }
            Kind::ClientCredentials(slot) => {
                let token = slot.valid(&c.fingerprint, now);
                let error = slot.meta().last_error.clone();
                vec![
                    json!({"id": "default", "state": if token.is_some() { "connected" } else if error.is_some() { "error" } else { "idle" }, "error": error, "access_token": token_json(token.as_deref(), now)}),
                ]
            }
            Kind::Fixed(_) | Kind::TokenExchange(_) => {
                vec![json!({"id": "default", "state": "connected"})]
            }
        };
        let mut out =
            json!({ "credential": name, "grant": c.grant().as_str(), "connections": list });
        if let (Some(u), Some(id)) = (user, only) {
            if c.grant() != GrantKind::RefreshToken {
                return Err(AdminError::BadRequest(format!(
                    "`{name}` is a `{}` credential: it has no per-user connections",
                    c.grant().as_str()
                )));
            }
            out["id"] = json!(id);
            out["issuer"] = json!(u.issuer);
            out["subject"] = json!(u.subject);
        }
        Ok(out)
    }

    /// `POST /admin/credentials/{name}/connections/{id}/consent`: a login URL at the provider with a
    /// fresh `state` and PKCE S256 challenge; `state` and verifier stay here for 10 minutes.
    /// A per-user connection (`user:…`) must be given with its `user`, which is recorded.
    pub async fn start_consent(
        &self,
        name: &str,
        connection: &str,
        redirect_after: Option<String>,
        user: Option<ConnectionUser>,
    ) -> Result<Value, AdminError> {
        let c = self.credential(name)?;
        if c.grant() != GrantKind::RefreshToken {
            return Err(AdminError::BadRequest(format!(
                "`{name}` is a `{}` credential: only `refresh_token` credentials take consent",
                c.grant().as_str()
            )));
        }
        let (Some(authorize_url), Some(redirect_uri)) =
            (&c.spec.authorize_url, &c.spec.redirect_uri)
        else {
            return Err(AdminError::BadRequest(format!(
                "`{name}` has no `authorize_url` and `redirect_uri`: consent is not configured"
            )));
        };
        check_connection(connection, user.as_ref())?;
        if let Some(r) = &redirect_after
            && !(r.starts_with("https://") || r.starts_with("http://"))
        {
            return Err(AdminError::BadRequest(
                "`redirect_after` must be an http(s) URL".into(),
            ));
        }
        if self.shared.store().is_none() {
            return Err(AdminError::Unavailable("the store is not open".into()));
        }
        let now = self.shared.clock.now();
        let state = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let mut url =
            url::Url::parse(authorize_url).map_err(|e| AdminError::BadRequest(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code");
            q.append_pair("client_id", c.spec.client_id.as_deref().unwrap_or_default());
            q.append_pair("redirect_uri", redirect_uri);
            if let Some(scope) = &c.spec.scope {
                q.append_pair("scope", scope);
            }
            if let Some(resource) = &c.spec.resource {
                q.append_pair("resource", resource);
            }
            q.append_pair("state", &state);
            q.append_pair("code_challenge", &challenge);
            q.append_pair("code_challenge_method", "S256");
            // Providers issue refresh tokens (offline_access) only after an explicit consent screen.
            q.append_pair("prompt", "consent");
        }
        let expires_at = now + CONSENT_TTL;
        let pending = PendingConsent {
            credential: name.into(),
            connection: connection.into(),
            verifier,
            expires_at,
            redirect_after,
            user: user.map(|u| (u.issuer, u.subject)),
        };
        if let Some(r) = self.shared.store().and_then(Backend::redis) {
            let json =
                serde_json::to_vec(&pending).map_err(|e| AdminError::Unavailable(e.to_string()))?;
            r.put_consent(&state_digest(&state), &json, CONSENT_TTL)
                .await
                .map_err(|e| AdminError::Unavailable(format!("cannot keep the consent: {e}")))?;
        } else {
            let mut p = locked(&self.shared.consents);
            p.retain(|_, p| p.expires_at > now);
            if p.len() >= MAX_PENDING {
                return Err(AdminError::Unavailable(
                    "too many consents are pending; try again in a few minutes".into(),
                ));
            }
            p.insert(state, pending);
        }
        Ok(
            json!({"credential": name, "connection": connection, "login_url": url.as_str(), "expires_at": rfc3339(expires_at)}),
        )
    }

    /// `GET /admin/callback?code&state`: redeems the code of a pending consent, stores the refresh
    /// token encrypted and marks the connection connected. `state` is single-use.
    pub async fn complete_consent(
        &self,
        state: Option<&str>,
        code: Option<&str>,
        error: Option<&str>,
    ) -> Result<CallbackOutcome, AdminError> {
        let now = self.shared.clock.now();
        let state = state.ok_or_else(|| AdminError::BadRequest("no `state`".into()))?;
        let pending = match self.shared.store().and_then(Backend::redis) {
            // The state is single use: taken with GETDEL, whatever happens next.
            Some(r) => r
                .take_consent(&state_digest(state))
                .await
                .map_err(AdminError::Unavailable)?
                .and_then(|p| serde_json::from_slice::<PendingConsent>(&p).ok()),
            None => locked(&self.shared.consents).remove(state),
        }
        .filter(|p| p.expires_at > now);
        let pending = pending.ok_or_else(|| {
            AdminError::BadRequest("unknown or expired `state`: start the consent again".into())
        })?;
        if let Some(e) = error {
            let e: String = e
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            return Err(AdminError::BadRequest(format!(
                "the provider refused the consent ({e})"
            )));
        }
        let code = code.ok_or_else(|| AdminError::BadRequest("no `code`".into()))?;
        let c = self.credential(&pending.credential)?;
        let client = self
            .shared
            .http
            .get_or_init(endpoint::http_client)
            .as_ref()
            .map_err(|e| AdminError::Unavailable(e.clone()))?;
        let slot = self.shared.slot(&pending.credential, &pending.connection);
        // No refresh of this connection runs while its tokens are replaced.
        let _one_fetch = slot.fetch.lock().await;
        let issued = endpoint::request(
            client,
            &c.spec,
            endpoint::code_form(&c.spec, code, &pending.verifier),
            now,
            false,
        )
        .await
        .map_err(|e| AdminError::Unavailable(format!("redeeming the code failed: {e}")))?;
        let Some(refresh_token) = issued.refresh_token.clone() else {
            return Err(AdminError::Unavailable(
                "the provider returned no refresh token (does `scope` ask for offline_access?)"
                    .into(),
            ));
        };
        let existing = match self.shared.store() {
            Some(s) => s
                .get(&pending.credential, &pending.connection)
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let created_at = existing.as_ref().map_or(unix_secs(now), |r| r.created_at);
        let (issuer, subject) = match pending.user.clone() {
            Some((i, s)) => (Some(i), Some(s)),
            None => existing.map_or((None, None), |r| (r.issuer, r.subject)),
        };
        let record = ConnectionRecord {
            state: ConnectionState::Connected,
            refresh_token: Some(refresh_token),
            refresh_token_expires_at: issued.refresh_token_expires_at.map(unix_secs),
            error: None,
            seeded_from: None,
            issuer,
            subject,
            created_at,
            updated_at: unix_secs(now),
        };
        // Stored before the access token is used.
        self.shared
            .persist(&pending.credential, &pending.connection, record)
            .await
            .map_err(|e| AdminError::Unavailable(format!("cannot store the connection: {e}")))?;
        // A new consent supersedes a rotated token the store could not keep.
        let _ = self
            .shared
            .take_unstored(&pending.credential, &pending.connection);
        let token = Arc::new(Token::issued(
            &issued,
            c.fingerprint,
            now,
            c.spec.refresh_before_expiry,
        ));
        if let Some(r) = self.shared.store().and_then(Backend::redis) {
            if let Err(e) = r
                .put_token(&pending.credential, &pending.connection, &token)
                .await
            {
                tracing::warn!(credential = %pending.credential, problem = %e, "could not share the consented connection's token");
            }
            r.publish_clear(&pending.credential, &pending.connection)
                .await;
        }
        c.install(&slot, token, &pending.connection);
        tracing::info!(credential = %pending.credential, connection = %pending.connection, "connection connected by consent");
        Ok(CallbackOutcome {
            credential: pending.credential,
            connection: pending.connection,
            redirect_after: pending.redirect_after,
        })
    }

    /// `DELETE /admin/credentials/{name}/connections/{id}`.
    pub async fn delete_connection(&self, name: &str, connection: &str) -> Result<(), AdminError> {
        let c = self.credential(name)?;
        if !spec::valid_connection_id(connection) {
            return Err(AdminError::BadRequest(CONNECTION_ID_RULE.into()));
        }
        if c.grant() != GrantKind::RefreshToken {
            return Err(AdminError::BadRequest(format!(
                "`{name}` is a `{}` credential: it has no connections to delete",
                c.grant().as_str()
            )));
        }
        let store = self
            .shared
            .store()
            .ok_or_else(|| AdminError::Unavailable("the store is not open".into()))?;
        let slot = self.shared.slot(name, connection);
        let _one_fetch = slot.fetch.lock().await;
        let existed = store
            .delete(name, connection)
            .await
            .map_err(AdminError::Unavailable)?;
        slot.clear();
        if let Some(r) = store.redis() {
            r.publish_clear(name, connection).await;
        }
        let unstored = self.shared.take_unstored(name, connection).is_some();
        if existed || unstored {
            tracing::info!(credential = %name, connection = %connection, "connection deleted");
            Ok(())
        } else {
            Err(AdminError::NotFound(format!(
                "credential `{name}` has no connection `{connection}`"
            )))
        }
    }
}

/// The Redis key of a pending consent: the digest of its `state`, so the state itself (a bearer of
/// the consent until it is redeemed) is never stored.
fn state_digest(state: &str) -> String {
    hex::encode(Sha256::digest(state.as_bytes()))
}

/// `SystemTime` as Unix seconds in a pending consent.
mod unix_time {
    use std::time::{Duration, SystemTime};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(super::unix_secs(*t))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let secs = <u64 as serde::Deserialize>::deserialize(d)?;
        Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }
}
