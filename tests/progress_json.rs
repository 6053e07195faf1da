//! `--progress=json:FD`: one JSON object a line for programs, with a
//! `start`, `progress` at least once a second and per segment, and a final
//! `done` or `error` carrying the exit status.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// The value of `"key":` in a line of nbdcp's JSON (numbers, null, and
/// strings without escapes are enough here).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[at..];
    let end = if let Some(stripped) = rest.strip_prefix('"') {
        return stripped.split('"').next();
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(&rest[..end])
}

fn number(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key} in {line}"))
}

/// Run nbdcp with `--progress=json:3` and fd 3 a file; return the lines.
fn json_run(dir: &Path, args: &[&str]) -> (Finished, Vec<String>) {
    let events = dir.join("events.json");
    let file = std::fs::File::create(&events).unwrap();
    let fd = format!("--progress=json:{}", 3);
    let mut all = vec![fd.as_str()];
    all.extend(args);
    let run = Nbdcp::new(&all).fd3(file).run();
    let text = std::fs::read_to_string(&events).unwrap();
    (run, text.lines().map(str::to_string).collect())
}

#[test]
fn a_copy_tells_start_progress_and_done() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 8 << 20, 31);
    let dst = dir.path().join("dst.img");
    // 8 MiB at 4 MiB/s: about two seconds, so progress comes by the clock.
    let (run, lines) = json_run(dir.path(), &["--rate=4M", s(&src), s(&dst)]);
    run.assert_ok();
    assert_same_bytes(&src, &dst);
    let first = &lines[0];
    assert_eq!(field(first, "event"), Some("start"), "{first}");
    assert_eq!(number(first, "size"), 8 << 20);
    assert_eq!(field(first, "source"), Some(s(&src)));
    let last = lines.last().unwrap();
    assert_eq!(field(last, "event"), Some("done"), "{last}");
    assert_eq!(number(last, "status"), 0);
    let progress: Vec<&String> = lines
        .iter()
        .filter(|l| field(l, "event") == Some("progress"))
        .collect();
    assert!(progress.len() >= 2, "{lines:#?}");
    let mut done = 0;
    for p in &progress {
        let now = number(p, "done");
        assert!(now >= done, "done went back: {lines:#?}");
        done = now;
        for key in ["total", "written", "zeroed", "skipped", "rate"] {
            number(p, key);
        }
        assert!(field(p, "eta_s").is_some(), "{p}");
    }
    let end = progress.last().unwrap();
    assert_eq!(number(end, "done"), 8 << 20);
    assert_eq!(
        number(end, "written") + number(end, "zeroed") + number(end, "skipped"),
        8 << 20,
        "{end}"
    );
}

#[test]
fn a_failed_copy_ends_with_an_error_event() {
    require("nbdkit");
    let dir = tmp();
    let (run, lines) = json_run(
        dir.path(),
        &[
            "--",
            "[",
            "nbdkit",
            "--log=null",
            "--filter=error",
            "pattern",
            "4M",
            "error-pread-rate=1",
            "]",
            "null:",
        ],
    );
    run.assert_clean_failure("nbdkit");
    let last = lines.last().unwrap();
    assert_eq!(field(last, "event"), Some("error"), "{lines:#?}");
    assert_eq!(number(last, "status"), 1);
    assert!(
        field(last, "error").unwrap().contains("read at offset"),
        "{last}"
    );
}

/// A source killed mid-copy and started again: the reconnect is a `retry`
/// event naming the source, and the copy still ends with `done` and the
/// same bytes.
#[test]
fn a_reconnect_is_a_retry_event() {
    let dir = tmp();
    let src = dir.path().join("src.img");
    random_file(&src, 8 << 20, 41);
    let dst = dir.path().join("dst.img");
    let src_file = format!("file={}", s(&src));
    // 1 MiB reads one at a time, 300 ms each: about 2.4 s of copying, so
    // the kill lands in the middle.
    let mut source = Daemon::nbdkit_logged(
        dir.path(),
        Listen::unix(dir.path(), "src.sock"),
        &["-r", "--filter=delay", "file", &src_file, "rdelay=300ms"],
    );
    let uri = source.uri();
    let events = dir.path().join("events.json");
    let file = std::fs::File::create(&events).unwrap();
    let args = [
        "--progress=json:3",
        "-C1",
        "-T1",
        "-R1",
        "--request-size=1M",
        uri.as_str(),
        s(&dst),
    ];
    let mut run = Nbdcp::new(&args).fd3(file).spawn();
    source.wait_for_requests(LogCommand::Read, 1, Duration::from_secs(10));
    assert!(run.is_running(), "the copy ended before the kill");
    source.kill();
    wait_until("nbdcp to retry", Duration::from_secs(10), || {
        run.stderr_so_far().contains("retry 1 of")
    });
    source.restart();
    run.wait(Duration::from_secs(60)).assert_ok_after_warnings();
    assert_same_bytes(&src, &dst);
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let retries: Vec<&&str> = lines
        .iter()
        .filter(|l| field(l, "event") == Some("retry"))
        .collect();
    assert!(!retries.is_empty(), "no retry event in {lines:#?}");
    for retry in &retries {
        assert_eq!(field(retry, "endpoint"), Some(uri.as_str()), "{retry}");
        assert!(number(retry, "offset") < 8 << 20, "{retry}");
        assert!(!field(retry, "error").unwrap_or("").is_empty(), "{retry}");
    }
    let last = lines.last().unwrap();
    assert_eq!(field(last, "event"), Some("done"), "{last}");
    assert_eq!(number(last, "status"), 0);
    assert_eq!(number(last, "bytes"), 8 << 20, "{last}");
}
