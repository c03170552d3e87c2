//! The gRPC adapter: `CheckRequest` -> [`CheckInput`] -> [`Decision`] -> `CheckResponse`.
//! This file is the one place that maps a decision onto Envoy's ext_authz messages.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::policy::{
    CheckInput, Decision, Denial, EvalOptions, Headers, Outcome, Reason, RequestHeader,
};
use crate::proto::auth::authorization_server::Authorization;
use crate::proto::auth::{
    self, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse, attribute_context,
};
use crate::proto::core::{HeaderValue, HeaderValueOption, address};
use crate::proto::envoy::r#type::v3::HttpStatus;
use crate::proto::google::rpc;
use crate::telemetry::{HeadersCarrier, MetadataCarrier, Transport};

use super::State;

/// `envoy.service.auth.v3.Authorization`.
#[derive(Clone)]
pub struct AuthorizationService {
    state: Arc<State>,
}

impl AuthorizationService {
    /// A service deciding with the state's current policy.
    pub fn new(state: Arc<State>) -> Self {
        AuthorizationService { state }
    }
}

#[tonic::async_trait]
impl Authorization for AuthorizationService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // Shed load instead of queueing without bound: UNAVAILABLE lets the proxy apply its failure mode.
        let Some(_permit) = self.state.try_admit() else {
            self.state.telemetry.record_overloaded();
            return Err(Status::unavailable("portcullis is overloaded"));
        };
        let started = std::time::Instant::now();
        let (metadata, _, req) = request.into_parts();
        let policy = self.state.policy();
        let parts = input_parts(&req);
        let trace = match &parts {
            Ok(p) => self.state.telemetry.start_check(
                Transport::Grpc,
                &[
                    &MetadataCarrier(&metadata),
                    &HeadersCarrier(p.headers.as_ref()),
                ],
            ),
            Err(_) => self
                .state
                .telemetry
                .start_check(Transport::Grpc, &[&MetadataCarrier(&metadata)]),
        };
        let decision = match &parts {
            Ok(parts) => {
                let input = parts.input(&req);
                // Most checks have what they need at hand (cached keys, tokens, chains): decided
                // here, without the decision's future in this one, which stays small (tonic boxes
                // it per request: a large future is a large copy on every check). Only a check
                // that has to wait for a fetch runs the async path, in a box of its own.
                let opts = EvalOptions::default();
                let now = trace.span().in_scope(|| policy.decide_now(&input, opts));
                match now {
                    Some(d) => d,
                    None => {
                        Box::pin(policy.decide(&input, opts))
                            .instrument(trace.span().clone())
                            .await
                    }
                }
            }
            Err(detail) => policy.with_metadata(invalid_request(detail)),
        };
        self.state.record(&decision, started.elapsed(), &trace, || {
            let http = req.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
            policy.request_line(&http.method, &http.host, &http.path)
        });
        Ok(Response::new(to_check_response(decision)))
    }
}

/// Decides on a CheckRequest with `policy`, without admission control or telemetry: the whole
/// wire-to-wire path for fuzzing and for embedding portcullis in another server.
pub async fn decide(policy: &crate::policy::PolicySet, req: &CheckRequest) -> CheckResponse {
    decide_at(policy, req, std::time::SystemTime::now()).await
}

/// [`decide`] at a given time: every check that compares against a clock (token and certificate
/// lifetimes, cached chains) uses `now`.
pub async fn decide_at(
    policy: &crate::policy::PolicySet,
    req: &CheckRequest,
    now: std::time::SystemTime,
) -> CheckResponse {
    let opts = EvalOptions {
        now,
        explain: false,
    };
    let decision = match input_parts(req) {
        Ok(parts) => policy.decide(&parts.input(req), opts).await,
        Err(detail) => policy.with_metadata(invalid_request(detail)),
    };
    to_check_response(decision)
}

fn invalid_request(detail: &str) -> Decision {
    let mut d = Decision::new();
    d.outcome = Outcome::Deny(Denial::new(Reason::InvalidRequest).with_message(format!(
        "The authorization request is incomplete: {detail}."
    )));
    d
}

/// What the adapter computes before borrowing the request as a [`CheckInput`].
struct Parts<'r> {
    headers: Cow<'r, [RequestHeader]>,
    peer: Option<IpAddr>,
}

impl<'r> Parts<'r> {
    fn input(&'r self, req: &'r CheckRequest) -> CheckInput<'r> {
        // input_parts checked that these exist.
        let attrs = req.attributes.as_ref();
        let http = attrs
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let source = attrs.and_then(|a| a.source.as_ref());
        CheckInput {
            method: http.map_or("", |h| h.method.as_str()),
            host: http.map_or("", |h| h.host.as_str()),
            path: http.map_or("", |h| h.path.as_str()),
            scheme: http.map_or("", |h| h.scheme.as_str()),
            headers: &self.headers,
            peer: self.peer,
            peer_certificate: source.map_or("", |s| s.certificate.as_str()),
            context_extensions: attrs.map(|a| &a.context_extensions),
        }
    }
}

