//! Signature verification and JWK parsing with keys generated here (RSA, P-256, P-384, Ed25519, HMAC).

#[path = "../../../../tests/jwt_common/mod.rs"]
mod keys;

use serde_json::json;

use super::jose::{self, Algorithm};
use super::jwk::{self, JwkError, JwksError, VerifyingKey};

fn verifies(signer: &keys::TestKey, jwk: &serde_json::Value, alg: &str) -> bool {
    let token = signer.sign(json!({"alg": alg}), json!({"sub": "a"}));
    let parsed = jose::parse(&token).unwrap();
    let key = VerifyingKey::from_jwk(jwk, true).unwrap();
    key.verify(
        Algorithm::parse(alg).unwrap(),
        parsed.signing_input,
        &parsed.signature,
    )
}

#[test]
fn every_supported_algorithm_verifies_with_its_own_key_only() {
    let rsa = keys::rsa(0, Some("r"));
    let rsa_other = keys::rsa(1, Some("r2"));
    let p256 = keys::p256(Some("e"));
    let p384 = keys::p384(Some("e3"));
    let ed = keys::ed25519(Some("o"));
    let hs = keys::hmac(Some("h"), 64);
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        assert!(verifies(&rsa, &rsa.jwk, alg), "{alg}");
        assert!(
            !verifies(&rsa, &rsa_other.jwk, alg),
            "{alg} with another key"
        );
    }
    assert!(verifies(&p256, &p256.jwk, "ES256"));
    assert!(!verifies(&p256, &keys::p256(None).jwk, "ES256"));
    assert!(verifies(&p384, &p384.jwk, "ES384"));
    assert!(verifies(&ed, &ed.jwk, "EdDSA"));
    assert!(!verifies(&ed, &keys::ed25519(None).jwk, "EdDSA"));
    for alg in ["HS256", "HS384", "HS512"] {
        assert!(verifies(&hs, &hs.jwk, alg), "{alg}");
        assert!(
            !verifies(&hs, &keys::hmac(None, 64).jwk, alg),
            "{alg} with another secret"
        );
    }
}

#[test]
fn a_key_verifies_only_the_algorithms_of_its_kind() {
    let rsa = keys::rsa(0, None);
    let key = VerifyingKey::from_jwk(&rsa.jwk, false).unwrap();
    for alg in [Algorithm::HS256, Algorithm::ES256, Algorithm::EdDSA] {
        assert!(!key.usable_for(alg), "{alg}");
    }
    // An RSA public key's bytes as an HMAC secret: the key refuses HS256 whatever the signature.
    let pem = rsa.public_pem.clone().unwrap();
    let forged =
        keys::hmac_with(None, pem.into_bytes()).sign(json!({"alg": "HS256"}), json!({"sub": "a"}));
    let parsed = jose::parse(&forged).unwrap();
    assert!(!key.verify(Algorithm::HS256, parsed.signing_input, &parsed.signature));

    // A JWK's own `alg` pins it: an RS256 key does not verify PS256.
    let mut pinned = rsa.jwk.clone();
    pinned["alg"] = "RS256".into();
    let pinned = VerifyingKey::from_jwk(&pinned, false).unwrap();
    assert!(pinned.usable_for(Algorithm::RS256));
    assert!(!pinned.usable_for(Algorithm::PS256));

    // HMAC secrets must be at least as long as the hash.
    let short = VerifyingKey::from_jwk(&keys::hmac(None, 32).jwk, true).unwrap();
    assert!(short.usable_for(Algorithm::HS256));
    assert!(!short.usable_for(Algorithm::HS384));
    assert!(!short.usable_for(Algorithm::HS512));
}

#[test]
fn truncated_and_empty_signatures_fail() {
    let rsa = keys::rsa(0, None);
    let key = VerifyingKey::from_jwk(&rsa.jwk, false).unwrap();
    let token = rsa.token(json!({"sub": "a"}));
    let parsed = jose::parse(&token).unwrap();
    assert!(key.verify(Algorithm::RS256, parsed.signing_input, &parsed.signature));
    assert!(!key.verify(
        Algorithm::RS256,
        parsed.signing_input,
        &parsed.signature[..255]
    ));
    assert!(!key.verify(Algorithm::RS256, parsed.signing_input, &[]));
}

