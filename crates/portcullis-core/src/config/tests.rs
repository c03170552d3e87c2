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
