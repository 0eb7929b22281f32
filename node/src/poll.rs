//! Polling instead of sleeping, for a while after a client's request.
//!
//! At one request in flight most of a round trip on a small host is spent
//! waking threads: a thread that sleeps in `epoll_wait` on an idle core is
//! woken by an interrupt, and the core first has to leave its idle state,
//! which on a small VM takes longer than the request itself (the figures
//! are in docs/benchmarks.md). A thread still running when the next event
//! comes needs no wake. A [`PollWindow`] keeps a single-threaded runtime
//! running for a while after the last touch: its task yields again and
//! again, and each time the runtime finds no other task ready it polls its
//! I/O driver without blocking. Touches come from clients' requests only,
//! so an idle node, or one that only moves pages in the background, sleeps
//! as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The longest poll window that may be configured, for the transport
/// thread and for NBD connections alike.
pub const WINDOW_MAX: Duration = Duration::from_millis(1);

/// How long a runtime keeps polling after each touch.
#[derive(Debug)]
pub struct PollWindow {
    origin: Instant,
    window_ns: u64,
    /// Nanoseconds after `origin` until which the runtime polls.
    until_ns: AtomicU64,
    /// Wakes the polling task from its sleep after an idle spell.
    wake: Notify,
    /// Times the task has yielded to let the runtime poll.
    spins: AtomicU64,
}

impl PollWindow {
    /// Starts the polling task on `runtime` (a current-thread runtime, so
    /// that the task's yields poll that thread's driver); `None` if
    /// `window` is zero.
    pub fn start(runtime: &tokio::runtime::Handle, window: Duration) -> Option<Arc<PollWindow>> {
        if window.is_zero() {
            return None;
        }
        let poll = Arc::new(PollWindow {
            origin: Instant::now(),
            window_ns: window.as_nanos() as u64,
            until_ns: AtomicU64::new(0),
            wake: Notify::new(),
            spins: AtomicU64::new(0),
        });
        runtime.spawn(poll.clone().run());
        Some(poll)
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Keeps the runtime polling for the window from now. Cheap when it
    /// already polls: one atomic; after an idle spell it wakes the task.
    pub fn touch(&self) {
        let now = self.now_ns();
        let before = self
            .until_ns
            .fetch_max(now + self.window_ns, Ordering::Relaxed);
        if before <= now {
            self.wake.notify_one();
        }
    }

    /// Times the runtime was let poll its driver, since the start.
    pub fn spins(&self) -> u64 {
        self.spins.load(Ordering::Relaxed)
    }

    async fn run(self: Arc<Self>) {
        loop {
            if self.now_ns() >= self.until_ns.load(Ordering::Relaxed) {
                // A touch between the check and here leaves a permit.
                self.wake.notified().await;
            } else {
                self.spins.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_touched_runtime_polls_for_its_window_and_then_sleeps() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(PollWindow::start(rt.handle(), Duration::ZERO).is_none());
        let poll = PollWindow::start(rt.handle(), Duration::from_millis(100)).unwrap();
        let pause = || rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        // Untouched, the runtime sleeps through a timer.
        pause();
        assert_eq!(poll.spins(), 0);
        // Touched, it polls while it waits for the timer.
        poll.touch();
        pause();
        let touched = poll.spins();
        assert!(touched > 0);
        // Once the window has passed it sleeps again.
        std::thread::sleep(Duration::from_millis(150));
        pause();
        let after = poll.spins();
        pause();
        assert_eq!(poll.spins(), after, "still polling after the window");
    }
}
