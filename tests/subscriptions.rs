//! Subscriptions kept apart from the policy (issue 19): `subscriptions.keys_file`, reloaded on its
//! own, and run-time subscriptions made through the admin API, persisted in the store (the embedded
//! file here; Redis shared by two replicas in the last test), with their precedence.

mod common;
#[path = "redis_common/mod.rs"]
mod redis_common;
mod telemetry_common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{TestServer, admin_call, create_subscription, get, seen};
use portcullis::policy::subscription::{format_hash, hash_key};
use serde_json::{Value, json};

const TOKEN: &str = "admin-token-5f4e3d2c1b0a";

fn h(k: &str) -> String {
    format_hash(&hash_key(k))
}

/// Writes `text` to `path` by write-then-rename, as an operator's tooling would.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The gRPC code of a check of GET /orders with `key` (0 allow, 16 unauthenticated).
async fn code_with(srv: &TestServer, key: &str) -> i32 {
    code_via(srv.client().await, key).await
}

async fn code_via(
    mut client: portcullis::proto::auth::authorization_client::AuthorizationClient<
        tonic::transport::Channel,
    >,
    key: &str,
) -> i32 {
    seen(
        &client
            .check(
                get("/orders/1")
                    .header("ocp-apim-subscription-key", key)
                    .request(),
            )
            .await
            .unwrap()
            .into_inner(),
    )
    .code
}

