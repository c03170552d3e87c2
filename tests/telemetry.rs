//! Observability as a user sees it: spans and metrics arriving at an OTLP collector (a real tonic
//! server implementing the collector services, and an HTTP/protobuf one), `/metrics` scraped and
//! parsed, the decision log on stdout, and no secret anywhere in any of them.
//!
//! Most tests run the `portcullis` binary: tracing is process-wide, and stdout/stderr are what
//! users read.

mod common;
#[path = "jwt_common/mod.rs"]
mod keys;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestServer, get, seen};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::trace::v1::Span;
use portcullis::proto::auth::authorization_client::AuthorizationClient;

/// How long a test waits for something that should happen within milliseconds; only a broken
/// build takes this long.
const PATIENCE: Duration = Duration::from_secs(30);

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";
const B3_TRACE_ID: &str = "80f198ee56343ba864fe8b2a57d3eff7";
const B3_SPAN: &str = "e457b5a2e4d86bd1";
const META_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const META_SPAN: &str = "b7ad6b7169203331";

// ---------------------------------------------------------------------------------------------
// An OTLP collector.

#[derive(Clone, Default)]
struct Collector {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    /// An OTLP/gRPC collector on 127.0.0.1:0.
    async fn grpc() -> (Collector, SocketAddr) {
        let c = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c.clone()))
            .add_service(MetricsServiceServer::new(c.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        (c, addr)
    }

    /// An OTLP/HTTP (protobuf) collector on 127.0.0.1:0.
    async fn http() -> (Collector, SocketAddr) {
        use axum::body::Bytes;
        use prost::Message;
        let c = Collector::default();
        let (t, m) = (c.clone(), c.clone());
        let app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: Bytes| async move {
                    t.traces
                        .lock()
                        .unwrap()
                        .push(ExportTraceServiceRequest::decode(body).unwrap());
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }),
            )
            .route(
                "/v1/metrics",
                axum::routing::post(move |body: Bytes| async move {
                    m.metrics
                        .lock()
                        .unwrap()
                        .push(ExportMetricsServiceRequest::decode(body).unwrap());
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportMetricsServiceResponse::default().encode_to_vec(),
                    )
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (c, addr)
    }

    fn spans(&self) -> Vec<Span> {
        let traces = self.traces.lock().unwrap();
        traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    fn check_spans(&self) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == "authz.check")
            .collect()
    }

    async fn wait_for_check_spans(&self, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let spans = self.check_spans();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every metric data point received, newest last: (metric name, attributes, value or count).
    fn points(&self) -> Vec<Point> {
        let mut out = Vec::new();
        for req in self.metrics.lock().unwrap().iter() {
            for m in req
                .resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| &sm.metrics)
            {
                match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            let v = match p.value {
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => i as f64,
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(d)) => d,
                                None => 0.0,
                            };
                            out.push(Point {
                                name: m.name.clone(),
                                unit: m.unit.clone(),
                                attrs: attrs(&p.attributes),
                                value: v,
                                bounds: vec![],
                            });
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            out.push(Point {
                                name: m.name.clone(),
                                unit: m.unit.clone(),
                                attrs: attrs(&p.attributes),
                                value: p.count as f64,
                                bounds: p.explicit_bounds.clone(),
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }

    async fn wait_for_point(&self, name: &str, want: &[(&str, &str)], at_least: f64) -> Point {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self.points().into_iter().rev().find(|p| {
                p.name == name
                    && want
                        .iter()
                        .all(|(k, v)| p.attrs.get(*k).map(String::as_str) == Some(*v))
                    && p.attrs.len() == want.len()
            });
            match found {
                Some(p) if p.value >= at_least => return p,
                _ if Instant::now() > deadline => panic!(
                    "no {name} {want:?} >= {at_least} arrived; got {:#?}",
                    self.points()
                ),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

#[derive(Debug)]
struct Point {
    name: String,
    unit: String,
    attrs: HashMap<String, String>,
    value: f64,
    bounds: Vec<f64>,
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The binary.

/// `portcullis serve` in a child process, its stdout and stderr collected line by line.
struct Serve {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    grpc: SocketAddr,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Serve {
    fn start(yaml: &str, env: &[(&str, &str)]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.yaml");
        std::fs::write(
            &config,
            format!("listen: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}\n{yaml}"),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        // Export quickly so the tests wait milliseconds, not the production defaults (5 s / 60 s).
        cmd.env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("OTEL_METRIC_EXPORT_INTERVAL", "200");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let deadline = Instant::now() + PATIENCE;
        let (grpc, http) = loop {
            let lines = stderr.lock().unwrap().clone();
            let addr = |listener: &str| {
                lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["listener"] == listener)
                    .and_then(|v| {
                        v["addr"]
                            .as_str()
                            .and_then(|a| a.parse::<SocketAddr>().ok())
                    })
            };
            if let (Some(g), Some(h)) = (addr("grpc"), addr("http")) {
                break (g, h);
            }
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                panic!("portcullis did not start:\n{}", lines.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Serve {
            child,
            stdout,
            stderr,
            grpc,
            http,
            _dir: dir,
        }
    }

    async fn client(&self) -> AuthorizationClient<tonic::transport::Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    async fn scrape(&self) -> String {
        let resp = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// SIGTERM, wait for the exit; returns (stdout, stderr).
    /// Async so that the collectors and clients of this test keep running on its runtime meanwhile.
    async fn stop(mut self) -> (Vec<String>, Vec<String>) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // Sending a signal to our own child; the pid is alive until we reap it.
        assert_eq!(unsafe_free_kill(pid), 0);
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("portcullis did not stop on SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "exit status {status}");
        // The reader threads see EOF right after the exit; give them a moment to hand over the rest.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.stdout) > 1 || Arc::strong_count(&self.stderr) > 1 {
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let out = self.stdout.lock().unwrap().clone();
        let err = self.stderr.lock().unwrap().clone();
        (out, err)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill(pid, SIGTERM)` through the `kill` command: the crate forbids unsafe code, tests included.
fn unsafe_free_kill(pid: i32) -> i32 {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|s| s.code().unwrap_or(1))
        .unwrap_or(1)
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(l) => sink.lock().unwrap().push(l),
                Err(_) => break,
            }
        }
    });
    lines
}

fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

fn span_by_decision<'a>(spans: &'a [Span], decision_id: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| str_attr(s, "decision_id") == Some(decision_id))
        .unwrap_or_else(|| panic!("no span for decision {decision_id}: {spans:#?}"))
}

const KEY: &str = "telemetryKeyA1b2C3d4";

fn api_config(otlp: &str) -> String {
    format!(
        r#"
telemetry: {{ log_format: json, decision_log: true, otlp_endpoint: "{otlp}" }}
subscriptions:
  keys: [{{ id: contoso, primary: "${{env:TEST_SUBSCRIPTION_KEY}}" }}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    subscription_required: true
  - name: trial
    match: {{ path_prefix: /trial }}
    subscription_required: true
    mode: shadow
"#
    )
}

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

// ---------------------------------------------------------------------------------------------
// /metrics, in process.

/// The value of one series of a parsed scrape.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                && s.labels.iter().count() == labels.len()
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name}: unexpected {other:?}"),
        })
}

#[tokio::test]
async fn metrics_endpoint_counts_decisions_reloads_and_hook_events() {
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

    // The hooks the identity and credentials modules call land in the running service's metrics.
    use portcullis::telemetry::{FetchResult, TokenCacheResult, jwks_fetch, token_cache};
    jwks_fetch("corp", FetchResult::Success);
    jwks_fetch("corp", FetchResult::Error);
    jwks_fetch("corp", FetchResult::Error);
    token_cache("orders-backend", TokenCacheResult::Hit);
    token_cache("orders-backend", TokenCacheResult::Miss);
    token_cache("orders-backend", TokenCacheResult::Refresh);
    token_cache("orders-backend", TokenCacheResult::Error);
    let text = scrape().await;
    assert_eq!(
        sample(
            &text,
            "portcullis_jwks_fetches_total",
            &[("provider", "corp"), ("result", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_jwks_fetches_total",
            &[("provider", "corp"), ("result", "error")]
        ),
        Some(2.0)
    );
    for result in ["hit", "miss", "refresh", "error"] {
        assert_eq!(
            sample(
                &text,
                "portcullis_token_cache_requests_total",
                &[("credential", "orders-backend"), ("result", result)]
            ),
            Some(1.0),
            "{result}"
        );
    }
    srv.running.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Secrets stay out of everything.

#[tokio::test]
async fn no_secret_reaches_logs_decision_records_spans_or_metrics() {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let (collector, addr) = Collector::grpc().await;
    const SUB_KEY: &str = "primaryKeyQ7w8e9r0t1y2";
    const SUB_KEY2: &str = "secondaryKeyZ3x4c5v6b7n8";
    const WRONG_KEY: &str = "mistypedKeyM1n2b3v4c5x6";
    const BEARER: &str =
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZWNyZXQtdXNlciJ9.SignatureSecretK9j8h7g6f5";
    const COOKIE: &str = "sessionCookieSecretP0o9i8u7";
    const ADMIN_TOKEN: &str = "adminTokenSecretL1k2j3h4g5f6";
    const PEER: &str = "10.1.2.3";
    // JWTs: signed with an HMAC key that the config reads from the environment; valid, expired and
    // with a forged signature, in the Authorization header, the query and a cookie.
    let hs = keys::hmac(Some("hs"), 32);
    let hs_secret = hs.secret_b64();
    let iss = "https://idp.test/corp";
    let good = |sub: &str| keys::claims(iss, "api://orders", sub);
    let jwt_header = hs.token(good("alice"));
    let jwt_query = hs.token(good("bob"));
    let jwt_cookie = hs.token(good("carol"));
    let mut expired_claims = good("dave");
    expired_claims["exp"] = (keys::now() - 3600).into();
    let jwt_expired = hs.token(expired_claims);
    let forged = {
        let t = hs.token(good("eve"));
        let (signed, _) = t.rsplit_once('.').unwrap();
        format!("{signed}.{}", keys::b64([7u8; 32]))
    };
    let signature = |t: &str| t.rsplit_once('.').unwrap().1.to_string();
    // TODO(credentials): once backend credentials are on this branch, configure a
    // client_credentials credential against tests/idp with `client_secret: ${env:...}`, make an
    // API inject it, and add the client secret and the issued access token to `secrets`.

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["partner.example".into()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "partner.example");
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    // A line of the certificate's base64 body, and the private key's.
    let cert_body = pem.lines().nth(1).unwrap().to_string();
    let key_body = key.serialize_pem().lines().nth(1).unwrap().to_string();
    let encoded_pem = percent_encode(&pem);

    let yaml = format!(
        r#"
telemetry: {{ log_format: json, log_level: debug, decision_log: true, otlp_endpoint: "http://{addr}" }}
admin: {{ token: "${{env:ADMIN_TOKEN}}" }}
subscriptions:
  keys: [{{ id: contoso, primary: "${{env:SUB_KEY}}", secondary: "${{env:SUB_KEY2}}" }}]
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    subscription_required: true
    on_allow: {{ remove_headers: [authorization] }}
  - name: partners
    match: {{ path_prefix: /partners }}
    client_certificate: {{ identities: [{{ common_name: partner.example }}] }}
  - name: jwt-header
    match: {{ path_prefix: /jh }}
    jwt: {{ providers: [corp], audiences: ["api://orders"] }}
  - name: jwt-query
    match: {{ path_prefix: /jq }}
    jwt: {{ providers: [corp], audiences: ["api://orders"], from: {{ query: access_token }} }}
  - name: jwt-cookie
    match: {{ path_prefix: /jc }}
    jwt: {{ providers: [corp], audiences: ["api://orders"], from: {{ cookie: session }} }}
identity_providers:
  - name: corp
    issuer: {iss}
    keys: [{{ kty: oct, kid: hs, k: "${{env:HS_KEY}}" }}]
"#
    );
    let srv = Serve::start(
        &yaml,
        &[
            ("SUB_KEY", SUB_KEY),
            ("SUB_KEY2", SUB_KEY2),
            ("ADMIN_TOKEN", ADMIN_TOKEN),
            ("HS_KEY", &hs_secret),
        ],
    );
    let client = srv.client().await;
    let mut decisions = 0;
    let mut check = |req: portcullis::proto::auth::CheckRequest, want: i32| {
        decisions += 1;
        let mut client = client.clone();
        async move {
            let got = seen(&client.check(req).await.unwrap().into_inner());
            assert_eq!(got.code, want, "{got:?}");
        }
    };
    check(
        get("/orders/1")
            .header("ocp-apim-subscription-key", SUB_KEY)
            .request(),
        0,
    )
    .await;
    check(
        get(&format!("/orders/1?subscription-key={SUB_KEY2}&x=1")).request(),
        0,
    )
    .await;
    check(
        get("/orders/1")
            .header("ocp-apim-subscription-key", WRONG_KEY)
            .request(),
        16,
    )
    .await;
    check(
        get(&format!("/orders/1?subscription-key={WRONG_KEY}")).request(),
        16,
    )
    .await;
    check(
        get("/orders/2")
            .header("ocp-apim-subscription-key", SUB_KEY)
            .header("authorization", &format!("Bearer {BEARER}"))
            .header("cookie", &format!("session={COOKIE}"))
            .header("x-admin", ADMIN_TOKEN)
            .request(),
        0,
    )
    .await;
    let mut with_cert = get("/partners/1");
    with_cert.certificate = encoded_pem.clone();
    check(with_cert.request(), 0).await;
    let mut garbage_cert = get("/partners/1");
    garbage_cert.certificate = percent_encode(&pem.replace("MII", "XXX"));
    check(garbage_cert.request(), 16).await;
    let bearer = |t: &str| format!("Bearer {t}");
    check(
        get("/jh/1")
            .header("authorization", &bearer(&jwt_header))
            .request(),
        0,
    )
    .await;
    check(
        get("/jh/1")
            .header("authorization", &bearer(&jwt_expired))
            .request(),
        16,
    )
    .await;
    check(
        get("/jh/1")
            .header("authorization", &bearer(&forged))
            .request(),
        16,
    )
    .await;
    check(get(&format!("/jq/1?access_token={jwt_query}")).request(), 0).await;
    check(get(&format!("/jq/1?access_token={forged}")).request(), 16).await;
    check(
        get("/jc/1")
            .header("cookie", &format!("a=b; session={jwt_cookie}"))
            .request(),
        0,
    )
    .await;
    check(
        get("/jc/1")
            .header("cookie", &format!("session={jwt_expired}"))
            .request(),
        16,
    )
    .await;
    drop(client);

    // Forward-auth, with the same secrets in headers and the query.
    let http = reqwest::Client::new();
    for (uri, status) in [
        (format!("/orders/3?subscription-key={SUB_KEY2}"), 200),
        (format!("/orders/3?subscription-key={WRONG_KEY}"), 401),
        (format!("/jq/3?access_token={jwt_query}"), 200),
        (format!("/jq/3?access_token={jwt_expired}"), 401),
    ] {
        let resp = http
            .get(format!("http://{}/authz/", srv.http))
            .header("x-forwarded-uri", uri)
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-host", "api.example.com")
            .header("authorization", format!("Bearer {BEARER}"))
            .header("cookie", format!("session={COOKIE}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
        decisions += 1;
    }

    collector
        .wait_for_point(
            "portcullis.decisions",
            &[
                ("api", "orders"),
                ("outcome", "deny"),
                ("reason", "SubscriptionKeyInvalid"),
            ],
            3.0,
        )
        .await;
    collector.wait_for_check_spans(decisions).await;
    let scrape = srv.scrape().await;
    let (stdout, stderr) = srv.stop().await;

    // Everything was produced: the test cannot pass by looking at nothing.
    assert_eq!(stdout.len(), decisions, "one decision record per decision");
    let logged = stdout.join("\n");
    for expected in [
        "\"subject\":\"alice\"",
        "\"subject\":\"bob\"",
        "\"subject\":\"carol\"",
        "TokenExpired",
        "TokenSignatureInvalid",
        "ClientCertificateInvalid",
    ] {
        assert!(
            logged.contains(expected),
            "the checks ran as intended: {expected} in {logged}"
        );
    }
    assert!(stderr.len() > 5, "logs at debug level: {stderr:#?}");
    let spans = format!("{:?}", *collector.traces.lock().unwrap());
    let metrics = format!("{:?}", *collector.metrics.lock().unwrap());
    assert_eq!(collector.check_spans().len(), decisions);
    assert!(scrape.contains("portcullis_decisions_total"));

    let secrets = [
        SUB_KEY,
        SUB_KEY2,
        WRONG_KEY,
        BEARER,
        "SignatureSecretK9j8h7g6f5",
        COOKIE,
        ADMIN_TOKEN,
        &cert_body,
        &key_body,
        &hs_secret,
        &jwt_header,
        &jwt_query,
        &jwt_cookie,
        &jwt_expired,
        &forged,
        &signature(&jwt_header),
        &signature(&jwt_query),
        &signature(&jwt_cookie),
        &signature(&jwt_expired),
        &signature(&forged),
    ];
    let places = [
        ("logs (stderr)", stderr.join("\n")),
        ("decision records (stdout)", stdout.join("\n")),
        ("spans (OTLP)", spans.clone()),
        ("metrics (OTLP)", metrics.clone()),
        ("/metrics", scrape.clone()),
    ];
    for (place, text) in &places {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{place} contain the secret {secret}"
            );
        }
    }
    // Spans and metrics carry no raw paths or client addresses either (the decision log may carry
    // the client IP; that is what `decision_log_client_ip: false` turns off).
    for (place, text) in [
        ("spans (OTLP)", &spans),
        ("metrics (OTLP)", &metrics),
        ("/metrics", &scrape),
    ] {
        for forbidden in [
            "/orders/",
            "/partners/",
            "/jh/",
            "/jq/",
            "/jc/",
            "subscription-key=",
            "access_token=",
            PEER,
        ] {
            assert!(!text.contains(forbidden), "{place} contain {forbidden}");
        }
    }
}

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
