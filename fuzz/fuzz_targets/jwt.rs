//! Token parsing (JOSE compact serialisation, strict JSON) and JWKS parsing never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::{jose, jwk};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = jose::parse(s);
    }
    let _ = jose::strict_object(data);
    let _ = jwk::parse_jwks(data);
});