async fn eventually(srv: &TestServer, key: &str, want: i32) -> bool {
    for _ in 0..60 {
        if code_with(srv, key).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn api_yaml(extra: &str) -> String {
    format!(
        "{extra}\nproducts: [{{name: gold, apis: [orders]}}]\napis:\n  - name: orders\n    match: {{path_prefix: /orders}}\n    subscription_required: true\n  - name: other\n    match: {{path_prefix: /other}}\n    subscription_required: true\n"
    )
}

#[tokio::test]
async fn the_keys_file_is_read_at_start_and_reloaded_alone_keeping_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    write_atomically(
        &keys,
        &format!(
            "# id state scope primary secondary\nalice active product:gold {} -\nbob suspended all {} {}\n",
            h("alice-1"),
            h("bob-1"),
            h("bob-2")
        ),
    );
    let yaml = api_yaml(&format!(
        "subscriptions:\n  keys_file: {}\n  keys: [{{id: inline, primary: \"{}\"}}]",
        keys.display(),
        h("inline-1")
    ));
    let srv = TestServer::start(&yaml).await;
    let summary = srv.running.state.policy().summary.clone();
    assert_eq!((summary.subscriptions, summary.keys), (3, 4));
    assert_eq!(code_with(&srv, "alice-1").await, 0);
    assert_eq!(code_with(&srv, "inline-1").await, 0);
    assert_eq!(code_with(&srv, "bob-1").await, 16);

    // A change of the keys file swaps the key table only: the policy set stays the same object.
    let before = std::sync::Arc::as_ptr(&srv.running.state.policy());
    write_atomically(
        &keys,
        &format!(
            "alice suspended product:gold {} -\nbob active all {} {}\n",
            h("alice-1"),
            h("bob-1"),
            h("bob-new")
        ),
    );
    assert!(
        eventually(&srv, "bob-new", 0).await,
        "the watcher did not reload the keys"
    );
    assert_eq!(code_with(&srv, "alice-1").await, 16);
    assert_eq!(code_with(&srv, "bob-2").await, 16);
    assert_eq!(code_with(&srv, "inline-1").await, 0);
    assert!(std::ptr::eq(
        before,
        std::sync::Arc::as_ptr(&srv.running.state.policy())
    ));

    // A broken file: every error with its line; the last good keys keep serving.
    write_atomically(
        &keys,
        &format!(
            "carol active all {}\nbad line\ndan active api:nope {}\n",
            h("carol-1"),
            h("dan-1")
        ),
    );
    let errs = srv.running.reload_keys().await.unwrap_err().to_string();
    assert!(
        errs.contains(&format!("{}:2: a line is", keys.display())),
        "{errs}"
    );
    assert!(
        errs.contains(&format!(
            "{}:3: scope `api:nope`: no API is named `nope`",
            keys.display()
        )),
        "{errs}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(code_with(&srv, "bob-new").await, 0);
    assert_eq!(code_with(&srv, "carol-1").await, 16);

    // A full reload reads the keys file too, and refuses the broken one the same way.
    let errs = srv.running.reload().await.unwrap_err().to_string();
    assert!(errs.contains(":2: a line is"), "{errs}");
    assert_eq!(code_with(&srv, "bob-new").await, 0);
    srv.running.shutdown().await.unwrap();
}

#[test]
fn an_id_or_key_both_inline_and_in_the_keys_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(
        &keys,
        format!(
            "twice active all {}\nother active all {}\n",
            h("file-1"),
            h("inline-1")
        ),
    )
    .unwrap();
    let yaml = api_yaml(&format!(
        "subscriptions:\n  keys_file: {}\n  keys: [{{id: twice, primary: \"{}\"}}]",
        keys.display(),
        h("inline-1")
    ));
    let out = common::validate_refuses(&yaml);
    assert!(
        out.contains(":1: `twice` is also the id of a subscription in subscriptions.keys"),
        "{out}"
    );
    assert!(
        out.contains(":2: a key of `other` is also a key of `twice` in subscriptions.keys"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// The admin API.

struct Admin {
    base: String,
}

impl Admin {
    fn new(srv: &TestServer) -> Admin {
        Admin {
            base: format!("http://{}/admin", srv.running.addrs.http.unwrap()),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(Some(TOKEN), method, path, body).await
    }

    async fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}/subscriptions{path}", self.base);
        let (status, text) = admin_call(method, &url, token, body).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn store_yaml(dir: &Path) -> String {
    let key = dir.join("store.key");
    std::fs::write(&key, redis_common::KEY_A).unwrap();
    format!(
        "admin: {{token: \"{TOKEN}\"}}\nstore: {{path: \"{}\", key: \"${{file:{}}}\"}}",
        dir.join("store.redb").display(),
        key.display()
    )
}

#[tokio::test]
async fn a_reload_that_names_another_keys_file_watches_that_one() {
    let keys_dir = tempfile::tempdir().unwrap();
    let (a, b) = (keys_dir.path().join("a"), keys_dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (first, second) = (a.join("keys-a.txt"), b.join("keys-b.txt"));
    write_atomically(&first, &format!("alice active all {} -\n", h("alice-1")));
    write_atomically(&second, &format!("bob active all {} -\n", h("bob-1")));
    let config =
        |keys: &Path| api_yaml(&format!("subscriptions:\n  keys_file: {}", keys.display()));
    let srv = TestServer::start(&config(&first)).await;
    assert_eq!(code_with(&srv, "alice-1").await, 0);
    assert_eq!(code_with(&srv, "bob-1").await, 16);

    // The config now names the other file (in another directory): the reload reads it ...
    srv.write_config(&config(&second));
    assert!(
        eventually(&srv, "bob-1", 0).await,
        "the config reload did not read the new keys file"
    );
    assert_eq!(code_with(&srv, "alice-1").await, 16);
    // ... and a change of it reloads the keys, without a restart (the watch moved with it).
    write_atomically(
        &second,
        &format!(
            "bob active all {} -\ncarol active all {} -\n",
            h("bob-1"),
            h("carol-1")
        ),
    );
    assert!(
        eventually(&srv, "carol-1", 0).await,
        "a change of the newly named keys file was not picked up"
    );
    // The file named before is no longer followed: its changes grant nothing.
    write_atomically(
        &first,
        &format!(
            "alice active all {} -\ndan active all {} -\n",
            h("alice-1"),
            h("dan-1")
        ),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(code_with(&srv, "dan-1").await, 16);
    assert_eq!(code_with(&srv, "carol-1").await, 0);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_admin_call_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, format!("from-file active all {}\n", h("file-1"))).unwrap();
    let yaml = api_yaml(&format!(
        "{}\nsubscriptions: {{keys_file: \"{}\"}}",
        store_yaml(dir.path()),
        keys.display()
    ));
    let srv = TestServer::start(&yaml).await;
    let admin = Admin::new(&srv);

    // No token, a wrong one, another scheme: 401 on every route, nothing changed.
    for token in [None, Some("wrong"), Some("")] {
        for (m, p, b) in [
            ("GET", "", None),
            ("POST", "", Some(json!({"id": "x"}))),
            ("GET", "/x", None),
            ("POST", "/x/suspend", None),
            ("POST", "/x/regenerate/primary", None),
            ("DELETE", "/x", None),
        ] {
            let (status, body) = admin.call_as(token, m, p, b).await;
            assert_eq!(status, 401, "{m} {p} with {token:?}: {body}");
        }
    }
    assert_eq!(admin.call("GET", "/x", None).await.0, 404);

    // Create: 201 with both keys, shown this once.
    let (status, created) = admin
        .call(
            "POST",
            "",
            Some(json!({"id": "contoso", "scope": "product:gold"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let primary = created["primary_key"].as_str().unwrap().to_string();
    let secondary = created["secondary_key"].as_str().unwrap().to_string();
    assert_eq!(primary.len(), 64);
    assert_ne!(primary, secondary);
    assert_eq!(created["state"], "active");
    assert_eq!(code_with(&srv, &primary).await, 0);
    assert_eq!(code_with(&srv, &secondary).await, 0);
    // Scope: product gold covers `orders` only.
    let mut client = srv.client().await;
    let other = seen(
        &client
            .check(
                get("/other/1")
                    .header("ocp-apim-subscription-key", &primary)
                    .request(),
            )
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(other.code, 16);

    // Errors of create.
    let dup = admin.call("POST", "", Some(json!({"id": "contoso"}))).await;
    assert_eq!(dup.0, 409, "{}", dup.1);
    let configured = admin
        .call("POST", "", Some(json!({"id": "from-file"})))
        .await;
    assert_eq!(configured.0, 409, "{}", configured.1);
    for bad in [
        json!({"id": "a/b"}),
        json!({"id": ""}),
        json!({"id": "caf\u{e9}"}),
        json!({"id": "ok", "scope": "product:nope"}),
        json!({"id": "ok", "scope": "everything"}),
        json!({"id": "ok", "state": "cancelled"}),
        json!({"id": "ok", "primary_key": "mine"}),
        json!({"nope": 1}),
    ] {
        let r = admin.call("POST", "", Some(bad.clone())).await;
        assert_eq!(r.0, 400, "{bad}: {}", r.1);
    }

    // Get and list: never a key or a hash.
    let (status, one) = admin.call("GET", "/contoso", None).await;
    assert_eq!(status, 200);
    assert_eq!(one["scope"], "product:gold");
    assert_eq!(one["source"], "runtime");
    assert_eq!(one["shadowed"], false);
    let (status, file_one) = admin.call("GET", "/from-file", None).await;
    assert_eq!((status, file_one["source"].as_str()), (200, Some("config")));
    let (status, list) = admin.call("GET", "", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["runtime"], 1);
    assert_eq!(list["configured"], 1);
    assert_eq!(list["subscriptions"][0]["id"], "contoso");

    // State transitions, and the ones refused with 409.
    assert_eq!(admin.call("POST", "/contoso/activate", None).await.0, 409);
    assert_eq!(admin.call("POST", "/contoso/suspend", None).await.0, 200);
    assert_eq!(code_with(&srv, &primary).await, 16);
    assert_eq!(admin.call("POST", "/contoso/suspend", None).await.0, 409);
    assert_eq!(admin.call("POST", "/contoso/activate", None).await.0, 200);
    assert_eq!(code_with(&srv, &primary).await, 0);

    // Regenerate: the old key refused at once, the new one and the other key accepted.
    let (status, regen) = admin
        .call("POST", "/contoso/regenerate/primary", None)
        .await;
    assert_eq!(status, 200, "{regen}");
    let new_primary = regen["primary_key"].as_str().unwrap().to_string();
    assert!(regen.get("secondary_key").is_none());
    assert_eq!(code_with(&srv, &primary).await, 16);
    assert_eq!(code_with(&srv, &new_primary).await, 0);
    assert_eq!(code_with(&srv, &secondary).await, 0);
    assert_eq!(
        admin
            .call("POST", "/contoso/regenerate/tertiary", None)
            .await
            .0,
        400
    );

    // Unknown ids: 404 everywhere; an id that could not exist too (no path tricks).
    for p in ["/nobody", "/..%2Fcontoso", "/contoso%00"] {
        assert_eq!(admin.call("GET", p, None).await.0, 404, "{p}");
        assert_eq!(
            admin.call("POST", &format!("{p}/suspend"), None).await.0,
            404
        );
        assert_eq!(
            admin
                .call("POST", &format!("{p}/regenerate/primary"), None)
                .await
                .0,
            404
        );
        assert_eq!(admin.call("DELETE", p, None).await.0, 404);
    }
    assert_eq!(admin.call("POST", "/contoso/frobnicate", None).await.0, 404);

    // Cancel is final.
    assert_eq!(admin.call("POST", "/contoso/cancel", None).await.0, 200);
    assert_eq!(code_with(&srv, &new_primary).await, 16);
    assert_eq!(admin.call("POST", "/contoso/activate", None).await.0, 409);
    assert_eq!(admin.call("POST", "/contoso/cancel", None).await.0, 409);
    assert_eq!(
        admin
            .call("POST", "/contoso/regenerate/secondary", None)
            .await
            .0,
        409
    );

    // Delete.
    assert_eq!(admin.call("DELETE", "/contoso", None).await.0, 204);
    assert_eq!(admin.call("DELETE", "/contoso", None).await.0, 404);
    assert_eq!(admin.call("GET", "/contoso", None).await.0, 404);
    srv.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn run_time_subscriptions_survive_a_restart_and_configured_ids_take_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "# none yet\n").unwrap();
    let yaml = api_yaml(&format!(
        "telemetry: {{log_format: json}}\n{}\nsubscriptions: {{keys_file: \"{}\"}}",
        store_yaml(dir.path()),
        keys.display()
    ));
    // Two processes in turn on the same embedded store.
    let first = telemetry_common::Serve::start(&yaml, &[]);
    let base = format!("http://{}/admin/subscriptions", first.http);
    let created = create_subscription(&base, TOKEN, json!({"id": "fabrikam"})).await;
    let key = created["primary_key"].as_str().unwrap().to_string();
    let suspended =
        create_subscription(&base, TOKEN, json!({"id": "idle", "state": "suspended"})).await;
    let idle = suspended["primary_key"].as_str().unwrap().to_string();
    assert_eq!(code_via(first.client().await, &key).await, 0);
    assert_eq!(code_via(first.client().await, &idle).await, 16);
    first.stop().await;

    // The embedded store kept them (hashes only, sealed): the next process serves them.
    let raw = std::fs::read(dir.path().join("store.redb")).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(!raw.contains(&key) && !raw.contains(&hex_of(&key)));
    let srv = TestServer::start(&yaml).await;
    assert_eq!(code_with(&srv, &key).await, 0);
    assert_eq!(code_with(&srv, &idle).await, 16);

    // The keys file gains the same id: the configured subscription wins, the run-time one's keys
    // are refused (and it is shown shadowed) until the file lets go of the id.
    write_atomically(&keys, &format!("fabrikam active all {}\n", h("file-key")));
    assert!(eventually(&srv, "file-key", 0).await);
    assert_eq!(code_with(&srv, &key).await, 16);
    let admin = Admin::new(&srv);
    assert_eq!(
        admin.call("GET", "/fabrikam", None).await.1["shadowed"],
        true
    );
    write_atomically(&keys, "# none again\n");
    assert!(eventually(&srv, &key, 0).await);
    assert_eq!(code_with(&srv, "file-key").await, 16);
    srv.running.shutdown().await.unwrap();
}

fn hex_of(key: &str) -> String {
    format_hash(&hash_key(key))["sha256:".len()..].to_string()
}

#[tokio::test]
async fn run_time_subscriptions_need_a_store() {
    let srv = TestServer::start(&api_yaml(&format!("admin: {{token: \"{TOKEN}\"}}"))).await;
    let admin = Admin::new(&srv);
    let (status, body) = admin.call("POST", "", Some(json!({"id": "x"}))).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("need a `store`"));
    srv.running.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// No key after the one answer that shows it.

#[tokio::test]
async fn no_key_or_hash_appears_in_logs_records_or_answers_after_the_creation_answer() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = api_yaml(&format!(
        "telemetry: {{log_format: json, log_level: debug, decision_log: true}}\n{}",
        store_yaml(dir.path())
    ));
    let srv = telemetry_common::Serve::start(&yaml, &[]);
    let base = format!("http://{}/admin/subscriptions", srv.http);
    let send = |m: &'static str, p: &str, body: Option<Value>| {
        let url = format!("{base}{p}");
        async move { admin_call(m, &url, Some(TOKEN), body).await }
    };
    let (status, created) = send("POST", "", Some(json!({"id": "secretive"}))).await;
    assert_eq!(status, 201);
    let created: Value = serde_json::from_str(&created).unwrap();
    let mut secrets = vec![
        created["primary_key"].as_str().unwrap().to_string(),
        created["secondary_key"].as_str().unwrap().to_string(),
    ];
    let mut answers = Vec::new();
    let (_, regen) = send("POST", "/secretive/regenerate/secondary", None).await;
    let regen_v: Value = serde_json::from_str(&regen).unwrap();
    secrets.push(regen_v["secondary_key"].as_str().unwrap().to_string());
    // Use every key, valid and stale, over gRPC, and every read and change of the admin API.
    let mut client = srv.client().await;
    for k in &secrets {
        let r = client
            .check(
                get("/orders/1")
                    .header("ocp-apim-subscription-key", k)
                    .request(),
            )
            .await
            .unwrap()
            .into_inner();
        answers.push(format!("{r:?}"));
    }
    for (m, p) in [
        ("GET", ""),
        ("GET", "/secretive"),
        ("POST", "/secretive/suspend"),
        ("POST", "/secretive/activate"),
        ("POST", "/secretive/cancel"),
        ("DELETE", "/secretive"),
    ] {
        answers.push(send(m, p, None).await.1);
    }
    let (stdout, stderr) = srv.stop().await;
    let everything = [stdout.join("\n"), stderr.join("\n"), answers.join("\n")].join("\n");
    for k in &secrets {
        assert!(!everything.contains(k.as_str()), "a key leaked");
        assert!(!everything.contains(&hex_of(k)), "a key's hash leaked");
    }
    // Every change is on record, in the decision log's stream: who, what, which.
    let audits: Vec<Value> = stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["audit"] == "subscription")
        .collect();
    let actions: Vec<&str> = audits
        .iter()
        .map(|v| v["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "create",
            "regenerate",
            "suspend",
            "activate",
            "cancel",
            "delete"
        ]
    );
    assert!(audits.iter().all(|v| v["who"] == "admin"
        && v["subscription_id"] == "secretive"
        && v["time"].is_string()));
    assert_eq!(audits[1]["regenerated"], "secondary");
}

// ---------------------------------------------------------------------------------------------
// Two replicas on one Redis.

#[tokio::test]
async fn a_key_regenerated_on_one_replica_is_refused_on_the_other_within_a_second() {
    let Some(mut redis) = redis_common::RedisServer::start(false) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("store.key");
    std::fs::write(&key_file, redis_common::KEY_A).unwrap();
    let yaml = api_yaml(&format!(
        "admin: {{token: \"{TOKEN}\"}}\nstore:\n  redis: {{ url: \"{}\", timeout: 300ms }}\n  key: \"${{file:{}}}\"",
        redis.url(),
        key_file.display()
    ));
    let a = TestServer::start(&yaml).await;
    let b = TestServer::start(&yaml).await;
    let (admin_a, admin_b) = (Admin::new(&a), Admin::new(&b));

    let (status, created) = admin_a
        .call("POST", "", Some(json!({"id": "shared"})))
        .await;
    assert_eq!(status, 201);
    let old = created["primary_key"].as_str().unwrap().to_string();
    let within = |started: Instant| started.elapsed() < Duration::from_secs(1);
    let started = Instant::now();
    assert!(eventually(&b, &old, 0).await);
    assert!(
        within(started),
        "created key reached B after {:?}",
        started.elapsed()
    );
    // The same id on B is a conflict, even before B saw it (the store decides).
    assert_eq!(
        admin_b
            .call("POST", "", Some(json!({"id": "shared"})))
            .await
            .0,
        409
    );

    let (_, regen) = admin_a
        .call("POST", "/shared/regenerate/primary", None)
        .await;
    let new = regen["primary_key"].as_str().unwrap().to_string();
    let started = Instant::now();
    assert!(eventually(&b, &old, 16).await);
    assert!(
        within(started),
        "B refused the old key only after {:?}",
        started.elapsed()
    );
    assert_eq!(code_with(&b, &new).await, 0);

    // A suspension on B reaches A.
    assert_eq!(admin_b.call("POST", "/shared/suspend", None).await.0, 200);
    let started = Instant::now();
    assert!(eventually(&a, &new, 16).await);
    assert!(within(started));
    // A has seen B's change, so its own write goes through; a stale one would be a 409.
    assert_eq!(admin_a.call("POST", "/shared/activate", None).await.0, 200);
    assert!(eventually(&b, &new, 0).await);

    // Redis holds sealed records only: no key, no hash in clear.
    let dump = redis.dump().await;
    for (k, v) in &dump {
        let v = String::from_utf8_lossy(v);
        for secret in [&old, &new] {
            assert!(!k.contains(secret.as_str()) && !v.contains(secret.as_str()));
            assert!(!v.contains(&hex_of(secret)), "{k}");
        }
    }
    a.running.shutdown().await.unwrap();
    b.running.shutdown().await.unwrap();
    redis.kill();
}

#[tokio::test]
async fn check_and_validate_see_run_time_subscriptions_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = api_yaml(&format!(
        "telemetry: {{log_format: json}}\n{}",
        store_yaml(dir.path())
    ));
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let serve = telemetry_common::Serve::start(&yaml, &[]);
    let base = format!("http://{}/admin/subscriptions", serve.http);
    let created = create_subscription(&base, TOKEN, json!({"id": "tooling"})).await;
    let key = created["primary_key"].as_str().unwrap().to_string();
    let header = format!("ocp-apim-subscription-key: {key}");
    let url = "http://api.example.com/orders/1";
    // While the service holds the embedded file, `check` says it cannot read it (and denies).
    let (code, out) = cli(&["check", "--url", url, "-H", &header]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is in use by the running service"), "{out}");
    serve.stop().await;
    let (code, out) = cli(&["check", "--url", url, "-H", &header]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("subscription `tooling`"), "{out}");
    assert!(!out.contains(&key), "{out}");
    let (code, out) = cli(&["validate"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("1 run-time subscriptions (from the store)"),
        "{out}"
    );
}
