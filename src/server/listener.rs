//! Connections on both listeners: how many may be open, and how long each may hold its descriptor
//! without sending a request.
//!
//! A client that opens a connection and trickles its request head one byte at a time (slowloris),
//! or opens thousands and sends nothing, must not be able to run the process out of file
//! descriptors: then neither listener can accept, Envoy's gRPC connection attempts time out and
//! decisions stop. So:
//!
//! - each listener admits at most its cap of connections (`limits.max_connections`, lowered to fit
//!   the process's `RLIMIT_NOFILE` with a reserve, split between the listeners so that one listener
//!   flooded can never take the other's descriptors); past it, a new connection is accepted and
//!   closed at once, which costs a descriptor for microseconds;
//! - every connection carries a deadline while no request is in flight on it: the request head
//!   (HTTP/1) or the first request (HTTP/2, TLS handshake included) within `header_read_timeout`,
//!   the next request within `idle_timeout`. Bytes do not extend it: a trickling client is closed
//!   on time however slowly it sends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::config::ConnectionLimits;

/// Descriptors kept out of the listeners' reach: the config watcher, the credential store, log and
/// telemetry exporters, outbound JWKS and token endpoint connections, and the one a shed
/// connection holds for an instant.
pub const FD_RESERVE: usize = 256;

/// HTTP/2 streams a client may reset before the server accepted them, before the connection is
/// closed with GOAWAY (CVE-2023-44487, "rapid reset"). h2's own default, set explicitly.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// HTTP/2 streams the server may reset because of a client's protocol errors before the connection
/// is closed (RUSTSEC-2024-0003). hyper defaults to 1,024, but tonic passes "no limit" unless told.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// HTTP/2 header list on the gRPC listener (hyper's default, set explicitly): gRPC carries the
/// original request's headers in the message, so this is only the call's own metadata.
pub const GRPC_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// The process's soft `RLIMIT_NOFILE`, if it can be read (Linux: `/proc/self/limits`; the crate
/// forbids the unsafe `getrlimit` call). `None` when unlimited or unknown.
pub fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Each listener's connection cap: `max_connections`, lowered so that all `listeners` together stay
/// `FD_RESERVE` descriptors below the process's limit.
pub fn connection_cap(max_connections: usize, listeners: usize, fd_limit: Option<usize>) -> usize {
    let Some(limit) = fd_limit else {
        return max_connections;
    };
    let share = limit.saturating_sub(FD_RESERVE) / listeners.max(1);
    max_connections.min(share).max(1)
}

/// What a connection speaks, which decides its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1, or HTTP/2 with prior knowledge, told apart by the first bytes (the HTTP listener).
    Detect,
    /// HTTP/2 only, possibly under TLS (the gRPC listener).
    Http2,
}

