//! The decision log: one JSON line per decision on stdout, written by a dedicated thread so that a
//! slow or blocked stdout never delays a decision. The decision path only copies the record's facts
//! into a bounded queue; formatting and writing happen on that thread. When the queue is full a
//! record is dropped and counted (`portcullis.decision_log.dropped`).

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::TraceId;
use serde::{Serialize, Serializer};

use super::Outcome;
use super::otlp::RateLimit;
use crate::policy::Decision;

/// Records that may wait for the writer before new ones are dropped.
const QUEUE: usize = 8192;
/// Records written per `write` call at most.
const BATCH: usize = 256;
/// How long the writer waits for more records after a batch; records appear at most this late.
const LINGER: Duration = Duration::from_millis(2);

enum Message {
    Record(Box<Record>),
    /// An audit record, already one JSON line (without its newline).
    Audit(String),
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
    pub(crate) fn record(
        &self,
        d: &Decision,
        elapsed: Duration,
        trace_id: Option<TraceId>,
        request: Option<String>,
    ) {
        let mut record = Record::new(d, elapsed, trace_id, self.with_client_ip);
        record.request = request;
        match self.tx.try_send(Message::Record(Box::new(record))) {
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

    /// Queues an audit record: unlike a decision's, it waits for room rather than being dropped
    /// (admin changes are rare and each must be on record).
    pub(crate) fn audit(&self, record: &AuditRecord<'_>) {
        if let Ok(line) = serde_json::to_string(record) {
            let _ = self.tx.send(Message::Audit(line));
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
///
/// After a batch the thread lingers briefly instead of parking at once: a sender only has to wake
/// a parked receiver (a system call on the decision path), and under load the records of the
/// linger period are then written together.
fn write_loop(rx: &Receiver<Message>, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut acks = Vec::new();
        let mut next = Some(first);
        let mut n = 0;
        while let Some(msg) = next.take() {
            match msg {
                Message::Record(record) => {
                    if record.write_line(&mut out).is_err() {
                        return;
                    }
                }
                Message::Audit(line) => {
                    if out.write_all(line.as_bytes()).is_err() || out.write_all(b"\n").is_err() {
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
        std::thread::sleep(LINGER);
    }
}

/// One change made through the admin API, as the decision log writes it: who, what, when and which
/// subscription; never a key or a hash.
#[derive(Serialize)]
pub(crate) struct AuditRecord<'a> {
    #[serde(serialize_with = "rfc3339_micros")]
    pub(crate) time: SystemTime,
    /// Always `subscription` for now: what kind of thing changed.
    pub(crate) audit: &'static str,
    /// Who: the holder of the admin token.
    pub(crate) who: &'static str,
    /// `create`, `activate`, `suspend`, `cancel`, `regenerate`, `delete`.
    pub(crate) action: &'a str,
    pub(crate) subscription_id: &'a str,
    /// Which key was regenerated: `primary` or `secondary`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) regenerated: Option<&'a str>,
}

/// One decision record, as the decision path hands it over. Never carries a token, key or secret:
/// only ids, names and codes, the JWT subject and (unless turned off) the client IP.
#[derive(Serialize)]
pub(crate) struct Record {
    #[serde(serialize_with = "rfc3339_micros")]
    time: SystemTime,
    decision_id: String,
    #[serde(serialize_with = "display_opt")]
    trace_id: Option<TraceId>,
    #[serde(serialize_with = "display_opt")]
    api: Option<Arc<str>>,
    outcome: &'static str,
    reason: Option<&'static str>,
    shadow: bool,
    #[serde(serialize_with = "display_opt")]
    subscription_id: Option<crate::policy::subscription::SubscriptionId>,
    subject: Option<String>,
    /// `certificate` (RFC 8705), `dpop` (RFC 9449), `none` or `refused`: never the proof, the
    /// token or the certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    token_binding: Option<&'static str>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "display_opt_opt"
    )]
    client_ip: Option<Option<IpAddr>>,
    /// The canonical request line without the query (which may carry a key or a token):
    /// `GET api.example.com/orders/1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<String>,
    duration_us: u64,
}

impl Record {
    fn new(
        d: &Decision,
        elapsed: Duration,
        trace_id: Option<TraceId>,
        with_client_ip: bool,
    ) -> Record {
        Record {
            time: SystemTime::now(),
            decision_id: d.id.clone(),
            trace_id,
            api: d.api.clone(),
            outcome: Outcome::of(d).as_str(),
            reason: d.reason().map(|r| r.as_str()),
            shadow: d.waived.is_some(),
            subscription_id: d.facts.subscription_id.clone(),
            subject: d.facts.subject.clone(),
            token_binding: d.facts.token_binding,
            client_ip: with_client_ip.then_some(d.facts.client_ip),
            request: None,
            duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        }
    }

    /// Writes the record as one JSON line.
    fn write_line(&self, out: &mut impl Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, self)?;
        out.write_all(b"\n")
    }
}

fn rfc3339_micros<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*t))
}

fn display_opt<S: Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn display_opt_opt<S: Serializer, T: std::fmt::Display>(
    v: &Option<Option<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    display_opt(&v.as_ref().and_then(Option::as_ref), s)
}

/// One decision as a JSON line (what the writer thread writes).
#[cfg(test)]
fn decision_record(
    d: &Decision,
    elapsed: Duration,
    trace_id: Option<TraceId>,
    with_client_ip: bool,
) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    Record::new(d, elapsed, trace_id, with_client_ip)
        .write_line(&mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
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
        let decisions: Vec<Decision> = (0..10).map(|_| denied(Reason::NoMatchingApi)).collect();
        for d in &decisions {
            tx.send(Message::Record(Box::new(Record::new(
                d,
                Duration::ZERO,
                None,
                false,
            ))))
            .unwrap();
        }
        let (ack_tx, ack_rx) = sync_channel(1);
        tx.send(Message::Flush(ack_tx)).unwrap();
        ack_rx.recv().unwrap();
        let text = buf.text();
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["decision_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            ids,
            decisions.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            "every record, in order, one a line"
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
            log.record(&d, Duration::ZERO, None, None);
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
