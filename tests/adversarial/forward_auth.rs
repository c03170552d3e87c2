//! Forward-auth reads the original request from headers the proxy sets. Such a header is
//! authoritative when present: unreadable, empty or repeated is a 400, never a fall-back to another
//! header a client could have written, and which headers are read is `forward_auth.source`.

use axum::http::{HeaderValue, Request};
use portcullis::policy::{Outcome, PolicySet};
use portcullis::server::http::decide_forward_auth;

use crate::support::{KEY, compile, layered};

/// `path` is what portcullis receives (`/authz/...`); headers as raw bytes.
async fn verdict(policy: &PolicySet, path: &str, headers: &[(&str, &[u8])]) -> String {
    let mut b = Request::builder().method("GET").uri(path);
    for (k, v) in headers {
        b = b.header(*k, HeaderValue::from_bytes(v).unwrap());
    }
    let (parts, ()) = b.body(()).unwrap().into_parts();
    let d = decide_forward_auth(policy, &parts, "10.0.0.1".parse().unwrap()).await;
    match &d.outcome {
        Outcome::Allow => format!("allow {}", d.api.as_deref().unwrap_or("-")),
        Outcome::Deny(denial) => format!("deny {} {}", denial.status, denial.reason),
    }
}

/// (what portcullis receives, its headers, what the user sees).
type Case = (
    &'static str,
    Vec<(&'static str, &'static [u8])>,
    &'static str,
);

const FWD_OK: [(&str, &[u8]); 2] = [
    ("x-forwarded-method", b"GET"),
    ("x-forwarded-host", b"api.example.com"),
];

