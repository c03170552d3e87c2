//! The command line as users run it.

mod common;

use std::io::{BufRead, BufReader, Write};

use common::validate_refuses;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/portcullis.yaml")
}

#[test]
fn validate_the_bundled_example() {
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(example())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("4 APIs"), "{stdout}");
}

/// `portcullis validate` on `yaml`: exit 2, and what it printed on stderr.
#[test]
fn validate_reports_every_error_with_its_path_and_exits_2() {
    let stderr = validate_refuses(
        "apis:\n  - name: a\n    match: {path_prefix: x}\n    ip_filter: {action: allow, addresses: [nope]}\n  - name: a\nunmatched: perhaps\n",
    );
    for needle in [
        "apis[0].match.path_prefix",
        "apis[0].ip_filter.addresses[0]",
        "apis[1].name",
        "unmatched",
        "4 errors",
    ] {
        assert!(stderr.contains(needle), "missing {needle} in:\n{stderr}");
    }
}

#[test]
fn config_from_environment_variable() {
    let out = Command::new(BIN)
        .arg("validate")
        .env("PORTCULLIS_CONFIG", example())
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn check_explains_and_sets_the_exit_code() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(example())
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    let (code, out) = run(&[
        "--url",
        "http://api.example.com/orders/1",
        "-H",
        "Ocp-Apim-Subscription-Key: demo-key-123",
        "--source",
        "10.1.2.3",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("decision: allow"));
    assert!(out.contains("x-subscription-id: demo"));
    assert!(out.contains("headers to remove: ocp-apim-subscription-key"));
    assert!(
        !out.contains("demo-key-123"),
        "the key must not be printed:\n{out}"
    );

    let (code, out) = run(&[
        "--url",
        "http://api.example.com/orders/1",
        "--source",
        "8.8.8.8",
    ]);
    assert_eq!(code, Some(1));
    assert!(out.contains("reason: CallerIpNotAllowed"), "{out}");
    assert!(out.contains("ip_filter"), "{out}");

    let (code, out) = run(&[
        "--json",
        "--url",
        "http://api.example.com/catalog",
        "--source",
        "10.0.0.1",
    ]);
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reason"], "SubscriptionKeyNotFound");
    assert_eq!(v["status"], 401);

    let (code, _) = run(&["--url", "::not a url::"]);
    assert_eq!(code, Some(2));
}

#[test]
fn hash_key_reads_stdin() {
    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"demo-key-123\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "sha256:a52782e3a2d4dd2f95f640b9abfb3b2a6b8e722c65f55be830f6e5f619f7f873"
    );
}

#[test]
fn serve_logs_its_listeners_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.yaml");
    std::fs::write(
        &cfg,
        "listen: {grpc: 127.0.0.1:0, http: 127.0.0.1:0}\napis: [{name: a}]\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut listeners = Vec::new();
    while listeners.len() < 2 && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        if line.contains("listening") {
            listeners.push(line);
        }
    }
    assert_eq!(listeners.len(), 2, "{listeners:?}");
    assert!(
        listeners[0].contains("listener=\"grpc\"") || listeners[0].contains("listener=grpc"),
        "{listeners:?}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
}

/// A structural error (an unknown field, a value of the wrong type) no longer hides the errors of
/// the rest of the file: the entries that parsed are compiled too, and every error is reported in one
/// run. An error that the removed value itself causes further down is not repeated.
#[test]
fn validate_reports_structural_and_semantic_errors_in_one_run() {
    let stderr = validate_refuses(
        "apis:\n  - name: a\n    bogus_field: 1\n  - name: b\n    ip_filter: {action: allow, addresses: [10.0.0.300]}\n  - name: c\n    jwt: {providers: 7}\n  - name: d\n    jwt: {providers: [nobody]}\nlimits: {max_token_bytes: lots}\n",
    );
    for needle in [
        "apis[0].bogus_field: unknown field",
        "apis[1].ip_filter.addresses[0]: `10.0.0.300` is not an IP address",
        "apis[2].jwt.providers: invalid type",
        "limits.max_token_bytes: invalid type",
        "apis[3].jwt.providers[0]",
        "5 errors",
    ] {
        assert!(stderr.contains(needle), "missing {needle} in:\n{stderr}");
    }
    assert_eq!(
        stderr.matches("apis[2]").count(),
        1,
        "nothing repeated about the value that was set aside:\n{stderr}"
    );
}

#[test]
fn serve_refuses_a_broken_config_with_exit_2() {
    let stderr = common::refuses("serve", "apis: [{name: a, bogus: true}]\n");
    assert!(stderr.contains("apis[0].bogus"), "{stderr}");
}

#[test]
fn validate_refuses_entra_presets_that_name_no_single_tenant_or_no_rule() {
    let tid = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let stderr = validate_refuses(&format!(
        r#"
identity_providers:
  - name: multi
    entra: {{ tenant_id: common, audiences: [api://orders] }}
  - name: no-rule
    entra: {{ tenant_id: {tid} }}
  - name: with-issuer
    issuer: https://sts.windows.net/{tid}/
    entra: {{ tenant_id: {tid}, client_application_ids: [not-a-guid] }}
  - name: domain-with-keys
    jwks_file: /nonexistent/jwks.json
    entra: {{ tenant_id: contoso.onmicrosoft.com, audiences: [api://orders] }}
  - name: plain
    discovery_url: https://idp.example/.well-known/openid-configuration
apis:
  - name: orders
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [multi, no-rule, with-issuer, domain-with-keys] }}
"#
    ));
    for needle in [
        "identity_providers[0].entra.tenant_id: `common` is not one tenant",
        "identity_providers[1].entra: give client_application_ids, or audiences or backend_application_ids",
        "identity_providers[2].issuer: the `entra` preset sets the issuers",
        "identity_providers[2].entra.client_application_ids[0]: `not-a-guid` is not an application (client) id",
        "identity_providers[3].entra.tenant_id: `contoso.onmicrosoft.com` is a domain name",
        "identity_providers[4].issuer: must not be empty",
    ] {
        assert!(stderr.contains(needle), "missing {needle} in:\n{stderr}");
    }
    // A broken provider's errors are its own: the API that names it gets none of its own.
    assert!(!stderr.contains("apis[0]"), "{stderr}");
}
