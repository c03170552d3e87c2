use super::*;

fn errors(text: &str) -> Vec<String> {
    match parse(text, Path::new(".")) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn empty_file_loads() {
    assert!(parse("", Path::new(".")).is_ok());
}

#[test]
fn every_unknown_key_is_reported_with_its_path() {
    let errs = errors(
        "listen: {grpc: 127.0.0.1:1, grcp: x}\napis:\n  - name: a\n    subscription_requried: true\n  - name: b\n    match: {path_prefx: /x}\nbogus: 1\n",
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs.iter()
            .any(|e| e.starts_with("listen.grcp: unknown field `grcp`")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("apis[0].subscription_requried: unknown field")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("apis[1].match.path_prefx: unknown field")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.starts_with("bogus: unknown field")),
        "{errs:#?}"
    );
}

#[test]
fn wrong_types_are_reported_with_paths() {
    let errs = errors(
        "client_ip: {trusted_hops: many}\napis: [{name: a, subscription_required: maybe}]\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("client_ip.trusted_hops: invalid type"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("apis[0].subscription_required: invalid type"),
        "{errs:#?}"
    );
}

#[test]
fn missing_required_field_is_reported() {
    let errs = errors("apis: [{match: {path_prefix: /x}}]\n");
    assert_eq!(errs, vec!["apis[0]: missing field `name`".to_string()]);
}

#[test]
fn env_and_file_values_are_substituted_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "s3cret\n").unwrap();
    let env = |name: &str| (name == "PORTCULLIS_TEST_SUBST_KEY").then(|| "from-env".to_string());
    let src = parse_with_env(
        "store: {path: db, key: '${file:secret.txt}'}\nadmin: {token: '${env:PORTCULLIS_TEST_SUBST_KEY}'}\n",
        dir.path(),
        &env,
    )
    .unwrap();
    assert_eq!(src.file.store.as_ref().unwrap().key.expose(), "s3cret");
    assert_eq!(src.file.admin.as_ref().unwrap().token.expose(), "from-env");
    assert!(src.substituted.contains("store.key"));
    assert!(src.substituted.contains("admin.token"));
    assert!(!format!("{:?}", src.file).contains("s3cret"));
}

#[test]
fn missing_env_and_file_are_errors_with_paths() {
    let errs = errors(
        "store: {path: db, key: '${env:PORTCULLIS_SURELY_UNSET_VAR}'}\nadmin: {token: '${file:/nonexistent/x}'}\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0]
            .starts_with("store.key: environment variable PORTCULLIS_SURELY_UNSET_VAR is not set")
    );
    assert!(errs[1].starts_with("admin.token: cannot read /nonexistent/x"));
}

#[test]
fn invalid_yaml_is_one_clear_error() {
    let errs = errors("apis: [\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("not valid YAML"), "{errs:?}");
}

/// Both ways of loading a file, for files that have no substitution.
fn both_paths(text: &str) -> (Option<String>, String) {
    let streaming = parse_streaming(text).map(|f| format!("{f:#?}"));
    let tree = parse_tree(text, Path::new("."), &|_| None, [0; 32], 100)
        .map(|s| format!("{:#?}", s.file))
        .unwrap_or_else(|e| format!("error: {}", e.errors));
    (streaming, tree)
}

#[test]
fn streaming_and_tree_loading_agree_on_the_bundled_example() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/portcullis.yaml"),
    )
    .unwrap();
    let (streaming, tree) = both_paths(&text);
    let streaming = streaming.expect("the example takes the streaming path");
    assert!(streaming.contains("api.example.com"), "{streaming}");
    assert_eq!(streaming, tree);
}

