//! The open store, whichever it is: the embedded file (one replica) or the shared Redis (many).
//! Connection records are read and written through this; what only Redis does (leases, markers,
//! shared tokens, pending consents, events) is reached through [`Backend::redis`].

use std::sync::Arc;

use super::store::redis::RedisStore;
use super::store::{ConnectionRecord, Store};

/// The open store.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `store.path`.
    File(Arc<Store>),
    /// `store.redis`.
    Redis(Arc<RedisStore>),
}

impl Backend {
    /// The file, or the URL without user information.
    pub fn describe(&self) -> String {
        match self {
            Backend::File(s) => s.path().display().to_string(),
            Backend::Redis(r) => r.describe().to_string(),
        }
    }

    /// The shared store, when it is Redis.
    pub fn redis(&self) -> Option<&Arc<RedisStore>> {
        match self {
            Backend::Redis(r) => Some(r),
            Backend::File(_) => None,
        }
    }

    /// The embedded store, when it is a file.
    pub fn file(&self) -> Option<&Arc<Store>> {
        match self {
            Backend::File(s) => Some(s),
            Backend::Redis(_) => None,
        }
    }

    /// One connection's record. The file answers from memory; Redis within its timeout.
    pub async fn get(
        &self,
        credential: &str,
        connection: &str,
    ) -> Result<Option<ConnectionRecord>, String> {
        match self {
            Backend::File(s) => Ok(s.get(credential, connection)),
            Backend::Redis(r) => Ok(r.get(credential, connection).await?.map(|s| s.record)),
        }
    }

    /// Every connection of a credential, by id.
    pub async fn list(&self, credential: &str) -> Result<Vec<(String, ConnectionRecord)>, String> {
        match self {
            Backend::File(s) => Ok(s.list(credential)),
            Backend::Redis(r) => r.list(credential).await,
        }
    }

    /// Writes a record durably (the file off the async threads; on Redis, whatever its version,
    /// clearing any in-flight marker).
    pub async fn put(
        &self,
        credential: &str,
        connection: &str,
        record: ConnectionRecord,
    ) -> Result<(), String> {
        match self {
            Backend::File(s) => {
                let (s, c, k) = (s.clone(), credential.to_string(), connection.to_string());
                tokio::task::spawn_blocking(move || s.put(&c, &k, &record))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Backend::Redis(r) => r.put(credential, connection, &record).await,
        }
    }

    /// Deletes a record durably; whether it existed.
    pub async fn delete(&self, credential: &str, connection: &str) -> Result<bool, String> {
        match self {
            Backend::File(s) => {
                let (s, c, k) = (s.clone(), credential.to_string(), connection.to_string());
                tokio::task::spawn_blocking(move || s.delete(&c, &k))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Backend::Redis(r) => r.delete(credential, connection).await,
        }
    }

    /// Every run-time subscription record (JSON) and the change version it is current at (Redis;
    /// always 0 for the file).
    pub async fn subscriptions(&self) -> Result<(Vec<(String, Vec<u8>, u64)>, u64), String> {
        match self {
            Backend::File(s) => {
                let s = s.clone();
                let rows = tokio::task::spawn_blocking(move || s.subscriptions())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok((rows.into_iter().map(|(id, j)| (id, j, 0)).collect(), 0))
            }
            Backend::Redis(r) => r.subscriptions().await,
        }
    }

    /// Writes a run-time subscription record if its revision is still `expected` (`None`: only if
    /// absent). `Ok(None)` when another writer got there first; else the new revision.
    pub async fn put_subscription(
        &self,
        id: &str,
        json: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<Option<u64>, String> {
        match self {
            Backend::File(s) => {
                // One process owns the file and the caller serialises its writes: the revision is
                // kept in memory only.
                let (s, id) = (s.clone(), id.to_string());
                tokio::task::spawn_blocking(move || s.put_subscription(&id, &json))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(Some(expected.map_or(1, |r| r + 1)))
            }
            Backend::Redis(r) => r.put_subscription(id, &json, expected).await,
        }
    }

    /// Deletes a run-time subscription record if its revision is still `expected`; `Ok(false)`
    /// when it changed or was gone.
    pub async fn delete_subscription(&self, id: &str, expected: u64) -> Result<bool, String> {
        match self {
            Backend::File(s) => {
                let (s, id) = (s.clone(), id.to_string());
                tokio::task::spawn_blocking(move || s.delete_subscription(&id))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Backend::Redis(r) => r.delete_subscription(id, expected).await,
        }
    }
}
