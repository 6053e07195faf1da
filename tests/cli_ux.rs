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

/// nbdcopy 1.24's long options: those of its manual page, and the two it
/// prints for shell completion without documenting them.
const NBDCOPY_1_24_LONG_OPTIONS: &[&str] = &[
    "--allocated",
    "--blkhash",
    "--blkhash-file",
    "--connections",
    "--destination-is-zero",
    "--flush",
    "--help",
    "--no-extents",
    "--progress",
    "--queue-size",
    "--request-size",
    "--requests",
    "--sparse",
    "--synchronous",
    "--target-is-zero",
    "--threads",
    "--verbose",
    "--version",
    "--long-options",
    "--short-options",
];

/// nbdcopy 1.24's short options (`C:pR:S:T:vV`) and the long option each
/// stands for.
const NBDCOPY_1_24_SHORT_OPTIONS: &[(&str, &str)] = &[
    ("-C", "--connections"),
    ("-p", "--progress"),
    ("-R", "--requests"),
    ("-S", "--sparse"),
    ("-T", "--threads"),
    ("-v", "--verbose"),
    ("-V", "--version"),
];

/// The options README.md's "Differences from nbdcopy 1.24" table lists:
/// the first code span of each row, up to `=` or `[`.
fn options_readme_lists_as_differing() -> Vec<String> {
    let readme = repo_file("README.md");
    let start = readme
        .find("### Differences from nbdcopy 1.24")
        .expect("README.md has a 'Differences from nbdcopy 1.24' section");
    let section = &readme[start..];
    let table = section
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2); // the header and its rule
    table
        .map(|row| {
            let cell = row.split('|').nth(1).unwrap_or_default();
            let code = cell.split('`').nth(1).unwrap_or_default();
            code.split(['=', '[', ' '])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// `nbdcp -v ARGS` from nbdkit `memory SIZE` to `null:`: the number of
/// workers it says it used.
fn workers_used(args: &[&str]) -> usize {
    let server = Server::nbdkit(&["memory", "256M"]);
    let uri = server.uri();
    let mut all = vec!["-v"];
    all.extend_from_slice(args);
    all.extend([uri.as_str(), "null:"]);
    let out = run(&all);
    assert!(out.status.success(), "{all:?}: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let words: Vec<&str> = stderr.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "worker(s)")
        .unwrap_or_else(|| panic!("-v does not say the workers: {stderr}"));
    words[at - 1].parse().unwrap()
}

/// Copy an nbdkit `memory 8M` disk (all holes) to a file with `args` and
/// return the bytes the file has allocated.
fn allocated_after_copy(args: &[&str]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let server = Server::nbdkit(&["memory", "8M"]);
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.img");
    let uri = server.uri();
    let mut all = args.to_vec();
    all.extend([uri.as_str(), out_path.to_str().unwrap()]);
    let out = run(&all);
    assert!(out.status.success(), "{all:?}: {out:?}");
    let meta = std::fs::metadata(&out_path).unwrap();
    assert_eq!(meta.len(), 8 << 20);
    meta.blocks() * 512
}

/// The nbdkit log filter's lines for a copy from `memory 8M` with `args`
/// to `null:`, with the log on `dir`.
fn nbdkit_log_of_copy(args: &[&str], to_server: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("nbdkit.log");
    let logfile = format!("logfile={}", log.display());
    let logged = Server::nbdkit(&["--filter=log", "memory", "8M", &logfile]);
    let other = Server::nbdkit(&["memory", "8M"]);
    let (src, dst) = if to_server {
        (other.uri(), logged.uri())
    } else {
        (logged.uri(), "null:".to_owned())
    };
    let mut all = args.to_vec();
    all.extend([src.as_str(), dst.as_str()]);
    let out = run(&all);
    assert!(out.status.success(), "{all:?}: {out:?}");
    std::fs::read_to_string(&log).unwrap_or_default()
}

/// The largest `count=` of the log's requests named `request`.
fn largest_request(log: &str, request: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(&format!(" {request} id=")))
        .filter_map(|l| l.split("count=0x").nth(1))
        .filter_map(|c| u64::from_str_radix(c.split_whitespace().next()?, 16).ok())
        .max()
        .unwrap_or(0)
}

/// Check that nbdcp gives `option` nbdcopy's meaning, by what a copy with
/// it does where that can be seen from outside.
fn check_same_meaning(option: &str) {
    let usage_error = |args: &[&str]| {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} must be refused: {out:?}"
        );
    };
    match option {
        "--allocated" => {
            assert!(allocated_after_copy(&[]) < 1 << 20, "holes by default");
            assert!(allocated_after_copy(&["--allocated"]) >= 8 << 20);
        }
        "--connections" => {
            assert_eq!(workers_used(&["--connections=1", "-T", "4"]), 1);
            assert_eq!(workers_used(&["--connections", "2", "-T", "4"]), 2);
            usage_error(&["--connections=0", "a", "b"]);
        }
        "--threads" => {
            assert_eq!(workers_used(&["--threads=1", "-C", "4"]), 1);
            assert_eq!(workers_used(&["--threads=2", "-C", "4"]), 2);
        }
        "--synchronous" => {
            assert_eq!(workers_used(&["--synchronous", "-C", "4", "-T", "4"]), 1);
        }
        "--destination-is-zero" | "--target-is-zero" => {
            // A disk of zeroes copied over data: with the option nothing
            // is sent, so the data stays.
            let dest = Server::nbdkit(&["memory", "1M"]);
            let zeroes = Server::nbdkit(&["memory", "1M"]);
            let pattern = Server::nbdkit(&["pattern", "1M"]);
            let dir = tempfile::tempdir().unwrap();
            let back = dir.path().join("back.img");
            let copy = |args: &[&str]| {
                let out = run(args);
                assert!(out.status.success(), "{args:?}: {out:?}");
            };
            let readback = || {
                copy(&[&dest.uri(), back.to_str().unwrap()]);
                std::fs::read(&back).unwrap()
            };
            copy(&[&pattern.uri(), &dest.uri()]);
            let data = readback();
            assert!(data.iter().any(|&b| b != 0));
            copy(&[option, &zeroes.uri(), &dest.uri()]);
            assert_eq!(readback(), data, "{option} zeroed the destination");
            copy(&[&zeroes.uri(), &dest.uri()]);
            assert!(
                readback().iter().all(|&b| b == 0),
                "not zeroed without {option}"
            );
        }
        "--blkhash" | "--blkhash-file" => {
            // nbdcopy 1.24's own vector (copy-blkhash-known.sh): md5 of
            // "hello" in 64 KiB blocks.
            require("nbdkit");
            let source = ["--", "[", "nbdkit", "data", "data=\"hello\"", "]", "null:"];
            let out = run(&[&["--blkhash=md5"][..], &source].concat());
            assert!(out.status.success(), "{out:?}");
            assert_eq!(stdout_lines(&out), ["f741ac9ce55f5325906bb14e9c05d467"]);
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("hash");
            let flag = format!("--blkhash-file={}", file.display());
            let out = run(&[&["--blkhash=md5", flag.as_str()][..], &source].concat());
            assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
            assert_eq!(
                std::fs::read_to_string(&file).unwrap(),
                "f741ac9ce55f5325906bb14e9c05d467\n"
            );
        }
        "--flush" => {
            let log = nbdkit_log_of_copy(&["--flush"], true);
            assert!(log.contains(" Flush id="), "--flush did not flush:\n{log}");
            let log = nbdkit_log_of_copy(&["--no-flush"], true);
            assert!(!log.contains(" Flush id="), "--no-flush flushed:\n{log}");
        }
        "--no-extents" => {
            let log = nbdkit_log_of_copy(&[], false);
            assert!(
                log.contains(" Extents id="),
                "no block status asked:\n{log}"
            );
            let log = nbdkit_log_of_copy(&["--no-extents"], false);
            assert!(!log.contains(" Extents id="), "--no-extents asked:\n{log}");
            assert!(log.contains(" Read id="));
        }
        "--request-size" => {
            let log = nbdkit_log_of_copy(&["--no-extents", "--request-size=65536"], false);
            assert_eq!(largest_request(&log, "Read"), 65536, "{log}");
            let log = nbdkit_log_of_copy(&["--no-extents", "--request-size", "128K"], false);
            assert_eq!(largest_request(&log, "Read"), 128 << 10, "{log}");
            usage_error(&["--request-size=3000", "a", "b"]);
        }
        "--queue-size" => {
            // Bytes in flight cannot be seen from outside; it is taken,
            // and below the request size raised to it, as nbdcopy does.
            nbdkit_log_of_copy(&["--queue-size=1048576"], false);
            nbdkit_log_of_copy(&["--queue-size=64K", "--request-size=1M"], false);
        }
        "--requests" => {
            nbdkit_log_of_copy(&["--requests=1"], false);
            nbdkit_log_of_copy(&["--requests", "8"], false);
            usage_error(&["--requests=0", "a", "b"]);
        }
        "--sparse" => {
            // Read as data (no extents), zero blocks still become holes,
            // unless detection is off.
            assert!(allocated_after_copy(&["--no-extents", "--sparse=4096"]) < 1 << 20);
            assert!(allocated_after_copy(&["--no-extents", "--sparse=0"]) >= 8 << 20);
        }
        "--progress" => {
            let server = Server::nbdkit(&["pattern", "4M"]);
            let out = run(&["--progress", &server.uri(), "null:"]);
            assert!(out.status.success(), "{out:?}");
            assert!(String::from_utf8_lossy(&out.stderr).contains("] 100% "));
            // --progress=FD: N/100 lines from 0/100 to 100/100.
            let dir = tempfile::tempdir().unwrap();
            let lines = dir.path().join("progress");
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "'{}' --progress=3 '{}' null: 3>'{}'",
                    env!("CARGO_BIN_EXE_nbdcp"),
                    server.uri(),
                    lines.display()
                ))
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let text = std::fs::read_to_string(&lines).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.first(), Some(&"0/100"), "{text}");
            assert_eq!(lines.last(), Some(&"100/100"), "{text}");
            assert!(lines.iter().all(|l| l.ends_with("/100")), "{text}");
            // As with getopt, a value must follow '=': `--progress 3` is
            // a bar and an endpoint named 3.
            usage_error(&["--progress", "3", "a", "b"]);
        }
        "--verbose" => {
            let server = Server::nbdkit(&["memory", "1M"]);
            let quiet = run(&[&server.uri(), "null:"]);
            assert!(
                quiet.status.success() && quiet.stderr.is_empty(),
                "{quiet:?}"
            );
            let verbose = run(&["--verbose", &server.uri(), "null:"]);
            assert!(verbose.status.success(), "{verbose:?}");
            assert!(String::from_utf8_lossy(&verbose.stderr).contains("copied"));
        }
        "--help" => {
            let out = run(&["--help"]);
            assert_eq!(out.status.code(), Some(0));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("Usage: nbdcp") && text.contains("--connections"));
        }
        "--version" => {
            let out = run(&["--version"]);
            assert_eq!(out.status.code(), Some(0));
            assert!(String::from_utf8_lossy(&out.stdout).starts_with("nbdcp "));
        }
        "--long-options" | "--short-options" => {
            let out = run(&[option]);
            assert_eq!(out.status.code(), Some(0));
            assert!(!stdout_lines(&out).is_empty());
        }
        other => panic!(
            "no check that {other} means what nbdcopy's does: add one here, or list it in \
             README.md's 'Differences from nbdcopy 1.24' with the reason"
        ),
    }
}