#[test]
fn streaming_and_tree_loading_agree_on_awkward_scalars() {
    // Quoting styles, block scalars, flow and block collections, numbers and words where strings
    // are expected, anchors and aliases, comments, a document marker.
    let text = r#"---
listen: { grpc: "127.0.0.1:9191" }
client_ip: { from: x-forwarded-for, trusted_hops: 2 }
subscriptions:
  header: X-Key
  keys:
    - id: 0123
      scope: &everything all
      state: active
      primary: 'sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873'
    - { id: "b\tc", scope: *everything, primary: "sha256:2d531c9638e311d25fccf130d144e2cdf40e5a128bed320785a6ad33d3f80067" }
apis:
  - name: on        # a YAML 1.1 boolean word, a plain string in YAML 1.2
    match:
      path_prefix: /x
      methods:
        - GET
    subscription_required: true
    ip_filter: { action: allow, addresses: [10.0.0.0/8, "::1", 192.168.1.10-192.168.1.20] }
    on_allow:
      set_headers:
        x-multi: |
          first
          second
        x-folded: >-
          one
          two
unmatched: deny
"#;
    let (streaming, tree) = both_paths(text);
    let streaming = streaming.expect("valid: takes the streaming path");
    assert_eq!(streaming, tree);
    assert!(streaming.contains("\"0123\""), "{streaming}");
}

#[test]
fn what_the_streaming_path_refuses_gets_the_tree_paths_answer() {
    // A YAML 1.1 boolean, a duplicate key and a merge key: the streaming parser is set to refuse
    // them, so the file gets serde_yaml's (YAML 1.2) reading and its error messages, as before.
    for text in [
        "apis: [{name: a, subscription_required: yes}]\n",
        "unmatched: deny\nunmatched: allow\n",
        "base: &b {name: a}\napis: [{<<: *b}]\n",
    ] {
        assert!(parse_streaming(text).is_none(), "{text}");
        assert!(!errors(text).is_empty(), "{text}");
    }
    assert_eq!(
        errors("apis: [{name: a, subscription_required: yes}]\n"),
        vec!["apis[0].subscription_required: invalid type: string \"yes\", expected a boolean"]
    );
}

#[test]
fn a_file_with_substitutions_is_substituted_whatever_its_size() {
    // `${...}` anywhere sends the file down the substituting path.
    let env = |name: &str| (name == "SCALE_TEST_KEY").then(|| "from-env".to_string());
    let src = parse_with_env(
        "admin: {token: '${env:SCALE_TEST_KEY}'}\n",
        Path::new("."),
        &env,
    )
    .unwrap();
    assert_eq!(src.file.admin.as_ref().unwrap().token.expose(), "from-env");
    assert!(src.substituted.contains("admin.token"));
}

// Hostile files: each gets one clear error naming the limit (and the line), and is refused in one
// cheap pass. Each runs on its own thread with a generous deadline, to catch a hang; this is not a
// timing assertion (a 64,000-deep file took 20 s before the limits).

/// Runs `f` on its own thread; panics if it has not finished within 20 s.
fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("did not finish within 20 s")
}

/// The errors of loading `text` (relative references from `dir`), on a thread with a deadline.
fn hostile(text: String, dir: PathBuf) -> Vec<String> {
    finishes(move || match parse_with_env(&text, &dir, &|_| None) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    })
}

fn here() -> PathBuf {
    PathBuf::from(".")
}

const TOO_DEEP: &str = "nested more than 64 levels deep, the limit for a config file";

fn deep_flow_seq(key: &str, depth: usize) -> String {
    format!("{key}: {}{}\n", "[".repeat(depth), "]".repeat(depth))
}

fn deep_flow_map(key: &str, depth: usize) -> String {
    format!("{key}: {}1{}\n", "{a: ".repeat(depth), "}".repeat(depth))
}

fn deep_block_map(key: &str, depth: usize) -> String {
    let mut y = format!("{key}:\n");
    for level in 1..=depth {
        y.push_str(&" ".repeat(level));
        y.push_str(if level == depth { "a: 1\n" } else { "a:\n" });
    }
    y
}

