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
        .unwrap_or_else(|e| format!("error: {e}"));
    (streaming, tree)
}

#[test]
fn streaming_and_tree_loading_agree_on_the_bundled_example() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/portcullis.yaml"),
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

#[test]
#[ignore]
fn tmp_time_scan() {
    let text = std::fs::read_to_string("/tmp/cfgbench/scale/portcullis.yaml").unwrap();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        limits::scan(&text).unwrap();
        let scan = t.elapsed();
        let t = std::time::Instant::now();
        assert!(parse_streaming(&text).is_some());
        let stream = t.elapsed();
        eprintln!("scan {scan:?} streaming {stream:?}");
    }
}

#[test]
#[ignore]
fn tmp_time_streaming_hostile() {
    for f in ["flow-seq-64000-apis", "flow-map-64000-bogus", "block-seq-64000-apis", "block-map-8000-apis", "bomb-keys", "bomb-bogus"] {
        let text = std::fs::read_to_string(format!("/tmp/cfgbench/{f}.yaml")).unwrap();
        let t = std::time::Instant::now();
        assert!(parse_streaming(&text).is_none());
        let stream = t.elapsed();
        let t = std::time::Instant::now();
        let r = limits::scan(&text);
        eprintln!("{f}: streaming {stream:?} scan {:?} {r:?}", t.elapsed());
    }
}
