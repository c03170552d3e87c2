//! Backend-credential connection ids that collide: a caller whose token's `sub` spells an
//! operator's fixed connection id (`default`, `shared`), the same `sub` from two identity
//! providers, subjects with separators, escapes, unicode or great length, tokens without `sub` or
//! `iss`; and stores written before per-user ids were namespaced (upgraded, or refused at start).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use portcullis::config;
use portcullis::credentials::{ConnectionRecord, ConnectionUser, Registry, Store};
use portcullis::policy::{self, PolicySet, Runtime};

use crate::keys;

const CORP: &str = "https://idp.test/corp";
const PARTNER: &str = "https://idp.test/partner";
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// A token endpoint whose access token names the refresh token it was given
/// (`at(<refresh token>)`), so the injected header says whose connection served the caller.
/// An authorization code `c` is redeemed for the refresh token `rt-c`.
struct Provider {
    url: String,
    forms: Arc<Mutex<Vec<String>>>,
}

impl Provider {
    async fn start() -> Provider {
        let forms: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = forms.clone();
        let app = Router::new().route(
            "/token",
            axum::routing::post(move |body: String| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(body.clone());
                    let form: std::collections::HashMap<String, String> =
                        form_urlencoded::parse(body.as_bytes())
                            .into_owned()
                            .collect();
                    let json = match form.get("grant_type").map(String::as_str) {
                        Some("refresh_token") => serde_json::json!({
                            "access_token": format!("at({})", form["refresh_token"]),
                            "token_type": "Bearer", "expires_in": 600}),
                        Some("authorization_code") => serde_json::json!({
                            "access_token": format!("at(rt-{})", form["code"]),
                            "refresh_token": format!("rt-{}", form["code"]),
                            "token_type": "Bearer", "expires_in": 600}),
                        _ => serde_json::json!({"error": "unsupported_grant_type"}),
                    };
                    ([("content-type", "application/json")], json.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Provider { url, forms }
    }
}

/// Two identity providers, one `refresh_token` credential with the operator's `default`
/// connection (seeded from the config) and a fixed `shared` one, and an API where each caller
/// uses their own connection (`{jwt.sub}`).
struct Harness {
    provider: Provider,
    corp: keys::TestKey,
    partner: keys::TestKey,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store.key"), KEY).unwrap();
        Harness {
            provider: Provider::start().await,
            corp: keys::p256(Some("corp-1")),
            partner: keys::p256(Some("partner-1")),
            dir,
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }

    fn yaml(&self) -> String {
        format!(
            r#"
identity_providers:
  - {{ name: corp, issuer: "{CORP}", keys: [{corp}] }}
  - {{ name: partner, issuer: "{PARTNER}", keys: [{partner}] }}
store: {{ path: store.db, key: "${{file:store.key}}" }}
credentials:
  - name: crm
    grant: refresh_token
    token_url: "{url}"
    authorize_url: "http://127.0.0.1:1/authorize"
    redirect_uri: "http://127.0.0.1:2/admin/callback"
    client_id: app
    client_secret: sec
    refresh_token: rt-operator-default
apis:
  - name: mine
    match: {{ path_prefix: /orders }}
    jwt: {{ providers: [corp, partner], audiences: [api://crm] }}
    on_allow: {{ backend_credential: {{ name: crm, connection: "{{jwt.sub}}" }} }}
  - name: reports
    match: {{ path_prefix: /reports }}
    on_allow: {{ backend_credential: {{ name: crm, connection: shared }} }}
  - name: batch
    match: {{ path_prefix: /batch }}
    on_allow: {{ backend_credential: {{ name: crm }} }}
"#,
            corp = self.corp.jwk,
            partner = self.partner.jwk,
            url = self.provider.url,
        )
    }

    /// Writes a connection into the store before portcullis opens it (as a previous run did).
    fn seed(&self, id: &str, refresh_token: &str) {
        let store = Store::open(
            &self.db(),
            &portcullis::credentials::store::decode_key(KEY).unwrap(),
        )
        .unwrap();
        // Built from JSON so that this helper reads the same before and after fields were added.
        let record: ConnectionRecord = serde_json::from_value(serde_json::json!({
            "state": "connected", "refresh_token": refresh_token, "refresh_token_expires_at": null,
            "error": null, "seeded_from": null, "created_at": 1, "updated_at": 1
        }))
        .unwrap();
        store.put("crm", id, &record).unwrap();
    }

    async fn start_runtime(&self) -> (PolicySet, Runtime) {
        let (policy, rt, started) = self.try_start().await;
        started.unwrap_or_else(|e| panic!("{e}"));
        (policy, rt)
    }

    /// Compiles the config and starts its credentials (opening the store), as `serve` does.
    async fn try_start(&self) -> (PolicySet, Runtime, Result<(), String>) {
        let rt = Runtime {
            credentials: Registry::default(),
            ..Runtime::default()
        };
        let src = config::parse(&self.yaml(), self.dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let policy = policy::compile(&src, &rt)
            .unwrap_or_else(|e| panic!("{e}"))
            .0;
        rt.publish(&policy);
        let started = rt
            .credentials
            .start(policy.backend_credentials())
            .await
            .map_err(|e| e.to_string());
        (policy, rt, started)
    }

    /// Connects a user the way an operator does: consent by the user's namespaced id, the
    /// provider redirecting back with `code` (redeemed for the refresh token `rt-<code>`).
    async fn consent(&self, rt: &Runtime, issuer: &str, subject: &str, code: &str) {
        let user = ConnectionUser {
            issuer: issuer.into(),
            subject: subject.into(),
        };
        let looked = rt
            .credentials
            .admin_connections("crm", Some(&user))
            .await
            .unwrap();
        let id = looked["id"].as_str().unwrap().to_string();
        let started = rt
            .credentials
            .start_consent("crm", &id, None, Some(user))
            .await
            .unwrap();
        let state = consent_state(&started);
        rt.credentials
            .complete_consent(Some(&state), Some(code), None)
            .await
            .unwrap();
    }

    /// Removes the store's connection-id marker: the file as a version before namespaced ids
    /// left it (that version wrote only the key check and the records).
    fn make_legacy(&self) {
        let db = redb::Database::open(self.db()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("meta"))
                .unwrap();
            assert!(meta.remove("connection_ids").unwrap().is_some());
        }
        txn.commit().unwrap();
    }
}

/// The injected `authorization` upstream, or "status reason".
async fn decide(policy: &PolicySet, token: &str) -> Result<String, String> {
    crate::common::injected(
        &crate::common::decide_bearer(policy, token, std::time::SystemTime::now()).await,
    )
}

const AUD: &str = "api://crm";

fn with(mut claims: serde_json::Value, set: serde_json::Value) -> serde_json::Value {
    for (k, v) in set.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

/// The attack on the code before namespaced ids: `sub: default` was served the operator's
/// `default` connection (`Bearer at(rt-operator-default)`), `sub: shared` the `shared` one.
#[tokio::test]
async fn a_caller_named_like_a_fixed_connection_never_gets_it() {
    let h = Harness::start().await;
    h.seed("shared", "rt-operator-shared");
    let (policy, _rt) = h.start_runtime().await;
    for sub in ["default", "shared"] {
        let token = h.corp.token(keys::claims(CORP, AUD, sub));
        assert_eq!(
            decide(&policy, &token).await,
            Err("403 BackendCredentialConsentRequired".to_string()),
            "sub `{sub}` must not be served the operator's `{sub}` connection"
        );
    }
}

#[tokio::test]
async fn every_caller_gets_their_own_connection_or_none() {
    let h = Harness::start().await;
    h.seed("shared", "rt-operator-shared");
    let (policy, rt) = h.start_runtime().await;
    let long = "l".repeat(4096);
    let own_id = portcullis::credentials::per_user_connection_id(CORP, "alice");
    // Connected users: (issuer, subject, code -> refresh token rt-<code>).
    let users: [(&str, &str, &str); 7] = [
        (CORP, "alice", "corp-alice"),
        (PARTNER, "alice", "partner-alice"),
        (CORP, "a:b", "colon"),
        (CORP, "a/b", "slash"),
        (CORP, "100%2F", "percent"),
        (CORP, "ålice-ünï©ødé-名前", "unicode"),
        (CORP, &long, "long"),
    ];
    for (iss, sub, code) in users {
        h.consent(&rt, iss, sub, code).await;
    }
    let consent = || Err("403 BackendCredentialConsentRequired".to_string());
    let ok = |rt: &str| Ok(format!("Bearer at({rt})"));
    // (case, signing key, claims, what the caller must see)
    let corp = &h.corp;
    let partner = &h.partner;
    let base = |iss: &str, sub: &str| keys::claims(iss, AUD, sub);
    let rows: Vec<(
        &str,
        &keys::TestKey,
        serde_json::Value,
        Result<String, String>,
    )> = vec![
        (
            "own connection",
            corp,
            base(CORP, "alice"),
            ok("rt-corp-alice"),
        ),
        (
            "sub: default (the operator's shared connection)",
            corp,
            base(CORP, "default"),
            consent(),
        ),
        (
            "sub equal to another fixed connection id",
            corp,
            base(CORP, "shared"),
            consent(),
        ),
        (
            "same sub, other issuer: its own user",
            partner,
            base(PARTNER, "alice"),
            ok("rt-partner-alice"),
        ),
        ("sub with `:`", corp, base(CORP, "a:b"), ok("rt-colon")),
        ("`:` moved: another user", corp, base(CORP, "a"), consent()),
        ("sub with `/`", corp, base(CORP, "a/b"), ok("rt-slash")),
        (
            "sub with `%` (never decoded)",
            corp,
            base(CORP, "100%2F"),
            ok("rt-percent"),
        ),
        (
            "the decoded spelling is another user",
            corp,
            base(CORP, "100/"),
            consent(),
        ),
        (
            "unicode sub",
            corp,
            base(CORP, "ålice-ünï©ødé-名前"),
            ok("rt-unicode"),
        ),
        ("very long sub", corp, base(CORP, &long), ok("rt-long")),
        (
            "very long sub, one character short",
            corp,
            base(CORP, &long[1..]),
            consent(),
        ),
        (
            "sub spelling a user's namespaced id",
            corp,
            base(CORP, &own_id),
            consent(),
        ),
        ("sub: user:", corp, base(CORP, "user:"), consent()),
        ("empty sub", corp, base(CORP, ""), consent()),
        (
            "missing sub",
            corp,
            with(base(CORP, "x"), serde_json::json!({"sub": null})),
            consent(),
        ),
        (
            "sub not a string (number)",
            corp,
            with(base(CORP, "x"), serde_json::json!({"sub": 7})),
            consent(),
        ),
        // The identity check refuses these before any connection is looked up.
        (
            "missing iss",
            corp,
            with(base(CORP, "alice"), serde_json::json!({"iss": null})),
            Err("401 TokenIssuerNotAllowed".into()),
        ),
        (
            "partner's key vouching for a corp user",
            partner,
            base(CORP, "alice"),
            Err("401 TokenIssuerNotAllowed".into()),
        ),
    ];
    let mut wrong = Vec::new();
    for (case, key, claims, want) in rows {
        let got = decide(&policy, &key.token(claims)).await;
        if got != want {
            wrong.push(format!("{case}: got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    // The operator's refresh tokens never reached the provider on a caller's behalf: only the
    // start-up prefetch of the fixed connections spent them.
    let forms = h.provider.forms.lock().unwrap().clone();
    let operator = forms.iter().filter(|f| f.contains("rt-operator")).count();
    assert!(
        operator <= 2,
        "{operator} refreshes of operator connections: {forms:?}"
    );

    // The operator finds each user's connection by issuer and subject.
    let listed = rt.credentials.admin_connections("crm", None).await.unwrap();
    let entries = listed["connections"].as_array().unwrap();
    let partner_alice = entries
        .iter()
        .find(|e| e["issuer"] == PARTNER && e["subject"] == "alice")
        .expect("partner's alice is listed with issuer and subject");
    assert_eq!(partner_alice["kind"], "per_user");
    let fixed: Vec<_> = entries
        .iter()
        .filter(|e| e["kind"] == "fixed")
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(fixed, ["default", "shared"]);
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

fn upgrade_store(h: &Harness, args: &[&str]) -> (Option<i32>, String, String) {
    let cfg = h.dir.path().join("portcullis.yaml");
    std::fs::write(&cfg, h.yaml()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("upgrade-store")
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A store from before namespaced ids holding `alice` (a user's bare `sub`, under the per-user
/// API) is refused at start, untouched; `upgrade-store --issuer` gives it to that issuer's alice.
#[tokio::test]
async fn a_legacy_store_with_per_user_connections_is_refused_until_upgraded() {
    let h = Harness::start().await;
    h.seed("default", "rt-operator-default");
    h.seed("alice", "rt-old-alice");
    h.make_legacy();
    let before = sha(&h.db());
    let (_, _, started) = h.try_start().await;
    let err = started.expect_err("an ambiguous legacy store must not start");
    for needle in [
        "credential `crm`",
        "1 connection(s) (`alice`)",
        "upgrade-store",
        "--issuer",
        "--drop",
        "left untouched",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in: {err}");
    }
    assert_eq!(sha(&h.db()), before, "the file is left as it was");

    // The binary refuses too (exit 2, the same message).
    let cfg = h.dir.path().join("portcullis.yaml");
    std::fs::write(&cfg, format!("listen: {{grpc: 127.0.0.1:0}}\n{}", h.yaml())).unwrap();
    assert!(crate::common::serve_refuses(&cfg).contains("upgrade-store"));
    assert_eq!(sha(&h.db()), before);

    let (code, stdout, stderr) = upgrade_store(&h, &["--credential", "crm", "--issuer", CORP]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("`alice` -> `user:") && stdout.contains("the store is upgraded"),
        "{stdout}"
    );

    let (policy, rt) = h.start_runtime().await;
    assert_eq!(
        decide(&policy, &h.corp.token(keys::claims(CORP, AUD, "alice"))).await,
        Ok("Bearer at(rt-old-alice)".into()),
        "corp's alice keeps her connection"
    );
    for (key, iss, sub) in [(&h.partner, PARTNER, "alice"), (&h.corp, CORP, "default")] {
        assert_eq!(
            decide(&policy, &key.token(keys::claims(iss, AUD, sub))).await,
            Err("403 BackendCredentialConsentRequired".into()),
            "{iss} {sub}"
        );
    }
    let listed = rt.credentials.admin_connections("crm", None).await.unwrap();
    let alice = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subject"] == "alice")
        .unwrap()
        .clone();
    assert_eq!(
        (alice["issuer"].as_str(), alice["kind"].as_str()),
        (Some(CORP), Some("per_user"))
    );
}

#[tokio::test]
async fn upgrade_store_can_drop_the_ambiguous_connections_instead() {
    let h = Harness::start().await;
    h.seed("alice", "rt-old-alice");
    h.seed("shared", "rt-operator-shared");
    h.make_legacy();
    let (code, _, stderr) = upgrade_store(&h, &["--credential", "crm"]);
    assert_eq!(code, Some(2), "neither --issuer nor --drop: {stderr}");
    let (code, stdout, stderr) = upgrade_store(&h, &["--credential", "crm", "--drop"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("deleted `alice`"), "{stdout}");
    let (policy, rt) = h.start_runtime().await;
    assert_eq!(
        decide(&policy, &h.corp.token(keys::claims(CORP, AUD, "alice"))).await,
        Err("403 BackendCredentialConsentRequired".into())
    );
    let ids: Vec<_> = rt.credentials.admin_connections("crm", None).await.unwrap()["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, ["default", "shared"], "the fixed ones are kept");
}

/// A legacy store whose every record is a fixed id the config names is upgraded in place at
/// start (the mark itself: `credentials::tests::a_legacy_store_is_upgraded_only_when_unambiguous`):
/// nothing a caller can reach changes meaning.
#[tokio::test]
async fn a_legacy_store_of_fixed_connections_is_upgraded_at_start() {
    let h = Harness::start().await;
    h.seed("shared", "rt-operator-shared");
    h.make_legacy();
    let (policy, rt) = h.start_runtime().await;
    for sub in ["shared", "default"] {
        assert_eq!(
            decide(&policy, &h.corp.token(keys::claims(CORP, AUD, sub))).await,
            Err("403 BackendCredentialConsentRequired".into())
        );
    }
    let ids: Vec<_> = rt.credentials.admin_connections("crm", None).await.unwrap()["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].clone(), e["kind"].clone()))
        .collect();
    assert_eq!(
        ids,
        [
            ("default".into(), "fixed".into()),
            ("shared".into(), "fixed".into())
        ]
    );
}

/// The admin API over HTTP addresses a user's connection by its namespaced id: looked up by
/// issuer and subject, consented with them, served to exactly that caller.
#[tokio::test]
async fn the_admin_api_finds_and_connects_a_user_by_issuer_and_subject() {
    let h = Harness::start().await;
    let dir = h.dir.path().display().to_string();
    let text = h
        .yaml()
        .replace("path: store.db", &format!("path: {dir}/store.db"))
        .replace("${file:store.key}", &format!("${{file:{dir}/store.key}}"))
        + "admin: { token: admin-token-0123456789 }\n";
    let srv = crate::common::TestServer::start(&text).await;
    let base = format!(
        "http://{}/admin/credentials/crm/connections",
        srv.running.addrs.http.unwrap()
    );
    let http = reqwest::Client::new();
    let call = |req: reqwest::RequestBuilder| async move {
        let r = req
            .bearer_auth("admin-token-0123456789")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            r.json::<serde_json::Value>().await.unwrap_or_default(),
        )
    };
    let q = [("issuer", PARTNER), ("subject", "al/ice:ü")];
    let (status, looked) = call(http.get(&base).query(&q)).await;
    assert_eq!(status, 200, "{looked}");
    let id = looked["id"].as_str().unwrap().to_string();
    assert_eq!(
        id,
        portcullis::credentials::per_user_connection_id(PARTNER, "al/ice:ü")
    );
    assert_eq!(looked["connections"], serde_json::json!([]));

    // Requests that cannot name one connection unambiguously: 400 each.
    for (req, why) in [
        (
            http.get(&base).query(&[("issuer", PARTNER)]),
            "issuer without subject",
        ),
        (
            http.post(format!("{base}/{id}/consent")),
            "a per-user consent names its user",
        ),
        (
            http.post(format!("{base}/default/consent"))
                .json(&serde_json::json!({"issuer": PARTNER, "subject": "default"})),
            "`default` is fixed",
        ),
        (
            http.delete(format!("{base}/al%2Fice")),
            "not a connection id",
        ),
    ] {
        let (status, body) = call(req).await;
        assert_eq!(status, 400, "{why}: {body}");
    }

    let (status, started) = call(
        http.post(format!("{base}/{id}/consent"))
            .json(&serde_json::json!({"issuer": PARTNER, "subject": "al/ice:ü"})),
    )
    .await;
    assert_eq!(status, 200, "{started}");
    let state = consent_state(&started);
    let cb = reqwest::get(format!(
        "http://{}/admin/callback?state={state}&code=partner-alice",
        srv.running.addrs.http.unwrap()
    ))
    .await
    .unwrap();
    assert_eq!(cb.status().as_u16(), 200);

    let mut client = srv.client().await;
    let check = |token: String| {
        crate::common::get("/orders/1")
            .header("authorization", &format!("Bearer {token}"))
            .request()
    };
    let r = client
        .check(check(h.partner.token(keys::claims(
            PARTNER,
            AUD,
            "al/ice:ü",
        ))))
        .await
        .unwrap()
        .into_inner();
    let s = crate::common::seen(&r);
    assert_eq!(
        s.headers.get("authorization").map(|v| v.0.as_str()),
        Some("Bearer at(rt-partner-alice)")
    );
    // The same subject from the other identity provider is another user.
    let r = client
        .check(check(h.corp.token(keys::claims(CORP, AUD, "al/ice:ü"))))
        .await
        .unwrap()
        .into_inner();
    let s = crate::common::seen(&r);
    assert_eq!((s.code, s.status), (7, Some(403)));

    let (status, listed) = call(http.get(&base)).await;
    assert_eq!(status, 200);
    let entry = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (
            entry["issuer"].as_str(),
            entry["subject"].as_str(),
            entry["kind"].as_str()
        ),
        (Some(PARTNER), Some("al/ice:ü"), Some("per_user"))
    );
    let r = http
        .delete(format!("{base}/{id}"))
        .bearer_auth("admin-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
}

/// The `state` of a consent's login URL (what the provider hands back to the callback).
fn consent_state(started: &serde_json::Value) -> String {
    let login = url::Url::parse(started["login_url"].as_str().expect("a login_url")).unwrap();
    login
        .query_pairs()
        .find(|(k, _)| k == "state")
        .expect("a state parameter")
        .1
        .into_owned()
}
