//! `--rate`: one token bucket shared by all workers, so the copy as a
//! whole reads at most so many bytes of data a second from the source.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest single sleep while waiting for tokens, so that a stop is seen
/// within this.
const STEP: Duration = Duration::from_millis(20);

/// A token bucket filled at `rate` bytes a second, holding at most one
/// second's worth. It starts empty, so no burst exceeds the rate, and a
/// request larger than the bucket runs it into debt, repaid before the
/// next one goes: over any second the average stays at the rate.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    /// A limiter for `rate` bytes a second (at least 1).
    pub(crate) fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            rate: rate.max(1) as f64,
            state: Mutex::new(State {
                tokens: 0.0,
                refilled: Instant::now(),
            }),
        }
    }

    /// Wait until `bytes` may be read, or until `stopped` says the copy
    /// is stopping.
    pub(crate) fn take(&self, bytes: u64, stopped: impl Fn() -> bool) {
        if bytes == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.rate).min(self.rate);
        state.refilled = now;
        state.tokens -= bytes as f64;
        let debt = -state.tokens;
        drop(state);
        if debt <= 0.0 {
            return;
        }
        // Whoever ran the bucket into debt waits it off; others arriving
        // meanwhile add their own and wait longer, in turn.
        let until = now + Duration::from_secs_f64(debt / self.rate);
        while !stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(STEP));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_stays_at_the_rate() {
        let limiter = RateLimiter::new(4 << 20);
        let started = Instant::now();
        // 2 MiB of 256 KiB pieces at 4 MiB/s: half a second.
        for _ in 0..8 {
            limiter.take(256 << 10, || false);
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    #[test]
    fn a_stop_ends_the_wait() {
        let limiter = RateLimiter::new(1);
        let started = Instant::now();
        limiter.take(1 << 20, || started.elapsed() > Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
