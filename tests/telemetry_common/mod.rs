//! Helpers for the telemetry tests (`telemetry_otlp`, `telemetry_metrics`, `telemetry_secrets`):
//! an OTLP collector (a real tonic server implementing the collector services, and an
//! HTTP/protobuf one), `portcullis serve` in a child process with its stdout and stderr collected,
//! span and metric lookups, the shared API config and a Prometheus text parser.
//!
//! Most tests run the `portcullis` binary: tracing is process-wide, and stdout/stderr are what
//! users read.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
pub const PATIENCE: Duration = Duration::from_secs(30);

pub const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub const PARENT_SPAN: &str = "00f067aa0ba902b7";
pub const B3_TRACE_ID: &str = "80f198ee56343ba864fe8b2a57d3eff7";
pub const B3_SPAN: &str = "e457b5a2e4d86bd1";
pub const META_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
pub const META_SPAN: &str = "b7ad6b7169203331";

// ---------------------------------------------------------------------------------------------
// An OTLP collector.

#[derive(Clone, Default)]
pub struct Collector {
    pub traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
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
    pub async fn grpc() -> (Collector, SocketAddr) {
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
    pub async fn http() -> (Collector, SocketAddr) {
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

    pub fn spans(&self) -> Vec<Span> {
        let traces = self.traces.lock().unwrap();
        traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    pub fn check_spans(&self) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == "authz.check")
            .collect()
    }

    pub async fn wait_for_check_spans(&self, n: usize) -> Vec<Span> {
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
    pub fn points(&self) -> Vec<Point> {
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

    pub async fn wait_for_point(&self, name: &str, want: &[(&str, &str)], at_least: f64) -> Point {
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
pub struct Point {
    pub name: String,
    pub unit: String,
    pub attrs: HashMap<String, String>,
    pub value: f64,
    pub bounds: Vec<f64>,
}

pub fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
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
pub struct Serve {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Serve {
    pub fn start(yaml: &str, env: &[(&str, &str)]) -> Serve {
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

    pub async fn client(&self) -> AuthorizationClient<tonic::transport::Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    pub async fn scrape(&self) -> String {
        let resp = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// SIGTERM, wait for the exit; returns (stdout, stderr).
    /// Async so that the collectors and clients of this test keep running on its runtime meanwhile.
    pub async fn stop(mut self) -> (Vec<String>, Vec<String>) {
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

pub fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

pub fn span_by_decision<'a>(spans: &'a [Span], decision_id: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| str_attr(s, "decision_id") == Some(decision_id))
        .unwrap_or_else(|| panic!("no span for decision {decision_id}: {spans:#?}"))
}

pub const KEY: &str = "telemetryKeyA1b2C3d4";

pub fn api_config(otlp: &str) -> String {
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

/// The value of one series of a parsed scrape.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
