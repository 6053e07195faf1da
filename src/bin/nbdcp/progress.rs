//! Showing progress: a bar on standard error, or `N/100` lines on a file
//! descriptor as nbdcopy's `--progress=FD` writes them.

use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::{BinaryBytes, ProgressDrawTarget, ProgressState, ProgressStyle, TermLike};
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

/// The progress bar of `-p`: one line on standard error with the
/// percentage, bytes done and the total, the rate, the elapsed time and an
/// estimate of the time left, redrawn in place by `indicatif`.
///
/// When standard error is not a terminal (a log file, a pipe to another
/// program) nothing is written during the copy and only the final line at
/// the end, drawn by the same code into memory.
///
/// [`update`](Self::update) is called from worker threads once per batch;
/// it costs two atomic operations, and a lock at most once a millisecond
/// (indicatif's own rate limit) while drawing is limited to 20 times a
/// second.
pub struct ProgressBar {
    bar: indicatif::ProgressBar,
    /// The most bytes reported so far: reports from different workers can
    /// arrive out of order, and the bar must not go backwards.
    done: AtomicU64,
    /// Set once the bar has been told the source's size.
    sized: AtomicBool,
    /// Where the bar is drawn when standard error is not a terminal.
    captured: Option<Arc<Mutex<String>>>,
}

/// How a copy ended, for [`ProgressBar::finish`].
pub enum Outcome {
    /// Complete, with this many bytes copied.
    Complete(u64),
    /// Failed or interrupted: the bar stays where it got to.
    Stopped,
}

/// The bar while the copy runs, source size known.
const LIVE: &str = "[{wide_bar}] {pct:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {elapsed_precise} ETA {eta_precise}";
/// The bar while the copy runs, size unknown (a pipe).
const LIVE_UNSIZED: &str = "{binary_bytes} {binary_bytes_per_sec} {elapsed_precise}";
/// The last line, source size known: the average rate, no estimate.
const FINAL: &str =
    "[{wide_bar}] {pct:>3}% {binary_bytes}/{binary_total_bytes} in {elapsed_precise}, {average}";
/// The last line, size unknown.
const FINAL_UNSIZED: &str = "{binary_bytes} in {elapsed_precise}, {average}";

/// Width of the line drawn into memory when standard error is not a
/// terminal; trailing blanks are trimmed before it is written.
const CAPTURE_WIDTH: u16 = 100;

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>-")
        // Whole percent done, rounded down: 100% only at the end.
        .with_key("pct", |s: &ProgressState, w: &mut dyn fmt::Write| {
            let pct = match s.len() {
                Some(0) | None => 100,
                Some(len) => (s.pos().min(len) as u128 * 100 / len as u128) as u64,
            };
            let _ = write!(w, "{pct}");
        })
        .with_key("average", |s: &ProgressState, w: &mut dyn fmt::Write| {
            let secs = s.elapsed().as_secs_f64().max(1e-6);
            let _ = write!(w, "{}/s", BinaryBytes((s.pos() as f64 / secs) as u64));
        })
}

/// Whether a bar redrawn in place can be shown on standard error.
fn stderr_is_live() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

impl Default for ProgressBar {
    fn default() -> Self {
        ProgressBar::new()
    }
}

impl ProgressBar {
    /// A bar that starts timing now: redrawn in place on a terminal, else
    /// only its final line.
    pub fn new() -> ProgressBar {
        ProgressBar::with_live(stderr_is_live())
    }

    fn with_live(live: bool) -> ProgressBar {
        let (target, captured) = if live {
            (ProgressDrawTarget::stderr(), None)
        } else {
            let line = Arc::new(Mutex::new(String::new()));
            let target =
                ProgressDrawTarget::term_like_with_hz(Box::new(Capture { line: line.clone() }), 1);
            (target, Some(line))
        };
        let bar = indicatif::ProgressBar::with_draw_target(None, target);
        bar.set_style(style(LIVE_UNSIZED));
        ProgressBar {
            bar,
            done: AtomicU64::new(0),
            sized: AtomicBool::new(false),
            captured,
        }
    }

    /// Report progress.
    pub fn update(&self, p: Progress) {
        if let Some(total) = p.total {
            if !self.sized.swap(true, Ordering::Relaxed) {
                // The style first: setting the length draws.
                self.bar.set_style(style(LIVE));
                self.bar.set_length(total);
            }
        }
        let done = self.done.fetch_max(p.done, Ordering::Relaxed).max(p.done);
        self.bar.set_position(done);
    }

