//! Stopping a copy from another thread.
//!
//! A [`CancelToken`] is a flag plus the actions to run when it is set. The
//! engine hangs on it what breaks off each connection (shutting its socket
//! down), so a worker blocked on a server that stopped answering returns
//! at once instead of at the next batch boundary, which might never come.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Something to do when a token is cancelled.
type Action = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct State {
    cancelled: AtomicBool,
    next_id: AtomicU64,
    actions: Mutex<Vec<(u64, Action)>>,
}

impl State {
    /// The actions, even if a thread panicked while holding the lock: a
    /// list that is only pushed to and filtered cannot be left broken.
    fn actions(&self) -> MutexGuard<'_, Vec<(u64, Action)>> {
        self.actions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets another thread stop a copy. Cloning shares the same token.
///
/// ```
/// let token = nbdcp::CancelToken::new();
/// let for_the_other_thread = token.clone();
/// std::thread::spawn(move || for_the_other_thread.cancel()).join().unwrap();
/// assert!(token.is_cancelled());
/// ```
#[derive(Clone, Default)]
pub struct CancelToken(Arc<State>);

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// Stop the copy: requests blocked on a connection are broken off and
    /// the copy returns an [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled)
    /// error promptly. Calling it again does nothing.
    pub fn cancel(&self) {
        if self.0.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        for (_, action) in self.0.actions().iter() {
            action();
        }
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Relaxed)
    }

    /// Run `action` when the token is cancelled (at once if it already
    /// is), until the returned guard is dropped.
    pub(crate) fn on_cancel(&self, action: impl Fn() + Send + Sync + 'static) -> OnCancel {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        self.0.actions().push((id, Box::new(action)));
        // A cancel between the push and this check runs the action twice
        // at worst; the actions are idempotent (set a flag, shut a socket).
        if self.is_cancelled() {
            if let Some((_, action)) = self.0.actions().iter().find(|(i, _)| *i == id) {
                action();
            }
        }
        OnCancel {
            token: self.clone(),
            id,
        }
    }
}

/// Keeps an action registered with [`CancelToken::on_cancel`]; dropping it
/// removes the action.
#[must_use = "the action is removed when this is dropped"]
pub(crate) struct OnCancel {
    token: CancelToken,
    id: u64,
}

impl Drop for OnCancel {
    fn drop(&mut self) {
        self.token.0.actions().retain(|(i, _)| *i != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn actions_run_once_on_cancel_and_not_after_their_guard_is_dropped() {
        let token = CancelToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let kept = {
            let runs = runs.clone();
            token.on_cancel(move || {
                runs.fetch_add(1, Ordering::SeqCst);
            })
        };
        let dropped = {
            let runs = runs.clone();
            token.on_cancel(move || {
                runs.fetch_add(100, Ordering::SeqCst);
            })
        };
        drop(dropped);
        token.cancel();
        token.cancel();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        drop(kept);
    }

    #[test]
    fn an_action_registered_after_cancel_runs_at_once() {
        let token = CancelToken::new();
        token.cancel();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let _guard = token.on_cancel(move || r.store(true, Ordering::SeqCst));
        assert!(ran.load(Ordering::SeqCst));
    }
}
