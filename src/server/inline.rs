//! HTTP/2 connections whose streams run inside the connection's own task.
//!
//! hyper hands every HTTP/2 stream to an executor. With tokio's, each check is a task of its own:
//! it wakes the connection's task when its response is ready, and tokio runs a task that was just
//! woken next (its LIFO slot), so the connection writes and flushes that one response before the
//! next check runs. At saturation that is one `writev` (and one wake-up of the client) per
//! response, the largest single cost of the gRPC listener (docs/performance.md).
//!
//! [`InlineStreams`] is an executor that queues the streams instead, and [`Driven`] polls them
//! from the connection's task: the connection reads what has arrived, the checks that can be
//! decided at once are decided, and the connection writes all their responses in one flush. A
//! check that waits (a key fetch, the shared store) waits inside the same task without holding
//! the others up; its own waker wakes the connection's task when it can go on.
//!
//! The price: one connection's checks share one thread. A proxy keeps one connection per worker
//! thread, and a check costs microseconds, so that thread is not the limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor of one connection: it queues what hyper starts, for [`Driven`] to run.
#[derive(Clone, Default)]
pub struct InlineStreams(Arc<Queue>);

#[derive(Default)]
struct Queue {
    started: Mutex<Vec<Stream>>,
    waker: AtomicWaker,
}

impl<F> hyper::rt::Executor<F> for InlineStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0
            .started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(fut));
        self.0.waker.wake();
    }
}

/// How many read-decide-write rounds one poll may run before it lets other tasks go.
const ROUNDS_PER_POLL: usize = 16;

/// A connection future together with the streams it started on its [`InlineStreams`].
///
/// It ends when the connection does: an HTTP/2 connection ends after its streams (a graceful
/// shutdown waits for them), and a stream cannot answer without its connection.
pub struct Driven<C> {
    conn: Pin<Box<C>>,
    streams: InlineStreams,
    running: FuturesUnordered<Stream>,
}

impl<C: Future> Driven<C> {
    /// `conn` must have been built with `streams` as its executor.
    pub fn new(conn: C, streams: InlineStreams) -> Self {
        Self {
            conn: Box::pin(conn),
            streams,
            running: FuturesUnordered::new(),
        }
    }

    /// The connection, for a graceful shutdown.
    pub fn conn(&mut self) -> Pin<&mut C> {
        self.conn.as_mut()
    }

    /// Moves the streams hyper started since the last call into the running set.
    fn take_started(&mut self) -> bool {
        let mut started = self
            .streams
            .0
            .started
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let any = !started.is_empty();
        self.running.extend(started.drain(..));
        any
    }
}

impl<C: Future> Future for Driven<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        this.streams.0.waker.register(cx.waker());
        for _ in 0..ROUNDS_PER_POLL {
            // Reads what has arrived (starting streams), and writes what the streams answered
            // in the previous round, in one flush.
            if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            let mut moved = this.take_started();
            while let Poll::Ready(Some(())) = this.running.poll_next_unpin(cx) {
                moved = true;
            }
            if !moved {
                // Everything left waits on a waker registered with `cx`.
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
