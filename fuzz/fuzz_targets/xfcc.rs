//! `x-forwarded-client-cert` headers as a caller (and the proxies after it) could write them.
//! Invariants: never panics; a header with an odd number of unescaped quotes (the shape of the
//! comma-swallowing smuggle) is never accepted; whatever parses writes back to text that parses to
//! the same elements, with the same nearest element.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::{cert, xfcc};

/// Quotes not escaped by an odd run of backslashes.
fn unescaped_quotes(s: &[u8]) -> usize {
    let (mut run, mut n) = (0usize, 0usize);
    for &c in s {
        match c {
            b'\\' => run += 1,
            b'"' => {
                n += usize::from(run.is_multiple_of(2));
                run = 0;
            }
            _ => run = 0,
        }
    }
    n
}

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = xfcc::parse(data) else {
        return;
    };
    assert!(
        unescaped_quotes(data).is_multiple_of(2),
        "odd quotes accepted"
    );
    let text = parsed.to_string();
    let again = xfcc::parse(text.as_bytes()).expect("a written header parses");
    assert_eq!(again, parsed, "round trip changed the header");
    if let Some(encoded) = &parsed.nearest.cert {
        let _ = cert::parse_url_encoded_pem(encoded, 64 * 1024);
    }
});