#[test]
fn deep_flow_nesting_is_refused_at_the_limit_under_known_and_unknown_keys() {
    for (text, line) in [
        (deep_flow_seq("apis", 64_000), 1),
        (deep_flow_seq("bogus", 64_000), 1),
        (deep_flow_map("apis", 64_000), 1),
        (deep_flow_map("bogus", 64_000), 1),
        // A substitution sends the file down the value-tree path.
        (
            format!(
                "admin: {{token: '${{env:X}}'}}\n{}",
                deep_flow_seq("bogus", 64_000)
            ),
            2,
        ),
    ] {
        let start = text[..40.min(text.len())].to_string();
        assert_eq!(
            hostile(text, here()),
            vec![format!("line {line}: {TOO_DEEP}")],
            "{start}"
        );
    }
}

#[test]
fn deep_block_nesting_is_refused_with_the_line_of_the_first_level_past_it() {
    for key in ["apis", "bogus"] {
        // Level 1 is the document, level 2 the value of `key` (line 2), level 65 opens on line 65.
        assert_eq!(
            hostile(deep_block_map(key, 1_000), here()),
            vec![format!("line 65: {TOO_DEEP}")]
        );
        assert_eq!(
            hostile(format!("{key}:\n{}x\n", "- ".repeat(64_000)), here()),
            vec![format!("line 2: {TOO_DEEP}")]
        );
    }
}

/// `identity_providers[].keys[]` holds JSON values of any shape: the nesting limit, not the
/// type, decides how deep one may go.
fn deep_jwk(depth: usize) -> String {
    // Document (1), identity_providers (2), the provider (3), keys (4): the JWK nests from 5 on.
    let jwk = format!("{}1{}", "{a: ".repeat(depth - 4), "}".repeat(depth - 4));
    format!("identity_providers: [{{name: i, issuer: 'https://i', keys: [{jwk}]}}]\n")
}

#[test]
fn nesting_up_to_the_limit_loads_on_both_paths() {
    let text = deep_jwk(64);
    let src = parse(&text, Path::new(".")).expect("64 levels are within the limit");
    assert_eq!(src.file.identity_providers.len(), 1);
    let substituted = format!("admin: {{token: '${{env:HOME}}'}}\n{text}");
    assert!(parse(&substituted, Path::new(".")).is_ok());
    assert_eq!(
        hostile(deep_jwk(65), here()),
        vec![format!("line 1: {TOO_DEEP}")]
    );
}

/// Nine anchors, each a list of nine aliases of the one before: 9^9 (387 million) strings once
/// expanded, from 300 bytes of text.
fn billion_laughs(under: &str) -> String {
    let mut y = format!("{under}\n      - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..9 {
        let aliases = vec![format!("*a{}", i - 1); 9].join(", ");
        y.push_str(&format!("      - &a{i} [{aliases}]\n"));
    }
    y
}

const TOO_MANY_VALUES: &str = "more than 4000000 values (an alias counts as the values it repeats), the limit for a config file";

#[test]
fn an_alias_bomb_is_refused_without_being_expanded() {
    // Under a field that takes any JSON (what the streaming loader would expand), under an
    // unknown key, and on the substituting path.
    let keys = "identity_providers:\n  - name: i\n    issuer: https://i\n    keys:";
    for (text, line) in [
        (billion_laughs(keys), 11),
        (billion_laughs("bogus:\n    -"), 9),
        (
            format!("admin: {{token: '${{env:X}}'}}\n{}", billion_laughs(keys)),
            12,
        ),
    ] {
        assert_eq!(
            hostile(text, here()),
            vec![format!("line {line}: {TOO_MANY_VALUES}")]
        );
    }
}

#[test]
fn an_alias_of_a_huge_value_is_refused_by_the_text_it_repeats() {
    // 1 MiB of text, repeated 70 times by aliases: 70 MiB from a file of just over 1 MiB.
    let text = format!(
        "admin: {{token: &big '{}'}}\nbogus: [{}]\n",
        "x".repeat(1 << 20),
        vec!["*big"; 70].join(", ")
    );
    assert_eq!(
        hostile(text, here()),
        vec![
            "line 2: more than 64 MiB of text (an alias counts as the text it repeats), the limit for a config file"
        ]
    );
}

