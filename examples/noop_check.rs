//! The bare transport: an ext_authz Check server that decodes the request and answers OK with one
//! header, nothing else. The load harness's lowest baseline (`loadtest/load.sh`, scenario
//! `grpc noop`): portcullis's own numbers are ratios against it, so what the transport costs and
//! what portcullis adds are told apart. Built with the same protos, runtime and release profile
//! as portcullis (`cargo build --release --example noop_check`); not a product.
//!
//! With `--inline`, the same service is served the way portcullis serves its gRPC listener
//! (hyper with each connection's streams run inside the connection's task,
//! `portcullis::server::inline`): the scenario `grpc noop inline`, which tells what that transport
//! saves apart from what portcullis adds.
//!
//! Usage: `noop_check 127.0.0.1:PORT [--inline]` (prints `listening ADDR` when ready).

use portcullis::proto::auth::authorization_server::{Authorization, AuthorizationServer};
use portcullis::proto::auth::{CheckRequest, CheckResponse, OkHttpResponse, check_response};
use portcullis::proto::core::{HeaderValue, HeaderValueOption};
use portcullis::proto::google::rpc;
use tonic::{Request, Response, Status};

struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // Decoded by tonic already; touch it so nothing is optimised away.
        let id = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map_or(0, |h| h.headers.len());
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status {
                code: 0,
                message: String::new(),
                details: vec![],
            }),
            http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "x-noop".into(),
                        value: id.to_string(),
                        raw_value: Default::default(),
                    }),
                    append: Some(false),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            dynamic_metadata: None,
        }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .ok_or("usage: noop_check 127.0.0.1:PORT [--inline]")?
        .parse()?;
    let inline = match std::env::args().nth(2).as_deref() {
        None => false,
        Some("--inline") => true,
        Some(other) => return Err(format!("unknown argument {other}").into()),
    };
    // The same runtime portcullis serves on (`cli::runtime`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening {}", listener.local_addr()?);
        // As portcullis does (server/listener.rs): TCP_NODELAY on every accepted connection, or a
        // response written in two pieces waits for the client's delayed ACK.
        use tokio_stream::StreamExt as _;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
            s
        });
        if inline {
            let routes = tonic::service::Routes::new(AuthorizationServer::new(Noop)).prepare();
            let mut incoming = std::pin::pin!(incoming);
            while let Some(Ok(tcp)) = incoming.next().await {
                let routes = routes.clone();
                tokio::spawn(async move {
                    let streams = portcullis::server::inline::InlineStreams::default();
                    let mut b = hyper::server::conn::http2::Builder::new(streams.clone());
                    b.timer(hyper_util::rt::TokioTimer::new());
                    let svc = hyper_util::service::TowerToHyperService::new(routes);
                    let conn = b.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                    let _ = portcullis::server::inline::Driven::new(conn, streams).await;
                });
            }
            return Ok(());
        }
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Noop))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
