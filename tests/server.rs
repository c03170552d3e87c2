//! The real server on 127.0.0.1:0, called over gRPC and HTTP.

mod common;

use std::time::Duration;

use common::{TestServer, get, seen};
use portcullis::proto::auth::CheckRequest;
use portcullis::proto::auth::authorization_client::AuthorizationClient;

const KEY_HASH: &str = "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"; // demo-key-123

fn config() -> String {
    format!(
        r#"
subscriptions:
  keys: [{{ id: demo, primary: "{KEY_HASH}" }}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    subscription_required: true
    on_allow: {{ set_headers: {{ x-subscription: "{{subscription.id}}" }} }}
"#
    )
}

async fn code(
    client: &mut AuthorizationClient<tonic::transport::Channel>,
    req: CheckRequest,
) -> i32 {
    seen(&client.check(req).await.unwrap().into_inner()).code
}

#[tokio::test]
async fn allow_and_deny_over_grpc() {
    let srv = TestServer::start(&config()).await;
    let mut client = srv.client().await;

    let allow = seen(
        &client
            .check(get("/orders/1?subscription-key=demo-key-123").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(allow.code, 0);
    assert_eq!(
        allow.headers["x-subscription"],
        ("demo".to_string(), Some(false)),
        "append is always explicit"
    );
    assert_eq!(allow.headers["x-portcullis-decision-id"].0.len(), 32);
    assert_eq!(allow.removed_query, vec!["subscription-key"]);

    let deny = seen(
        &client
            .check(get("/orders/1").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(deny.code, 16);
    assert_eq!(deny.status, Some(401));
    let body = deny.body.unwrap();
    assert_eq!(body["reason"], "SubscriptionKeyNotFound");
    assert_eq!(body["statusCode"], 401);
    assert_eq!(deny.headers["content-type"].0, "application/json");
    assert_eq!(
        body["decisionId"].as_str().unwrap(),
        deny.headers["x-portcullis-decision-id"].0
    );
    assert!(
        deny.headers["www-authenticate"]
            .0
            .starts_with("AzureApiManagementKey")
    );

    let unmatched = seen(
        &client
            .check(get("/elsewhere").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!((unmatched.code, unmatched.status), (7, Some(403)));
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn incomplete_check_requests_are_denied_not_dropped() {
    let srv = TestServer::start(&config()).await;
    let mut client = srv.client().await;
    let empty = seen(
        &client
            .check(CheckRequest { attributes: None })
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!((empty.code, empty.status), (3, Some(400)));
    assert_eq!(empty.body.unwrap()["reason"], "InvalidRequest");
    let mut no_http = get("/orders").request();
    no_http.attributes.as_mut().unwrap().request = None;
    let r = seen(&client.check(no_http).await.unwrap().into_inner());
    assert_eq!(r.code, 3);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn encode_raw_headers_are_read_from_header_map() {
    let srv = TestServer::start(&config()).await;
    let mut client = srv.client().await;
    let mut req = get("/orders/1").request();
    let http = req
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap();
    http.headers.clear();
    http.header_map = Some(portcullis::proto::core::HeaderMap {
        headers: vec![portcullis::proto::core::HeaderValue {
            key: "ocp-apim-subscription-key".into(),
            value: String::new(),
            raw_value: bytes::Bytes::from_static(b"demo-key-123"),
        }],
    });
    assert_eq!(seen(&client.check(req).await.unwrap().into_inner()).code, 0);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let srv = TestServer::start(&config()).await;
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", srv.running.addrs.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service `{service}`"
        );
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"envoy.service.auth.v3.Authorization".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn reload_swaps_good_configs_and_keeps_the_last_good_one() {
    let srv = TestServer::start(&config()).await;
    let mut client = srv.client().await;
    assert_eq!(code(&mut client, get("/orders").request()).await, 16);

    // A good change is picked up by the file watcher.
    srv.write_config("apis: [{name: orders, match: {path_prefix: /orders}}]\n");
    let mut allowed = false;
    for _ in 0..50 {
        if seen(
            &client
                .check(get("/orders").request())
                .await
                .unwrap()
                .into_inner(),
        )
        .code
            == 0
        {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(allowed, "the watcher did not apply the new config");

    // A broken change is rejected with its errors; the last good config keeps serving.
    srv.write_config("apis: [{name: orders, match: {path_prefix: orders}, bogus: 1}]\n");
    let errs = srv.running.reload().await.unwrap_err();
    assert!(errs.to_string().contains("apis[0].bogus"), "{errs}");
    // ... all of them at once: the semantic error of the same entry comes with the structural one.
    assert!(
        errs.to_string().contains("apis[0].match.path_prefix"),
        "{errs}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(code(&mut client, get("/orders").request()).await, 0);

    // Deleted: still serving.
    std::fs::remove_file(&srv.config).unwrap();
    assert!(srv.running.reload().await.is_err());
    assert_eq!(code(&mut client, get("/orders").request()).await, 0);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn http_listener_health_and_forward_auth() {
    let srv = TestServer::start(&config()).await;
    let base = format!("http://{}", srv.running.addrs.http.unwrap());
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Envoy http_service style: the original path after /authz.
    let r = http
        .get(format!("{base}/authz/orders/1"))
        .header("ocp-apim-subscription-key", "demo-key-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-subscription"], "demo");
    assert_eq!(
        r.headers()["x-envoy-auth-headers-to-remove"],
        "ocp-apim-subscription-key"
    );
    assert_eq!(r.headers()["x-portcullis-decision-id"].len(), 32);

    // nginx / Traefik style: the original target in a header.
    let r = http
        .get(format!("{base}/authz"))
        .header("x-forwarded-uri", "/orders/2")
        .header("x-forwarded-method", "GET")
        .header("x-forwarded-host", "api.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let id = r.headers()["x-portcullis-decision-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "SubscriptionKeyNotFound");
    assert_eq!(body["decisionId"], id);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn mtls_listener_requires_a_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["client.example.com".into()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    let yaml = format!(
        "listen: {{grpc: 127.0.0.1:0, tls: {{cert_file: {d}/server.pem, key_file: {d}/server.key, client_ca_file: {d}/ca.pem}}}}\n{}",
        config(),
        d = dir.path().display()
    );
    let srv = TestServer::start(&yaml).await;
    let url = format!("https://localhost:{}", srv.running.addrs.grpc.port());

    let with_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .identity(Identity::from_pem(
            client_cert.pem(),
            client_key.serialize_pem(),
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(with_cert)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        portcullis::proto::auth::authorization_client::AuthorizationClient::new(channel);
    assert_eq!(code(&mut client, get("/orders").request()).await, 16);

    let without_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let refused = async {
        let channel = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .tls_config(without_cert)
            .unwrap()
            .connect()
            .await?;
        let mut client =
            portcullis::proto::auth::authorization_client::AuthorizationClient::new(channel);
        client
            .check(get("/orders").request())
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    assert!(
        refused.await.is_err(),
        "a client without a certificate must be refused"
    );
    srv.running.shutdown().await.unwrap();
}

/// TLS files that cannot be used stop the start with the file named, whatever is wrong with them.
#[tokio::test]
async fn unusable_tls_files_stop_the_start_naming_the_file() {
    use rcgen::{CertificateParams, KeyPair};

    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let other_key = KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(d.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(d.join("other.key"), other_key.serialize_pem()).unwrap();
    std::fs::write(
        d.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();

    // (cert_file, key_file, client_ca_file, what the error must name)
    let cases = [
        // A key where the certificate should be: no certificate in it.
        (
            "server.key",
            "server.key",
            None,
            vec!["server.key", "no certificate"],
        ),
        // A certificate where the key should be.
        (
            "server.pem",
            "server.pem",
            None,
            vec!["server.pem", "no private key"],
        ),
        // A key that is not the certificate's.
        (
            "server.pem",
            "other.key",
            None,
            vec![
                "other.key is not the private key of the certificate in",
                "server.pem",
            ],
        ),
        // Broken PEM.
        (
            "garbage.pem",
            "server.key",
            None,
            vec!["garbage.pem: a PEM section has no END line"],
        ),
        (
            "server.pem",
            "server.key",
            Some("garbage.pem"),
            vec!["garbage.pem: a PEM section has no END line"],
        ),
        // A missing file (the config check finds it first).
        (
            "server.pem",
            "missing.key",
            None,
            vec!["missing.key", "does not exist"],
        ),
    ];
    for (cert_file, key_file, ca, names) in cases {
        let ca = ca.map_or(String::new(), |ca| {
            format!(", client_ca_file: {}/{ca}", d.display())
        });
        let yaml = format!(
            "listen: {{grpc: 127.0.0.1:0, tls: {{cert_file: {d}/{cert_file}, key_file: {d}/{key_file}{ca}}}}}\n{}",
            config(),
            d = d.display()
        );
        let path = d.join("portcullis.yaml");
        std::fs::write(&path, yaml).unwrap();
        let err = match portcullis::server::start(&path).await {
            Ok(running) => {
                running.shutdown().await.unwrap();
                panic!("started with {cert_file} and {key_file}");
            }
            Err(e) => e.to_string(),
        };
        for name in names {
            assert!(
                err.contains(name),
                "{cert_file}/{key_file}: {err:?} does not name {name}"
            );
        }
    }
}
