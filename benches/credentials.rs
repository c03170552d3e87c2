//! Decision time with a backend credential served from the token cache, against the same API
//! without one; and how many token-endpoint requests 10,000 checks cost.
//!
//!   cargo bench --bench credentials
//!
//! The token endpoint is a local fake (axum on 127.0.0.1) answering `expires_in: 600`; the cache is
//! warm before measuring, as after start-up.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::policy::{CheckInput, EvalOptions, Headers, PolicySet, Runtime, compile};

/// A token endpoint on 127.0.0.1 counting its requests.
fn fake_token_endpoint(rt: &tokio::runtime::Runtime) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                (
                    [("content-type", "application/json")],
                    format!(
                        r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":600}}"#
                    ),
                )
            }
        }),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}/token", listener.local_addr().expect("addr"));
    rt.spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

fn policy(token_url: &str, runtime: &Runtime) -> PolicySet {
    let y = format!(
        r#"
credentials:
  - {{ name: backend, grant: client_credentials, token_url: "{token_url}", client_id: bench, client_secret: bench-secret, scope: api://backend/.default }}
apis:
  - name: plain
    match: {{ path_prefix: /plain }}
    on_allow: {{ set_headers: {{ x-api: "{{api}}" }} }}
  - name: credentialed
    match: {{ path_prefix: /credentialed }}
    on_allow: {{ set_headers: {{ x-api: "{{api}}" }}, backend_credential: {{ name: backend }} }}
"#
    );
    let src = portcullis::config::parse(&y, Path::new(".")).expect("bench config loads");
    compile(&src, runtime).expect("bench config compiles").0
}

fn headers() -> Headers {
    let mut h = Headers::new();
    for (k, v) in [
        (":authority", "api.example.com"),
        (":method", "GET"),
        ("authorization", "Bearer caller"),
        ("user-agent", "curl/8.5.0"),
    ] {
        h.insert(k.to_string(), v.as_bytes().to_vec().into());
    }
    h
}

fn input<'a>(path: &'a str, headers: &'a Headers) -> CheckInput<'a> {
    CheckInput {
        method: "GET",
        host: "api.example.com",
        path,
        scheme: "",
        headers,
        peer: Some([10, 0, 0, 1].into()),
        peer_certificate: "",
        context_extensions: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (url, hits) = fake_token_endpoint(&rt);
    let runtime = Runtime::default();
    let policy = policy(&url, &runtime);
    runtime.publish(&policy);
    rt.block_on(runtime.credentials.start(policy.backend_credentials()))
        .expect("start");
    let h = headers();

    // 10,000 checks: how many of them reach the token endpoint.
    let before = hits.load(Ordering::SeqCst);
    rt.block_on(async {
        for _ in 0..10_000 {
            let d = policy
                .decide(&input("/credentialed/1", &h), EvalOptions::default())
                .await;
            assert!(d.is_allow());
        }
    });
    println!(
        "token endpoint requests: {} at start, {} for the next 10000 checks",
        before,
        hits.load(Ordering::SeqCst) - before
    );

    let mut g = c.benchmark_group("decision");
    g.bench_function("without_backend_credential", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                policy
                    .decide(&input("/plain/1", &h), EvalOptions::default())
                    .await,
            )
        })
    });
    g.bench_function("with_cached_backend_credential", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                policy
                    .decide(&input("/credentialed/1", &h), EvalOptions::default())
                    .await,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
