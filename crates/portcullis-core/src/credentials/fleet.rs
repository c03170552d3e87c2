//! Obtaining a shared token when the store is Redis: one replica at a time per connection.
//!
//! A replica that needs a token (a miss, or a refresh ahead of expiry) first reads the shared one.
//! If that will not do, it takes the connection's lease (`SET NX PX`, a fencing value); the others
//! wait for the token the holder shares, polling, and use it. The holder of a refresh-token
//! connection marks the record in flight (compare-and-set on its version, under the lease) before
//! sending the refresh token, and stores the rotated record (only while the marker is still its
//! own) before the new access token is used. A replica that finds another replica's marker knows
//! that replica died, or lost the store, after sending the refresh token: the token may be spent,
//! so it is never sent again; the connection needs consent (unless the owner comes back and stores
//! what it got). No spent refresh token is sent twice by the fleet.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::cache::Token;
use super::clock::unix_secs;
use super::credential::{Credential, apply_refresh, apply_refresh_failure, usable_refresh_token};
use super::endpoint::{self, TokenError};
use super::spec::GrantKind;
use super::store::redis::RedisStore;
use super::store::{ConnectionRecord, ConnectionState};

/// How often a replica waiting for another's token looks for it.
const POLL: Duration = Duration::from_millis(100);
/// The lease outlives the holder's longest refresh (one token request and a few store calls).
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// What a connection says when a replica stopped mid-refresh.
pub(super) const IN_FLIGHT_LOST: &str = "a replica stopped after sending this connection's refresh token and before storing the answer; the token may have been spent, so it is not sent again";

/// What a caller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// Any token valid now (a miss).
    Valid,
    /// A fresh one (the refresh ahead of expiry).
    Fresh,
}

impl Need {
    fn met_by(self, t: &Token, fingerprint: &[u8; 32], now: SystemTime) -> bool {
        t.fingerprint == *fingerprint
            && match self {
                Need::Valid => t.valid_at(now),
                Need::Fresh => t.fresh_at(now),
            }
    }
}

impl Credential {
    /// The lease's time to live.
    pub(super) fn lease_ttl(&self) -> Duration {
        self.spec.timeout + LEASE_MARGIN
    }

