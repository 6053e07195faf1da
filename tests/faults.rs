//! Faults with real servers: errors the server reports (reads, writes,
//! zeroes, flush, block status), servers killed mid-copy on either side,
//! on Unix sockets and TCP, with one and four connections, servers that
//! restart mid-copy, stalls, and signals.
//!
//! Every failure must end cleanly: status 1 within a bounded time, one
//! `nbdcp: ` line naming the endpoint at fault, no panic text, nothing
//! left running. After a data-path fault a re-run must give a
//! byte-identical copy. Scripted peers that break the protocol are in
//! `faults_peers.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;

/// Size of [`shared_image`]: two 128 MiB segments, so that -C 4 has two
/// workers copying at once.
const SHARED_SIZE: u64 = 160 * MIB;

/// A mixed image of [`SHARED_SIZE`] bytes, generated once per test run in
/// cargo's scratch directory and only ever read by the tests.
fn shared_image() -> &'static (PathBuf, Vec<Segment>) {
    static IMAGE: OnceLock<(PathBuf, Vec<Segment>)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("faults-mixed-160M.img");
        // Written under another name and renamed, so that a concurrent
        // run never sees half an image.
        let tmp = dir.join(format!("faults-mixed-160M.{}.tmp", std::process::id()));
        let segments = mixed_image(&tmp, SHARED_SIZE, 6);
        std::fs::rename(&tmp, &path).unwrap();
        (path, segments)
    })
}

/// Panic unless no live process mentions `dir` or any of `uris`.
fn assert_nothing_left(dir: &Path, uris: &[&str]) {
    assert_nothing_mentions(dir);
    for uri in uris {
        let left = processes_mentioning(uri);
        assert!(left.is_empty(), "processes left behind: {left:?}");
    }
}

/// The offset and length in `... at offset O length L: ...`.
fn offset_and_length(line: &str) -> (u64, u64) {
    let rest = line
        .split(" at offset ")
        .nth(1)
        .unwrap_or_else(|| panic!("no offset in: {line}"));
    let mut words = rest.split([' ', ':']);
    let offset = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("length"), "{line}");
    let length = words.next().unwrap().parse().unwrap();
    (offset, length)
}

// ---------------------------------------------------------------------
// Errors the source reports
// ---------------------------------------------------------------------

/// Every read fails with EIO (then 30 % of them): status 1, one line
/// naming the source, the read, its offset and length (server errors are
/// not retried, so no retry lines either). Once the fault is gone, the
/// same command gives a byte-identical copy.
#[test]
fn source_read_errors_then_a_clean_rerun() {
    let d = tmp();
    let size = 8 * MIB;
    let src = d.path().join("src.img");
    random_file(&src, size, 1);
    let out = d.path().join("out.img");
    let inject = d.path().join("inject");
    for rate in ["1", "0.3"] {
        std::fs::write(&inject, b"").unwrap();
        let server = Daemon::nbdkit(
            d.path(),
            Listen::unix(d.path(), "src.sock"),
            &[
                "--filter=error",
                "file",
                &format!("file={}", s(&src)),
                "error-pread=EIO",
                &format!("error-pread-rate={rate}"),
                &format!("error-pread-file={}", s(&inject)),
            ],
        );
        let uri = server.uri();
        // 64 KiB requests: 128 reads, so that at a 30 % rate one fails
        // for certain (8 reads of 1 MiB all succeed one run in 18).
        let args = ["-C", "4", "-T", "4", "--request-size", "64K", &uri, s(&out)];
        let run = run_watched(&args);
        let line = run.assert_clean_failure(&uri);
        assert!(
            line.starts_with(&format!("nbdcp: {uri}: read at offset "))
                && line.ends_with("Input/output error"),
            "{line}"
        );
        let (offset, length) = offset_and_length(line);
        assert!(
            offset < size && length > 0 && offset + length <= size,
            "{line}"
        );

        std::fs::remove_file(&inject).unwrap();
        run_watched(&args).assert_ok();
        assert_same_content(&src, &out);
        drop(server);
    }
    assert_nothing_left(d.path(), &[]);
}

