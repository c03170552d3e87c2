//! The decision log: one JSON line per decision on stdout, written by a dedicated thread so that a
//! slow or blocked stdout never delays a decision. The queue is bounded; when it is full a record
//! is dropped and counted (`portcullis.decision_log.dropped`).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::TraceId;
use serde::Serialize;

use super::Outcome;
use super::otlp::RateLimit;
use crate::policy::Decision;

/// Records that may wait for the writer before new ones are dropped.
const QUEUE: usize = 8192;
/// Records written per `write` call at most.
const BATCH: usize = 256;

enum Message {
    Line(String),
    /// Write everything queued so far, then acknowledge.
    Flush(SyncSender<()>),
}

/// The sending side of the decision log.
pub(crate) struct DecisionLog {
    tx: SyncSender<Message>,
    with_client_ip: bool,
    dropped: Arc<AtomicU64>,
    warned: RateLimit,
}

impl DecisionLog {
    /// Starts the writer thread.
    pub(crate) fn start(
        with_client_ip: bool,
        dropped: Arc<AtomicU64>,
    ) -> std::io::Result<DecisionLog> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_loop(&rx, std::io::stdout()))?;
        Ok(DecisionLog {
            tx,
            with_client_ip,
            dropped,
            warned: RateLimit::new(Duration::from_secs(60)),
        })
    }

    /// Queues the record of one decision; never blocks.
    pub(crate) fn record(&self, d: &Decision, elapsed: Duration, trace_id: Option<TraceId>) {
        let line = decision_record(d, elapsed, trace_id, self.with_client_ip);
        match self.tx.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if self.warned.allow() {
                    tracing::warn!(
                        dropped_records = n,
                        "decision log cannot keep up with decisions; records are being dropped (warning at most once a minute)"
                    );
                }
            }
        }
    }

    /// Waits until every record queued so far is written (bounded by `timeout`).
    pub(crate) fn flush(&self, timeout: Duration) {
        let (ack_tx, ack_rx) = sync_channel(1);
        if self.tx.send(Message::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(timeout);
        }
    }
}

/// Drains the queue in batches: one write per batch, so a burst costs few system calls.
fn write_loop(rx: &Receiver<Message>, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut acks = Vec::new();
        let mut next = Some(first);
        let mut n = 0;
        while let Some(msg) = next.take() {
            match msg {
                Message::Line(line) => {
                    if out.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                }
                Message::Flush(ack) => acks.push(ack),
            }
            n += 1;
            if n < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if out.flush().is_err() {
            return;
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

/// One decision record. Never carries a token, key or secret: only ids, names and codes, the JWT
/// subject and (unless turned off) the client IP.
#[derive(Serialize)]
struct Record<'a> {
    time: String,
    decision_id: &'a str,
    trace_id: Option<String>,
    api: Option<&'a str>,
    outcome: &'static str,
    reason: Option<&'static str>,
    shadow: bool,
    subscription_id: Option<&'a str>,
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<Option<String>>,
    duration_us: u64,
}

/// One decision as a JSON line.
pub(crate) fn decision_record(
    d: &Decision,
    elapsed: Duration,
    trace_id: Option<TraceId>,
    with_client_ip: bool,
) -> String {
    let record = Record {
        time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        decision_id: &d.id,
        trace_id: trace_id.map(|t| t.to_string()),
        api: d.api.as_deref(),
        outcome: Outcome::of(d).as_str(),
        reason: d.reason().map(|r| r.as_str()),
        shadow: d.waived.is_some(),
        subscription_id: d.facts.subscription_id.as_deref(),
        subject: d.facts.subject.as_deref(),
        client_ip: with_client_ip.then(|| d.facts.client_ip.map(|ip| ip.to_string())),
        duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
    };
    // Serializing plain strings, numbers and options into a String cannot fail.
    let mut line = serde_json::to_string(&record).unwrap_or_default();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Denial, Outcome as PolicyOutcome, Reason};

    fn denied(reason: Reason) -> Decision {
        let mut d = Decision::new();
        d.api = Some("orders".into());
        d.outcome = PolicyOutcome::Deny(Denial::new(reason));
        d.facts.client_ip = Some("10.1.2.3".parse().unwrap());
        d.facts.subscription_id = Some("contoso".into());
        d
    }

    #[test]
    fn record_has_the_documented_fields() {
        let d = denied(Reason::SubscriptionKeyInvalid);
        let tid = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let v: serde_json::Value = serde_json::from_str(&decision_record(
            &d,
            Duration::from_micros(42),
            Some(tid),
            true,
        ))
        .unwrap();
        assert_eq!(v["decision_id"], d.id.as_str());
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["api"], "orders");
        assert_eq!(v["outcome"], "deny");
        assert_eq!(v["reason"], "SubscriptionKeyInvalid");
        assert_eq!(v["subscription_id"], "contoso");
        assert_eq!(v["client_ip"], "10.1.2.3");
        assert_eq!(v["duration_us"], 42);
        assert_eq!(v["shadow"], false);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn client_ip_can_be_left_out_and_internal_is_an_error() {
        let d = denied(Reason::Internal);
        let line = decision_record(&d, Duration::ZERO, None, false);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v.get("client_ip").is_none());
        assert!(!line.contains("10.1.2.3"));
        assert_eq!(v["outcome"], "error");
        assert_eq!(v["trace_id"], serde_json::Value::Null);
    }

    #[test]
    fn writer_writes_every_line_and_acknowledges_flushes() {
        let (tx, rx) = sync_channel(16);
        let buf = SharedBuf::default();
        let out = buf.clone();
        let writer = std::thread::spawn(move || write_loop(&rx, out));
        for i in 0..10 {
            tx.send(Message::Line(format!("{i}\n"))).unwrap();
        }
        let (ack_tx, ack_rx) = sync_channel(1);
        tx.send(Message::Flush(ack_tx)).unwrap();
        ack_rx.recv().unwrap();
        assert_eq!(
            buf.text(),
            (0..10).map(|i| format!("{i}\n")).collect::<String>()
        );
        drop(tx);
        writer.join().unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        // A log whose writer never drains: a queue of one.
        let (tx, _rx) = sync_channel(1);
        let dropped = Arc::new(AtomicU64::new(0));
        let log = DecisionLog {
            tx,
            with_client_ip: false,
            dropped: dropped.clone(),
            warned: RateLimit::new(Duration::from_secs(60)),
        };
        let d = denied(Reason::NoMatchingApi);
        for _ in 0..5 {
            log.record(&d, Duration::ZERO, None);
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 4);
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<std::sync::Mutex<Vec<u8>>>);

    impl SharedBuf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
