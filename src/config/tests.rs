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
