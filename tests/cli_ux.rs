//! What users of the command line expect around the copy: the option
//! lists that shell completion reads, the progress bar, the manual page,
//! and nbdcopy's own options.

mod common;
use common::*;

use std::process::Output;

/// Run nbdcp with `args` and wait for it.
fn run(args: &[&str]) -> Output {
    nbdcp()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run nbdcp {args:?}: {e}"))
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The long options `nbdcp --help` shows, in the order shown.
fn long_options_in_help() -> Vec<String> {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut found = Vec::new();
    for word in help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        if let Some(name) = word.strip_prefix("--") {
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                let option = format!("--{name}");
                if !found.contains(&option) {
                    found.push(option);
                }
            }
        }
    }
    found
}

#[test]
fn long_options_prints_one_option_a_line_and_exits_0() {
    let out = run(&["--long-options"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
    let lines = stdout_lines(&out);
    // libnbd's test-long-options.sh asks for these of nbdcopy.
    for want in ["--allocated", "--threads", "--version"] {
        assert!(lines.iter().any(|l| l == want), "{want} not in {lines:?}");
    }
    for line in &lines {
        assert!(
            line.starts_with("--") && !line.contains(char::is_whitespace),
            "not a long option: {line:?}"
        );
    }
    // Every long option the help mentions is one nbdcp takes, and listed.
    for option in long_options_in_help() {
        assert!(
            lines.contains(&option),
            "{option} is in --help, not in --long-options"
        );
    }
}

#[test]
fn short_options_prints_one_option_a_line_and_exits_0() {
    let out = run(&["--short-options"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = stdout_lines(&out);
    // libnbd's test-short-options.sh asks for these of nbdcopy.
    for want in ["-C", "-R", "-V"] {
        assert!(lines.iter().any(|l| l == want), "{want} not in {lines:?}");
    }
    for line in &lines {
        assert!(
            line.len() == 2 && line.starts_with('-') && line != "--",
            "not a short option: {line:?}"
        );
    }
    // Each one is an option clap accepts: `-X --help` is not an unknown
    // option error whatever X takes.
    for line in &lines {
        let out = run(&[line.as_str(), "--version"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("unexpected argument"), "{line}: {stderr}");
    }
}

#[test]
fn option_lists_do_not_read_server_words_or_what_follows_double_dash() {
    // `--long-options` inside a server command is the server's word.
    let out = run(&["[", "nbdkit", "--long-options", "]", "null:", "-C", "0"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&["--", "--long-options"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
