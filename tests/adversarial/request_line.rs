//! Path escapes, host variants, methods and query-parameter names: the request line read one
//! canonical way, and anything two readers could disagree on refused.
//!
//! Two kinds of proof: hand-written tables (each row failed on the code before the canonicaliser;
//! see the comments), and a generated corpus checked against models of how real backends read a
//! path (decode once or twice, `\` as `/`, Tomcat's `;` parameters, Unicode folding): whatever any
//! model reads, an allow by `public` must stay under `/public` and an allow by the catch-all must
//! never reach `/admin`.

use crate::support::{KEY, compile, decide, layered, request, verdict};

const NOT_CANONICAL: &str = "deny 400 RequestPathNotCanonical";
const BAD_HOST: &str = "deny 400 RequestHostNotCanonical";
const NO_KEY: &str = "deny 401 SubscriptionKeyNotFound";

async fn path_verdict(policy: &portcullis::policy::PolicySet, target: &str) -> String {
    verdict(&decide(policy, &request("GET", "api.example.com", target, &[])).await)
}

#[tokio::test]
async fn path_escapes_are_refused_or_read_as_the_backend_reads_them() {
    let p = compile(&layered(""));
    // (target, what the user sees). Every NOT_CANONICAL row was `allow public` or
    // `allow catch-all` before: matched as ordinary characters, read by a backend as a separator.
    let cases = [
        ("/public/x", "allow public"),
        ("/admin/x", NO_KEY),
        ("/public/..%2Fadmin/secret", NOT_CANONICAL),
        ("/public/..%2fadmin/secret", NOT_CANONICAL),
        ("/public%2F..%2Fadmin/secret", NOT_CANONICAL),
        ("/public/..%5Cadmin/secret", NOT_CANONICAL),
        ("/public/..\\admin/secret", NOT_CANONICAL),
        ("/public/%2e%2e/admin/secret", NOT_CANONICAL),
        ("/public/%2E./admin/secret", NOT_CANONICAL),
        ("/public/../admin/secret", NOT_CANONICAL),
        ("/public/./x", NOT_CANONICAL),
        ("/public/..;/admin/secret", NOT_CANONICAL),
        ("/admin;x/secret", NOT_CANONICAL),
        ("/admin%3Bx/secret", NOT_CANONICAL),
        ("/public/%252e%252e/admin/secret", NOT_CANONICAL),
        ("/public/..%252Fadmin/secret", NOT_CANONICAL),
        ("/public/%C0%AE%C0%AE/admin/secret", NOT_CANONICAL),
        ("/public/%ff/x", NOT_CANONICAL),
        ("/%EF%BD%81dmin/secret", NOT_CANONICAL), // full-width `ａ`: NFKC folds it to `a`
        ("/admin%EF%BC%8Fsecret", NOT_CANONICAL), // full-width solidus
        ("/a%CC%8Admin/x", NOT_CANONICAL),        // a combining ring: not NFC
        ("//admin/secret", NOT_CANONICAL),
        ("/public//x", NOT_CANONICAL),
        ("/public/x%00/../../admin", NOT_CANONICAL),
        ("/public/x%0a", NOT_CANONICAL),
        ("/public/x#frag", NOT_CANONICAL),
        ("/public/caf\u{e9}", NOT_CANONICAL), // raw UTF-8: not a valid request target
        ("public/x", NOT_CANONICAL),
        ("*", NOT_CANONICAL),
        // Encodings a backend decodes are decoded here too, so they select the API they name.
        ("/%61dmin/secret", NO_KEY),
        ("/%41dmin/secret", "allow catch-all"), // `Admin`: paths are case-sensitive
        ("/publ%69c/x", "allow public"),
        ("/public/caf%C3%A9", "allow public"),
        ("/public/a%20b", "allow public"),
        ("/public/", "allow public"),
        ("/publicity", "allow catch-all"),
    ];
    let mut wrong = Vec::new();
    for (target, want) in cases {
        let got = path_verdict(&p, target).await;
        if got != want {
            wrong.push(format!("{target:?}: got `{got}`, want `{want}`"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn escaped_slashes_keep_is_an_explicit_choice() {
    let p = compile(&layered("request: { escaped_slashes: keep }"));
    // `%2F` is data inside a segment: `/public/a%2Fb` stays under /public for a backend that does
    // not decode it, which is what `keep` promises.
    assert_eq!(path_verdict(&p, "/public/a%2Fb").await, "allow public");
    // Everything else is refused as before.
    assert_eq!(path_verdict(&p, "/public/../admin").await, NOT_CANONICAL);
    assert_eq!(path_verdict(&p, "/public/a%252Fb").await, NOT_CANONICAL);
    assert_eq!(path_verdict(&p, "/public/a%5Cb").await, NOT_CANONICAL);
}

#[tokio::test]
async fn host_variants_cannot_escape_a_host_bound_api() {
    let p = compile(&layered(""));
    // Every BAD_HOST and every `admin-host` row was `allow catch-all` before.
    let cases = [
        ("admin.example.com", NO_KEY),
        ("ADMIN.Example.COM", NO_KEY),
        ("admin.example.com:443", NO_KEY),
        ("admin.example.com.", NO_KEY),
        ("admin.example.com.:443", NO_KEY),
        (" admin.example.com", BAD_HOST),
        ("\tadmin.example.com", BAD_HOST),
        ("admin.example.com ", BAD_HOST),
        ("x@admin.example.com", BAD_HOST),
        ("admin.example.com:", BAD_HOST),
        ("admin.example.com:99999", BAD_HOST),
        ("admin.example.com..", BAD_HOST),
        ("admin%2Eexample.com", BAD_HOST),
        ("\u{ff41}dmin.example.com", BAD_HOST),
        ("admin.example.com/x", BAD_HOST),
        ("admin.example.com\\x", BAD_HOST),
        ("0x7f.0.0.1", BAD_HOST),
        ("api.example.com", "allow catch-all"),
    ];
    let mut wrong = Vec::new();
    for (host, want) in cases {
        let got = verdict(&decide(&p, &request("GET", host, "/x", &[])).await);
        if got != want {
            wrong.push(format!("{host:?}: got `{got}`, want `{want}`"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn methods_are_tokens_compared_without_case() {
    let yaml = format!(
        r#"
subscriptions:
  keys: [{{ id: demo, primary: "{}" }}]
apis:
  - name: writes
    match: {{ path_prefix: /orders, methods: [POST] }}
    subscription_required: true
  - name: reads
    match: {{ path_prefix: /orders }}
"#,
        crate::support::KEY_HASH
    );
    let p = compile(&yaml);
    let m = |method: &'static str| {
        let p = &p;
        async move { verdict(&decide(p, &request(method, "api.example.com", "/orders", &[])).await) }
    };
    assert_eq!(m("POST").await, NO_KEY);
    // A backend that reads `post` as POST must not see it pass as a read.
    assert_eq!(m("post").await, NO_KEY);
    assert_eq!(m("GET").await, "allow");
    assert_eq!(m("PO ST").await, "deny 400 InvalidRequest");
    assert_eq!(m("POST\r").await, "deny 400 InvalidRequest");
}

#[tokio::test]
async fn a_key_name_that_only_matches_after_decoding_is_not_a_key() {
    let p = compile(&layered(""));
    let at = |target: String| {
        let p = &p;
        async move { decide(p, &request("GET", "api.example.com", &target, &[])).await }
    };
    // Before: accepted as the key, but removal named `subscription-key`, so the key went upstream.
    let s = at(format!("/admin/x?subscription%2Dkey={KEY}")).await;
    assert_eq!(verdict(&s), NO_KEY);
    let s = at(format!("/admin/x?Subscription-Key={KEY}")).await;
    assert_eq!(verdict(&s), NO_KEY);
    // The literal name is the key, and it is removed by the name it was found under.
    let s = at(format!("/admin/x?a=1&subscription-key={KEY}")).await;
    assert_eq!(verdict(&s), "allow admin");
    assert_eq!(s.removed_query, vec!["subscription-key".to_string()]);
    // Twice is ambiguous: a backend may read the other one.
    let s = at(format!(
        "/admin/x?subscription-key={KEY}&subscription-key=other"
    ))
    .await;
    assert_eq!(verdict(&s), "deny 401 SubscriptionKeyInvalid");
    // A query must be visible ASCII, and a target has no fragment.
    let s = at(format!("/admin/x?subscription-key={KEY}&x=\u{e9}")).await;
    assert_eq!(verdict(&s), NOT_CANONICAL);
}

/// Ways a backend may read a path. Each returns the resolved path, or None when that reader would
/// refuse the request.
fn readings(raw: &str) -> Vec<String> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let once = percent_decode(path);
    let twice = once.as_deref().and_then(percent_decode);
    let mut out = vec![resolve(path)];
    if let Some(once) = &once {
        out.push(resolve(once));
        out.push(resolve(&once.replace('\\', "/")));
        out.push(resolve(&strip_path_parameters(once)));
        out.push(resolve(&nfkc(once)));
    }
    if let Some(twice) = &twice {
        out.push(resolve(twice));
        out.push(resolve(&twice.replace('\\', "/")));
    }
    // Overlong UTF-8 (`%C0%AE` as `.`), as some old decoders read it.
    out.push(resolve(&path.replace("%C0%AE", ".").replace("%c0%ae", ".")));
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(s).collect();
    String::from_utf8(bytes).ok()
}

/// Tomcat/Spring: `;params` are cut from each segment.
fn strip_path_parameters(s: &str) -> String {
    s.split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/")
}

fn nfkc(s: &str) -> String {
    icu_normalizer::ComposingNormalizerBorrowed::new_nfkc()
        .normalize(s)
        .into_owned()
}

/// Merges slashes and removes dot segments (RFC 3986 5.2.4), as nginx and most routers do.
fn resolve(s: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in s.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            seg => out.push(seg),
        }
    }
    format!("/{}", out.join("/"))
}

fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// Every request target built from a few segments and the joiners and escapes that readers
/// disagree on: 4,000+ targets.
fn corpus() -> Vec<String> {
    let segs = [
        "public", "admin", "secret", ".", "..", "", "%2e%2e", "%2E", "ａdmin",
    ];
    let joins = [
        "/",
        "%2F",
        "%2f",
        "%252F",
        "\\",
        "%5C",
        ";",
        "%3B",
        "/..;/",
        "%C0%AE%C0%AE/",
        "%00",
        "%EF%BC%8F",
    ];
    let mut out = Vec::new();
    for a in segs {
        for j in joins {
            for b in segs {
                out.push(format!("/{a}{j}{b}"));
                out.push(format!("/public/{a}{j}{b}/secret"));
                for k in ["/", "%2F", "\\"] {
                    out.push(format!("/{a}{j}{b}{k}secret"));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn generated_paths_never_reach_admin_through_an_open_api() {
    let p = compile(&layered(""));
    let corpus = corpus();
    assert!(corpus.len() > 4000);
    let mut violations = Vec::new();
    let mut allowed = 0;
    for target in &corpus {
        let v = path_verdict(&p, target).await;
        let Some(api) = v.strip_prefix("allow ") else {
            continue;
        };
        allowed += 1;
        for reading in readings(target) {
            let ok = match api {
                "public" => under(&reading, "/public"),
                "catch-all" => !under(&reading, "/admin"),
                _ => true,
            };
            if !ok {
                violations.push(format!("{target:?} allowed by {api}, read as {reading:?}"));
            }
        }
    }
    // The corpus is not all refused: plain spellings of public paths still pass.
    assert!(allowed >= 20, "only {allowed} allowed");
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn check_shows_the_canonical_reading() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.yaml");
    std::fs::write(&config, layered("")).unwrap();
    let run = |url: &str, host: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.arg("check")
            .arg("--config")
            .arg(&config)
            .arg("--url")
            .arg(url);
        if let Some(h) = host {
            cmd.arg("-H").arg(format!("host: {h}"));
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run("http://api.example.com/public/..%2Fadmin/secret", None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("RequestPathNotCanonical"), "{out}");
    let (code, out) = run("http://ADMIN.example.com.:443/%61dmin/x", None);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("SubscriptionKeyNotFound"), "{out}");
    assert!(out.contains("admin.example.com/admin/x"), "{out}");
}

/// ext_authz's `headers` is a protobuf map, so the wire can carry a name twice; a map decoder keeps
/// the last entry without a word, while a backend behind a proxy that joined or chose differently
/// may read the first. A name with upper-case letters is another header to every HTTP reader but
/// not to a lookup by lower-case name. Both are refused, whatever the entries say.
#[tokio::test]
async fn a_header_list_no_proxy_sends_is_refused() {
    use portcullis::policy::RequestHeader;
    use prost::Message as _;
    let p = compile(&layered(""));
    let with = |extra: Vec<RequestHeader>| {
        let mut req = request("GET", "api.example.com", "/admin/x", &[]);
        let http = req
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.headers.extend(extra);
        // Through the wire format, as the gRPC listener receives it.
        portcullis::proto::auth::CheckRequest::decode(&req.encode_to_vec()[..]).unwrap()
    };
    let key = |v: &str| RequestHeader::new("ocp-apim-subscription-key", v.to_string());
    // One key: allowed, so the refusals below are about the list alone.
    let s = decide(&p, &with(vec![key(KEY)])).await;
    assert_eq!(verdict(&s), "allow admin");
    // Before: the last entry won, so this was an allow while a first-wins reader saw `bogus`.
    for twice in [
        vec![key("bogus"), key(KEY)],
        vec![key(KEY), key("bogus")],
        vec![key(KEY), key(KEY)],
    ] {
        let s = decide(&p, &with(twice)).await;
        assert_eq!(verdict(&s), "deny 400 InvalidRequest");
        let message = s.body.as_ref().unwrap()["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(message, "Bad request: a request header name is repeated.");
        assert!(!message.contains(KEY) && !message.contains("bogus"));
    }
    // Before: a 401 (no lower-case key header); now refused as ambiguous.
    for name in [
        "Ocp-Apim-Subscription-Key",
        "OCP-APIM-SUBSCRIPTION-KEY",
        "ocp-apim-subscription-key ",
    ] {
        let s = decide(&p, &with(vec![key(KEY), RequestHeader::new(name, KEY)])).await;
        assert_eq!(verdict(&s), "deny 400 InvalidRequest", "{name:?}");
        let s = decide(&p, &with(vec![RequestHeader::new(name, KEY)])).await;
        assert_eq!(verdict(&s), "deny 400 InvalidRequest", "{name:?}");
    }
    // A name that is not UTF-8 decodes now (it was a failed decode of the whole request) and is
    // refused with a clear answer.
    let s = decide(
        &p,
        &with(vec![key(KEY), RequestHeader::new(&b"x-\xff"[..], "v")]),
    )
    .await;
    assert_eq!(verdict(&s), "deny 400 InvalidRequest");
}
