//! Subscriptions kept apart from the policy (issue 19), attacked: a keys file with look-alike
//! characters, hidden whitespace, control bytes or a line of megabytes; presented keys that only
//! look like a valid one; the admin API without its token or with the token somewhere else; and
//! ids that try to leave their path segment or the JSON they are shown in. Each is refused (the
//! keys file: with its line, the last good keys serving on), never an allow, never a key echoed.

use std::path::Path;

use portcullis::policy::subscription::{format_hash, hash_key};
use serde_json::{Value, json};

use crate::common::{TestServer, get, seen};

const TOKEN: &str = "adv-admin-token-0f1e2d3c";
const GOOD: &str = "good-key-with-ascii-only";

fn h(k: &str) -> String {
    format_hash(&hash_key(k))
}

async fn code(srv: &TestServer, key: &[u8]) -> i32 {
    let mut client = srv.client().await;
    let mut req = get("/orders/1").request();
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.headers.push(portcullis::policy::RequestHeader::new(
            "ocp-apim-subscription-key",
            key.to_vec(),
        ));
    }
    seen(&client.check(req).await.unwrap().into_inner()).code
}

async fn server(dir: &Path, keys_text: &[u8]) -> TestServer {
    let keys = dir.join("keys.txt");
    std::fs::write(&keys, keys_text).unwrap();
    let store_key = dir.join("store.key");
    std::fs::write(&store_key, crate::redis_common::KEY_A).unwrap();
    TestServer::start(&format!(
        "admin: {{token: \"{TOKEN}\"}}\nstore: {{path: \"{}\", key: \"${{file:{}}}\"}}\nsubscriptions: {{keys_file: \"{}\"}}\napis: [{{name: orders, match: {{path_prefix: /orders}}, subscription_required: true}}]\n",
        dir.join("store.redb").display(),
        store_key.display(),
        keys.display()
    ))
    .await
}

/// A hostile line, and what the error for it must say.
struct Line {
    name: &'static str,
    text: Vec<u8>,
    error: &'static str,
}

fn hostile_lines() -> Vec<Line> {
    let hash = h("hostile");
    let hex = &hash["sha256:".len()..];
    vec![
        Line {
            name: "Cyrillic s in the hash prefix",
            text: format!("x active all \u{0455}ha256:{hex}").into_bytes(),
            error: "not printable ASCII",
        },
        Line {
            name: "no-break space between fields",
            text: format!("x\u{a0}active all {hash}").into_bytes(),
            error: "not printable ASCII",
        },
        Line {
            name: "zero-width space inside the id",
            text: format!("x\u{200b}y active all {hash}").into_bytes(),
            error: "not printable ASCII",
        },
        Line {
            name: "full-width digits in the hash",
            text: format!("x active all sha256:\u{ff11}{}", &hex[1..]).into_bytes(),
            error: "not printable ASCII",
        },
        Line {
            name: "NUL byte",
            text: format!("x active all {hash}\0").into_bytes(),
            error: "not printable ASCII",
        },
        Line {
            name: "a bare CR hiding a second record",
            text: format!("x active all {hash}\rz active all {}", h("z")).into_bytes(),
            error: "not printable ASCII",
        },
        Line {
            name: "invalid UTF-8",
            text: b"x active all sha256:\xff\xfe".to_vec(),
            error: "not printable ASCII",
        },
        Line {
            name: "a plain key where the hash goes",
            text: b"x active all hunter2-plain-secret".to_vec(),
            error: "plain keys are never written",
        },
        Line {
            name: "a hash one digit short",
            text: format!("x active all {}", &hash[..hash.len() - 1]).into_bytes(),
            error: "64 hex digits",
        },
        Line {
            name: "a line of a mebibyte",
            text: format!("x active all {hash} {}", "f".repeat(1 << 20)).into_bytes(),
            error: "longer than 1024 bytes",
        },
        Line {
            name: "an id that is a path",
            text: format!("../../admin active all {hash}").into_bytes(),
            error: "the id must be",
        },
    ]
}

