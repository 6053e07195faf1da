//! Progress: counting completed bytes across workers and telling the
//! caller's callback. Showing it (a bar, `N/100` lines) is the command
//! line's business.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of how far a copy has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Source bytes whose destination operations have completed.
    pub done: u64,
    /// Source size, if known (not for a pipe).
    pub total: Option<u64>,
}

impl Progress {
    /// Whole percent done, 0 to 100; 0 when the total is unknown.
    pub fn percent(&self) -> u64 {
        match self.total {
            Some(0) => 100,
            Some(total) => (self.done.min(total) as u128 * 100 / total as u128) as u64,
            None => 0,
        }
    }
}

/// A function told about progress, called from worker threads.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Counts completed bytes across workers and tells the callback.
pub(crate) struct Tracker {
    done: AtomicU64,
    total: Option<u64>,
    callback: Option<ProgressFn>,
}

impl Tracker {
    pub(crate) fn new(total: Option<u64>, callback: Option<ProgressFn>) -> Tracker {
        Tracker {
            done: AtomicU64::new(0),
            total,
            callback,
        }
    }

    /// Record `bytes` more as completed.
    pub(crate) fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(cb) = &self.callback {
            cb(Progress {
                done,
                total: self.total,
            });
        }
    }

    /// Take back `bytes` counted for work that must be redone.
    pub(crate) fn sub(&self, bytes: u64) {
        self.done.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The total, if known.
    pub(crate) fn total(&self) -> Option<u64> {
        self.total
    }

    pub(crate) fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn percent_is_bounded_and_handles_empty_sources() {
        let p = |done, total| Progress { done, total }.percent();
        assert_eq!(p(0, Some(0)), 100);
        assert_eq!(p(50, Some(200)), 25);
        assert_eq!(p(300, Some(200)), 100);
        assert_eq!(p(u64::MAX, Some(u64::MAX)), 100);
        assert_eq!(p(10, None), 0);
    }

    #[test]
    fn tracker_sums_and_calls_back() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let t = Tracker::new(
            Some(100),
            Some(Arc::new(move |p: Progress| s.lock().unwrap().push(p.done))),
        );
        t.add(30);
        t.add(70);
        assert_eq!(t.done(), 100);
        assert_eq!(*seen.lock().unwrap(), vec![30, 100]);
    }
}
