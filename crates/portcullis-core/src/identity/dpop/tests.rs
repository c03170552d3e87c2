use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use super::*;

const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";
const NOW: u64 = 1_800_000_000;

struct Key {
    pair: EcdsaKeyPair,
    jwk: Value,
}

fn key() -> Key {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let jwk = json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    Key { pair, jwk }
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn claims() -> Value {
    json!({
        "jti": "e1j3V_bKic8-LAEB",
        "htm": "GET",
        "htu": "https://api.example.com/orders/1",
        "iat": NOW,
        "ath": URL_SAFE_NO_PAD.encode(crate::digest::Sha256::digest(TOKEN)),
    })
}

fn sign(k: &Key, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = k.pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn header(k: &Key) -> Value {
    json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": k.jwk})
}

fn expected() -> Expected<'static> {
    Expected {
        method: "GET",
        scheme: "https",
        host: "api.example.com",
        path: "/orders/1?page=2",
        token: TOKEN,
    }
}

fn check(proof: &str) -> Result<Proof, String> {
    check_with(proof, &expected())
}

fn check_with(proof: &str, e: &Expected<'_>) -> Result<Proof, String> {
    check_proof(
        proof,
        e,
        &DpopPolicy::default(),
        Duration::from_secs(5),
        now(),
    )
}

fn with(claim: &str, v: Value) -> Value {
    let mut c = claims();
    c[claim] = v;
    c
}

fn without(claim: &str) -> Value {
    let mut c = claims();
    c.as_object_mut().unwrap().remove(claim);
    c
}

#[test]
fn a_valid_proof_passes_with_its_keys_thumbprint() {
    let k = key();
    let p = check(&sign(&k, &header(&k), &claims())).unwrap();
    assert_eq!(p.alg, Algorithm::ES256);
    assert_eq!(
        p.thumbprint,
        thumbprint(k.jwk.as_object().unwrap()).unwrap()
    );
}

#[test]
fn thumbprint_is_rfc_7638() {
    // RFC 9449 section 6.1's example key and its `cnf.jkt`.
    let jwk = json!({
        "kty": "EC",
        "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
        "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
        "crv": "P-256"
    });
    assert_eq!(
        thumbprint(jwk.as_object().unwrap()).unwrap(),
        "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    );
}

#[test]
fn the_header_must_be_a_dpop_proof_with_a_public_key() {
    let k = key();
    let mut h = header(&k);
    h["typ"] = json!("JWT");
    assert!(check(&sign(&k, &h, &claims())).unwrap_err().contains("typ"));
    let mut h = header(&k);
    h.as_object_mut().unwrap().remove("jwk");
    assert!(check(&sign(&k, &h, &claims())).unwrap_err().contains("jwk"));
    let mut h = header(&k);
    h["jwk"]["d"] = json!("c2VjcmV0");
    assert!(
        check(&sign(&k, &h, &claims()))
            .unwrap_err()
            .contains("private")
    );
    let mut h = header(&k);
    h["alg"] = json!("HS256");
    assert!(
        check(&sign(&k, &h, &claims()))
            .unwrap_err()
            .contains("HS256")
    );
    let mut h = header(&k);
    h["alg"] = json!("none");
    assert!(
        check(&sign(&k, &h, &claims()))
            .unwrap_err()
            .contains("none")
    );
    let mut h = header(&k);
    h["crit"] = json!(["x"]);
    assert!(
        check(&sign(&k, &h, &claims()))
            .unwrap_err()
            .contains("crit")
    );
}

#[test]
fn an_algorithm_outside_the_allow_list_is_refused() {
    let k = key();
    let policy = DpopPolicy {
        algorithms: vec![Algorithm::EdDSA],
        ..DpopPolicy::default()
    };
    let e = check_proof(
        &sign(&k, &header(&k), &claims()),
        &expected(),
        &policy,
        Duration::ZERO,
        now(),
    )
    .unwrap_err();
    assert!(e.contains("ES256"), "{e}");
}

#[test]
fn the_signature_must_be_the_jwks() {
    let (k, other) = (key(), key());
    let e = check(&sign(&other, &header(&k), &claims())).unwrap_err();
    assert!(e.contains("signature"), "{e}");
}

#[test]
fn htm_must_be_the_method() {
    let k = key();
    let e = check(&sign(&k, &header(&k), &with("htm", json!("POST")))).unwrap_err();
    assert!(e.contains("htm"), "{e}");
    let e = check(&sign(&k, &header(&k), &with("htm", json!("get")))).unwrap_err();
    assert!(e.contains("htm"), "{e}");
}

#[test]
fn htu_must_be_the_url_without_query() {
    let k = key();
    for bad in [
        "https://other.example.com/orders/1",
        "https://api.example.com/orders/2",
        "http://api.example.com/orders/1",
        "https://api.example.com:8443/orders/1",
        "https://user@api.example.com/orders/1",
        "ftp://api.example.com/orders/1",
        "/orders/1",
    ] {
        let e = check(&sign(&k, &header(&k), &with("htu", json!(bad)))).unwrap_err();
        assert!(e.contains("htu"), "{bad}: {e}");
    }
    for good in [
        "https://api.example.com/orders/1",
        "https://API.example.com:443/orders/1",
        "https://api.example.com/orders/1?other=query",
        "https://api.example.com/orders/1#fragment",
    ] {
        check(&sign(&k, &header(&k), &with("htu", json!(good)))).expect(good);
    }
    // Scheme unknown: https is assumed.
    let e = Expected {
        scheme: "",
        ..expected()
    };
    check_with(&sign(&k, &header(&k), &claims()), &e).unwrap();
    let e = Expected {
        scheme: "http",
        ..expected()
    };
    assert!(check_with(&sign(&k, &header(&k), &claims()), &e).is_err());
}

#[test]
fn iat_must_be_within_the_window() {
    let k = key();
    let iat = |d: i64| with("iat", json!(NOW as i64 + d));
    assert!(
        check(&sign(&k, &header(&k), &iat(-306)))
            .unwrap_err()
            .contains("ago")
    );
    check(&sign(&k, &header(&k), &iat(-304))).unwrap();
    assert!(
        check(&sign(&k, &header(&k), &iat(6)))
            .unwrap_err()
            .contains("future")
    );
    check(&sign(&k, &header(&k), &iat(4))).unwrap();
    assert!(check(&sign(&k, &header(&k), &with("iat", json!("now")))).is_err());
    assert!(check(&sign(&k, &header(&k), &without("iat"))).is_err());
}

#[test]
fn ath_must_hash_the_token() {
    let k = key();
    let e = check(&sign(&k, &header(&k), &without("ath"))).unwrap_err();
    assert!(e.contains("ath"), "{e}");
    let other = URL_SAFE_NO_PAD.encode(crate::digest::Sha256::digest("another token"));
    let e = check(&sign(&k, &header(&k), &with("ath", json!(other)))).unwrap_err();
    assert!(e.contains("ath"), "{e}");
}

#[test]
fn jti_is_required_and_bounded() {
    let k = key();
    assert!(check(&sign(&k, &header(&k), &without("jti"))).is_err());
    assert!(check(&sign(&k, &header(&k), &with("jti", json!("")))).is_err());
    assert!(check(&sign(&k, &header(&k), &with("jti", json!("x".repeat(257))))).is_err());
}

#[test]
fn an_oversized_proof_is_refused_before_parsing() {
    let e = check(&"a".repeat(MAX_PROOF_BYTES + 1)).unwrap_err();
    assert!(e.contains("bytes"), "{e}");
}

#[test]
fn the_replay_cache_refuses_a_second_use_within_the_window() {
    let cache = ReplayCache::new();
    let t = Instant::now();
    let ttl = Duration::from_secs(300);
    assert_eq!(cache.first_use([1; 32], ttl, t), Seen::First);
    assert_eq!(cache.first_use([2; 32], ttl, t), Seen::First);
    assert_eq!(
        cache.first_use([1; 32], ttl, t + Duration::from_secs(299)),
        Seen::Replayed
    );
    // After the window the proof's `iat` is too old anyway; the entry is gone.
    assert_eq!(
        cache.first_use([1; 32], ttl, t + Duration::from_secs(301)),
        Seen::First
    );
}

#[test]
fn the_replay_key_depends_on_key_and_jti() {
    let (k, k2) = (key(), key());
    let a = check(&sign(&k, &header(&k), &claims())).unwrap();
    let b = check(&sign(&k, &header(&k), &claims())).unwrap();
    let c = check(&sign(&k, &header(&k), &with("jti", json!("other")))).unwrap();
    let d = check(&sign(&k2, &header(&k2), &claims())).unwrap();
    assert_eq!(a.replay_key, b.replay_key);
    assert_ne!(a.replay_key, c.replay_key);
    assert_ne!(a.replay_key, d.replay_key);
}

#[test]
fn a_forgotten_proof_may_be_used_again() {
    let cache = ReplayCache::new();
    let t = Instant::now();
    let ttl = Duration::from_secs(300);
    assert_eq!(cache.first_use([3; 32], ttl, t), Seen::First);
    cache.forget(&[3; 32]);
    assert_eq!(cache.first_use([3; 32], ttl, t), Seen::First);
    assert_eq!(cache.first_use([3; 32], ttl, t), Seen::Replayed);
}
