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

use std::time::{Duration, Instant};

/// The round trips of one connection.
///
/// The estimate is the shortest seen: the server's answer time when
/// nothing else keeps it busy. A busy server answers later, but that
/// says nothing of its distance, and a copier that kept more in flight
/// for it would only queue more: qemu-nbd on a Unix socket, serving
/// three connections on 2 cores, answered the first read of a run after
/// 0.6 to 22 ms, against 0.15 ms for one read on its own.
#[derive(Clone, Debug, Default)]
pub struct RoundTrip {
    least: Option<Duration>,
    /// A run began on an idle connection and its first reply is awaited.
    armed: bool,
    /// When the run's first request was sent.
    since: Option<Instant>,
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
        self.least = Some(self.least.map_or(sample, |l| l.min(sample)));
    }

    /// Take in what another connection to the same server has seen (a
    /// new connection starts busy, among the others).
    pub fn learn_from(&mut self, other: &RoundTrip) {
        if let Some(l) = other.least {
            self.record(l);
        }
    }

    /// The shortest sample, or `None` before the first.
    pub fn estimate(&self) -> Option<Duration> {
        self.least
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
    fn a_new_connection_learns_from_another() {
        let mut first = RoundTrip::default();
        first.record(MS);
        let mut second = RoundTrip::default();
        second.learn_from(&RoundTrip::default());
        assert_eq!(second.estimate(), None);
        second.record(MS * 9);
        second.learn_from(&first);
        assert_eq!(second.estimate(), Some(MS));
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
