//! `portcullis envoy-config`: the ext_authz filter's header allow-list is exactly what the compiled
//! policy reads, plus the trace context headers; the rest of the filter is fixed (fail closed,
//! no body, the peer certificate only when a rule needs it). Envoy itself validates the output in
//! tests/e2e/test_envoy_config.py.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// The headers the trace context propagators read (src/telemetry/traces.rs).
const TRACE: [&str; 7] = [
    "b3",
    "traceparent",
    "tracestate",
    "x-b3-flags",
    "x-b3-sampled",
    "x-b3-spanid",
    "x-b3-traceid",
];

/// An inline RSA key (examples/portcullis.yaml's demo key): the config compiles offline.
const JWK: &str = r#"{"kty": "RSA", "kid": "hR1m6BRcRneD0N_S", "alg": "RS256", "use": "sig", "n": "5zxeKKASnLYdLWUq4pH6Q3VhqfvdxJXv4vI2MYHP23uyX-8OQPOwEFVzddjkOPsldbcTa_AMFUB7ycR6drmpWaKmJ6_kSnslM37R9eoiynq_jdNjpZ6HTzD07W3VwSx0dxEPd-ABS4lOnLhwmdtBcUnT2Xp7aj7r8vz0vAqvca7xmZmzQvqBgpA0B0gIBcUd6P5R3Yfy5NWNJ79Dj67jOr3nLe4X61RvIObDY7wSR56csWD2sKkdMMTuS6bFm-sLexz8fO0wEyLUyd7RVmdiNrQ88VhvXqdiQ8CGFnhlmbFvyIkmin3cbnMwKNNQxUsKiTLiqmfBpmQ6RZJCVeXq1w", "e": "AQAB"}"#;

const KEY_HASH: &str = "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873";

/// A custom token header, a token cookie, XFF client addresses, forwarded client certificates and
/// subscription keys in a custom header.
fn reading_config() -> String {
    format!(
        r#"
client_ip: {{from: x-forwarded-for, trusted_hops: 1}}
identity_providers:
  - {{name: demo, issuer: "https://issuer.example.com/demo", algorithms: [RS256], keys: [{JWK}]}}
subscriptions:
  header: X-Api-Key
  query: api-key
  keys: [{{id: demo, scope: all, primary: "{KEY_HASH}"}}]
apis:
  - name: keyed
    match: {{path_prefix: /keyed}}
    subscription_required: true
    on_allow:
      set_headers: {{x-subscription: "{{subscription.id}}"}}
      remove_headers: [x-internal]
  - name: token
    match: {{path_prefix: /token}}
    jwt:
      providers: [demo]
      from: {{header: X-Token}}
    on_allow:
      set_headers: {{x-user-id: "{{jwt.sub}}"}}
  - name: browser
    match: {{path_prefix: /browser}}
    jwt:
      providers: [demo]
      from: {{cookie: session}}
  - name: query-token
    match: {{path_prefix: /query-token}}
    jwt:
      providers: [demo]
      from: {{query: access_token}}
  - name: partner
    match: {{path_prefix: /partner}}
    client_certificate:
      trust_forwarded_client_cert: true
unmatched: deny
"#
    )
}

/// Everything allowed: nothing is read but the request line (and the trace context).
const OPEN_CONFIG: &str = "apis:\n  - name: open\n    match: {path_prefix: /}\nunmatched: allow\n";

fn envoy_config(yaml: &str, args: &[&str]) -> (String, serde_yaml::Value) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = Command::new(BIN)
        .arg("envoy-config")
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    let filter = doc[0].clone();
    assert_eq!(
        filter["name"].as_str(),
        Some("envoy.filters.http.ext_authz")
    );
    (text, filter["typed_config"].clone())
}