    /// A token for the connection, shared by the fleet: the one in Redis when it meets `need`,
    /// else obtained by this replica under the lease, or by another one while this waits.
    pub(super) async fn fleet_obtain(
        &self,
        r: &Arc<RedisStore>,
        connection: &str,
        need: Need,
    ) -> Result<Token, TokenError> {
        let name = self.spec.name.as_str();
        // A check waits for another replica's token no longer than for a fetch of its own; the
        // background refresh waits out the holder's whole lease.
        let wait = match need {
            Need::Valid => self.spec.timeout,
            Need::Fresh => self.lease_ttl() + LEASE_MARGIN,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match r.token(name, connection).await {
                Ok(Some(t)) if need.met_by(&t, &self.fingerprint, self.now()) => return Ok(t),
                Ok(_) => {}
                Err(e) => return self.without_fleet(connection, e).await,
            }
            match r.lease(name, connection, self.lease_ttl()).await {
                Ok(Some(fence)) => {
                    let result = self.holding(r, connection, &fence, need).await;
                    r.release(name, connection, &fence).await;
                    return result;
                }
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                }
                Ok(None) => {
                    return Err(TokenError::SharedStore(
                        "another replica is obtaining this token and has not shared it in time"
                            .into(),
                    ));
                }
                Err(e) => return self.without_fleet(connection, e).await,
            }
        }
    }

    /// Redis cannot be reached: a client-credentials token is fetched by this replica alone (no
    /// rotation to protect); a refresh token is never sent, since the fleet's record cannot be read.
    async fn without_fleet(&self, connection: &str, e: String) -> Result<Token, TokenError> {
        match self.spec.grant {
            GrantKind::ClientCredentials => {
                tracing::warn!(credential = %self.spec.name, problem = %e, "shared store unreachable: fetching this replica's own token");
                self.fetch(connection, self.now()).await
            }
            _ => Err(TokenError::SharedStore(e)),
        }
    }

    async fn holding(
        &self,
        r: &Arc<RedisStore>,
        connection: &str,
        fence: &str,
        need: Need,
    ) -> Result<Token, TokenError> {
        let name = self.spec.name.as_str();
        // The previous holder may have shared one just before releasing the lease.
        if let Ok(Some(t)) = r.token(name, connection).await
            && need.met_by(&t, &self.fingerprint, self.now())
        {
            return Ok(t);
        }
        let now = self.now();
        let token = match self.spec.grant {
            GrantKind::RefreshToken => {
                let issued = self.fleet_refresh(r, connection, fence, now).await?;
                Token::issued(
                    &issued,
                    self.fingerprint,
                    now,
                    self.spec.refresh_before_expiry,
                )
            }
            _ => self.fetch(connection, now).await?,
        };
        if let Err(e) = r.put_token(name, connection, &token).await {
            // The token is good; the other replicas fetch their own meanwhile.
            tracing::warn!(credential = %name, problem = %e, "could not share the new token");
        }
        Ok(token)
    }

    /// The refresh of a refresh-token connection, holding the lease `fence`.
    async fn fleet_refresh(
        &self,
        r: &Arc<RedisStore>,
        connection: &str,
        fence: &str,
        now: SystemTime,
    ) -> Result<endpoint::Issued, TokenError> {
        let name = self.spec.name.as_str();
        let store_err = TokenError::SharedStore;
        let client = self.client()?;
        // A rotated record this replica could not store last time: the provider has spent the
        // stored token. It is stored first, while the marker is still ours (a consent or a
        // deletion since supersedes it).
        if let Some(unstored) = self.shared.take_unstored(name, connection) {
            match r.owner_write(name, connection, Some(&unstored)).await {
                Ok(true) => {
                    tracing::info!(credential = %name, connection = %connection, "the rotated refresh token is stored now")
                }
                Ok(false) => {
                    tracing::info!(credential = %name, connection = %connection, "a consent or deletion superseded the rotated refresh token this replica could not store")
                }
                Err(e) => {
                    self.shared.keep_unstored(name, connection, unstored);
                    return Err(TokenError::Store(e));
                }
            }
        }
        let Some(mut state) = r.get(name, connection).await.map_err(store_err)? else {
            return Err(TokenError::RefreshTokenRejected("no connection".into()));
        };
        match state.marker.as_deref() {
            None => {}
            // Our own, from an attempt that ended without an answer to store: nothing was spent
            // that we do not know of.
            Some(m) if m == r.replica() => {
                r.owner_write(name, connection, None)
                    .await
                    .map_err(store_err)?;
                state = r
                    .get(name, connection)
                    .await
                    .map_err(store_err)?
                    .ok_or_else(|| TokenError::RefreshTokenRejected("no connection".into()))?;
            }
            Some(_) => {
                if state.record.state != ConnectionState::NeedsConsent {
                    let mut record = state.record.clone();
                    record.state = ConnectionState::NeedsConsent;
                    record.error = Some(IN_FLIGHT_LOST.into());
                    record.updated_at = unix_secs(now);
                    r.lease_write(name, connection, fence, state.version, &record)
                        .await
                        .map_err(store_err)?;
                    tracing::error!(credential = %name, connection = %connection, "{IN_FLIGHT_LOST}: the connection needs consent");
                }
                return Err(TokenError::RefreshTokenRejected(IN_FLIGHT_LOST.into()));
            }
        }
        let mut record = state.record;
        let rt = usable_refresh_token(&record)?;
        if r.mark(name, connection, fence, state.version)
            .await
            .map_err(store_err)?
            .is_none()
        {
            return Err(TokenError::SharedStore(
                "the connection changed while this replica was about to refresh it".into(),
            ));
        }
        match self.send_refresh(client, &rt, now).await {
            Ok(issued) => {
                let (rotated, changed) = apply_refresh(&mut record, &issued, &rt, now);
                if changed {
                    // Fail closed: the access token is not used unless the rotation is stored.
                    match r.owner_write(name, connection, Some(&record)).await {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(TokenError::SharedStore(
                                "a consent or deletion replaced the connection during its refresh"
                                    .into(),
                            ));
                        }
                        Err(e) => {
                            if rotated {
                                self.shared.keep_unstored(name, connection, record);
                            }
                            tracing::error!(credential = %name, connection = %connection, problem = %e, "the shared store cannot be written: the rotated refresh token is kept in memory until it can be");
                            return Err(TokenError::Store(e));
                        }
                    }
                } else if let Err(e) = r.owner_write(name, connection, None).await {
                    // Nothing was rotated: the token can be used; the marker is cleared next time.
                    tracing::warn!(credential = %name, problem = %e, "could not clear the in-flight marker");
                }
                Ok(issued)
            }
            Err(e) => {
                let write = if apply_refresh_failure(&mut record, &e, now) {
                    r.owner_write(name, connection, Some(&record)).await
                } else {
                    r.owner_write(name, connection, None).await
                };
                if let Err(pe) = write {
                    tracing::error!(credential = %name, problem = %pe, "cannot record the connection's state");
                }
                Err(e)
            }
        }
    }
}

/// A record seeded from the configured `refresh_token`, shared: written only if the record did not
/// change since it was read, so replicas starting together seed once and never overwrite a
/// rotation.
pub(super) async fn seed(
    r: &RedisStore,
    credential: &str,
    connection: &str,
    digest: &str,
    record: &ConnectionRecord,
) -> Result<bool, String> {
    let current = r.get(credential, connection).await?;
    if current
        .as_ref()
        .is_some_and(|s| s.record.seeded_from.as_deref() == Some(digest))
    {
        return Ok(false);
    }
    let version = current.map_or(0, |s| s.version);
    r.put_if_version(credential, connection, version, record)
        .await
}
