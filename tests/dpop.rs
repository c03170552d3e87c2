//! RFC 9449 DPoP through the real server over gRPC: proofs minted here with keys generated when the
//! test runs. Every refusal is checked as the client sees it: gRPC code, HTTP status, reason and
//! the `WWW-Authenticate` challenge.

mod common;
#[path = "jwt_common/mod.rs"]
mod keys;
#[path = "redis_common/mod.rs"]
mod redis_common;

use common::{Seen, TestServer, get, seen};
use keys::TestKey;
use serde_json::{Value, json};

const ISS: &str = "https://idp.test/corp";
const AUD: &str = "api://orders";
/// The gRPC test requests say `scheme: http` and `:authority` api.example.com.
const HTU: &str = "http://api.example.com/orders/1";

struct Setup {
    srv: TestServer,
    /// The config `srv` runs (a second replica starts from it).
    yaml: String,
    /// The identity provider's signing key.
    idp: TestKey,
    /// The client's proof key.
    client: TestKey,
}

fn thumbprint(jwk: &Value) -> String {
    let canonical = format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap(),
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap()
    );
    keys::b64(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

fn ath(token: &str) -> String {
    keys::b64(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

fn jti() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    keys::b64(b)
}

async fn setup() -> Setup {
    setup_with("").await
}

/// [`setup`] with `extra` (top-level sections) in the config.
async fn setup_with(extra: &str) -> Setup {
    let idp = keys::p256(Some("corp-1"));
    let client = keys::p256(None);
    let yaml = format!(
        r#"{extra}
identity_providers:
  - name: corp
    issuer: "{ISS}"
    keys: [{jwk}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"], clock_skew: 5s, dpop: allowed }}
  - name: strict
    match: {{ path_prefix: /strict }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"], dpop: required, dpop_max_age: 60s }}
  - name: plain
    match: {{ path_prefix: /plain }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"] }}
"#,
        jwk = idp.jwk
    );
    let srv = TestServer::start(&yaml).await;
    Setup {
        srv,
        yaml,
        idp,
        client,
    }
}

impl Setup {
    /// A token bound to `key` (`cnf.jkt`), or unbound.
    fn token(&self, bound_to: Option<&TestKey>) -> String {
        let mut c = keys::claims(ISS, AUD, "alice");
        if let Some(k) = bound_to {
            c["cnf"] = json!({"jkt": thumbprint(&k.jwk)});
        }
        self.idp.token(c)
    }

    fn proof_claims(&self, token: &str) -> Value {
        json!({"jti": jti(), "htm": "GET", "htu": HTU, "iat": keys::now(), "ath": ath(token)})
    }

    /// A proof by the client's key with these claims.
    fn proof(&self, claims: &Value) -> String {
        self.client.sign(
            json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.client.jwk}),
            claims.clone(),
        )
    }

    async fn send_to(&self, path: &str, headers: &[(&str, &str)]) -> Seen {
        self.send_on(&self.srv, path, headers).await
    }

    /// [`Setup::send_to`] through the replica `srv`.
    async fn send_on(&self, srv: &TestServer, path: &str, headers: &[(&str, &str)]) -> Seen {
        let mut client = srv.client().await;
        let mut req = get(path);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        seen(&client.check(req.request()).await.unwrap().into_inner())
    }

    async fn send(&self, token: &str, proof: &str) -> Seen {
        self.send_via(&self.srv, token, proof).await
    }

    async fn send_via(&self, srv: &TestServer, token: &str, proof: &str) -> Seen {
        let authorization = format!("DPoP {token}");
        let headers = [("authorization", authorization.as_str()), ("dpop", proof)];
        self.send_on(srv, "/orders/1", &headers).await
    }
}

fn assert_refused(s: &Seen, reason: &str, error: &str) {
    assert_eq!(s.code, 16, "gRPC UNAUTHENTICATED: {s:?}");
    assert_eq!(s.status, Some(401), "{s:?}");
    let body = s.body.as_ref().unwrap();
    assert_eq!(body["reason"], reason, "{body}");
    let challenge = &s.headers["www-authenticate"].0;
    assert!(challenge.starts_with("DPoP "), "{challenge}");
    assert!(
        challenge.contains(&format!("error=\"{error}\"")),
        "{challenge}"
    );
    assert!(challenge.contains("algs=\"ES256"), "{challenge}");
}

fn assert_bad_proof(s: &Seen) {
    assert_refused(s, "DpopProofInvalid", "invalid_dpop_proof");
}

#[tokio::test]
async fn a_bound_token_with_a_valid_proof_is_accepted() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let r = s.send(&token, &s.proof(&s.proof_claims(&token))).await;
    assert_eq!(r.code, 0, "{r:?}");
    // The query is not part of `htu` (RFC 9449 section 4.3).
    let mut c = s.proof_claims(&token);
    c["htu"] = json!("http://API.example.com:80/orders/1");
    let r = s
        .send_to(
            "/orders/1?page=2",
            &[
                ("authorization", &format!("DPoP {token}")),
                ("dpop", &s.proof(&c)),
            ],
        )
        .await;
    assert_eq!(r.code, 0, "{r:?}");
}

#[tokio::test]
async fn a_wrong_htm_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let mut c = s.proof_claims(&token);
    c["htm"] = json!("POST");
    assert_bad_proof(&s.send(&token, &s.proof(&c)).await);
}

#[tokio::test]
async fn a_wrong_htu_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    for htu in [
        "http://evil.example.com/orders/1",
        "http://api.example.com/orders/2",
        "https://api.example.com/orders/1",
        "http://api.example.com:8080/orders/1",
    ] {
        let mut c = s.proof_claims(&token);
        c["htu"] = json!(htu);
        assert_bad_proof(&s.send(&token, &s.proof(&c)).await);
    }
}

