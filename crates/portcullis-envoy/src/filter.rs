//! One HTTP stream. The request headers are decided on Envoy's worker thread when everything the
//! decision needs is cached (`PolicySet::decide_now`); otherwise the stream is parked
//! (StopIteration), the decision runs on the module's runtime with `PolicySet::decide`, and
//! Envoy's scheduler wakes the stream on its worker to apply it. A decision that does not finish
//! within the engine's `decision_timeout` is a 500 deny: never an allow.
//!
//! The filter object lives on one worker thread, but Envoy may call back into it while a hook is
//! on the stack (a local reply runs other filters), so state is in a `RefCell` that no borrow
//! holds across a call into Envoy.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use portcullis_core::check::metadata::MetaRef;
use portcullis_core::check::{Decision, Denial, Metadata, Outcome, Reason};
use portcullis_core::policy::{EvalOptions, PolicySet};

use crate::abi::{self, Attribute, Stream};
use crate::engine::Engine;
use crate::request::OwnedRequest;
use crate::wire::{self, Reply};

/// The only scheduler event this filter commits.
const EVENT_DECIDED: u64 = 1;

/// Where the decision's facts go in the stream's dynamic metadata: the namespace the ext_authz
/// filter uses, so that access logs and RBAC rules written for ext_authz
/// (`%DYNAMIC_METADATA(envoy.filters.http.ext_authz:api)%`) work unchanged.
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The details Envoy records for this filter's local replies (`%RESPONSE_CODE_DETAILS%`).
const DENY_DETAILS: &str = "portcullis_denied";

/// Per-stream state.
pub struct Filter {
    engine: Arc<Engine>,
    state: RefCell<Phase>,
    /// Envoy has seen the end of the request (headers only, last body frame, or trailers).
    complete: Cell<bool>,
}

enum Phase {
    /// Headers not seen yet.
    Fresh,
    /// The decision runs on the module's runtime; it lands in the slot.
    Deferred(Deferred),
    /// Denied before the request body ended: the reply goes out when it has, as through
    /// ext_authz (which holds the request until it answers); answering at once would make Envoy
    /// close an HTTP/1.1 connection whose body it has not read. The rest of the body is dropped,
    /// not buffered.
    DenyAtEnd(wire::Deny),
    /// Decided (and applied).
    Done,
}

struct Deferred {
    slot: Arc<Mutex<Option<Decision>>>,
    log: LogContext,
    started: Instant,
}

/// What the decision log says about the request besides the decision.
#[derive(Default)]
struct LogContext {
    /// The canonical request line without the query.
    request_line: Option<String>,
    /// The W3C trace id of the request's `traceparent`: the decision joins the caller's trace.
    trace_id: Option<String>,
}

impl Filter {
    /// A stream's filter.
    pub fn new(engine: Arc<Engine>) -> Self {
        Filter {
            engine,
            state: RefCell::new(Phase::Fresh),
            complete: Cell::new(false),
        }
    }

    /// The request headers: decide, or park the stream. Returns the headers status.
    pub fn on_request_headers(&self, s: &Stream<'_>, end_of_stream: bool) -> i32 {
        let started = Instant::now();
        self.complete.set(end_of_stream);
        let route = s.route_config();
        if route.is_some_and(|r| r.disabled) {
            *self.state.borrow_mut() = Phase::Done;
            return abi::HEADERS_CONTINUE;
        }
        let route = route
            .filter(|r| !r.context_extensions.is_empty())
            .map(|r| r.context_extensions.clone());
        let source = s.attribute(Attribute::SourceAddress);
        let request =
            OwnedRequest::read(|f| s.for_each_request_header(f), source.as_deref(), route);
        let policy = self.engine.policy();
        let request = match request {
            Ok(r) => r,
            Err(detail) => {
                let d = policy.with_metadata(invalid_request(detail));
                return self.apply(s, d, LogContext::default(), started);
            }
        };
        // Never set in release builds (FilterOptions refuses the option there).
        if let Some(h) = &self.engine.test_panic_header
            && request.headers.contains_key(h)
        {
            panic!("test panic requested with {h}");
        }
        // Only the decision log reads these: not computed without it.
        let log = if self.engine.decision_log {
            LogContext {
                request_line: policy.request_line(&request.method, &request.host, &request.path),
                trace_id: request.trace_id(),
            }
        } else {
            LogContext::default()
        };
        // Renewals ahead of expiry that decide_now starts go to the module's runtime.
        let now = {
            let _entered = self.engine.handle().enter();
            policy.decide_now(&request.input(), EvalOptions::default())
        };
        match now {
            Some(d) => self.apply(s, d, log, started),
            None => self.defer(s, policy, request, log, started),
        }
    }

