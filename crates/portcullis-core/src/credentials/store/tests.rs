use super::*;
use redb::ReadableDatabase;

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

/// Sealed values are AES-256-GCM as the `aes-gcm` crate wrote them before the store moved to ring:
/// version byte, 96-bit nonce, ciphertext and tag. Both implementations read each other's values.
#[test]
fn values_sealed_by_the_previous_implementation_still_open() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let dir = tempfile::tempdir().unwrap();
    let key = [7u8; 32];
    let s = Store::open(&dir.path().join("s.db"), &key).unwrap();
    let old = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
    let nonce = [3u8; NONCE_LEN];
    let payload = Payload {
        msg: b"refresh token record",
        aad: b"connections\0crm\0default",
    };
    let ct = old.encrypt(&aes_gcm::Nonce::from(nonce), payload).unwrap();
    let mut sealed = vec![SEAL_VERSION];
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ct);
    assert_eq!(
        open_sealed(&s.cipher, b"connections\0crm\0default", &sealed).as_deref(),
        Some(&b"refresh token record"[..])
    );
    let new = s.seal(b"meta\0key_check", b"portcullis store v1").unwrap();
    let (n, rest) = new[1..].split_at(NONCE_LEN);
    let back = old
        .decrypt(
            &aes_gcm::Nonce::from(<[u8; NONCE_LEN]>::try_from(n).unwrap()),
            Payload {
                msg: rest,
                aad: b"meta\0key_check",
            },
        )
        .unwrap();
    assert_eq!(back, b"portcullis store v1");
}
