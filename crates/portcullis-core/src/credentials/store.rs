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

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use redb::{
    Database, DatabaseError, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition,
};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CONNECTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("connections");
const KEY_CHECK: &str = "key_check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"portcullis store v1";
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
    cipher: Aes256Gcm,
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
        let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| StoreError::Io {
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

    fn create(path: &Path, cipher: Aes256Gcm) -> Result<Store, StoreError> {
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
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = Nonce::from(nonce_bytes);
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce_bytes);
        let ct = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| StoreError::Io {
                path: self.path.clone(),
                detail: "encryption failed".into(),
            })?;
        out.extend_from_slice(&ct);
        Ok(out)
    }
}

fn record_key(credential: &str, connection: &str) -> String {
    // Credential names are [A-Za-z0-9._-] and connection ids carry no control characters, so NUL
    // separates them unambiguously.
    format!("{credential}\u{0}{connection}")
}

fn aad(table: &str, key: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(table.len() + key.len() + 1);
    v.extend_from_slice(table.as_bytes());
    v.push(0);
    v.extend_from_slice(key.as_bytes());
    v
}

fn open_sealed(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEAL_VERSION {
        return None;
    }
    let nonce_bytes: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().ok()?;
    cipher
        .decrypt(
            &Nonce::from(nonce_bytes),
            Payload {
                msg: &sealed[1 + NONCE_LEN..],
                aad,
            },
        )
        .ok()
}

/// redb checks its own invariants with assertions that may panic on a damaged file; a damaged file
/// must be an error, not a crash.
fn guarded<T>(f: impl FnOnce() -> Result<T, DatabaseError>) -> Result<T, DatabaseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(DatabaseError::Storage(redb::StorageError::Corrupted(
            "the file's structure is damaged".into(),
        )))
    })
}

fn open_read_only(path: &Path) -> Result<ReadOnlyDatabase, DatabaseError> {
    guarded(|| ReadOnlyDatabase::open(path))
}

fn classify(e: DatabaseError, path: &Path) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked { path: path.into() }
        }
        DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() != std::io::ErrorKind::InvalidData
                && io.kind() != std::io::ErrorKind::UnexpectedEof =>
        {
            StoreError::Io {
                path: path.into(),
                detail: io.to_string(),
            }
        }
        other => StoreError::Corrupt {
            path: path.into(),
            detail: other.to_string(),
        },
    }
}

/// What [`verify`] found.
struct Verified {
    /// Every record's (credential, connection id).
    ids: Vec<(String, String)>,
    /// The file has the connection-id marker.
    namespaced: bool,
}

/// Whether the meta table holds the connection-id marker; an altered one is corruption.
fn read_marker(
    meta: &redb::ReadOnlyTable<&str, &[u8]>,
    cipher: &Aes256Gcm,
    path: &Path,
) -> Result<bool, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.into(),
        detail,
    };
    let marker = meta
        .get(CONNECTION_IDS)
        .map_err(|e| corrupt(e.to_string()))?;
    match marker {
        None => Ok(false),
        Some(m) => match open_sealed(cipher, &aad("meta", CONNECTION_IDS), m.value()) {
            Some(p) if p == CONNECTION_IDS_PLAINTEXT => Ok(true),
            _ => Err(corrupt("the connection-id marker is altered".into())),
        },
    }
}

/// Checks the key-check record and that every record opens, through any readable handle.
fn verify(
    db: &impl ReadableDatabase,
    cipher: &Aes256Gcm,
    path: &Path,
) -> Result<Verified, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.into(),
        detail,
    };
    let txn = db.begin_read().map_err(|e| corrupt(e.to_string()))?;
    let meta = txn
        .open_table(META)
        .map_err(|e| corrupt(format!("no key-check record ({e})")))?;
    let check = meta
        .get(KEY_CHECK)
        .map_err(|e| corrupt(e.to_string()))?
        .ok_or_else(|| corrupt("no key-check record".into()))?;
    match open_sealed(cipher, &aad("meta", KEY_CHECK), check.value()) {
        Some(p) if p == KEY_CHECK_PLAINTEXT => {}
        Some(_) => return Err(corrupt("the key-check record is altered".into())),
        None => return Err(StoreError::WrongKey { path: path.into() }),
    }
    drop(check);
    let namespaced = read_marker(&meta, cipher, path)?;
    let mut ids = Vec::new();
    let table = txn
        .open_table(CONNECTIONS)
        .map_err(|e| corrupt(e.to_string()))?;
    for entry in table.iter().map_err(|e| corrupt(e.to_string()))? {
        let (k, v) = entry.map_err(|e| corrupt(e.to_string()))?;
        let key = k.value();
        let plain = open_sealed(cipher, &aad("connections", key), v.value()).ok_or_else(|| {
            corrupt(format!(
                "record {:?} does not decrypt",
                key.replace('\0', "/")
            ))
        })?;
        serde_json::from_slice::<ConnectionRecord>(&plain)
            .map_err(|e| corrupt(format!("record {:?}: {e}", key.replace('\0', "/"))))?;
        if let Some((c, k)) = key.split_once('\0') {
            ids.push((c.to_string(), k.to_string()));
        }
    }
    Ok(Verified { ids, namespaced })
}

