//! Known attacks on JWT validation, each against the real server over gRPC. Every test asserts what
//! the client sees: the decision (gRPC code), the HTTP status, the reason and the challenge.

mod common;
#[path = "jwt_common/fake_idp.rs"]
mod fake_idp;
#[path = "jwt_common/mod.rs"]
mod keys;

use common::{Seen, TestServer, get, seen};
use fake_idp::FakeIdp;
use keys::TestKey;
use serde_json::json;

const AUD: &str = "api://orders";

struct Setup {
    srv: TestServer,
    idp: FakeIdp,
    /// The provider's signing key (published in its JWKS).
    key: TestKey,
    /// The key of another provider, configured for another API.
    other: TestKey,
}

async fn setup() -> Setup {
    let key = keys::rsa(0, Some("corp-1"));
    let other = keys::rsa(1, Some("partner-1"));
    let idp = FakeIdp::start(keys::jwks(&[&key])).await;
    let yaml = format!(
        r#"
limits:
  max_header_bytes: 262144
identity_providers:
  - name: corp
    issuer: "{iss}"
    jwks_uri: "{jwks}"
    min_refetch_interval: 1h
  - name: partner
    issuer: "https://partner.test"
    keys: [{other_jwk}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt:
      providers: [corp]
      audiences: ["{AUD}"]
      clock_skew: 30s
  - name: partner
    match: {{ path_prefix: /partner }}
    jwt: {{ providers: [partner] }}
"#,
        iss = idp.issuer,
        jwks = idp.jwks_uri(),
        other_jwk = other.jwk
    );
    let srv = TestServer::start(&yaml).await;
    idp.wait_until("the first JWKS fetch", |i| i.jwks_fetches() == 1)
        .await;
    let s = Setup {
        srv,
        idp,
        key,
        other,
    };
    // Settle: the keys are installed once a valid token passes.
    let ok = s.send(&s.key.token(s.claims())).await;
    assert_eq!(ok.code, 0, "a valid token must pass: {ok:?}");
    s
}

impl Setup {
    fn claims(&self) -> serde_json::Value {
        keys::claims(&self.idp.issuer, AUD, "mallory")
    }

    async fn send(&self, token: &str) -> Seen {
        let mut client = self.srv.client().await;
        let req = get("/orders/1")
            .header("authorization", &format!("Bearer {token}"))
            .request();
        seen(&client.check(req).await.unwrap().into_inner())
    }

    /// What the attacker sees; also: no JWKS fetch was caused.
    async fn assert_refused(&self, token: &str, reason: &str) {
        let fetches = self.idp.jwks_fetches();
        let s = self.send(token).await;
        assert_eq!(s.code, 16, "gRPC UNAUTHENTICATED: {s:?}");
        assert_eq!(s.status, Some(401));
        let body = s.body.as_ref().unwrap();
        assert_eq!(body["reason"], reason, "{body}");
        assert_eq!(body["statusCode"], 401);
        assert_eq!(
            s.headers["www-authenticate"].0,
            r#"Bearer realm="orders", error="invalid_token""#
        );
        let text = body.to_string();
        if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 8) {
            assert!(!text.contains(sig), "the token is echoed: {text}");
        }
        assert_eq!(
            self.idp.jwks_fetches(),
            fetches,
            "the attack caused a JWKS fetch"
        );
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let s = setup().await;
    for alg in ["none", "None", "NONE"] {
        let unsigned = format!(
            "{}.{}.",
            keys::b64(json!({"alg": alg, "kid": "corp-1"}).to_string()),
            keys::b64(s.claims().to_string())
        );
        s.assert_refused(&unsigned, "JwtInvalid").await;
        // ... also with a signature from the real key appended.
        let signed = s.key.token(s.claims());
        let with_sig = format!(
            "{}.{}",
            unsigned.trim_end_matches('.'),
            signed.rsplit('.').next().unwrap()
        );
        s.assert_refused(&with_sig, "JwtInvalid").await;
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_as_pem_is_refused() {
    let s = setup().await;
    let forger = keys::hmac_with(
        Some("corp-1"),
        s.key.public_pem.clone().unwrap().into_bytes(),
    );
    s.assert_refused(
        &forger.sign(json!({"alg": "HS256", "kid": "corp-1"}), s.claims()),
        "JwtInvalid",
    )
    .await;
    // Without a kid too, where every key of a "compatible" type would be tried.
    let no_kid = keys::hmac_with(None, s.key.public_pem.clone().unwrap().into_bytes());
    s.assert_refused(
        &no_kid.sign(json!({"alg": "HS256"}), s.claims()),
        "JwtInvalid",
    )
    .await;
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_as_der_is_refused() {
    let s = setup().await;
    for der in [
        s.key.public_der.clone().unwrap(),
        s.key.public_pkcs1_der.clone().unwrap(),
    ] {
        let forger = keys::hmac_with(Some("corp-1"), der);
        s.assert_refused(
            &forger.sign(json!({"alg": "HS256", "kid": "corp-1"}), s.claims()),
            "JwtInvalid",
        )
        .await;
    }
}

#[tokio::test]
async fn a_kid_of_another_provider_is_refused() {
    let s = setup().await;
    // The partner key is trusted, but only by the partner API; its kid is unknown to `corp`.
    let token = s.other.token(s.claims());
    let fetches = s.idp.jwks_fetches();
    let r = s.send(&token).await;
    assert_eq!((r.code, r.status), (16, Some(401)));
    assert_eq!(
        r.body.as_ref().unwrap()["reason"],
        "TokenSignatureKeyNotFound"
    );
    // min_refetch_interval (1h) since the fetch at start: the unknown kid fetched nothing.
    assert_eq!(s.idp.jwks_fetches(), fetches);
    // The same token is fine where its provider is trusted.
    let mut client = s.srv.client().await;
    let mut partner_claims = s.claims();
    partner_claims["iss"] = "https://partner.test".into();
    let partner = s.other.token(partner_claims);
    let ok = seen(
        &client
            .check(
                get("/partner/x")
                    .header("authorization", &format!("Bearer {partner}"))
                    .request(),
            )
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(ok.code, 0);
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let s = setup().await;
    let token = s.key.token(s.claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims = s.claims();
    claims["sub"] = "admin".into();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        keys::b64(claims.to_string()),
        parts[2]
    );
    s.assert_refused(&tampered, "TokenSignatureInvalid").await;
    // A header swapped to another algorithm of the same key type changes the signing input too.
    let ps = format!(
        "{}.{}.{}",
        keys::b64(json!({"alg": "PS256", "kid": "corp-1"}).to_string()),
        parts[1],
        parts[2]
    );
    s.assert_refused(&ps, "TokenSignatureInvalid").await;
}

#[tokio::test]
async fn a_truncated_or_empty_signature_is_refused() {
    let s = setup().await;
    let token = s.key.token(s.claims());
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
    bytes.truncate(bytes.len() - 3);
    s.assert_refused(
        &format!("{input}.{}", keys::b64(&bytes)),
        "TokenSignatureInvalid",
    )
    .await;
    s.assert_refused(&format!("{input}."), "TokenSignatureInvalid")
        .await;
}

#[tokio::test]
async fn exp_one_second_past_the_skew_is_refused() {
    let s = setup().await;
    let mut c = s.claims();
    // clock_skew is 30s: exp = now - 31 is past it whenever the check runs.
    c["exp"] = (keys::now() - 31).into();
    c["nbf"] = (keys::now() - 100).into();
    s.assert_refused(&s.key.token(c), "TokenExpired").await;
    // Exactly at the boundary (exp = now - skew) the token still passes; see tests/jwt.rs
    // `lifetime_boundaries_are_exact_with_and_without_skew` for ±1 s with an injected clock.
}

#[tokio::test]
async fn nbf_in_the_future_beyond_the_skew_is_refused() {
    let s = setup().await;
    let mut c = s.claims();
    c["nbf"] = (keys::now() + 31 + 60).into();
    s.assert_refused(&s.key.token(c), "TokenNotYetValid").await;
}

#[tokio::test]
async fn a_crit_header_is_refused() {
    let s = setup().await;
    let token = s.key.sign(
        json!({"alg": "RS256", "kid": "corp-1", "crit": ["b64"], "b64": false}),
        s.claims(),
    );
    s.assert_refused(&token, "JwtInvalid").await;
    let token = s.key.sign(
        json!({"alg": "RS256", "kid": "corp-1", "crit": ["exp"], "exp": 1}),
        s.claims(),
    );
    s.assert_refused(&token, "JwtInvalid").await;
}

#[tokio::test]
async fn duplicate_json_keys_are_refused() {
    let s = setup().await;
    let claims = s.claims().to_string();
    // Validly signed by the real key: only the duplicate member makes these invalid.
    let dup_header = keys::sign_raw(
        &s.key,
        "RS256",
        r#"{"alg":"RS256","kid":"corp-1","kid":"partner-1"}"#,
        &claims,
    );
    s.assert_refused(&dup_header, "JwtInvalid").await;
    let dup_sub = claims.replacen('{', r#"{"sub":"admin","#, 1);
    let dup_payload = keys::sign_raw(
        &s.key,
        "RS256",
        r#"{"alg":"RS256","kid":"corp-1"}"#,
        &dup_sub,
    );
    s.assert_refused(&dup_payload, "JwtInvalid").await;
}

#[tokio::test]
async fn a_100_kib_token_is_refused_before_any_crypto() {
    let s = setup().await;
    let verifications = s
        .srv
        .running
        .state
        .runtime
        .identity
        .stats()
        .signature_verifications;
    // An unknown kid: had the token been parsed, it would have asked for a JWKS re-fetch.
    let mut c = s.claims();
    c["pad"] = "x".repeat(100 * 1024).into();
    let big = s.key.sign(json!({"alg": "RS256", "kid": "never-seen"}), c);
    assert!(big.len() > 100 * 1024);
    s.assert_refused(&big, "JwtInvalid").await;
    assert_eq!(
        s.srv
            .running
            .state
            .runtime
            .identity
            .stats()
            .signature_verifications,
        verifications,
        "no signature was checked"
    );
}

#[tokio::test]
async fn non_base64url_segments_are_refused() {
    let s = setup().await;
    let token = s.key.token(s.claims());
    let parts: Vec<&str> = token.split('.').collect();
    for bad in [
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}+.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}/", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}==", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], "e30%", parts[2]),
    ] {
        s.assert_refused(&bad, "JwtInvalid").await;
    }
}

#[tokio::test]
async fn a_wrong_number_of_segments_is_refused() {
    let s = setup().await;
    let token = s.key.token(s.claims());
    let (input, _) = token.rsplit_once('.').unwrap();
    for bad in [
        input.to_string(),
        format!("{token}.x"),
        format!("{token}.x.y"),
        "abc".to_string(),
        "..".to_string(),
    ] {
        s.assert_refused(&bad, "JwtInvalid").await;
    }
}
