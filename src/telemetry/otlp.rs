//! OTLP export: the resource that names this process, the span and metric exporters (gRPC or
//! HTTP/protobuf), and the accounting that turns an unreachable collector into a counter and a
//! rate-limited warning instead of anything a decision would notice.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning per signal in this period while the collector keeps failing.
const WARN_EVERY: Duration = Duration::from_secs(60);

pub use crate::config::{OtlpProtocol, OtlpTarget};

/// Why an exporter could not be built (a malformed endpoint, mostly).
#[derive(Debug, thiserror::Error)]
#[error("OTLP {signal} exporter for {endpoint}: {detail}")]
pub struct ExporterError {
    signal: &'static str,
    endpoint: String,
    detail: String,
}

/// The telemetry signal an export carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Traces = 0,
    Metrics = 1,
}

impl Signal {
    pub(crate) const ALL: [Signal; 2] = [Signal::Traces, Signal::Metrics];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }
}

/// Failed exports per signal, for the whole process (exporters run on the SDK's own threads).
static EXPORT_FAILURES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// How many exports of `signal` failed since the process started.
pub(crate) fn export_failures(signal: Signal) -> u64 {
    EXPORT_FAILURES[signal as usize].load(Ordering::Relaxed)
}

/// `service.instance.id`: random per process, shared by traces and metrics so a backend can join them.
fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{:032x}", rand::random::<u128>()))
}

/// The resource every span and metric carries. `OTEL_RESOURCE_ATTRIBUTES` adds to it; the service
/// name stays `portcullis` unless `OTEL_SERVICE_NAME` says otherwise.
pub(crate) fn resource() -> Resource {
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name("portcullis");
    }
    builder
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance_id()),
        ])
        .build()
}

/// The endpoint without user info, for log lines (a URL may carry credentials for the collector).
pub(crate) fn display_endpoint(endpoint: &str) -> String {
    match endpoint.parse::<http::Uri>() {
        Ok(uri) => format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority()
                .map_or("", |a| a.as_str().rsplit('@').next().unwrap_or(""))
        ),
        Err(_) => "<invalid endpoint>".into(),
    }
}

