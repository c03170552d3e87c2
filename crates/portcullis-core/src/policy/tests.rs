//! Evaluation tests: a config in YAML, a request, the decision a user would see.

use std::collections::HashMap;
use std::path::Path;

use super::testutil::make_cert;
use super::*;
use crate::config;

fn env(name: &str) -> Option<String> {
    match name {
        "KEY_A" => Some("key-a-primary".into()),
        "KEY_A2" => Some("key-a-secondary".into()),
        "KEY_PROD" => Some("key-product".into()),
        "KEY_ORDERS" => Some("key-orders".into()),
        "KEY_SUSPENDED" => Some("key-suspended".into()),
        _ => None,
    }
}

fn policy(yaml: &str) -> PolicySet {
    let src = config::parse_with_env(yaml, Path::new("."), &env)
        .unwrap_or_else(|e| panic!("config: {e}"));
    compile(&src, &Runtime::default())
        .unwrap_or_else(|e| panic!("compile: {e}"))
        .0
}

fn compile_errors(yaml: &str) -> Vec<String> {
    let src = match config::parse_with_env(yaml, Path::new("."), &env) {
        Ok(s) => s,
        Err(e) => return e.0.iter().map(ToString::to_string).collect(),
    };
    match compile(&src, &Runtime::default()) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

struct Req {
    method: &'static str,
    host: &'static str,
    path: String,
    headers: Headers,
    peer: Option<std::net::IpAddr>,
    cert: String,
    ce: Option<HashMap<String, String>>,
}

impl Req {
    fn get(path: &str) -> Req {
        Req {
            method: "GET",
            host: "api.example.com",
            path: path.into(),
            headers: Headers::new(),
            peer: Some("10.1.2.3".parse().unwrap()),
            cert: String::new(),
            ce: None,
        }
    }
    fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.insert(k.into(), v.as_bytes().to_vec().into());
        self
    }
    fn peer(mut self, ip: &str) -> Req {
        self.peer = Some(ip.parse().unwrap());
        self
    }
    fn cert_pem(mut self, pem: &str) -> Req {
        self.cert = percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
        self
    }
    fn input(&self) -> CheckInput<'_> {
        CheckInput {
            method: self.method,
            host: self.host,
            path: &self.path,
            scheme: "",
            headers: &self.headers,
            peer: self.peer,
            peer_certificate: &self.cert,
            context_extensions: self.ce.as_ref(),
        }
    }
    fn decide(&self, p: &PolicySet) -> Decision {
        futures::executor::block_on(p.decide(&self.input(), explain()))
    }
    fn decide_now(&self, p: &PolicySet) -> Option<Decision> {
        p.decide_now(&self.input(), explain())
    }
}

fn explain() -> EvalOptions {
    EvalOptions {
        explain: true,
        ..Default::default()
    }
}

fn reason(d: &Decision) -> Option<&'static str> {
    d.reason().map(Reason::as_str)
}

fn upstream<'a>(d: &'a Decision, name: &str) -> Option<&'a str> {
    d.upstream_headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_str())
}

const BASE: &str = r#"
subscriptions:
  keys:
    - { id: contoso, scope: all, primary: "${env:KEY_A}", secondary: "${env:KEY_A2}" }
    - { id: starter-sub, scope: "product:starter", primary: "${env:KEY_PROD}" }
    - { id: orders-only, scope: "api:orders", primary: "${env:KEY_ORDERS}" }
    - { id: paused, state: suspended, primary: "${env:KEY_SUSPENDED}" }
products:
  - { name: starter, apis: [catalog] }
apis:
  - name: orders
    match: { hosts: [api.example.com], path_prefix: /orders, methods: [GET, POST] }
    subscription_required: true
    ip_filter: { action: allow, addresses: [10.0.0.0/8, "2001:db8::/32", 192.168.1.10-192.168.1.20] }
    on_allow:
      set_headers: { x-subscription: "{subscription.id}", x-client-ip: "{client_ip}" }
  - name: catalog
    match: { path_prefix: /catalog }
    subscription_required: true
    ip_filter: { action: forbid, addresses: [203.0.113.0/24] }
  - name: open
    match: { path_prefix: /open }
    subscription_required: false
  - name: public
    match: { path_prefix: /public }
