//! Heap allocations per Check on the in-process wire path (decode, decide, encode), counted with
//! dhat. A deterministic guard against allocation creeping back into the hot path: the counts do
//! not depend on timing. The budgets are today's counts; lower them when the path gets leaner.

#[path = "realistic/mod.rs"]
mod realistic;

use portcullis::proto::auth::CheckRequest;
use prost::Message;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const ROUNDS: u64 = 50;
const WINDOWS: usize = 5;

fn allocations_per_check(rt: &tokio::runtime::Runtime, s: &realistic::Scenario, name: &str) -> u64 {
    // Decoded from a shared buffer, as tonic decodes: `bytes` fields (header names and values)
    // become slices of it, not copies.
    let encoded = bytes::Bytes::from(s.encoded.clone());
    let check = || async {
        let req = CheckRequest::decode(encoded.clone()).expect("decodes");
        let resp = portcullis::server::grpc::decide(&s.policy, &req).await;
        assert_eq!(
            resp.status.as_ref().map(|s| s.code),
            Some(0),
            "{name} must allow"
        );
        resp.encode_to_vec()
    };
    // Warm: the verified-token cache, the certificate cache, the credential cache.
    rt.block_on(check());
    // dhat counts every thread's allocations, and background work (a cache's housekeeping, a timer
    // of the policy's runtime) can land in a window on a loaded machine: the check's own count is
    // the same in every window, so the fewest of several windows is it.
    (0..WINDOWS)
        .map(|_| {
            let before = dhat::HeapStats::get().total_blocks;
            for _ in 0..ROUNDS {
                rt.block_on(check());
            }
            (dhat::HeapStats::get().total_blocks - before) / ROUNDS
        })
        .min()
        .expect("windows")
}

#[test]
fn allocations_per_check_stay_within_budget() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let floor = realistic::floor();
    let real = realistic::realistic();
    let bare = realistic::realistic_without_metadata();
    let trusted = realistic::realistic_with_trust();
    let _profiler = dhat::Profiler::builder().testing().build();
    let f = allocations_per_check(&rt, &floor, "floor");
    let r = allocations_per_check(&rt, &real, "realistic");
    let b = allocations_per_check(&rt, &bare, "realistic without dynamic metadata");
    let t = allocations_per_check(&rt, &trusted, "realistic with chain trust");
    println!("allocations per check with client_certificate.trust (cached chain): {t}");
    // A verified chain is cached: a client sending the same certificate costs a lookup, no more.
    assert!(
        t <= r + TRUST_BUDGET,
        "chain trust: {} allocations per check, budget {TRUST_BUDGET}",
        t.saturating_sub(r)
    );
    println!(
        "allocations per check: floor {f}, realistic {r}, realistic without dynamic metadata {b}"
    );
    // The decision's facts for Envoy are written straight into their protobuf encoding.
    assert!(
        r.saturating_sub(b) <= METADATA_BUDGET,
        "dynamic metadata: {} allocations per check, budget {METADATA_BUDGET}",
        r.saturating_sub(b)
    );
    assert!(
        f <= FLOOR_BUDGET,
        "floor: {f} allocations per check, budget {FLOOR_BUDGET}"
    );
    assert!(
        r <= REALISTIC_BUDGET,
        "realistic: {r} allocations per check, budget {REALISTIC_BUDGET}"
    );
}

const FLOOR_BUDGET: u64 = 16;
const REALISTIC_BUDGET: u64 = 35;
/// Allocations the `dynamic_metadata` Struct adds to an allow (issue target: at most 10).
const METADATA_BUDGET: u64 = 1;
/// Allocations a cached verified chain (`client_certificate.trust`) adds to an allow.
const TRUST_BUDGET: u64 = 0;
