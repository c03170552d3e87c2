//! Decision time for an API with JWT validation (RS256, 2048-bit key, inline JWK):
//! - `cold`: a token this process has not verified yet (parse + signature verification);
//! - `warm`: the same token again (verified-token cache hit; lifetime and claims rules still run);
//! - `introspection_cache_hit`: an opaque token whose introspection answer is cached (the same rules
//!   on the answer's members), to compare with `warm`;
//! - `warm_dpop_es256`: `warm` with a DPoP-bound token (`dpop: allowed`) and a fresh ES256 proof per
//!   request (minted outside the timing): the cost of RFC 9449 is the difference with `warm`;
//! - `dpop_proof_es256`: the proof check alone (parse, `jwk`, thumbprint, claims, signature).
//!
//! `cargo bench --bench jwt`

#[path = "../tests/introspection_common/mod.rs"]
mod fake;
#[path = "../tests/jwt_common/mod.rs"]
mod keys;

use std::path::Path;
use std::time::SystemTime;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use portcullis::config;
use portcullis::identity::dpop;
use portcullis::policy::{self, CheckInput, EvalOptions, PolicySet, Runtime};

const ISS: &str = "https://idp.test/corp";

fn policy(jwk: &serde_json::Value) -> PolicySet {
    policy_with(jwk, "")
}