/// One bad 4 KiB block late in the image (nbdkit's ddrescue filter), with
/// one worker and with several: the error names the read that covers the
/// bad block, every other worker stops, and a re-run without the bad block
/// gives a byte-identical copy.
#[test]
fn single_eio_late_in_the_image() {
    let d = tmp();
    let size = SHARED_SIZE;
    let (src, segments) = shared_image();
    // A data block in the last tenth of the image (a hole would be
    // skipped, not read).
    let bad = segments
        .iter()
        .rev()
        .find(|seg| seg.kind == SegmentKind::Data && seg.offset > size * 9 / 10)
        .expect("a data segment late in the image")
        .offset;
    let map = d.path().join("bad.map");
    std::fs::write(
        &map,
        format!(
            "# Mapfile. Created by GNU ddrescue\n\
             0x00000000 + 1\n\
             0x00000000 {:#010x} +\n\
             {:#010x} 0x00001000 -\n\
             {:#010x} {:#010x} +\n",
            bad,
            bad,
            bad + 4096,
            size - bad - 4096
        ),
    )
    .unwrap();
    let out = d.path().join("out.img");
    for conns in ["1", "4"] {
        let server = Daemon::nbdkit(
            d.path(),
            Listen::unix(d.path(), "src.sock"),
            &[
                "-r",
                "--filter=ddrescue",
                "file",
                &format!("file={}", s(src)),
                &format!("ddrescue-mapfile={}", s(&map)),
            ],
        );
        let uri = server.uri();
        let run = run_watched(&["-C", conns, "-T", conns, &uri, s(&out)]);
        let line = run.assert_clean_failure(&uri);
        assert!(line.contains(": read at offset "), "{line}");
        assert!(line.ends_with("Input/output error"), "{line}");
        let (offset, length) = offset_and_length(line);
        assert!(
            offset <= bad && bad < offset + length,
            "the failed read should cover the bad block at {bad}: {line}"
        );
        drop(server);
    }
    // The same file without the bad block.
    let server = Daemon::nbdkit(
        d.path(),
        Listen::unix(d.path(), "src.sock"),
        &["-r", "file", &format!("file={}", s(src))],
    );
    run_watched(&["-C", "4", "-T", "4", &server.uri(), s(&out)]).assert_ok();
    assert_same_content(src, &out);
}

/// Block status failing (always, then half the time) is not worth failing
/// the copy over: nbdcp reads instead, and the copy is exact.
#[test]
fn block_status_errors_degrade_to_reading() {
    let d = tmp();
    let size = 16 * MIB;
    let (src, _) = mixed(d.path(), "src.img", size, 3);
    let out = d.path().join("out.img");
    for rate in ["1", "0.5"] {
        let server = Daemon::nbdkit_logged(
            d.path(),
            Listen::unix(d.path(), "src.sock"),
            &[
                "--filter=error",
                "file",
                &format!("file={}", s(&src)),
                "error-extents=EIO",
                &format!("error-extents-rate={rate}"),
            ],
        );
        for conns in ["1", "4"] {
            let run = run_watched(&["-C", conns, "-T", conns, &server.uri(), s(&out)]);
            // A warning that extents are lost, once, is all it may say.
            run.assert_ok_after_warnings();
            assert!(run.stderr.lines().count() <= 1, "{}", run.stderr);
            assert!(
                run.stderr.is_empty() || run.stderr.contains("without extent information"),
                "{}",
                run.stderr
            );
            assert_same_content(&src, &out);
        }
        // (At 50 % the few requests of these runs may all succeed.)
        assert!(
            rate != "1" || server.log_text().contains("error=EIO"),
            "the error filter should have failed block status requests"
        );
    }
}

// ---------------------------------------------------------------------
// Errors the destination reports
// ---------------------------------------------------------------------

/// A destination whose writes (or zeroes) fail while `inject` exists.
fn failing_destination(dir: &Path, dst: &Path, what: &str, errno: &str, inject: &Path) -> Daemon {
    Daemon::nbdkit(
        dir,
        Listen::unix(dir, "dst.sock"),
        &[
            "--filter=error",
            "file",
            &format!("file={}", s(dst)),
            &format!("error-{what}={errno}"),
            &format!("error-{what}-rate=1"),
            &format!("error-{what}-file={}", s(inject)),
        ],
    )
}

