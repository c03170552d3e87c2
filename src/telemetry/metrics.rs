//! Metrics with the contract's names (product contract, section 5), recorded through the
//! OpenTelemetry SDK and read by two readers: the Prometheus registry behind `/metrics` and, with
//! `telemetry.otlp_endpoint`, a periodic OTLP exporter.
//!
//! The decision path records through *bound* instruments: one handle per (api, outcome, reason),
//! created the first time that combination occurs and cached. A recording is then an atomic add per
//! reader (and the histogram's short bucket lock) with no attribute hashing, sorting or allocation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundCounter, BoundHistogram, Counter, Histogram, Meter, MeterProvider as _,
};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

use super::Outcome;
use super::otlp::{self, ExporterError, OtlpTarget, Signal};
use crate::check::{Decision, Reason};
use crate::policy::Runtime;

/// Bucket bounds of `portcullis.decision.duration`, in seconds: a cached decision takes
/// microseconds, one waiting for a token endpoint or JWKS fetch can take seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

const N_REASONS: usize = Reason::ALL.len();
/// Counter slots per API: allow without reason, allow with a waived reason (shadow mode), deny/error
/// with a reason.
const N_DECISION_SLOTS: usize = 1 + 2 * N_REASONS;

/// The `reason` of a request shed because too many checks were in flight.
pub const OVERLOADED: &str = "Overloaded";

/// Instruments of one running service.
pub(crate) struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    decisions: Counter<u64>,
    duration: Histogram<f64>,
    apis: NamedCells<ApiCells>,
    no_api: ApiCells,
    overloaded: BoundCounter<u64>,
    reload_cells: [BoundCounter<u64>; 2],
    reload_duration: [BoundHistogram<f64>; 2],
    /// Decision records dropped because the log queue was full.
    pub(crate) dropped_records: Arc<AtomicU64>,
}

/// The bound instruments of one API (or of "no API matched").
struct ApiCells {
    decisions: [OnceLock<BoundCounter<u64>>; N_DECISION_SLOTS],
    durations: [OnceLock<BoundHistogram<f64>>; 3],
}

impl Default for ApiCells {
    fn default() -> Self {
        ApiCells {
            decisions: std::array::from_fn(|_| OnceLock::new()),
            durations: Default::default(),
        }
    }
}

impl Metrics {
    /// Builds the meter provider with its Prometheus reader and, when `otlp` is set, a periodic OTLP
    /// reader (`OTEL_METRIC_EXPORT_INTERVAL` applies; default 60 s). Key fetch and token cache
    /// counts are read from `runtime` at collection time. Must run inside a tokio runtime when
    /// `otlp` is set.
    pub(crate) fn new(
        otlp: Option<&OtlpTarget>,
        runtime: Arc<Runtime>,
    ) -> Result<Metrics, MetricsError> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // Scope labels would repeat `otel_scope_name="portcullis"` on every series.
            .scope_info_enabled(false)
            .build()
            .map_err(|e| MetricsError::Prometheus(e.to_string()))?;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(otlp::resource())
            .with_reader(prometheus);
        if let Some(target) = otlp {
            builder = builder
                .with_reader(PeriodicReader::builder(otlp::metric_exporter(target)?).build());
        }
        let provider = builder.build();
        let meter = provider.meter("portcullis");
        let dropped_records = Arc::new(AtomicU64::new(0));
        register_observables(&meter, dropped_records.clone(), runtime);

