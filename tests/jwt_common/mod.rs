//! Test keys and token minting for the JWT tests and benches. Every key is generated when the test
//! runs (RSA with the `rsa` crate, the rest with `ring`); nothing here is a pasted key.
//! Depends only on ring, rsa, base64 and serde_json so unit tests can include it too.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

/// base64url without padding.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

enum Signer {
    Rsa(RsaKeyPair),
    P256(EcdsaKeyPair),
    P384(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Hmac(Vec<u8>),
}

/// A signing key with its public JWK.
pub struct TestKey {
    pub kid: Option<String>,
    /// Default algorithm of tokens it signs.
    pub alg: &'static str,
    signer: Signer,
    /// The public JWK (for HMAC: the secret as `k`).
    pub jwk: Value,
    /// RSA only: the public key as SPKI PEM, SPKI DER and PKCS#1 DER (for confusion attacks).
    pub public_pem: Option<String>,
    pub public_der: Option<Vec<u8>>,
    pub public_pkcs1_der: Option<Vec<u8>>,
}

struct RsaMaterial {
    pkcs8: Vec<u8>,
    n: Vec<u8>,
    e: Vec<u8>,
    pem: String,
    der: Vec<u8>,
    pkcs1: Vec<u8>,
}

/// RSA generation takes a while; tests share a few keys per process.
fn rsa_material(slot: usize) -> &'static RsaMaterial {
    static SLOTS: [OnceLock<RsaMaterial>; 4] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    SLOTS[slot].get_or_init(|| {
        let mut rng = rsa::rand_core::OsRng;
        let private = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let public = private.to_public_key();
        RsaMaterial {
            pkcs8: private.to_pkcs8_der().unwrap().as_bytes().to_vec(),
            n: public.n().to_bytes_be(),
            e: public.e().to_bytes_be(),
            pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
            der: public.to_public_key_der().unwrap().as_bytes().to_vec(),
            pkcs1: public.to_pkcs1_der().unwrap().as_bytes().to_vec(),
        }
    })
}

/// An RSA 2048 key; `slot` 0..4 picks one of the process's shared keys.
pub fn rsa(slot: usize, kid: Option<&str>) -> TestKey {
    let m = rsa_material(slot);
    let mut jwk = json!({"kty": "RSA", "n": b64(&m.n), "e": b64(&m.e), "use": "sig"});
    if let Some(k) = kid {
        jwk["kid"] = k.into();
    }
    TestKey {
        kid: kid.map(str::to_string),
        alg: "RS256",
        signer: Signer::Rsa(RsaKeyPair::from_pkcs8(&m.pkcs8).unwrap()),
        jwk,
        public_pem: Some(m.pem.clone()),
        public_der: Some(m.der.clone()),
        public_pkcs1_der: Some(m.pkcs1.clone()),
    }
}

fn ec(kid: Option<&str>, p384: bool) -> TestKey {
    let rng = SystemRandom::new();
    let (alg, crv, size) = if p384 {
        (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
    } else {
        (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
    };
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let mut jwk = json!({"kty": "EC", "crv": crv, "x": b64(&point[1..1 + size]), "y": b64(&point[1 + size..])});
    if let Some(k) = kid {
        jwk["kid"] = k.into();
    }
    TestKey {
        kid: kid.map(str::to_string),
        alg: if p384 { "ES384" } else { "ES256" },
        signer: if p384 {
            Signer::P384(pair)
        } else {
            Signer::P256(pair)
        },
        jwk,
        public_pem: None,
        public_der: None,
        public_pkcs1_der: None,
    }
}

/// An EC P-256 key.
pub fn p256(kid: Option<&str>) -> TestKey {
    ec(kid, false)
}

/// An EC P-384 key.
pub fn p384(kid: Option<&str>) -> TestKey {
    ec(kid, true)
}

/// An Ed25519 key.
pub fn ed25519(kid: Option<&str>) -> TestKey {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let mut jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())});
    if let Some(k) = kid {
        jwk["kid"] = k.into();
    }
    TestKey {
        kid: kid.map(str::to_string),
        alg: "EdDSA",
        signer: Signer::Ed25519(pair),
        jwk,
        public_pem: None,
        public_der: None,
        public_pkcs1_der: None,
    }
}

