//! Policy evaluation time, from a CheckInput to a Decision, over a scenario matrix
//! (APIs x subscription keys x CIDRs). Deterministic: no RNG, keys and ranges are derived from indices.
//!
//!   cargo bench --bench decision

use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::policy::{
    CheckInput, EvalOptions, Headers, PolicySet, Runtime, compile, subscription,
};

fn policy(apis: usize, keys: usize, cidrs: usize) -> PolicySet {
    let mut y = String::from("subscriptions:\n  keys:\n");
    for k in 0..keys {
        let hash = subscription::format_hash(&subscription::hash_key(&format!("key-{k}")));
        let scope = if k % 3 == 0 {
            "all".to_string()
        } else {
            format!("api:api-{}", k % apis)
        };
        let _ = writeln!(
            y,
            "    - {{ id: sub-{k}, scope: \"{scope}\", primary: \"{hash}\" }}"
        );
    }
    let mut addrs = String::new();
    for c in 0..cidrs {
        // Spread /24s over 10.0.0.0/8 and 172.16.0.0/12, with some IPv6.
        if c % 10 == 9 {
            let _ = write!(addrs, "\"2001:db8:{:x}::/48\", ", c);
        } else {
            let _ = write!(addrs, "10.{}.{}.0/24, ", (c / 256) % 256, c % 256);
        }
    }
    y.push_str("apis:\n");
    for a in 0..apis {
        let _ = write!(
            y,
            "  - name: api-{a}\n    match: {{ hosts: [api.example.com], path_prefix: /svc{a}, methods: [GET, POST] }}\n    subscription_required: true\n    ip_filter: {{ action: allow, addresses: [{addrs}] }}\n    on_allow: {{ set_headers: {{ x-subscription: \"{{subscription.id}}\", x-client-ip: \"{{client_ip}}\" }} }}\n"
        );
    }
    let src = portcullis::config::parse(&y, Path::new(".")).expect("bench config loads");
    compile(&src, &Runtime::offline())
        .expect("bench config compiles")
        .0
}

fn headers(key: &str, path: &str) -> Headers {
    let mut h = Headers::new();
    for (k, v) in [
        (":authority", "api.example.com"),
        (":method", "GET"),
        (":path", path),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("x-request-id", "7b0f4a9e-5f0c-4b7e-9a43-3f2e9f1d2c11"),
        ("x-forwarded-proto", "https"),
        ("ocp-apim-subscription-key", key),
    ] {
        h.insert(k.to_string(), v.as_bytes().to_vec().into());
    }
    h
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    for (name, apis, keys, cidrs) in [
        ("1api-1key-1cidr", 1, 1, 1),
        ("100api-10kkeys-1kcidr", 100, 10_000, 1_000),
    ] {
        let p = policy(apis, keys, cidrs);
        // The request targets the API in the middle of the file.
        let path: &'static str =
            Box::leak(format!("/svc{}/orders/123?expand=items", apis / 2).into_boxed_str());
        let allow_headers = headers("key-0", path);
        let deny_headers = headers("not-a-key", path);
        let peer = Some("10.0.0.7".parse().expect("ip"));
        let input = |h: &'static Headers| CheckInput {
            method: "GET",
            host: "api.example.com",
            path,
            scheme: "",
            headers: h,
            peer,
            peer_certificate: "",
            context_extensions: None,
        };
        let allow_headers: &'static Headers = Box::leak(Box::new(allow_headers));
        let deny_headers: &'static Headers = Box::leak(Box::new(deny_headers));
        let allow = input(allow_headers);
        let deny = input(deny_headers);
        let d = futures::executor::block_on(p.decide(&allow, EvalOptions::default()));
        assert!(d.is_allow(), "{name}: {:?}", d.outcome);
        let d = futures::executor::block_on(p.decide(&deny, EvalOptions::default()));
        assert!(!d.is_allow(), "{name}");
        group.bench_function(format!("{name}/allow"), |b| {
            b.iter(|| {
                futures::executor::block_on(p.decide(black_box(&allow), EvalOptions::default()))
            })
        });
        group.bench_function(format!("{name}/deny-invalid-key"), |b| {
            b.iter(|| {
                futures::executor::block_on(p.decide(black_box(&deny), EvalOptions::default()))
            })
        });
    }
    group.finish();
}

/// The canonicaliser alone (issue target: under 1 µs on the realistic request): the plain request
/// line every check reads, and one with escapes, upper-case host and port (the slow path).
fn canonical(c: &mut Criterion) {
    use portcullis::policy::canonical::{RequestRules, request};
    let mut group = c.benchmark_group("canonical");
    let rules = RequestRules::default();
    for (name, method, host, target) in [
        (
            "realistic",
            "GET",
            "api.example.com",
            "/orders/123?expand=items",
        ),
        (
            "escaped",
            "get",
            "API.Example.com.:443",
            "/orders/caf%C3%A9/%61b%20c/123?expand=items",
        ),
    ] {
        assert!(request(method, host, target, rules).is_ok());
        group.bench_function(name, |b| {
            b.iter(|| request(black_box(method), black_box(host), black_box(target), rules).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, bench, canonical);
criterion_main!(benches);