        let decisions = meter
            .u64_counter("portcullis.decisions")
            .with_description("Decisions by API, outcome (allow, deny, error) and reason.")
            .build();
        let duration = meter
            .f64_histogram("portcullis.decision.duration")
            .with_unit("s")
            .with_description("Time from receiving a check to having its decision.")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let reloads = meter
            .u64_counter("portcullis.config.reloads")
            .with_description("Configuration reloads by result (success, failure).")
            .build();
        let overloaded = decisions.bind(&[
            KeyValue::new("outcome", Outcome::Error.as_str()),
            KeyValue::new("reason", OVERLOADED),
        ]);
        let reload_cells = [
            reloads.bind(&[KeyValue::new("result", "success")]),
            reloads.bind(&[KeyValue::new("result", "failure")]),
        ];
        let reload_histogram = meter
            .f64_histogram("portcullis.config.reload.duration")
            .with_unit("s")
            .with_description(
                "Time to read, compile and swap in the configuration, by result (success, failure).",
            )
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let reload_duration = [
            reload_histogram.bind(&[KeyValue::new("result", "success")]),
            reload_histogram.bind(&[KeyValue::new("result", "failure")]),
        ];
        Ok(Metrics {
            provider,
            registry,
            decisions,
            duration,
            apis: NamedCells::default(),
            no_api: ApiCells::default(),
            overloaded,
            reload_cells,
            reload_duration,
            dropped_records,
        })
    }

    /// Counts a decision and its duration.
    pub(crate) fn record_decision(&self, d: &Decision, elapsed: Duration) {
        let outcome = Outcome::of(d);
        let reason = d.reason();
        let slot = match (outcome, reason) {
            (Outcome::Allow, None) => 0,
            (Outcome::Allow, Some(r)) => 1 + reason_index(r),
            (_, Some(r)) => 1 + N_REASONS + reason_index(r),
            // A deny always has a reason; should one ever lack it, count it with the plain denies.
            (_, None) => 1 + N_REASONS + reason_index(Reason::Internal),
        };
        let apply = |cells: &ApiCells| {
            cells.decisions[slot]
                .get_or_init(|| {
                    let mut attrs = Vec::with_capacity(3);
                    if let Some(api) = &d.api {
                        attrs.push(KeyValue::new("api", api.clone()));
                    }
                    attrs.push(KeyValue::new("outcome", outcome.as_str()));
                    if let Some(r) =
                        reason.or((outcome != Outcome::Allow).then_some(Reason::Internal))
                    {
                        attrs.push(KeyValue::new("reason", r.as_str()));
                    }
                    self.decisions.bind(&attrs)
                })
                .add(1);
            cells.durations[outcome as usize]
                .get_or_init(|| {
                    let mut attrs = Vec::with_capacity(2);
                    if let Some(api) = &d.api {
                        attrs.push(KeyValue::new("api", api.clone()));
                    }
                    attrs.push(KeyValue::new("outcome", outcome.as_str()));
                    self.duration.bind(&attrs)
                })
                .record(elapsed.as_secs_f64());
        };
        match &d.api {
            Some(api) => self.apis.with(api, ApiCells::default, apply),
            None => apply(&self.no_api),
        }
    }

    /// Counts a check refused because too many were in flight.
    pub(crate) fn record_overloaded(&self) {
        self.overloaded.add(1);
    }

    /// Counts a configuration reload and records how long it took.
    pub(crate) fn config_reload(&self, ok: bool, elapsed: Duration) {
        self.reload_cells[usize::from(!ok)].add(1);
        self.reload_duration[usize::from(!ok)].record(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub(crate) fn prometheus_text(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::with_capacity(8192);
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        // The text encoder writes UTF-8 (names, label values from config, numbers).
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Exports what is pending and stops the readers. Blocks: call from a blocking thread.
    pub(crate) fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "metrics shutdown");
        }
    }
}

