//! JSON Web Keys (RFC 7517/7518): parsing keys once, when they arrive, into the form `ring` verifies
//! with, and the signature check itself.
//!
//! A key is tied to its kind: an RSA key only verifies RS*/PS*, an EC key only the ES algorithm of its
//! curve, an `oct` secret only HS*. That is what makes the classic confusion attack (an RSA public key
//! used as an HMAC secret) impossible here: there is no code path that reads a public key as bytes of
//! a secret. Shared secrets are accepted only from the configuration, never from a JWKS document.

use std::fmt;

use crate::digest::Sha256;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{hmac, signature};
use serde_json::Value;

use super::jose::{Algorithm, KeyKind};

/// Most keys one JWKS document may carry; more is refused as a whole (real providers publish a few).
pub const MAX_KEYS: usize = 100;

/// A key that verifies signatures.
pub struct VerifyingKey {
    /// `kid`, matched against the token header's `kid`.
    pub kid: Option<String>,
    /// The JWK's `alg`: when present, the only algorithm this key verifies.
    pub alg: Option<Algorithm>,
    material: Material,
    /// SHA-256 over the key's kind, `kid`, `alg` and material: identifies this exact key.
    pub fingerprint: [u8; 32],
}

enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point `0x04 || x || y`.
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
    Hmac(Vec<u8>),
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the material: for `oct` keys it is a secret.
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind())
            .field("alg", &self.alg)
            .finish()
    }
}