#[test]
fn a_few_aliases_still_load() {
    let src = parse(
        "subscriptions:\n  keys:\n    - {id: a, scope: &all all}\n    - {id: b, scope: *all}\n",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(src.file.subscriptions.keys[1].scope.as_deref(), Some("all"));
}

const TOO_LARGE: &str = "is larger than 64 MiB, the limit for a config file";

#[test]
fn an_oversized_file_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    // Sparse: 1 GiB that would take seconds to read and a gigabyte to hold.
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let errs = finishes(move || load(&path).unwrap_err().to_string());
    assert!(
        errs.starts_with("config file ") && errs.ends_with(TOO_LARGE),
        "{errs}"
    );
}

#[test]
fn a_device_as_config_file_is_read_no_further_than_the_limit() {
    // `/dev/zero` reports a size of 0 and never ends.
    let errs = finishes(|| load(Path::new("/dev/zero")).unwrap_err().to_string());
    assert_eq!(errs, format!("config file /dev/zero {TOO_LARGE}"));
}

#[test]
fn oversized_text_is_refused() {
    let text = format!("# {}\n", "x".repeat(64 << 20));
    assert_eq!(
        hostile(text, here()),
        vec![format!("the config file {TOO_LARGE}")]
    );
}

#[test]
fn a_substituted_file_over_its_limit_is_an_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("big.txt"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let big = dir.path().join("big.txt").display().to_string();
    let errs = hostile(
        "admin: {token: '${file:big.txt}'}\nstore: {path: db, key: '${file:/dev/zero}'}\n".into(),
        dir.path().to_path_buf(),
    );
    assert_eq!(
        errs,
        vec![
            format!("admin.token: {big}: larger than 1 MiB, the limit for a substituted file"),
            "store.key: /dev/zero: larger than 1 MiB, the limit for a substituted file".to_string(),
        ]
    );
}

#[test]
fn substituted_files_are_held_to_the_text_limit_together() {
    let dir = tempfile::tempdir().unwrap();
    // Exactly at the per-file limit; 65 references to it add up to 65 MiB.
    std::fs::write(dir.path().join("mib.txt"), "k".repeat(1 << 20)).unwrap();
    let refs = vec!["'${file:mib.txt}'"; 65].join(", ");
    let errs = hostile(
        format!("apis: [{{name: a, match: {{hosts: [{refs}]}}}}]\n"),
        dir.path().to_path_buf(),
    );
    assert_eq!(
        errs,
        vec![
            "apis[0].match.hosts[64]: substituted values add up to more than 64 MiB, the limit for a config file"
        ]
    );
}

#[test]
fn a_substituted_deep_file_is_text_not_yaml() {
    // Substitution does not nest: the file's content is the value, whatever it looks like.
    let dir = tempfile::tempdir().unwrap();
    let deep = "[".repeat(64_000);
    std::fs::write(dir.path().join("deep.txt"), &deep).unwrap();
    let src = finishes({
        let dir = dir.path().to_path_buf();
        move || parse_with_env("admin: {token: '${file:deep.txt}'}\n", &dir, &|_| None)
    })
    .unwrap();
    assert_eq!(src.file.admin.unwrap().token.expose(), deep);
}

#[test]
fn a_large_file_with_many_errors_reports_the_first_few() {
    // 200 errors from a small file, as before; about 13 from the largest policy measured, so that
    // collecting them stays near one load's time.
    assert_eq!(error_attempts(1_000), 200);
    assert_eq!(error_attempts(733_574), 13);
    assert_eq!(error_attempts(4_000_000), 10);
    let errs = errors(&format!(
        "bogus: 1\nsubscriptions:\n  keys:\n{}",
        "    - {id: a, typo: 1}\n".repeat(300)
    ));
    assert_eq!(errs.len(), 201, "{}", errs.len());
}

// Files with substitutions: the streaming path (values written into the text) and the tree path
// must give the same `Source`, and the streaming path must be the one taken.

