//! Backend-credential connection ids that collide: a caller whose token names a connection id
//! that is also an operator's fixed connection, or another identity provider's user.

#[path = "../jwt_common/mod.rs"]
mod keys;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use portcullis::config;
use portcullis::credentials::{ConnectionRecord, Registry, Store};
use portcullis::policy::{self, Outcome, PolicySet, Runtime};

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
                        form_urlencoded::parse(body.as_bytes()).into_owned().collect();
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
        let store = Store::open(&self.db(), &portcullis::credentials::store::decode_key(KEY).unwrap())
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
        let rt = Runtime {
            credentials: Registry::default(),
            ..Runtime::default()
        };
        let src = config::parse(&self.yaml(), self.dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let policy = policy::compile(&src, &rt).unwrap_or_else(|e| panic!("{e}")).0;
        rt.credentials.start(&policy).await.unwrap_or_else(|e| panic!("{e}"));
        (policy, rt)
    }
}

/// The injected `authorization` upstream, or "status reason".
async fn decide(policy: &PolicySet, token: &str) -> Result<String, String> {
    let d = crate::common::decide_bearer(policy, token, std::time::SystemTime::now()).await;
    match &d.outcome {
        Outcome::Allow => Ok(d
            .upstream_headers
            .iter()
            .find(|h| h.name == "authorization")
            .expect("an injected authorization header")
            .value
            .clone()),
        Outcome::Deny(den) => {
            assert!(d.upstream_headers.is_empty(), "a deny sends nothing upstream");
            Err(format!("{} {}", den.status, den.reason.as_str()))
        }
    }
}

#[tokio::test]
async fn a_caller_named_like_a_fixed_connection_never_gets_it() {
    let h = Harness::start().await;
    h.seed("shared", "rt-operator-shared");
    let (policy, _rt) = h.start_runtime().await;
    for sub in ["default", "shared"] {
        let token = h.corp.token(keys::claims(CORP, "api://crm", sub));
        assert_eq!(
            decide(&policy, &token).await,
            Err("403 BackendCredentialConsentRequired".to_string()),
            "sub `{sub}` must not be served the operator's `{sub}` connection"
        );
    }
}
