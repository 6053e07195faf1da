//! What users of the command line expect around the copy: the option
//! lists that shell completion reads, the progress bar, the manual page,
//! and nbdcopy's own options.

mod common;
use common::*;

use std::process::{Command, Output, Stdio};

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

/// The final line of the bar: `[###] 100% 64.00 MiB/64.00 MiB in 00:00:00, 1.2 GiB/s`.
fn assert_final_bar_line(line: &str, size: &str) {
    assert!(
        line.starts_with("[#") && line.contains("#] 100% "),
        "{line:?}"
    );
    assert!(
        line.contains(&format!(" {size}/{size} in ")),
        "no total {size}: {line:?}"
    );
    assert!(line.ends_with("iB/s") || line.ends_with(" B/s"), "{line:?}");
    assert!(
        !line.contains(['\r', '\x1b', '\t']),
        "control characters in {line:?}"
    );
}

#[test]
fn progress_bar_without_a_terminal_writes_only_the_final_line() {
    let server = Server::nbdkit(&["pattern", "64M"]);
    for flag in ["-p", "--progress"] {
        let out = run(&[flag, &server.uri(), "null:"]);
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.split_inclusive('\n').collect();
        assert_eq!(lines.len(), 1, "{stderr:?}");
        let line = lines[0].strip_suffix('\n').expect("the line is ended");
        assert_final_bar_line(line, "64.00 MiB");
    }
}

#[test]
fn progress_bar_of_a_stream_shows_the_bytes_copied() {
    use std::io::Write;
    let mut child = nbdcp()
        .args(["-p", "-", "null:"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&vec![7u8; 3 << 20]));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert_final_bar_line(stderr.trim_end(), "3.00 MiB");
}

#[test]
fn progress_bar_is_silent_when_nothing_was_copied() {
    // A copy that fails before any byte moved: only the error.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let out = run(&["-p", missing.to_str().unwrap(), "null:"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.starts_with("nbdcp: "), "{stderr:?}");
}

#[test]
fn progress_bar_on_a_terminal_is_redrawn_in_place() {
    // script(1) gives nbdcp a pseudo-terminal as its standard error.
    require("script");
    let server = Server::nbdkit(&["pattern", "256M"]);
    let command = format!(
        "'{}' -p '{}' null:",
        env!("CARGO_BIN_EXE_nbdcp"),
        server.uri()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // Each redraw goes back to the start of the line and clears it.
    let draws: Vec<&str> = text.split("\r\x1b[2K").collect();
    assert!(draws.len() >= 2, "not redrawn: {text:?}");
    assert!(
        draws
            .iter()
            .any(|d| d.contains(" ETA ") && d.contains("/256.00 MiB")),
        "no live line with the total and an ETA: {text:?}"
    );
    let last = draws.last().unwrap().trim_end();
    assert_final_bar_line(last, "256.00 MiB");
}

/// A file of the workspace, read whole.
fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The long options a roff manual page mentions (`\-\-name`), once each.
fn long_options_in_man_page(roff: &str) -> Vec<String> {
    let text = roff.replace("\\-", "-");
    let mut found = Vec::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
        if let Some(name) = word.strip_prefix("--") {
            if name.len() > 1 && name.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
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
fn manual_page_and_long_options_name_the_same_options() {
    let listed = stdout_lines(&run(&["--long-options"]));
    let man = long_options_in_man_page(&repo_file("doc/nbdcp.1"));
    for option in &man {
        assert!(
            listed.contains(option),
            "{option} is in nbdcp(1), not in --long-options"
        );
    }
    for option in &listed {
        assert!(man.contains(option), "{option} is not in nbdcp(1)");
    }
}

#[test]
fn manual_page_has_what_a_reader_looks_for() {
    let roff = repo_file("doc/nbdcp.1");
    let text = roff.replace("\\-", "-");
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "ENDPOINTS",
        "EXIT STATUS",
        "EXAMPLES",
        "SEE ALSO",
    ] {
        assert!(
            text.contains(&format!(".SH \"{section}\""))
                || text.contains(&format!(".SH {section}\n")),
            "no {section} section"
        );
    }
    for endpoint in ["nbd://", "nbd+unix://", "[ CMD ARGS ... ]", "null:", "FILE"] {
        assert!(text.contains(endpoint), "{endpoint} not described");
    }
    for status in ["0", "1", "2", "130, 143"] {
        assert!(
            text.contains(&format!("\n.B {status}\n"))
                || text.contains(&format!("\\fB{status}\\fR")),
            "exit status {status}"
        );
    }
    // Every option has its meaning, not just its name: clap_mangen puts
    // the help after each option's .TP line.
    assert!(!text.contains(".TP\n.TP"), "an option without a meaning");
    // groff reads it without a warning.
    require("groff");
    let out = Command::new("groff")
        .args(["-man", "-ww", "-z"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("doc/nbdcp.1"))
        .output()
        .unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
}

#[test]
fn bash_completion_completes_options() {
    require("bash");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("completions/nbdcp.bash");
    let complete = |word: &str| -> Vec<String> {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{}' && COMP_WORDS=(nbdcp {word}) COMP_CWORD=1 && _nbdcp nbdcp {word} nbdcp && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        stdout_lines(&out)
    };
    assert_eq!(complete("--all"), ["--allocated"]);
    assert_eq!(complete("--target"), ["--target-is-zero"]);
    let long = complete("--");
    for option in stdout_lines(&run(&["--long-options"])) {
        assert!(long.contains(&option), "{option} not completed: {long:?}");
    }
}
