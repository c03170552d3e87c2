//! Logs, traces, metrics and the decision log.
//!
//! - Logs: `tracing` to stderr as text or JSON (`telemetry.log_format`, `telemetry.log_level`,
//!   `RUST_LOG` wins).
//! - Traces: with `telemetry.otlp_endpoint`, a span `authz.check` per decision, a child of the trace
//!   the proxy forwarded (W3C `traceparent` or B3), exported over OTLP in batches. Spans created with
//!   `tracing` inside a check (e.g. `tracing::info_span!("jwks.fetch", provider = %name)`) become its
//!   children automatically.
//! - Metrics: the contract's names (product contract, section 5) on `/metrics` as Prometheus text
//!   and, with `telemetry.otlp_endpoint`, over OTLP.
//! - Decision log: with `telemetry.decision_log`, one JSON line per decision on stdout.
//!
//! None of it carries a token, key, secret, raw path or (outside the decision log's `client_ip`) an
//! IP: attribute values are config names, reason codes and ids.
//!
//! # Counts kept by the identity and credentials modules
//!
//! Key set fetches and token cache lookups are counted where they happen
//! ([`crate::identity::Registry::jwks_fetches`],
//! [`crate::credentials::Registry::token_cache_requests`]); [`Telemetry::new`] registers
//! observable counters that read them from the service's [`Runtime`] at collection time. Neither
//! module knows telemetry exists, and two services in one process each report their own.

mod decision_log;
mod metrics;
mod otlp;
mod traces;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TraceId;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use metrics::{DURATION_BUCKETS, MetricsError, OVERLOADED};
pub use otlp::{ExporterError, OtlpProtocol, OtlpTarget};
pub use traces::{
    HeaderMapCarrier, HeadersCarrier, MetadataCarrier, inject_current as inject_trace_context,
    propagation_headers,
};

use crate::check::{self, Decision};
use crate::config::{LogFormat, Settings};
use crate::policy::Runtime;

/// How long shutdown waits for the decision log to be written out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The `outcome` attribute of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request may pass (including shadow-mode allows of a deny that was not enforced).
    Allow = 0,
    /// The request is refused because of the request itself: a failed check.
    Deny = 1,
    /// portcullis could not decide properly: reason `Internal` (a caught panic, a bug), or a check
    /// shed with UNAVAILABLE/503 because too many were in flight (reason `Overloaded`). Dependency
    /// failures (`BackendCredentialUnavailable`, `IdentityProviderUnavailable`) are denies with their
    /// own reason, so that they can be told apart from portcullis' own faults.
    Error = 2,
}

impl Outcome {
    /// The outcome of a decision.
    pub fn of(d: &Decision) -> Outcome {
        match &d.outcome {
            check::Outcome::Allow => Outcome::Allow,
            check::Outcome::Deny(denial) if denial.reason == check::Reason::Internal => {
                Outcome::Error
            }
            check::Outcome::Deny(_) => Outcome::Deny,
        }
    }

    /// `allow`, `deny` or `error`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Error => "error",
        }
    }
}

/// Whether spans are exported by this process.
pub fn traces_enabled() -> bool {
    traces::enabled()
}

/// Installs the global log subscriber (stderr) without trace export: for commands other than
/// `serve`. `RUST_LOG` wins over the configured level.
pub fn init_logging(format: LogFormat, level: &str) {
    let _ = install_subscriber(format, level, None);
}

/// What `serve` installed for the whole process; [`ProcessTelemetry::shutdown`] flushes it.
#[must_use = "call shutdown() before exiting so that pending spans are exported"]
pub struct ProcessTelemetry {
    tracer: Option<SdkTracerProvider>,
}

impl ProcessTelemetry {
    /// Exports the spans still queued and stops the exporter. Blocks for at most a few seconds.
    pub fn shutdown(self) {
        if let Some(Err(e)) = self.tracer.map(|p| p.shutdown()) {
            tracing::debug!(error = %e, "trace export shutdown");
        }
    }
}

/// Installs the global log subscriber and, with `otlp`, span export through the
/// `tracing-opentelemetry` layer. Must run inside a tokio runtime (the OTLP client's I/O runs on
/// it). A collector that cannot be set up is logged and tracing continues without export: the
/// service itself must not depend on its observability.
pub fn init(format: LogFormat, level: &str, otlp: Option<&OtlpTarget>) -> ProcessTelemetry {
    let tracer = match otlp.map(traces::provider) {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            let _ = install_subscriber(format, level, None);
            tracing::error!(error = %e, "traces will not be exported");
            return ProcessTelemetry { tracer: None };
        }
        None => None,
    };
    let _ = install_subscriber(format, level, tracer.as_ref());
    ProcessTelemetry { tracer }
}

fn install_subscriber(
    format: LogFormat,
    level: &str,
    tracer: Option<&SdkTracerProvider>,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
    }
    .with_filter(filter);
    // Spans get their own filter, independent of the log level: only this crate's spans and events
    // (never those of tonic, hyper or h2, which would also trace the exporter's own requests).
    let spans = tracer.map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("portcullis"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target("portcullis", LevelFilter::INFO))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
}

/// Where a check came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// ext_authz v3 gRPC.
    Grpc,
    /// HTTP forward-auth.
    Http,
}

impl Transport {
    const fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }
}