/// The request activity of one connection, shared between its I/O (which enforces the deadline)
/// and the service that handles its requests (which says when one starts and ends).
#[derive(Debug)]
pub struct Activity {
    phase: Mutex<Phase>,
    /// The connection's task, woken when the last request in flight ends so that its idle deadline
    /// is armed even though no byte arrived.
    waker: AtomicWaker,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Phase {
    opened: Instant,
    in_flight: usize,
    requests: u64,
    /// When the last request in flight ended (or the connection opened).
    idle_since: Instant,
    /// HTTP/1: when the bytes of the next request head started arriving.
    head_since: Option<Instant>,
    http2: bool,
    /// The first bytes read, to tell the HTTP/2 preface from an HTTP/1 request line.
    prefix: [u8; 4],
    prefix_len: usize,
}

impl Activity {
    fn new(protocol: Protocol, limits: &ConnectionLimits) -> Self {
        let now = Instant::now();
        Activity {
            phase: Mutex::new(Phase {
                opened: now,
                in_flight: 0,
                requests: 0,
                idle_since: now,
                // The first request head is due `header_read_timeout` after the connection opened.
                head_since: Some(now),
                http2: protocol == Protocol::Http2,
                prefix: [0; 4],
                prefix_len: 0,
            }),
            waker: AtomicWaker::new(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        // The lock guards plain counters: a panic while holding it leaves them usable.
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request was received: no deadline until it (and any other in flight) is answered.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        let mut p = self.phase();
        p.in_flight += 1;
        p.requests += 1;
        p.head_since = None;
        RequestGuard(self.clone())
    }

    /// When the connection must be closed if nothing changes, or `None` while a request is in flight.
    fn deadline(&self) -> Option<Instant> {
        let p = self.phase();
        if p.in_flight > 0 {
            None
        } else if p.http2 {
            // HTTP/2 bytes (PING acks, WINDOW_UPDATEs) are no request: only requests count.
            Some(if p.requests == 0 {
                p.opened + self.header_read_timeout
            } else {
                p.idle_since + self.idle_timeout
            })
        } else {
            Some(match p.head_since {
                Some(t) => t + self.header_read_timeout,
                None => p.idle_since + self.idle_timeout,
            })
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        let mut p = self.phase();
        if !p.http2 && p.requests == 0 && p.prefix_len < p.prefix.len() {
            let (start, n) = (p.prefix_len, bytes.len().min(p.prefix.len() - p.prefix_len));
            p.prefix[start..start + n].copy_from_slice(&bytes[..n]);
            p.prefix_len += n;
            if p.prefix_len == p.prefix.len() && &p.prefix == b"PRI " {
                p.http2 = true;
            }
        }
        if !p.http2 && p.in_flight == 0 && p.head_since.is_none() {
            // The next request head started: it has `header_read_timeout` to arrive whole.
            p.head_since = Some(Instant::now());
        }
    }
}

/// Held while a request is in flight on a connection.
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let idle = {
            let mut p = self.0.phase();
            p.in_flight -= 1;
            if p.in_flight == 0 {
                p.idle_since = Instant::now();
            }
            p.in_flight == 0
        };
        if idle {
            self.0.waker.wake();
        }
    }
}

/// An accepted connection: its slot under the listener's cap, and its deadline.
pub struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Tracked<IO> {
    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The connection's request activity.
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Whether the connection's deadline has passed; otherwise the task is woken when it does (or
    /// when the last request in flight ends and a new deadline starts).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.activity.waker.register(cx.waker());
        loop {
            let Some(deadline) = self.activity.deadline() else {
                return false;
            };
            if Instant::now() >= deadline {
                return true;
            }
            if self.armed != Some(deadline) {
                self.timer.as_mut().reset(deadline);
                self.armed = Some(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no request within limits.header_read_timeout or limits.idle_timeout",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    this.activity.on_read(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    // A client that stops reading its responses holds the connection in a pending write: the same
    // deadline applies.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Drives a connection to its end; once `closing` turns true, asks it (once) to finish its requests
/// and close (`shut_down`: hyper's graceful shutdown).
pub async fn run_until_drained<C, E>(
    mut conn: Pin<&mut C>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    shut_down: impl FnOnce(Pin<&mut C>),
    listener: &'static str,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut shut_down = Some(shut_down);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener, error = %e, "connection closed with an error");
                }
                return;
            }
            _ = closing.wait_for(|c| *c), if shut_down.is_some() => {
                if let Some(shut_down) = shut_down.take() {
                    shut_down(conn.as_mut());
                }
            }
        }
    }
}

/// Serves each connection of `incoming` on a task of its own (`serve`, given the connection and a
/// flag that turns true at shutdown) until `shutdown` resolves; then stops accepting, closes the
/// listening socket and waits for the open connections to finish their requests and close.
pub async fn serve_each<I, F, Fut>(
    incoming: I,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut serve: F,
) where
    I: Stream<Item = io::Result<Tracked<TcpStream>>> + Send,
    F: FnMut(Tracked<TcpStream>, tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    use futures::StreamExt as _;
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    // Boxed, not pinned on the stack: dropping it below must close the listening socket.
    let mut incoming = Box::pin(incoming);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => break,
            conn = incoming.next() => conn,
        };
        let Some(Ok(conn)) = conn else {
            break;
        };
        tokio::spawn(serve(conn, closing_rx.clone()));
    }
    drop(incoming);
    let _ = closing_tx.send(true);
    drop(closing_rx);
    closing_tx.closed().await;
}