/// Everything a `Source` holds that the loaders decide: the file (secrets included, which its
/// `Debug` hides) and the substituted paths.
fn fingerprint(src: &Source) -> String {
    let f = &src.file;
    let mut secrets: Vec<(String, String)> = Vec::new();
    let mut put = |path: String, s: Option<&Secret>| {
        if let Some(s) = s {
            secrets.push((path, s.expose().to_string()));
        }
    };
    if let Some(store) = &f.store {
        put("store.key".into(), Some(&store.key));
        if let Some(redis) = &store.redis {
            put("store.redis.url".into(), Some(&redis.url));
            put("store.redis.password".into(), redis.password.as_ref());
        }
    }
    if let Some(admin) = &f.admin {
        put("admin.token".into(), Some(&admin.token));
    }
    for (i, c) in f.credentials.iter().enumerate() {
        put(
            format!("credentials[{i}].client_secret"),
            c.client_secret.as_ref(),
        );
        put(format!("credentials[{i}].token"), c.token.as_ref());
        put(format!("credentials[{i}].password"), c.password.as_ref());
        put(
            format!("credentials[{i}].refresh_token"),
            c.refresh_token.as_ref(),
        );
    }
    for (i, k) in f.subscriptions.keys.iter().enumerate() {
        put(
            format!("subscriptions.keys[{i}].primary"),
            k.primary.as_ref(),
        );
        put(
            format!("subscriptions.keys[{i}].secondary"),
            k.secondary.as_ref(),
        );
    }
    for (i, p) in f.identity_providers.iter().enumerate() {
        if let Some(intro) = &p.introspection {
            put(
                format!("identity_providers[{i}].introspection.client_secret"),
                Some(&intro.client_secret),
            );
        }
    }
    let mut substituted: Vec<&String> = src.substituted.iter().collect();
    substituted.sort();
    format!("{f:#?}\nsecrets: {secrets:#?}\nsubstituted: {substituted:#?}")
}

/// Loads `text` the normal way (which must take `loader`) and on the tree path; both must agree.
/// The `Source` of the normal way, or its errors.
fn both_ways(
    text: &str,
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    loader: Loader,
) -> Result<Source, String> {
    let (traced, taken) = parse_traced(text, dir, env);
    assert_eq!(taken, loader, "{text}");
    let tree = parse_tree(text, dir, env, Sha256::digest(text.as_bytes()), 100);
    match (traced, tree) {
        (Ok(a), Ok(b)) => {
            assert_eq!(fingerprint(&a), fingerprint(&b), "{text}");
            assert_eq!(a.digest, b.digest);
            Ok(a)
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.errors, b.errors, "{text}");
            Err(a.errors.to_string())
        }
        (a, b) => panic!("{text}\nnormal: {a:?}\ntree: {b:?}"),
    }
}

/// Values that could break out of a scalar, or bend it, if written in carelessly.
const AWKWARD: &[&str] = &[
    "plain",
    "",
    " leading and trailing spaces ",
    "with \"double\" and 'single' quotes",
    "back\\slash\\",
    "\\\"",
    "line one\nline two\n\nafter a blank line",
    "crlf\r\nand a lone \r",
    "tab\there",
    "# not a comment",
    "key: value",
    "- not a list",
    "[not, a, flow, list]",
    "{not: a map}",
    "&anchor *alias !tag |",
    "${env:NOT_SUBSTITUTED_AGAIN}",
    "null",
    "~",
    "true",
    "0123",
    "1e3",
    "ünïcödé, 日本語, emoji 🦀",
    "\u{0}\u{1}\u{7}\u{8}\u{b}\u{c}\u{1b}\u{7f}",
    "\u{85}\u{a0}\u{2028}\u{2029}\u{feff}\u{fffe}\u{ffff}\u{10ffff}",
    "'",
    "\"",
    "---",
    "...",
    "%YAML 1.2",
];

fn awkward_env(name: &str) -> Option<String> {
    let i: usize = name.strip_prefix("AWKWARD_")?.parse().ok()?;
    AWKWARD.get(i).map(|v| (*v).to_string())
}