/// The trace of one check: its span (disabled when spans are not exported) and the caller's trace id
/// (for the decision log when spans are not exported).
pub struct CheckTrace {
    span: Span,
    remote_trace_id: Option<TraceId>,
}

impl CheckTrace {
    /// The span to run the evaluation in.
    pub fn span(&self) -> &Span {
        &self.span
    }

    fn none() -> Self {
        CheckTrace {
            span: Span::none(),
            remote_trace_id: None,
        }
    }
}

/// Decision records, metrics and traces of one running service.
pub struct Telemetry {
    metrics: Arc<metrics::Metrics>,
    decision_log: Option<decision_log::DecisionLog>,
}

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// Metrics.
    #[error("metrics: {0}")]
    Metrics(#[from] MetricsError),
    /// The decision log's writer thread.
    #[error("decision log: {0}")]
    DecisionLog(#[from] std::io::Error),
}

impl Telemetry {
    /// Telemetry as the settings ask for, reporting the key fetches and token cache lookups of
    /// `runtime`. Must run inside a tokio runtime when an OTLP endpoint is set.
    pub fn new(settings: &Settings, runtime: Arc<Runtime>) -> Result<Self, TelemetryError> {
        let metrics = Arc::new(metrics::Metrics::new(settings.otlp.as_ref(), runtime)?);
        let decision_log = if settings.decision_log {
            Some(decision_log::DecisionLog::start(
                settings.decision_log_client_ip,
                metrics.dropped_records.clone(),
            )?)
        } else {
            None
        };
        Ok(Telemetry {
            metrics,
            decision_log,
        })
    }

    /// Starts the trace of one check. `carriers` are asked for the caller's trace context in order
    /// (the call's own metadata first, then the forwarded request's headers); they are not read at
    /// all when neither spans nor the decision log are on.
    pub fn start_check(
        &self,
        transport: Transport,
        carriers: &[&dyn opentelemetry::propagation::Extractor],
    ) -> CheckTrace {
        let exporting = traces::enabled();
        if !exporting && self.decision_log.is_none() {
            return CheckTrace::none();
        }
        let remote = traces::remote_context(carriers);
        if !exporting {
            return CheckTrace {
                span: Span::none(),
                remote_trace_id: remote.as_ref().and_then(traces::trace_id),
            };
        }
        let span = tracing::info_span!(
            "authz.check",
            otel.kind = "server",
            transport = transport.as_str(),
            api = tracing::field::Empty,
            outcome = tracing::field::Empty,
            reason = tracing::field::Empty,
            decision_id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(cx) = remote {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let _ = span.set_parent(cx);
        }
        CheckTrace {
            span,
            remote_trace_id: None,
        }
    }

    /// Records a decision: metrics, span attributes and the decision log. Never blocks.
    /// `request` gives the canonical request line for the decision log; it is called only when the
    /// log is on.
    pub fn record(
        &self,
        d: &Decision,
        elapsed: Duration,
        trace: &CheckTrace,
        request: impl FnOnce() -> Option<String>,
    ) {
        self.metrics.record_decision(d, elapsed);
        let outcome = Outcome::of(d);
        let mut trace_id = trace.remote_trace_id;
        if !trace.span.is_disabled() {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let span = &trace.span;
            if let Some(api) = d.api.as_deref() {
                span.record("api", api);
            }
            span.record("outcome", outcome.as_str());
            if let Some(r) = d.reason() {
                span.record("reason", r.as_str());
            }
            span.record("decision_id", d.id.as_str());
            if outcome == Outcome::Error {
                span.record("otel.status_code", "ERROR");
            }
            if self.decision_log.is_some() {
                trace_id = traces::trace_id(&span.context());
            }
        }
        if let Some(log) = &self.decision_log {
            log.record(d, elapsed, trace_id, request());
        }
    }

    /// Records a change made through the admin API (`action` on subscription `id`, `key`: which
    /// key was regenerated): a JSON line in the decision log when it is on, and an info event on
    /// the `portcullis::audit` target either way. Never a key or a hash.
    pub fn audit(&self, action: &str, id: &str, key: Option<&str>) {
        tracing::info!(target: "portcullis::audit", audit = "subscription", who = "admin", action, subscription_id = %id, regenerated = key, "subscription changed through the admin API");
        if let Some(log) = &self.decision_log {
            log.audit(&decision_log::AuditRecord {
                time: std::time::SystemTime::now(),
                audit: "subscription",
                who: "admin",
                action,
                subscription_id: id,
                regenerated: key,
            });
        }
    }

    /// Counts a check shed with UNAVAILABLE/503 because too many were in flight.
    pub fn record_overloaded(&self) {
        self.metrics.record_overloaded();
    }

    /// Counts a config reload and records its duration (read, compile and swap).
    pub fn config_reload(&self, ok: bool, elapsed: std::time::Duration) {
        self.metrics.config_reload(ok, elapsed);
    }

    /// Prometheus text exposition of every metric.
    pub fn prometheus_text(&self) -> String {
        self.metrics.prometheus_text()
    }

    /// Writes out pending decision records and exports pending metrics. Blocks for at most a few
    /// seconds: call from a blocking thread.
    pub fn shutdown(&self) {
        if let Some(log) = &self.decision_log {
            log.flush(FLUSH_TIMEOUT);
        }
        self.metrics.shutdown();
    }
}