"#;

#[test]
fn no_api_matches_denies_by_default() {
    let p = policy(BASE);
    let d = Req::get("/nothing").decide(&p);
    assert_eq!(reason(&d), Some("NoMatchingApi"));
    let Outcome::Deny(den) = &d.outcome else {
        panic!()
    };
    assert_eq!(den.status, 403);
    let p = policy(&format!("{BASE}\nunmatched: allow\n"));
    let d = Req::get("/nothing").decide(&p);
    assert!(d.is_allow());
    // The transports add the decision id header (server::grpc, server::http), once.
    assert_eq!(upstream(&d, "x-portcullis-decision-id"), None);
}

#[test]
fn a_config_without_apis_denies_everything() {
    let d = Req::get("/").decide(&policy(""));
    assert_eq!(reason(&d), Some("NoMatchingApi"));
}

#[test]
fn an_api_with_no_checks_allows() {
    let d = Req::get("/public/x").decide(&policy(BASE));
    assert!(d.is_allow(), "{d:?}");
    assert_eq!(d.api.as_deref(), Some("public"));
}

#[test]
fn subscription_keys_with_apim_semantics() {
    let p = policy(BASE);
    // Missing.
    let d = Req::get("/orders/1").decide(&p);
    assert_eq!(reason(&d), Some("SubscriptionKeyNotFound"));
    let Outcome::Deny(den) = &d.outcome else {
        panic!()
    };
    assert_eq!(den.status, 401);
    assert!(
        den.www_authenticate
            .as_deref()
            .unwrap()
            .starts_with("AzureApiManagementKey realm=\"orders\"")
    );
    // Primary, secondary, query parameter.
    let d = Req::get("/orders/1")
        .header("ocp-apim-subscription-key", "key-a-primary")
        .decide(&p);
    assert!(d.is_allow(), "{d:?}");
    assert_eq!(upstream(&d, "x-subscription"), Some("contoso"));
    assert_eq!(d.remove_headers, vec!["ocp-apim-subscription-key"]);
    assert!(d.remove_query.is_empty());
    assert!(
        Req::get("/orders/1")
            .header("ocp-apim-subscription-key", "key-a-secondary")
            .decide(&p)
            .is_allow()
    );
    let d = Req::get("/orders/1?subscription-key=key-a-primary&x=1").decide(&p);
    assert!(d.is_allow());
    assert_eq!(d.remove_query, vec!["subscription-key"]);
    // The header wins: a wrong header with a valid query key is invalid.
    let d = Req::get("/orders/1?subscription-key=key-a-primary")
        .header("ocp-apim-subscription-key", "wrong")
        .decide(&p);
    assert_eq!(reason(&d), Some("SubscriptionKeyInvalid"));
    // Inactive, out of scope, product scope.
    assert_eq!(
        reason(
            &Req::get("/orders")
                .header("ocp-apim-subscription-key", "key-suspended")
                .decide(&p)
        ),
        Some("SubscriptionKeyInvalid")
    );
    assert_eq!(
        reason(
            &Req::get("/orders")
                .header("ocp-apim-subscription-key", "key-product")
                .decide(&p)
        ),
        Some("SubscriptionKeyInvalid")
    );
    assert!(
        Req::get("/catalog")
            .header("ocp-apim-subscription-key", "key-product")
            .decide(&p)
            .is_allow()
    );
    assert!(
        Req::get("/orders")
            .header("ocp-apim-subscription-key", "key-orders")
            .decide(&p)
            .is_allow()
    );
    assert_eq!(
        reason(
            &Req::get("/catalog")
                .header("ocp-apim-subscription-key", "key-orders")
                .decide(&p)
        ),
        Some("SubscriptionKeyInvalid")
    );
}