/// Why a JWK was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    /// Not a JSON object.
    #[error("a JWK is a JSON object")]
    NotAnObject,
    /// A required member is absent or not a string.
    #[error("`{0}` is missing or not a string")]
    Missing(&'static str),
    /// A member is not base64url.
    #[error("`{0}` is not base64url")]
    Base64(&'static str),
    /// `kty` names a key type we do not verify with.
    #[error("key type `{0}` is not supported (RSA, EC, OKP, oct are)")]
    KeyType(String),
    /// `crv` names a curve we do not verify with.
    #[error("curve `{0}` is not supported (P-256, P-384, Ed25519 are)")]
    Curve(String),
    /// `alg` is not a signature algorithm we support.
    #[error("`alg: {0}` is not a supported signature algorithm")]
    Algorithm(String),
    /// `alg` does not fit the key type.
    #[error("`alg: {0}` does not fit this key type")]
    AlgorithmMismatch(Algorithm),
    /// `use` or `key_ops` exclude signature verification.
    #[error("the key is not for signature verification (`use`/`key_ops`)")]
    NotForSigning,
    /// An RSA modulus outside 2048..=8192 bits.
    #[error("an RSA key of {0} bits: 2048 to 8192 bits are accepted")]
    RsaSize(usize),
    /// An RSA exponent that is not odd, not at least 3 or longer than 33 bits.
    #[error("the RSA exponent is not usable")]
    RsaExponent,
    /// A coordinate or key of the wrong length.
    #[error("`{0}` has the wrong length for this curve")]
    Length(&'static str),
    /// A shared secret shorter than 256 bits.
    #[error("an HMAC secret must be at least 32 bytes, this one has {0}")]
    SecretTooShort(usize),
    /// A shared secret in a JWKS document.
    #[error("shared secrets (`kty: oct`) are only accepted from the configuration")]
    SecretNotAllowed,
}

impl VerifyingKey {
    /// Parses one JWK. `allow_secret`: whether `kty: oct` is acceptable (configuration only).
    pub fn from_jwk(v: &Value, allow_secret: bool) -> Result<VerifyingKey, JwkError> {
        let obj = v.as_object().ok_or(JwkError::NotAnObject)?;
        let text = |name: &'static str| {
            obj.get(name)
                .and_then(Value::as_str)
                .ok_or(JwkError::Missing(name))
        };
        let bytes = |name: &'static str| -> Result<Vec<u8>, JwkError> {
            let s = text(name)?;
            // Some publishers pad; the key's value is the same either way.
            URL_SAFE_NO_PAD
                .decode(s.trim_end_matches('='))
                .map_err(|_| JwkError::Base64(name))
        };
        if let Some(u) = obj.get("use")
            && u.as_str() != Some("sig")
        {
            return Err(JwkError::NotForSigning);
        }
        if let Some(ops) = obj.get("key_ops") {
            let verifies = ops
                .as_array()
                .is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")));
            if !verifies {
                return Err(JwkError::NotForSigning);
            }
        }
        let alg = match obj.get("alg") {
            None => None,
            Some(Value::String(a)) => {
                Some(Algorithm::parse(a).ok_or_else(|| JwkError::Algorithm(a.clone()))?)
            }
            Some(_) => return Err(JwkError::Missing("alg")),
        };
        let kid = match obj.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(JwkError::Missing("kid")),
        };
        let kty = text("kty")?;
        let material = match kty {
            "RSA" => {
                let n = strip_leading_zeros(bytes("n")?);
                let e = strip_leading_zeros(bytes("e")?);
                let bits = bit_len(&n);
                if !(2048..=8192).contains(&bits) {
                    return Err(JwkError::RsaSize(bits));
                }
                if e.is_empty()
                    || e.len() > 5
                    || e.last().is_some_and(|b| b & 1 == 0)
                    || (e.len() == 1 && e[0] < 3)
                {
                    return Err(JwkError::RsaExponent);
                }
                Material::Rsa { n, e }
            }
            "EC" => {
                let crv = text("crv")?;
                let size = match crv {
                    "P-256" => 32,
                    "P-384" => 48,
                    other => return Err(JwkError::Curve(other.to_string())),
                };
                let mut point = Vec::with_capacity(1 + 2 * size);
                point.push(0x04);
                point.extend(left_pad(bytes("x")?, size).ok_or(JwkError::Length("x"))?);
                point.extend(left_pad(bytes("y")?, size).ok_or(JwkError::Length("y"))?);
                if size == 32 {
                    Material::P256(point)
                } else {
                    Material::P384(point)
                }
            }
            "OKP" => match text("crv")? {
                "Ed25519" => {
                    let x = bytes("x")?;
                    if x.len() != 32 {
                        return Err(JwkError::Length("x"));
                    }
                    Material::Ed25519(x)
                }
                other => return Err(JwkError::Curve(other.to_string())),
            },
            "oct" => {
                if !allow_secret {
                    return Err(JwkError::SecretNotAllowed);
                }
                let k = bytes("k")?;
                if k.len() < 32 {
                    return Err(JwkError::SecretTooShort(k.len()));
                }
                Material::Hmac(k)
            }
            other => return Err(JwkError::KeyType(other.to_string())),
        };
        let mut key = VerifyingKey {
            kid,
            alg,
            material,
            fingerprint: [0; 32],
        };
        if let Some(a) = alg
            && a.key_kind() != key.kind()
        {
            return Err(JwkError::AlgorithmMismatch(a));
        }
        key.fingerprint = key.compute_fingerprint();
        Ok(key)
    }

    /// The key's kind.
    pub fn kind(&self) -> KeyKind {
        match self.material {
            Material::Rsa { .. } => KeyKind::Rsa,
            Material::P256(_) => KeyKind::P256,
            Material::P384(_) => KeyKind::P384,
            Material::Ed25519(_) => KeyKind::Ed25519,
            Material::Hmac(_) => KeyKind::Hmac,
        }
    }

    /// Whether this key may verify a token signed with `alg`: the kinds agree, the JWK's own `alg`
    /// (if any) is `alg`, and an HMAC secret is at least as long as the hash output (RFC 7518 3.2).
    pub fn usable_for(&self, alg: Algorithm) -> bool {
        if alg.key_kind() != self.kind() || self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        match (&self.material, alg) {
            (Material::Hmac(k), Algorithm::HS384) => k.len() >= 48,
            (Material::Hmac(k), Algorithm::HS512) => k.len() >= 64,
            _ => true,
        }
    }

    /// Verifies `signature` over `message`. False for any mismatch of key and algorithm.
    pub fn verify(&self, alg: Algorithm, message: &[u8], sig: &[u8]) -> bool {
        if !self.usable_for(alg) {
            return false;
        }
        let rsa = |params: &'static signature::RsaParameters, n: &Vec<u8>, e: &Vec<u8>| {
            signature::RsaPublicKeyComponents { n, e }
                .verify(params, message, sig)
                .is_ok()
        };
        match (&self.material, alg) {
            (Material::Rsa { n, e }, Algorithm::RS256) => {
                rsa(&signature::RSA_PKCS1_2048_8192_SHA256, n, e)
            }
            (Material::Rsa { n, e }, Algorithm::RS384) => {
                rsa(&signature::RSA_PKCS1_2048_8192_SHA384, n, e)
            }
            (Material::Rsa { n, e }, Algorithm::RS512) => {
                rsa(&signature::RSA_PKCS1_2048_8192_SHA512, n, e)
            }
            (Material::Rsa { n, e }, Algorithm::PS256) => {
                rsa(&signature::RSA_PSS_2048_8192_SHA256, n, e)
            }
            (Material::Rsa { n, e }, Algorithm::PS384) => {
                rsa(&signature::RSA_PSS_2048_8192_SHA384, n, e)
            }
            (Material::Rsa { n, e }, Algorithm::PS512) => {
                rsa(&signature::RSA_PSS_2048_8192_SHA512, n, e)
            }
            (Material::P256(p), Algorithm::ES256) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p)
                    .verify(message, sig)
                    .is_ok()
            }
            (Material::P384(p), Algorithm::ES384) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, p)
                    .verify(message, sig)
                    .is_ok()
            }
            (Material::Ed25519(x), Algorithm::EdDSA) => {
                signature::UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(message, sig)
                    .is_ok()
            }
            (Material::Hmac(k), Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => {
                let algorithm = match alg {
                    Algorithm::HS256 => hmac::HMAC_SHA256,
                    Algorithm::HS384 => hmac::HMAC_SHA384,
                    _ => hmac::HMAC_SHA512,
                };
                // Constant-time comparison inside ring.
                hmac::verify(&hmac::Key::new(algorithm, k), message, sig).is_ok()
            }
            _ => false,
        }
    }

    fn compute_fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let field = |h: &mut Sha256, b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(&mut h, format!("{:?}", self.kind()).as_bytes());
        field(&mut h, self.kid.as_deref().unwrap_or("").as_bytes());
        field(&mut h, self.alg.map_or("", Algorithm::as_str).as_bytes());
        match &self.material {
            Material::Rsa { n, e } => {
                field(&mut h, n);
                field(&mut h, e);
            }
            Material::P256(p) | Material::P384(p) | Material::Ed25519(p) | Material::Hmac(p) => {
                field(&mut h, p)
            }
        }
        h.finalize()
    }
}

