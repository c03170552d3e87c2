//! The HTTP listener: `/healthz`, `/readyz`, `/metrics`, and forward-auth under `/authz/` for Envoy's
//! `http_service`, nginx `auth_request` and Traefik `forwardAuth`. This file is the one place that
//! maps a decision onto an HTTP response.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::State;
use super::listener::Tracked;
use crate::config::ConnectionLimits;
use crate::policy::canonical::ForwardAuthSource;
use crate::policy::{
    CheckInput, Decision, Denial, EvalOptions, Headers, Outcome, PolicySet, Reason, RequestHeader,
};
use crate::telemetry::{HeaderMapCarrier, Transport};

/// Serves the connections of `incoming` until `shutdown` resolves, then lets the open ones finish
/// their requests and close.
///
/// An accept loop of its own rather than `axum::serve`, which has no header read or idle timeout
/// and no connection cap: the deadlines and the cap live in [`super::listener`], the request head
/// size and the HTTP/2 settings here.
pub async fn serve<I>(
    state: Arc<State>,
    incoming: I,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) where
    I: futures::Stream<Item = std::io::Result<Tracked<TcpStream>>> + Send,
{
    let app = router(state.clone());
    let builder = Arc::new(connection_builder(&state.settings.connections));
    super::listener::serve_each(incoming, shutdown, move |conn, closing| {
        serve_connection(conn, app.clone(), builder.clone(), closing)
    })
    .await;
}

fn connection_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's own header read timeout also closes idle keep-alive connections after it; the
    // connection deadline (listener.rs) tells the two apart, so hyper's is off.
    b.http1()
        .header_read_timeout(None)
        // The read buffer bounds the request head (hyper answers 431 past it); hyper-util's
        // builder does not pass hyper's `max_header_size` on.
        .max_buf_size(limits.max_request_head_bytes.max(HYPER_MIN_BUF));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_header_list_size(u32::try_from(limits.max_request_head_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(super::listener::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(super::listener::MAX_LOCAL_ERROR_RESET_STREAMS);
    b
}

/// The smallest read buffer limit hyper accepts.
const HYPER_MIN_BUF: usize = 8192;

async fn serve_connection(
    conn: Tracked<TcpStream>,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    closing: tokio::sync::watch::Receiver<bool>,
) {
    let peer = conn.peer();
    let activity = conn.activity();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let guard = activity.begin();
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let resp = tower::ServiceExt::oneshot(app, req).await;
            drop(guard);
            resp
        }
    });
    let conn = builder.serve_connection(TokioIo::new(conn), service);
    let conn = std::pin::pin!(conn);
    super::listener::run_until_drained(conn, closing, |c| c.graceful_shutdown(), "http").await;
}

/// The HTTP routes.
pub fn router(state: Arc<State>) -> Router {
    // The admin API exists only when `admin.token` is configured; otherwise /admin is a plain 404.
    let admin = state.settings.admin_token_sha256.is_some();
    let routes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/authz", axum::routing::any(forward_auth))
        .route("/authz/", axum::routing::any(forward_auth))
        .route("/authz/{*rest}", axum::routing::any(forward_auth));
    let routes = if admin {
        routes.nest("/admin", super::admin::router(state.clone()))
    } else {
        routes
    };
    routes.with_state(state)
}

/// Ready once every identity provider in use has finished its first key fetch (successful or not):
/// a proxy that routes traffic here sooner would see 503s for the few hundred milliseconds of the
/// first fetch. A provider that is down does not hold readiness back beyond one attempt (bounded by
/// its `fetch_timeout`): its checks fail closed with IdentityProviderUnavailable meanwhile. The same
/// for the CRLs of `client_certificate.trust.crl_urls` (bounded by `crl_fetch_timeout`).
async fn readyz(AxState(state): AxState<Arc<State>>) -> Response {
    if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if !state.runtime.identity.first_fetch_attempted() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first key fetch of every identity provider\n",
        )
            .into_response()
    } else if !state.runtime.crl.first_fetch_attempted() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first fetch of every CRL URL\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(AxState(state): AxState<Arc<State>>) -> Response {
    let body = state.telemetry.prometheus_text();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

/// Headers that describe the hop to portcullis, not the original request.
const HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-connection",
    "content-length",
];

