//! `--journal=FILE`: an interrupted copy, run again with its journal,
//! copies only what was not recorded and ends byte for byte the same.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const SEGMENT: u64 = 128 * MIB;

fn recorded(journal: &Path) -> Vec<u64> {
    std::fs::read_to_string(journal)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("done ")?.parse().ok())
        .collect()
}

/// Bytes written or zeroed, by nbdkit's log.
fn touched(log: &str) -> u64 {
    parse_nbdkit_log(log)
        .iter()
        .filter(|e| matches!(e.command, LogCommand::Write | LogCommand::Zero))
        .map(|e| e.count)
        .sum()
}

/// The issue's check: a 1 GiB mixed image through a rate-limited nbdkit,
/// SIGKILL midway, run again: byte-identical, and the second run writes at
/// most the segments not recorded, plus one.
#[test]
fn a_copy_killed_midway_resumes_from_its_journal() {
    // In memory where there is some: 2 GiB of image files, synced once a
    // segment, would make this test slow on a disk.
    let dir = tempfile::Builder::new()
        .prefix("nbdcp-test-")
        .tempdir_in("/dev/shm")
        .unwrap_or_else(|_| tmp());
    let dir = &dir;
    let (src, _) = mixed(dir.path(), "src.img", 8 * SEGMENT, 21);
    let dst = dir.path().join("dst.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(8 * SEGMENT)
        .unwrap();
    let journal = dir.path().join("copy.journal");
    let from = Server::qemu_nbd(&["-r", "-t", "-e", "4", "-f", "raw", s(&src)]);
    // The rate filter slows the writes (2 Gbit/s) so the copy is still
    // running when it is killed. nbdkit 1.32 can abort on a client killed
    // in mid-request (an assertion in raw_send_socket), so the server is
    // started afresh, on the same socket, for the second run; its log
    // then holds that run alone.
    let dst_args = ["--filter=rate", "file", s(&dst), "rate=2G"];
    let mut to = Daemon::nbdkit_logged(dir.path(), Listen::unix(dir.path(), "dst.sock"), &dst_args);
    let (j, from_uri, to_uri) = (
        format!("--journal={}", journal.display()),
        from.uri(),
        to.uri(),
    );
    // With --blkhash: the second run reads, and hashes, the segments the
    // first one copied, without writing them again.
    let args = [
        j.as_str(),
        "--blkhash",
        "-C",
        "2",
        from_uri.as_str(),
        to_uri.as_str(),
    ];
    let first = Watched::spawn(&args);
    wait_until("two segments recorded", Duration::from_secs(60), || {
        recorded(&journal).len() >= 2
    });
    first.signal(libc::SIGKILL);
    let killed = first.wait(Duration::from_secs(10));
    assert_eq!(killed.signal, Some(libc::SIGKILL), "{}", killed.stderr);
    to.kill();
    to.restart();
    let done = recorded(&journal);
    assert!(
        done.len() < 8,
        "the first run finished before it was killed"
    );

    // The log filter appends: the second run's requests are what follows.
    let logged_before = to.log_text().len();
    let second = Nbdcp::new(&args).run();
    if second.code != Some(0) {
        panic!(
            "second run: {}\nsource server: {}\ndestination server: {}",
            second.stderr,
            from.stderr_text(),
            to.output()
        );
    }
    assert_same_bytes(&src, &dst);
    let fresh = Nbdcp::new(&["--blkhash", s(&src), "null:"]).run();
    assert_eq!(second.stdout, fresh.stdout, "the resumed run's blkhash");
    let rewritten = touched(&to.log_text()[logged_before..]);
    let left = 8 - done.len() as u64;
    assert!(
        rewritten <= (left + 1) * SEGMENT,
        "the second run wrote {rewritten} bytes; {left} segments were left"
    );
    assert!(
        rewritten >= (left - 1) * SEGMENT / 4,
        "little was redone: {rewritten}"
    );
    let text = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(text.lines().last(), Some("complete"));

    // Once more: nothing to do, and it says so.
    let logged_before = to.log_text().len();
    let run = Nbdcp::new(&args).run();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("already complete"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert_eq!(
        touched(&to.log_text()[logged_before..]),
        0,
        "the third run wrote"
    );
}

#[test]
fn a_journal_of_another_copy_is_refused_and_nothing_is_written() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 4 * MIB, 22);
    let dst = dir.path().join("dst.img");
    let journal = dir.path().join("j");
    let j = format!("--journal={}", journal.display());
    Nbdcp::new(&[&j, s(&src), s(&dst)]).run().assert_ok();
    assert_same_bytes(&src, &dst);
    // The same journal for a copy that writes differently.
    std::fs::write(&dst, b"untouched").unwrap();
    let run = Nbdcp::new(&[&j, "--allocated", s(&src), s(&dst)]).run();
    let line = run.assert_failure(2, "journal");
    assert!(line.contains("another copy"), "{line}");
    assert!(
        std::fs::read(&dst).unwrap() == b"untouched",
        "the destination was touched"
    );
    // And a journal that is not one.
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, "not a journal\n").unwrap();
    let run = Nbdcp::new(&[&format!("--journal={}", bogus.display()), s(&src), s(&dst)]).run();
    run.assert_failure(2, "journal");
}

#[test]
fn a_journal_needs_endpoints_that_are_not_pipes() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", MIB, 23);
    let j = format!("--journal={}", dir.path().join("j").display());
    Nbdcp::new(&[&j, s(&src), "-"]).run().assert_failure(2, "-");
    Nbdcp::new(&[&j, "-", "null:"])
        .stdin(&[1u8; 4096])
        .run()
        .assert_failure(2, "-");
}