/// Why a JWKS document was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not JSON, or not an object with a `keys` array.
    #[error("not a JWKS document (a JSON object with a `keys` array): {0}")]
    Shape(String),
    /// More keys than [`MAX_KEYS`].
    #[error("{0} keys, more than the {MAX_KEYS} accepted")]
    TooMany(usize),
    /// Not one key can verify signatures.
    #[error("no usable signing key ({0} skipped)")]
    NoUsableKey(usize),
}

/// A parsed JWKS document: the usable keys, and why the others were skipped.
#[derive(Debug)]
pub struct ParsedJwks {
    /// Keys that verify signatures.
    pub keys: Vec<VerifyingKey>,
    /// `kid` (or position) and reason of every skipped key.
    pub skipped: Vec<(String, JwkError)>,
}

/// Parses a JWKS document from a remote or file source: shared secrets are refused, unusable keys
/// (encryption keys, unknown curves) skipped.
pub fn parse_jwks(bytes: &[u8]) -> Result<ParsedJwks, JwksError> {
    let doc = super::jose::strict_object(bytes).map_err(JwksError::Shape)?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::Shape("no `keys` array".into()))?;
    if keys.len() > MAX_KEYS {
        return Err(JwksError::TooMany(keys.len()));
    }
    let mut parsed = ParsedJwks {
        keys: Vec::new(),
        skipped: Vec::new(),
    };
    for (i, k) in keys.iter().enumerate() {
        match VerifyingKey::from_jwk(k, false) {
            Ok(key) => parsed.keys.push(key),
            Err(e) => {
                let name = k
                    .get("kid")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("keys[{i}]"), |kid| format!("kid `{kid}`"));
                parsed.skipped.push((name, e));
            }
        }
    }
    if parsed.keys.is_empty() {
        return Err(JwksError::NoUsableKey(parsed.skipped.len()));
    }
    Ok(parsed)
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    v
}

fn bit_len(n: &[u8]) -> usize {
    match n.first() {
        None => 0,
        Some(b) => (n.len() - 1) * 8 + (8 - b.leading_zeros() as usize),
    }
}

/// Left-pads a big-endian coordinate to `size` bytes; None when it is longer.
fn left_pad(v: Vec<u8>, size: usize) -> Option<Vec<u8>> {
    if v.len() > size {
        return None;
    }
    let mut out = vec![0; size - v.len()];
    out.extend(v);
    Some(out)
}