#[tokio::test]
async fn forwarded_headers_are_authoritative_and_never_fall_back() {
    let p = compile(&layered(""));
    let key: (&str, &[u8]) = ("ocp-apim-subscription-key", KEY.as_bytes());
    let cases: Vec<Case> = vec![
        // The request the issue found: decided as `/public/x` (X-Original-URI) and allowed before.
        (
            "/authz/admin/x",
            vec![
                FWD_OK[0],
                ("x-forwarded-host", b"admin.example.com"),
                ("x-forwarded-uri", b"/x\xff"),
                ("x-original-uri", b"/public/x"),
            ],
            "deny 400 RequestPathNotCanonical",
        ),
        // Raw UTF-8, as nginx forwards `$request_uri`.
        (
            "/authz/admin/x",
            vec![
                FWD_OK[0],
                FWD_OK[1],
                ("x-forwarded-uri", "/public/caf\u{e9}".as_bytes()),
            ],
            "deny 400 RequestPathNotCanonical",
        ),
        (
            "/authz/admin/x",
            vec![FWD_OK[0], FWD_OK[1], ("x-forwarded-uri", b"")],
            "deny 400 RequestPathNotCanonical",
        ),
        (
            "/authz/admin/x",
            vec![
                FWD_OK[0],
                FWD_OK[1],
                ("x-forwarded-uri", b"/public/x"),
                ("x-forwarded-uri", b"/admin/x"),
            ],
            "deny 400 RequestPathNotCanonical",
        ),
        // One of the three present means all three are needed: no guessing the rest from Host.
        (
            "/authz/admin/x",
            vec![("x-forwarded-uri", b"/public/x")],
            "deny 400 InvalidRequest",
        ),
        (
            "/authz/admin/x",
            vec![
                ("x-forwarded-method", b"GET"),
                ("x-forwarded-uri", b"/public/x"),
            ],
            "deny 400 InvalidRequest",
        ),
        (
            "/authz/admin/x",
            vec![
                ("x-forwarded-method", b""),
                FWD_OK[1],
                ("x-forwarded-uri", b"/public/x"),
            ],
            "deny 400 InvalidRequest",
        ),
        (
            "/authz/x",
            vec![
                FWD_OK[0],
                ("x-forwarded-host", b"admin.example.com."),
                ("x-forwarded-uri", b"/x"),
            ],
            "deny 401 SubscriptionKeyNotFound",
        ),
        (
            "/authz/x",
            vec![
                FWD_OK[0],
                ("x-forwarded-host", b" admin.example.com"),
                ("x-forwarded-uri", b"/x"),
            ],
            "deny 400 RequestHostNotCanonical",
        ),
        // X-Original-* are no longer read at all.
        (
            "/authz/admin/x",
            vec![
                ("x-original-uri", b"/public/x"),
                ("host", b"api.example.com"),
            ],
            "deny 401 SubscriptionKeyNotFound",
        ),
        // The forwarded URI goes through the same canonicaliser as a gRPC check.
        (
            "/authz/",
            vec![
                FWD_OK[0],
                FWD_OK[1],
                ("x-forwarded-uri", b"/public/..%2Fadmin/x"),
            ],
            "deny 400 RequestPathNotCanonical",
        ),
        (
            "/authz/",
            vec![FWD_OK[0], FWD_OK[1], ("x-forwarded-uri", b"/admin/x"), key],
            "allow admin",
        ),
        // Envoy http_service: the request itself.
        (
            "/authz/admin/x",
            vec![("host", b"api.example.com"), key],
            "allow admin",
        ),
        // ... where X-Forwarded-Proto is not read (Envoy sets it on every request it forwards).
        (
            "/authz/admin/x",
            vec![
                ("host", b"api.example.com"),
                ("x-forwarded-proto", b"https, http"),
                key,
            ],
            "allow admin",
        ),
        (
            "/authz/public/..%2Fadmin/x",
            vec![("host", b"api.example.com")],
            "deny 400 RequestPathNotCanonical",
        ),
        (
            "/authz/x",
            vec![("host", b"x@admin.example.com")],
            "deny 400 RequestHostNotCanonical",
        ),
    ];
    // X-Forwarded-Proto (DPoP's `htu` scheme): one `http` or `https`, or absent; never guessed.
    let protos: [(&[&[u8]], &str); 4] = [
        (&[b"HTTPS"], "allow admin"),
        (&[b"https, http"], "deny 400 InvalidRequest"),
        (&[b"https", b"https"], "deny 400 InvalidRequest"),
        (&[b"wss"], "deny 400 InvalidRequest"),
    ];
    let mut cases = cases;
    for (values, want) in protos {
        let mut headers = vec![FWD_OK[0], FWD_OK[1], ("x-forwarded-uri", b"/admin/x")];
        headers.extend(values.iter().map(|v| ("x-forwarded-proto", *v)));
        headers.push(key);
        cases.push(("/authz/", headers, want));
    }
    let mut wrong = Vec::new();
    for (path, headers, want) in &cases {
        let got = verdict(&p, path, headers).await;
        if got != *want {
            wrong.push(format!("{path} {headers:?}: got `{got}`, want `{want}`"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn the_source_is_explicit_in_config() {
    let spoof: [(&str, &[u8]); 4] = [
        ("host", b"api.example.com"),
        ("x-forwarded-method", b"GET"),
        ("x-forwarded-host", b"api.example.com"),
        ("x-forwarded-uri", b"/public/x"),
    ];
    // `request` (Envoy http_service): X-Forwarded-* never describe the request, whoever sent them.
    let p = compile(&layered("forward_auth: { source: request }"));
    assert_eq!(
        verdict(&p, "/authz/admin/x", &spoof).await,
        "deny 401 SubscriptionKeyNotFound"
    );
    // `forwarded_headers` (nginx, Traefik): the headers are required.
    let p = compile(&layered("forward_auth: { source: forwarded_headers }"));
    assert_eq!(
        verdict(&p, "/authz/public/x", &[("host", b"api.example.com")]).await,
        "deny 400 InvalidRequest"
    );
    assert_eq!(verdict(&p, "/authz/admin/x", &spoof).await, "allow public");
}