#[test]
fn optional_subscription_still_validates_a_present_key() {
    let p = policy(BASE);
    assert!(Req::get("/open").decide(&p).is_allow());
    assert_eq!(
        reason(
            &Req::get("/open")
                .header("ocp-apim-subscription-key", "bogus")
                .decide(&p)
        ),
        Some("SubscriptionKeyInvalid")
    );
    // An API that does not use subscriptions ignores the header.
    assert!(
        Req::get("/public")
            .header("ocp-apim-subscription-key", "bogus")
            .decide(&p)
            .is_allow()
    );
}

#[test]
fn open_product_lets_keyless_requests_in() {
    let yaml = BASE.replace(
        "  - { name: starter, apis: [catalog] }",
        "  - { name: starter, apis: [catalog], subscription_required: false }",
    );
    let p = policy(&yaml);
    assert!(Req::get("/catalog").decide(&p).is_allow());
    assert_eq!(
        reason(&Req::get("/orders").decide(&p)),
        Some("SubscriptionKeyNotFound")
    );
}

#[test]
fn ip_filter_allow_and_forbid() {
    let p = policy(BASE);
    let key = ("ocp-apim-subscription-key", "key-a-primary");
    let d = Req::get("/orders")
        .header(key.0, key.1)
        .peer("11.0.0.1")
        .decide(&p);
    assert_eq!(reason(&d), Some("CallerIpNotAllowed"));
    let Outcome::Deny(den) = &d.outcome else {
        panic!()
    };
    assert_eq!(den.status, 403);
    assert!(den.message.contains("11.0.0.1"));
    assert!(
        Req::get("/orders")
            .header(key.0, key.1)
            .peer("::ffff:10.0.0.1")
            .decide(&p)
            .is_allow()
    );
    assert!(
        Req::get("/orders")
            .header(key.0, key.1)
            .peer("192.168.1.15")
            .decide(&p)
            .is_allow()
    );
    assert!(
        Req::get("/orders")
            .header(key.0, key.1)
            .peer("2001:db8::5")
            .decide(&p)
            .is_allow()
    );
    // IP is checked before the key: an unknown caller learns nothing about keys.
    assert_eq!(
        reason(&Req::get("/orders").peer("11.0.0.1").decide(&p)),
        Some("CallerIpNotAllowed")
    );
    let d = Req::get("/catalog")
        .header(key.0, key.1)
        .peer("203.0.113.9")
        .decide(&p);
    assert_eq!(reason(&d), Some("CallerIpBlocked"));
    assert!(
        Req::get("/catalog")
            .header(key.0, key.1)
            .peer("203.0.114.9")
            .decide(&p)
            .is_allow()
    );
    let mut no_peer = Req::get("/orders").header(key.0, key.1);
    no_peer.peer = None;
    assert_eq!(reason(&no_peer.decide(&p)), Some("FailedToParseCallerIP"));
}

#[test]
fn client_ip_from_forwarded_for() {
    let yaml = format!("client_ip: {{from: x-forwarded-for, trusted_hops: 1}}\n{BASE}");
    let p = policy(&yaml);
    let key = ("ocp-apim-subscription-key", "key-a-primary");
    let d = Req::get("/orders")
        .header(key.0, key.1)
        .peer("127.0.0.1")
        .header("x-forwarded-for", "10.9.9.9, 172.16.0.1")
        .decide(&p);
    assert!(d.is_allow(), "{d:?}");
    assert_eq!(upstream(&d, "x-client-ip"), Some("10.9.9.9"));
    // A spoofed left-most entry does not help.
    let d = Req::get("/orders")
        .header(key.0, key.1)
        .peer("127.0.0.1")
        .header("x-forwarded-for", "10.0.0.1, 8.8.8.8, 172.16.0.1")
        .decide(&p);
    assert_eq!(reason(&d), Some("CallerIpNotAllowed"));
    let d = Req::get("/orders")
        .header(key.0, key.1)
        .header("x-forwarded-for", "garbage, 172.16.0.1")
        .decide(&p);
    assert_eq!(reason(&d), Some("FailedToParseCallerIP"));
}