#[tokio::test]
async fn an_old_or_future_iat_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    for iat in [keys::now() - 306, keys::now() + 60] {
        let mut c = s.proof_claims(&token);
        c["iat"] = json!(iat);
        assert_bad_proof(&s.send(&token, &s.proof(&c)).await);
    }
}

#[tokio::test]
async fn a_replayed_proof_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let proof = s.proof(&s.proof_claims(&token));
    assert_eq!(s.send(&token, &proof).await.code, 0);
    let r = s.send(&token, &proof).await;
    assert_bad_proof(&r);
    // A new proof for the same token passes.
    assert_eq!(
        s.send(&token, &s.proof(&s.proof_claims(&token))).await.code,
        0
    );
}

#[tokio::test]
async fn a_proof_replayed_to_another_replica_is_refused_through_redis() {
    let Some(mut redis) = redis_common::RedisServer::start(false) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("store.key");
    std::fs::write(&key_file, redis_common::KEY_A).unwrap();
    let store = format!(
        "store:\n  redis: {{ url: \"{}\", timeout: 300ms }}\n  key: \"${{file:{}}}\"\n",
        redis.url(),
        key_file.display()
    );
    let a = setup_with(&store).await;
    let b = TestServer::start(&a.yaml).await;
    let token = a.token(Some(&a.client));

    let proof = a.proof(&a.proof_claims(&token));
    assert_eq!(a.send(&token, &proof).await.code, 0);
    // The same proof on the other replica, which has never seen it: a replay all the same.
    let r = a.send_via(&b, &token, &proof).await;
    assert_bad_proof(&r);
    // Another proof is accepted on either.
    let proof2 = a.proof(&a.proof_claims(&token));
    assert_eq!(a.send_via(&b, &token, &proof2).await.code, 0);
    assert_bad_proof(&a.send(&token, &proof2).await);

    // The store holds digests with a lifetime of the window, never the proof or the token.
    let keys = redis.dump().await;
    let dpop: Vec<_> = keys.iter().filter(|(k, _)| k.contains("dpop:")).collect();
    assert_eq!(dpop.len(), 2, "{keys:?}");
    for (k, v) in &dpop {
        assert_eq!(v, b"1", "{k}");
        assert!(!k.contains(&token) && !k.contains(&proof), "{k}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(
                &mut redis
                    .client()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
        // `dpop_max_age` (5m) plus twice `clock_skew` (5s).
        assert!(ttl > 0 && ttl <= 310_000, "{k}: {ttl} ms");
    }

    // Without the store, no replica can rule out a replay elsewhere: refused, as unavailable.
    redis.kill();
    let r = a.send(&token, &a.proof(&a.proof_claims(&token))).await;
    assert_eq!(r.code, 14, "{r:?}");
    assert_eq!(r.status, Some(503), "{r:?}");
    assert_eq!(
        r.body.as_ref().unwrap()["reason"],
        "ReplayProtectionUnavailable"
    );
    // Unbound tokens need no replay check and still pass.
    let plain = a.token(None);
    let s = a
        .send_to(
            "/orders/1",
            &[("authorization", &format!("Bearer {plain}"))],
        )
        .await;
    assert_eq!(s.code, 0, "{s:?}");
}

#[tokio::test]
async fn forward_auth_checks_htu_with_the_scheme_of_x_forwarded_proto() {
    let s = setup().await;
    let base = format!("http://{}/authz", s.srv.running.addrs.http.unwrap());
    let http = reqwest::Client::new();
    let token = s.token(Some(&s.client));
    let ask = |proto: &'static str, htu: &'static str| {
        let mut claims = s.proof_claims(&token);
        claims["htu"] = json!(htu);
        http.get(&base)
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-host", "api.example.com")
            .header("x-forwarded-uri", "/orders/1?page=2")
            .header("x-forwarded-proto", proto)
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", s.proof(&claims))
            .send()
    };
    let reason = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        (status, body["reason"].as_str().unwrap_or("").to_string())
    };
    let ok = ask("https", "https://api.example.com/orders/1")
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok = ask("http", "http://api.example.com/orders/1")
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // A proof for https:// presented on a request the load balancer received over http, and back.
    let r = ask("http", "https://api.example.com/orders/1")
        .await
        .unwrap();
    assert_eq!(reason(r).await, (401, "DpopProofInvalid".to_string()));
    let r = ask("https", "http://api.example.com/orders/1")
        .await
        .unwrap();
    assert_eq!(reason(r).await, (401, "DpopProofInvalid".to_string()));
}