async fn forward_auth(
    AxState(state): AxState<Arc<State>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let Some(_permit) = state.try_admit() else {
        state.telemetry.record_overloaded();
        return (StatusCode::SERVICE_UNAVAILABLE, "overloaded\n").into_response();
    };
    let started = std::time::Instant::now();
    let (parts, _body) = req.into_parts();
    let trace = state
        .telemetry
        .start_check(Transport::Http, &[&HeaderMapCarrier(&parts.headers)]);
    let policy = state.policy();
    let decision = decide_forward_auth(&policy, &parts, peer.ip())
        .instrument(trace.span().clone())
        .await;
    state.record(&decision, started.elapsed(), &trace, || {
        let o = original_request(policy.forward_auth, &parts).ok()?;
        policy.request_line(o.method, o.host, &o.target)
    });
    to_http_response(&decision)
}

/// Decides on a forward-auth request (the request portcullis received, from `peer`), without
/// admission control or telemetry: the whole HTTP path for fuzzing and embedding.
///
/// Where the original request is read is `forward_auth.source` ([`ForwardAuthSource`]): the three
/// `X-Forwarded-Method`/`-Host`/`-Uri` headers (nginx, Traefik), or the request itself (Envoy's
/// `http_service`: its method, `Host`, and path after `/authz`). A header the source names is
/// authoritative: missing, empty, repeated or not visible ASCII is a 400, never a fall-back to a
/// header the client may have written. What is read then goes through the same canonicalisation as
/// a gRPC check.
pub async fn decide_forward_auth(
    policy: &PolicySet,
    parts: &axum::http::request::Parts,
    peer: IpAddr,
) -> Decision {
    let original = match original_request(policy.forward_auth, parts) {
        Ok(o) => o,
        Err((reason, detail)) => {
            let mut d = Decision::new();
            d.outcome =
                Outcome::Deny(Denial::new(reason).with_message(format!("Bad request: {detail}.")));
            return d;
        }
    };
    let headers = to_headers(&parts.headers);
    let input = CheckInput {
        method: original.method,
        host: original.host,
        path: &original.target,
        scheme: original.scheme,
        headers: &headers,
        peer: Some(peer),
        peer_certificate: "",
        context_extensions: None,
    };
    // As in the gRPC adapter: decided at once when nothing has to be fetched, so this future (boxed
    // per request by the router) stays small; only a check that waits runs the async path.
    let opts = EvalOptions::default();
    match policy.decide_now(&input, opts) {
        Some(d) => d,
        None => Box::pin(policy.decide(&input, opts)).await,
    }
}

/// The request a forward-auth call describes, as sent (canonicalised later, by the policy).
struct Original<'r> {
    method: &'r str,
    host: &'r str,
    target: Cow<'r, str>,
    /// `X-Forwarded-Proto` (`http` or `https`) with forwarded headers; "" when unknown. Only DPoP's
    /// `htu` reads it.
    scheme: &'static str,
}

/// `X-Forwarded-Proto`: "" when absent, else exactly one of `http`, `https` (any case). Anything
/// else (repeated, comma-joined by two proxies, another scheme) is refused (400) rather than
/// guessed: DPoP's `htu` is compared with it.
fn forwarded_proto(h: &axum::http::HeaderMap) -> Result<&'static str, (Reason, String)> {
    let mut all = h.get_all("x-forwarded-proto").iter();
    match (all.next().map(|v| v.as_bytes()), all.next()) {
        (None, _) => Ok(""),
        (Some(v), None) if v.eq_ignore_ascii_case(b"https") => Ok("https"),
        (Some(v), None) if v.eq_ignore_ascii_case(b"http") => Ok("http"),
        (Some(_), None) => Err((
            Reason::InvalidRequest,
            "`x-forwarded-proto` is neither `http` nor `https`".into(),
        )),
        (Some(_), Some(_)) => Err((
            Reason::InvalidRequest,
            "more than one `x-forwarded-proto` header".into(),
        )),
    }
}

const FORWARDED: [&str; 3] = ["x-forwarded-method", "x-forwarded-host", "x-forwarded-uri"];