#[test]
fn matching_hosts_methods_prefix_and_context_extensions() {
    let yaml = r#"
apis:
  - name: by-ce
    match: { context_extensions: { api: special } }
  - name: orders-get
    match: { hosts: ["*.example.com"], path_prefix: /orders, methods: [GET] }
  - name: fallback
    match: { path_prefix: / }
    ip_filter: { action: allow, addresses: [1.1.1.1] }
"#;
    let p = policy(yaml);
    assert_eq!(
        Req::get("/orders/1").decide(&p).api.as_deref(),
        Some("orders-get")
    );
    let mut post = Req::get("/orders/1");
    post.method = "POST";
    assert_eq!(post.decide(&p).api.as_deref(), Some("fallback"));
    assert_eq!(
        Req::get("/ordersX").decide(&p).api.as_deref(),
        Some("fallback")
    );
    assert_eq!(
        Req::get("/orders?x=1").decide(&p).api.as_deref(),
        Some("orders-get")
    );
    let mut other_host = Req::get("/orders");
    other_host.host = "example.com:443";
    assert_eq!(other_host.decide(&p).api.as_deref(), Some("fallback"));
    let mut with_port = Req::get("/orders");
    with_port.host = "api.example.com:8443";
    assert_eq!(with_port.decide(&p).api.as_deref(), Some("orders-get"));
    let mut ce = Req::get("/orders");
    ce.ce = Some([("api".to_string(), "special".to_string())].into());
    assert_eq!(ce.decide(&p).api.as_deref(), Some("by-ce"));
    // Traversal is refused before matching: backends disagree on what it names.
    let d = Req::get("/public/../orders/1").decide(&p);
    assert_eq!(d.api, None);
    assert_eq!(reason(&d), Some("RequestPathNotCanonical"));
}

