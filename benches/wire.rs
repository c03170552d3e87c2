//! The in-process cost of one Check, wire to wire: decode the CheckRequest bytes, decide, encode the
//! CheckResponse. `floor` allows everything with no checks (the adapter and response alone);
//! `realistic` runs every check (tests/realistic: JWT from the verified-token cache, IP filter,
//! subscription key, client certificate, claim headers, backend credential). The difference is what
//! the policy costs on top of the transport. `realistic_no_metadata` is `realistic` with
//! `dynamic_metadata: false`: the difference is what the facts for Envoy cost per allow.
//! `realistic_trust` adds `client_certificate.trust` (the chain to a CA, from the verified-chain
//! cache after the first check).
//!
//!   cargo bench --bench wire

#[path = "../tests/realistic/mod.rs"]
mod realistic;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::proto::auth::CheckRequest;
use prost::Message;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("wire_check");
    for (name, s) in [
        ("floor", realistic::floor()),
        ("realistic", realistic::realistic()),
        (
            "realistic_no_metadata",
            realistic::realistic_without_metadata(),
        ),
        ("realistic_trust", realistic::realistic_with_trust()),
    ] {
        let first = rt.block_on(portcullis::server::grpc::decide(&s.policy, &s.request));
        assert_eq!(
            first.status.map(|s| s.code),
            Some(0),
            "{name}: the bench request must be allowed"
        );
        // Decoded from a shared buffer, as tonic decodes: `bytes` fields (header names and
        // values) become slices of it, not copies.
        let encoded = bytes::Bytes::from(s.encoded.clone());
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let req = CheckRequest::decode(black_box(encoded.clone())).expect("decodes");
                let resp = portcullis::server::grpc::decide(&s.policy, &req).await;
                black_box(resp.encode_to_vec())
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
