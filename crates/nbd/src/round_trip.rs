//! How long the server takes to answer: an estimate from the replies
//! themselves, with no extra requests. The client samples reads.
//!
//! A sample is taken when a run of requests starts on an idle connection:
//! from when its first request was sent (its payload included, so a large
//! write on a fast socket does not look like a slow server) until the
//! first reply's header is seen. A client that looks late, busy sending
//! the rest of the run, sees a longer time; one that measured from a
//! later send could see the reply already waiting and a server that
//! looks close (writes to a server 10 ms away measured under 1 ms that
//! way, and were lent, one round trip a batch).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// No sample yet, in [`RoundTrip`]'s shared least.
const NO_SAMPLE: u64 = u64::MAX;

/// The round trips of one connection.
///
/// The estimate is the shortest seen: the server's answer time when
/// nothing else keeps it busy. A busy server answers later, but that
/// says nothing of its distance, and a copier that kept more in flight
/// for it would only queue more: qemu-nbd on a Unix socket, serving
/// three connections on 2 cores, answered the first read of a run after
/// 0.6 to 22 ms, against 0.15 ms for one read on its own.
///
/// Connections to one server share the shortest (see
/// [`RoundTrip::share_with`]): it is the server's, and a connection only
/// samples when it starts from idle. One that met the server busy every
/// time, then kept requests in flight, would keep a latency the server
/// does not have: writing to one qemu-nbd over three connections, one
/// connection's shortest stayed at 5.2 to 6.4 ms while the others saw
/// 0.16 to 0.43 ms.
#[derive(Debug)]
pub struct RoundTrip {
    shared: Arc<Samples>,
    /// A run began on an idle connection and its first reply is awaited.
    armed: bool,
    /// When the run's first request was sent.
    since: Option<Instant>,
}

/// What the connections to one server have seen.
#[derive(Debug)]
struct Samples {
    /// Nanoseconds, [`NO_SAMPLE`] before the first sample.
    least: AtomicU64,
    /// How many samples were taken.
    count: AtomicU64,
}

impl Default for RoundTrip {
    fn default() -> Self {
        RoundTrip {
            shared: Arc::new(Samples {
                least: AtomicU64::new(NO_SAMPLE),
                count: AtomicU64::new(0),
            }),
            armed: false,
            since: None,
        }
    }
}

impl RoundTrip {
    /// A request was sent at `now`, with `in_flight` others outstanding
    /// before it.
    pub fn sent(&mut self, in_flight: usize, now: Instant) {
        if in_flight == 0 {
            self.armed = true;
            self.since = Some(now);
        }
    }

    /// A reply header was seen at `now`.
    pub fn answered(&mut self, now: Instant) {
        if let (true, Some(since)) = (self.armed, self.since) {
            self.record(now.saturating_duration_since(since));
        }
        self.armed = false;
        self.since = None;
    }

    /// Add one sample.
    pub fn record(&mut self, sample: Duration) {
        // Over 584 years saturates: still a sample, never "none".
        let nanos =
            u64::try_from(sample.as_nanos()).map_or(NO_SAMPLE - 1, |n| n.min(NO_SAMPLE - 1));
        self.shared.least.fetch_min(nanos, Ordering::Relaxed);
        self.shared.count.fetch_add(1, Ordering::Relaxed);
    }

    /// From now on share the shortest sample with `other`, a connection
    /// to the same server: what either has seen counts for both, and for
    /// any other connection sharing it.
    pub fn share_with(&mut self, other: &RoundTrip) {
        if Arc::ptr_eq(&self.shared, &other.shared) {
            return;
        }
        let (mine, theirs) = (&self.shared, &other.shared);
        theirs
            .least
            .fetch_min(mine.least.load(Ordering::Relaxed), Ordering::Relaxed);
        theirs
            .count
            .fetch_add(mine.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.shared = Arc::clone(&other.shared);
    }

    /// How many samples the estimate rests on (those of every connection
    /// sharing it).
    pub fn samples(&self) -> u64 {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// The shortest sample, or `None` before the first.
    pub fn estimate(&self) -> Option<Duration> {
        match self.shared.least.load(Ordering::Relaxed) {
            NO_SAMPLE => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_samples_no_estimate() {
        assert_eq!(RoundTrip::default().estimate(), None);
    }

    #[test]
    fn the_estimate_is_the_least_sample() {
        let mut rt = RoundTrip::default();
        for ms in [10, 12, 11, 30] {
            rt.record(MS * ms);
        }
        assert_eq!(rt.estimate(), Some(MS * 10));
        rt.record(MS * 2);
        assert_eq!(rt.estimate(), Some(MS * 2));
        // A busy spell later does not move it.
        for _ in 0..100 {
            rt.record(MS * 20);
        }
        assert_eq!(rt.estimate(), Some(MS * 2));
    }

    #[test]
    fn connections_to_one_server_share_the_least() {
        let mut first = RoundTrip::default();
        first.record(MS * 6);
        let mut second = RoundTrip::default();
        second.share_with(&first);
        assert_eq!(second.estimate(), Some(MS * 6));
        // What the second sees counts for the first...
        second.record(MS);
        assert_eq!(first.estimate(), Some(MS));
        // ...and a third that knew less learns it, keeping what it knew.
        let mut third = RoundTrip::default();
        third.record(MS / 2);
        third.share_with(&second);
        assert_eq!(first.estimate(), Some(MS / 2));
        assert_eq!(first.samples(), 3);
        // Sharing twice counts nothing twice.
        third.share_with(&first);
        assert_eq!(third.samples(), 3);
        // Sharing nothing yet shares "nothing".
        let (mut a, b) = (RoundTrip::default(), RoundTrip::default());
        a.share_with(&b);
        assert_eq!(b.estimate(), None);
    }

    #[test]
    fn only_runs_that_start_idle_are_sampled() {
        let t0 = Instant::now();
        let mut rt = RoundTrip::default();
        // Sent while others were in flight: the wait says nothing.
        rt.sent(3, t0);
        rt.answered(t0 + MS * 5);
        assert_eq!(rt.estimate(), None);
        // An idle start: the time runs from the run's first send, not
        // from later ones (the reply may already be waiting by then).
        rt.sent(0, t0);
        rt.sent(1, t0 + MS * 3);
        rt.answered(t0 + MS * 4);
        assert_eq!(rt.estimate(), Some(MS * 4));
        // Later replies of the same run are not samples, nor are sends
        // that follow them.
        rt.sent(2, t0 + MS * 4);
        rt.answered(t0 + MS * 5);
        assert_eq!(rt.estimate(), Some(MS * 4));
    }
}