#[test]
fn substituted_values_of_every_shape_load_the_same_on_both_paths() {
    // Every awkward value in a secret, a string field, a list entry and a map value, written
    // plain, single-quoted and double-quoted, in block and flow collections.
    for (i, &value) in AWKWARD.iter().enumerate() {
        let text = format!(
            "admin: {{token: '${{env:AWKWARD_{i}}}'}}\n\
             store:\n  path: db\n  key: ${{env:AWKWARD_{i}}}\n\
             unmatched: \"${{env:AWKWARD_{i}}}\"\n\
             apis:\n  - name: ${{env:AWKWARD_{i}}}\n    match:\n      hosts: [a, '${{env:AWKWARD_{i}}}', \"${{env:AWKWARD_{i}}}\"]\n\
             \x20     methods:\n        - ${{env:AWKWARD_{i}}}\n    on_allow:\n      set_headers: {{x-a: '${{env:AWKWARD_{i}}}', x-b: c}}\n"
        );
        let src = both_ways(&text, Path::new("."), &awkward_env, Loader::Streaming).unwrap();
        assert_eq!(src.file.admin.as_ref().unwrap().token.expose(), value);
        assert_eq!(src.file.store.as_ref().unwrap().key.expose(), value);
        assert_eq!(src.file.unmatched.as_deref(), Some(value));
        let api = &src.file.apis[0];
        assert_eq!(api.name, value);
        assert_eq!(api.matcher.hosts.as_ref().unwrap()[1], value);
        assert_eq!(api.matcher.methods.as_ref().unwrap()[0], value);
        assert_eq!(api.on_allow.set_headers["x-a"], value);
        let mut paths: Vec<_> = src.substituted.iter().map(String::as_str).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "admin.token",
                "apis[0].match.hosts[1]",
                "apis[0].match.hosts[2]",
                "apis[0].match.methods[0]",
                "apis[0].name",
                "apis[0].on_allow.set_headers.x-a",
                "store.key",
                "unmatched"
            ]
        );
    }
}

#[test]
fn substitutions_in_every_position_load_the_same_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "from \"a\" file\\\r\n\n").unwrap();
    std::fs::write(dir.path().join("ünï.txt"), "ünïcödé\n").unwrap();
    let env = |name: &str| match name {
        "SECRET" => Some("s3cret: #1 \"quoted\" \\ ünï".to_string()),
        "EMPTY" => Some(String::new()),
        "HOST" => Some("api.example.com".to_string()),
        _ => awkward_env(name),
    };
    let texts = [
        // Nested maps and lists, block and flow, every quoting, comments and non-ASCII around.
        "# ünïcödé ${env:IN_A_COMMENT}\n\
         credentials:\n\
         \x20 - name: é\n    grant: client_credentials\n    client_secret: ${env:SECRET} # ${env:NOPE}\n\
         \x20 - {name: b, grant: client_credentials, client_secret: \"${env:SECRET}\", token: '${file:secret.txt}'}\n\
         \x20 - name: ü\n    grant: basic\n    username: ${file:ünï.txt}\n    password: '${env:EMPTY}'\n\
         apis:\n\
         \x20 - name: 日本\n    match:\n      hosts:\n        - ${env:HOST}\n        - \"${env:AWKWARD_6}\"\n\
         \x20     context_extensions: {ünï: '${env:AWKWARD_21}', k: v}\n\
         \x20   on_allow:\n      metadata:\n        \"quoted key\": ${env:AWKWARD_3}\n        'ké': \"${env:AWKWARD_4}\"\n\
         \x20     set_headers:\n        x-a: '${env:AWKWARD_22}'\n",
        // A value split over lines (the text, not the value, spans them), escapes in the quoted
        // form, and a document marker.
        "---\nadmin:\n  token: \"${env:\\\n    SECRET}\"\nstore: {path: db, key: \"\\x24{env:SECRET}\"}\nunmatched:\n  ${env:AWKWARD_0}\n...\n",
        // Keys and `${` that are not whole values are left alone; anchors and aliases elsewhere
        // in the file do not matter.
        "apis:\n  - name: a ${env:SECRET}\n    match: {path_prefix: &p /x}\n    on_allow:\n      set_headers:\n        ${env:SECRET}: x\n        y: ${env:SECRET}\n  - name: b\n    match: {path_prefix: *p}\n",
        // Identity providers: an introspection secret and a JWK that is any JSON.
        "identity_providers:\n  - name: i\n    issuer: https://i\n    keys: [{kty: oct, k: '${env:SECRET}', n: [1, '${env:AWKWARD_18}']}]\n    introspection:\n      client_id: c\n      client_secret: ${file:secret.txt}\n",
        // Subscription keys.
        "subscriptions:\n  keys:\n    - {id: a, primary: '${env:SECRET}'}\n    - id: b\n      primary: ${env:HOST}\n      secondary: \"${file:secret.txt}\"\n",
        // A whole-value substitution that is not a string in YAML's eyes is still a string.
        "unmatched: '${env:AWKWARD_16}'\nlisten: {grpc: '${env:AWKWARD_17}', http: \"${env:AWKWARD_19}\"}\n",
    ];
    for text in texts {
        let src = both_ways(text, dir.path(), &env, Loader::Streaming).unwrap();
        assert!(!src.substituted.is_empty(), "{text}");
    }
    let src = both_ways(texts[0], dir.path(), &env, Loader::Streaming).unwrap();
    assert_eq!(
        src.file.credentials[1].token.as_ref().unwrap().expose(),
        "from \"a\" file\\"
    );
    assert_eq!(src.file.credentials[2].username.as_deref(), Some("ünïcödé"));
    assert!(
        src.substituted
            .contains("apis[0].on_allow.metadata.quoted key")
    );
    assert!(
        src.substituted
            .contains("apis[0].match.context_extensions.ünï")
    );
    let src = both_ways(texts[2], dir.path(), &env, Loader::Streaming).unwrap();
    let paths: Vec<_> = src.substituted.iter().collect();
    assert_eq!(paths, ["apis[0].on_allow.set_headers.y"]);
}

