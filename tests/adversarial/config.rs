//! Hostile config files: nested 64,000 levels deep, alias bombs, oversized files and substituted
//! files. Each is refused with one error naming the limit (and the line) on every path that reads
//! a config (`portcullis::config::load`, which `validate`, `check`, `serve` and reload all use), and
//! a running server given one on reload keeps deciding with its last good config.
//!
//! Every case runs against a deadline of 20 s, to catch a hang: before the limits, the deep file
//! took about 20 s to refuse, on the reload thread as well. This is not a timing assertion.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{TestServer, get, seen};

const DEADLINE: Duration = Duration::from_secs(20);

/// A hostile file: what to write, and the one error a user must see (after the file's name).
struct Case {
    name: &'static str,
    write: fn(&Path),
    error: &'static str,
}

fn deep_flow_seq(key: &str) -> String {
    format!("{key}: {}{}\n", "[".repeat(64_000), "]".repeat(64_000))
}

fn deep_flow_map(key: &str) -> String {
    format!("{key}: {}1{}\n", "{a: ".repeat(64_000), "}".repeat(64_000))
}

fn deep_block(key: &str) -> String {
    format!("{key}:\n{}x\n", "- ".repeat(64_000))
}

/// 9^9 strings once expanded, from 300 bytes, under a field that takes any JSON.
fn billion_laughs() -> String {
    let mut y = String::from(
        "identity_providers:\n  - name: i\n    issuer: https://i\n    keys:\n      - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for i in 1..9 {
        let aliases = vec![format!("*a{}", i - 1); 9].join(", ");
        y.push_str(&format!("      - &a{i} [{aliases}]\n"));
    }
    y
}

/// Writes a sparse file of 1 GiB: seconds to read and a gigabyte to hold, if it were read.
fn sparse(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "flow sequences 64,000 deep under a known key",
            write: |p| std::fs::write(p, deep_flow_seq("apis")).unwrap(),
            error: "line 1: nested more than 64 levels deep, the limit for a config file",
        },
        Case {
            name: "flow mappings 64,000 deep under an unknown key",
            write: |p| std::fs::write(p, deep_flow_map("bogus")).unwrap(),
            error: "line 1: nested more than 64 levels deep, the limit for a config file",
        },
        Case {
            name: "block sequences 64,000 deep under a known key",
            write: |p| std::fs::write(p, deep_block("apis")).unwrap(),
            error: "line 2: nested more than 64 levels deep, the limit for a config file",
        },
        Case {
            name: "flow sequences 64,000 deep in a file with a substitution (the value-tree path)",
            write: |p| {
                let text = format!(
                    "admin: {{token: '${{env:HOME}}'}}\n{}",
                    deep_flow_seq("bogus")
                );
                std::fs::write(p, text).unwrap()
            },
            error: "line 2: nested more than 64 levels deep, the limit for a config file",
        },
        Case {
            name: "a billion laughs",
            write: |p| std::fs::write(p, billion_laughs()).unwrap(),
            error: "line 11: more than 4000000 values (an alias counts as the values it repeats), the limit for a config file",
        },
        Case {
            name: "a 1 GiB file",
            write: sparse,
            error: "is larger than 64 MiB, the limit for a config file",
        },
        Case {
            name: "a substitution of a 1 GiB file",
            write: |p| {
                sparse(&p.with_file_name("big.txt"));
                std::fs::write(p, "admin: {token: '${file:big.txt}'}\n").unwrap()
            },
            error: "big.txt: larger than 1 MiB, the limit for a substituted file",
        },
        Case {
            name: "a substitution of /dev/zero",
            write: |p| std::fs::write(p, "admin: {token: '${file:/dev/zero}'}\n").unwrap(),
            error: "admin.token: /dev/zero: larger than 1 MiB, the limit for a substituted file",
        },
    ]
}

/// Runs `f` on its own thread; panics if it has not finished by the deadline.
fn finishes<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{what}: not refused within {DEADLINE:?}"))
}

/// Runs the binary with `args` within the deadline; asserts exit 2 and returns its stderr.
fn refused_with_exit_2(args: Vec<String>) -> String {
    let what = args.join(" ");
    let out = finishes(&what, move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(&args)
            .output()
            .unwrap()
    });
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
    stderr
}

#[test]
fn every_hostile_file_gets_its_one_clear_error() {
    for case in cases() {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("portcullis.yaml");
        (case.write)(&path);
        let errs = finishes(case.name, move || {
            portcullis::config::load(&path)
                .map(|_| ())
                .unwrap_err()
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        });
        assert_eq!(errs.len(), 1, "{}: {errs:#?}", case.name);
        assert!(
            errs[0].ends_with(case.error),
            "{}: {errs:#?}\nexpected to end with: {}",
            case.name,
            case.error
        );
    }
}