fn signal_url(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Builds `$exporter` (OTLP span or metric exporter) for `$target` over gRPC or HTTP/protobuf; the
/// two builders share no trait that covers `builder()`, so one macro serves both signals.
macro_rules! build_exporter {
    ($exporter:ty, $target:expr, $signal:expr, $path:expr) => {{
        let target: &OtlpTarget = $target;
        let err = |detail: String| ExporterError {
            signal: $signal,
            endpoint: display_endpoint(&target.endpoint),
            detail,
        };
        match target.protocol {
            OtlpProtocol::Grpc => <$exporter>::builder()
                .with_tonic()
                .with_endpoint(&target.endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .with_tls_config(tls_config())
                .build()
                .map_err(|e| err(e.to_string())),
            OtlpProtocol::HttpProtobuf => <$exporter>::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(signal_url(&target.endpoint, $path))
                .with_timeout(EXPORT_TIMEOUT)
                .with_http_client(RuntimeHttpClient::new().map_err(err)?)
                .build()
                .map_err(|e| err(e.to_string())),
        }
    }};
}

/// A span exporter for `target`. Must be called inside a tokio runtime: the gRPC channel and the
/// HTTP client run their I/O on it, while the SDK's batch processor calls them from its own thread.
pub(crate) fn span_exporter(
    target: &OtlpTarget,
) -> Result<Counted<opentelemetry_otlp::SpanExporter>, ExporterError> {
    let exporter = build_exporter!(
        opentelemetry_otlp::SpanExporter,
        target,
        "traces",
        "/v1/traces"
    )?;
    Ok(Counted::new(exporter, Signal::Traces, &target.endpoint))
}

/// A metric exporter for `target` (cumulative temporality, what Prometheus-style backends expect).
pub(crate) fn metric_exporter(
    target: &OtlpTarget,
) -> Result<Counted<opentelemetry_otlp::MetricExporter>, ExporterError> {
    let exporter = build_exporter!(
        opentelemetry_otlp::MetricExporter,
        target,
        "metrics",
        "/v1/metrics"
    )?;
    Ok(Counted::new(exporter, Signal::Metrics, &target.endpoint))
}

/// TLS for `https://` collectors, verified against the public web PKI roots. Plain `http://`
/// endpoints ignore it.
fn tls_config() -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new().with_webpki_roots()
}

/// Wraps an exporter: a failed export is counted and warned about at most once a minute. The
/// decision path never sees it: spans and metrics are handed over through the SDK's bounded queues.
#[derive(Debug)]
pub(crate) struct Counted<E> {
    inner: E,
    signal: Signal,
    endpoint: String,
    warned: RateLimit,
}

impl<E> Counted<E> {
    fn new(inner: E, signal: Signal, endpoint: &str) -> Self {
        Counted {
            inner,
            signal,
            endpoint: display_endpoint(endpoint),
            warned: RateLimit::new(WARN_EVERY),
        }
    }

    fn account(&self, result: OTelSdkResult) -> OTelSdkResult {
        if let Err(e) = &result {
            let failures =
                EXPORT_FAILURES[self.signal as usize].fetch_add(1, Ordering::Relaxed) + 1;
            if self.warned.allow() {
                tracing::warn!(
                    signal = self.signal.as_str(),
                    endpoint = %self.endpoint,
                    error = %e,
                    failed_exports = failures,
                    "cannot export telemetry to the OTLP collector; decisions are not affected (warning at most once a minute)"
                );
            }
        }
        result
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.account(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Counted<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        self.account(result)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// Lets one event through per period, without locks.
#[derive(Debug)]
pub(crate) struct RateLimit {
    period_ms: u64,
    /// Milliseconds since `epoch()` of the last event let through, plus one (0 = never).
    last: AtomicU64,
}

impl RateLimit {
    pub(crate) const fn new(period: Duration) -> Self {
        RateLimit {
            period_ms: period.as_millis() as u64,
            last: AtomicU64::new(0),
        }
    }

    /// Whether this event may be reported.
    pub(crate) fn allow(&self) -> bool {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.period_ms {
            return false;
        }
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// OTLP over HTTP with the reqwest client the service already uses. The SDK calls exporters from
/// its own threads, outside any tokio runtime, so each request runs as a task on the runtime the
/// exporter was built in and the calling thread only waits for its result.
#[derive(Debug)]
struct RuntimeHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl RuntimeHttpClient {
    fn new() -> Result<Self, String> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|e| format!("no tokio runtime: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(RuntimeHttpClient { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for RuntimeHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let mut out = http::Response::builder().status(response.status());
            if let Some(headers) = out.headers_mut() {
                *headers = response.headers().clone();
            }
            let body = response.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out.body(body)?)
        });
        task.await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_logged_without_user_info() {
        assert_eq!(
            display_endpoint("https://user:secret@collector.example:4317/x"),
            "https://collector.example:4317"
        );
        assert_eq!(
            display_endpoint("http://127.0.0.1:4317"),
            "http://127.0.0.1:4317"
        );
        assert_eq!(display_endpoint("not a url"), "<invalid endpoint>");
    }

    #[test]
    fn http_signal_paths_are_appended_to_the_base_url() {
        assert_eq!(
            signal_url("http://c:4318", "/v1/traces"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            signal_url("http://c:4318/", "/v1/metrics"),
            "http://c:4318/v1/metrics"
        );
    }

    #[test]
    fn rate_limit_lets_one_event_through_per_period() {
        let r = RateLimit::new(Duration::from_secs(3600));
        assert!(r.allow());
        assert!(!r.allow());
        let every_time = RateLimit::new(Duration::ZERO);
        assert!(every_time.allow());
        assert!(every_time.allow());
    }

    #[test]
    fn protocols_parse() {
        assert_eq!(OtlpProtocol::parse("grpc"), Some(OtlpProtocol::Grpc));
        assert_eq!(
            OtlpProtocol::parse("http/protobuf"),
            Some(OtlpProtocol::HttpProtobuf)
        );
        assert_eq!(OtlpProtocol::parse("http/json"), None);
    }
}