#[test]
fn what_the_streaming_path_gives_up_on_takes_the_tree_path() {
    let dir = tempfile::tempdir().unwrap();
    let env = |name: &str| match name {
        "SECRET" => Some("s3cret".to_string()),
        "THREE" => Some("3".to_string()),
        "TRUE" => Some("true".to_string()),
        _ => None,
    };
    // Loaded the same, by the tree path.
    for text in [
        // An anchor or tag on or around a substitution, or an alias that repeats one.
        "admin: {token: &t '${env:SECRET}'}\n",
        "admin: &a {token: '${env:SECRET}'}\n",
        "admin: {token: !!str '${env:SECRET}'}\n",
        "admin: !!map {token: '${env:SECRET}'}\n",
        // A block scalar (its span starts after the `|-`).
        "admin:\n  token: |-\n    ${env:SECRET}\nunmatched: >-\n  ${env:SECRET}\n",
        // A key that is not plainly a string on the way.
        "apis:\n  - name: a\n    on_allow: {set_headers: {1: '${env:SECRET}'}}\n",
        "apis:\n  - name: a\n    on_allow: {set_headers: {'1': '${env:SECRET}'}}\n    match: {context_extensions: {null: '${env:SECRET}'}}\n",
    ] {
        let (result, taken) = parse_traced(text, dir.path(), &env);
        assert_eq!(taken, Loader::Tree, "{text}");
        let _ = both_ways(text, dir.path(), &env, Loader::Tree);
        drop(result);
    }
    // Errors: reported by the tree path with their paths, as before.
    for (text, error) in [
        (
            "admin: {token: '${env:UNSET}'}\n",
            "admin.token: environment variable UNSET is not set",
        ),
        (
            "admin: {token: '${file:missing.txt}'}\n",
            "admin.token: cannot read ",
        ),
        (
            "admin: {token: '${vault:x}'}\n",
            "admin.token: unknown substitution `${vault:x}`: use ${env:NAME} or ${file:PATH}",
        ),
        // A substituted value is a string: not a number or a boolean, even when it reads as one
        // (the streaming parser would take a quoted "3" as a number; the `!!str` tag stops it).
        (
            "client_ip: {trusted_hops: '${env:THREE}'}\n",
            "client_ip.trusted_hops: invalid type: string \"3\", expected u32",
        ),
        (
            "dynamic_metadata: ${env:TRUE}\n",
            "dynamic_metadata: invalid type: string \"true\", expected a boolean",
        ),
        (
            "admin: ${env:SECRET}\n",
            "admin: invalid type: string \"s3cret\", expected struct Admin",
        ),
        (
            "admin: {token: '${env:SECRET}', bogus: 1}\n",
            "bogus: unknown field `bogus`",
        ),
    ] {
        let errors = both_ways(text, dir.path(), &env, Loader::Tree).unwrap_err();
        assert!(errors.contains(error), "{text}: {errors}");
    }
}

