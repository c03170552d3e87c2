//! The request-line canonicaliser. Invariants: never panics; a canonical path is accepted again
//! unchanged (idempotent), starts with `/`, has no dot or empty segments and only visible ASCII;
//! a canonical host is idempotent too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::canonical::{self, EscapedSlashes, RequestRules};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for escaped_slashes in [EscapedSlashes::Reject, EscapedSlashes::Keep] {
        let rules = RequestRules { escaped_slashes };
        if let Ok(p) = canonical::path(s, rules) {
            assert!(p.starts_with('/'));
            assert!(p.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            let body = p[1..].strip_suffix('/').unwrap_or(&p[1..]);
            assert!(body.is_empty() || body.split('/').all(|seg| !matches!(seg, "" | "." | "..")));
            assert_eq!(canonical::path(&p, rules).as_deref(), Ok(&*p));
        }
    }
    if let Ok(h) = canonical::host(s) {
        assert_eq!(canonical::host(&h).as_deref(), Ok(&*h));
    }
    let _ = canonical::method(s);
});