/// Writes, then zero requests, fail on the destination: one line naming
/// it, the operation and where; with the fault gone, the same command
/// leaves a byte-identical destination.
#[test]
fn destination_write_and_zero_errors_then_a_clean_rerun() {
    let d = tmp();
    let size = 8 * MIB;
    let (src, _) = mixed(d.path(), "src.img", size, 4);
    let inject = d.path().join("inject");
    for (what, errno, op, message) in [
        ("pwrite", "ENOSPC", "write", "No space left on device"),
        ("zero", "EIO", "zero", "Input/output error"),
    ] {
        let dst = garbage(d.path(), "dst.img", size);
        std::fs::write(&inject, b"").unwrap();
        let server = failing_destination(d.path(), &dst, what, errno, &inject);
        let uri = server.uri();
        let args = [s(&src), uri.as_str()];
        let run = run_watched(&args);
        let line = run.assert_clean_failure(&uri);
        assert!(
            line.starts_with(&format!("nbdcp: {uri}: {op} at offset ")) && line.ends_with(message),
            "{line}"
        );
        let (offset, length) = offset_and_length(line);
        assert!(offset + length <= size && length > 0, "{line}");

        std::fs::remove_file(&inject).unwrap();
        run_watched(&args).assert_ok();
        assert_same_content(&src, &dst);
        drop(server);
    }
}

/// The destination's flush fails (nbdkit's error filter cannot do that,
/// so the destination is an `sh` plugin script over a file): the copy is
/// not reported as a success; with the fault gone it is exact.
#[test]
fn destination_flush_error_then_a_clean_rerun() {
    let d = tmp();
    let size = 4 * MIB;
    let (src, _) = mixed(d.path(), "src.img", size, 5);
    let dst = garbage(d.path(), "dst.img", size);
    let inject = d.path().join("inject");
    let script = d.path().join("disk.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
DISK='{}'
INJECT='{}'
case "$1" in
  get_size) stat -L -c %s "$DISK" ;;
  can_write|can_flush) exit 0 ;;
  thread_model) echo parallel ;;
  pread) dd if="$DISK" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$DISK" seek=$4 oflag=seek_bytes conv=notrunc status=none ;;
  flush) if [ -e "$INJECT" ]; then echo "EIO injected flush failure" >&2; exit 1; fi ;;
  *) exit 2 ;;
esac
"#,
            s(&dst),
            s(&inject)
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&inject, b"").unwrap();
    let server = Daemon::nbdkit(
        d.path(),
        Listen::unix(d.path(), "dst.sock"),
        &["sh", s(&script)],
    );
    let uri = server.uri();
    for retries in ["0", "5"] {
        let run = run_watched(&["--retries", retries, s(&src), &uri]);
        let line = run.assert_clean_failure(&uri);
        assert_eq!(line, format!("nbdcp: {uri}: flush: Input/output error"));
    }
    std::fs::remove_file(&inject).unwrap();
    run_watched(&[s(&src), &uri]).assert_ok();
    assert_same_content(&src, &dst);
}

// ---------------------------------------------------------------------
// A server killed mid-copy
// ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

fn listen(dir: &Path, name: &str, tcp: bool) -> Listen {
    if tcp {
        Listen::tcp()
    } else {
        Listen::unix(dir, name)
    }
}

/// Copy a slow 1 GiB pattern (20 ms per request: several seconds) and kill
/// the server on `side` with SIGKILL once data flows. nbdcp must fail
/// cleanly, naming that server, within `limit` of the kill: every worker
/// must notice, not only the one whose request failed.
fn killed_mid_copy(side: Side, tcp: bool, conns: &str, retries: Option<&str>, limit: Duration) {
    let d = tmp();
    let slow_source = side == Side::Source;
    let mut source = Daemon::start(
        Program::Nbdkit,
        d.path(),
        listen(d.path(), "src.sock", tcp),
        if slow_source {
            &["--filter=delay", "pattern", "1G", "rdelay=20ms"]
        } else {
            &["pattern", "1G"]
        },
        slow_source,
    );
    let mut destination = Daemon::start(
        Program::Nbdkit,
        d.path(),
        listen(d.path(), "dst.sock", tcp),
        if slow_source {
            &["memory", "1G"]
        } else {
            &["--filter=delay", "memory", "1G", "wdelay=20ms"]
        },
        !slow_source,
    );
    let (src_uri, dst_uri) = (source.uri(), destination.uri());
    let mut args = vec!["-C", conns, "-T", conns];
    if let Some(r) = retries {
        args.extend(["--retries", r]);
    }
    args.extend([src_uri.as_str(), dst_uri.as_str()]);
    let mut run = Watched::spawn(&args);

    let (victim, request) = match side {
        Side::Source => (&mut source, LogCommand::Read),
        Side::Destination => (&mut destination, LogCommand::Write),
    };
    // Data flows on every connection: every worker is busy.
    victim.wait_for_requests(request, conns.parse().unwrap(), Duration::from_secs(10));
    assert!(
        run.is_running(),
        "the copy ended before the server was killed"
    );
    victim.kill();
    let killed = run.elapsed();
    let uri = victim.uri();
    let done = run.wait(HANG_DEADLINE);
    let line = if retries == Some("0") {
        done.assert_clean_failure(&uri)
    } else {
        done.assert_clean_failure_after_retries(&uri)
    };
    assert!(line.starts_with(&format!("nbdcp: {uri}: ")), "{line}");
    assert!(
        done.elapsed - killed < limit,
        "nbdcp {args:?} took {:?} after the kill (limit {limit:?})",
        done.elapsed - killed
    );
    drop(source);
    drop(destination);
    assert_nothing_left(d.path(), &[&src_uri, &dst_uri]);
}