#[tokio::test]
async fn an_hs256_proof_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let secret = keys::hmac(None, 32);
    let proof = secret.sign(
        json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": secret.jwk}),
        s.proof_claims(&token),
    );
    assert_bad_proof(&s.send(&token, &proof).await);
}

#[tokio::test]
async fn a_proof_with_private_key_members_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let mut jwk = s.client.jwk.clone();
    jwk["d"] = json!(keys::b64([7u8; 32]));
    let proof = s.client.sign(
        json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}),
        s.proof_claims(&token),
    );
    assert_bad_proof(&s.send(&token, &proof).await);
}

#[tokio::test]
async fn a_missing_or_wrong_ath_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let mut c = s.proof_claims(&token);
    c.as_object_mut().unwrap().remove("ath");
    assert_bad_proof(&s.send(&token, &s.proof(&c)).await);
    let mut c = s.proof_claims(&token);
    c["ath"] = json!(ath(&s.token(Some(&s.client))));
    assert_bad_proof(&s.send(&token, &s.proof(&c)).await);
}

#[tokio::test]
async fn a_token_bound_to_another_key_is_refused() {
    let s = setup().await;
    let other = keys::p256(None);
    let token = s.token(Some(&other));
    let r = s.send(&token, &s.proof(&s.proof_claims(&token))).await;
    assert_refused(&r, "TokenBindingMismatch", "invalid_token");
}

