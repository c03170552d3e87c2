//! Running the service: listeners, hot reload, graceful shutdown.

pub mod admin;
pub mod grpc;
mod grpc_listener;
pub mod http;
pub mod inline;
mod listener;
mod reload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config;
use crate::config::Settings;
use crate::policy::{self, Decision, PolicySet, Runtime};
use crate::proto::auth::authorization_server::AuthorizationServer;

/// An allow that sets one upstream header: what the adapters' unit tests map onto the wire.
#[cfg(test)]
fn allow_setting_x_user() -> Decision {
    let mut d = Decision::new();
    d.upstream_headers.push(crate::check::Header {
        name: "x-user".into(),
        value: "alice".into(),
        sensitive: false,
    });
    d
}

/// How long in-flight checks may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is invalid.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] config::ConfigErrors),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS files cannot be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// Metrics or the decision log could not be set up.
    #[error("telemetry: {0}")]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The credential store cannot be opened (wrong key, corrupt file, in use).
    #[error("{0}")]
    Store(#[from] crate::credentials::StoreError),
}

/// Everything the adapters share.
pub struct State {
    policy: ArcSwap<PolicySet>,
    /// Key and token caches, kept across reloads.
    pub runtime: Arc<Runtime>,
    /// Settings the process started with.
    pub settings: Settings,
    config_path: PathBuf,
    config_digest: std::sync::Mutex<[u8; 32]>,
    /// Held by a reload of the config or of the keys file, so that a keys file read by one is
    /// never replaced by an older one read by the other.
    reloading: std::sync::Mutex<()>,
    /// The file watcher, once started: a reload that names another keys file moves it there.
    watching: std::sync::OnceLock<std::sync::Weak<reload::Watching>>,
    admission: Arc<Semaphore>,
    shutting_down: AtomicBool,
    /// Decision log, metrics and traces.
    pub telemetry: crate::telemetry::Telemetry,
}

impl State {
    /// The current policy set.
    pub fn policy(&self) -> arc_swap::Guard<Arc<PolicySet>> {
        self.policy.load()
    }

    /// Puts a freshly compiled policy into service as one step: its credentials are published, it
    /// replaces the current policy, and `digest` becomes the file's recorded digest. Returns the
    /// policy it replaced.
    fn install(&self, policy: PolicySet, digest: [u8; 32]) -> Arc<PolicySet> {
        let mut recorded = self.config_digest.lock().unwrap_or_else(|p| p.into_inner());
        self.runtime.publish(&policy);
        let old = self.policy.swap(Arc::new(policy));
        *recorded = digest;
        old
    }

    /// A permit to evaluate one check, or `None` when too many are in flight.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.admission.clone().try_acquire_owned().ok()
    }

    /// Records a decision in metrics, its span and the decision log.
    pub fn record(
        &self,
        d: &Decision,
        elapsed: Duration,
        trace: &crate::telemetry::CheckTrace,
        request: impl FnOnce() -> Option<String>,
    ) {
        self.telemetry.record(d, elapsed, trace, request);
    }

    /// Whether the service is draining.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// The config file being served.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }
}

/// The addresses a running service listens on (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    /// gRPC listener.
    pub grpc: SocketAddr,
    /// HTTP listener, if configured.
    pub http: Option<SocketAddr>,
}

/// A service started in the background (tests, embedding).
pub struct Running {
    /// Where it listens.
    pub addrs: BoundAddrs,
    /// Shared state (for reload and inspection).
    pub state: Arc<State>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), StartError>>,
}

impl Running {
    /// Triggers a graceful shutdown and waits for it.
    pub async fn shutdown(self) -> Result<(), StartError> {
        let _ = self.shutdown.send(true);
        self.task.await.unwrap_or(Ok(()))
    }

    /// Waits until the service stops (SIGTERM/SIGINT or [`Running::shutdown`]).
    pub async fn wait(self) -> Result<(), StartError> {
        let _keep_sender = self.shutdown;
        self.task.await.unwrap_or(Ok(()))
    }

    /// Re-reads and recompiles the config file now.
    pub async fn reload(&self) -> Result<policy::Summary, config::ConfigErrors> {
        reload::reload(&self.state, true)
    }

    /// Re-reads `subscriptions.keys_file` now (nothing else): its subscriptions and keys, or
    /// `None` without a keys file.
    pub async fn reload_keys(&self) -> Result<Option<(usize, usize)>, config::ConfigErrors> {
        reload::reload_keys(&self.state)
    }
}

/// Loads and compiles the config file, binds the listeners and serves in the background.
pub async fn start(config_path: &Path) -> Result<Running, StartError> {
    let src = config::load_pruned(config_path).map_err(policy::every_error)?;
    start_with(config_path, src).await
}

