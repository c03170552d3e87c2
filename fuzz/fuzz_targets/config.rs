//! The config loader and compiler on any text: every error is reported, nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::policy::{Runtime, compile};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let env = |_: &str| None;
    if let Ok(src) = portcullis::config::parse_with_env(s, std::path::Path::new("/nonexistent"), &env) {
        let _ = compile(&src, &Runtime::offline());
    }
});
