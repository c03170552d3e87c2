//! The Prometheus `/metrics` endpoint, in process: decision counters by API, outcome and reason
//! (gRPC and forward-auth alike), the decision-duration histogram's buckets, config reload
//! counters, and the JWKS-fetch and token-cache counts the identity and credentials modules keep.

mod common;
#[path = "jwt_common/fake_idp.rs"]
mod fake_idp;
#[path = "jwt_common/mod.rs"]
mod keys;
mod telemetry_common;

use fake_idp::FakeIdp;

use common::{TestServer, get, seen};
use telemetry_common::{KEY, sample};

// ---------------------------------------------------------------------------------------------
// /metrics, in process.

#[tokio::test]
async fn metrics_endpoint_counts_decisions_reloads_key_fetches_and_token_lookups() {
    let hash = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(KEY))
    );
    let yaml = format!(
        r#"
subscriptions:
  keys: [{{ id: contoso, primary: "{hash}" }}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    subscription_required: true
"#
    );
    let srv = TestServer::start(&yaml).await;
    let http = srv.running.addrs.http.unwrap();
    let scrape = || async move {
        reqwest::get(format!("http://{http}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let decisions = |text: &str, labels: &[(&str, &str)]| {
        sample(text, "portcullis_decisions_total", labels).unwrap_or(0.0)
    };

    let before = scrape().await;
    assert_eq!(
        sample(
            &before,
            "portcullis_config_reloads_total",
            &[("result", "success")]
        ),
        Some(0.0),
        "reload counters exist from the start"
    );
    assert_eq!(
        sample(
            &before,
            "portcullis_decisions_total",
            &[("outcome", "error"), ("reason", "Overloaded")]
        ),
        Some(0.0)
    );

    let mut client = srv.client().await;
    for _ in 0..3 {
        assert_eq!(
            seen(
                &client
                    .check(
                        get("/orders/1")
                            .header("ocp-apim-subscription-key", KEY)
                            .request()
                    )
                    .await
                    .unwrap()
                    .into_inner()
            )
            .code,
            0
        );
    }
    assert_eq!(
        seen(
            &client
                .check(
                    get("/orders/1")
                        .header("ocp-apim-subscription-key", "wrong")
                        .request()
                )
                .await
                .unwrap()
                .into_inner()
        )
        .status,
        Some(401)
    );
    assert_eq!(
        seen(
            &client
                .check(get("/nowhere").request())
                .await
                .unwrap()
                .into_inner()
        )
        .status,
        Some(403)
    );
    // Forward-auth decisions count the same way.
    let resp = reqwest::Client::new()
        .get(format!("http://{http}/authz/orders/2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let text = scrape().await;
    assert_eq!(
        decisions(&text, &[("api", "orders"), ("outcome", "allow")]),
        3.0
    );
    assert_eq!(
        decisions(
            &text,
            &[
                ("api", "orders"),
                ("outcome", "deny"),
                ("reason", "SubscriptionKeyInvalid")
            ]
        ),
        1.0
    );
    assert_eq!(
        decisions(
            &text,
            &[
                ("api", "orders"),
                ("outcome", "deny"),
                ("reason", "SubscriptionKeyNotFound")
            ]
        ),
        1.0
    );
    assert_eq!(
        decisions(&text, &[("outcome", "deny"), ("reason", "NoMatchingApi")]),
        1.0
    );

    // The duration histogram: every bucket, cumulative counts, and a count that matches the decisions.
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let hist = parsed
        .samples
        .iter()
        .find(|s| {
            s.metric == "portcullis_decision_duration_seconds"
                && s.labels.get("api") == Some("orders")
                && s.labels.get("outcome") == Some("allow")
        })
        .expect("histogram for orders/allow");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("{:?}", hist.value)
    };
    let bounds: Vec<f64> = buckets
        .iter()
        .map(|b| b.less_than)
        .filter(|b| b.is_finite())
        .collect();
    assert_eq!(bounds, portcullis::telemetry::DURATION_BUCKETS);
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "cumulative buckets"
    );
    assert_eq!(buckets.last().unwrap().count, 3.0);
    assert_eq!(
        sample(
            &text,
            "portcullis_decision_duration_seconds_count",
            &[("api", "orders"), ("outcome", "allow")]
        ),
        Some(3.0)
    );

    // A rejected reload, then a good one.
    srv.write_config("apis: [ { name: broken, unknown_key: 1 } ]");
    assert!(srv.running.reload().await.is_err());
    srv.write_config(&yaml);
    assert!(srv.running.reload().await.is_ok());
    let text = scrape().await;
    assert_eq!(
        sample(
            &text,
            "portcullis_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            "portcullis_config_reloads_total",
            &[("result", "success")]
        )
        .unwrap()
            >= 1.0
    );

    // Key fetches and token lookups are counted by the identity and credentials modules
    // themselves, and /metrics reads those counts when scraped. Real events: a provider whose key
    // set is served, one whose key server is down, and a credential whose token endpoint is down.
    let idp = FakeIdp::start(keys::jwks(&[&keys::rsa(0, Some("k1"))])).await;
    // And a CRL URL whose server is down.
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("ca.pem");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    srv.write_config(&format!(
        r#"{yaml}
  - name: backend
    match: {{ path_prefix: /backend }}
    on_allow: {{ backend_credential: {{ name: orders-backend }} }}
  - name: profile
    match: {{ path_prefix: /profile }}
    jwt: {{ providers: [corp, corp-down] }}
  - name: partners
    match: {{ path_prefix: /partners }}
    client_certificate: {{ trust: {{ ca_files: ["{ca}"], crl_urls: ["http://127.0.0.1:1/ca.crl"] }} }}
identity_providers:
  - {{ name: corp, issuer: "{iss}", jwks_uri: "{uri}" }}
  - {{ name: corp-down, issuer: "https://down.test", jwks_uri: "http://127.0.0.1:1/jwks" }}
credentials:
  - {{ name: orders-backend, grant: client_credentials, token_url: "http://127.0.0.1:1/token", client_id: app, client_secret: s3cret-value }}
"#,
        iss = idp.issuer,
        uri = idp.jwks_uri(),
        ca = ca_file.display()
    ));
    srv.running.reload().await.unwrap();
    let denied = seen(
        &client
            .check(get("/backend/x").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        denied.body.as_ref().map(|b| b["reason"].clone()),
        Some("BackendCredentialUnavailable".into())
    );
    let fetches = |text: &str, provider: &str, result: &str| {
        sample(
            text,
            "portcullis_jwks_fetches_total",
            &[("provider", provider), ("result", result)],
        )
    };
    let crl_fetches = |text: &str, result: &str| {
        sample(
            text,
            "portcullis_crl_fetches_total",
            &[("api", "partners"), ("result", result)],
        )
    };
    let deadline = std::time::Instant::now() + telemetry_common::PATIENCE;
    let text = loop {
        let text = scrape().await;
        if fetches(&text, "corp", "success").is_some()
            && fetches(&text, "corp-down", "error").is_some()
            && crl_fetches(&text, "error").is_some()
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no key fetch counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        fetches(&text, "corp", "success"),
        Some(idp.jwks_fetches() as f64),
        "every key set the provider served, counted once"
    );
    assert_eq!(fetches(&text, "corp", "error"), None);
    assert!(fetches(&text, "corp-down", "error").unwrap() >= 1.0);
    assert_eq!(fetches(&text, "corp-down", "success"), None);
    assert!(crl_fetches(&text, "error").unwrap() >= 1.0);
    assert_eq!(crl_fetches(&text, "success"), None);
    for (result, n) in [("miss", Some(1.0)), ("error", Some(1.0)), ("hit", None)] {
        assert_eq!(
            sample(
                &text,
                "portcullis_token_cache_requests_total",
                &[("credential", "orders-backend"), ("result", result)]
            ),
            n,
            "{result}"
        );
    }
    assert!(!text.contains("s3cret-value"));
    srv.running.shutdown().await.unwrap();
}
