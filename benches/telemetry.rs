//! What telemetry adds to a decision. Each iteration does what the gRPC adapter does around the
//! policy: start the check's trace (reading `traceparent` from the request headers), evaluate, and
//! record metrics, span attributes and the decision log. Scenarios:
//!
//! - `baseline`: evaluation alone, no telemetry code at all (the reference for ratios);
//! - `prometheus`: the default configuration (no `otlp_endpoint`, no `decision_log`): metrics for
//!   `/metrics` only;
//! - `otlp-metrics`: `otlp_endpoint` set, but spans not exported (metrics to two readers);
//! - `otlp-traces`: `otlp_endpoint` set and spans exported (a span per check, batched to a local
//!   collector that discards them), as `portcullis serve` does.
//!
//! The decision log writes to stdout, the terminal criterion reports on, so its scenario
//! (`decision-log`: Prometheus metrics plus one record per check) runs only on request, with
//! stdout sent elsewhere; criterion keeps its numbers in `target/criterion/telemetry/decision-log`:
//!
//!   cargo bench --bench telemetry
//!   PORTCULLIS_BENCH_DECISION_LOG=1 cargo bench --bench telemetry -- decision-log > /dev/null

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
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
use portcullis::config::Settings;
use portcullis::policy::{
    CheckInput, EvalOptions, Headers, PolicySet, Runtime, compile, subscription,
};
use portcullis::telemetry::{self, HeadersCarrier, Telemetry, Transport};
use tracing::Instrument as _;

/// A collector that accepts and discards everything.
#[derive(Clone, Copy)]
struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        _: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        _: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn policy(otlp: Option<&str>, decision_log: bool) -> (PolicySet, Settings) {
    let hash = subscription::format_hash(&subscription::hash_key("key-0"));
    let telemetry = format!(
        "telemetry: {{ decision_log: {decision_log}{} }}\n",
        otlp.map(|ep| format!(", otlp_endpoint: \"{ep}\""))
            .unwrap_or_default()
    );
    let y = format!(
        "{telemetry}subscriptions:\n  keys: [{{ id: sub-0, primary: \"{hash}\" }}]\napis:\n  - name: orders\n    match: {{ hosts: [api.example.com], path_prefix: /orders }}\n    subscription_required: true\n    on_allow: {{ set_headers: {{ x-subscription: \"{{subscription.id}}\" }} }}\n"
    );
    let src = portcullis::config::parse(&y, Path::new(".")).expect("bench config loads");
    compile(&src, &Runtime::offline()).expect("bench config compiles")
}

fn headers() -> &'static Headers {
    let mut h = Headers::new();
    for (k, v) in [
        (":authority", "api.example.com"),
        (":method", "GET"),
        (":path", "/orders/123?expand=items"),
        ("user-agent", "curl/8.5.0"),
        ("x-request-id", "7b0f4a9e-5f0c-4b7e-9a43-3f2e9f1d2c11"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("ocp-apim-subscription-key", "key-0"),
    ] {
        h.insert(k.to_string(), v.as_bytes().to_vec().into());
    }
    Box::leak(Box::new(h))
}

fn input(h: &'static Headers) -> CheckInput<'static> {
    CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/123?expand=items",
        scheme: "",
        headers: h,
        peer: Some("10.0.0.7".parse().expect("ip")),
        peer_certificate: "",
        context_extensions: None,
    }
}

/// One check as the gRPC adapter runs it.
async fn check(p: &PolicySet, t: &Telemetry, input: &CheckInput<'_>) {
    let started = Instant::now();
    let trace = t.start_check(Transport::Grpc, &[&HeadersCarrier(input.headers)]);
    let d = p
        .decide(input, EvalOptions::default())
        .instrument(trace.span().clone())
        .await;
    t.record(&d, started.elapsed(), &trace, || None);
    black_box(d);
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let collector = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Sink))
                .add_service(MetricsServiceServer::new(Sink))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    });
    let _runtime = rt.enter();
    let input = input(headers());
    let mut group = c.benchmark_group("telemetry");

    let (p, settings) = policy(None, false);
    let d = futures::executor::block_on(p.decide(&input, EvalOptions::default()));
    assert!(d.is_allow(), "{:?}", d.outcome);
    // What the adapter did before there was telemetry: time the evaluation.
    group.bench_function("baseline", |b| {
        b.iter(|| {
            let started = Instant::now();
            let d =
                futures::executor::block_on(p.decide(black_box(&input), EvalOptions::default()));
            black_box((d, started.elapsed()))
        })
    });

    let t = Telemetry::new(&settings, std::sync::Arc::new(Runtime::offline())).expect("telemetry");
    group.bench_function("prometheus", |b| {
        b.iter(|| futures::executor::block_on(check(&p, &t, black_box(&input))))
    });
    // The telemetry calls alone, around an evaluation done once.
    group.bench_function("prometheus/telemetry-only", |b| {
        b.iter(|| {
            let trace = t.start_check(Transport::Grpc, &[&HeadersCarrier(input.headers)]);
            t.record(
                black_box(&d),
                std::time::Duration::from_micros(1),
                &trace,
                || None,
            );
        })
    });

    if std::env::var_os("PORTCULLIS_BENCH_DECISION_LOG").is_some() {
        let (p, settings) = policy(None, true);
        let t =
            Telemetry::new(&settings, std::sync::Arc::new(Runtime::offline())).expect("telemetry");
        group.bench_function("decision-log", |b| {
            b.iter(|| futures::executor::block_on(check(&p, &t, black_box(&input))))
        });
        t.shutdown();
    }

    let (p, settings) = policy(Some(&collector), false);
    let t = Telemetry::new(&settings, std::sync::Arc::new(Runtime::offline())).expect("telemetry");
    group.bench_function("otlp-metrics", |b| {
        b.iter(|| futures::executor::block_on(check(&p, &t, black_box(&input))))
    });

    // Span export is process-wide, so it is switched on last. Logs at `error` only: none are expected.
    let process = telemetry::init(
        portcullis::config::LogFormat::Text,
        "error",
        Some(&telemetry::OtlpTarget {
            endpoint: collector.clone(),
            protocol: telemetry::OtlpProtocol::Grpc,
        }),
    );
    assert!(telemetry::traces_enabled());
    group.bench_function("otlp-traces", |b| {
        b.iter(|| futures::executor::block_on(check(&p, &t, black_box(&input))))
    });
    group.bench_function("otlp-traces/telemetry-only", |b| {
        b.iter(|| {
            let trace = t.start_check(Transport::Grpc, &[&HeadersCarrier(input.headers)]);
            t.record(
                black_box(&d),
                std::time::Duration::from_micros(1),
                &trace,
                || None,
            );
        })
    });
    group.finish();

    t.shutdown();
    process.shutdown();
}

criterion_group!(benches, bench);
criterion_main!(benches);
