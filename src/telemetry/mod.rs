//! Logs, the decision log and metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::policy::{Decision, LogFormat, Settings};

/// Installs the global log subscriber: `RUST_LOG` wins over the configured level. Logs go to
/// stderr; the decision log goes to stdout.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Decision records, metrics and traces of one process.
pub struct Telemetry {
    decision_log: Option<mpsc::Sender<String>>,
    log_client_ip: bool,
    dropped_records: AtomicU64,
    allows: AtomicU64,
    denies: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Telemetry {
    /// Telemetry as the settings ask for. Must run inside a tokio runtime when the decision log is on.
    pub fn new(settings: &Settings) -> Self {
        let decision_log = settings.decision_log.then(|| {
            let (tx, mut rx) = mpsc::channel::<String>(8192);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut out = tokio::io::stdout();
                while let Some(line) = rx.recv().await {
                    if out.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                    let _ = out.flush().await;
                }
            });
            tx
        });
        Telemetry {
            decision_log,
            log_client_ip: settings.decision_log_client_ip,
            dropped_records: AtomicU64::new(0),
            allows: AtomicU64::new(0),
            denies: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }

    /// Records one decision. Never blocks: a full decision-log queue drops the record and counts it.
    pub fn record(&self, d: &Decision, elapsed: Duration) {
        if d.is_allow() {
            self.allows.fetch_add(1, Ordering::Relaxed);
        } else {
            self.denies.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(tx) = &self.decision_log {
            let line = decision_record(d, elapsed, self.log_client_ip);
            if tx.try_send(line).is_err() {
                self.dropped_records.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a config reload.
    pub fn config_reload(&self, ok: bool) {
        if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn prometheus_text(&self) -> String {
        format!(
            "# TYPE portcullis_decisions_total counter\nportcullis_decisions_total{{outcome=\"allow\"}} {}\nportcullis_decisions_total{{outcome=\"deny\"}} {}\n# TYPE portcullis_config_reloads_total counter\nportcullis_config_reloads_total{{result=\"success\"}} {}\nportcullis_config_reloads_total{{result=\"failure\"}} {}\n",
            self.allows.load(Ordering::Relaxed),
            self.denies.load(Ordering::Relaxed),
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }
}

/// One decision as a JSON line. Never carries a token, key or secret: only ids, names and codes.
pub fn decision_record(d: &Decision, elapsed: Duration, with_client_ip: bool) -> String {
    let time = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let trace_id = d
        .facts
        .traceparent
        .as_deref()
        .and_then(|tp| tp.split('-').nth(1))
        .filter(|t| t.len() == 32);
    let mut v = serde_json::json!({
        "time": time,
        "decision_id": d.id,
        "api": d.api.as_deref(),
        "outcome": if d.is_allow() { "allow" } else { "deny" },
        "reason": d.reason().map(|r| r.as_str()),
        "shadow": d.waived.is_some(),
        "subscription_id": d.facts.subscription_id.as_deref(),
        "subject": d.facts.subject,
        "duration_us": elapsed.as_micros() as u64,
        "trace_id": trace_id,
    });
    if with_client_ip {
        v["client_ip"] = serde_json::json!(d.facts.client_ip.map(|ip| ip.to_string()));
    }
    let mut line = v.to_string();
    line.push('\n');
    line
}
