//! The accept loop every listener of a node shares (native API, NBD,
//! admin): a connection is accepted only once it has a slot under the
//! listener's limit, so clients beyond it wait in the listen backlog, and a
//! failing accept (out of file descriptors, typically) is retried after a
//! pause instead of spinning.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::warn;

/// How long a failed accept waits before the next: long enough not to
/// spin on a condition that takes a connection's end to clear.
pub const RETRY_AFTER: Duration = Duration::from_millis(50);

/// The next connection and its slot, which it holds until it ends; `None`
/// once `shutdown` changes. `listener` names the listener in logs.
pub async fn next<S, F, Fut>(
    limit: &Arc<Semaphore>,
    mut accept: F,
    shutdown: &mut watch::Receiver<bool>,
    listener: &str,
) -> Option<(S, OwnedSemaphorePermit)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    let permit = tokio::select! {
        p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        _ = shutdown.changed() => return None,
    };
    loop {
        tokio::select! {
            r = accept() => match r {
                Ok(s) => return Some((s, permit)),
                Err(e) => warn!(listener, error = %e, "accept failed; retrying"),
            },
            _ = shutdown.changed() => return None,
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_AFTER) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_accept_is_retried_after_a_pause_and_shutdown_ends_the_wait() {
        let limit = Arc::new(Semaphore::new(1));
        let (stop, mut shutdown) = watch::channel(false);
        // An accept that keeps failing, for 300 ms: retried, not spun on
        // (a spinning loop calls it many thousand times).
        let calls = std::sync::atomic::AtomicU32::new(0);
        let failing = || {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { Err::<u32, _>(std::io::Error::other("EMFILE")) }
        };
        let waited = tokio::time::timeout(
            Duration::from_millis(300),
            next(&limit, failing, &mut shutdown, "test"),
        )
        .await;
        assert!(waited.is_err(), "no connection came");
        let calls = calls.into_inner();
        assert!((1..=8).contains(&calls), "{calls} accepts in 300 ms");
        assert_eq!(limit.available_permits(), 1, "the slot came back");

        let (n, permit) = next(&limit, || async { Ok(7u32) }, &mut shutdown, "test")
            .await
            .expect("a connection");
        assert_eq!(n, 7);
        assert_eq!(
            limit.available_permits(),
            0,
            "the connection holds its slot"
        );
        // With the only slot taken, the next waits for it; shutdown ends that.
        let waiting = next(&limit, || async { Ok(0u32) }, &mut shutdown, "test");
        stop.send(true).unwrap();
        assert!(waiting.await.is_none());
        drop(permit);
    }
}
