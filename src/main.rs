//! The `nbdcp` command: parse, copy, exit.

fn main() {
    let args = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    std::process::exit(nbdcp::cli::run(args));
}
