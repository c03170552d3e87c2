//! Decision time as the policy grows, one dimension at a time (the others stay minimal):
//! - `keys/N`: N subscription keys, the request presents the last one;
//! - `cidrs/N`: an IP filter of N CIDRs (IPv4 /24s with every tenth an IPv6 /48), the client is in
//!   the last one;
//! - `apis/N`: N APIs told apart by path prefix, the request matches the last one;
//! - `providers/N/warm`: a JWT API trusting N identity providers, the token is from the last one and
//!   already verified (the per-request cost once a client's token is cached);
//! - `providers/N/cold`: the same token not verified yet (one RS256 signature check per iteration).
//!
//! The target is that the largest size of each dimension stays within 1.2x of the smallest.
//! `loadtest/scale.sh` runs this and tabulates the ratios from criterion's estimates.
//!
//!   cargo bench --bench scaling

#[path = "../tests/jwt_common/mod.rs"]
mod keys;

use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, SystemTime};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use portcullis::policy::{
    CheckInput, EvalOptions, Headers, PolicySet, Runtime, compile, subscription,
};

const HOST: &str = "api.example.com";

fn compile_yaml(y: &str) -> PolicySet {
    let src = portcullis::config::parse(y, Path::new(".")).expect("bench config loads");
    compile(&src, &Runtime::offline())
        .expect("bench config compiles")
        .0
}

/// The n-th CIDR of an IP filter, and an address inside it.
fn cidr(c: usize) -> (String, String) {
    if c % 10 == 9 {
        (
            format!("\"2001:db8:{c:x}::/48\""),
            format!("2001:db8:{c:x}::7"),
        )
    } else {
        (
            format!("10.{}.{}.0/24", (c / 256) % 256, c % 256),
            format!("10.{}.{}.7", (c / 256) % 256, c % 256),
        )
    }
}

fn keys_policy(n: usize) -> PolicySet {
    let mut y = String::from("subscriptions:\n  keys:\n");
    for k in 0..n {
        let hash = subscription::format_hash(&subscription::hash_key(&format!("key-{k}")));
        let _ = writeln!(
            y,
            "    - {{ id: sub-{k}, scope: all, primary: \"{hash}\" }}"
        );
    }
    y.push_str(
        "apis:\n  - name: api-0\n    match: { path_prefix: /svc0 }\n    subscription_required: true\n",
    );
    compile_yaml(&y)
}

fn cidrs_policy(n: usize) -> PolicySet {
    let addrs: Vec<String> = (0..n).map(|c| cidr(c).0).collect();
    let y = format!(
        "apis:\n  - name: api-0\n    match: {{ path_prefix: /svc0 }}\n    ip_filter: {{ action: allow, addresses: [{}] }}\n",
        addrs.join(", ")
    );
    compile_yaml(&y)
}

fn apis_policy(n: usize) -> PolicySet {
    let mut y = String::from("apis:\n");
    for a in 0..n {
        let _ = write!(
            y,
            "  - name: api-{a}\n    match: {{ hosts: [{HOST}], path_prefix: /svc{a}, methods: [GET, POST] }}\n"
        );
    }
    compile_yaml(&y)
}

const AUD: &str = "api://orders";

fn issuer(p: usize) -> String {
    format!("https://idp.test/tenant-{p}")
}

fn providers_policy(n: usize, jwks: &[serde_json::Value]) -> PolicySet {
    let mut y = String::from("identity_providers:\n");
    let mut names = Vec::with_capacity(n);
    for (p, jwk) in jwks.iter().enumerate().take(n) {
        let _ = writeln!(
            y,
            "  - {{ name: idp-{p}, issuer: \"{}\", keys: [{jwk}] }}",
            issuer(p)
        );
        names.push(format!("idp-{p}"));
    }
    let _ = write!(
        y,
        "apis:\n  - name: api-0\n    match: {{ path_prefix: /svc0 }}\n    jwt: {{ providers: [{}], audiences: [\"{AUD}\"] }}\n    on_allow: {{ set_headers: {{ x-user: \"{{jwt.sub}}\" }} }}\n",
        names.join(", ")
    );
    compile_yaml(&y)
}