#[test]
fn hostile_text_after_the_last_substitution_is_refused_as_before() {
    // The scan for substitutions stops past the last `${` (when no alias could follow); what it
    // did not see is held to the limits by the streaming parser's budget, and refused by the tree
    // path's whole scan with the same message as before.
    let keys = "identity_providers:\n  - name: i\n    issuer: https://i\n    keys:";
    for (text, error) in [
        (
            format!(
                "admin: {{token: '${{env:X}}'}}\n{}",
                deep_flow_seq("bogus", 64_000)
            ),
            format!("line 2: {TOO_DEEP}"),
        ),
        (
            format!(
                "admin: {{token: '${{env:X}}'}}\n{}",
                deep_block_map("apis", 1_000)
            ),
            format!("line 66: {TOO_DEEP}"),
        ),
        (
            format!("admin: {{token: '${{env:X}}'}}\n{}", billion_laughs(keys)),
            format!("line 12: {TOO_MANY_VALUES}"),
        ),
    ] {
        let errs = finishes(move || {
            let (result, taken) = parse_traced(&text, Path::new("."), &|_| Some("x".into()));
            assert_eq!(taken, Loader::Tree);
            result.unwrap_err().errors.to_string()
        });
        assert_eq!(errs, error);
    }
    // Within the limits, the same shapes load on the streaming path.
    let text = format!("admin: {{token: '${{env:X}}'}}\n{}", deep_jwk(64));
    let (result, taken) = parse_traced(&text, Path::new("."), &|_| Some("x".into()));
    assert_eq!(taken, Loader::Streaming);
    assert_eq!(result.unwrap().file.admin.unwrap().token.expose(), "x");
}

#[test]
fn a_large_file_with_substitutions_takes_the_streaming_path() {
    // 20,000 subscription keys and 100 credentials whose secrets come from the environment, as
    // `loadtest/scale/gen.py` writes them. The tree path took this file before.
    let mut text = String::from("credentials:\n");
    for i in 0..100 {
        text.push_str(&format!(
            "  - name: c{i}\n    grant: client_credentials\n    token_url: https://idp/token\n    client_id: id{i}\n    client_secret: ${{env:SECRET}}\n"
        ));
    }
    text.push_str("subscriptions:\n  keys:\n");
    for i in 0..20_000 {
        text.push_str(&format!(
            "    - {{id: k{i}, scope: all, primary: 'sha256:{i:064x}', secondary: '${{env:SECOND}}'}}\n"
        ));
    }
    let env = |name: &str| Some(format!("value of {name}"));
    let (source, taken) = parse_traced(&text, Path::new("."), &env);
    assert_eq!(taken, Loader::Streaming);
    let source = source.unwrap();
    assert_eq!(source.substituted.len(), 20_100);
    assert!(source.substituted.contains("credentials[99].client_secret"));
    assert!(
        source
            .substituted
            .contains("subscriptions.keys[19999].secondary")
    );
    assert_eq!(
        source.file.subscriptions.keys[19_999]
            .secondary
            .as_ref()
            .unwrap()
            .expose(),
        "value of SECOND"
    );
}