    /// The decision needs a fetch: run it on the module's runtime and wake this stream when done.
    fn defer(
        &self,
        s: &Stream<'_>,
        policy: Arc<PolicySet>,
        request: OwnedRequest,
        log: LogContext,
        started: Instant,
    ) -> i32 {
        let Some(scheduler) = s.scheduler() else {
            tracing::error!(
                "portcullis module: no scheduler for a deferred decision; failed closed"
            );
            return self.apply(s, Decision::internal(None), log, started);
        };
        self.count(s, self.engine.counters.deferred);
        let slot = Arc::new(Mutex::new(None));
        let landed = slot.clone();
        let timeout = self.engine.decision_timeout;
        self.engine.handle().spawn(async move {
            let input = request.input();
            let decide = policy.decide(&input, EvalOptions::default());
            let d = match tokio::time::timeout(timeout, decide).await {
                Ok(d) => d,
                Err(_) => timed_out(timeout),
            };
            *landed.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
            scheduler.commit(EVENT_DECIDED);
        });
        *self.state.borrow_mut() = Phase::Deferred(Deferred { slot, log, started });
        abi::HEADERS_STOP
    }

    /// The runtime finished a deferred decision: apply it on the worker and resume the stream.
    pub fn on_scheduled(&self, s: &Stream<'_>, event: u64) {
        if event != EVENT_DECIDED {
            return;
        }
        let phase = std::mem::replace(&mut *self.state.borrow_mut(), Phase::Done);
        let deferred = match phase {
            Phase::Deferred(d) => d,
            other => {
                *self.state.borrow_mut() = other;
                return;
            }
        };
        let decision = deferred
            .slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| Decision::internal(None));
        if self.apply(s, decision, deferred.log, deferred.started) == abi::HEADERS_CONTINUE {
            s.continue_decoding();
        }
    }

    /// While a decision is pending the body is buffered, so that the request goes nowhere; after
    /// a deny it is dropped, and the reply sent at its end.
    pub fn on_request_body(&self, s: &Stream<'_>, end_of_stream: bool) -> i32 {
        if end_of_stream {
            self.complete.set(true);
        }
        let deferred = matches!(*self.state.borrow(), Phase::Deferred(_));
        if deferred {
            return abi::BODY_STOP_AND_BUFFER;
        }
        if self.deny_at_end(s) {
            return abi::BODY_STOP_NO_BUFFER;
        }
        abi::BODY_CONTINUE
    }

    /// As [`Filter::on_request_body`]; trailers end the request.
    pub fn on_request_trailers(&self, s: &Stream<'_>) -> i32 {
        self.complete.set(true);
        let deferred = matches!(*self.state.borrow(), Phase::Deferred(_));
        if deferred || self.deny_at_end(s) {
            return abi::TRAILERS_STOP;
        }
        abi::TRAILERS_CONTINUE
    }

    /// With a deny waiting for the end of the request: sends it once the request is complete.
    /// Whether a deny is waiting (or was just sent).
    fn deny_at_end(&self, s: &Stream<'_>) -> bool {
        let phase = std::mem::replace(&mut *self.state.borrow_mut(), Phase::Done);
        match phase {
            Phase::DenyAtEnd(deny) if self.complete.get() => {
                send_deny(s, &deny);
                true
            }
            Phase::DenyAtEnd(deny) => {
                *self.state.borrow_mut() = Phase::DenyAtEnd(deny);
                true
            }
            other => {
                *self.state.borrow_mut() = other;
                false
            }
        }
    }

    /// The stream ended; a decision still pending is dropped with it (its wake-up is a no-op).
    pub fn on_stream_complete(&self) {
        *self.state.borrow_mut() = Phase::Done;
    }

    /// Applies a decision: header changes and Continue on allow, a local reply and Stop on deny.
    fn apply(&self, s: &Stream<'_>, mut d: Decision, log: LogContext, started: Instant) -> i32 {
        *self.state.borrow_mut() = Phase::Done;
        self.record(s, &d, &log, started);
        set_metadata(s, &std::mem::replace(&mut d.metadata, Metadata::new()));
        match wire::reply(d) {
            Reply::Allow(allow) => {
                for (name, value) in &allow.set {
                    s.set_request_header(name, Some(value.as_bytes()));
                }
                for name in &allow.remove {
                    s.set_request_header(name, None);
                }
                if !allow.remove_query.is_empty()
                    && let Some(path) = current_path(s)
                    && let Some(stripped) = wire::strip_query(&path, &allow.remove_query)
                {
                    s.set_request_header(":path", Some(stripped.as_bytes()));
                }
                abi::HEADERS_CONTINUE
            }
            Reply::Deny(deny) => {
                if self.complete.get() {
                    send_deny(s, &deny);
                } else {
                    *self.state.borrow_mut() = Phase::DenyAtEnd(deny);
                }
                abi::HEADERS_STOP
            }
        }
    }

    fn count(&self, s: &Stream<'_>, counter: Option<usize>) {
        if let Some(id) = counter {
            s.increment_counter(id, 1);
        }
    }

    /// Counters, and the decision log line (`telemetry.decision_log`), in Envoy's log. Never a
    /// token, key or secret: ids, names, codes, the subject, the client IP unless turned off.
    fn record(&self, s: &Stream<'_>, d: &Decision, log: &LogContext, started: Instant) {
        let c = self.engine.counters;
        match &d.outcome {
            Outcome::Allow => self.count(s, c.allow),
            Outcome::Deny(denial) => {
                self.count(s, c.deny);
                if denial.reason == Reason::Internal {
                    self.count(s, c.failed_closed);
                }
            }
        }
        if d.waived.is_some() {
            self.count(s, c.shadow_waived);
        }
        if !self.engine.decision_log {
            return;
        }
        let (outcome, status) = match &d.outcome {
            Outcome::Allow => ("allow", 200),
            Outcome::Deny(denial) => ("deny", denial.status),
        };
        let client_ip = d
            .facts
            .client_ip
            .filter(|_| self.engine.decision_log_client_ip)
            .map(|ip| ip.to_string());
        tracing::info!(
            target: "portcullis::decision",
            decision_id = %d.id,
            api = d.api.as_deref().unwrap_or(""),
            outcome,
            status,
            reason = d.reason().map_or("", Reason::as_str),
            shadow = d.waived.is_some(),
            subject = d.facts.subject.as_deref().unwrap_or(""),
            subscription_id = d.facts.subscription_id.as_deref().unwrap_or(""),
            client_ip = client_ip.as_deref().unwrap_or(""),
            request = log.request_line.as_deref().unwrap_or(""),
            trace_id = log.trace_id.as_deref().unwrap_or(""),
            duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "decision"
        );
    }
}

