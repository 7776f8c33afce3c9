//! A store commit that takes back its change from memory if it fails, so memory is
//! never ahead of the disk: a refused publish changes nothing.
//!
//! The engine applies a publish to memory (the retained tree, an offline session's
//! queue) when it submits the store ops, so that concurrent changes to one topic or
//! queue reach memory and disk in one order. If the commit then fails (a full disk, an
//! I/O error), the publisher is told (0x80) and the [`Undo`] puts memory back. The undo
//! runs whether or not anyone awaits the commit: a guard dropped before its commit
//! resolved hands it to a task that waits for the result.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use fleetcore_core::storage::{Commit, StoreError};

/// What to do if the commit fails.
pub type Undo = Box<dyn FnOnce() + Send>;

/// A commit with its undo.
pub struct Guarded {
    commit: Option<Commit>,
    undo: Option<Undo>,
}

impl Guarded {
    pub fn new(commit: Commit, undo: Undo) -> Guarded {
        Guarded {
            commit: Some(commit),
            undo: Some(undo),
        }
    }
}

impl Future for Guarded {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(commit) = this.commit.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let res = std::task::ready!(Pin::new(commit).poll(cx));
        this.commit = None;
        if res.is_err() {
            if let Some(undo) = this.undo.take() {
                undo();
            }
        }
        Poll::Ready(res)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let (Some(commit), Some(undo)) = (self.commit.take(), self.undo.take()) {
            // Without a runtime (a test dropping the hub) nothing is running that
            // could read the stale memory.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if commit.await.is_err() {
                        undo();
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    fn flag() -> (Arc<AtomicBool>, Undo) {
        let f = Arc::new(AtomicBool::new(false));
        let g = f.clone();
        (f, Box::new(move || g.store(true, Ordering::SeqCst)))
    }

    #[tokio::test]
    async fn a_failed_commit_runs_the_undo_and_a_good_one_does_not() {
        let (ran, undo) = flag();
        assert!(Guarded::new(Commit::failed(StoreError::Closed), undo)
            .await
            .is_err());
        assert!(ran.load(Ordering::SeqCst));
        let (ran, undo) = flag();
        assert!(Guarded::new(Commit::ready(), undo).await.is_ok());
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_guard_dropped_before_its_commit_still_undoes_a_failure() {
        let (tx, rx) = oneshot::channel();
        let (ran, undo) = flag();
        drop(Guarded::new(Commit::waiting(rx), undo));
        tx.send(Err(StoreError::Io("No space left on device".into())))
            .unwrap();
        for _ in 0..100 {
            if ran.load(Ordering::SeqCst) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the undo did not run");
    }
}
