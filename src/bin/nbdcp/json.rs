//! `--progress=json:FD`: one JSON object a line on a file descriptor, for
//! programs. Each has an `event`: `start`, `progress` (at least once a
//! second and when a segment completes), `retry`, and one final `done` or
//! `error` with the exit status. The schema is in README.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nbdcp::{CopyStats, Error, Event};

/// Writes the events to a descriptor nbdcp owns.
pub struct JsonProgress {
    out: Mutex<File>,
}

/// `text` as a JSON string, quotes included.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn number_or_null(n: Option<u64>) -> String {
    n.map_or_else(|| "null".to_string(), |n| n.to_string())
}

fn seconds(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// One event as its line.
pub fn line(event: &Event) -> String {
    match event {
        Event::Start {
            source,
            destination,
            size,
            connections,
            request_size,
        } => format!(
            r#"{{"event":"start","source":{},"destination":{},"size":{},"connections":{connections},"request_size":{request_size}}}"#,
            quoted(source),
            quoted(destination),
            number_or_null(*size),
        ),
        Event::Progress {
            done,
            total,
            written,
            zeroed,
            skipped,
            elapsed,
        } => {
            let secs = elapsed.as_secs_f64();
            let rate = if secs > 0.0 { *done as f64 / secs } else { 0.0 };
            let eta = match total {
                Some(t) if rate > 0.0 => format!("{:.1}", t.saturating_sub(*done) as f64 / rate),
                _ => "null".to_string(),
            };
            format!(
                r#"{{"event":"progress","done":{done},"total":{},"written":{written},"zeroed":{zeroed},"skipped":{skipped},"rate":{},"eta_s":{eta},"elapsed_s":{}}}"#,
                number_or_null(*total),
                rate as u64,
                seconds(*elapsed),
            )
        }
        Event::Retry {
            endpoint,
            offset,
            error,
        } => format!(
            r#"{{"event":"retry","endpoint":{},"offset":{offset},"error":{}}}"#,
            quoted(endpoint),
            quoted(error)
        ),
        // Events added to the library later are not ours to describe.
        _ => String::new(),
    }
}

impl JsonProgress {
    /// Take ownership of `fd`.
    ///
    /// # Safety
    /// `fd` must be an open file descriptor that nothing else owns.
    pub unsafe fn from_raw_fd(fd: i32) -> JsonProgress {
        // SAFETY: the caller hands over ownership of an open descriptor.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        JsonProgress {
            out: Mutex::new(file),
        }
    }

    fn write(&self, line: &str) {
        if line.is_empty() {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A reader that went away must not fail the copy.
        let _ = writeln!(out, "{line}");
    }

    /// Write one library event.
    pub fn event(&self, event: &Event) {
        self.write(&line(event));
    }

    /// The copy succeeded with `stats`; `status` is the exit status.
    pub fn done(&self, stats: &CopyStats, status: i32) {
        let blkhash = stats.blkhash.as_ref().map_or(String::new(), |h| {
            format!(r#","blkhash":{}"#, quoted(&h.to_hex()))
        });
        self.write(&format!(
            r#"{{"event":"done","status":{status},"bytes":{},"written":{},"zeroed":{},"resumed":{},"elapsed_s":{}{blkhash}}}"#,
            stats.bytes,
            stats.written,
            stats.zeroed,
            stats.resumed,
            seconds(stats.elapsed)
        ));
    }

    /// The copy failed (or was interrupted) with `status`.
    pub fn error(&self, message: &str, error: Option<&Error>, status: i32) {
        let kind = error.map_or("interrupted".to_string(), |e| format!("{:?}", e.kind()));
        self.write(&format!(
            r#"{{"event":"error","status":{status},"kind":{},"error":{}}}"#,
            quoted(&kind.to_lowercase()),
            quoted(message)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_line_of_json_each() {
        let start = line(&Event::Retry {
            endpoint: "nbd://h/\"x\"".into(),
            offset: 4096,
            error: "reset\nagain".into(),
        });
        assert_eq!(
            start,
            r#"{"event":"retry","endpoint":"nbd://h/\"x\"","offset":4096,"error":"reset\nagain"}"#
        );
        assert_eq!(quoted("\u{1}"), r#""\u0001""#);
    }
}