#[tokio::test]
async fn a_bound_token_sent_as_bearer_is_refused_on_every_api() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let proof = s.proof(&s.proof_claims(&token));
    for path in ["/orders/1", "/strict/1"] {
        let r = s
            .send_to(
                path,
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("dpop", &proof),
                ],
            )
            .await;
        assert_refused(&r, "TokenBindingMismatch", "invalid_token");
    }
    // An API without `dpop` never accepts a bound token.
    let r = s
        .send_to("/plain/1", &[("authorization", &format!("Bearer {token}"))])
        .await;
    assert_eq!(r.code, 16, "{r:?}");
    assert_eq!(r.body.as_ref().unwrap()["reason"], "TokenBindingMismatch");
}

#[tokio::test]
async fn two_dpop_headers_are_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let (a, b) = (
        s.proof(&s.proof_claims(&token)),
        s.proof(&s.proof_claims(&token)),
    );
    // Envoy joins repeated headers with a comma.
    assert_bad_proof(&s.send(&token, &format!("{a},{b}")).await);
}

#[tokio::test]
async fn a_bound_token_without_proof_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let r = s
        .send_to("/orders/1", &[("authorization", &format!("DPoP {token}"))])
        .await;
    assert_bad_proof(&r);
}

#[tokio::test]
async fn allowed_accepts_unbound_bearer_and_required_does_not() {
    let s = setup().await;
    let token = s.token(None);
    let bearer = format!("Bearer {token}");
    let r = s.send_to("/orders/1", &[("authorization", &bearer)]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = s.send_to("/strict/1", &[("authorization", &bearer)]).await;
    assert_refused(&r, "TokenBindingMismatch", "invalid_token");
    // The DPoP scheme with an unbound token, even with a valid proof.
    let r = s.send(&token, &s.proof(&s.proof_claims(&token))).await;
    assert_refused(&r, "TokenBindingMismatch", "invalid_token");
    // No token at all on a `required` API: a DPoP challenge without an error.
    let r = s.send_to("/strict/1", &[]).await;
    assert_eq!(r.code, 16);
    assert_eq!(
        r.headers["www-authenticate"].0,
        r#"DPoP realm="strict", algs="ES256 ES384 EdDSA RS256 PS256""#
    );
}

#[tokio::test]
async fn a_proof_over_8_kib_is_refused() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let mut c = s.proof_claims(&token);
    c["pad"] = json!("x".repeat(9000));
    assert_bad_proof(&s.send(&token, &s.proof(&c)).await);
}

