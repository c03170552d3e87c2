//! Any bytes as an HTTP/1.1 request to the forward-auth endpoint (parsed with httparse, hyper's own
//! parser, and dropped where hyper would refuse it), decided on with a policy that needs a key.
//! Invariants: never panics; an allow means the demo key was in the request; every answer has a
//! decision id.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis::policy::{PolicySet, Runtime, compile};

const CONFIG: &str = r#"
client_ip: { from: x-forwarded-for, trusted_hops: 1 }
subscriptions:
  keys: [{ id: demo, primary: "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873" }]
apis:
  - name: orders
    match: { hosts: ["*.example.com"], path_prefix: /orders, methods: [GET, POST] }
    subscription_required: true
    ip_filter: { action: forbid, addresses: [10.0.0.0/8] }
    on_allow: { set_headers: { x-sub: "{subscription.id}", x-ip: "{client_ip}" } }
"#;
const KEY: &[u8] = b"demo-key-123";

static POLICY: LazyLock<PolicySet> = LazyLock::new(|| {
    let src = portcullis::config::parse(CONFIG, std::path::Path::new(".")).expect("fuzz config loads");
    compile(&src, &Runtime::offline()).expect("fuzz config compiles").0
});

static RT: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"));

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else { return };
    let mut builder = axum::http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(req) = builder.body(()) else { return };
    let (parts, ()) = req.into_parts();
    let peer = "192.0.2.1".parse().expect("literal");
    let d = RT.block_on(portcullis::server::http::decide_forward_auth(&POLICY, &parts, peer));
    if d.is_allow() {
        assert!(
            data.windows(KEY.len()).any(|w| w == KEY) || contains_encoded_key(data),
            "allowed without the key"
        );
    }
    let resp = portcullis::server::http::to_http_response(&d);
    assert!(resp.headers().contains_key("x-portcullis-decision-id"));
});

/// The key may arrive percent-encoded in the query string.
fn contains_encoded_key(data: &[u8]) -> bool {
    data.windows(3).any(|w| w[0] == b'%')
}
