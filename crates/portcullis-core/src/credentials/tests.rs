//! Unit tests of the credential manager: token exchange and per-user connections with a
//! fabricated request context (validated claims and the caller's token), refresh-token rotation
//! persisted before use, and the consent flow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::*;
use crate::config;
use crate::config::ConfigErrors;
use compile::parse_format;

type Answer = Arc<dyn Fn(&HashMap<String, String>, usize) -> (u16, String) + Send + Sync>;

/// A token endpoint answering with `answer(form, n)`; records every form.
struct Fake {
    url: String,
    forms: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

impl Fake {
    async fn start(answer: Answer) -> Fake {
        let forms: Arc<Mutex<Vec<HashMap<String, String>>>> = Arc::default();
        let recorded = forms.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move |body: String| {
                let recorded = recorded.clone();
                let answer = answer.clone();
                async move {
                    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
                        .into_owned()
                        .collect();
                    let n = {
                        let mut f = recorded.lock().unwrap();
                        f.push(form.clone());
                        f.len()
                    };
                    let (status, body) = answer(&form, n);
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        body,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Fake { url, forms }
    }

    fn forms(&self) -> Vec<HashMap<String, String>> {
        self.forms.lock().unwrap().clone()
    }
}

/// The issuer of the callers' tokens in these tests.
const ISS: &str = "https://idp.test/corp";

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

struct Setup {
    registry: Registry,
    clock: Arc<ManualClock>,
    set: CredentialSet,
    _dir: tempfile::TempDir,
}

/// Compiles `credentials` (with a store in a temp dir) into a registry on a manual clock.
fn setup(credentials_yaml: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let text = format!(
        "store: {{ path: store.db, key: \"${{env:K}}\" }}\ncredentials:\n{credentials_yaml}"
    );
    let src = config::parse_with_env(&text, dir.path(), &|n| (n == "K").then(|| key.to_string()))
        .unwrap();
    let clock = ManualClock::new(t0());
    let registry = Registry::with_clock(clock.clone());
    let mut errs = ConfigErrors::default();
    let set = compile_credentials(&src, &registry, &mut errs);
    assert!(errs.is_empty(), "{errs}");
    registry.publish(&set);
    let spec = set.inner.store.clone().unwrap();
    let StoreLocation::File(path) = &spec.location else {
        panic!("a file store")
    };
    registry.open_store(path, &spec.key).unwrap();
    Setup {
        registry,
        clock,
        set,
        _dir: dir,
    }
}

fn policy(s: &Setup, cfg: config::BackendCredential) -> BackendCredentialPolicy {
    let mut errs = ConfigErrors::default();
    let p = compile_backend_credential(
        &cfg,
        "apis[0].on_allow.backend_credential",
        true,
        &s.set,
        &mut errs,
    );
    assert!(errs.is_empty(), "{errs}");
    p.unwrap()
}

fn bc(name: &str, connection: Option<&str>) -> config::BackendCredential {
    config::BackendCredential {
        name: name.into(),
        header: None,
        format: None,
        connection: connection.map(str::to_string),
    }
}

fn claims(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().unwrap().clone()
}

fn ctx<'a>(claims: &'a serde_json::Map<String, serde_json::Value>, raw: &'a str) -> Context<'a> {
    Context {
        claims: Some(claims),
        raw_token: Some(raw),
        api: "orders",
        ..Context::default()
    }
}

#[tokio::test]
async fn token_exchange_is_cached_per_caller_token_and_never_outlives_it() {
    let fake = Fake::start(Arc::new(|_f, n| (200, json!({"access_token": format!("exchanged-{n}"), "issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer", "expires_in": 3600}).to_string()))).await;
    let s = setup(&format!(
        "  - {{ name: obo, grant: token_exchange, token_url: \"{}\", client_id: svc, client_secret: sec, audience: api://inventory, scope: inventory:read }}\n",
        fake.url
    ));
    let p = policy(&s, bc("obo", None));
    let exp = crate::credentials::clock::unix_secs(t0()) + 300;
    let alice = claims(json!({"sub": "alice", "exp": exp}));
    let bob = claims(json!({"sub": "bob", "exp": exp + 1000}));

    let h = p
        .header_for(&ctx(&alice, "alice.jwt.token"), false)
        .await
        .unwrap();
    assert_eq!(
        (h.name.as_str(), h.value.as_str(), h.sensitive),
        ("authorization", "Bearer exchanged-1", true)
    );
    let form = &fake.forms()[0];
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(form["subject_token"], "alice.jwt.token");
    assert_eq!(
        form["subject_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(form["audience"], "api://inventory");
    assert_eq!(form["scope"], "inventory:read");

    // The same caller token: from the cache, even from 100 concurrent requests.
    let many = futures::future::join_all((0..100).map(|_| async {
        p.header_for(&ctx(&alice, "alice.jwt.token"), false)
            .await
            .unwrap()
            .value
    }))
    .await;
    assert!(many.iter().all(|v| v == "Bearer exchanged-1"));
    assert_eq!(fake.forms().len(), 1);

    // Another caller: another exchange; concurrent first requests share one.
    let bobs = futures::future::join_all((0..50).map(|_| async {
        p.header_for(&ctx(&bob, "bob.jwt.token"), false)
            .await
            .unwrap()
            .value
    }))
    .await;
    assert!(bobs.iter().all(|v| v == "Bearer exchanged-2"));
    assert_eq!(fake.forms().len(), 2);

    // Alice's token expires in 300 s: the exchanged one (3600 s) is capped at that, so it is fresh
    // for 120 s (3 minutes before the cap) and then exchanged again.
    s.clock.advance(Duration::from_secs(119));
    assert_eq!(
        p.header_for(&ctx(&alice, "alice.jwt.token"), false)
            .await
            .unwrap()
            .value,
        "Bearer exchanged-1"
    );
    s.clock.advance(Duration::from_secs(2));
    assert_eq!(
        p.header_for(&ctx(&alice, "alice.jwt.token"), false)
            .await
            .unwrap()
            .value,
        "Bearer exchanged-3"
    );

    // Past the caller's exp: nothing is exchanged or served.
    s.clock.advance(Duration::from_secs(200));
    let e = p
        .header_for(&ctx(&alice, "alice.jwt.token"), false)
        .await
        .unwrap_err();
    assert_eq!(e.denial.reason, Reason::BackendCredentialUnavailable);
    assert_eq!(fake.forms().len(), 3);

    // Without a validated caller token.
    let e = p
        .header_for(
            &Context {
                api: "orders",
                ..Context::default()
            },
            false,
        )
        .await
        .unwrap_err();
    assert!(
        e.detail.contains("caller's validated token"),
        "{}",
        e.detail
    );
}

#[tokio::test]
async fn a_refused_exchange_is_a_503_without_the_caller_token_in_the_detail() {
    let fake = Fake::start(Arc::new(|_f, _n| {
        (
            400,
            r#"{"error":"invalid_grant","error_description":"subject token invalid"}"#.into(),
        )
    }))
    .await;
    let s = setup(&format!(
        "  - {{ name: obo, grant: token_exchange, token_url: \"{}\", client_id: svc, client_secret: sec, resource: api://inventory }}\n",
        fake.url
    ));
    let p = policy(&s, bc("obo", None));
    let c = claims(json!({"sub": "eve"}));
    let e = p
        .header_for(&ctx(&c, "eve.secret.token"), false)
        .await
        .unwrap_err();
    assert_eq!(
        (e.denial.reason, e.denial.status),
        (Reason::BackendCredentialUnavailable, 503)
    );
    assert!(
        e.detail.contains("HTTP 400 (invalid_grant)"),
        "{}",
        e.detail
    );
    assert!(!e.detail.contains("eve.secret.token") && !e.detail.contains("subject token invalid"));
    assert_eq!(fake.forms()[0]["resource"], "api://inventory");
}

fn connected(rt: &str) -> ConnectionRecord {
    ConnectionRecord {
        state: ConnectionState::Connected,
        refresh_token: Some(rt.into()),
        refresh_token_expires_at: None,
        error: None,
        seeded_from: None,
        issuer: None,
        subject: None,
        created_at: 1,
        updated_at: 1,
    }
}

/// A provider that rotates refresh tokens: `rt-N` is valid once, and answers `rt-(N+1)`.
fn rotating() -> Answer {
    let valid = Arc::new(Mutex::new(std::collections::HashSet::from([
        "rt-alice-0".to_string()
    ])));
    Arc::new(move |form, n| {
        let mut v = valid.lock().unwrap();
        match form.get("grant_type").map(String::as_str) {
            Some("refresh_token") if v.remove(&form["refresh_token"]) => {
                let next = format!("rt-alice-{n}");
                v.insert(next.clone());
                (200, json!({"access_token": format!("at-{n}"), "token_type": "Bearer", "expires_in": 600, "refresh_token": next}).to_string())
            }
            Some("authorization_code")
                if form.get("code").map(String::as_str) == Some("the-code") =>
            {
                let next = format!("rt-alice-{n}");
                v.insert(next.clone());
                (200, json!({"access_token": format!("at-{n}"), "token_type": "Bearer", "expires_in": 600, "refresh_token": next}).to_string())
            }
            _ => (400, r#"{"error":"invalid_grant"}"#.into()),
        }
    })
}

#[tokio::test]
async fn per_user_connections_rotate_refresh_tokens_durably_before_use() {
    let fake = Fake::start(rotating()).await;
    let s = setup(&format!(
        "  - {{ name: crm, grant: refresh_token, token_url: \"{}\", client_id: app, client_secret: sec, client_auth: client_secret_post }}\n",
        fake.url
    ));
    let store = s
        .registry
        .shared
        .store()
        .and_then(Backend::file)
        .unwrap()
        .clone();
    let alice_id = per_user_connection_id(ISS, "alice");
    store
        .put("crm", &alice_id, &connected("rt-alice-0"))
        .unwrap();
    let p = policy(&s, bc("crm", Some("{jwt.sub}")));
    let alice = claims(json!({"iss": ISS, "sub": "alice"}));
    let bob = claims(json!({"iss": ISS, "sub": "bob"}));

    let h = p.header_for(&ctx(&alice, "a"), false).await.unwrap();
    assert_eq!(h.value, "Bearer at-1");
    let form = &fake.forms()[0];
    assert_eq!(
        (
            form["grant_type"].as_str(),
            form["refresh_token"].as_str(),
            form["client_id"].as_str(),
            form["client_secret"].as_str()
        ),
        ("refresh_token", "rt-alice-0", "app", "sec")
    );
    // The rotated refresh token is in the store, durably: a fresh open of the file sees it.
    assert_eq!(
        store
            .get("crm", &alice_id)
            .unwrap()
            .refresh_token
            .as_deref(),
        Some("rt-alice-1")
    );

    // Bob never consented: 403 consent required, and nothing was asked of the provider.
    let e = p.header_for(&ctx(&bob, "b"), false).await.unwrap_err();
    assert_eq!(
        (e.denial.reason, e.denial.status),
        (Reason::BackendCredentialConsentRequired, 403)
    );
    let e = p
        .header_for(&ctx(&claims(json!({"name": "no sub"})), "c"), false)
        .await
        .unwrap_err();
    assert_eq!(e.denial.reason, Reason::BackendCredentialConsentRequired);
    assert_eq!(fake.forms().len(), 1);

    // Expired: one refresh for 20 concurrent requests (a rotated token must never be spent twice).
    s.clock.advance(Duration::from_secs(601));
    let vs = futures::future::join_all(
        (0..20).map(|_| async { p.header_for(&ctx(&alice, "a"), false).await.unwrap().value }),
    )
    .await;
    assert!(vs.iter().all(|v| v == "Bearer at-2"), "{vs:?}");
    assert_eq!(fake.forms().len(), 2);
    assert_eq!(
        store
            .get("crm", &alice_id)
            .unwrap()
            .refresh_token
            .as_deref(),
        Some("rt-alice-2")
    );

    // The provider revokes the grant: the connection needs consent again (403 for its user).
    store
        .put("crm", &alice_id, &connected("rt-revoked"))
        .unwrap();
    s.clock.advance(Duration::from_secs(601));
    let e = p.header_for(&ctx(&alice, "a"), false).await.unwrap_err();
    assert_eq!(e.denial.reason, Reason::BackendCredentialConsentRequired);
    let rec = store.get("crm", &alice_id).unwrap();
    assert_eq!(rec.state, ConnectionState::NeedsConsent);
    assert!(rec.error.unwrap().contains("invalid_grant"));
    let listed = s.registry.admin_connections("crm", None).await.unwrap();
    assert_eq!(listed["connections"][0]["state"], "needs_consent");
    assert!(
        !listed.to_string().contains("rt-"),
        "no refresh token in admin answers"
    );
}

#[tokio::test]
async fn consent_redeems_the_code_with_pkce_and_state_is_single_use() {
    let fake = Fake::start(rotating()).await;
    let s = setup(&format!(
        "  - {{ name: crm, grant: refresh_token, token_url: \"{}\", authorize_url: \"http://127.0.0.1:1/auth?tenant=t1\", redirect_uri: \"http://127.0.0.1:2/admin/callback\", client_id: app, client_secret: sec, scope: openid offline_access, resource: api://crm }}\n",
        fake.url
    ));
    let p = policy(&s, bc("crm", Some("shared")));
    let e = p.header_for(&Context::default(), false).await.unwrap_err();
    assert_eq!(
        e.denial.reason,
        Reason::BackendCredentialUnavailable,
        "a shared connection without consent is the operator's problem: 503"
    );
    assert!(
        e.detail.contains("connection `shared` needs consent"),
        "{}",
        e.detail
    );

    let started = s
        .registry
        .start_consent("crm", "shared", None, None)
        .await
        .unwrap();
    let login = url::Url::parse(started["login_url"].as_str().unwrap()).unwrap();
    let q: HashMap<String, String> = login.query_pairs().into_owned().collect();
    assert_eq!(login.path(), "/auth");
    assert_eq!(
        q["tenant"], "t1",
        "the authorize URL's own parameters are kept"
    );
    assert_eq!(
        (
            q["response_type"].as_str(),
            q["client_id"].as_str(),
            q["code_challenge_method"].as_str()
        ),
        ("code", "app", "S256")
    );
    assert_eq!(
        (
            q["scope"].as_str(),
            q["resource"].as_str(),
            q["redirect_uri"].as_str()
        ),
        (
            "openid offline_access",
            "api://crm",
            "http://127.0.0.1:2/admin/callback"
        )
    );
    assert!(q["state"].len() >= 43);

    // A wrong state does nothing.
    assert!(
        s.registry
            .complete_consent(Some("forged"), Some("the-code"), None)
            .await
            .is_err()
    );
    let done = s
        .registry
        .complete_consent(Some(&q["state"]), Some("the-code"), None)
        .await
        .unwrap();
    assert_eq!(
        (done.credential.as_str(), done.connection.as_str()),
        ("crm", "shared")
    );
    let form = &fake.forms()[0];
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(form["redirect_uri"], "http://127.0.0.1:2/admin/callback");
    use base64::Engine;
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(form["code_verifier"].as_bytes()));
    assert_eq!(
        challenge, q["code_challenge"],
        "the verifier matches the challenge"
    );
    use sha2::Digest;

    // Connected: served from the token the code gave, no extra request.
    assert_eq!(
        p.header_for(&Context::default(), false)
            .await
            .unwrap()
            .value,
        "Bearer at-1"
    );
    assert_eq!(fake.forms().len(), 1);
    // The state was single-use.
    let again = s
        .registry
        .complete_consent(Some(&q["state"]), Some("the-code"), None)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("unknown or expired"));

    // A login URL expires after 10 minutes.
    let late = s
        .registry
        .start_consent("crm", "other", None, None)
        .await
        .unwrap();
    let state: String = url::Url::parse(late["login_url"].as_str().unwrap())
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    s.clock.advance(Duration::from_secs(601));
    assert!(
        s.registry
            .complete_consent(Some(&state), Some("the-code"), None)
            .await
            .is_err()
    );

    // Listing and deleting.
    let creds = s.registry.admin_credentials().await;
    assert_eq!(creds["credentials"][0]["grant"], "refresh_token");
    s.registry.delete_connection("crm", "shared").await.unwrap();
    assert!(matches!(
        s.registry.delete_connection("crm", "shared").await,
        Err(AdminError::NotFound(_))
    ));
    let e = p.header_for(&Context::default(), false).await.unwrap_err();
    assert!(e.detail.contains("needs consent"), "deleted: {}", e.detail);
    assert!(matches!(
        s.registry.start_consent("nope", "x", None, None).await,
        Err(AdminError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_configured_refresh_token_seeds_the_default_connection_once() {
    let fake = Fake::start(rotating()).await;
    let s = setup(&format!(
        "  - {{ name: crm, grant: refresh_token, token_url: \"{}\", client_id: app, client_secret: sec, refresh_token: rt-alice-0 }}\n",
        fake.url
    ));
    let p = policy(&s, bc("crm", None));
    assert_eq!(
        p.header_for(&Context::default(), false)
            .await
            .unwrap()
            .value,
        "Bearer at-1"
    );
    let store = s
        .registry
        .shared
        .store()
        .and_then(Backend::file)
        .unwrap()
        .clone();
    assert_eq!(
        store
            .get("crm", "default")
            .unwrap()
            .refresh_token
            .as_deref(),
        Some("rt-alice-1")
    );
    // Seeding again with the same configured value keeps the rotated token.
    for c in s.set.inner.by_name.values() {
        c.seed_configured_refresh_token().await;
    }
    assert_eq!(
        store
            .get("crm", "default")
            .unwrap()
            .refresh_token
            .as_deref(),
        Some("rt-alice-1")
    );
}

#[tokio::test]
async fn dry_run_fetches_nothing_and_shows_no_value() {
    let fake = Fake::start(rotating()).await;
    let s = setup(&format!(
        "  - {{ name: cc, grant: client_credentials, token_url: \"{}\", client_id: app, client_secret: sec }}\n",
        fake.url
    ));
    let p = policy(&s, bc("cc", None));
    let h = p.header_for(&Context::default(), true).await.unwrap();
    assert!(h.sensitive && h.value.is_empty());
    assert!(fake.forms().is_empty());
}

#[test]
fn formats() {
    assert_eq!(
        parse_format("Bearer {token}").unwrap(),
        ("Bearer ".into(), String::new())
    );
    assert_eq!(
        parse_format("{{x}} {token};").unwrap(),
        ("{x} ".into(), ";".into())
    );
    assert!(parse_format("Bearer").is_err());
    assert!(parse_format("{token}{token}").is_err());
    assert!(parse_format("{jwt.sub}").is_err());
    assert!(parse_format("a}").is_err());
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let s = setup(
        "  - { name: st, grant: static, token: very-secret-token }\n  - { name: b, grant: basic, username: u, password: very-secret-pw }\n",
    );
    let dbg = format!("{:?} {:?}", s.set, s.registry);
    assert!(!dbg.contains("very-secret"), "{dbg}");
}

#[test]
fn per_user_ids_are_namespaced_apart_from_fixed_ids() {
    let id = per_user_connection_id(ISS, "alice");
    assert!(id.starts_with("user:") && id.len() == 48, "{id}");
    assert_eq!(id, per_user_connection_id(ISS, "alice"), "deterministic");
    assert!(spec::is_per_user_connection_id(&id) && spec::valid_connection_id(&id));
    assert!(!spec::valid_fixed_connection_id(&id));
    // Length prefixes: moving characters between issuer and subject changes the id.
    assert_ne!(
        per_user_connection_id("https://a", "bc"),
        per_user_connection_id("https://ab", "c")
    );
    assert_ne!(
        per_user_connection_id(ISS, "alice"),
        per_user_connection_id("https://idp.test/partner", "alice")
    );
    // Every subject maps into the URL-safe namespace, however it is spelt.
    for sub in [
        "default",
        "a:b",
        "a/b",
        "%2F",
        "ünï©ødé",
        &"x".repeat(10_000),
        "",
    ] {
        let id = per_user_connection_id(ISS, sub);
        assert!(spec::is_per_user_connection_id(&id), "{sub:?} -> {id}");
        assert!(!spec::valid_fixed_connection_id(&id));
    }
    for fixed in ["default", "shared", "user", "user.x", "a-b_c.d"] {
        assert!(spec::valid_fixed_connection_id(fixed) && !spec::is_per_user_connection_id(fixed));
    }
    for bad in [
        "",
        "user:short",
        "a b",
        "a/b",
        "a:b",
        &"x".repeat(129),
        "user:ü",
    ] {
        assert!(!spec::valid_connection_id(bad), "{bad:?}");
    }
}

proptest::proptest! {
    /// No string is both a fixed id and a per-user id: a caller can never be routed to a fixed
    /// connection, nor an operator's fixed id to a user's.
    #[test]
    fn no_id_is_both_fixed_and_per_user(s in "(user:)?[A-Za-z0-9._:/%-]{0,50}") {
        proptest::prop_assert!(!(spec::valid_fixed_connection_id(&s) && spec::is_per_user_connection_id(&s)));
    }

    #[test]
    fn distinct_users_get_distinct_ids(a in ".{0,20}", b in ".{0,20}", c in ".{0,20}", d in ".{0,20}") {
        proptest::prop_assume!((&a, &b) != (&c, &d));
        proptest::prop_assert_ne!(per_user_connection_id(&a, &b), per_user_connection_id(&c, &d));
    }
}

fn refresh_answer() -> Answer {
    // The access token names the refresh token it came from.
    Arc::new(|form, _n| {
        match form.get("grant_type").map(String::as_str) {
        Some("refresh_token") => (
            200,
            json!({"access_token": format!("at({})", form["refresh_token"]), "token_type": "Bearer", "expires_in": 600}).to_string(),
        ),
        Some("authorization_code") => (
            200,
            json!({"access_token": format!("at(rt-{})", form["code"]), "refresh_token": format!("rt-{}", form["code"]), "token_type": "Bearer", "expires_in": 600}).to_string(),
        ),
        _ => (400, r#"{"error":"invalid_grant"}"#.into()),
    }
    })
}

#[tokio::test]
async fn a_caller_never_reaches_a_fixed_connection_or_another_issuers_user() {
    let fake = Fake::start(refresh_answer()).await;
    let s = setup(&format!(
        "  - {{ name: crm, grant: refresh_token, token_url: \"{}\", client_id: app, client_secret: sec }}\n",
        fake.url
    ));
    let store = s
        .registry
        .shared
        .store()
        .and_then(Backend::file)
        .unwrap()
        .clone();
    store
        .put("crm", "default", &connected("rt-operator"))
        .unwrap();
    store.put("crm", "shared", &connected("rt-shared")).unwrap();
    store
        .put(
            "crm",
            &per_user_connection_id(ISS, "alice"),
            &connected("rt-corp-alice"),
        )
        .unwrap();
    let p = policy(&s, bc("crm", Some("{jwt.sub}")));
    let call = |c: serde_json::Value| {
        let p = &p;
        async move {
            let c = claims(c);
            p.header_for(&ctx(&c, "t"), false)
                .await
                .map(|h| h.value)
                .map_err(|e| (e.denial.reason, e.detail))
        }
    };
    assert_eq!(
        call(json!({"iss": ISS, "sub": "alice"})).await.unwrap(),
        "Bearer at(rt-corp-alice)"
    );
    for c in [
        json!({"iss": ISS, "sub": "default"}),
        json!({"iss": ISS, "sub": "shared"}),
        json!({"iss": "https://idp.test/partner", "sub": "alice"}),
    ] {
        let (reason, detail) = call(c.clone()).await.unwrap_err();
        assert_eq!(reason, Reason::BackendCredentialConsentRequired, "{c}");
        assert!(detail.contains("connection `user:"), "{c}: {detail}");
    }
    let (reason, detail) = call(json!({"sub": "alice"})).await.unwrap_err();
    assert_eq!(reason, Reason::BackendCredentialConsentRequired);
    assert!(detail.contains("no `iss`"), "{detail}");
    let (reason, detail) = call(json!({"iss": ISS})).await.unwrap_err();
    assert_eq!(reason, Reason::BackendCredentialConsentRequired);
    assert!(detail.contains("no claim naming a connection"), "{detail}");
    let (_, detail) = call(json!({"iss": ISS, "sub": ""})).await.unwrap_err();
    assert!(detail.contains("no claim naming a connection"), "{detail}");
    // Only alice's refresh token was ever sent.
    let sent: Vec<_> = fake
        .forms()
        .iter()
        .map(|f| f["refresh_token"].clone())
        .collect();
    assert_eq!(sent, ["rt-corp-alice"]);
}

#[tokio::test]
async fn consent_for_a_user_records_whose_connection_it_is() {
    let fake = Fake::start(refresh_answer()).await;
    let s = setup(&format!(
        "  - {{ name: crm, grant: refresh_token, token_url: \"{}\", authorize_url: \"http://127.0.0.1:1/auth\", redirect_uri: \"http://127.0.0.1:2/admin/callback\", client_id: app, client_secret: sec }}\n",
        fake.url
    ));
    let user = |i: &str, sub: &str| ConnectionUser {
        issuer: i.into(),
        subject: sub.into(),
    };
    let bob = user(ISS, "bob:ünï/%");
    let id = bob.connection_id();

    // The operator looks the user's id up before it exists.
    let looked = s
        .registry
        .admin_connections("crm", Some(&bob))
        .await
        .unwrap();
    assert_eq!(looked["id"], json!(id));
    assert_eq!(looked["connections"], json!([]));

    // A per-user id needs its user, the right one; a fixed id takes none; old-style ids are refused.
    let bad = |r: Result<serde_json::Value, AdminError>| match r {
        Err(AdminError::BadRequest(m)) => m,
        other => panic!("expected 400, got {other:?}"),
    };
    assert!(bad(s.registry.start_consent("crm", &id, None, None).await).contains("names its user"));
    assert!(
        bad(s
            .registry
            .start_consent("crm", &id, None, Some(user("https://other", "bob:ünï/%")))
            .await)
        .contains("is not the connection")
    );
    assert!(
        bad(s
            .registry
            .start_consent("crm", "shared", None, Some(bob.clone()))
            .await)
        .contains("fixed")
    );
    assert!(
        bad(s.registry.start_consent("crm", "bob:ünï", None, None).await).contains("connection id")
    );

    let started = s
        .registry
        .start_consent("crm", &id, None, Some(bob.clone()))
        .await
        .unwrap();
    let state: String = url::Url::parse(started["login_url"].as_str().unwrap())
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let done = s
        .registry
        .complete_consent(Some(&state), Some("bob"), None)
        .await
        .unwrap();
    assert_eq!(done.connection, id);
    let listed = s.registry.admin_connections("crm", None).await.unwrap();
    let entry = &listed["connections"][0];
    assert_eq!(
        (
            &entry["id"],
            &entry["kind"],
            &entry["issuer"],
            &entry["subject"],
            &entry["state"]
        ),
        (
            &json!(id),
            &json!("per_user"),
            &json!(ISS),
            &json!("bob:ünï/%"),
            &json!("connected")
        )
    );
    // The caller whose token is that issuer and subject gets it.
    let p = policy(&s, bc("crm", Some("{jwt.sub}")));
    let c = claims(json!({"iss": ISS, "sub": "bob:ünï/%"}));
    assert_eq!(
        p.header_for(&ctx(&c, "t"), false).await.unwrap().value,
        "Bearer at(rt-bob)"
    );
    // Deleted by the same id.
    s.registry.delete_connection("crm", &id).await.unwrap();
    assert!(matches!(
        s.registry.delete_connection("crm", "a b").await,
        Err(AdminError::BadRequest(_))
    ));
}

#[test]
fn connection_settings_that_cannot_be_keyed_safely_are_config_errors() {
    let s = setup(
        "  - { name: crm, grant: refresh_token, token_url: \"http://127.0.0.1:1/t\", client_id: app, client_secret: sec }\n",
    );
    for (connection, needle) in [
        ("{subscription.id}", "use a {jwt.*} claim"),
        ("{cert.thumbprint}", "use a {jwt.*} claim"),
        ("my connection", "a fixed connection id is 1 to 128"),
        ("user:abc", "a fixed connection id is 1 to 128"),
        ("a/b", "a fixed connection id is 1 to 128"),
    ] {
        let mut errs = ConfigErrors::default();
        let p = compile_backend_credential(
            &bc("crm", Some(connection)),
            "apis[0].on_allow.backend_credential",
            true,
            &s.set,
            &mut errs,
        );
        assert!(p.is_none(), "{connection}");
        let text = errs.to_string();
        assert!(
            text.contains("apis[0].on_allow.backend_credential.connection")
                && text.contains(needle),
            "{connection}: {text}"
        );
    }
}

/// Starts a registry on a legacy store holding `ids` of `crm`, with an API using `connection`.
async fn start_on_legacy(
    ids: &[&str],
    connection: &str,
) -> (Registry, Result<(), StoreError>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    {
        let s = Store::open(
            &dir.path().join("store.db"),
            &store::decode_key(key).unwrap(),
        )
        .unwrap();
        for id in ids {
            s.put("crm", id, &connected("rt")).unwrap();
        }
        s.forget_connection_id_marker();
    }
    let text = "store: { path: store.db, key: \"${env:K}\" }\ncredentials:\n  - { name: crm, grant: refresh_token, token_url: \"http://127.0.0.1:1/t\", client_id: a, client_secret: b }\n";
    let src =
        config::parse_with_env(text, dir.path(), &|n| (n == "K").then(|| key.to_string())).unwrap();
    let registry = Registry::default();
    let mut errs = ConfigErrors::default();
    let set = compile_credentials(&src, &registry, &mut errs);
    // The API's `on_allow.backend_credential`, as an API with a `jwt` section writes it.
    let cfg = config::BackendCredential {
        name: "crm".into(),
        header: None,
        format: None,
        connection: Some(connection.into()),
    };
    let used = compile_backend_credential(
        &cfg,
        "apis[0].on_allow.backend_credential",
        true,
        &set,
        &mut errs,
    );
    assert!(errs.is_empty(), "{errs}");
    registry.publish(&set);
    let started = registry.start(used.as_ref()).await;
    (registry, started, dir)
}

#[tokio::test]
async fn a_legacy_store_is_upgraded_only_when_unambiguous() {
    // Only `default` and the fixed ids the config names: upgraded in place.
    let (registry, started, _d) = start_on_legacy(&["default", "shared"], "shared").await;
    started.unwrap();
    let store = registry.shared.store().and_then(Backend::file).unwrap();
    assert!(!store.has_legacy_connection_ids(), "marked upgraded");
    assert_eq!(store.ids().len(), 2, "every record kept");

    // Used per user, `alice` may be a user's bare `sub` (of no known issuer): refused, named.
    let (registry, started, _d) = start_on_legacy(&["default", "alice"], "{jwt.sub}").await;
    let err = started.unwrap_err();
    assert!(
        matches!(&err, StoreError::LegacyConnections { credential, count: 1, .. } if credential == "crm"),
        "{err}"
    );
    assert!(err.to_string().contains("(`alice`)"), "{err}");
    assert!(registry.shared.store().is_none(), "not opened");

    // An id no fixed connection can have is refused whatever the config (it could pose as a
    // per-user id, or be unreachable garbage).
    let (_, started, _d) = start_on_legacy(
        &["user:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"],
        "shared",
    )
    .await;
    assert!(matches!(started, Err(StoreError::LegacyConnections { .. })));
    let (_, started, _d) = start_on_legacy(&["a b", "c", "d", "e", "f", "g"], "{jwt.sub}").await;
    let err = started.unwrap_err().to_string();
    assert!(
        err.contains("6 connection(s)") && err.contains("..."),
        "{err}"
    );
}

/// Without waiting ([`Io::Never`]), a lookup uses only a cached token: before one is cached it says
/// so and fetches nothing, counts nothing; once cached, it answers at once.
#[tokio::test]
async fn a_lookup_that_may_not_wait_uses_only_cached_tokens() {
    let fake = Fake::start(Arc::new(|_f, n| {
        (
            200,
            json!({"access_token": format!("cc-{n}"), "token_type": "Bearer", "expires_in": 3600})
                .to_string(),
        )
    }))
    .await;
    let s = setup(&format!(
        "  - {{ name: cc, grant: client_credentials, token_url: \"{}\", client_id: svc, client_secret: sec }}\n  - {{ name: obo, grant: token_exchange, token_url: \"{}\", client_id: svc, client_secret: sec, audience: api://inventory }}\n",
        fake.url, fake.url
    ));
    let exp = crate::credentials::clock::unix_secs(t0()) + 300;
    let alice = claims(json!({"sub": "alice", "exp": exp}));
    for name in ["cc", "obo"] {
        let p = policy(&s, bc(name, None));
        let c = ctx(&alice, "alice.jwt.token");
        let before = fake.forms().len();
        assert_eq!(
            p.header_with(&c, false, Io::Never).await.unwrap(),
            None,
            "{name}: nothing cached"
        );
        assert_eq!(fake.forms().len(), before, "{name}: nothing fetched");
        assert!(
            s.registry
                .token_cache_requests()
                .iter()
                .all(|(n, _, count)| n != name || *count == 0),
            "{name}: nothing counted"
        );
        let waited = p.header_for(&c, false).await.unwrap();
        let now = p.header_with(&c, false, Io::Never).await.unwrap();
        assert_eq!(
            now.as_ref().map(|h| &h.value),
            Some(&waited.value),
            "{name}"
        );
        assert_eq!(fake.forms().len(), before + 1, "{name}: one fetch in all");
    }
}