fn policy_with(jwk: &serde_json::Value, extra: &str) -> PolicySet {
    let yaml = format!(
        r#"
identity_providers:
  - {{ name: corp, issuer: "{ISS}", keys: [{jwk}] }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt:
      providers: [corp]
      audiences: [api://orders]
      scopes: {{ all: [orders.read] }}
      required_claims: [{{ name: roles, values: [admin], match: any }}]
      {extra}
    on_allow:
      set_headers: {{ x-user: "{{jwt.sub}}" }}
"#
    );
    let src = config::parse(&yaml, Path::new(".")).expect("config");
    policy::compile(&src, &Runtime::offline())
        .expect("compile")
        .0
}

/// The same API rules on an opaque token introspected at `fake`.
fn introspection_policy(fake: &fake::FakeIntrospection) -> (PolicySet, Runtime) {
    let yaml = format!(
        r#"
identity_providers:
  - name: corp
    issuer: "{iss}"
    introspection: {{ url: "{iss}/introspect", client_id: {id}, client_secret: "${{env:SECRET}}" }}
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt:
      providers: [corp]
      audiences: [api://orders]
      scopes: {{ all: [orders.read] }}
      required_claims: [{{ name: roles, values: [admin], match: any }}]
    on_allow:
      set_headers: {{ x-user: "{{jwt.sub}}" }}
"#,
        iss = fake.issuer,
        id = fake::CLIENT_ID,
    );
    let lookup = |_: &str| Some(fake::CLIENT_SECRET.to_string());
    let src = config::parse_with_env(&yaml, Path::new("."), &lookup).expect("config");
    let runtime = Runtime::on_demand();
    let policy = policy::compile(&src, &runtime).expect("compile").0;
    (policy, runtime)
}

fn bench(c: &mut Criterion) {
    let key = keys::rsa(0, Some("k1"));
    let mut claims = keys::claims(ISS, "api://orders", "alice");
    claims["scp"] = "orders.read".into();
    claims["roles"] = serde_json::json!(["admin"]);
    let token = key.token(claims);
    let mut headers = portcullis::policy::Headers::new();
    headers.insert(
        "authorization".to_string(),
        format!("Bearer {token}").into_bytes().into(),
    );
    let input = CheckInput {
        method: "GET",
        host: "api.example.com",
        path: "/orders/42",
        scheme: "",
        headers: &headers,
        peer: None,
        peer_certificate: "",
        context_extensions: None,
    };
    let opts = || EvalOptions {
        now: SystemTime::now(),
        explain: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    let warm = policy(&key.jwk);
    assert!(rt.block_on(warm.decide(&input, opts())).is_allow());

    let mut g = c.benchmark_group("jwt_decision");
    g.bench_function("cold_rs256_2048", |b| {
        // A fresh policy set (and so an empty token cache) per iteration; building it is not timed.
        b.to_async(&rt).iter_batched(
            || policy(&key.jwk),
            |p| async {
                let d = p.decide(&input, opts()).await;
                assert!(d.is_allow());
                (p, d)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("warm_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let d = warm.decide(&input, opts()).await;
            assert!(d.is_allow());
            d
        })
    });

    // The endpoint answers once (on its own runtime); every timed check is a cache hit.
    let io = tokio::runtime::Runtime::new().expect("runtime");
    let fake = io.block_on(fake::FakeIntrospection::start());
    fake.activate(
        "opaque-bench-token",
        serde_json::json!({"sub": "alice", "aud": "api://orders", "scope": "orders.read", "roles": ["admin"],
            "exp": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs() + 3600}),
    );
    let (introspected, _runtime) = introspection_policy(&fake);
    let mut opaque = portcullis::policy::Headers::new();
    opaque.insert(
        "authorization".to_string(),
        b"Bearer opaque-bench-token".to_vec().into(),
    );
    let opaque_input = CheckInput {
        headers: &opaque,
        ..input
    };
    assert!(
        io.block_on(introspected.decide(&opaque_input, opts()))
            .is_allow()
    );
    g.bench_function("introspection_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let d = introspected.decide(&opaque_input, opts()).await;
            assert!(d.is_allow());
            d
        })
    });
    assert_eq!(fake.requests(), 1, "every timed check was a cache hit");

    // DPoP: the same token rules, bound to the client's P-256 key.
    let client = keys::p256(None);
    let jkt = dpop::thumbprint(client.jwk.as_object().expect("jwk")).expect("thumbprint");
    let mut claims = keys::claims(ISS, "api://orders", "alice");
    claims["scp"] = "orders.read".into();
    claims["roles"] = serde_json::json!(["admin"]);
    claims["cnf"] = serde_json::json!({ "jkt": jkt });
    let bound = key.token(claims);
    let ath = keys::b64(ring::digest::digest(
        &ring::digest::SHA256,
        bound.as_bytes(),
    ));
    let jti = std::sync::atomic::AtomicU64::new(0);
    let proof = || {
        let n = jti.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        client.sign(
            serde_json::json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": client.jwk}),
            serde_json::json!({"jti": format!("bench-{n}"), "htm": "GET",
                "htu": "https://api.example.com/orders/42", "iat": keys::now(), "ath": ath}),
        )
    };
    let dpop_headers = || {
        let mut h = portcullis::policy::Headers::new();
        h.insert(
            "authorization".to_string(),
            format!("DPoP {bound}").into_bytes().into(),
        );
        h.insert("dpop".to_string(), proof().into_bytes().into());
        h
    };
    let with_dpop = policy_with(&key.jwk, "dpop: allowed");
    let first = dpop_headers();
    assert!(
        rt.block_on(with_dpop.decide(
            &CheckInput {
                headers: &first,
                ..input
            },
            opts()
        ))
        .is_allow()
    );
    g.bench_function("warm_dpop_es256", |b| {
        b.to_async(&rt).iter_batched(
            dpop_headers,
            |h| {
                let with_dpop = &with_dpop;
                async move {
                    let d = with_dpop
                        .decide(
                            &CheckInput {
                                headers: &h,
                                ..input
                            },
                            opts(),
                        )
                        .await;
                    assert!(d.is_allow());
                    d
                }
            },
            BatchSize::SmallInput,
        )
    });
    let expected = dpop::Expected {
        method: "GET",
        scheme: "https",
        host: "api.example.com",
        path: "/orders/42",
        token: &bound,
    };
    let one = proof();
    let rules = dpop::DpopPolicy::default();
    g.bench_function("dpop_proof_es256", |b| {
        b.iter(|| {
            dpop::check_proof(
                &one,
                &expected,
                &rules,
                std::time::Duration::ZERO,
                SystemTime::now(),
            )
            .expect("valid proof")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