#[test]
fn jwk_parsing_refuses_what_cannot_be_used() {
    let rsa = keys::rsa(0, Some("a"));
    let err = |v: serde_json::Value, secret: bool| VerifyingKey::from_jwk(&v, secret).unwrap_err();
    let mut enc = rsa.jwk.clone();
    enc["use"] = "enc".into();
    assert_eq!(err(enc, false), JwkError::NotForSigning);
    let mut ops = rsa.jwk.clone();
    ops["key_ops"] = json!(["encrypt"]);
    assert_eq!(err(ops, false), JwkError::NotForSigning);
    let mut mismatch = rsa.jwk.clone();
    mismatch["alg"] = "ES256".into();
    assert_eq!(
        err(mismatch, false),
        JwkError::AlgorithmMismatch(Algorithm::ES256)
    );
    let mut oaep = rsa.jwk.clone();
    oaep["alg"] = "RSA-OAEP".into();
    assert_eq!(err(oaep, false), JwkError::Algorithm("RSA-OAEP".into()));
    let small = json!({"kty": "RSA", "n": keys::b64([0xc1u8; 128]), "e": "AQAB"});
    assert_eq!(err(small, false), JwkError::RsaSize(1024));
    let even_e = json!({"kty": "RSA", "n": rsa.jwk["n"], "e": keys::b64([2u8])});
    assert_eq!(err(even_e, false), JwkError::RsaExponent);
    assert_eq!(
        err(keys::hmac(None, 32).jwk, false),
        JwkError::SecretNotAllowed
    );
    assert_eq!(
        err(keys::hmac(None, 16).jwk, true),
        JwkError::SecretTooShort(16)
    );
    assert_eq!(
        err(
            json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
            false
        ),
        JwkError::Curve("P-521".into())
    );
    assert_eq!(
        err(
            json!({"kty": "EC", "crv": "P-256", "x": keys::b64([1u8; 33]), "y": keys::b64([1u8; 32])}),
            false
        ),
        JwkError::Length("x")
    );
    assert_eq!(
        err(json!({"kty": "OKP", "crv": "X25519", "x": "AA"}), false),
        JwkError::Curve("X25519".into())
    );
    assert_eq!(
        err(json!({"kty": "RSA", "e": "AQAB"}), false),
        JwkError::Missing("n")
    );
    assert_eq!(
        err(json!({"kty": "RSA", "n": "!!", "e": "AQAB"}), false),
        JwkError::Base64("n")
    );
    assert_eq!(
        err(json!({"kty": "dsa"}), false),
        JwkError::KeyType("dsa".into())
    );
}

#[test]
fn fingerprints_tell_keys_apart() {
    let a = VerifyingKey::from_jwk(&keys::rsa(0, Some("a")).jwk, false).unwrap();
    let a2 = VerifyingKey::from_jwk(&keys::rsa(0, Some("a")).jwk, false).unwrap();
    let b = VerifyingKey::from_jwk(&keys::rsa(0, Some("b")).jwk, false).unwrap();
    let c = VerifyingKey::from_jwk(&keys::rsa(1, Some("a")).jwk, false).unwrap();
    assert_eq!(a.fingerprint, a2.fingerprint);
    assert_ne!(a.fingerprint, b.fingerprint, "same material, other kid");
    assert_ne!(a.fingerprint, c.fingerprint, "same kid, other material");
    assert!(
        !format!(
            "{:?}",
            VerifyingKey::from_jwk(&keys::hmac(Some("h"), 32).jwk, true).unwrap()
        )
        .contains("k:")
    );
}

#[test]
fn jwks_documents_skip_unusable_keys_and_refuse_bad_shapes() {
    let rsa = keys::rsa(0, Some("sig"));
    let mut enc = keys::rsa(1, Some("enc")).jwk;
    enc["use"] = "enc".into();
    let doc = json!({"keys": [rsa.jwk, enc, keys::hmac(Some("h"), 32).jwk, {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}]});
    let parsed = jwk::parse_jwks(doc.to_string().as_bytes()).unwrap();
    assert_eq!(parsed.keys.len(), 1);
    assert_eq!(parsed.keys[0].kid.as_deref(), Some("sig"));
    assert_eq!(parsed.skipped.len(), 3);

    assert!(matches!(jwk::parse_jwks(b"[]"), Err(JwksError::Shape(_))));
    assert!(matches!(
        jwk::parse_jwks(b"{\"keys\": 1}"),
        Err(JwksError::Shape(_))
    ));
    assert!(matches!(
        jwk::parse_jwks(b"<html>"),
        Err(JwksError::Shape(_))
    ));
    assert_eq!(
        jwk::parse_jwks(b"{\"keys\": []}").unwrap_err(),
        JwksError::NoUsableKey(0)
    );
    let many = json!({"keys": vec![json!({"kty": "oct"}); jwk::MAX_KEYS + 1]});
    assert_eq!(
        jwk::parse_jwks(many.to_string().as_bytes()).unwrap_err(),
        JwksError::TooMany(jwk::MAX_KEYS + 1)
    );
}

/// The JWS shape test decides between signature verification and introspection: every byte value in
/// every segment, and every dot count, against the plain definition.
#[test]
fn jws_compact_shape_is_exactly_three_base64url_segments() {
    fn plain(token: &str) -> bool {
        let b64 = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let parts: Vec<&str> = token.split('.').collect();
        parts.len() == 3
            && !parts[0].is_empty()
            && !parts[1].is_empty()
            && parts.iter().all(|p| b64(p))
    }
    let is = super::introspection::is_jws_compact;
    for c in (0..=0x7f_u8)
        .map(char::from)
        .chain(['é', 'Ａ', '\u{0}', '\u{7f}'])
    {
        for at in 0..3 {
            let mut parts = [
                "eyJhbGciOi".to_string(),
                "eyJzdWIiOi".to_string(),
                "c2ln".to_string(),
            ];
            parts[at].insert(3, c);
            let token = parts.join(".");
            assert_eq!(is(&token), plain(&token), "{token:?}");
        }
    }
    for token in [
        "a.b.c", "a.b.", ".b.c", "a..c", "a.b", "a.b.c.d", "", "..", "a.b.c.",
    ] {
        assert_eq!(is(token), plain(token), "{token:?}");
    }
    assert!(
        is("a.b."),
        "an empty signature still goes to the signature check"
    );
    assert!(!is("a.b.c.d"));
}
