//! The `nbdcp` command: parse, copy, exit. The command line, the progress
//! display and signal handling live here, not in the library: an
//! embedder's process keeps its own signals and its own output.

/// `eprintln!` in one write: a server started as a subprocess shares
/// nbdcp's stderr, and `eprintln!` writes a formatted line in pieces, so
/// the server's own output could land inside nbdcp's one-line error.
/// One `write` of a short line to a pipe is atomic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

mod args;
mod cli;
mod json;
mod progress;
mod signals;

fn main() {
    std::process::exit(cli::run(std::env::args_os().collect()));
}
