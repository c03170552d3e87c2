//! The gRPC listener: HTTP/2 (over TLS when configured) on each accepted connection, serving the
//! Check service, `grpc.health.v1` and reflection, and a drain on shutdown.
//!
//! hyper serves tonic's generated services directly rather than through `tonic::transport::Server`
//! so that a connection's streams run inside the connection's task ([`super::inline`]): responses
//! decided together leave in one write. The HTTP/2 settings and limits are those the tonic builder
//! was given before.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::service::Routes;

use super::StartError;
use super::inline::{Driven, InlineStreams};
use super::listener::{self, Tracked};
use crate::config::{self, ConnectionLimits};

/// The path of the one method that carries the load; it skips the router.
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// What a connection serves: the Check service itself, and every service (Check included)
/// behind tonic's router.
#[derive(Clone)]
pub struct Services<C> {
    /// `AuthorizationServer`, called directly for [`CHECK_PATH`].
    pub check: C,
    /// All services, for every other path.
    pub routes: Routes,
}

/// Serves the connections of `incoming` until `shutdown` resolves, then lets the open ones finish
/// their checks and close (HTTP/2 GOAWAY).
pub async fn serve<I, C>(
    incoming: I,
    services: Services<C>,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    I: futures::Stream<Item = std::io::Result<Tracked<TcpStream>>> + Send,
    // `AuthorizationServer`, or a stand-in.
    C: tower::Service<
            hyper::Request<Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    listener::serve_each(incoming, shutdown, move |conn, closing| {
        let services = services.clone();
        let tls = tls.clone();
        async move {
            let activity = conn.activity();
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let guard = activity.begin();
                let services = services.clone();
                async move {
                    let response = if req.uri().path() == CHECK_PATH {
                        tower::ServiceExt::oneshot(services.check, req).await
                    } else {
                        tower::ServiceExt::oneshot(services.routes, req).await
                    };
                    drop(guard);
                    response
                }
            });
            match tls {
                None => drive(conn, service, &limits, closing).await,
                Some(acceptor) => {
                    // The connection's own deadline (listener.rs) bounds the handshake too; this
                    // bounds it where that deadline is longer.
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(conn));
                    match handshake.await {
                        Ok(Ok(tls)) => drive(tls, service, &limits, closing).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        }
    })
    .await;
}

/// Serves HTTP/2 on `io` until the client closes or, after `closing`, until its streams are done.
async fn drive<IO, S>(io: IO, service: S, limits: &ConnectionLimits, closing: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = tonic::body::Body> + Send + 'static,
    S::Future: Send + 'static,
{
    let streams = InlineStreams::default();
    let mut builder = hyper::server::conn::http2::Builder::new(streams.clone());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .max_header_list_size(listener::GRPC_MAX_HEADER_LIST_BYTES)
        .max_pending_accept_reset_streams(listener::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(listener::MAX_LOCAL_ERROR_RESET_STREAMS);
    let mut conn = Driven::new(builder.serve_connection(TokioIo::new(io), service), streams);
    listener::run_until_drained(Pin::new(&mut conn), closing, shut_down, "grpc").await;
}

/// A connection's graceful shutdown: GOAWAY, then its open checks finish.
fn shut_down<IO, S>(
    conn: Pin<&mut Driven<hyper::server::conn::http2::Connection<TokioIo<IO>, S, InlineStreams>>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = tonic::body::Body> + Send + 'static,
    S::Future: Send + 'static,
{
    conn.get_mut().conn().graceful_shutdown();
}

/// The gRPC listener's TLS: the server's certificate chain and key, and with a client CA, a
/// verified client certificate required on every connection. ALPN offers `h2` only.
pub fn load_tls(t: &config::TlsFiles) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let certs = read_pem_file(&t.cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&certs)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&t.cert_file, &e))?;
    if chain.is_empty() {
        return Err(StartError::Tls(format!(
            "{}: no certificate in it",
            t.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&read_pem_file(&t.key_file)?)
        .map_err(|e| pem_error(&t.key_file, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let builder = match &t.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read_pem_file(ca)?) {
                let cert = cert.map_err(|e| pem_error(ca, &e))?;
                roots
                    .add(cert)
                    .map_err(|e| StartError::Tls(format!("{}: {e}", ca.display())))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| StartError::Tls(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        StartError::Tls(match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{} is not the private key of the certificate in {}",
                t.key_file.display(),
                t.cert_file.display()
            ),
            e => format!(
                "{} and {}: {e}",
                t.cert_file.display(),
                t.key_file.display()
            ),
        })
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What is wrong with a PEM file, in words (the parser's own message shows byte arrays).
fn pem_error(p: &Path, e: &rustls::pki_types::pem::Error) -> StartError {
    use rustls::pki_types::pem::Error;
    let what = match e {
        Error::NoItemsFound => "no private key in it".to_owned(),
        Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_owned(),
        Error::Base64Decode(_) => "a PEM section is not valid base64".to_owned(),
        e => format!("not PEM ({e})"),
    };
    StartError::Tls(format!("{}: {what}", p.display()))
}

fn read_pem_file(p: &Path) -> Result<Vec<u8>, StartError> {
    let max = config::limits::MAX_PEM_FILE_BYTES;
    match config::limits::read_bytes_at_most(p, max) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(StartError::Tls(format!(
            "{} is larger than {max} bytes",
            p.display()
        ))),
        Err(e) => Err(StartError::Tls(format!("cannot read {}: {e}", p.display()))),
    }
}
