//! Client certificates as Envoy and proxies send them: URL-encoded PEM, PEM, DER, XFCC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::{cert, xfcc};

fuzz_target!(|data: &[u8]| {
    let _ = cert::from_der(data);
    let _ = cert::parse_pem(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = cert::parse_url_encoded_pem(s, 64 * 1024);
        let _ = cert::Dn::parse(s);
        let _ = cert::normalize_serial(s);
    }
    if let Ok(Some(encoded)) = xfcc::parse(data).map(|h| h.nearest.cert) {
        let _ = cert::parse_url_encoded_pem(&encoded, 64 * 1024);
    }
});