/// Without retries the failure is immediate.
const NO_RETRY_LIMIT: Duration = Duration::from_secs(3);
/// With the default retries (about 3 s of back-off) and no restart.
const RETRY_LIMIT: Duration = Duration::from_secs(10);

#[test]
fn source_killed_unix_c1() {
    killed_mid_copy(Side::Source, false, "1", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn source_killed_unix_c4() {
    killed_mid_copy(Side::Source, false, "4", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn source_killed_tcp_c1() {
    killed_mid_copy(Side::Source, true, "1", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn source_killed_tcp_c4() {
    killed_mid_copy(Side::Source, true, "4", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn destination_killed_unix_c1() {
    killed_mid_copy(Side::Destination, false, "1", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn destination_killed_unix_c4() {
    killed_mid_copy(Side::Destination, false, "4", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn destination_killed_tcp_c1() {
    killed_mid_copy(Side::Destination, true, "1", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn destination_killed_tcp_c4() {
    killed_mid_copy(Side::Destination, true, "4", Some("0"), NO_RETRY_LIMIT);
}

#[test]
fn source_killed_with_default_retries_unix_c4() {
    killed_mid_copy(Side::Source, false, "4", None, RETRY_LIMIT);
}

#[test]
fn source_killed_with_default_retries_tcp_c1() {
    killed_mid_copy(Side::Source, true, "1", None, RETRY_LIMIT);
}

#[test]
fn destination_killed_with_default_retries_tcp_c4() {
    killed_mid_copy(Side::Destination, true, "4", None, RETRY_LIMIT);
}

#[test]
fn destination_killed_with_default_retries_unix_c1() {
    killed_mid_copy(Side::Destination, false, "1", None, RETRY_LIMIT);
}

/// A server nbdcp started itself dies mid-copy, on `side`: nbdcp cannot
/// restart it, so even with retries on it fails at once, with one line
/// that says how the server ended, and reaps both servers.
fn subprocess_killed_mid_copy(side: Side) {
    require("nbdkit");
    let d = tmp();
    let src_pid = d.path().join("src.pid");
    let dst_pid = d.path().join("dst.pid");
    let (src_pid_s, dst_pid_s) = (s(&src_pid), s(&dst_pid));
    // The slow side, the one killed, logs its requests (log filter
    // outermost), so that the test sees when data flows.
    let log = d.path().join("victim.log");
    let logfile = format!("logfile={}", s(&log));
    let slow = |side_is: Side| -> Vec<&str> {
        if side == side_is {
            vec!["--filter=log", "--filter=delay"]
        } else {
            vec![]
        }
    };
    let mut args = vec!["-C", "4", "-T", "4", "--", "[", "nbdkit", "-P", src_pid_s];
    args.extend(slow(Side::Source));
    args.extend(["pattern", "1G"]);
    if side == Side::Source {
        args.extend(["rdelay=20ms", &logfile]);
    }
    args.extend(["]", "[", "nbdkit", "-P", dst_pid_s]);
    args.extend(slow(Side::Destination));
    args.extend(["memory", "1G"]);
    if side == Side::Destination {
        args.extend(["wdelay=20ms", &logfile]);
    }
    args.push("]");
    let mut run = Watched::spawn(&args);
    let (victim, request) = match side {
        Side::Source => (&src_pid, LogCommand::Read),
        Side::Destination => (&dst_pid, LogCommand::Write),
    };
    let mut pid = 0;
    wait_until("the server's pid file", Duration::from_secs(10), || {
        pid = std::fs::read_to_string(victim)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        pid > 0
    });
    // Data flows on all four connections: every worker is busy.
    wait_until("data to flow", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        log_shows_requests(&text, &request, 4)
    });
    assert!(
        run.is_running(),
        "the copy ended before the server was killed"
    );
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = run.elapsed();
    let done = run.wait(HANG_DEADLINE);
    let name = format!("[ nbdkit -P {} ", s(victim));
    let line = done.assert_clean_failure(&name);
    assert!(
        line.starts_with(&format!("nbdcp: {name}")),
        "name the server command: {line}"
    );
    assert!(
        line.ends_with("(the server was killed by signal 9)"),
        "say why: {line}"
    );
    assert!(
        done.elapsed - killed < NO_RETRY_LIMIT,
        "took {:?} after the kill",
        done.elapsed - killed
    );
    assert_nothing_left(d.path(), &[]);
}

#[test]
fn subprocess_source_killed_mid_copy() {
    subprocess_killed_mid_copy(Side::Source);
}

#[test]
fn subprocess_destination_killed_mid_copy() {
    subprocess_killed_mid_copy(Side::Destination);
}

// ---------------------------------------------------------------------
// A server restarted mid-copy
// ---------------------------------------------------------------------

/// Copy a 160 MiB mixed image (two segments) from a file-backed nbdkit to
/// a file-backed server, kill the server on `side` once data flows and
/// start it again on the same socket or port. With retries on the copy
/// must complete and be byte-identical; with `--retries 0` it must fail
/// cleanly, and a re-run after the restart must be byte-identical.
fn restarted_mid_copy(side: Side, tcp: bool, conns: &str, retries: bool) {
    let d = tmp();
    let size = SHARED_SIZE;
    let src = &shared_image().0;
    let dst = garbage(d.path(), "dst.img", size);
    let src_file = format!("file={}", s(src));
    let dst_file = format!("file={}", s(&dst));
    // The side that is killed is slow, so that the copy is still running:
    // 200 ms, since a slow server gets up to 8 MiB in flight a connection
    // (at 40 ms this copy could end before the kill).
    let (src_args, dst_args): (Vec<&str>, Vec<&str>) = match side {
        Side::Source => (
            vec!["-r", "--filter=delay", "file", &src_file, "rdelay=200ms"],
            vec!["file", &dst_file],
        ),
        Side::Destination => (
            vec!["-r", "file", &src_file],
            vec!["--filter=delay", "file", &dst_file, "wdelay=200ms"],
        ),
    };
    let mut source = Daemon::start(
        Program::Nbdkit,
        d.path(),
        listen(d.path(), "src.sock", tcp),
        &src_args,
        side == Side::Source,
    );
    let mut destination = Daemon::start(
        Program::Nbdkit,
        d.path(),
        listen(d.path(), "dst.sock", tcp),
        &dst_args,
        side == Side::Destination,
    );
    let (src_uri, dst_uri) = (source.uri(), destination.uri());
    let mut args = vec!["-C", conns, "-T", conns];
    if !retries {
        args.extend(["--retries", "0"]);
    }
    args.extend([src_uri.as_str(), dst_uri.as_str()]);
    let mut run = Watched::spawn(&args);
    let (victim, request) = match side {
        Side::Source => (&mut source, LogCommand::Read),
        Side::Destination => (&mut destination, LogCommand::Write),
    };
    // Data flows on every connection that has a segment to copy (two
    // segments: at most two).
    let busy = conns.parse::<usize>().unwrap().min(2);
    victim.wait_for_requests(request, busy, Duration::from_secs(10));
    assert!(
        run.is_running(),
        "the copy ended before the server was killed"
    );
    victim.kill();
    let uri = victim.uri();
    if retries {
        // Down until nbdcp has noticed and is retrying (within the ~3 s
        // the retries allow), then back.
        wait_until("nbdcp to retry", Duration::from_secs(10), || {
            run.stderr_so_far().contains("retry 1 of 5")
        });
        victim.restart();
        let done = run.wait(HANG_DEADLINE);
        done.assert_ok_after_warnings();
        assert!(
            done.stderr.contains("retry 1 of 5"),
            "the copy should have retried:\n{}",
            done.stderr
        );
    } else {
        let done = run.wait(HANG_DEADLINE);
        let line = done.assert_clean_failure(&uri);
        assert!(line.starts_with(&format!("nbdcp: {uri}: ")), "{line}");
        victim.restart();
        run_watched(&args).assert_ok();
    }
    drop(source);
    drop(destination);
    assert_same_content(src, &dst);
    assert_nothing_left(d.path(), &[&src_uri, &dst_uri]);
}

#[test]
fn source_restarted_with_retries_unix_c1() {
    restarted_mid_copy(Side::Source, false, "1", true);
}

#[test]
fn source_restarted_with_retries_tcp_c4() {
    restarted_mid_copy(Side::Source, true, "4", true);
}

#[test]
fn destination_restarted_with_retries_unix_c4() {
    restarted_mid_copy(Side::Destination, false, "4", true);
}

#[test]
fn destination_restarted_with_retries_tcp_c1() {
    restarted_mid_copy(Side::Destination, true, "1", true);
}

#[test]
fn source_restarted_without_retries_fails_then_reruns() {
    restarted_mid_copy(Side::Source, false, "4", false);
}

#[test]
fn destination_restarted_without_retries_fails_then_reruns() {
    restarted_mid_copy(Side::Destination, true, "4", false);
}

/// qemu-nbd as the destination, killed and restarted on the same socket:
/// its writes are lost or kept at random by the kill, and the copy must
/// still be exact.
#[test]
fn qemu_nbd_destination_restarted_with_retries() {
    let d = tmp();
    let size = 64 * MIB;
    let (src, _) = mixed(d.path(), "src.img", size, 7);
    let dst = garbage(d.path(), "dst.img", size);
    // A slow source keeps the copy going.
    let source = Daemon::nbdkit(
        d.path(),
        Listen::unix(d.path(), "src.sock"),
        &[
            "--filter=delay",
            "file",
            &format!("file={}", s(&src)),
            "rdelay=200ms",
        ],
    );
    let mut destination = Daemon::qemu_nbd(
        d.path(),
        Listen::unix(d.path(), "dst.sock"),
        &["-f", "raw", "--cache=writeback", s(&dst)],
    );
    let mut run = Watched::spawn(&["-C", "2", "-T", "2", &source.uri(), &destination.uri()]);
    // Wait until the first MiB has been written (several requests: the
    // copy is under way).
    let first = std::fs::read(&src).unwrap()[..MIB as usize].to_vec();
    wait_until("the first MiB written", Duration::from_secs(10), || {
        std::fs::read(&dst)
            .map(|b| b[..MIB as usize] == first[..])
            .unwrap_or(false)
    });
    assert!(
        run.is_running(),
        "the copy ended before the server was killed"
    );
    destination.kill();
    // Down until nbdcp has noticed and is retrying, then back.
    wait_until("nbdcp to retry", Duration::from_secs(10), || {
        run.stderr_so_far().contains("retry 1 of 5")
    });
    destination.restart();
    let done = run.wait(HANG_DEADLINE);
    done.assert_ok_after_warnings();
    assert!(
        done.stderr.contains("retry 1 of 5"),
        "the copy should have retried:\n{}",
        done.stderr
    );
    drop(source);
    drop(destination);
    assert_same_content(&src, &dst);
    assert_nothing_left(d.path(), &[]);
}

// ---------------------------------------------------------------------
// A server that stops answering
// ---------------------------------------------------------------------

/// Reads take 30 s: --timeout 1 turns the stall into an error within
/// seconds, with retries off and on.
#[test]
fn timeout_turns_a_stall_into_an_error() {
    let d = tmp();
    let server = Daemon::nbdkit(
        d.path(),
        Listen::unix(d.path(), "src.sock"),
        &["--filter=delay", "pattern", "1M", "delay-read=30"],
    );
    let uri = server.uri();
    let run = run_watched(&["--timeout", "1", "--retries", "0", &uri, "null:"]);
    let line = run.assert_clean_failure(&uri);
    assert!(
        line.contains("read") && line.ends_with("timed out"),
        "{line}"
    );
    assert!(
        run.elapsed < Duration::from_secs(3),
        "took {:?}",
        run.elapsed
    );

    // nbdkit 1.32 can abort ("raw_send_socket: Assertion `sock >= 0'")
    // when a client goes away while the delay filter sleeps: a fresh
    // server for the second half, so that its failure is ours to explain.
    drop(server);
    let server = Daemon::nbdkit(
        d.path(),
        Listen::unix(d.path(), "src2.sock"),
        &["--filter=delay", "pattern", "1M", "delay-read=30"],
    );
    let uri = server.uri();
    // Each retry times out again: 3 × 1 s plus 0.3 s of back-off.
    let run = run_watched(&["--timeout", "1", "--retries", "2", &uri, "null:"]);
    let line = run.assert_clean_failure_after_retries(&uri);
    assert!(line.ends_with("timed out"), "{line}");
    assert!(run.stderr.contains("retry 2 of 2"), "{}", run.stderr);
    assert!(
        run.elapsed < Duration::from_secs(6),
        "took {:?}",
        run.elapsed
    );
}

// ---------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------

/// A copy between two servers nbdcp started itself, interrupted by `sig`
/// while data flows: status 128 + sig, a line saying so, both servers
/// stopped and reaped, within seconds.
fn interrupted(sig: libc::c_int) {
    require("nbdkit");
    require("qemu-nbd");
    let d = tmp();
    let pidfile = d.path().join("src.pid");
    let log = d.path().join("src.log");
    let logfile = format!("logfile={}", s(&log));
    let dst = d.path().join("dst.img");
    sparse_file(&dst, 1 << 30);
    let mut run = Watched::spawn(&[
        "-C",
        "4",
        "-T",
        "4",
        "--",
        "[",
        "nbdkit",
        "-P",
        s(&pidfile),
        // nbdkit shares nbdcp's stderr: keep its own messages (about
        // sleeps cut short) off it.
        "--log=null",
        "--filter=log",
        "--filter=delay",
        "pattern",
        "1G",
        "rdelay=20ms",
        &logfile,
        "]",
        "[",
        "qemu-nbd",
        "-f",
        "raw",
        "--shared=8",
        s(&dst),
        "]",
    ]);
    let needle = s(d.path()).to_string();
    wait_until("both servers", Duration::from_secs(10), || {
        processes_mentioning(&needle)
            .iter()
            .filter(|(_, cmd)| cmd.starts_with("nbdkit") || cmd.starts_with("qemu-nbd"))
            .count()
            == 2
    });
    // Data flows on all four connections.
    wait_until("data to flow", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        log_shows_requests(&text, &LogCommand::Read, 4)
    });
    assert!(run.is_running(), "the copy ended before the signal");
    run.signal(sig);
    let signalled = run.elapsed();
    let done = run.wait(HANG_DEADLINE);
    let line = done.assert_failure(128 + sig, "interrupted");
    assert_eq!(line, format!("nbdcp: interrupted by signal {sig}"));
    assert!(
        done.elapsed - signalled < Duration::from_secs(3),
        "took {:?} after the signal",
        done.elapsed - signalled
    );
    assert_nothing_left(d.path(), &[]);
}

#[test]
fn sigint_stops_subprocess_servers_and_exits_130() {
    interrupted(libc::SIGINT);
}

#[test]
fn sigterm_stops_subprocess_servers_and_exits_143() {
    interrupted(libc::SIGTERM);
}

/// SIGTERM during a copy between external servers that keep answering:
/// nbdcp stops between requests with 143 and leaves the servers alone.
#[test]
fn sigterm_between_external_servers() {
    let d = tmp();
    let source = Daemon::nbdkit_logged(
        d.path(),
        Listen::unix(d.path(), "src.sock"),
        &["--filter=delay", "pattern", "1G", "rdelay=20ms"],
    );
    let destination = Daemon::nbdkit(d.path(), Listen::tcp(), &["memory", "1G"]);
    let mut run = Watched::spawn(&["-C", "4", "-T", "4", &source.uri(), &destination.uri()]);
    source.wait_for_requests(LogCommand::Read, 4, Duration::from_secs(10));
    assert!(run.is_running(), "the copy ended before the signal");
    run.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let done = run.wait(HANG_DEADLINE);
    let line = done.assert_failure(143, "interrupted");
    assert_eq!(line, "nbdcp: interrupted by signal 15");
    assert!(signalled.elapsed() < Duration::from_secs(3));
    // The servers are not nbdcp's: still there and still serving.
    assert!(process_exists(source.pid()) && process_exists(destination.pid()));
    assert_eq!(probe_export(&d.path().join("src.sock"), "").size, 1 << 30);
}
