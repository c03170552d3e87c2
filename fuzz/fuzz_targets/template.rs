//! Header templates: parse any text, render with claims from any JSON.
//! Invariant: a rendered value never contains a control character.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::check::template::{Context, Template};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (tpl, claims) = s.split_once('\n').unwrap_or((s, "{}"));
    let Ok(t) = Template::parse(tpl) else { return };
    let claims: Option<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(claims).ok();
    let ctx = Context { claims: claims.as_ref(), subscription_id: Some("sub"), api: "api", ..Default::default() };
    if let Ok(v) = t.render(&ctx) {
        assert!(!v.chars().any(char::is_control), "control character in a header value");
    }
});