    /// Draw the final state and end the line; when standard error is not
    /// a terminal, this is the one line written.
    pub fn finish(&self, outcome: Outcome) {
        self.finish_to(outcome, &mut std::io::stderr().lock());
    }

    /// [`finish`](Self::finish), writing what is not drawn by indicatif to
    /// `err`.
    fn finish_to(&self, outcome: Outcome, err: &mut dyn Write) {
        match outcome {
            Outcome::Complete(bytes) => {
                // The whole source is done, whatever the last report said,
                // and a stream's size is now known.
                self.bar.set_length(bytes);
                self.bar.set_position(bytes);
                self.bar.set_style(style(FINAL));
                self.bar.finish();
            }
            Outcome::Stopped
                if !self.sized.load(Ordering::Relaxed)
                    && self.done.load(Ordering::Relaxed) == 0 =>
            {
                // Stopped before anything was copied (a server that would
                // not start, say): no bar at all, just the error.
                self.bar.finish_and_clear();
                return;
            }
            Outcome::Stopped => {
                let sized = self.sized.load(Ordering::Relaxed);
                self.bar
                    .set_style(style(if sized { FINAL } else { FINAL_UNSIZED }));
                self.bar.abandon();
            }
        }
        match &self.captured {
            Some(line) => {
                let text = line
                    .lock()
                    .map(|l| l.trim_end().to_owned())
                    .unwrap_or_default();
                let _ = writeln!(err, "{text}");
            }
            // indicatif leaves the cursor after the line it drew.
            None => {
                let _ = writeln!(err);
            }
        }
        let _ = err.flush();
    }
}

/// A terminal in memory that keeps the line being drawn.
#[derive(Debug)]
struct Capture {
    line: Arc<Mutex<String>>,
}

impl Capture {
    fn edit(&self, f: impl FnOnce(&mut String)) -> std::io::Result<()> {
        if let Ok(mut line) = self.line.lock() {
            f(&mut line);
        }
        Ok(())
    }
}

impl TermLike for Capture {
    fn width(&self) -> u16 {
        CAPTURE_WIDTH
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.edit(|line| *line = s.to_owned())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.edit(|line| match s.rfind('\r') {
            Some(i) => *line = s[i + 1..].to_owned(),
            None => line.push_str(s),
        })
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.edit(String::clear)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
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

    /// What `finish` writes, which must be exactly one line.
    fn finish(bar: &ProgressBar, outcome: Outcome) -> String {
        let mut out = Vec::new();
        bar.finish_to(outcome, &mut out);
        let text = String::from_utf8(out).unwrap();
        let line = text.strip_suffix('\n').unwrap();
        assert!(!line.contains(['\r', '\n']), "{text:?}");
        line.to_owned()
    }

    #[test]
    fn templates_parse() {
        for t in [LIVE, LIVE_UNSIZED, FINAL, FINAL_UNSIZED] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }

    #[test]
    fn without_a_terminal_the_final_line_has_total_and_time() {
        let bar = ProgressBar::with_live(false);
        for done in [1 << 20, 3 << 20, 2 << 20] {
            bar.update(Progress {
                done,
                total: Some(4 << 20),
            });
        }
        let line = finish(&bar, Outcome::Complete(4 << 20));
        assert!(line.starts_with("[####"), "{line}");
        assert!(
            line.contains("] 100% 4.00 MiB/4.00 MiB in 00:00:0"),
            "{line}"
        );
        assert!(
            line.ends_with(" MiB/s") || line.ends_with(" GiB/s"),
            "{line}"
        );
    }

    #[test]
    fn a_stopped_copy_shows_where_it_got_to() {
        let bar = ProgressBar::with_live(false);
        bar.update(Progress {
            done: 1 << 20,
            total: Some(4 << 20),
        });
        bar.update(Progress {
            done: 1 << 19,
            total: Some(4 << 20),
        });
        let line = finish(&bar, Outcome::Stopped);
        assert!(line.contains("  25% 1.00 MiB/4.00 MiB in "), "{line}");
        let stream = ProgressBar::with_live(false);
        stream.update(Progress {
            done: 5 << 20,
            total: None,
        });
        let line = finish(&stream, Outcome::Stopped);
        assert!(line.starts_with("5.00 MiB in 00:00:0"), "{line}");
        // Stopped before any progress: nothing at all.
        let mut out = Vec::new();
        ProgressBar::with_live(false).finish_to(Outcome::Stopped, &mut out);
        assert!(out.is_empty());
    }
}