fn verify_copy(path: &Path, cipher: &Aes256Gcm) -> Result<Verified, StoreError> {
    let io = |e: std::io::Error| StoreError::Io {
        path: path.into(),
        detail: e.to_string(),
    };
    let copy = std::env::temp_dir().join(format!(
        "portcullis-store-verify-{:032x}.db",
        rand::random::<u128>()
    ));
    std::fs::copy(path, &copy).map_err(io)?;
    let result = guarded(|| Database::open(&copy))
        .map_err(|e| classify(e, path))
        .and_then(|db| verify(&db, cipher, path));
    let _ = std::fs::remove_file(&copy);
    result
}

/// The records, and whether the file's connection ids are namespaced.
type Loaded = (BTreeMap<(String, String), ConnectionRecord>, bool);

fn load(db: &Database, cipher: &Aes256Gcm, path: &Path) -> Result<Loaded, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.into(),
        detail,
    };
    let txn = db.begin_read().map_err(|e| corrupt(e.to_string()))?;
    let namespaced = {
        let meta = txn
            .open_table(META)
            .map_err(|e| corrupt(format!("no key-check record ({e})")))?;
        read_marker(&meta, cipher, path)?
    };
    let table = txn
        .open_table(CONNECTIONS)
        .map_err(|e| corrupt(e.to_string()))?;
    let mut out = BTreeMap::new();
    for entry in table.iter().map_err(|e| corrupt(e.to_string()))? {
        let (k, v) = entry.map_err(|e| corrupt(e.to_string()))?;
        let key = k.value();
        let plain = open_sealed(cipher, &aad("connections", key), v.value())
            .ok_or_else(|| corrupt("a record does not decrypt".into()))?;
        let record: ConnectionRecord =
            serde_json::from_slice(&plain).map_err(|e| corrupt(e.to_string()))?;
        let (cred, conn) = key
            .split_once('\0')
            .ok_or_else(|| corrupt("a record key is malformed".into()))?;
        out.insert((cred.to_string(), conn.to_string()), record);
    }
    Ok((out, namespaced))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rt: &str) -> ConnectionRecord {
        ConnectionRecord {
            state: ConnectionState::Connected,
            refresh_token: Some(rt.into()),
            refresh_token_expires_at: None,
            error: None,
            seeded_from: None,
            issuer: None,
            subject: None,
            created_at: 1,
            updated_at: 2,
        }
    }

    fn sha(path: &Path) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
    }

    #[test]
    fn records_survive_reopen_and_are_not_stored_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/store.db");
        let key = [7u8; 32];
        {
            let s = Store::open(&path, &key).unwrap();
            s.put("crm", "alice", &record("rt-secret-value-1")).unwrap();
            s.put("crm", "bob", &record("rt-secret-value-2")).unwrap();
            assert!(s.delete("crm", "bob").unwrap());
            assert!(!s.delete("crm", "nobody").unwrap());
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(17).any(|w| w == b"rt-secret-value-1"),
            "the refresh token is encrypted on disk"
        );
        let s = Store::open(&path, &key).unwrap();
        assert_eq!(
            s.get("crm", "alice").unwrap().refresh_token.as_deref(),
            Some("rt-secret-value-1")
        );
        assert!(s.get("crm", "bob").is_none());
        assert_eq!(s.list("crm").len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn a_wrong_key_is_an_error_and_the_file_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        Store::open(&path, &[1u8; 32])
            .unwrap()
            .put("crm", "alice", &record("rt"))
            .unwrap();
        let before = sha(&path);
        let err = Store::open(&path, &[2u8; 32]).unwrap_err();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("wrong key"));
        assert_eq!(sha(&path), before);
        // The right key still opens it.
        assert!(
            Store::open(&path, &[1u8; 32])
                .unwrap()
                .get("crm", "alice")
                .is_some()
        );
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_an_error_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        std::fs::write(
            &path,
            b"this is not a database at all, just some bytes".repeat(200),
        )
        .unwrap();
        let before = sha(&path);
        let err = Store::open(&path, &[1u8; 32]).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(sha(&path), before);

        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            Store::open(&empty, &[1u8; 32]).unwrap_err(),
            StoreError::Corrupt { .. }
        ));
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    }

    #[test]
    fn a_record_moved_to_another_identity_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let key = [3u8; 32];
        {
            let s = Store::open(&path, &key).unwrap();
            s.put("crm", "alice", &record("rt-a")).unwrap();
            // Copy alice's sealed value under bob's key, as an attacker with file access could.
            let sealed = {
                let db = s.db.lock().unwrap();
                let txn = db.as_ref().unwrap().begin_read().unwrap();
                let t = txn.open_table(CONNECTIONS).unwrap();
                t.get(record_key("crm", "alice").as_str())
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec()
            };
            s.write(|txn| {
                txn.open_table(CONNECTIONS)?
                    .insert(record_key("crm", "bob").as_str(), sealed.as_slice())?;
                Ok(())
            })
            .unwrap();
        }
        let err = Store::open(&path, &key).unwrap_err();
        assert!(err.to_string().contains("does not decrypt"), "{err}");
    }

    #[test]
    fn every_write_uses_a_fresh_nonce() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db"), &[9u8; 32]).unwrap();
        let a = s.seal(b"x", b"same plaintext").unwrap();
        let b = s.seal(b"x", b"same plaintext").unwrap();
        assert_ne!(a, b);
        assert_eq!(open_sealed(&s.cipher, b"x", &a).unwrap(), b"same plaintext");
        assert!(
            open_sealed(&s.cipher, b"y", &a).is_none(),
            "associated data is bound"
        );
    }

    #[test]
    fn a_store_without_the_connection_id_marker_is_legacy_until_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let key = [4u8; 32];
        {
            let s = Store::open(&path, &key).unwrap();
            assert!(!s.has_legacy_connection_ids(), "a new store is namespaced");
            s.put("crm", "alice", &record("rt-a")).unwrap();
            s.forget_connection_id_marker();
        }
        {
            let s = Store::open(&path, &key).unwrap();
            assert!(s.has_legacy_connection_ids());
            // Moving a record re-seals it under its new identity: it opens after a reopen.
            let mut r = s.get("crm", "alice").unwrap();
            r.issuer = Some("https://idp".into());
            r.subject = Some("alice".into());
            s.rename("crm", "alice", "user:x", &r).unwrap();
            assert!(
                s.rename("crm", "user:x", "user:x", &r).is_err(),
                "never over an existing one"
            );
            s.mark_connection_ids_namespaced().unwrap();
            assert!(!s.has_legacy_connection_ids());
        }
        let s = Store::open(&path, &key).unwrap();
        assert!(!s.has_legacy_connection_ids(), "the mark is durable");
        assert!(s.get("crm", "alice").is_none());
        let moved = s.get("crm", "user:x").unwrap();
        assert_eq!(
            (
                moved.refresh_token.as_deref(),
                moved.issuer.as_deref(),
                moved.subject.as_deref()
            ),
            (Some("rt-a"), Some("https://idp"), Some("alice"))
        );
        // An altered marker is not taken for either answer.
        s.write(|txn| {
            txn.open_table(META)?.insert(
                CONNECTION_IDS,
                b"\x01garbage-garbage-garbage-garbage".as_slice(),
            )?;
            Ok(())
        })
        .unwrap();
        drop(s);
        let err = Store::open(&path, &key).unwrap_err();
        assert!(err.to_string().contains("connection-id marker"), "{err}");
    }

    #[test]
    fn records_without_issuer_and_subject_still_read() {
        // The JSON an older version sealed: no `issuer` or `subject`.
        let old = br#"{"state":"connected","refresh_token":"rt","refresh_token_expires_at":null,"error":null,"seeded_from":null,"created_at":1,"updated_at":2}"#;
        let r: ConnectionRecord = serde_json::from_slice(old).unwrap();
        assert_eq!((r.issuer, r.subject), (None, None));
    }

    #[test]
    fn key_format() {
        assert!(decode_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").is_ok());
        assert!(decode_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").is_ok());
        assert!(decode_key("short").unwrap_err().contains("base64"));
        assert!(decode_key("AAAA").unwrap_err().contains("3 bytes"));
        assert!(decode_key("not base64 !!").is_err());
    }

    #[test]
    fn a_second_process_cannot_open_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let _first = Store::open(&path, &[1u8; 32]).unwrap();
        let err = Store::open(&path, &[1u8; 32]).unwrap_err();
        assert!(
            matches!(err, StoreError::Locked { .. } | StoreError::Corrupt { .. }),
            "{err}"
        );
    }
}
