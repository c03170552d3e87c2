//! The realistic policy of the performance work, in process: one API that uses every check
//! (RS256 JWT with audience, scope and a required claim; IP allow list; subscription key; client
//! certificate identity by thumbprint; claim headers; a backend credential from the token cache),
//! the CheckRequest Envoy sends for an allowed call, and the allow-everything floor.
//! Shared by benches/wire.rs and tests/allocations.rs.
#![allow(dead_code)]

#[path = "../jwt_common/mod.rs"]
mod keys;

use std::path::Path;

use portcullis::policy::{PolicySet, Runtime, compile};
use portcullis::proto::auth::{AttributeContext, CheckRequest, attribute_context};
use portcullis::proto::core::{Address, SocketAddress, address, socket_address};
use prost::Message;

const ISS: &str = "https://idp.test/corp";
/// `echo -n demo-key-123 | portcullis hash-key`
const KEY_HASH: &str = "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873";

/// A policy and a request it allows.
pub struct Scenario {
    pub policy: PolicySet,
    pub request: CheckRequest,
    /// `request` encoded as protobuf.
    pub encoded: Vec<u8>,
}

/// Everything allowed, no checks: the cost of the adapter and response alone.
pub fn floor() -> Scenario {
    let src = portcullis::config::parse("unmatched: allow\n", Path::new(".")).expect("floor");
    let policy = compile(&src, &Runtime::offline())
        .expect("floor compiles")
        .0;
    scenario(policy, request(&[], ""))
}

/// The realistic policy with a request it allows (the token is signed once, here).
pub fn realistic() -> Scenario {
    realistic_with("", false)
}

/// The realistic policy without `dynamic_metadata`: what the metadata costs is the difference.
pub fn realistic_without_metadata() -> Scenario {
    realistic_with("dynamic_metadata: false", false)
}

/// The realistic policy with `client_certificate.trust`: the chain to the CA is verified (once;
/// then from the verified-chain cache). What chain trust costs is the difference.
pub fn realistic_with_trust() -> Scenario {
    realistic_with("", true)
}

fn realistic_with(top: &str, trust: bool) -> Scenario {
    let key = keys::rsa(0, Some("k1"));
    let mut claims = keys::claims(ISS, "api://orders", "client-42");
    claims["scope"] = "orders.read orders.write".into();
    claims["tenant"] = "contoso".into();
    claims["roles"] = serde_json::json!(["reader", "writer"]);
    let token = key.token(claims);

    // A client certificate issued by a CA (the CA file is what `trust` names).
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Contoso Issuing CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let ca_file = std::env::temp_dir().join(format!(
        "portcullis-realistic-ca-{}.pem",
        std::process::id()
    ));
    std::fs::write(&ca_file, ca_cert.pem()).expect("CA file");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "partner");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Contoso");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert_key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&cert_key, &issuer).expect("cert");
    let trust = if trust {
        format!("\n      trust: {{ ca_files: [\"{}\"] }}", ca_file.display())
    } else {
        String::new()
    };
    let thumbprint = ring_sha1_hex(cert.der());
    let cert_pem: String =
        percent_encoding::utf8_percent_encode(&cert.pem(), percent_encoding::NON_ALPHANUMERIC)
            .to_string();

    let yaml = format!(
        r#"
{top}
identity_providers:
  - {{ name: corp, issuer: "{ISS}", algorithms: [RS256], keys: [{jwk}] }}
credentials:
  - {{ name: backend, grant: static, token: "${{env:BACKEND_TOKEN}}" }}
subscriptions:
  keys: [{{ id: demo, primary: "{KEY_HASH}" }}]
apis:
  - name: orders
    match: {{ hosts: [api.example.com], path_prefix: /orders, methods: [GET, POST] }}
    subscription_required: true
    ip_filter: {{ action: allow, addresses: [127.0.0.0/8, 10.0.0.0/8, "2001:db8::/32"] }}
    client_certificate:
      identities: [{{ thumbprint: "{thumbprint}" }}]{trust}
    jwt:
      providers: [corp]
      audiences: [api://orders]
      scopes: {{ all: [orders.read] }}
      required_claims: [{{ name: tenant, values: [contoso] }}]
    on_allow:
      set_headers:
        x-user-id: "{{jwt.sub}}"
        x-tenant: "{{jwt.tenant}}"
        x-subscription-id: "{{subscription.id}}"
      backend_credential: {{ name: backend }}
unmatched: deny
"#,
        jwk = key.jwk
    );
    let src = portcullis::config::parse_with_env(&yaml, Path::new("."), &|name| {
        (name == "BACKEND_TOKEN").then(|| "backend-secret-token".to_string())
    })
    .expect("realistic config loads");
    let policy = compile(&src, &Runtime::offline())
        .expect("realistic config compiles")
        .0;
    let request = request(
        &[
            ("authorization", &format!("Bearer {token}")),
            ("ocp-apim-subscription-key", "demo-key-123"),
        ],
        &cert_pem,
    );
    scenario(policy, request)
}

fn scenario(policy: PolicySet, request: CheckRequest) -> Scenario {
    let encoded = request.encode_to_vec();
    Scenario {
        policy,
        request,
        encoded,
    }
}

/// The CheckRequest Envoy 1.40 sends for `GET http://api.example.com/orders/1` from 127.0.0.1.
fn request(extra: &[(&str, &str)], certificate: &str) -> CheckRequest {
    let headers: portcullis::policy::Headers = [
        (":authority", "api.example.com"),
        (":method", "GET"),
        (":path", "/orders/1"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "6f1c2b8e-0d7a-4e57-9a4a-2f3c1d6b7e8f"),
    ]
    .iter()
    .chain(extra.iter())
    .map(|(k, v)| ((*k).to_string(), v.as_bytes().to_vec().into()))
    .collect();
    let socket = |ip: &str, port: u32| {
        Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        })
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: socket("127.0.0.1", 40000),
                certificate: certificate.into(),
                ..Default::default()
            }),
            destination: Some(attribute_context::Peer {
                address: socket("127.0.0.1", 8080),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    id: "1234567890".into(),
                    method: "GET".into(),
                    host: "api.example.com".into(),
                    path: "/orders/1".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: headers.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn ring_sha1_hex(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    d.as_ref().iter().map(|b| format!("{b:02X}")).collect()
}
