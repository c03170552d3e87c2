//! The persistent store: connections and their refresh tokens, encrypted, in one embedded file.
//!
//! The file is a [`redb`] database (crash-safe: a committed write transaction is durable, so a write
//! that was acknowledged survives a `kill -9`). Every value is sealed with AES-256-GCM under
//! `store.key` with a fresh random nonce per write and the record's identity (table and key) as
//! associated data, so a record cannot be moved to another connection or credential undetected.
//!
//! Opening never resets anything. A key-check record (a known plaintext sealed under the key) tells
//! a wrong key from a corrupt file, and both are startup errors that leave the file as it was: the
//! file is first read through a read-only handle; only after the key and every record verified is
//! it opened for writing.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, DatabaseError, TableDefinition};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

mod open;
pub mod redis;
use open::{classify, guarded, load, open_read_only, verify, verify_copy};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CONNECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("connections");
/// Run-time subscriptions (the admin API's), sealed like connections: id -> record JSON.
const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscriptions");
pub(crate) const KEY_CHECK: &str = "key_check";
pub(crate) const KEY_CHECK_PLAINTEXT: &[u8] = b"portcullis store v1";
/// Present (sealed) in stores whose connection ids are namespaced: fixed ids are names, per-user
/// ids are `user:` + digest of issuer and subject. A store without it was written when a per-user
/// id was the bare claim value, which could equal a fixed id.
const CONNECTION_IDS: &str = "connection_ids";
const CONNECTION_IDS_PLAINTEXT: &[u8] = b"namespaced: fixed names, user:sha256(iss, sub)";
/// Format of a sealed value: version byte, 96-bit nonce, ciphertext with the GCM tag.
const SEAL_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// Why the store cannot be used. Messages name the file and the cause; never the key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The shared Redis store cannot be used (unreachable, refused the login, wrong key).
    #[error("store {url}: {detail}")]
    Redis {
        /// The URL, without user information.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The key does not open the file's key-check record.
    #[error(
        "store {path}: wrong key: `store.key` does not decrypt this store (the file was left untouched)"
    )]
    WrongKey {
        /// The file.
        path: PathBuf,
    },
    /// The file is damaged, altered or not a portcullis store.
    #[error(
        "store {path}: the file is corrupt or not a portcullis store: {detail} (the file was left untouched)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// Another process holds the file.
    #[error("store {path}: the file is in use by another process")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The store predates namespaced connection ids and holds connections whose meaning the
    /// current config makes ambiguous (see [`Store::has_legacy_connection_ids`]).
    #[error(
        "store {path}: credential `{credential}` has {count} connection(s) ({sample}) written before per-user connections were keyed by the token's issuer and subject; such an id may be a user's `sub` (of an unknown identity provider) or a shared connection, so portcullis will not guess (the file was left untouched). If they are users' connections of one identity provider, run `portcullis upgrade-store --config <file> --credential {credential} --issuer <that provider's issuer>` to give them to that provider's users; otherwise run `portcullis upgrade-store --config <file> --credential {credential} --drop` to delete them (their users consent again)"
    )]
    LegacyConnections {
        /// The file.
        path: PathBuf,
        /// The credential.
        credential: String,
        /// How many of its connections are ambiguous.
        count: usize,
        /// Up to five of their ids.
        sample: String,
    },
    /// The file cannot be read or written.
    #[error("store {path}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        detail: String,
    },
}

/// How far a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// Holds a refresh token that worked the last time.
    Connected,
    /// Consent is needed (first, or again after the refresh token was refused).
    NeedsConsent,
    /// The last refresh failed for another reason; `error` says which.
    Error,
}

impl ConnectionState {
    /// As shown by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connected => "connected",
            ConnectionState::NeedsConsent => "needs_consent",
            ConnectionState::Error => "error",
        }
    }
}

/// What is persisted for one connection (sealed as a whole).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Connected, needs consent or error.
    pub state: ConnectionState,
    /// The current refresh token.
    pub refresh_token: Option<String>,
    /// When the refresh token expires, if the provider said (Unix seconds).
    pub refresh_token_expires_at: Option<u64>,
    /// A safe description of the last failure.
    pub error: Option<String>,
    /// SHA-256 (hex) of the configured `refresh_token` this record was seeded from, so a new value
    /// in the config replaces a rotated one while an unchanged one does not.
    pub seeded_from: Option<String>,
    /// Per-user connections: the `iss` of the user's identity provider (absent in fixed ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Per-user connections: the user's subject (the rendered `connection` template, e.g. `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
}

