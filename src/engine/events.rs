//! Events for programs watching a copy (`--progress=json:FD`): the copy
//! starts, makes progress, retries a segment. The end (success or error)
//! is the caller's to report, since only it knows the exit status.

use std::sync::Arc;
use std::time::Duration;

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The copy starts: both endpoints are open, the connections made.
    Start {
        /// The source's name.
        source: String,
        /// The destination's name.
        destination: String,
        /// Bytes to copy, if known (not for a pipe).
        size: Option<u64>,
        /// Connections (workers) copying.
        connections: usize,
        /// Largest read or write request.
        request_size: usize,
    },
    /// At least once a second, and whenever a segment completes.
    Progress {
        /// Source bytes whose segments the destination has acknowledged
        /// (whole segments: every write settled, and flushed when
        /// journalled). Never decreases; ends equal to `total`.
        done: u64,
        /// Bytes to copy, if known.
        total: Option<u64>,
        /// Bytes sent to the destination as data so far.
        written: u64,
        /// Bytes zeroed on the destination so far.
        zeroed: u64,
        /// Bytes of `done` neither written nor zeroed: holes the
        /// destination already had, and segments an earlier run copied.
        skipped: u64,
        /// Time since the copy started.
        elapsed: Duration,
    },
    /// A segment is copied again after its connection dropped.
    Retry {
        /// The endpoint reconnected.
        endpoint: String,
        /// Where the segment starts.
        offset: u64,
        /// What went wrong.
        error: String,
    },
}

/// A function told about [`Event`]s, from worker threads.
pub type EventFn = Arc<dyn Fn(&Event) + Send + Sync>;