fn headers(extra: Option<(&str, String)>) -> &'static Headers {
    let mut h = Headers::new();
    for (k, v) in [
        (":authority", HOST),
        (":method", "GET"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("x-request-id", "7b0f4a9e-5f0c-4b7e-9a43-3f2e9f1d2c11"),
    ] {
        h.insert(k.to_string(), v.as_bytes().to_vec().into());
    }
    if let Some((k, v)) = extra {
        h.insert(k.to_string(), v.into_bytes().into());
    }
    Box::leak(Box::new(h))
}

fn input(path: &str, headers: &'static Headers, peer: &str) -> CheckInput<'static> {
    CheckInput {
        method: "GET",
        host: HOST,
        path: Box::leak(path.to_string().into_boxed_str()),
        scheme: "",
        headers,
        peer: Some(peer.parse().expect("bench peer address")),
        peer_certificate: "",
        context_extensions: None,
    }
}

fn opts() -> EvalOptions {
    EvalOptions {
        now: SystemTime::now(),
        explain: false,
    }
}

fn allowed(p: &PolicySet, i: &CheckInput<'_>, what: &str) {
    let d = futures::executor::block_on(p.decide(i, opts()));
    assert!(d.is_allow(), "{what}: {:?}", d.outcome);
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scaling");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40);

    for n in [10, 1_000, 10_000, 100_000] {
        let p = keys_policy(n);
        let last = format!("key-{}", n - 1);
        let i = input(
            "/svc0/orders/1",
            headers(Some(("ocp-apim-subscription-key", last))),
            "10.0.0.7",
        );
        allowed(&p, &i, "keys");
        g.bench_with_input(BenchmarkId::new("keys", n), &i, |b, i| {
            b.iter(|| futures::executor::block_on(p.decide(black_box(i), opts())))
        });
    }

    for n in [10, 100, 1_000, 10_000] {
        let p = cidrs_policy(n);
        let i = input("/svc0/orders/1", headers(None), &cidr(n - 1).1);
        allowed(&p, &i, "cidrs");
        g.bench_with_input(BenchmarkId::new("cidrs", n), &i, |b, i| {
            b.iter(|| futures::executor::block_on(p.decide(black_box(i), opts())))
        });
    }

    for n in [10, 100, 1_000] {
        let p = apis_policy(n);
        let i = input(
            &format!("/svc{}/orders/1", n - 1),
            headers(None),
            "10.0.0.7",
        );
        allowed(&p, &i, "apis");
        g.bench_with_input(BenchmarkId::new("apis", n), &i, |b, i| {
            b.iter(|| futures::executor::block_on(p.decide(black_box(i), opts())))
        });
    }

    // Two RSA keys shared by all providers (generating 50 would only slow the bench down): every
    // provider but the last has key A, the last has key B, each under its own kid.
    let (a, b) = (keys::rsa(0, None), keys::rsa(1, Some("last")));
    let max = 50;
    let jwks: Vec<serde_json::Value> = (0..max)
        .map(|p| {
            let mut jwk = if p == max - 1 {
                b.jwk.clone()
            } else {
                a.jwk.clone()
            };
            jwk["kid"] = format!("k{p}").into();
            jwk
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("bench runtime");
    for n in [1, 10, 50] {
        let key = if n == max { &b } else { &a };
        let header =
            serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": format!("k{}", n - 1)});
        let token = key.sign(header, keys::claims(&issuer(n - 1), AUD, "alice"));
        let i = input(
            "/svc0/orders/1",
            headers(Some(("authorization", format!("Bearer {token}")))),
            "10.0.0.7",
        );
        let warm = providers_policy(n, &jwks);
        assert!(rt.block_on(warm.decide(&i, opts())).is_allow(), "providers");
        g.bench_with_input(BenchmarkId::new("providers_warm", n), &i, |bch, i| {
            bch.to_async(&rt)
                .iter(|| async { warm.decide(black_box(i), opts()).await })
        });
        g.bench_with_input(BenchmarkId::new("providers_cold", n), &i, |bch, i| {
            // A fresh policy set (so an empty verified-token cache) per iteration; building it is
            // not timed.
            bch.to_async(&rt).iter_batched(
                || providers_policy(n, &jwks),
                |p| async move {
                    let d = p.decide(i, opts()).await;
                    (p, d)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
