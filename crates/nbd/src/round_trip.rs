//! How long the server takes to answer: an estimate from the replies
//! themselves, with no extra requests. The client samples reads.
//!
//! A sample is taken when a run of requests starts on an idle connection:
//! from when the last request of the run so far was sent (its payload
//! included, so large writes on a fast socket do not look like a slow
//! server) until the first reply's header is seen. A client that looks
//! late sees a longer time: the estimate errs towards a slow server.

use std::time::{Duration, Instant};

/// Samples kept: the estimate is their minimum, so one reply delayed by a
/// busy server (or a descheduled client) does not move it, while a change
/// of path shows within this many runs.
const SAMPLES: usize = 8;

/// The recent round trips of one connection.
#[derive(Clone, Debug, Default)]
pub struct RoundTrip {
    samples: [Duration; SAMPLES],
    taken: usize,
    /// A run began on an idle connection and its first reply is awaited.
    armed: bool,
    /// When the run's latest request was sent.
    since: Option<Instant>,
}

impl RoundTrip {
    /// A request was sent at `now`, with `in_flight` others outstanding
    /// before it.
    pub fn sent(&mut self, in_flight: usize, now: Instant) {
        if in_flight == 0 {
            self.armed = true;
        }
        if self.armed {
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
        self.samples[self.taken % SAMPLES] = sample;
        self.taken += 1;
    }

    /// The shortest of the recent samples, or `None` before the first.
    pub fn estimate(&self) -> Option<Duration> {
        let kept = self.taken.min(SAMPLES);
        self.samples[..kept].iter().min().copied()
    }

    /// Forget every sample (a new connection may take another path).
    pub fn reset(&mut self) {
        *self = RoundTrip::default();
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
    fn the_estimate_is_the_least_recent_sample() {
        let mut rt = RoundTrip::default();
        for ms in [10, 12, 11, 30] {
            rt.record(MS * ms);
        }
        assert_eq!(rt.estimate(), Some(MS * 10));
        // Eight later samples push the old minimum out.
        for _ in 0..SAMPLES {
            rt.record(MS * 2);
        }
        assert_eq!(rt.estimate(), Some(MS * 2));
        for _ in 0..SAMPLES {
            rt.record(MS * 20);
        }
        assert_eq!(rt.estimate(), Some(MS * 20));
    }

    #[test]
    fn only_runs_that_start_idle_are_sampled() {
        let t0 = Instant::now();
        let mut rt = RoundTrip::default();
        // Sent while others were in flight: the wait says nothing.
        rt.sent(3, t0);
        rt.answered(t0 + MS * 5);
        assert_eq!(rt.estimate(), None);
        // An idle start: the time runs from the run's last send.
        rt.sent(0, t0);
        rt.sent(1, t0 + MS);
        rt.answered(t0 + MS * 4);
        assert_eq!(rt.estimate(), Some(MS * 3));
        // Later replies of the same run are not samples, nor are sends
        // that follow them.
        rt.sent(2, t0 + MS * 4);
        rt.answered(t0 + MS * 5);
        assert_eq!(rt.estimate(), Some(MS * 3));
    }

    #[test]
    fn reset_forgets() {
        let mut rt = RoundTrip::default();
        rt.record(MS);
        rt.reset();
        assert_eq!(rt.estimate(), None);
    }
}
