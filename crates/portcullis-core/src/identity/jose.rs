//! Compact JWS parsing: three base64url segments, a JSON header and a JSON claims set.
//!
//! Written here rather than taken from a JWT crate because the checks that matter live in exactly
//! this code and the common crates do not make them: duplicate JSON member names are refused at
//! every depth (RFC 7515 section 5.2 lets a parser pick either value, so two parsers could read two
//! different tokens from the same bytes), any `crit` header is refused (we implement no extension),
//! and base64url must be unpadded and canonical so one signature has exactly one spelling.
//! Everything here runs on untrusted input before any key is looked at, and costs linear time.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A JWS signature algorithm portcullis verifies. `none` has no variant: it can never be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// HMAC with SHA-256.
    HS256,
    /// HMAC with SHA-384.
    HS384,
    /// HMAC with SHA-512.
    HS512,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

/// The kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A shared secret (`kty: oct`).
    Hmac,
    /// An RSA public key.
    Rsa,
    /// A P-256 public key.
    P256,
    /// A P-384 public key.
    P384,
    /// An Ed25519 public key.
    Ed25519,
}

impl Algorithm {
    /// Every supported algorithm.
    pub const ALL: [Algorithm; 12] = [
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];

    /// Parses the JOSE name (case-sensitive, as RFC 7518 registers it).
    pub fn parse(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// The JOSE name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::HS384 => "HS384",
            Algorithm::HS512 => "HS512",
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    /// The key type the algorithm verifies with.
    pub const fn key_kind(self) -> KeyKind {
        match self {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => KeyKind::Hmac,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => KeyKind::Rsa,
            Algorithm::ES256 => KeyKind::P256,
            Algorithm::ES384 => KeyKind::P384,
            Algorithm::EdDSA => KeyKind::Ed25519,
        }
    }

    /// Whether the algorithm uses a shared secret.
    pub const fn is_hmac(self) -> bool {
        matches!(self.key_kind(), KeyKind::Hmac)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a token could not be parsed. Messages describe the structure, never the token's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not three dot-separated segments.
    #[error("a JWT has 3 dot-separated segments, this has {0}")]
    Segments(usize),
    /// A segment is not unpadded, canonical base64url.
    #[error("the {0} segment is not base64url without padding")]
    Base64(&'static str),
    /// A segment is not the JSON object it must be.
    #[error("the {0} is not a JSON object: {1}")]
    Json(&'static str, String),
    /// `alg` is missing or not a string.
    #[error("the header has no `alg`")]
    NoAlgorithm,
    /// `kid` is present but not a string.
    #[error("the header's `kid` is not a string")]
    KidNotString,
    /// The header lists critical extensions (`crit`), none of which are implemented.
    #[error("the header lists critical extensions (`crit`), which are not supported")]
    Critical,
    /// A nested or encrypted token.
    #[error("nested tokens (`cty: JWT`) are not supported")]
    Nested,
}

/// A parsed, not yet verified, compact JWS.
#[derive(Debug)]
pub struct Parsed<'t> {
    /// `alg` as written (may name an algorithm we do not support, or `none`).
    pub alg: String,
    /// `kid`, when present.
    pub kid: Option<String>,
    /// The claims set.
    pub claims: Map<String, Value>,
    /// The JWS signing input: `header.payload` as sent.
    pub signing_input: &'t [u8],
    /// The decoded signature (may be empty).
    pub signature: Vec<u8>,
    /// The whole header (DPoP proofs read `typ` and `jwk` from it).
    pub header: Map<String, Value>,
}

/// Parses a compact JWS. The caller has already bounded its size.
pub fn parse(token: &str) -> Result<Parsed<'_>, ParseError> {
    let segments = token.bytes().filter(|b| *b == b'.').count() + 1;
    if segments != 3 {
        return Err(ParseError::Segments(segments));
    }
    let mut parts = token.splitn(3, '.');
    // Three segments were just counted, so each `next()` yields one; `unwrap_or_default` is never hit.
    let (h, p, s) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| ParseError::Base64("header"))?;
    let payload_bytes = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| ParseError::Base64("payload"))?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| ParseError::Base64("signature"))?;

    let header = strict_object(&header_bytes).map_err(|e| ParseError::Json("header", e))?;
    let claims = strict_object(&payload_bytes).map_err(|e| ParseError::Json("payload", e))?;

    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(ParseError::NoAlgorithm),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(ParseError::KidNotString),
    };
    if header.contains_key("crit") {
        return Err(ParseError::Critical);
    }
    if header
        .get("cty")
        .and_then(Value::as_str)
        .is_some_and(|c| c.eq_ignore_ascii_case("JWT"))
    {
        return Err(ParseError::Nested);
    }
    Ok(Parsed {
        alg,
        kid,
        claims,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
        header,
    })
}

