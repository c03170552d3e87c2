//! Any bytes as a CheckRequest, decoded and decided on with a policy that uses every check.
//! Invariant: never panics; a request that is not complete is never allowed.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis::policy::{PolicySet, Runtime, compile};
use portcullis::proto::auth::CheckRequest;
use prost::Message;

const CONFIG: &str = r#"
client_ip: { from: x-forwarded-for, trusted_hops: 1 }
subscriptions:
  keys: [{ id: demo, primary: "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873" }]
apis:
  - name: orders
    match: { hosts: ["*.example.com"], path_prefix: /orders, methods: [GET, POST], context_extensions: { api: orders } }
    subscription_required: true
    ip_filter: { action: allow, addresses: [10.0.0.0/8, "2001:db8::/32", 1.2.3.4-1.2.3.9] }
    client_certificate: { trust_forwarded_client_cert: true, identities: [{ subject: "CN=partner, O=Contoso" }] }
    on_allow: { set_headers: { x-sub: "{subscription.id}", x-ip: "{client_ip}", x-cert: "{cert.thumbprint}" } }
  - name: open
    match: { path_prefix: / }
    subscription_required: false
    on_allow: { set_headers: { x-sub: "{subscription.id}" } }
"#;

static POLICY: LazyLock<PolicySet> = LazyLock::new(|| {
    let src = portcullis::config::parse(CONFIG, std::path::Path::new(".")).expect("fuzz config loads");
    compile(&src, &Runtime::offline()).expect("fuzz config compiles").0
});

static RT: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"));

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CheckRequest::decode(data) else { return };
    let complete = req
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .is_some_and(|h| !h.method.is_empty() && !h.path.is_empty());
    let resp = RT.block_on(portcullis::server::grpc::decide(&POLICY, &req));
    let code = resp.status.as_ref().map_or(0, |s| s.code);
    if !complete {
        assert_ne!(code, 0, "an incomplete CheckRequest was allowed");
    }
    assert!(resp.http_response.is_some(), "every answer carries an HTTP response");
});
