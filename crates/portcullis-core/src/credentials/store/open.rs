//! Opening the file without changing it until it is known good: redb's panics on damage caught,
//! a read-only pass that checks the key and every record, then the records loaded.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, DatabaseError, ReadOnlyDatabase, ReadableDatabase, ReadableTable};
use ring::aead::LessSafeKey;

use super::*;

/// redb checks its own invariants with assertions that may panic on a damaged file; a damaged file
/// must be an error, not a crash.
pub(super) fn guarded<T>(f: impl FnOnce() -> Result<T, DatabaseError>) -> Result<T, DatabaseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(DatabaseError::Storage(redb::StorageError::Corrupted(
            "the file's structure is damaged".into(),
        )))
    })
}

pub(super) fn open_read_only(path: &Path) -> Result<ReadOnlyDatabase, DatabaseError> {
    guarded(|| ReadOnlyDatabase::open(path))
}

pub(super) fn classify(e: DatabaseError, path: &Path) -> StoreError {
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
pub(super) struct Verified {
    /// Every record's (credential, connection id).
    pub(super) ids: Vec<(String, String)>,
    /// The file has the connection-id marker.
    pub(super) namespaced: bool,
}

/// Whether the meta table holds the connection-id marker; an altered one is corruption.
pub(super) fn read_marker(
    meta: &redb::ReadOnlyTable<&str, &[u8]>,
    cipher: &LessSafeKey,
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
pub(super) fn verify(
    db: &impl ReadableDatabase,
    cipher: &LessSafeKey,
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

pub(super) fn verify_copy(path: &Path, cipher: &LessSafeKey) -> Result<Verified, StoreError> {
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
pub(super) type Loaded = (BTreeMap<(String, String), ConnectionRecord>, bool);

pub(super) fn load(db: &Database, cipher: &LessSafeKey, path: &Path) -> Result<Loaded, StoreError> {
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
