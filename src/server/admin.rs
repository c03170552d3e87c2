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
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;

use super::State;
use crate::credentials::{AdminError, ConnectionUser};

/// The routes, to be nested under `/admin`.
pub fn router() -> Router<Arc<State>> {
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

fn error(e: &AdminError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    json(status, &serde_json::json!({"error": e.to_string()}))
}

/// Checks the bearer token against the configured digest, in constant time; the refusal to send
/// when it does not match.
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

async fn list_credentials(AxState(state): AxState<Arc<State>>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse(&state, &headers) {
        return r;
    }
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
    headers: HeaderMap,
    Path(name): Path<String>,
    query: Result<Query<UserQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(r) = refuse(&state, &headers) {
        return r;
    }
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
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Some(r) = refuse(&state, &headers) {
        return r;
    }
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
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    if let Some(r) = refuse(&state, &headers) {
        return r;
    }
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