/// Decodes JSON that must be an object, refusing duplicate member names at any depth.
pub fn strict_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<StrictValue>(bytes) {
        Ok(StrictValue(Value::Object(m))) => Ok(m),
        Ok(_) => Err("not an object".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A JSON value whose objects have unique member names.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so the conversion cannot fail; Null would only hide a bug.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if m.contains_key(&key) {
                return Err(de::Error::custom("duplicate member name"));
            }
            let StrictValue(v) = map.next_value()?;
            m.insert(key, v);
        }
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn token(header: &str, payload: &str, sig: &str) -> String {
        format!("{}.{}.{}", b64(header), b64(payload), sig)
    }

    #[test]
    fn parses_a_well_formed_token() {
        let t = token(
            r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#,
            r#"{"sub":"alice","n":{"a":[1,2]}}"#,
            "c2ln",
        );
        let p = parse(&t).unwrap();
        assert_eq!(p.alg, "RS256");
        assert_eq!(p.kid.as_deref(), Some("k1"));
        assert_eq!(p.claims["sub"], "alice");
        assert_eq!(p.signature, b"sig");
        assert_eq!(p.signing_input, t.rsplit_once('.').unwrap().0.as_bytes());
    }

    #[test]
    fn refuses_wrong_segment_counts() {
        assert_eq!(parse("a.b").unwrap_err(), ParseError::Segments(2));
        assert_eq!(parse("a.b.c.d").unwrap_err(), ParseError::Segments(4));
        assert_eq!(parse("a.b.c.d.e").unwrap_err(), ParseError::Segments(5));
        assert_eq!(parse("").unwrap_err(), ParseError::Segments(1));
    }

    #[test]
    fn refuses_padding_and_non_base64url() {
        let h = b64(r#"{"alg":"RS256"}"#);
        let p = b64(r#"{"sub":"a"}"#);
        assert_eq!(
            parse(&format!("{h}=.{p}.c2ln")).unwrap_err(),
            ParseError::Base64("header")
        );
        assert_eq!(
            parse(&format!("{h}.{p}.c2ln=")).unwrap_err(),
            ParseError::Base64("signature")
        );
        assert_eq!(
            parse(&format!("{h}.{p}+/.c2ln")).unwrap_err(),
            ParseError::Base64("payload")
        );
        assert_eq!(
            parse(&format!("{h}.{p}.c2l*")).unwrap_err(),
            ParseError::Base64("signature")
        );
        // Non-canonical trailing bits: `YR` and `YQ` would otherwise both decode to "a".
        assert!(parse(&format!("{h}.{p}.YQ")).is_ok());
        assert_eq!(
            parse(&format!("{h}.{p}.YR")).unwrap_err(),
            ParseError::Base64("signature")
        );
    }

    #[test]
    fn refuses_duplicate_members_at_any_depth() {
        for (h, p) in [
            (r#"{"alg":"RS256","alg":"none"}"#, r#"{"sub":"a"}"#),
            (r#"{"alg":"RS256"}"#, r#"{"sub":"a","sub":"admin"}"#),
            (r#"{"alg":"RS256"}"#, r#"{"sub":"a","\u0073ub":"admin"}"#),
            (r#"{"alg":"RS256"}"#, r#"{"x":[{"a":1,"a":2}]}"#),
        ] {
            let err = parse(&token(h, p, "c2ln")).unwrap_err();
            assert!(
                matches!(err, ParseError::Json(_, ref m) if m.contains("duplicate")),
                "{h} {p}: {err}"
            );
        }
    }

    #[test]
    fn refuses_crit_nested_and_odd_headers() {
        assert_eq!(
            parse(&token(
                r#"{"alg":"RS256","crit":["exp"],"exp":1}"#,
                "{}",
                "c2ln"
            ))
            .unwrap_err(),
            ParseError::Critical
        );
        assert_eq!(
            parse(&token(r#"{"alg":"RS256","crit":[]}"#, "{}", "c2ln")).unwrap_err(),
            ParseError::Critical
        );
        assert_eq!(
            parse(&token(r#"{"alg":"RS256","cty":"jwt"}"#, "{}", "c2ln")).unwrap_err(),
            ParseError::Nested
        );
        assert_eq!(
            parse(&token(r#"{"kid":"a"}"#, "{}", "c2ln")).unwrap_err(),
            ParseError::NoAlgorithm
        );
        assert_eq!(
            parse(&token(r#"{"alg":1}"#, "{}", "c2ln")).unwrap_err(),
            ParseError::NoAlgorithm
        );
        assert_eq!(
            parse(&token(r#"{"alg":"RS256","kid":7}"#, "{}", "c2ln")).unwrap_err(),
            ParseError::KidNotString
        );
        assert!(matches!(
            parse(&token(r#"["alg"]"#, "{}", "c2ln")).unwrap_err(),
            ParseError::Json("header", _)
        ));
        assert!(matches!(
            parse(&token(r#"{"alg":"RS256"}"#, "\"str\"", "c2ln")).unwrap_err(),
            ParseError::Json("payload", _)
        ));
        assert!(matches!(
            parse(&token(r#"{"alg":"RS256"} x"#, "{}", "c2ln")).unwrap_err(),
            ParseError::Json("header", _)
        ));
    }

    #[test]
    fn algorithm_names_round_trip_and_none_is_not_one() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.as_str()), Some(a));
        }
        assert_eq!(Algorithm::parse("none"), None);
        assert_eq!(Algorithm::parse("rs256"), None);
        assert!(Algorithm::HS256.is_hmac() && !Algorithm::RS256.is_hmac());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn never_panics_on_dotted_base64(a in "[A-Za-z0-9_-]{0,60}", b in "[A-Za-z0-9_-]{0,60}", c in "[A-Za-z0-9_-]{0,60}") {
            let _ = parse(&format!("{a}.{b}.{c}"));
        }
    }
}