/// An HMAC secret of `len` random bytes.
pub fn hmac(kid: Option<&str>, len: usize) -> TestKey {
    let mut secret = vec![0u8; len];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut secret).unwrap();
    hmac_with(kid, secret)
}

/// An HMAC key with the given secret bytes (for confusion attacks: a public key as the secret).
pub fn hmac_with(kid: Option<&str>, secret: Vec<u8>) -> TestKey {
    let mut jwk = json!({"kty": "oct", "k": b64(&secret)});
    if let Some(k) = kid {
        jwk["kid"] = k.into();
    }
    TestKey {
        kid: kid.map(str::to_string),
        alg: "HS256",
        signer: Signer::Hmac(secret),
        jwk,
        public_pem: None,
        public_der: None,
        public_pkcs1_der: None,
    }
}

impl TestKey {
    /// The secret (HMAC keys only), base64url.
    pub fn secret_b64(&self) -> String {
        match &self.signer {
            Signer::Hmac(s) => b64(s),
            _ => panic!("not an HMAC key"),
        }
    }

    /// Signs `signing_input` with `alg`.
    pub fn sign_bytes(&self, alg: &str, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Rsa(pair) => {
                let padding: &dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    other => panic!("RSA cannot sign {other}"),
                };
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, input, &mut sig).unwrap();
                sig
            }
            Signer::P256(pair) | Signer::P384(pair) => {
                pair.sign(&rng, input).unwrap().as_ref().to_vec()
            }
            Signer::Ed25519(pair) => pair.sign(input).as_ref().to_vec(),
            Signer::Hmac(secret) => {
                let a = match alg {
                    "HS256" => ring::hmac::HMAC_SHA256,
                    "HS384" => ring::hmac::HMAC_SHA384,
                    "HS512" => ring::hmac::HMAC_SHA512,
                    other => panic!("HMAC cannot sign {other}"),
                };
                ring::hmac::sign(&ring::hmac::Key::new(a, secret), input)
                    .as_ref()
                    .to_vec()
            }
        }
    }

    /// A token with this header and these claims, signed with the header's `alg`. `alg` and `kid`
    /// are filled in from the key when the header lacks them.
    pub fn sign(&self, mut header: Value, claims: Value) -> String {
        if header.get("alg").is_none() {
            header["alg"] = self.alg.into();
        }
        if header.get("kid").is_none()
            && let Some(k) = &self.kid
        {
            header["kid"] = k.as_str().into();
        }
        let alg = header["alg"].as_str().unwrap().to_string();
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let sig = self.sign_bytes(&alg, input.as_bytes());
        format!("{input}.{}", b64(sig))
    }

    /// A token with the default header and these claims.
    pub fn token(&self, claims: Value) -> String {
        self.sign(json!({"typ": "JWT"}), claims)
    }
}

/// A JWKS document of these keys' public JWKs.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// Claims valid for an hour from now.
pub fn claims(iss: &str, aud: &str, sub: &str) -> Value {
    let t = now();
    json!({"iss": iss, "aud": aud, "sub": sub, "iat": t, "nbf": t - 5, "exp": t + 3600})
}

/// Signs raw header and payload JSON text (for duplicate keys and other malformed JSON).
pub fn sign_raw(key: &TestKey, alg: &str, header_json: &str, payload_json: &str) -> String {
    let input = format!("{}.{}", b64(header_json), b64(payload_json));
    let sig = key.sign_bytes(alg, input.as_bytes());
    format!("{input}.{}", b64(sig))
}
