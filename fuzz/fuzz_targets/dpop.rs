//! DPoP proof checking (RFC 9449) never panics: the whole proof path (size cap, JOSE parsing, `typ`,
//! `alg`, `jwk`, thumbprint, `htm`/`htu`/`iat`/`ath`, signature) on arbitrary bytes, the first
//! line of the input taken as the request's path so `htu` parsing sees both sides.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use portcullis::identity::{dpop, jose};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (path, proof) = s.split_once('\n').unwrap_or(("/orders/1", s));
    let expected = dpop::Expected {
        method: "GET",
        scheme: "https",
        host: "api.example.com",
        path,
        token: "eyJhbGciOiJFUzI1NiJ9.e30.c2ln",
    };
    let _ = dpop::check_proof(
        proof,
        &expected,
        &dpop::DpopPolicy::default(),
        Duration::from_secs(30),
        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    );
    if let Ok(jwk) = jose::strict_object(data) {
        let _ = dpop::thumbprint(&jwk);
    }
});