fn original_request(
    source: ForwardAuthSource,
    parts: &axum::http::request::Parts,
) -> Result<Original<'_>, (Reason, String)> {
    let h = &parts.headers;
    let from_headers = match source {
        ForwardAuthSource::ForwardedHeaders => true,
        ForwardAuthSource::Request => false,
        ForwardAuthSource::Auto => FORWARDED.iter().any(|n| h.contains_key(*n)),
    };
    if from_headers {
        let [method, host, uri] = FORWARDED.map(|n| authoritative(h, n));
        let (method, host, uri) = (method?, host?, uri?);
        return Ok(Original {
            method,
            host,
            target: Cow::Borrowed(uri),
            scheme: forwarded_proto(h)?,
        });
    }
    let host = match h.get_all(axum::http::header::HOST).iter().count() {
        0 => "",
        1 => authoritative(h, "host")?,
        _ => return Err((Reason::InvalidRequest, "more than one `host` header".into())),
    };
    let own_target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let rest = own_target.strip_prefix("/authz").unwrap_or(own_target);
    let target = if rest.starts_with('/') {
        Cow::Borrowed(rest)
    } else {
        // `/authz` or `/authz?q`: the original path was `/`.
        Cow::Owned(format!("/{rest}"))
    };
    Ok(Original {
        method: parts.method.as_str(),
        host,
        target,
        scheme: "",
    })
}

/// The one value of a header the proxy sets, refused (400) when missing, empty, repeated or not
/// visible ASCII: nginx forwards `$request_uri` raw, and a fall-back would let the client's own
/// copy of another header decide.
fn authoritative<'h>(h: &'h HeaderMap, name: &str) -> Result<&'h str, (Reason, String)> {
    let reason = if name == "x-forwarded-uri" {
        Reason::RequestPathNotCanonical
    } else if name == "x-forwarded-host" || name == "host" {
        Reason::RequestHostNotCanonical
    } else {
        Reason::InvalidRequest
    };
    let mut values = h.get_all(name).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(if h.contains_key(name) {
            (reason, format!("more than one `{name}` header"))
        } else {
            (Reason::InvalidRequest, format!("no `{name}` header"))
        });
    };
    match std::str::from_utf8(v.as_bytes()) {
        Ok(s) if !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b)) => Ok(s),
        Ok("") => Err((reason, format!("the `{name}` header is empty"))),
        _ => Err((reason, format!("the `{name}` header is not visible ASCII"))),
    }
}

fn to_headers(h: &HeaderMap) -> Headers {
    Headers::folded(
        h.iter()
            .filter(|(name, _)| !HOP_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| {
                RequestHeader::new(
                    bytes::Bytes::copy_from_slice(name.as_str().as_bytes()),
                    bytes::Bytes::copy_from_slice(value.as_bytes()),
                )
            }),
    )
}

/// Maps a decision onto a forward-auth response: 200 with the headers to add upstream (and
/// `x-envoy-auth-headers-to-remove` for Envoy), or the deny status, headers and JSON body.
pub fn to_http_response(d: &Decision) -> Response {
    let mut resp = match &d.outcome {
        Outcome::Allow => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::OK;
            for h in &d.upstream_headers {
                insert(r.headers_mut(), &h.name, &h.value);
            }
            let mut remove: Vec<&str> = d.remove_headers.iter().map(String::as_str).collect();
            remove.sort_unstable();
            remove.dedup();
            if !remove.is_empty() {
                insert(
                    r.headers_mut(),
                    "x-envoy-auth-headers-to-remove",
                    &remove.join(", "),
                );
            }
            r
        }
        Outcome::Deny(denial) => {
            let mut r = Response::new(Body::from(denial.body(&d.id)));
            *r.status_mut() = StatusCode::from_u16(denial.status).unwrap_or(StatusCode::FORBIDDEN);
            insert(r.headers_mut(), "content-type", "application/json");
            if let Some(c) = &denial.www_authenticate {
                insert(r.headers_mut(), "www-authenticate", c);
            }
            r
        }
    };
    insert(resp.headers_mut(), crate::check::DECISION_ID_HEADER, &d.id);
    resp
}

fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(n, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::DECISION_ID_HEADER;

    #[test]
    fn a_forward_auth_allow_carries_one_decision_id() {
        let d = super::super::allow_setting_x_user();
        let resp = to_http_response(&d);
        let ids: Vec<_> = resp.headers().get_all(DECISION_ID_HEADER).iter().collect();
        assert_eq!(ids, [d.id.as_str()]);
    }
}
