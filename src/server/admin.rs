//! The admin API under `/admin` on the HTTP listener (only when `admin.token` is configured): the
//! credential manager's management side. Every endpoint but the OAuth callback needs
//! `Authorization: Bearer <admin.token>`; the callback is bound to a pending consent's `state`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::digest::Sha256;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;

use super::State;
use crate::credentials::{AdminError, ConnectionUser};
use crate::policy::runtime_keys::{Action, SubState, SubscriptionError, View, Which};

/// The routes, to be nested under `/admin`: every one behind the admin token but the OAuth callback.
pub fn router(state: Arc<State>) -> Router<Arc<State>> {
    Router::new()
        .route("/credentials", get(list_credentials))
        .route("/credentials/{name}/connections", get(list_connections))
        .route(
            "/credentials/{name}/connections/{id}/consent",
            post(start_consent),
        )
        .route(
            "/credentials/{name}/connections/{id}",
            axum::routing::delete(delete_connection),
        )
        .route(
            "/subscriptions",
            get(list_subscriptions).post(create_subscription),
        )
        .route(
            "/subscriptions/{id}",
            get(get_subscription).delete(delete_subscription),
        )
        .route(
            "/subscriptions/{id}/{action}",
            post(transition_subscription),
        )
        .route(
            "/subscriptions/{id}/regenerate/{which}",
            post(regenerate_subscription),
        )
        // A route layer: a path that matches no route stays a plain 404, token or not.
        .route_layer(middleware::from_fn_with_state(state, authenticated))
        .route("/callback", get(callback))
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        v.to_string(),
    )
        .into_response()
}

/// An error the admin API answers with its status and `{"error": message}`.
trait Problem: std::fmt::Display {
    fn status(&self) -> u16;
}

impl Problem for AdminError {
    fn status(&self) -> u16 {
        AdminError::status(self)
    }
}

impl Problem for SubscriptionError {
    fn status(&self) -> u16 {
        SubscriptionError::status(self)
    }
}

fn error(e: &impl Problem) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    json(status, &serde_json::json!({"error": e.to_string()}))
}

/// Lets the request through to its handler only with the admin token (checked against the
/// configured digest, in constant time).
async fn authenticated(
    AxState(state): AxState<Arc<State>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    match refuse(&state, request.headers()) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

/// The refusal to send when the bearer token does not match.
fn refuse(state: &State, headers: &HeaderMap) -> Option<Response> {
    let Some(expected) = state.settings.admin_token_sha256 else {
        return Some(StatusCode::NOT_FOUND.into_response());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok = presented.is_some_and(|t| {
        let digest: [u8; 32] = Sha256::digest(t.as_bytes());
        bool::from(digest.ct_eq(&expected))
    });
    if ok {
        None
    } else {
        let mut r = json(
            StatusCode::UNAUTHORIZED,
            &serde_json::json!({"error": "the admin API needs `Authorization: Bearer <admin.token>`"}),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
        );
        Some(r)
    }
}

async fn list_credentials(AxState(state): AxState<Arc<State>>) -> Response {
    json(
        StatusCode::OK,
        &state.runtime.credentials.admin_credentials().await,
    )
}

/// `issuer` and `subject` together name a user (both or neither).
fn user(
    issuer: Option<String>,
    subject: Option<String>,
) -> Result<Option<ConnectionUser>, AdminError> {
    match (issuer, subject) {
        (None, None) => Ok(None),
        (Some(issuer), Some(subject)) if !issuer.is_empty() && !subject.is_empty() => {
            Ok(Some(ConnectionUser { issuer, subject }))
        }
        _ => Err(AdminError::BadRequest(
            "a user is named by a non-empty `issuer` and `subject`, both".into(),
        )),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UserQuery {
    issuer: Option<String>,
    subject: Option<String>,
}

async fn list_connections(
    AxState(state): AxState<Arc<State>>,
    Path(name): Path<String>,
    query: Result<Query<UserQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(&AdminError::BadRequest(e.body_text())),
    };
    let who = match user(q.issuer, q.subject) {
        Ok(u) => u,
        Err(e) => return error(&e),
    };
    match state
        .runtime
        .credentials
        .admin_connections(&name, who.as_ref())
        .await
    {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(&e),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsentBody {
    /// Where the callback sends the browser once connected (APIM's post-redirect URL).
    redirect_after: Option<String>,
    /// A per-user connection's user: the `iss` of their tokens...
    issuer: Option<String>,
    /// ...and their subject (what the API's `connection` template renders, e.g. `sub`).
    subject: Option<String>,
}

async fn start_consent(
    AxState(state): AxState<Arc<State>>,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let body: ConsentBody = if body.iter().all(u8::is_ascii_whitespace) {
        ConsentBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(&AdminError::BadRequest(format!(
                    "the body must be JSON like {{\"redirect_after\": \"https://...\"}}: {e}"
                )));
            }
        }
    };
    let who = match user(body.issuer, body.subject) {
        Ok(u) => u,
        Err(e) => return error(&e),
    };
    match state
        .runtime
        .credentials
        .start_consent(&name, &id, body.redirect_after, who)
        .await
    {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(&e),
    }
}

async fn delete_connection(
    AxState(state): AxState<Arc<State>>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    match state
        .runtime
        .credentials
        .delete_connection(&name, &id)
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}

/// The OAuth redirect target. Not authenticated (the provider sends the user's browser here), but
/// only a pending, unexpired, single-use `state` does anything.
async fn callback(
    AxState(state): AxState<Arc<State>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).map(String::as_str);
    match state
        .runtime
        .credentials
        .complete_consent(get("state"), get("code"), get("error"))
        .await
    {
        Ok(done) => match done.redirect_after {
            Some(url) => match header::HeaderValue::from_str(&url) {
                Ok(loc) => (StatusCode::SEE_OTHER, [(header::LOCATION, loc)]).into_response(),
                Err(_) => StatusCode::OK.into_response(),
            },
            None => json(
                StatusCode::OK,
                &serde_json::json!({"credential": done.credential, "connection": done.connection, "state": "connected"}),
            ),
        },
        Err(e) => error(&e),
    }
}

/// A subscription as shown: where it comes from, and never a key or a hash.
fn shown(v: &View) -> serde_json::Value {
    serde_json::json!({
        "id": v.id,
        "state": v.state,
        "scope": v.scope,
        "source": "runtime",
        "created_at": v.created_at,
        "updated_at": v.updated_at,
    })
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only ids after this one (pages).
    after: Option<String>,
    /// At most this many (default and maximum 1000).
    limit: Option<usize>,
}

/// Largest page of `GET /admin/subscriptions`.
const PAGE: usize = 1000;

async fn list_subscriptions(
    AxState(state): AxState<Arc<State>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(&SubscriptionError::BadRequest(e.body_text())),
    };
    let limit = q.limit.unwrap_or(PAGE).clamp(1, PAGE);
    let subs = &state.runtime.subscriptions;
    let page = subs.list(q.after.as_deref(), limit);
    let next = (page.len() == limit).then(|| page.last().map(|v| v.id.clone()));
    let policy = state.policy();
    let (configured, configured_keys) = policy.subscriptions().counts();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "subscriptions": page.iter().map(shown).collect::<Vec<_>>(),
            "next_after": next.flatten(),
            "runtime": subs.len(),
            "configured": configured,
            "configured_keys": configured_keys,
        }),
    )
}

