//! Traces and metrics over OTLP, as a user sees them: `portcullis serve` exporting to a real
//! OTLP/gRPC collector (spans joining the caller's W3C, B3 or Envoy-metadata trace, shadow-mode
//! events, resource attributes, the metric contract's names, attributes and units, and the decision
//! log carrying the span's trace id), forward-auth spans and metrics over OTLP/HTTP, and an
//! unreachable collector costing only a counter and one rate-limited warning per signal.

mod common;
mod telemetry_common;

use std::time::{Duration, Instant};

use common::{get, seen};
use telemetry_common::{
    B3_SPAN, B3_TRACE_ID, Collector, KEY, META_SPAN, META_TRACE_ID, PARENT_SPAN, PATIENCE, Serve,
    TRACE_ID, api_config, attrs, sample, span_by_decision, str_attr,
};

// ---------------------------------------------------------------------------------------------
// Traces and metrics over OTLP/gRPC, and the decision log.

#[tokio::test]
async fn spans_join_the_callers_trace_and_metrics_arrive_over_otlp() {
    let (collector, addr) = Collector::grpc().await;
    let srv = Serve::start(
        &api_config(&format!("http://{addr}")),
        &[("TEST_SUBSCRIPTION_KEY", KEY)],
    );
    let mut client = srv.client().await;

    // W3C trace context in the forwarded request's headers.
    let w3c = seen(
        &client
            .check(
                get("/orders/1")
                    .header("ocp-apim-subscription-key", KEY)
                    .header("traceparent", &format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
                    .request(),
            )
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(w3c.code, 0);
    // B3 multi-header context.
    let b3 = seen(
        &client
            .check(
                get("/orders/2")
                    .header("x-b3-traceid", B3_TRACE_ID)
                    .header("x-b3-spanid", B3_SPAN)
                    .header("x-b3-sampled", "1")
                    .request(),
            )
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(b3.status, Some(401));
    // No context: a new trace.
    let root = seen(
        &client
            .check(get("/elsewhere").request())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(root.status, Some(403));
    // Envoy's own ext_authz client span in the call's metadata wins over the forwarded headers.
    let mut req = tonic::Request::new(
        get("/orders/3")
            .header("ocp-apim-subscription-key", KEY)
            .header("traceparent", &format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
            .request(),
    );
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{META_TRACE_ID}-{META_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let meta = seen(&client.check(req).await.unwrap().into_inner());
    assert_eq!(meta.code, 0);
    // Shadow mode: what the evaluation logs lands in the Check span, as child spans do.
    let shadow = seen(
        &client
            .check(
                get("/trial/1")
                    .header("traceparent", &format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
                    .request(),
            )
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(shadow.code, 0);

    let id = |s: &common::Seen| s.headers["x-portcullis-decision-id"].0.clone();
    let spans = collector.wait_for_check_spans(5).await;
    assert_eq!(spans.len(), 5, "{spans:#?}");

    let s = span_by_decision(&spans, &id(&shadow));
    assert_eq!(
        (str_attr(s, "outcome"), str_attr(s, "reason")),
        (Some("allow"), Some("SubscriptionKeyNotFound"))
    );
    assert!(
        s.events
            .iter()
            .any(|e| e.name == "shadow mode: deny not enforced"),
        "events inside the evaluation belong to the Check span: {:#?}",
        s.events
    );

    let s = span_by_decision(&spans, &id(&w3c));
    assert_eq!(hex::encode(&s.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&s.parent_span_id), PARENT_SPAN);
    assert_eq!(
        s.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32
    );
    assert_eq!(str_attr(s, "api"), Some("orders"));
    assert_eq!(str_attr(s, "outcome"), Some("allow"));
    assert_eq!(str_attr(s, "reason"), None);
    assert_eq!(str_attr(s, "transport"), Some("grpc"));

    let s = span_by_decision(&spans, &id(&b3));
    assert_eq!(hex::encode(&s.trace_id), B3_TRACE_ID);
    assert_eq!(hex::encode(&s.parent_span_id), B3_SPAN);
    assert_eq!(str_attr(s, "outcome"), Some("deny"));
    assert_eq!(str_attr(s, "reason"), Some("SubscriptionKeyNotFound"));

    let s = span_by_decision(&spans, &id(&root));
    assert!(
        s.parent_span_id.is_empty(),
        "a request without trace context starts a trace"
    );
    assert_eq!(str_attr(s, "reason"), Some("NoMatchingApi"));
    assert_eq!(str_attr(s, "api"), None);
    let root_trace = hex::encode(&s.trace_id);

    let s = span_by_decision(&spans, &id(&meta));
    assert_eq!(
        (hex::encode(&s.trace_id), hex::encode(&s.parent_span_id)),
        (META_TRACE_ID.to_string(), META_SPAN.to_string())
    );

    let resource = attrs(
        &collector.traces.lock().unwrap()[0].resource_spans[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes,
    );
    assert_eq!(resource["service.name"], "portcullis");
    assert_eq!(resource["service.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(resource["service.instance.id"].len(), 32);

    // Metrics, with the contract's names, attributes and units.
    collector
        .wait_for_point(
            "portcullis.decisions",
            &[("api", "orders"), ("outcome", "allow")],
            2.0,
        )
        .await;
    collector
        .wait_for_point(
            "portcullis.decisions",
            &[
                ("api", "orders"),
                ("outcome", "deny"),
                ("reason", "SubscriptionKeyNotFound"),
            ],
            1.0,
        )
        .await;
    collector
        .wait_for_point(
            "portcullis.decisions",
            &[("outcome", "deny"), ("reason", "NoMatchingApi")],
            1.0,
        )
        .await;
    let hist = collector
        .wait_for_point(
            "portcullis.decision.duration",
            &[("api", "orders"), ("outcome", "allow")],
            2.0,
        )
        .await;
    assert_eq!(hist.unit, "s");
    assert_eq!(hist.bounds, portcullis::telemetry::DURATION_BUCKETS);
    collector
        .wait_for_point("portcullis.config.reloads", &[("result", "success")], 0.0)
        .await;
    let metric_resource = attrs(
        &collector.metrics.lock().unwrap()[0].resource_metrics[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes,
    );
    assert_eq!(
        metric_resource["service.instance.id"], resource["service.instance.id"],
        "traces and metrics name the same instance"
    );

    // The decision log: one record per decision, carrying the Check span's trace id.
    let (stdout, _) = srv.stop().await;
    let records: Vec<serde_json::Value> = stdout
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5, "{stdout:#?}");
    let record = |d: &str| {
        records
            .iter()
            .find(|r| r["decision_id"] == d)
            .unwrap_or_else(|| panic!("no record for {d}"))
    };
    assert_eq!(record(&id(&w3c))["trace_id"], TRACE_ID);
    assert_eq!(record(&id(&w3c))["subscription_id"], "contoso");
    assert_eq!(record(&id(&b3))["trace_id"], B3_TRACE_ID);
    assert_eq!(record(&id(&b3))["reason"], "SubscriptionKeyNotFound");
    assert_eq!(record(&id(&root))["trace_id"], root_trace.as_str());
    assert_eq!(record(&id(&meta))["trace_id"], META_TRACE_ID);
    assert_eq!(record(&id(&w3c))["client_ip"], "10.1.2.3");
    // The canonical request line, without the query.
    assert_eq!(record(&id(&w3c))["request"], "GET api.example.com/orders/1");
    assert_eq!(
        (
            record(&id(&shadow))["shadow"].as_bool(),
            record(&id(&shadow))["outcome"].as_str()
        ),
        (Some(true), Some("allow"))
    );
}

#[tokio::test]
async fn forward_auth_spans_and_metrics_go_over_otlp_http() {
    let (collector, addr) = Collector::http().await;
    let yaml = api_config(&format!("http://{addr}")).replace(
        "otlp_endpoint:",
        "otlp_protocol: http/protobuf, otlp_endpoint:",
    );
    let srv = Serve::start(&yaml, &[("TEST_SUBSCRIPTION_KEY", KEY)]);
    let resp = reqwest::Client::new()
        .get(format!("http://{}/authz/orders/9", srv.http))
        .header("ocp-apim-subscription-key", KEY)
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let decision_id = resp.headers()["x-portcullis-decision-id"]
        .to_str()
        .unwrap()
        .to_string();
    let spans = collector.wait_for_check_spans(1).await;
    let s = span_by_decision(&spans, &decision_id);
    assert_eq!(
        (hex::encode(&s.trace_id), hex::encode(&s.parent_span_id)),
        (TRACE_ID.to_string(), PARENT_SPAN.to_string())
    );
    assert_eq!(str_attr(s, "transport"), Some("http"));
    collector
        .wait_for_point(
            "portcullis.decisions",
            &[("api", "orders"), ("outcome", "allow")],
            1.0,
        )
        .await;
    srv.stop().await;
}

#[tokio::test]
async fn an_unreachable_collector_costs_a_counter_and_a_rate_limited_warning() {
    // A port that was just free: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let srv = Serve::start(
        &api_config(&format!("http://{dead}")),
        &[("TEST_SUBSCRIPTION_KEY", KEY)],
    );
    let mut client = srv.client().await;
    let deadline = Instant::now() + PATIENCE * 2;
    let failures = loop {
        // Decisions are unaffected while exports fail.
        let allow = seen(
            &client
                .check(
                    get("/orders/1")
                        .header("ocp-apim-subscription-key", KEY)
                        .request(),
                )
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(allow.code, 0);
        let text = srv.scrape().await;
        let failures = |signal: &str| {
            sample(
                &text,
                "portcullis_telemetry_export_failures_total",
                &[("signal", signal)],
            )
            .unwrap_or(0.0)
        };
        let (t, m) = (failures("traces"), failures("metrics"));
        if t >= 2.0 && m >= 2.0 {
            break (t, m);
        }
        assert!(
            Instant::now() < deadline,
            "exports did not fail as expected: traces {t}, metrics {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, stderr) = srv.stop().await;
    let warnings = |signal: &str| {
        stderr
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["level"] == "WARN"
                    && v["signal"] == signal
                    && v["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("OTLP collector")
            })
            .count()
    };
    assert_eq!(
        warnings("traces"),
        1,
        "one warning for {failures:?} failed exports:\n{}",
        stderr.join("\n")
    );
    assert_eq!(warnings("metrics"), 1, "{}", stderr.join("\n"));
}