/// [`start`] with the file at `config_path` already loaded as `src` (reloads read it again).
pub async fn start_with(config_path: &Path, src: config::Source) -> Result<Running, StartError> {
    let started = std::time::Instant::now();
    let runtime = Arc::new(Runtime::default());
    let (policy, settings) = policy::compile(&src, &runtime)?;
    let telemetry = crate::telemetry::Telemetry::new(&settings, runtime.clone())?;
    // Opens the credential store and obtains the backend credentials the APIs use, so that the
    // first request does not pay for them; with `store.redis`, DPoP replays are shared.
    runtime.publish(&policy);
    runtime.start(&policy).await?;
    let admission = Arc::new(Semaphore::new(policy.limits.max_concurrent_checks));
    let state = Arc::new(State {
        policy: ArcSwap::from_pointee(policy),
        runtime,
        settings: settings.clone(),
        config_path: config_path.to_path_buf(),
        config_digest: std::sync::Mutex::new(src.digest),
        reloading: std::sync::Mutex::new(()),
        watching: std::sync::OnceLock::new(),
        admission,
        shutting_down: AtomicBool::new(false),
        telemetry,
    });
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(summary = %state.policy().summary, config = %config_path.display(), duration_ms, "configuration loaded");
    for note in &state.policy().summary.notes {
        match note.strip_prefix("warning: ") {
            Some(w) => tracing::warn!(config = %config_path.display(), "{w}"),
            None => tracing::info!(config = %config_path.display(), "{note}"),
        }
    }

    let grpc_listener =
        TcpListener::bind(settings.grpc)
            .await
            .map_err(|source| StartError::Bind {
                addr: settings.grpc,
                source,
            })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: settings.grpc,
            source,
        })?;
    let http_listener = match settings.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let tls = settings
        .tls
        .as_ref()
        .map(grpc_listener::load_tls)
        .transpose()?;

    // Signal handlers exist before the listeners are announced: a SIGTERM sent right after the
    // "listening" line must drain, not be lost.
    let signals = Signals::install();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task_state = state.clone();
    let task = tokio::spawn(async move {
        serve(
            task_state,
            grpc_listener,
            http_listener,
            tls,
            signals,
            shutdown_rx,
        )
        .await
    });
    tracing::info!(listener = "grpc", addr = %grpc_addr, tls = settings.tls.is_some(), mtls = settings.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()), "listening (ext_authz v3 Check, grpc.health.v1, reflection)");
    if let Some(addr) = http_addr {
        tracing::info!(listener = "http", addr = %addr, "listening (/healthz /readyz /metrics /authz/)");
    }
    Ok(Running {
        addrs: BoundAddrs {
            grpc: grpc_addr,
            http: http_addr,
        },
        state,
        shutdown: shutdown_tx,
        task,
    })
}

async fn serve(
    state: Arc<State>,
    grpc_listener: TcpListener,
    http_listener: Option<TcpListener>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    signals: Signals,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AuthorizationServer<grpc::AuthorizationService>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Tls(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| StartError::Tls(format!("reflection: {e}")))?;

    let watcher = reload::watch(state.clone());

    // One signal fans out to both listeners.
    let (drain_tx, drain_rx) = watch::channel(false);
    let signal_state = state.clone();
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        wait_for_shutdown(&signal_state, signals, &mut shutdown).await;
        signal_state.shutting_down.store(true, Ordering::Relaxed);
        reporter
            .set_not_serving::<AuthorizationServer<grpc::AuthorizationService>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        tracing::info!("shutting down: draining in-flight checks");
        let _ = drain_tx.send(true);
    });

    // Both listeners' connection caps fit under the descriptor limit together (listener.rs).
    let limits = state.settings.connections;
    let fd_limit = listener::open_files_limit();
    let listeners = 1 + usize::from(http_listener.is_some());
    let cap = listener::connection_cap(limits.max_connections, listeners, fd_limit);
    if cap < limits.max_connections {
        tracing::warn!(
            max_connections = limits.max_connections,
            open_files_limit = fd_limit,
            per_listener = cap,
            "limits.max_connections lowered to fit the open files limit (ulimit -n)"
        );
    }

    let auth = AuthorizationServer::new(grpc::AuthorizationService::new(state.clone()));
    let services = grpc_listener::Services {
        check: auth.clone(),
        routes: tonic::service::Routes::new(auth)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .prepare(),
    };
    let mut grpc_drain = drain_rx.clone();
    let grpc = grpc_listener::serve(
        listener::incoming(
            "grpc",
            grpc_listener,
            cap,
            listener::Protocol::Http2,
            limits,
        ),
        services,
        tls,
        limits,
        async move {
            let _ = grpc_drain.wait_for(|v| *v).await;
        },
    );

    let http = async {
        if let Some(listener) = http_listener {
            let mut http_drain = drain_rx.clone();
            let incoming =
                listener::incoming("http", listener, cap, listener::Protocol::Detect, limits);
            http::serve(state.clone(), incoming, async move {
                let _ = http_drain.wait_for(|v| *v).await;
            })
            .await;
        }
    };

    let mut deadline_rx = drain_rx.clone();
    let deadline = async move {
        let _ = deadline_rx.wait_for(|v| *v).await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    let result = tokio::select! {
        ((), ()) = async { tokio::join!(grpc, http) } => Ok(()),
        () = deadline => {
            tracing::warn!("in-flight checks did not finish within {DRAIN_TIMEOUT:?}; exiting");
            Ok(())
        }
    };
    drop(watcher);
    // Pending decision records and metrics go out before the process exits. The SDK's shutdown
    // blocks while its exporter thread uses this runtime, so it waits on a blocking thread.
    let flush_state = state.clone();
    let _ = tokio::task::spawn_blocking(move || flush_state.telemetry.shutdown()).await;
    result
}

/// The process signals the service reacts to.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let s = Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        };
        if s.term.is_none() || s.int.is_none() || s.hup.is_none() {
            tracing::error!(
                "cannot install signal handlers; SIGTERM/SIGINT/SIGHUP may not be handled"
            );
        }
        s
    }
}

async fn recv(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves once the flag is true (or its sender is gone), holding no borrow of the channel.
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}

/// Waits for SIGTERM, SIGINT or a programmatic shutdown; SIGHUP reloads the config meanwhile.
async fn wait_for_shutdown(
    state: &Arc<State>,
    mut signals: Signals,
    shutdown: &mut watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = recv(&mut signals.term) => return,
            _ = recv(&mut signals.int) => return,
            () = until_true(shutdown) => return,
            _ = recv(&mut signals.hup) => {
                tracing::info!("SIGHUP: reloading configuration");
                let s = state.clone();
                let _ = tokio::task::spawn_blocking(move || reload::reload(&s, true)).await;
            }
        }
    }
}