#[test]
fn nbdcopy_options_are_taken_with_the_same_meaning_or_listed_in_readme() {
    require("nbdkit");
    let differing = options_readme_lists_as_differing();
    for option in &differing {
        assert!(
            NBDCOPY_1_24_LONG_OPTIONS.contains(&option.as_str()),
            "README lists {option:?}, which is not an nbdcopy 1.24 option"
        );
    }
    let long = stdout_lines(&run(&["--long-options"]));
    for &option in NBDCOPY_1_24_LONG_OPTIONS {
        if differing.iter().any(|d| d == option) {
            continue;
        }
        assert!(
            long.iter().any(|l| l == option) || option.ends_with("-options"),
            "nbdcp does not take nbdcopy's {option}"
        );
        check_same_meaning(option);
    }
    let short = stdout_lines(&run(&["--short-options"]));
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).into_owned();
    for &(option, long) in NBDCOPY_1_24_SHORT_OPTIONS {
        assert!(
            short.iter().any(|s| s == option),
            "nbdcp does not take {option}"
        );
        assert!(
            help.contains(&format!("{option}, {long}")),
            "{option} is not {long} in --help"
        );
    }
    // Short options stand for the same thing when used.
    assert_eq!(workers_used(&["-C", "1", "-T", "4"]), 1);
    assert_eq!(workers_used(&["-T1", "-C", "4"]), 1);
}
