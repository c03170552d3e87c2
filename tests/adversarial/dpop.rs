//! DPoP (RFC 9449) proofs built to pass as something they are not: another request's proof, a
//! re-signed replay (ECDSA signatures differ each time, so a cache keyed by the proof's bytes would
//! miss it), a symmetric or private key, smuggled `htu` hosts, duplicate JSON members, a proof that
//! is the access token itself, a bound token dressed as `Bearer`. Wire to wire, as the gRPC
//! listener decides (`scheme: http`, `:authority` api.example.com).

use serde_json::{Value, json};

use crate::keys::{self, TestKey};
use crate::support::{compile, decide, request, verdict};

const ISS: &str = "https://idp.test/corp";
const HTU: &str = "http://api.example.com/orders/1";

fn sha(s: &str) -> String {
    keys::b64(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

fn jkt(k: &TestKey) -> String {
    let j = &k.jwk;
    sha(&format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        j["crv"].as_str().unwrap(),
        j["x"].as_str().unwrap(),
        j["y"].as_str().unwrap()
    ))
}

fn proof_claims(token: &str, jti: &str) -> Value {
    json!({"jti": jti, "htm": "GET", "htu": HTU, "iat": keys::now(), "ath": sha(token)})
}

fn header(k: &TestKey) -> Value {
    json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": k.jwk})
}

/// A JWS with these raw header and payload texts, signed by `k` (for duplicate members).
fn raw_signed(k: &TestKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", keys::b64(header), keys::b64(payload));
    let sig = k.sign_bytes("ES256", input.as_bytes());
    format!("{input}.{}", keys::b64(sig))
}

#[tokio::test]
async fn hostile_dpop_proofs_are_refused() {
    let idp = keys::p256(Some("corp-1"));
    let client = keys::p256(None);
    let other = keys::p256(None);
    let policy = compile(&format!(
        r#"
identity_providers:
  - {{ name: corp, issuer: "{ISS}", keys: [{jwk}] }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [corp], dpop: allowed }}
    on_allow: {{ set_headers: {{ x-api: orders }} }}
"#,
        jwk = idp.jwk
    ));
    let mut c = keys::claims(ISS, "api://orders", "alice");
    c["cnf"] = json!({"jkt": jkt(&client)});
    let token = idp.token(c.clone());
    let auth = format!("DPoP {token}");
    let good = |jti: &str| client.sign(header(&client), proof_claims(&token, jti));
    let with = |f: &dyn Fn(&mut Value, &mut Value)| {
        let (mut h, mut p) = (header(&client), proof_claims(&token, "x-fresh"));
        f(&mut h, &mut p);
        client.sign(h, p)
    };
    let secret = keys::hmac(None, 32);
    let mut odd_cnf = c.clone();
    odd_cnf["cnf"] = json!({"jkt": {"x": jkt(&client)}});
    let odd_cnf_token = idp.token(odd_cnf);

    const BAD: &str = "deny 401 DpopProofInvalid";
    const MISMATCH: &str = "deny 401 TokenBindingMismatch";
    let first = good("replayed");
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("valid", auth.clone(), good("ok-1"), "allow orders"),
        (
            "lower-case scheme",
            format!("dpop {token}"),
            good("ok-2"),
            "allow orders",
        ),
        ("first use", auth.clone(), first.clone(), "allow orders"),
        ("byte-identical replay", auth.clone(), first.clone(), BAD),
        (
            "replay re-signed (same key and jti, new ECDSA signature)",
            auth.clone(),
            good("replayed"),
            BAD,
        ),
        (
            "replay with surrounding whitespace",
            auth.clone(),
            format!(" {first} "),
            BAD,
        ),
        (
            "alg none",
            auth.clone(),
            with(&|h, _| h["alg"] = json!("none")),
            BAD,
        ),
        (
            "alg lower-case",
            auth.clone(),
            with(&|h, _| h["alg"] = json!("es256")),
            BAD,
        ),
        (
            "symmetric jwk with HS256",
            auth.clone(),
            secret.sign(
                json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": secret.jwk}),
                proof_claims(&token, "x-hs"),
            ),
            BAD,
        ),
        (
            "public and secret members together",
            auth.clone(),
            with(&|h, _| h["jwk"]["k"] = json!(keys::b64([1u8; 32]))),
            BAD,
        ),
        (
            "signed by another key than its jwk",
            auth.clone(),
            other.sign(header(&client), proof_claims(&token, "x-other")),
            BAD,
        ),
        (
            "another key's valid proof",
            auth.clone(),
            other.sign(header(&other), proof_claims(&token, "x-other-2")),
            MISMATCH,
        ),
        (
            "typ JWT (the access token's)",
            auth.clone(),
            with(&|h, _| h["typ"] = json!("JWT")),
            BAD,
        ),
        (
            "the access token as proof",
            auth.clone(),
            token.clone(),
            BAD,
        ),
        (
            "crit header",
            auth.clone(),
            with(&|h, _| h["crit"] = json!(["htu"])),
            BAD,
        ),
        (
            "htu userinfo smuggling the host",
            auth.clone(),
            with(&|_, p| p["htu"] = json!("http://api.example.com@evil.example.com/orders/1")),
            BAD,
        ),
        (
            "htu of another path with the request's as query",
            auth.clone(),
            with(&|_, p| p["htu"] = json!("http://api.example.com/admin?/orders/1")),
            BAD,
        ),
        (
            "htu relative",
            auth.clone(),
            with(&|_, p| p["htu"] = json!("/orders/1")),
            BAD,
        ),
        (
            "iat as string",
            auth.clone(),
            with(&|_, p| p["iat"] = json!("0")),
            BAD,
        ),
        (
            "iat far future",
            auth.clone(),
            with(&|_, p| p["iat"] = json!(1e300)),
            BAD,
        ),
        (
            "ath of no token",
            auth.clone(),
            with(&|_, p| p["ath"] = json!(sha(""))),
            BAD,
        ),
        (
            "duplicate htu member (second one right)",
            auth.clone(),
            raw_signed(
                &client,
                &header(&client).to_string(),
                &format!(
                    r#"{{"jti":"x-dup","htm":"GET","htu":"http://evil.example.com/","htu":"{HTU}","iat":{},"ath":"{}"}}"#,
                    keys::now(),
                    sha(&token)
                ),
            ),
            BAD,
        ),
        ("empty DPoP header", auth.clone(), String::new(), BAD),
        (
            "two DPoP headers (comma-joined)",
            auth.clone(),
            format!("{},{}", good("x-two-a"), good("x-two-b")),
            BAD,
        ),
        (
            "bound token as Bearer",
            format!("Bearer {token}"),
            good("x-bearer"),
            MISMATCH,
        ),
        (
            "cnf.jkt not a string",
            format!("DPoP {odd_cnf_token}"),
            odd_cnf_token.clone(),
            MISMATCH,
        ),
    ];
    let mut wrong = Vec::new();
    for (name, authorization, proof, want) in &cases {
        let mut headers = vec![("authorization", authorization.as_str())];
        if !proof.is_empty() {
            headers.push(("dpop", proof.as_str()));
        }
        let got = verdict(
            &decide(
                &policy,
                &request("GET", "api.example.com", "/orders/1", &headers),
            )
            .await,
        );
        if got != *want {
            wrong.push(format!("{name}: got `{got}`, want `{want}`"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