#[tokio::test]
async fn hostile_keys_file_lines_are_refused_with_their_line_and_the_last_good_keys_serve() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!("good active all {}\n", h(GOOD));
    let srv = server(dir.path(), good.as_bytes()).await;
    let keys = dir.path().join("keys.txt");
    assert_eq!(code(&srv, GOOD.as_bytes()).await, 0);
    for line in hostile_lines() {
        let mut text = good.clone().into_bytes();
        text.extend_from_slice(&line.text);
        text.push(b'\n');
        std::fs::write(&keys, &text).unwrap();
        let errs = srv.running.reload_keys().await.unwrap_err().to_string();
        let want = format!("{}:2: ", keys.display());
        assert!(
            errs.starts_with(&want) && errs.contains(line.error),
            "{}: {errs}",
            line.name
        );
        assert_eq!(errs.lines().count(), 1, "{}: {errs}", line.name);
        assert!(!errs.contains("hunter2"), "{}: {errs}", line.name);
        assert!(
            errs.len() < 400,
            "{}: the error repeats the line",
            line.name
        );
        assert_eq!(code(&srv, GOOD.as_bytes()).await, 0, "{}", line.name);
        assert_eq!(code(&srv, b"hostile").await, 16, "{}", line.name);
    }
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_that_only_look_like_a_valid_one_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(
        dir.path(),
        format!("good active all {}\n", h(GOOD)).as_bytes(),
    )
    .await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("leading space", format!(" {GOOD}").into_bytes()),
        ("trailing tab", format!("{GOOD}\t").into_bytes()),
        ("upper case", GOOD.to_uppercase().into_bytes()),
        ("Cyrillic a", GOOD.replacen('a', "\u{430}", 1).into_bytes()),
        ("zero-width joiner", format!("{GOOD}\u{200d}").into_bytes()),
        ("its own hash", h(GOOD).into_bytes()),
        ("the hash's hex", h(GOOD).as_bytes()[7..].to_vec()),
        ("NUL suffix", format!("{GOOD}\0").into_bytes()),
    ];
    assert_eq!(code(&srv, GOOD.as_bytes()).await, 0);
    for (name, key) in cases {
        assert_eq!(code(&srv, &key).await, 16, "{name}");
    }
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_admin_api_refuses_every_subscription_call_without_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), b"").await;
    let base = format!(
        "http://{}/admin/subscriptions",
        srv.running.addrs.http.unwrap()
    );
    let http = reqwest::Client::new();
    let auths: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        ("Basic", Some(format!("Basic {TOKEN}"))),
        ("no scheme", Some(TOKEN.to_string())),
        ("token with a suffix", Some(format!("Bearer {TOKEN}x"))),
        ("token prefix", Some(format!("Bearer {}", &TOKEN[..10]))),
        (
            "upper-cased token",
            Some(format!("Bearer {}", TOKEN.to_uppercase())),
        ),
        ("its digest", Some(format!("Bearer {}", h(TOKEN)))),
    ];
    for (name, auth) in &auths {
        for (m, url) in [
            ("POST", base.clone()),
            ("GET", base.clone()),
            ("GET", format!("{base}?access_token={TOKEN}")),
            ("POST", format!("{base}/x/regenerate/primary?token={TOKEN}")),
            ("DELETE", format!("{base}/x")),
        ] {
            let mut req = http
                .request(m.parse().unwrap(), &url)
                .json(&json!({"id": "intruder"}));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 401, "{name}: {m} {url}");
        }
    }
    // Nothing was made.
    let list: Value = http
        .get(&base)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["runtime"], 0, "{list}");
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn ids_that_try_to_leave_their_path_segment_or_json_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), b"").await;
    let base = format!(
        "http://{}/admin/subscriptions",
        srv.running.addrs.http.unwrap()
    );
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(&base)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let ok = post(br#"{"id": "victim"}"#.to_vec()).await.unwrap();
    assert_eq!(ok.status(), 201);
    for id in [
        "../credentials",
        "a/b",
        "a%2Fb",
        "victim\n",
        "victim\r\nx-injected: 1",
        "\"quoted\"",
        "<script>",
        "victim ",
        "vict\u{131}m",
        "",
        &"a".repeat(129),
    ] {
        let body = serde_json::to_vec(&json!({"id": id})).unwrap();
        let resp = post(body).await.unwrap();
        assert_eq!(resp.status(), 400, "{id:?}");
    }
    // Two ids in one body: refused, not the last one taken.
    let resp = post(br#"{"id": "a", "id": "victim"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // A body of megabytes is refused before it is parsed.
    let big = format!(r#"{{"id": "big", "scope": "{}"}}"#, "a".repeat(4 << 20));
    let resp = post(big.into_bytes()).await.unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());

    // Paths that decode to another id, another route or nothing: never `victim` changed.
    for path in [
        "/victim%2Fsuspend",
        "/..%2Fvictim/suspend",
        "/%2e%2e/victim/suspend",
        "/victim%00/suspend",
        "/victim%0d%0a/suspend",
        "/VICTIM/suspend",
        "/victim%20/suspend",
    ] {
        let resp = http
            .post(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        // 404 (no such subscription) or 405 (`victim/suspend` read as one id, which only GET
        // and DELETE take): never a change.
        assert!(
            [404, 405].contains(&resp.status().as_u16()),
            "{path}: {}",
            resp.status()
        );
    }
    let victim: Value = http
        .get(format!("{base}/victim"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(victim["state"], "active", "{victim}");
    srv.running.shutdown().await.unwrap();
}