/// Accepts connections on `listener` up to `cap` at once; past it, each new one is closed at once.
/// Accept errors (out of descriptors, aborted handshakes) are logged and waited out, never returned:
/// the stream ends only when dropped.
pub fn incoming(
    name: &'static str,
    listener: TcpListener,
    cap: usize,
    protocol: Protocol,
    limits: ConnectionLimits,
) -> impl Stream<Item = io::Result<Tracked<TcpStream>>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(cap));
    let shed = Arc::new(Shed::default());
    futures::stream::unfold(listener, move |listener| {
        let (slots, shed) = (slots.clone(), shed.clone());
        async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        accept_error(name, &e).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Accepted and closed: the client learns at once, and the descriptor is back.
                    drop(tcp);
                    shed.record(name, cap);
                    continue;
                };
                // No Nagle delay on responses: a response written in two pieces would wait ~40 ms
                // for the client's delayed ACK.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let tracked = Tracked {
                    io: tcp,
                    activity: Arc::new(Activity::new(protocol, &limits)),
                    timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
                    armed: None,
                    peer,
                    _slot: slot,
                };
                return Some((Ok(tracked), listener));
            }
        }
    })
}

async fn accept_error(listener: &'static str, e: &io::Error) {
    match e.raw_os_error() {
        // Out of descriptors or memory: the error repeats until a connection closes; waiting
        // keeps the loop from spinning meanwhile.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            tracing::warn!(listener, error = %e, "cannot accept connections");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The client went away between SYN and accept.
        _ if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) => {}
        _ => {
            tracing::debug!(listener, error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Counts shed connections and says so in the log at most every ten seconds.
#[derive(Debug, Default)]
struct Shed {
    count: AtomicU64,
    last_logged: Mutex<Option<Instant>>,
}

impl Shed {
    fn record(&self, listener: &'static str, cap: usize) {
        let total = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_logged.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(
                listener,
                max_connections = cap,
                shed_total = total,
                "connection limit reached: new connections are closed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_leaves_the_reserve_and_splits_the_rest() {
        assert_eq!(
            connection_cap(10_000, 2, Some(1024)),
            (1024 - FD_RESERVE) / 2
        );
        assert_eq!(connection_cap(100, 2, Some(1024)), 100);
        assert_eq!(connection_cap(10_000, 1, None), 10_000);
        assert_eq!(connection_cap(10_000, 2, Some(10)), 1);
    }

    #[test]
    fn the_limit_is_read() {
        // Linux CI: the file exists and the limit is a number (tests never run unlimited).
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }

    #[tokio::test]
    async fn deadlines_follow_requests_not_bytes() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(50),
            ..ConnectionLimits::default()
        };
        let a = Arc::new(Activity::new(Protocol::Detect, &limits));
        let first = a
            .deadline()
            .expect("a deadline while no request is in flight");
        assert!(first <= Instant::now() + Duration::from_secs(1));
        a.on_read(b"GET / HTTP/1.1\r\n");
        // Bytes do not move the head's deadline.
        assert_eq!(a.deadline(), Some(first));
        let g = a.begin();
        assert_eq!(a.deadline(), None);
        drop(g);
        // Idle: the next request is due within idle_timeout ...
        assert!(a.deadline().expect("idle") > Instant::now() + Duration::from_secs(40));
        // ... and once its head starts arriving, within header_read_timeout.
        a.on_read(b"G");
        assert!(a.deadline().expect("head") <= Instant::now() + Duration::from_secs(1));

        // HTTP/2 told by its preface: PING acks and window updates are not requests.
        let h2 = Arc::new(Activity::new(Protocol::Detect, &limits));
        h2.on_read(b"PR");
        h2.on_read(b"I * HTTP/2.0\r\n");
        assert!(h2.deadline().expect("preface") <= Instant::now() + Duration::from_secs(1));
        drop(h2.begin());
        h2.on_read(b"ping ack");
        assert!(h2.deadline().expect("idle") > Instant::now() + Duration::from_secs(40));
    }
}