impl std::fmt::Debug for ConnectionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionRecord")
            .field("state", &self.state)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("error", &self.error)
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

/// The open store. Reads come from an in-memory copy (the request path never touches the disk);
/// writes go to the file first and to the copy once committed.
pub struct Store {
    /// `None` after a failed write: redb refuses every later transaction on that handle
    /// (`PreviousIo`), so the next write reopens the file (which also rolls the failed one back).
    db: Mutex<Option<Database>>,
    cipher: LessSafeKey,
    path: PathBuf,
    records: Mutex<BTreeMap<(String, String), ConnectionRecord>>,
    /// The file has no `connection_ids` marker yet (written by an older version).
    legacy_ids: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Decodes `store.key`: 32 bytes in base64 (standard or URL-safe alphabet, padding optional).
pub fn decode_key(text: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let t = text.trim();
    let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(t).ok())
        .ok_or_else(|| {
            "is not base64; generate a key with `openssl rand -base64 32`".to_string()
        })?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("must be 32 bytes (256 bits) in base64, this is {} bytes; generate one with `openssl rand -base64 32`", bytes.len()))
}

impl Store {
    /// Opens the store at `path`, creating it (mode 0600) when the file does not exist.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<Store, StoreError> {
        Store::open_with(path, key, |_| Ok(()))
    }

    /// [`Store::open`], but a file written before connection ids were namespaced is first shown
    /// to `legacy` (every record's (credential, connection id)), which may refuse it; it runs
    /// before the file is opened for writing, so a refused file is left byte for byte untouched.
    pub fn open_with(
        path: &Path,
        key: &[u8; 32],
        legacy: impl FnOnce(&[(String, String)]) -> Result<(), StoreError>,
    ) -> Result<Store, StoreError> {
        let cipher = UnboundKey::new(&AES_256_GCM, key)
            .map(LessSafeKey::new)
            .map_err(|_| StoreError::Io {
                path: path.into(),
                detail: "invalid key length".into(),
            })?;
        let io = |e: std::io::Error| StoreError::Io {
            path: path.into(),
            detail: e.to_string(),
        };
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Store::create(path, cipher);
            }
            Err(e) => return Err(io(e)),
            Ok(m) if !m.is_file() => {
                return Err(StoreError::Io {
                    path: path.into(),
                    detail: "is not a regular file".into(),
                });
            }
            // An empty file is not a store that was never written: refuse rather than initialise it.
            Ok(m) if m.len() == 0 => {
                return Err(StoreError::Corrupt {
                    path: path.into(),
                    detail: "the file is empty".into(),
                });
            }
            Ok(_) => {}
        }
        let verified = match open_read_only(path) {
            Ok(ro) => verify(&ro, &cipher, path)?,
            // After an unclean stop (kill -9) redb must repair the file before reading it, which
            // writes. Verify the key on a copy first so a wrong key still leaves the file untouched.
            Err(DatabaseError::RepairAborted) => verify_copy(path, &cipher)?,
            Err(e) => return Err(classify(e, path)),
        };
        if !verified.namespaced {
            legacy(&verified.ids)?;
        }
        let db = guarded(|| Database::open(path)).map_err(|e| classify(e, path))?;
        let (records, namespaced) = load(&db, &cipher, path)?;
        Ok(Store {
            db: Mutex::new(Some(db)),
            cipher,
            path: path.into(),
            records: Mutex::new(records),
            legacy_ids: (!namespaced).into(),
        })
    }

    fn create(path: &Path, cipher: LessSafeKey) -> Result<Store, StoreError> {
        let io = |e: std::io::Error| StoreError::Io {
            path: path.into(),
            detail: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Only the service user may read the (encrypted) tokens.
            opts.mode(0o600);
        }
        let file = opts.open(path).map_err(io)?;
        let backend = redb::backends::FileBackend::new(file).map_err(|e| classify(e, path))?;
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| classify(e, path))?;
        let store = Store {
            db: Mutex::new(Some(db)),
            cipher,
            path: path.into(),
            records: Mutex::new(BTreeMap::new()),
            legacy_ids: false.into(),
        };
        let sealed = store.seal(&aad("meta", KEY_CHECK), KEY_CHECK_PLAINTEXT)?;
        let marker = store.seal(&aad("meta", CONNECTION_IDS), CONNECTION_IDS_PLAINTEXT)?;
        store.write(|txn| {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_CHECK, sealed.as_slice())?;
            meta.insert(CONNECTION_IDS, marker.as_slice())?;
            drop(meta);
            txn.open_table(CONNECTIONS)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One connection's record.
    pub fn get(&self, credential: &str, connection: &str) -> Option<ConnectionRecord> {
        self.lock()
            .get(&(credential.to_string(), connection.to_string()))
            .cloned()
    }

    /// Whether a connection exists.
    pub fn contains(&self, credential: &str, connection: &str) -> bool {
        self.lock()
            .contains_key(&(credential.to_string(), connection.to_string()))
    }

    /// Every connection of a credential, by id.
    pub fn list(&self, credential: &str) -> Vec<(String, ConnectionRecord)> {
        self.lock()
            .iter()
            .filter(|((c, _), _)| c == credential)
            .map(|((_, id), r)| (id.clone(), r.clone()))
            .collect()
    }

    /// Every record's identity: (credential, connection id).
    pub fn ids(&self) -> Vec<(String, String)> {
        self.lock().keys().cloned().collect()
    }

    /// Whether the file predates namespaced connection ids: its per-user records (if any) are
    /// keyed by the bare claim value, which may equal a fixed id and names no issuer. Start-up
    /// ([`crate::credentials::Registry::start`]) upgrades it when that is unambiguous, or refuses.
    pub fn has_legacy_connection_ids(&self) -> bool {
        self.legacy_ids.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records that every connection id in the file is namespaced (after an upgrade).
    pub fn mark_connection_ids_namespaced(&self) -> Result<(), StoreError> {
        let marker = self.seal(&aad("meta", CONNECTION_IDS), CONNECTION_IDS_PLAINTEXT)?;
        self.write(|txn| {
            txn.open_table(META)?
                .insert(CONNECTION_IDS, marker.as_slice())?;
            Ok(())
        })?;
        self.legacy_ids
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Removes the connection-id marker: the file as an older version wrote it (tests only).
    #[cfg(test)]
    pub(crate) fn forget_connection_id_marker(&self) {
        self.write(|txn| {
            txn.open_table(META)?.remove(CONNECTION_IDS)?;
            Ok(())
        })
        .expect("a test store is writable");
    }

    /// Moves a record to another connection id in one transaction (re-sealed under its new
    /// identity), replacing `record` as given. Fails if `to` exists.
    pub fn rename(
        &self,
        credential: &str,
        from: &str,
        to: &str,
        record: &ConnectionRecord,
    ) -> Result<(), StoreError> {
        if self.contains(credential, to) {
            return Err(StoreError::Io {
                path: self.path.clone(),
                detail: format!("connection `{to}` of `{credential}` exists already"),
            });
        }
        let (old_key, new_key) = (record_key(credential, from), record_key(credential, to));
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        let sealed = self.seal(&aad("connections", &new_key), &json)?;
        self.write(|txn| {
            let mut t = txn.open_table(CONNECTIONS)?;
            t.remove(old_key.as_str())?;
            t.insert(new_key.as_str(), sealed.as_slice())?;
            Ok(())
        })?;
        let mut records = self.lock();
        records.remove(&(credential.to_string(), from.to_string()));
        records.insert((credential.to_string(), to.to_string()), record.clone());
        Ok(())
    }

    /// Number of connections of a credential.
    pub fn count(&self, credential: &str) -> usize {
        self.lock().keys().filter(|(c, _)| c == credential).count()
    }

    /// Writes a record durably (blocking: fsync). Returns once the write is committed.
    pub fn put(
        &self,
        credential: &str,
        connection: &str,
        record: &ConnectionRecord,
    ) -> Result<(), StoreError> {
        let key = record_key(credential, connection);
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        let sealed = self.seal(&aad("connections", &key), &json)?;
        self.write(|txn| {
            txn.open_table(CONNECTIONS)?
                .insert(key.as_str(), sealed.as_slice())?;
            Ok(())
        })?;
        self.lock().insert(
            (credential.to_string(), connection.to_string()),
            record.clone(),
        );
        Ok(())
    }

    /// Deletes a record durably. Returns whether it existed.
    pub fn delete(&self, credential: &str, connection: &str) -> Result<bool, StoreError> {
        let key = record_key(credential, connection);
        let mut existed = false;
        self.write(|txn| {
            existed = txn.open_table(CONNECTIONS)?.remove(key.as_str())?.is_some();
            Ok(())
        })?;
        self.lock()
            .remove(&(credential.to_string(), connection.to_string()));
        Ok(existed)
    }

    /// Every run-time subscription record (opened JSON), by id. A record that does not open under
    /// the key is an error: it was altered or moved.
    pub fn subscriptions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let err = |detail: String| StoreError::Io {
            path: self.path.clone(),
            detail,
        };
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let reopened;
        let handle = match db.as_ref() {
            Some(h) => h,
            None => {
                reopened =
                    guarded(|| Database::open(&self.path)).map_err(|e| classify(e, &self.path))?;
                &reopened
            }
        };
        let txn = handle.begin_read().map_err(|e| err(e.to_string()))?;
        let table = match txn.open_table(SUBSCRIPTIONS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.to_string())),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| err(e.to_string()))? {
            let (k, v) = row.map_err(|e| err(e.to_string()))?;
            let id = k.value().to_string();
            let plain = open_sealed(&self.cipher, &aad("subscriptions", &id), v.value())
                .ok_or_else(|| {
                    err(format!(
                        "subscription `{id}` does not open under `store.key`"
                    ))
                })?;
            out.push((id, plain));
        }
        Ok(out)
    }

    /// Writes a run-time subscription record durably.
    pub fn put_subscription(&self, id: &str, json: &[u8]) -> Result<(), StoreError> {
        let sealed = self.seal(&aad("subscriptions", id), json)?;
        self.write(|txn| {
            txn.open_table(SUBSCRIPTIONS)?
                .insert(id, sealed.as_slice())?;
            Ok(())
        })
    }

    /// Deletes a run-time subscription record durably; whether it existed.
    pub fn delete_subscription(&self, id: &str) -> Result<bool, StoreError> {
        let mut existed = false;
        self.write(|txn| {
            existed = txn.open_table(SUBSCRIPTIONS)?.remove(id)?.is_some();
            Ok(())
        })?;
        Ok(existed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), ConnectionRecord>> {
        // The map is only ever replaced whole per entry; a panic elsewhere cannot leave it torn.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let err = |e: redb::Error| StoreError::Io {
            path: self.path.clone(),
            detail: e.to_string(),
        };
        // Writes are serialised by this lock (redb allows one write transaction at a time anyway).
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let handle = match db.take() {
            Some(h) => h,
            None => {
                let h =
                    guarded(|| Database::open(&self.path)).map_err(|e| classify(e, &self.path))?;
                tracing::info!(store = %self.path.display(), "store reopened after a write error");
                h
            }
        };
        let result = (|| {
            let txn = handle.begin_write().map_err(|e| err(e.into()))?;
            f(&txn).map_err(err)?;
            // Durability::Immediate (the default): commit returns after the data is on disk.
            txn.commit().map_err(|e| err(e.into()))
        })();
        if result.is_ok() {
            *db = Some(handle);
        }
        // On error the handle is dropped here, before any reopen: redb allows one per file.
        result
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        seal_with(&self.cipher, aad, plaintext).ok_or_else(|| StoreError::Io {
            path: self.path.clone(),
            detail: "encryption failed".into(),
        })
    }
}

/// Seals `plaintext` with a fresh random nonce: version byte, nonce, ciphertext and tag.
pub(crate) fn seal_with(cipher: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
    out.push(SEAL_VERSION);
    out.extend_from_slice(&nonce_bytes);
    let mut sealed = plaintext.to_vec();
    cipher
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad),
            &mut sealed,
        )
        .ok()?;
    out.extend_from_slice(&sealed);
    Some(out)
}

pub(crate) fn record_key(credential: &str, connection: &str) -> String {
    // Credential names are [A-Za-z0-9._-] and connection ids carry no control characters, so NUL
    // separates them unambiguously.
    format!("{credential}\u{0}{connection}")
}

pub(crate) fn aad(table: &str, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(table.len() + key.len() + 1);
    v.extend_from_slice(table.as_bytes());
    v.push(0);
    v.extend_from_slice(key.as_bytes());
    v
}

pub(crate) fn open_sealed(cipher: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEAL_VERSION {
        return None;
    }
    let nonce_bytes: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().ok()?;
    let mut buf = sealed[1 + NONCE_LEN..].to_vec();
    let plain = cipher
        .open_in_place(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(plain);
    Some(buf)
}

#[cfg(test)]
mod tests;