fn input_parts(req: &CheckRequest) -> Result<Parts<'_>, &'static str> {
    let attrs = req.attributes.as_ref().ok_or("no attributes")?;
    let http = attrs
        .request
        .as_ref()
        .and_then(|r| r.http.as_ref())
        .ok_or("no HTTP request attributes")?;
    if http.method.is_empty() || http.path.is_empty() {
        return Err("no method or path");
    }
    let headers = if http.headers.is_empty() && http.header_map.is_some() {
        // `encode_raw_headers: true`: headers arrive as a list with raw byte values.
        Cow::Owned(header_map_to_headers(http).into())
    } else {
        Cow::Borrowed(&http.headers[..])
    };
    let peer = attrs.source.as_ref().and_then(peer_ip);
    Ok(Parts { headers, peer })
}

fn header_map_to_headers(http: &attribute_context::HttpRequest) -> Headers {
    let headers = http.header_map.iter().flat_map(|m| m.headers.iter());
    Headers::folded(headers.map(|h| {
        let value = if h.raw_value.is_empty() {
            bytes::Bytes::copy_from_slice(h.value.as_bytes())
        } else {
            h.raw_value.clone()
        };
        RequestHeader::new(h.key.to_ascii_lowercase(), value)
    }))
}

fn peer_ip(peer: &attribute_context::Peer) -> Option<IpAddr> {
    match peer.address.as_ref()?.address.as_ref()? {
        address::Address::SocketAddress(sa) => sa.address.parse().ok(),
        _ => None,
    }
}

/// Maps a decision onto the wire, moving its strings into the response. Headers always carry
/// `append` explicitly (false = overwrite), because Envoy versions differ on the default (envoy#42857).
pub fn to_check_response(d: Decision) -> CheckResponse {
    let Decision {
        id,
        outcome,
        upstream_headers,
        remove_headers,
        remove_query,
        metadata,
        ..
    } = d;
    let dynamic_metadata =
        (!metadata.is_empty()).then(|| crate::proto::RawStruct(metadata.into_bytes()));
    match outcome {
        Outcome::Allow => CheckResponse {
            status: Some(rpc::Status {
                code: 0,
                message: String::new(),
                details: vec![],
            }),
            http_response: Some(auth::check_response::HttpResponse::OkResponse(
                OkHttpResponse {
                    headers: upstream_headers
                        .into_iter()
                        .map(|h| header(h.name, h.value))
                        .chain([header(crate::check::DECISION_ID_HEADER.into(), id)])
                        .collect(),
                    headers_to_remove: remove_headers,
                    query_parameters_to_remove: remove_query,
                    ..Default::default()
                },
            )),
            dynamic_metadata,
        },
        Outcome::Deny(denial) => {
            let body = denial.body(&id);
            let mut headers = Vec::with_capacity(3);
            headers.push(header("content-type".into(), "application/json".into()));
            headers.push(header(crate::check::DECISION_ID_HEADER.into(), id));
            if let Some(challenge) = denial.www_authenticate {
                headers.push(header("www-authenticate".into(), challenge));
            }
            CheckResponse {
                status: Some(rpc::Status {
                    code: denial.reason.grpc_code(),
                    message: denial.reason.as_str().to_string(),
                    details: vec![],
                }),
                http_response: Some(auth::check_response::HttpResponse::DeniedResponse(
                    DeniedHttpResponse {
                        status: Some(HttpStatus {
                            code: i32::from(denial.status),
                        }),
                        headers,
                        body,
                    },
                )),
                dynamic_metadata,
            }
        }
    }
}

fn header(key: String, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            raw_value: bytes::Bytes::new(),
        }),
        append: Some(false),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::DECISION_ID_HEADER;

    /// The adapter, not the policy, names the decision: exactly one id header on an allow and on a
    /// deny, carrying the decision's id.
    #[test]
    fn the_decision_id_header_is_added_once_by_the_transport() {
        let allow = super::super::allow_setting_x_user();
        let id = allow.id.clone();
        let Some(auth::check_response::HttpResponse::OkResponse(ok)) =
            to_check_response(allow).http_response
        else {
            panic!("an allow is an OkResponse")
        };
        let ids: Vec<&str> = ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .filter(|h| h.key == DECISION_ID_HEADER)
            .map(|h| h.value.as_str())
            .collect();
        assert_eq!(ids, [id.as_str()]);

        let mut deny = Decision::new();
        deny.outcome = Outcome::Deny(crate::check::Denial::new(
            crate::check::Reason::NoMatchingApi,
        ));
        let Some(auth::check_response::HttpResponse::DeniedResponse(denied)) =
            to_check_response(deny).http_response
        else {
            panic!("a deny is a DeniedResponse")
        };
        let count = denied
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .filter(|h| h.key == DECISION_ID_HEADER)
            .count();
        assert_eq!(count, 1);
    }
}