/// Observes one series per count, labelled `owner_key: owner` and `result`, skipping zeros: a
/// series appears with its first event, as a counter bound on first use would.
fn observe_results(
    o: &dyn opentelemetry::metrics::AsyncInstrument<u64>,
    owner_key: &'static str,
    owner: String,
    results: &[(&'static str, u64)],
) {
    for &(result, n) in results.iter().filter(|(_, n)| *n > 0) {
        o.observe(
            n,
            &[
                KeyValue::new(owner_key, owner.clone()),
                KeyValue::new("result", result),
            ],
        );
    }
}

/// Counters the SDK reads at collection time from numbers kept elsewhere: the identity and
/// credentials modules count their own events and know nothing of telemetry.
fn register_observables(meter: &Meter, dropped_records: Arc<AtomicU64>, runtime: Arc<Runtime>) {
    let identity = runtime.clone();
    let _ = meter
        .u64_observable_counter("portcullis.jwks.fetches")
        .with_description("Key set fetches by identity provider and result.")
        .with_callback(move |o| {
            for (provider, ok, failed) in identity.identity.jwks_fetches() {
                observe_results(
                    o,
                    "provider",
                    provider,
                    &[("success", ok), ("error", failed)],
                );
            }
        })
        .build();
    let crl = runtime.clone();
    let _ = meter
        .u64_observable_counter("portcullis.crl.fetches")
        .with_description("CRL fetches of `client_certificate.trust.crl_urls` by API and result.")
        .with_callback(move |o| {
            for (api, ok, failed) in crl.crl.fetches() {
                observe_results(o, "api", api, &[("success", ok), ("error", failed)]);
            }
        })
        .build();
    let introspection = runtime.clone();
    let _ = meter
        .u64_observable_counter("portcullis.introspection.requests")
        .with_description(
            "Token introspection requests by identity provider and result (active, inactive, error).",
        )
        .with_callback(move |o| {
            for (provider, active, inactive, error) in
                introspection.identity.introspection_requests()
            {
                let results = [("active", active), ("inactive", inactive), ("error", error)];
                observe_results(o, "provider", provider, &results);
            }
        })
        .build();
    let introspection_hits = runtime.clone();
    let _ = meter
        .u64_observable_counter("portcullis.introspection.cache_hits")
        .with_description("Token introspection answers reused from the introspection cache.")
        .with_callback(move |o| {
            o.observe(
                introspection_hits.identity.stats().introspection_cache_hits,
                &[],
            );
        })
        .build();
    let store = runtime.clone();
    let _ = meter
        .u64_observable_counter("portcullis.store.operations")
        .with_description(
            "Calls to the shared store (store.redis) by operation and result (ok, error, timeout, conflict).",
        )
        .with_callback(move |o| {
            for (op, result, n) in store.credentials.store_operations() {
                o.observe(
                    n,
                    &[KeyValue::new("op", op), KeyValue::new("result", result)],
                );
            }
        })
        .build();
    let leases = runtime.clone();
    let _ = meter
        .u64_observable_counter("portcullis.store.leases")
        .with_description(
            "Single-writer leases on the shared store by outcome (acquired, busy, lost, error).",
        )
        .with_callback(move |o| {
            for (outcome, n) in leases.credentials.store_leases() {
                o.observe(n, &[KeyValue::new("outcome", outcome)]);
            }
        })
        .build();
    let _ = meter
        .u64_observable_counter("portcullis.token_cache.requests")
        .with_description(
            "Backend credential lookups by credential and result (hit, miss, refresh, error).",
        )
        .with_callback(move |o| {
            for (credential, result, n) in runtime.credentials.token_cache_requests() {
                observe_results(o, "credential", credential, &[(result, n)]);
            }
        })
        .build();
    let _ = meter
        .u64_observable_counter("portcullis.decision_log.dropped")
        .with_description("Decision records dropped because the decision log could not keep up.")
        .with_callback(move |o| o.observe(dropped_records.load(Ordering::Relaxed), &[]))
        .build();
    let _ = meter
        .u64_observable_counter("portcullis.telemetry.export_failures")
        .with_description(
            "OTLP exports that failed (collector unreachable or refusing), by signal.",
        )
        .with_callback(|o| {
            for s in Signal::ALL {
                o.observe(
                    otlp::export_failures(s),
                    &[KeyValue::new("signal", s.as_str())],
                );
            }
        })
        .build();
}

/// Position of a reason in [`Reason::ALL`]. The macro that defines the enum lists the variants in
/// the same order as `ALL`, so the discriminant is the position (a unit test holds this).
fn reason_index(r: Reason) -> usize {
    (r as usize).min(N_REASONS - 1)
}

/// Cells per configured name (API, identity provider, credential), read without locks: the map is
/// replaced whole on the rare insert of a name never seen before. Names come from the config, so the
/// map is as bounded as the configs the process has served.
struct NamedCells<T> {
    map: ArcSwap<HashMap<Arc<str>, Arc<T>>>,
    insert: Mutex<()>,
}

impl<T> Default for NamedCells<T> {
    fn default() -> Self {
        NamedCells {
            map: ArcSwap::from_pointee(HashMap::new()),
            insert: Mutex::new(()),
        }
    }
}

impl<T> NamedCells<T> {
    fn with(&self, name: &str, new: impl FnOnce() -> T, f: impl FnOnce(&T)) {
        if let Some(cells) = self.map.load().get(name) {
            return f(cells);
        }
        let _guard = self.insert.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.map.load_full();
        let cells = match current.get(name) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(new());
                let mut next = HashMap::clone(&current);
                next.insert(Arc::from(name), c.clone());
                self.map.store(Arc::new(next));
                c
            }
        };
        f(&cells)
    }
}

/// Metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus exporter refused its configuration.
    #[error("Prometheus exporter: {0}")]
    Prometheus(String),
    /// The OTLP exporter could not be built.
    #[error(transparent)]
    Otlp(#[from] ExporterError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_discriminants_are_positions() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r}");
            assert_eq!(reason_index(*r), i);
        }
    }

    #[test]
    fn buckets_are_sorted_and_span_microseconds_to_seconds() {
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(DURATION_BUCKETS[0] <= 0.000_01);
        assert!(*DURATION_BUCKETS.last().unwrap() >= 1.0);
    }

    fn decision(
        api: Option<&str>,
        outcome: crate::check::Outcome,
        waived: Option<Reason>,
    ) -> Decision {
        let mut d = Decision::new();
        d.api = api.map(Into::into);
        d.outcome = outcome;
        d.waived = waived;
        d
    }

    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.iter().count() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v)
                | prometheus_parse::Value::Gauge(v) => v,
                _ => panic!("{name} is not a number"),
            })
    }

    #[test]
    fn outcomes_reasons_and_shed_load_are_counted() {
        use crate::check::{Denial, Outcome as O};
        let m = Metrics::new(None, Arc::new(Runtime::offline())).unwrap();
        let ms = Duration::from_millis(1);
        m.record_decision(&decision(Some("orders"), O::Allow, None), ms);
        m.record_decision(&decision(Some("orders"), O::Allow, None), ms);
        m.record_decision(
            &decision(Some("orders"), O::Deny(Denial::new(Reason::Internal)), None),
            ms,
        );
        m.record_decision(
            &decision(
                Some("orders"),
                O::Deny(Denial::new(Reason::BackendCredentialUnavailable)),
                None,
            ),
            ms,
        );
        m.record_decision(
            &decision(Some("shadowed"), O::Allow, Some(Reason::TokenExpired)),
            ms,
        );
        m.record_decision(
            &decision(None, O::Deny(Denial::new(Reason::NoMatchingApi)), None),
            ms,
        );
        m.record_overloaded();
        m.record_overloaded();
        m.config_reload(false, ms);
        let text = m.prometheus_text();
        let decisions =
            |labels: &[(&str, &str)]| value(&text, "portcullis_decisions_total", labels);
        assert_eq!(
            decisions(&[("api", "orders"), ("outcome", "allow")]),
            Some(2.0)
        );
        assert_eq!(
            decisions(&[
                ("api", "orders"),
                ("outcome", "error"),
                ("reason", "Internal")
            ]),
            Some(1.0)
        );
        assert_eq!(
            decisions(&[
                ("api", "orders"),
                ("outcome", "deny"),
                ("reason", "BackendCredentialUnavailable")
            ]),
            Some(1.0)
        );
        assert_eq!(
            decisions(&[
                ("api", "shadowed"),
                ("outcome", "allow"),
                ("reason", "TokenExpired")
            ]),
            Some(1.0),
            "shadow mode keeps the waived reason"
        );
        assert_eq!(
            decisions(&[("outcome", "deny"), ("reason", "NoMatchingApi")]),
            Some(1.0)
        );
        assert_eq!(
            decisions(&[("outcome", "error"), ("reason", "Overloaded")]),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                "portcullis_decision_duration_seconds_count",
                &[("api", "orders"), ("outcome", "allow")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                "portcullis_decision_duration_seconds_count",
                &[("api", "orders"), ("outcome", "error")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "portcullis_config_reloads_total",
                &[("result", "failure")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "portcullis_config_reloads_total",
                &[("result", "success")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                "portcullis_config_reload_duration_seconds_count",
                &[("result", "failure")]
            ),
            Some(1.0)
        );
        assert!(
            !text.contains("otel_scope_name"),
            "no scope labels on every series"
        );
    }

    #[test]
    fn named_cells_are_created_once() {
        let cells: NamedCells<AtomicU64> = NamedCells::default();
        for _ in 0..3 {
            cells.with(
                "a",
                || AtomicU64::new(0),
                |c| {
                    c.fetch_add(1, Ordering::Relaxed);
                },
            );
        }
        cells.with(
            "b",
            || AtomicU64::new(10),
            |c| {
                c.fetch_add(1, Ordering::Relaxed);
            },
        );
        cells.with(
            "a",
            || AtomicU64::new(100),
            |c| assert_eq!(c.load(Ordering::Relaxed), 3),
        );
        cells.with(
            "b",
            || AtomicU64::new(100),
            |c| assert_eq!(c.load(Ordering::Relaxed), 11),
        );
    }
}
