//! Traces: the process's tracer provider behind the `tracing` subscriber, and the trace context the
//! proxy forwards (W3C `traceparent`, B3 single and multi header).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::otlp::{self, ExporterError, OtlpTarget};

/// Whether spans are exported (set once, by [`super::init`]).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans; when it does not, no Check span is even created.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Builds the tracer provider that exports to `target` in batches. Must run inside a tokio runtime.
pub(crate) fn provider(target: &OtlpTarget) -> Result<SdkTracerProvider, ExporterError> {
    let exporter = otlp::span_exporter(target)?;
    // The batch processor runs on its own thread with a bounded queue: a slow or absent collector
    // drops spans instead of holding up a decision. OTEL_BSP_* and OTEL_TRACES_SAMPLER still apply.
    let provider = SdkTracerProvider::builder()
        .with_resource(otlp::resource())
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    ENABLED.store(true, Ordering::Relaxed);
    Ok(provider)
}

fn w3c() -> &'static TraceContextPropagator {
    static P: OnceLock<TraceContextPropagator> = OnceLock::new();
    P.get_or_init(TraceContextPropagator::new)
}

fn b3() -> &'static opentelemetry_propagator_b3::Propagator {
    static P: OnceLock<opentelemetry_propagator_b3::Propagator> = OnceLock::new();
    P.get_or_init(|| {
        opentelemetry_propagator_b3::Propagator::with_encoding(
            opentelemetry_propagator_b3::B3Encoding::SingleAndMultiHeader,
        )
    })
}

/// The caller's trace context from the first carrier that has a valid one. Within a carrier W3C
/// `traceparent` wins over B3 (`b3`, then `x-b3-*`), as Envoy may send both.
pub fn remote_context(carriers: &[&dyn Extractor]) -> Option<opentelemetry::Context> {
    for carrier in carriers {
        let from_b3 = b3().extract_with_context(&opentelemetry::Context::new(), *carrier);
        let cx = w3c().extract_with_context(&from_b3, *carrier);
        if cx.span().span_context().is_valid() {
            return Some(cx);
        }
    }
    None
}

/// The request headers [`remote_context`] reads: the propagators' own field lists (W3C
/// `traceparent`, `tracestate`; B3 `b3`, `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`,
/// `x-b3-flags`), for the proxy's header allow-list (`portcullis envoy-config`).
pub fn propagation_headers() -> Vec<String> {
    let mut fields: Vec<String> = w3c()
        .fields()
        .chain(b3().fields())
        .map(str::to_string)
        .collect();
    fields.dedup();
    fields
}

/// The trace id of a context, if it has a valid span.
pub(crate) fn trace_id(cx: &opentelemetry::Context) -> Option<TraceId> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id())
}

/// Request headers as the policy sees them (lower-case names, raw values) as a propagation carrier.
pub struct HeadersCarrier<'a>(pub &'a [crate::policy::RequestHeader]);

impl Extractor for HeadersCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // Propagators ask with lower-case names, which is how the headers are keyed.
        let h = self.0.iter().find(|h| h.name == key.as_bytes())?;
        std::str::from_utf8(&h.value).ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|h| std::str::from_utf8(&h.name).ok())
            .collect()
    }
}

/// The gRPC call's own metadata as a carrier: when Envoy traces the ext_authz call it injects the
/// context of its client span there, which is the most precise parent of the Check span.
pub struct MetadataCarrier<'a>(pub &'a tonic::metadata::MetadataMap);

impl Extractor for MetadataCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// An HTTP header map (forward-auth requests) as a carrier.
pub struct HeaderMapCarrier<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderMapCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Outgoing request headers as a propagation carrier.
struct HeaderMapInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderMapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Adds the current span's W3C trace context (`traceparent`, `tracestate`) to outgoing request
/// headers, so an identity provider or token endpoint that traces joins the same trace. Does nothing
/// when spans are not exported or no span is current.
pub fn inject_current(headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        w3c().inject_context(&cx, &mut HeaderMapInjector(headers));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> crate::policy::Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec().into()))
            .collect()
    }

    #[test]
    fn w3c_traceparent_is_extracted() {
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let cx = remote_context(&[&HeadersCarrier(&h)]).unwrap();
        assert_eq!(
            trace_id(&cx).unwrap().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            cx.span().span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );
        assert!(cx.span().span_context().is_remote());
    }

    #[test]
    fn b3_multi_and_single_headers_are_extracted() {
        let multi = headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]);
        let cx = remote_context(&[&HeadersCarrier(&multi)]).unwrap();
        assert_eq!(
            trace_id(&cx).unwrap().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        let single = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let cx = remote_context(&[&HeadersCarrier(&single)]).unwrap();
        assert_eq!(
            cx.span().span_context().span_id().to_string(),
            "e457b5a2e4d86bd1"
        );
    }

    #[test]
    fn w3c_wins_over_b3_and_the_first_carrier_wins() {
        let both = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]);
        let cx = remote_context(&[&HeadersCarrier(&both)]).unwrap();
        assert_eq!(
            trace_id(&cx).unwrap().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );

        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-01"
                .parse()
                .unwrap(),
        );
        let cx = remote_context(&[&MetadataCarrier(&md), &HeadersCarrier(&both)]).unwrap();
        assert_eq!(
            trace_id(&cx).unwrap().to_string(),
            "11111111111111111111111111111111"
        );
    }

    #[test]
    fn garbage_and_absent_contexts_are_ignored() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz-not-a-trace",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            let h = headers(&[("traceparent", bad)]);
            assert!(remote_context(&[&HeadersCarrier(&h)]).is_none(), "{bad}");
        }
        let mut h = headers(&[]);
        h.insert("traceparent".into(), vec![0xff, 0xfe].into());
        assert!(remote_context(&[&HeadersCarrier(&h)]).is_none());
        assert!(remote_context(&[]).is_none());
    }
}