/// Answers the stream with the `Internal` deny (500), after a panic: fail closed.
pub fn fail_closed(f: &Filter, s: &Stream<'_>) {
    if let Ok(mut state) = f.state.try_borrow_mut() {
        *state = Phase::Done;
    }
    let d = Decision::internal(None);
    if let Some(id) = f.engine.counters.failed_closed {
        s.increment_counter(id, 1);
    }
    if let Reply::Deny(deny) = wire::reply(d) {
        send_deny(s, &deny);
    }
}

/// The decision's facts (`dynamic_metadata` of the ext_authz path) as dynamic metadata, the
/// strings in one call. A list (`scopes`) is one space-separated string: the 1.40 ABI's list
/// setters are not bound.
fn set_metadata(s: &Stream<'_>, metadata: &Metadata) {
    if metadata.is_empty() {
        return;
    }
    // Borrowed from the decision's buffer (Envoy copies them); only a list is joined anew.
    let mut strings: Vec<(&str, Cow<'_, str>)> = Vec::with_capacity(12);
    metadata.visit(|key, value| match value {
        MetaRef::String(v) => strings.push((key, Cow::Borrowed(v))),
        MetaRef::List(items) => {
            strings.push((key, Cow::Owned(items.collect::<Vec<_>>().join(" "))));
        }
        MetaRef::Bool(b) => s.set_metadata_bool(METADATA_NAMESPACE, key, b),
    });
    let refs: Vec<(&str, &str)> = strings.iter().map(|(k, v)| (*k, v.as_ref())).collect();
    s.set_metadata_strings(METADATA_NAMESPACE, &refs);
}

fn send_deny(s: &Stream<'_>, deny: &wire::Deny) {
    s.send_response(deny.status, &deny.header_refs(), &deny.body, DENY_DETAILS);
}

/// `:path` as it is now.
fn current_path(s: &Stream<'_>) -> Option<String> {
    let mut path = None;
    s.for_each_request_header(|k, v| {
        if k == b":path" {
            path = Some(String::from_utf8_lossy(v).into_owned());
        }
    });
    path
}

/// The ext_authz path's answer to a request without method or path.
fn invalid_request(detail: &str) -> Decision {
    let mut d = Decision::new();
    d.outcome = Outcome::Deny(Denial::new(Reason::InvalidRequest).with_message(format!(
        "The authorization request is incomplete: {detail}."
    )));
    d
}

/// A deferred decision that outlived its deadline: refused, never allowed.
fn timed_out(timeout: std::time::Duration) -> Decision {
    tracing::warn!(
        timeout_ms = timeout.as_millis() as u64,
        "portcullis module: decision did not complete in time; failed closed"
    );
    let mut d = Decision::internal(None);
    if let Outcome::Deny(denial) = &mut d.outcome {
        denial.message = "The authorization decision did not complete in time.".into();
    }
    d
}
