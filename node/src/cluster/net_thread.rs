//! The thread the peer transport runs on: quinn's endpoint and connection
//! drivers, and our stream tasks, on one single-threaded runtime of their
//! own.
//!
//! A page request crosses several tasks on its way through QUIC (the
//! endpoint driver reads the datagram, the connection driver decrypts it,
//! the stream task answers, the connection driver sends). On a
//! multi-threaded runtime each of those wake-ups may land on another worker
//! and cost a thread switch; on one thread they are function calls. The
//! node's own tasks meet this thread only twice per request: when they
//! write a request and when its answer wakes them.
//!
//! A cluster node also reads its API clients' requests here, and a
//! client's request keeps the thread polling for a while (see
//! [`crate::poll`]): the donors' answers and the client's next request then
//! find it running.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::poll::PollWindow;

/// The running thread; it stops when this is dropped (its tasks are
/// cancelled, its connections dropped).
#[derive(Debug)]
pub struct NetThread {
    handle: Handle,
    poll: Option<Arc<PollWindow>>,
    stop: Option<oneshot::Sender<()>>,
}

impl NetThread {
    /// Starts the thread; after each touch of its [`PollWindow`] it polls
    /// for `poll` before it sleeps (never if zero).
    pub fn start(name: &str, poll: Duration) -> io::Result<NetThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let poll = PollWindow::start(&handle, poll);
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("{name}-net"))
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(NetThread {
            handle,
            poll,
            stop: Some(stop),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Where clients' requests keep this thread polling; `None` if it
    /// never polls.
    pub fn poll(&self) -> Option<&Arc<PollWindow>> {
        self.poll.as_ref()
    }

    /// quinn's runtime: its drivers, timers and socket on this thread.
    pub fn runtime(&self) -> Arc<dyn Runtime> {
        Arc::new(NetRuntime {
            handle: self.handle.clone(),
        })
    }
}

impl Drop for NetThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// tokio's quinn runtime, bound to the net thread wherever it is called
/// from: a connection dialled from a node task still drives there.
#[derive(Debug)]
struct NetRuntime {
    handle: Handle,
}

impl Runtime for NetRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _in = self.handle.enter();
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.handle.spawn(future);
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let _in = self.handle.enter();
        TokioRuntime.wrap_udp_socket(t)
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}
