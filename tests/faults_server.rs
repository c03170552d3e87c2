//! Faults around the running service: the config file damaged while serving, load shedding with
//! checks held by a slow JWKS, input caps seen over gRPC, listener security (mTLS with a foreign CA,
//! the admin API's credentials), and SIGTERM with checks in flight. (Deleted and invalid configs, a
//! client without a certificate, and the admin API being off without `admin` are in
//! tests/server.rs and tests/credentials.rs.)

mod common;
mod faults_common;
#[path = "jwt_common/mod.rs"]
mod keys;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Seen, TestServer, get, seen};
use faults_common::{Mode, Upstream, eventually, listeners};

const KEY_HASH: &str = "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"; // demo-key-123

async fn check(srv: &TestServer, req: portcullis::proto::auth::CheckRequest) -> Seen {
    let mut client = srv.client().await;
    seen(&client.check(req).await.unwrap().into_inner())
}

#[tokio::test]
async fn a_truncated_or_garbage_config_keeps_the_last_good_policy_and_a_fixed_one_applies() {
    let good = format!(
        r#"
subscriptions:
  keys: [{{ id: demo, primary: "{KEY_HASH}" }}]
apis:
  - {{ name: orders, match: {{ path_prefix: /orders }}, subscription_required: true }}
  - {{ name: open, match: {{ path_prefix: /open }} }}
"#
    );
    let srv = TestServer::start(&good).await;
    let keyed = || {
        get("/orders/1")
            .header("ocp-apim-subscription-key", "demo-key-123")
            .request()
    };
    async fn expect(srv: &TestServer) {
        let keyed = get("/orders/1")
            .header("ocp-apim-subscription-key", "demo-key-123")
            .request();
        assert_eq!(check(srv, keyed).await.code, 0);
        assert_eq!(check(srv, get("/orders/1").request()).await.code, 16);
        assert_eq!(check(srv, get("/open/1").request()).await.code, 0);
    }
    expect(&srv).await;

    // Half the file, written in place (a copy interrupted half way), then binary garbage.
    let text = std::fs::read(&srv.config).unwrap();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    for (what, damaged) in [
        ("half", text[..text.len() / 2].to_vec()),
        ("garbage", garbage),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&srv.config, &damaged).unwrap();
        let r = srv.running.reload().await;
        assert!(
            r.is_err(),
            "{what}: a damaged file is refused: {:?}",
            r.ok()
        );
        expect(&srv).await;
    }
    // The file watcher saw those writes too; whatever it did, the decisions are unchanged.
    expect(&srv).await;

    // Fixed (and changed: /open now needs a key): applied without a restart.
    srv.write_config(&good.replace(
        "{ name: open, match: { path_prefix: /open } }",
        "{ name: open, match: { path_prefix: /open }, subscription_required: true }",
    ));
    srv.running.reload().await.unwrap();
    assert_eq!(check(&srv, get("/open/1").request()).await.code, 16);
    assert_eq!(check(&srv, keyed()).await.code, 0);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_unavailable_while_health_keeps_answering() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let ka = keys::rsa(0, Some("a1"));
    let kb = keys::rsa(1, Some("b1"));
    let rotated_a = keys::rsa(2, Some("a2"));
    let rotated_b = keys::rsa(3, Some("b2"));
    let (up_a, up_b) = (
        Upstream::start(keys::jwks(&[&ka])).await,
        Upstream::start(keys::jwks(&[&kb])).await,
    );
    let provider = |name: &str, up: &Upstream| {
        format!(
            "  - {{ name: {name}, issuer: \"{}\", jwks_uri: \"{}\", min_refetch_interval: 1ms, fetch_timeout: 30s }}\n",
            up.base,
            up.jwks_uri()
        )
    };
    let yaml = format!(
        r#"
limits: {{ max_concurrent_checks: 2 }}
identity_providers:
{}{}
apis:
  - {{ name: a, match: {{ path_prefix: /a }}, jwt: {{ providers: [pa], audiences: [api://a] }} }}
  - {{ name: b, match: {{ path_prefix: /b }}, jwt: {{ providers: [pb], audiences: [api://b] }} }}
  - {{ name: open, match: {{ path_prefix: /open }} }}
"#,
        provider("pa", &up_a),
        provider("pb", &up_b)
    );
    let srv = TestServer::start(&yaml).await;
    eventually("both key sets", || {
        srv.running
            .state
            .runtime
            .identity
            .providers()
            .iter()
            .all(|p| p.keys == Some(1))
    })
    .await;

    // Each provider rotated to a key portcullis has not seen, and answers slowly: a check with the
    // new kid waits for the re-fetch. Two such checks fill `max_concurrent_checks: 2`.
    up_a.set_jwks(keys::jwks(&[&ka, &rotated_a]));
    up_b.set_jwks(keys::jwks(&[&kb, &rotated_b]));
    up_a.set(Mode::Hold).await;
    up_b.set(Mode::Hold).await;
    let client = srv.client().await;
    let slow = |path: &'static str, key: &keys::TestKey, up: &Upstream, aud: &str| {
        let token = key.token(keys::claims(&up.base, aud, "alice"));
        let req = get(path)
            .header("authorization", &format!("Bearer {token}"))
            .request();
        let mut client = client.clone();
        async move { seen(&client.check(req).await.unwrap().into_inner()) }
    };
    let held_a = tokio::spawn(slow("/a/1", &rotated_a, &up_a, "api://a"));
    let held_b = tokio::spawn(slow("/b/1", &rotated_b, &up_b, "api://b"));
    eventually("both checks waiting on their provider", || {
        up_a.held() == 1 && up_b.held() == 1
    })
    .await;

    // Over the limit: shed at once, gRPC UNAVAILABLE and forward-auth 503 (each bounded only so
    // that queueing fails the test instead of hanging it).
    let mut client = srv.client().await;
    let shed = tokio::time::timeout(
        Duration::from_secs(20),
        client.check(get("/open/1").request()),
    )
    .await
    .expect("a shed check is answered at once")
    .unwrap_err();
    assert_eq!(shed.code(), tonic::Code::Unavailable, "{shed:?}");
    let base = format!("http://{}", srv.running.addrs.http.unwrap());
    let http = reqwest::Client::new();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        http.get(format!("{base}/authz/open/1")).send(),
    )
    .await
    .expect("answered at once")
    .unwrap();
    assert_eq!(r.status(), 503);

    // Health keeps answering meanwhile.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", srv.running.addrs.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let healthz = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    assert_eq!(
        up_a.held() + up_b.held(),
        2,
        "the slow checks are still held"
    );

    // The providers answer: the held checks get their right answer, and checks are admitted again.
    up_a.release().await;
    up_b.release().await;
    assert_eq!(held_a.await.unwrap().code, 0);
    assert_eq!(held_b.await.unwrap().code, 0);
    assert_eq!(check(&srv, get("/open/1").request()).await.code, 0);
    let r = http
        .get(format!("{base}/authz/open/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_certificates_and_headers_are_refused_over_grpc() {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["partner.example".into()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "partner.example");
    let pem = params.self_signed(&key).unwrap().pem();
    let encoded: String =
        percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC).to_string();
    let yaml = format!(
        r#"
limits: {{ max_certificate_bytes: {max}, max_header_bytes: 4096 }}
apis:
  - name: partners
    client_certificate: {{ identities: [{{ common_name: partner.example }}] }}
"#,
        max = encoded.len()
    );
    let srv = TestServer::start(&yaml).await;
    let mut req = get("/p");
    req.certificate = encoded.clone();
    assert_eq!(check(&srv, req.request()).await.code, 0, "at the cap: read");

    // One byte over the cap (a trailing encoded newline): refused unread.
    let mut req = get("/p");
    req.certificate = format!("{encoded}%0A");
    let r = check(&srv, req.request()).await;
    assert_eq!((r.code, r.status), (16, Some(401)), "{r:?}");
    assert_eq!(r.body.unwrap()["reason"], "ClientCertificateInvalid");

    // Headers over max_header_bytes: 431 before anything else is looked at.
    let mut req = get("/p").header("x-padding", &"p".repeat(5000));
    req.certificate = encoded;
    let r = check(&srv, req.request()).await;
    assert_eq!(r.status, Some(431), "{r:?}");
    assert_eq!(r.body.unwrap()["reason"], "RequestHeadersTooLarge");
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn mtls_refuses_a_client_certificate_from_another_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    };
    let leaf = |name: &str, issuer: &Issuer<'_, KeyPair>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.into()])
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (trusted_pem, trusted) = ca("trusted CA");
    let (_, foreign) = ca("foreign CA");
    let (server_cert, server_key) = leaf("localhost", &trusted);
    let (good_cert, good_key) = leaf("client.example.com", &trusted);
    // Same subject as the good one, signed by a CA the listener does not trust.
    let (bad_cert, bad_key) = leaf("client.example.com", &foreign);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &trusted_pem).unwrap();
    std::fs::write(dir.path().join("server.pem"), &server_cert).unwrap();
    std::fs::write(dir.path().join("server.key"), &server_key).unwrap();
    let yaml = format!(
        "listen: {{grpc: 127.0.0.1:0, tls: {{cert_file: {d}/server.pem, key_file: {d}/server.key, client_ca_file: {d}/ca.pem}}}}\napis: [{{name: open}}]\n",
        d = dir.path().display()
    );
    let srv = TestServer::start(&yaml).await;
    let url = format!("https://localhost:{}", srv.running.addrs.grpc.port());
    let call = |cert: String, key: String| {
        let url = url.clone();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&trusted_pem))
            .identity(Identity::from_pem(cert, key))
            .domain_name("localhost");
        async move {
            let channel = tonic::transport::Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await?;
            let mut client =
                portcullis::proto::auth::authorization_client::AuthorizationClient::new(channel);
            let r = client
                .check(get("/open").request())
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
            Ok::<i32, Box<dyn std::error::Error>>(seen(&r.into_inner()).code)
        }
    };
    assert_eq!(call(good_cert, good_key).await.unwrap(), 0);
    assert!(
        call(bad_cert, bad_key).await.is_err(),
        "a certificate from another CA must be refused"
    );
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_admin_api_refuses_every_credential_but_its_token() {
    const TOKEN: &str = "admin-token-0123456789abcdef";
    let srv = TestServer::start(&format!(
        "admin: {{ token: \"{TOKEN}\" }}\napis: [{{name: open}}]\n"
    ))
    .await;
    let url = format!(
        "http://{}/admin/credentials",
        srv.running.addrs.http.unwrap()
    );
    let http = reqwest::Client::new();
    let refused = [
        None,
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
        Some("Bearer ".to_string()),
    ];
    for auth in refused {
        let mut req = http.get(&url);
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert!(r.headers().contains_key("www-authenticate"), "{auth:?}");
        let body = r.text().await.unwrap();
        assert!(!body.contains(TOKEN), "{auth:?}: {body}");
    }
    // Not in the query string either.
    let r = http
        .get(format!("{url}?token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(&url)
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the scheme is case-insensitive (RFC 7235)");
    srv.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_checks_in_flight_answers_them_all_refuses_new_connections_and_exits_0() {
    let key = keys::rsa(0, Some("k1"));
    let issuer = "https://idp.test/corp";
    let up = Upstream::start(serde_json::json!({"keys": []})).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"
listen: {{ grpc: 127.0.0.1:0, http: 127.0.0.1:0 }}
identity_providers:
  - {{ name: corp, issuer: "{issuer}", keys: [{jwk}] }}
credentials:
  - {{ name: obo, grant: token_exchange, token_url: "{url}", client_id: c, client_secret: s, audience: api://inventory, timeout: 30s }}
apis:
  - name: orders
    jwt: {{ providers: [corp], audiences: [api://orders] }}
    on_allow: {{ backend_credential: {{ name: obo }} }}
"#,
            jwk = key.jwk,
            url = up.token_url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (grpc, http) = listeners(&mut child);
    let mut child = faults_common::KillOnDrop(child);
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = portcullis::proto::auth::authorization_client::AuthorizationClient::new(channel);

    // 50 callers, each exchanging its own token at a provider that holds every request: 50
    // checks are in flight inside portcullis. 10 more with a bad token were answered at once.
    up.set(Mode::Hold).await;
    let callers: Vec<String> = (0..50)
        .map(|i| key.token(keys::claims(issuer, "api://orders", &format!("user-{i}"))))
        .collect();
    let in_flight: Vec<_> = callers
        .iter()
        .map(|token| {
            let mut client = client.clone();
            let req = get("/orders/1")
                .header("authorization", &format!("Bearer {token}"))
                .request();
            tokio::spawn(async move { seen(&client.check(req).await.unwrap().into_inner()) })
        })
        .collect();
    for _ in 0..10 {
        let mut client = client.clone();
        let req = get("/orders/1")
            .header("authorization", "Bearer not-a-token")
            .request();
        let r = seen(&client.check(req).await.unwrap().into_inner());
        assert_eq!(r.code, 16);
    }
    eventually("50 held token exchanges", || up.held() == 50).await;

    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Draining: new connections are refused on both listeners (the held checks keep the process
    // alive meanwhile).
    for addr in [&grpc, &http] {
        let refused = async {
            loop {
                if tokio::net::TcpStream::connect(addr.as_str()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .unwrap_or_else(|_| panic!("{addr} still accepts connections while draining"));
    }
    assert_eq!(up.held(), 50, "still in flight");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "exited before draining"
    );

    // The provider answers: every in-flight check gets its own caller's token.
    up.release().await;
    for (token, task) in callers.iter().zip(in_flight) {
        let r = task.await.unwrap();
        assert_eq!(r.code, 0, "{r:?}");
        let injected = &r.headers["authorization"].0;
        let tail: String = token.chars().rev().take(8).collect();
        assert!(injected.ends_with(&tail), "{injected} is not this caller's");
    }
    assert_eq!(up.token_hits(), 50);
    let exit = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
