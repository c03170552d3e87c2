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
}
