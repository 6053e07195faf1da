//! The `nbdcp` command: parse, copy, exit. The command line, the progress
//! display and signal handling live here, not in the library: an
//! embedder's process keeps its own signals and its own output.

mod args;
mod cli;
mod json;
mod progress;
mod signals;

fn main() {
    std::process::exit(cli::run(std::env::args_os().collect()));
}