#[test]
fn dpop_settings_are_validated() {
    let base = |jwt: &str| {
        format!(
            r#"
identity_providers:
  - name: corp
    issuer: "{ISS}"
    keys: [{{kty: EC, crv: P-256, x: "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs", y: "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [corp], {jwt} }}
"#
        )
    };
    for (jwt, says) in [
        (
            "dpop: sometimes",
            "`sometimes` is not `required` or `allowed`",
        ),
        (
            "dpop: required, dpop_algorithms: [ES256, HS256]",
            "apis[0].jwt.dpop_algorithms[1]",
        ),
        (
            "dpop: allowed, dpop_algorithms: []",
            "list at least one algorithm",
        ),
        (
            "dpop: allowed, dpop_algorithms: [none]",
            "`none` is not a supported algorithm",
        ),
        (
            "dpop: allowed, dpop_max_age: 2h",
            "apis[0].jwt.dpop_max_age",
        ),
        (
            "dpop_max_age: 1m",
            "need `dpop: required` or `dpop: allowed`",
        ),
        (
            "dpop: required, from: { query: access_token }",
            "`authorization` header",
        ),
        (
            "dpop: required, from: { header: x-token }",
            "`authorization` header",
        ),
    ] {
        let err = common::validate_refuses(&base(jwt));
        assert!(err.contains(says), "{jwt}: {err}");
    }
}

#[tokio::test]
async fn check_explains_the_binding() {
    let s = setup().await;
    let token = s.token(Some(&s.client));
    let headers: portcullis::policy::Headers = [
        ("authorization".to_string(), format!("DPoP {token}")),
        ("dpop".to_string(), s.proof(&s.proof_claims(&token))),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.into_bytes().into()))
    .collect();
    let yaml = std::fs::read_to_string(&s.srv.config).unwrap();
    let src = portcullis::config::parse(&yaml, std::path::Path::new(".")).unwrap();
    let runtime = portcullis::policy::Runtime::offline();
    let (policy, _) = portcullis::policy::compile(&src, &runtime).unwrap();
    let input = portcullis::policy::CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/1",
        scheme: "http",
        headers: &headers,
        peer: None,
        peer_certificate: "",
        context_extensions: None,
    };
    let opts = portcullis::policy::EvalOptions {
        now: std::time::SystemTime::now(),
        explain: true,
    };
    let d = policy.decide(&input, opts).await;
    assert!(d.is_allow(), "{:?}", d.steps);
    let jwt = d.steps.iter().find(|s| s.check == "jwt").unwrap();
    assert!(jwt.detail.contains("DPoP proof valid"), "{}", jwt.detail);
    assert_eq!(d.facts.token_binding, Some("dpop"));
    // The same proof again: refused, and the explanation says why; neither proof nor token shown.
    let d = policy.decide(&input, opts).await;
    let jwt = d.steps.iter().find(|s| s.check == "jwt").unwrap();
    assert!(jwt.detail.contains("replay"), "{}", jwt.detail);
    assert_eq!(d.facts.token_binding, Some("refused"));
    let shown = format!("{:?}", d.steps);
    let proof = std::str::from_utf8(&headers["dpop"]).unwrap();
    for secret in [
        token.rsplit('.').next().unwrap(),
        proof.rsplit('.').next().unwrap(),
    ] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

/// A token endpoint that answers every request with the same backend token.
async fn token_endpoint() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                let body =
                    r#"{"access_token":"backend-token","token_type":"Bearer","expires_in":600}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/token")
}

#[tokio::test]
async fn a_proof_evaluated_again_after_decide_now_waited_is_no_replay() {
    let idp = keys::p256(Some("corp-1"));
    let client = keys::p256(None);
    let url = token_endpoint().await;
    let yaml = format!(
        r#"
identity_providers:
  - {{ name: corp, issuer: "{ISS}", keys: [{jwk}] }}
credentials:
  - {{ name: backend, grant: client_credentials, token_url: "{url}", client_id: portcullis, client_secret: "s3cret", scope: api://backend/.default }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [corp], audiences: ["{AUD}"], dpop: required }}
    on_allow: {{ backend_credential: {{ name: backend }} }}
"#,
        jwk = idp.jwk
    );
    let src = portcullis::config::parse(&yaml, std::path::Path::new(".")).unwrap();
    let runtime = portcullis::policy::Runtime::default();
    let (policy, _) = portcullis::policy::compile(&src, &runtime).unwrap();
    runtime.publish(&policy);
    let mut c = keys::claims(ISS, AUD, "alice");
    c["cnf"] = json!({"jkt": thumbprint(&client.jwk)});
    let token = idp.token(c);
    let proof = client.sign(
        json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": client.jwk}),
        json!({"jti": jti(), "htm": "GET", "htu": "https://api.example.com/orders/1", "iat": keys::now(), "ath": ath(&token)}),
    );
    let headers: portcullis::policy::Headers = [
        ("authorization".to_string(), format!("DPoP {token}")),
        ("dpop".to_string(), proof),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.into_bytes().into()))
    .collect();
    let input = portcullis::policy::CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/1",
        scheme: "https",
        headers: &headers,
        peer: None,
        peer_certificate: "",
        context_extensions: None,
    };
    let opts = portcullis::policy::EvalOptions {
        now: std::time::SystemTime::now(),
        explain: false,
    };
    // The backend token is not cached yet: decide_now would have to wait...
    let now = policy.decide_now(&input, opts);
    assert!(now.is_none(), "{:?}", now.map(|d| (d.outcome, d.steps)));
    // ... and the waiting evaluation, with the same proof, is its first use.
    let d = policy.decide(&input, opts).await;
    assert!(d.is_allow(), "{:?}", d.outcome);
    // Now it has been used.
    let d = policy.decide(&input, opts).await;
    assert!(!d.is_allow());
}
