//! Showing progress: a bar on standard error, or `N/100` lines on a file
//! descriptor as nbdcopy's `--progress=FD` writes them.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nbdcp::Progress;

/// Writes `N/100` lines to a file descriptor, as nbdcopy's `--progress=FD`
/// does: `0/100` first, a line each time the percentage changes, and
/// `100/100` last.
pub struct FdProgress {
    out: Mutex<(File, u64)>,
}

impl FdProgress {
    /// Take ownership of `fd` and write `0/100` to it.
    ///
    /// # Safety
    /// `fd` must be an open file descriptor that nothing else owns.
    pub unsafe fn from_raw_fd(fd: i32) -> FdProgress {
        // SAFETY: the caller hands over ownership of an open descriptor.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let p = FdProgress {
            out: Mutex::new((file, 0)),
        };
        p.write_line(0);
        p
    }

    fn write_line(&self, percent: u64) {
        if let Ok(mut guard) = self.out.lock() {
            // A reader that went away must not fail the copy.
            let _ = writeln!(guard.0, "{percent}/100");
            guard.1 = percent;
        }
    }

    /// Report progress; writes a line only when the percentage changed.
    pub fn update(&self, p: Progress) {
        let percent = p.percent().min(99);
        let last = self.out.lock().map(|g| g.1).unwrap_or(0);
        if percent > last {
            self.write_line(percent);
        }
    }

    /// Write the final `100/100`.
    pub fn finish(&self) {
        self.write_line(100);
    }
}

/// A one-line progress bar on standard error, redrawn at most a few times a
/// second.
pub struct ProgressBar {
    state: Mutex<BarState>,
}

struct BarState {
    started: Instant,
    last_draw: Option<Instant>,
}

impl Default for ProgressBar {
    fn default() -> Self {
        ProgressBar::new()
    }
}

impl ProgressBar {
    /// A bar that starts timing now.
    pub fn new() -> ProgressBar {
        ProgressBar {
            state: Mutex::new(BarState {
                started: Instant::now(),
                last_draw: None,
            }),
        }
    }

    /// Report progress; redraws at most every 200 ms.
    pub fn update(&self, p: Progress) {
        let Ok(mut s) = self.state.lock() else { return };
        let now = Instant::now();
        if s.last_draw
            .is_some_and(|t| now - t < Duration::from_millis(200))
        {
            return;
        }
        s.last_draw = Some(now);
        draw(p, now - s.started, false);
    }

    /// Draw the final state and end the line.
    pub fn finish(&self, p: Progress) {
        let elapsed = self
            .state
            .lock()
            .map(|s| s.started.elapsed())
            .unwrap_or_default();
        draw(p, elapsed, true);
    }
}

fn draw(p: Progress, elapsed: Duration, last: bool) {
    const WIDTH: usize = 40;
    let secs = elapsed.as_secs_f64().max(1e-6);
    let rate = p.done as f64 / secs;
    let line = match p.total {
        Some(_) => {
            let filled = (p.percent() as usize * WIDTH) / 100;
            format!(
                "\r[{}{}] {:3}% {} {}/s",
                "#".repeat(filled),
                " ".repeat(WIDTH - filled),
                p.percent(),
                human_bytes(p.done),
                human_bytes(rate as u64)
            )
        }
        None => format!("\r{} {}/s", human_bytes(p.done), human_bytes(rate as u64)),
    };
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(line.as_bytes());
    if last {
        let _ = err.write_all(b"\n");
    }
    let _ = err.flush();
}

/// Bytes in binary units with one decimal, e.g. `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