#[test]
fn client_certificate_identities() {
    let cert = make_cert("partner", "Contoso", &["partner.example.com"], -1, 30);
    let der_sha1 = {
        use sha1::Digest;
        hex::encode_upper(sha1::Sha1::digest(&cert.der))
    };
    let yaml = format!(
        r#"
apis:
  - name: by-thumb
    match: {{ path_prefix: /thumb }}
    client_certificate:
      identities: [{{ thumbprint: "{der_sha1}" }}]
    on_allow: {{ set_headers: {{ x-cert: "{{cert.thumbprint}}" }} }}
  - name: by-subject
    match: {{ path_prefix: /subject }}
    client_certificate:
      identities: [{{ subject: "CN=someone-else" }}, {{ subject: "CN=partner,O=Contoso", dns_name: partner.example.com }}]
  - name: xfcc
    match: {{ path_prefix: /xfcc }}
    client_certificate: {{ trust_forwarded_client_cert: true, identities: [{{ common_name: partner }}] }}
  - name: wrong
    match: {{ path_prefix: /wrong }}
    client_certificate: {{ identities: [{{ subject: "CN=partner,O=Other" }}] }}
"#
    );
    let p = policy(&yaml);
    let d = Req::get("/thumb").cert_pem(&cert.pem).decide(&p);
    assert!(d.is_allow(), "{d:?}");
    assert_eq!(upstream(&d, "x-cert"), Some(der_sha1.as_str()));
    assert!(
        Req::get("/subject")
            .cert_pem(&cert.pem)
            .decide(&p)
            .is_allow()
    );
    let d = Req::get("/wrong").cert_pem(&cert.pem).decide(&p);
    assert_eq!(reason(&d), Some("ClientCertificateIdentityNotMatched"));
    assert_eq!(
        reason(&Req::get("/thumb").decide(&p)),
        Some("ClientCertificateMissing")
    );
    let Outcome::Deny(den) = &Req::get("/thumb").decide(&p).outcome else {
        panic!()
    };
    assert_eq!(den.status, 401);
    assert_eq!(
        reason(&Req::get("/thumb").cert_pem("garbage").decide(&p)),
        Some("ClientCertificateInvalid")
    );
    // XFCC only where trusted.
    let enc = percent_encoding::utf8_percent_encode(&cert.pem, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let xfcc = format!("By=spiffe://proxy;Cert=\"{enc}\"");
    assert!(
        Req::get("/xfcc")
            .header("x-forwarded-client-cert", &xfcc)
            .decide(&p)
            .is_allow()
    );
    assert_eq!(
        reason(
            &Req::get("/thumb")
                .header("x-forwarded-client-cert", &xfcc)
                .decide(&p)
        ),
        Some("ClientCertificateMissing")
    );
    let expired = make_cert("partner", "Contoso", &[], -30, -1);
    assert_eq!(
        reason(&Req::get("/xfcc").cert_pem(&expired.pem).decide(&p)),
        Some("ClientCertificateExpired")
    );
}

#[test]
fn shadow_mode_allows_but_remembers_the_reason() {
    let yaml = BASE.replace(
        "    subscription_required: true\n    ip_filter: { action: allow",
        "    mode: shadow\n    subscription_required: true\n    ip_filter: { action: allow",
    );
    let p = policy(&yaml);
    let d = Req::get("/orders").decide(&p);
    assert!(d.is_allow());
    assert_eq!(d.waived, Some(Reason::SubscriptionKeyNotFound));
    assert_eq!(reason(&d), Some("SubscriptionKeyNotFound"));
}

#[test]
fn missing_template_value_removes_the_callers_header() {
    let yaml = r#"
apis:
  - name: a
    subscription_required: false
    on_allow:
      set_headers: { x-subscription: "{subscription.id}" }
      remove_headers: [X-Secret]
"#;
    let d = Req::get("/")
        .header("x-subscription", "spoofed")
        .decide(&policy(yaml));
    assert!(d.is_allow());
    assert_eq!(upstream(&d, "x-subscription"), None);
    assert!(d.remove_headers.contains(&"x-subscription".to_string()));
    assert!(d.remove_headers.contains(&"x-secret".to_string()));
}

#[test]
fn oversized_headers_are_refused_before_anything_else() {
    let p = policy("limits: {max_header_bytes: 1000}\napis: [{name: a}]\n");
    let d = Req::get("/").header("x-big", &"a".repeat(2000)).decide(&p);
    assert_eq!(reason(&d), Some("RequestHeadersTooLarge"));
    let Outcome::Deny(den) = &d.outcome else {
        panic!()
    };
    assert_eq!(den.status, 431);
}

#[test]
fn connection_limits_are_checked_with_their_paths() {
    let errs = compile_errors(
        "limits: {max_connections: 0, header_read_timeout: soon, idle_timeout: 0s, \
         max_concurrent_streams: 0, keepalive_interval: 30s, keepalive_timeout: 0ms}\n",
    )
    .join("\n");
    for want in [
        "limits.max_connections: must be greater than 0",
        "limits.header_read_timeout: `soon` is not a duration",
        "limits.idle_timeout: `0s` must be greater than 0",
        "limits.max_concurrent_streams: must be greater than 0",
        "limits.keepalive_timeout: `0ms` must be greater than 0",
    ] {
        assert!(errs.contains(want), "{want} in {errs}");
    }
    assert!(!errs.contains("keepalive_interval"), "{errs}");
    let src = config::parse_with_env(
        "limits: {max_connections: 64, header_read_timeout: 2s, max_header_bytes: 1000}\n",
        Path::new("."),
        &env,
    )
    .unwrap();
    let c = compile(&src, &Runtime::default()).unwrap().1.connections;
    assert_eq!(c.max_connections, 64);
    assert_eq!(c.header_read_timeout, std::time::Duration::from_secs(2));
    assert_eq!(c.idle_timeout, std::time::Duration::from_secs(300));
    assert_eq!(c.max_request_head_bytes, 1000 + 16 * 1024);
}

#[test]
fn non_utf8_key_is_invalid_not_a_crash() {
    let p = policy(BASE);
    let mut r = Req::get("/orders");
    r.headers.insert(
        "ocp-apim-subscription-key".into(),
        vec![0xff, 0xfe, 0x00].into(),
    );
    assert_eq!(reason(&r.decide(&p)), Some("SubscriptionKeyInvalid"));
}

#[test]
fn explanation_lists_every_check() {
    let d = Req::get("/orders")
        .header("ocp-apim-subscription-key", "key-a-primary")
        .decide(&policy(BASE));
    let checks: Vec<_> = d.steps.iter().map(|s| (s.check, s.result)).collect();
    assert_eq!(
        checks,
        vec![
            ("match", StepResult::Pass),
            ("ip_filter", StepResult::Pass),
            ("subscription", StepResult::Pass),
            ("client_certificate", StepResult::Skip),
            ("jwt", StepResult::Skip),
            ("backend_credential", StepResult::Skip),
        ]
    );
}

#[test]
fn ten_mistakes_ten_errors() {
    let yaml = r#"
client_ip: { from: header }
unmatched: maybe
subscriptions:
  keys:
    - { id: a, scope: "product:nope", primary: "plain-text-key" }
    - { id: b, primary: "sha256:abc" }
apis:
  - name: x
    match: { hosts: ["*bad"], path_prefix: orders, methods: ["G ET"] }
    ip_filter: { action: block, addresses: [10.0.0.1/8, 1.2.3.4-1.2.3.1] }
    on_allow: { set_headers: { x-a: "{nope}" } }
    mode: loud
  - name: x
"#;
    let errs = compile_errors(yaml);
    let expect = [
        "client_ip.from: `header`",
        "unmatched: `maybe`",
        "subscriptions.keys[0].scope: no product is named `nope`",
        "subscriptions.keys[0].primary: plain keys must not be written",
        "subscriptions.keys[1].primary: a hash is `sha256:`",
        "apis[0].match.hosts[0]",
        "apis[0].match.path_prefix: `orders` must start with `/`",
        "apis[0].match.methods[0]",
        "apis[0].ip_filter.action: `block`",
        "apis[0].ip_filter.addresses[0]: `10.0.0.1/8` has host bits set",
        "apis[0].ip_filter.addresses[1]: range `1.2.3.4-1.2.3.1` starts after it ends",
        "apis[0].on_allow.set_headers.x-a: unknown placeholder",
        "apis[0].mode: `loud`",
        "apis[1].name: `x` is already the name of apis[0]",
    ];
    for e in expect {
        assert!(
            errs.iter().any(|got| got.starts_with(e)),
            "missing `{e}` in {errs:#?}"
        );
    }
    assert!(
        errs.iter().all(|e| !e.contains("plain-text-key")),
        "a secret leaked into an error: {errs:#?}"
    );
}

#[test]
fn a_panic_is_a_deny_with_internal() {
    let d = futures::executor::block_on(deny_on_panic(async {
        if std::hint::black_box(true) {
            panic!("bug");
        }
        Decision::new()
    }));
    assert_eq!(reason(&d), Some("Internal"));
    let Outcome::Deny(den) = &d.outcome else {
        panic!()
    };
    assert_eq!(den.status, 500);
}

#[test]
fn subscription_key_hashes_are_checked_per_slot() {
    let h = |k: &str| subscription::format_hash(&subscription::hash_key(k));
    let yaml = format!(
        r#"
subscriptions:
  keys:
    - {{ id: only-secondary, secondary: "{}" }}
    - {{ id: both, primary: "{}", secondary: "{}" }}
    - {{ id: clash, primary: "{}" }}
    - {{ id: none }}
apis:
  - {{ name: orders, match: {{ path_prefix: /orders }}, subscription_required: true }}
"#,
        h("second"),
        h("one"),
        h("two"),
        h("two"),
    );
    let errs = compile_errors(&yaml);
    assert_eq!(
        errs,
        vec![
            "subscriptions.keys[2]: a key of this subscription is also a key of `both`",
            "subscriptions.keys[3]: a subscription needs a primary or a secondary key",
        ]
    );
    let ok = yaml
        .replace(
            &format!("    - {{ id: clash, primary: \"{}\" }}\n", h("two")),
            "",
        )
        .replace("    - { id: none }\n", "");
    let p = policy(&ok);
    for (key, id) in [
        ("second", "only-secondary"),
        ("one", "both"),
        ("two", "both"),
    ] {
        let d = Req::get("/orders/1")
            .header("ocp-apim-subscription-key", key)
            .decide(&p);
        assert!(d.is_allow(), "{key}: {d:?}");
        assert_eq!(d.facts.subscription_id.as_deref(), Some(id), "{key}");
    }
}

/// What a user of the decision sees: outcome, reason, status, headers in and out.
fn answer(d: &Decision) -> String {
    let status = match &d.outcome {
        Outcome::Allow => 200,
        Outcome::Deny(den) => den.status,
    };
    let set: Vec<String> = d
        .upstream_headers
        .iter()
        .map(|h| format!("{}={}", h.name, h.value))
        .collect();
    format!(
        "{status} {:?} set {set:?} remove {:?} query {:?}",
        reason(d),
        d.remove_headers,
        d.remove_query
    )
}

#[test]
fn decide_now_answers_on_the_callers_thread_when_nothing_is_fetched() {
    let p = policy(BASE);
    let requests = [
        Req::get("/orders/1").header("ocp-apim-subscription-key", "key-a-primary"),
        Req::get("/orders/1?subscription-key=key-orders"),
        Req::get("/orders/1"),
        Req::get("/orders/1")
            .header("ocp-apim-subscription-key", "key-a-primary")
            .peer("8.8.8.8"),
        Req::get("/open/x"),
        Req::get("/nothing"),
        Req::get("/orders/%2e%2e/admin"),
    ];
    for req in &requests {
        let now = req
            .decide_now(&p)
            .unwrap_or_else(|| panic!("{}: nothing to fetch, yet it would wait", req.path));
        assert_eq!(answer(&now), answer(&req.decide(&p)), "{}", req.path);
    }
}

const UNREACHABLE_KEYS: &str = r#"
identity_providers:
  - { name: corp, issuer: "https://idp.test", jwks_uri: "http://127.0.0.1:1/jwks" }
apis:
  - name: orders
    match: { path_prefix: /orders }
    jwt: { providers: [corp] }
"#;

/// A JWT-shaped token whose key (`kid: k1`) no provider holds yet.
fn unverifiable_token() -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#),
        b64(r#"{"iss":"https://idp.test","sub":"alice","exp":4102444800}"#),
        b64("not a signature")
    )
}

#[tokio::test]
async fn decide_now_says_when_signing_keys_would_have_to_be_fetched() {
    let src = config::parse(UNREACHABLE_KEYS, Path::new(".")).unwrap();
    let runtime = Runtime::on_demand();
    let p = compile(&src, &runtime).unwrap().0;
    let with_token =
        Req::get("/orders/1").header("authorization", &format!("Bearer {}", unverifiable_token()));
    assert!(
        with_token.decide_now(&p).is_none(),
        "the key must be fetched: no decision without waiting"
    );
    assert_eq!(
        runtime.identity.providers()[0].fetches_failed,
        0,
        "and nothing was fetched"
    );
    // Waiting, the fetch is made (and fails: closed port), and the answer is the outage's.
    let waited = p.decide(&with_token.input(), explain()).await;
    assert_eq!(reason(&waited), Some("IdentityProviderUnavailable"));
    assert_eq!(runtime.identity.providers()[0].fetches_failed, 1);
    // No token at all needs no key: decided at once.
    let none = Req::get("/orders/1")
        .decide_now(&p)
        .expect("no fetch needed");
    assert_eq!(reason(&none), Some("TokenNotPresent"));
}