/// `portcullis_config_reloads_total{result="failure"}` on the server's `/metrics`.
async fn failed_reloads(srv: &TestServer) -> f64 {
    let url = format!("http://{}/metrics", srv.running.addrs.http.unwrap());
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| {
            l.starts_with("portcullis_config_reloads_total{") && l.contains("result=\"failure\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn orders_code(srv: &TestServer) -> i32 {
    let mut client = srv.client().await;
    seen(
        &client
            .check(get("/orders/1").request())
            .await
            .unwrap()
            .into_inner(),
    )
    .code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_given_a_hostile_file_on_reload_keeps_its_last_good_config() {
    let good = "apis: [{name: orders, match: {path_prefix: /orders}}]\n";
    let srv = TestServer::start(good).await;
    assert_eq!(orders_code(&srv).await, 0, "the good config allows /orders");

    for case in cases() {
        let before = failed_reloads(&srv).await;
        // Written beside the config and renamed over it, as an editor or a ConfigMap would.
        let tmp = srv.dir.path().join(".hostile.tmp");
        (case.write)(&tmp);
        std::fs::rename(&tmp, &srv.config).unwrap();

        // The watcher reloads on its own (on a blocking thread): it must give up by the deadline.
        let started = Instant::now();
        while failed_reloads(&srv).await <= before {
            assert!(
                started.elapsed() < DEADLINE,
                "{}: the reload was not refused within {DEADLINE:?}",
                case.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The same refusal when forced (SIGHUP), with its message.
        let errs = srv.running.reload().await.unwrap_err();
        assert!(
            errs.to_string().ends_with(case.error),
            "{}: {errs}",
            case.name
        );
        assert_eq!(
            orders_code(&srv).await,
            0,
            "{}: the last good config keeps deciding",
            case.name
        );
    }

    // Still watching: a good change after them all is applied.
    srv.write_config("apis: [{name: other, match: {path_prefix: /other}}]\n");
    let started = Instant::now();
    while orders_code(&srv).await == 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "the good config was not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(orders_code(&srv).await, 7, "/orders is no longer an API");
    srv.running.shutdown().await.unwrap();
}

#[test]
fn validate_check_and_serve_refuse_a_hostile_file_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, deep_flow_map("apis")).unwrap();
    let config = path.display().to_string();
    for args in [
        vec!["validate", "--config", &config],
        vec![
            "check",
            "--config",
            &config,
            "--url",
            "http://api.example.com/orders/1",
        ],
        vec!["serve", "--config", &config],
    ] {
        let what = args.join(" ");
        let stderr = refused_with_exit_2(args.iter().map(ToString::to_string).collect());
        assert!(
            stderr.contains("line 1: nested more than 64 levels deep, the limit for a config file"),
            "{what}: {stderr}"
        );
    }
}

/// Files the config only names are bounded too: a JWKS file and `check --cert` that are `/dev/zero`
/// (size 0, endless) and TLS files of 2 GiB are refused at their cap instead of read whole.
#[test]
fn files_the_config_names_are_read_within_a_cap() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.yaml");
    std::fs::write(
        &jwks,
        "identity_providers: [{ name: f, issuer: https://f.example, jwks_file: /dev/zero }]\n",
    )
    .unwrap();
    // The TLS files must be regular files (a device is refused at compile): a sparse 2 GiB one.
    let big = dir.path().join("big.pem");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let tls = dir.path().join("tls.yaml");
    std::fs::write(
        &tls,
        format!(
            "listen: {{ grpc: 127.0.0.1:0, tls: {{ cert_file: {0}, key_file: {0} }} }}\n",
            big.display()
        ),
    )
    .unwrap();
    let plain = dir.path().join("plain.yaml");
    std::fs::write(&plain, "apis: [{ name: a, match: { path_prefix: /a } }]\n").unwrap();
    let s = |p: &Path| p.display().to_string();
    for (args, want) in [
        (
            vec!["validate".to_string(), "--config".into(), s(&jwks)],
            "/dev/zero is larger than",
        ),
        (
            vec!["serve".to_string(), "--config".into(), s(&tls)],
            "big.pem is larger than",
        ),
        (
            vec![
                "check".to_string(),
                "--config".into(),
                s(&plain),
                "--url".into(),
                "http://h/a".into(),
                "--cert".into(),
                "/dev/zero".into(),
            ],
            "--cert /dev/zero: larger than",
        ),
    ] {
        let what = args.join(" ");
        let stderr = refused_with_exit_2(args);
        assert!(stderr.contains(want), "{what}: {stderr}");
    }
}
