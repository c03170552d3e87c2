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
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use futures::{FutureExt as _, StreamExt as _};

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
        // A stream that panics ends alone, as a task of its own would: it is dropped (hyper
        // resets the HTTP/2 stream, and the proxy fails closed), and the connection's other
        // checks go on.
        let fut = AssertUnwindSafe(fut).catch_unwind().map(|r| {
            if r.is_err() {
                tracing::error!("an HTTP/2 stream panicked; it was reset");
            }
        });
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor as _;

    use super::*;

    /// A stand-in for a connection: it ends once `done` streams have finished.
    fn conn_until(done: &Arc<AtomicUsize>, n: usize) -> impl Future<Output = ()> + use<> {
        let done = done.clone();
        futures::future::poll_fn(move |cx| {
            if done.load(Ordering::SeqCst) >= n {
                Poll::Ready(())
            } else {
                // A real connection is woken by its streams' sends; the stand-in polls again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
    }

    #[tokio::test]
    async fn a_stream_that_waits_does_not_hold_up_the_others() {
        let streams = InlineStreams::default();
        let done = Arc::new(AtomicUsize::new(0));
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let order = Arc::new(Mutex::new(Vec::new()));
        {
            let (done, order) = (done.clone(), order.clone());
            streams.execute(async move {
                let _ = held.await;
                order.lock().unwrap().push("held");
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        for _ in 0..3 {
            let (done, order) = (done.clone(), order.clone());
            streams.execute(async move {
                order.lock().unwrap().push("at once");
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let driven = tokio::spawn(Driven::new(conn_until(&done, 4), streams));
        while done.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        assert!(!driven.is_finished());
        release.send(()).unwrap();
        driven.await.unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            ["at once", "at once", "at once", "held"]
        );
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let streams = InlineStreams::default();
        let done = Arc::new(AtomicUsize::new(0));
        streams.execute(async { panic!("a bug in one check") });
        for _ in 0..2 {
            let done = done.clone();
            streams.execute(async move {
                tokio::task::yield_now().await;
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        // The connection's task survives and its other streams finish.
        tokio::spawn(Driven::new(conn_until(&done, 2), streams))
            .await
            .expect("the connection's task did not survive a panicking stream");
    }

    #[tokio::test]
    async fn streams_started_while_running_are_run_too() {
        let streams = InlineStreams::default();
        let done = Arc::new(AtomicUsize::new(0));
        let inner = streams.clone();
        let d = done.clone();
        streams.execute(async move {
            // As hyper does: a stream started from inside the connection's poll.
            let d2 = d.clone();
            inner.execute(async move {
                d2.fetch_add(1, Ordering::SeqCst);
            });
            d.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(Driven::new(conn_until(&done, 2), streams))
            .await
            .unwrap();
    }
}
