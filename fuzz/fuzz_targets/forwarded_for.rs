//! x-forwarded-for and ip_filter entries.
//! Invariant: with enough trusted hops missing, only the peer is used; never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::ip::{self, ClientIpSource};

fuzz_target!(|data: &[u8]| {
    let peer = Some("192.0.2.1".parse().expect("literal"));
    for hops in 0..3 {
        let _ = ip::client_ip(ClientIpSource::ForwardedFor { trusted_hops: hops }, peer, Some(data));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok((lo, hi)) = ip::parse_entry(s) {
            assert!(lo <= hi);
        }
    }
});
