//! OTLP export: the resource that names this process, the span and metric exporters (gRPC or
//! HTTP/protobuf), and the accounting that turns an unreachable collector into a counter and a
//! rate-limited warning instead of anything a decision would notice.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// At most one warning per signal in this period while the collector keeps failing.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
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

#[cfg(feature = "otlp")]
mod export;
#[cfg(feature = "otlp")]
pub(crate) use export::{metric_exporter, span_exporter};

/// Built without the `otlp` feature: `telemetry.otlp` is refused when the service starts.
#[cfg(not(feature = "otlp"))]
pub(crate) fn span_exporter(target: &OtlpTarget) -> Result<Counted<NoExport>, ExporterError> {
    Err(not_built("traces", target))
}

/// Built without the `otlp` feature: `telemetry.otlp` is refused when the service starts.
#[cfg(not(feature = "otlp"))]
pub(crate) fn metric_exporter(target: &OtlpTarget) -> Result<Counted<NoExport>, ExporterError> {
    Err(not_built("metrics", target))
}

#[cfg(not(feature = "otlp"))]
fn not_built(signal: &'static str, target: &OtlpTarget) -> ExporterError {
    ExporterError {
        signal,
        endpoint: display_endpoint(&target.endpoint),
        detail:
            "this portcullis was built without OTLP export (cargo feature `otlp`, on by default)"
                .into(),
    }
}

/// The exporter a build without the `otlp` feature never makes (it only gives the types a name).
#[cfg(not(feature = "otlp"))]
#[derive(Debug)]
pub(crate) struct NoExport;

#[cfg(not(feature = "otlp"))]
impl SpanExporter for NoExport {
    async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
        Ok(())
    }
}

#[cfg(not(feature = "otlp"))]
impl PushMetricExporter for NoExport {
    async fn export(&self, _metrics: &ResourceMetrics) -> OTelSdkResult {
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
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
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub(super) fn new(inner: E, signal: Signal, endpoint: &str) -> Self {
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