fn names(list: &serde_yaml::Value) -> BTreeSet<String> {
    list["patterns"]
        .as_sequence()
        .unwrap_or_else(|| panic!("no patterns in {list:?}"))
        .iter()
        .map(|p| {
            assert_eq!(p["ignore_case"].as_bool(), Some(true), "{p:?}");
            p["exact"].as_str().unwrap().to_string()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn grpc_filter_lists_exactly_the_headers_the_policy_reads() {
    let (text, tc) = envoy_config(&reading_config(), &[]);
    let mut expected = set(&[
        "x-api-key",
        "x-forwarded-for",
        "x-forwarded-client-cert",
        "x-token",
        "cookie",
    ]);
    expected.extend(set(&TRACE));
    assert_eq!(names(&tc["allowed_headers"]), expected, "{text}");
    assert_eq!(
        tc["@type"].as_str(),
        Some("type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    );
    assert_eq!(tc["transport_api_version"].as_str(), Some("V3"));
    assert_eq!(
        tc["grpc_service"]["envoy_grpc"]["cluster_name"].as_str(),
        Some("portcullis")
    );
    assert_eq!(tc["grpc_service"]["timeout"].as_str(), Some("0.25s"));
    assert_eq!(tc["failure_mode_allow"].as_bool(), Some(false));
    assert_eq!(
        tc["status_on_error"]["code"].as_str(),
        Some("ServiceUnavailable")
    );
    // A client_certificate rule exists.
    assert_eq!(tc["include_peer_certificate"].as_bool(), Some(true));
    assert!(tc.get("with_request_body").is_none(), "{text}");
    assert!(tc.get("http_service").is_none(), "{text}");
    // The query parameters ride in the path; the HCM settings to pair with are spelled out.
    for needle in [
        "api-key",
        "access_token",
        "normalize_path: true",
        "merge_slashes: true",
        "path_with_escaped_slashes_action: REJECT_REQUEST",
        "http2_protocol_options",
        "grpc_health_check",
        "max_header_bytes",
    ] {
        assert!(text.contains(needle), "no {needle} in:\n{text}");
    }
}

#[test]
fn an_open_policy_lists_only_the_trace_headers_and_no_certificate() {
    let (text, tc) = envoy_config(OPEN_CONFIG, &["--timeout", "1500ms", "--cluster", "authz"]);
    assert_eq!(names(&tc["allowed_headers"]), set(&TRACE), "{text}");
    assert!(tc.get("include_peer_certificate").is_none(), "{text}");
    assert_eq!(tc["grpc_service"]["timeout"].as_str(), Some("1.5s"));
    assert_eq!(
        tc["grpc_service"]["envoy_grpc"]["cluster_name"].as_str(),
        Some("authz")
    );
}

#[test]
fn peer_address_and_default_subscription_header() {
    // client_ip from the peer: no x-forwarded-for; the default key header.
    let yaml = format!(
        "subscriptions:\n  keys: [{{id: demo, scope: all, primary: \"{KEY_HASH}\"}}]\napis:\n  - name: a\n    match: {{path_prefix: /a}}\n    subscription_required: false\n"
    );
    let (text, tc) = envoy_config(&yaml, &[]);
    let mut expected = set(&["ocp-apim-subscription-key"]);
    expected.extend(set(&TRACE));
    assert_eq!(names(&tc["allowed_headers"]), expected, "{text}");
}

#[test]
fn http_service_filter_lets_through_what_portcullis_sets() {
    let (text, tc) = envoy_config(&reading_config(), &["--transport", "http"]);
    let mut expected = set(&[
        "x-api-key",
        "x-forwarded-for",
        "x-forwarded-client-cert",
        "x-token",
        "cookie",
    ]);
    expected.extend(set(&TRACE));
    assert_eq!(names(&tc["allowed_headers"]), expected, "{text}");
    let hs = &tc["http_service"];
    assert_eq!(
        hs["server_uri"]["cluster"].as_str(),
        Some("portcullis_http")
    );
    assert_eq!(hs["server_uri"]["timeout"].as_str(), Some("0.25s"));
    assert_eq!(hs["path_prefix"].as_str(), Some("/authz"));
    assert_eq!(
        names(&hs["authorization_response"]["allowed_upstream_headers"]),
        set(&["x-portcullis-decision-id", "x-subscription", "x-user-id"])
    );
    assert_eq!(
        names(&hs["authorization_response"]["allowed_client_headers"]),
        set(&[
            "content-type",
            "www-authenticate",
            "x-portcullis-decision-id"
        ])
    );
    // http_service cannot carry the peer certificate: not set, and said so.
    assert!(tc.get("include_peer_certificate").is_none(), "{text}");
    assert!(tc.get("grpc_service").is_none(), "{text}");
    assert!(text.contains("http_health_check"), "{text}");
    assert!(text.contains("x-forwarded-uri"), "{text}");
}

#[test]
fn an_invalid_config_is_refused_with_exit_2() {
    let yaml = "apis:\n  - name: a\n    match: {path_prefix: x}\n";
    let stderr = common::refuses("envoy-config", yaml);
    assert!(stderr.contains("apis[0].match.path_prefix"), "{stderr}");
}