async fn get_subscription(AxState(state): AxState<Arc<State>>, Path(id): Path<String>) -> Response {
    let policy = state.policy();
    let configured = policy.subscriptions().is_configured(&id);
    match state.runtime.subscriptions.get(&id) {
        Some(v) => {
            let mut body = shown(&v);
            // A configured subscription of the same id wins: this one's keys are refused.
            body["shadowed"] = configured.into();
            json(StatusCode::OK, &body)
        }
        None => match policy.subscriptions().configured_one(&id) {
            Some(l) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "id": &*l.id,
                    "state": if l.active { "active" } else { "inactive" },
                    "scope": l.scope,
                    "source": "config",
                }),
            ),
            None => error(&SubscriptionError::NotFound(id)),
        },
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    id: String,
    /// `all` (default), `product:NAME` or `api:NAME`.
    scope: Option<String>,
    /// `active` (default) or `suspended`.
    state: Option<String>,
}

async fn create_subscription(AxState(state): AxState<Arc<State>>, body: Bytes) -> Response {
    let body: CreateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(&SubscriptionError::BadRequest(format!(
                "the body must be JSON like {{\"id\": \"contoso\", \"scope\": \"product:gold\"}}: {e}"
            )));
        }
    };
    let sub_state = match body.state.as_deref() {
        None | Some("active") => SubState::Active,
        Some("suspended") => SubState::Suspended,
        Some(_) => {
            return error(&SubscriptionError::BadRequest(
                "`state` is `active` or `suspended`".into(),
            ));
        }
    };
    let policy = state.policy();
    let scope = body.scope.as_deref().unwrap_or("all");
    match state
        .runtime
        .subscriptions
        .create(&body.id, scope, sub_state, policy.subscriptions())
        .await
    {
        Ok((view, primary, secondary)) => {
            state.telemetry.audit("create", &view.id, None);
            let mut shown = shown(&view);
            // The only time these keys are ever shown: only their hashes are kept.
            shown["primary_key"] = primary.expose().into();
            shown["secondary_key"] = secondary.expose().into();
            json(StatusCode::CREATED, &shown)
        }
        Err(e) => error(&e),
    }
}

async fn transition_subscription(
    AxState(state): AxState<Arc<State>>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let Some(action) = Action::parse(&action) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match state.runtime.subscriptions.transition(&id, action).await {
        Ok(view) => {
            state.telemetry.audit(action.as_str(), &view.id, None);
            json(StatusCode::OK, &shown(&view))
        }
        Err(e) => error(&e),
    }
}

async fn regenerate_subscription(
    AxState(state): AxState<Arc<State>>,
    Path((id, which)): Path<(String, String)>,
) -> Response {
    let Some(which) = Which::parse(&which) else {
        return error(&SubscriptionError::BadRequest(
            "regenerate `primary` or `secondary`".into(),
        ));
    };
    match state.runtime.subscriptions.regenerate(&id, which).await {
        Ok((view, key)) => {
            state
                .telemetry
                .audit("regenerate", &view.id, Some(which.as_str()));
            let mut shown = shown(&view);
            // Shown once, here.
            shown[format!("{}_key", which.as_str())] = key.expose().into();
            json(StatusCode::OK, &shown)
        }
        Err(e) => error(&e),
    }
}

async fn delete_subscription(
    AxState(state): AxState<Arc<State>>,
    Path(id): Path<String>,
) -> Response {
    match state.runtime.subscriptions.delete(&id).await {
        Ok(()) => {
            state.telemetry.audit("delete", &id, None);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(&e),
    }
}
