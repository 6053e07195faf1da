//! libnbd's own `copy/` test scripts state nbdcopy's behaviour; each test
//! here makes the same checks with nbdcp in nbdcopy's place (the script it
//! follows is named on each). Where nbdcp differs on purpose the test says
//! why.
//!
//! The request-log tests copy to an nbdkit `eval` plugin that appends
//! every write, zero and trim it receives to a file: the exact requests
//! nbdcp sent, not a sum of bytes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// `[ nbdkit data data='...' ]` as nbdcp's arguments.
fn data_source(data: &str) -> Vec<String> {
    ["[", "nbdkit", "--exit-with-parent", "--log=null", "data"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("data={data}"), "]".to_string()])
        .collect()
}

/// `[ nbdkit eval ... ]`: a 7 EiB destination logging every write, zero
/// and trim to `log`, as the scripts' destination does.
fn logging_destination(log: &Path) -> Vec<String> {
    let append = format!("echo $@ >> {}", log.display());
    vec![
        "[".into(),
        "nbdkit".into(),
        "--exit-with-parent".into(),
        // nbdkit's own messages (a script cut short as the server is
        // stopped after the copy) would share nbdcp's stderr.
        "--log=null".into(),
        "eval".into(),
        "get_size=echo 7E".into(),
        format!("pwrite=cat >/dev/null; {append}"),
        format!("trim={append}"),
        format!("zero={append}"),
        format!("flush={append}"),
        "]".into(),
    ]
}

/// Run nbdcp with `options`, then `source` and `destination`, and return
/// the logged requests sorted as the scripts sort them (`sort -n`: by
/// count, then offset).
fn logged_copy(
    options: &[&str],
    source: &[String],
    destination: &[String],
    log: &Path,
) -> Vec<String> {
    require("nbdkit");
    let mut args: Vec<&str> = options.to_vec();
    args.push("--");
    args.extend(source.iter().map(String::as_str));
    args.extend(destination.iter().map(String::as_str));
    Nbdcp::new(&args).run().assert_ok();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let key = |l: &String| -> (u64, u64, String) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse().ok()).unwrap_or(0);
        (num(1), num(2), l.clone())
    };
    lines.sort_by_key(key);
    lines
}

/// The 4 GiB + 1 image of copy-sparse.sh: one byte at 0, 1 GiB - 1,
/// 4 GiB - 1 and 4 GiB; the data plugin reports 32 KiB extents.
const SPARSE_DATA: &str = "1 @1073741823 1 @4294967295 1 @4294967296 1";

/// What copy-sparse.sh expects of a 4 GiB + 1 sparse image, with `zero`
/// for how each hole is zeroed: the data of each 32 KiB extent written
/// as is, and every hole of a 128 MiB segment zeroed in one request.
fn sparse_expectation(zero: impl Fn(u64, u64) -> String) -> Vec<String> {
    const SEG: u64 = 128 << 20;
    const K32: u64 = 32 << 10;
    let mut want = vec![
        "pwrite 1 4294967296".to_string(),
        format!("pwrite {K32} 0"),
        format!("pwrite {K32} {}", 1073741824 - K32),
        format!("pwrite {K32} {}", 4294967296 - K32),
    ];
    for seg in 0..32u64 {
        let start = seg * SEG;
        match seg {
            // Data at the start of segment 0.
            0 => want.push(zero(SEG - K32, K32)),
            // Data at the end of segments 7 (1 GiB - 1) and 31.
            7 | 31 => want.push(zero(SEG - K32, start)),
            _ => want.push(zero(SEG, start)),
        }
    }
    want.sort_by_key(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .take(2)
            .map(|s| s.parse().unwrap())
            .collect();
        (f[0], f[1], l.clone())
    });
    want
}

/// copy-sparse.sh. nbdkit 1.32's eval plugin logs a hole zeroed with
/// `NBD_CMD_WRITE_ZEROES` as `zero COUNT OFFSET may_trim` (the script,
/// written against another nbdkit, says `trim COUNT OFFSET` for the same
/// request).
#[test]
fn copy_sparse_sends_exactly_the_data_and_one_zero_per_segment_hole() {
    let dir = tmp();
    let log = dir.path().join("requests.log");
    let got = logged_copy(
        &["-S", "0"],
        &data_source(SPARSE_DATA),
        &logging_destination(&log),
        &log,
    );
    let mut want = sparse_expectation(|count, offset| format!("zero {count} {offset} may_trim"));
    want.push("flush".into());
    want.sort_by_key(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .take(2)
            .filter_map(|s| s.parse().ok())
            .collect();
        (
            f.first().copied().unwrap_or(0),
            f.get(1).copied().unwrap_or(0),
            l.clone(),
        )
    });
    // nbdcp flushes by default (nbdcopy only with --flush); the flush is
    // checked by its own test below.
    assert_eq!(got, want);
}

/// copy-sparse-allocated.sh: with --allocated the holes are zeroed with
/// the blocks kept allocated (`NBD_CMD_FLAG_NO_HOLE`: no `may_trim`).
#[test]
fn copy_sparse_allocated_zeroes_holes_without_trimming() {
    let dir = tmp();
    let log = dir.path().join("requests.log");
    let got = logged_copy(
        &["--allocated", "--no-flush"],
        &data_source(SPARSE_DATA),
        &logging_destination(&log),
        &log,
    );
    assert_eq!(
        got,
        sparse_expectation(|count, offset| format!("zero {count} {offset}"))
    );
}

/// The requests of a 1 GiB image read without extents, zero detection off:
/// every byte written, in writes of exactly `request_size`.
fn whole_writes(size: u64, request_size: u64) -> Vec<String> {
    let mut want: Vec<String> = (0..size / request_size)
        .map(|i| format!("pwrite {request_size} {}", i * request_size))
        .collect();
    want.sort_by_key(|l| l.split_whitespace().nth(2).unwrap().parse::<u64>().unwrap());
    want
}

/// copy-sparse-no-extents.sh. nbdcopy's default request size there is
/// 32 MiB; nbdcp's default depends on the transport (README), so the
/// size is given.
#[test]
fn copy_sparse_no_extents_writes_every_byte() {
    let dir = tmp();
    let log = dir.path().join("requests.log");
    let got = logged_copy(
        &[
            "--no-extents",
            "-S",
            "0",
            "--request-size=32M",
            "--no-flush",
        ],
        &data_source("1 @1073741823 1"),
        &logging_destination(&log),
        &log,
    );
    assert_eq!(got, whole_writes(1 << 30, 32 << 20));
}

/// copy-sparse-request-size.sh: --request-size is the size of every
/// write, never exceeded by merging.
#[test]
fn copy_sparse_request_size_bounds_every_write() {
    let dir = tmp();
    let log = dir.path().join("requests.log");
    let mut source = data_source("1 @33554431 1");
    // The script's destination is 32 MiB.
    let mut destination = logging_destination(&log);
    destination[5] = "get_size=echo 33554432".into();
    let got = logged_copy(
        &[
            "--no-extents",
            "-S",
            "0",
            "--request-size=1048576",
            "--no-flush",
        ],
        &std::mem::take(&mut source),
        &destination,
        &log,
    );
    assert_eq!(got, whole_writes(32 << 20, 1 << 20));
}

/// copy-flush.sh: with --flush (nbdcp's default) a flush is sent, and it
/// is the last request.
#[test]
fn copy_flush_sends_a_flush_last() {
    for flags in [
        &["--flush", "--request-size=32K"][..],
        &["--request-size=32K"],
    ] {
        let dir = tmp();
        let log = dir.path().join("requests.log");
        logged_copy(
            flags,
            &data_source("1 @33554432 1"),
            &logging_destination(&log),
            &log,
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().last(), Some("flush"), "{flags:?}:\n{text}");
        assert_eq!(text.lines().filter(|l| *l == "flush").count(), 1, "{text}");
    }
    // And none with --no-flush.
    let dir = tmp();
    let log = dir.path().join("requests.log");
    logged_copy(
        &["--no-flush"],
        &data_source("1 @33554432 1"),
        &logging_destination(&log),
        &log,
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.lines().any(|l| l == "flush"), "{text}");
}

/// copy-sparse-to-stream.sh: a sparse source read through a 512 Kbit/s
/// rate limit to stdout is quick, because only its two 32 KiB data
/// extents are read.
#[test]
fn copy_sparse_to_stream_reads_only_the_data() {
    require("nbdkit");
    let dir = tmp();
    let out = std::fs::File::create(dir.path().join("out")).unwrap();
    let started = Instant::now();
    Nbdcp::new(&[
        "--",
        "[",
        "nbdkit",
        "--exit-with-parent",
        "data",
        "data=1 @1073741823 1",
        "--filter=rate",
        "rate=512K",
        "]",
        "-",
    ])
    .stdout(out)
    .run()
    .assert_ok();
    // Reading the whole 1 GiB at that rate would take hours.
    assert!(started.elapsed() < Duration::from_secs(20));
    let got = std::fs::read(dir.path().join("out")).unwrap();
    assert_eq!(got.len(), 1 << 30);
    assert_eq!((got[0], got[(1 << 30) - 1]), (1, 1));
    assert!(got[1..(1 << 30) - 1].iter().all(|&b| b == 0));
}

/// A 32 MiB file for the allocation tests, and where it is.
fn file_32m(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    p
}

fn fully_allocated(p: &Path) -> bool {
    allocated_bytes(p) >= 32 << 20
}

/// copy-allocated-asynch.sh and -synch.sh: --allocated from an all-zero
/// source leaves a fully allocated 32 MiB file.
#[test]
fn copy_allocated_leaves_the_file_fully_allocated() {
    require("nbdkit");
    for sync in [false, true] {
        let dir = tmp();
        let out = dir.path().join("out");
        let mut args = vec!["--allocated", "--request-size=32K"];
        if sync {
            args.push("--synchronous");
        }
        args.extend([
            "--",
            "[",
            "nbdkit",
            "--exit-with-parent",
            "null",
            "size=32M",
            "]",
            s(&out),
        ]);
        Nbdcp::new(&args).run().assert_ok();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 << 20);
        assert!(
            fully_allocated(&out),
            "sync={sync}: {}",
            allocated_bytes(&out)
        );
    }
}

/// copy-destination-zero-asynch.sh and -synch.sh: with
/// --destination-is-zero into a file that is zero, the copy of a sparse
/// input is all zero (allocated or not).
#[test]
fn copy_destination_zero_gives_a_zero_copy() {
    for sync in [false, true] {
        let dir = tmp();
        let out = dir.path().join("out");
        std::fs::write(&out, vec![0u8; 32 << 20]).unwrap();
        let inp = file_32m(dir.path(), "in");
        let mut args = vec!["--destination-is-zero", "--request-size=32K"];
        if sync {
            args.push("--synchronous");
        }
        args.extend([s(&inp), s(&out)]);
        Nbdcp::new(&args).run().assert_ok();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 << 20);
        assert_same_bytes(&inp, &out);
    }
}

/// copy-allocated-destination-zero-asynch.sh and -synch.sh: --allocated
/// wins over --destination-is-zero: the sparse zero destination ends
/// fully allocated and zero.
#[test]
fn copy_allocated_wins_over_destination_is_zero() {
    for sync in [false, true] {
        let dir = tmp();
        let out = file_32m(dir.path(), "out");
        let inp = file_32m(dir.path(), "in");
        let mut args = vec!["--allocated", "--destination-is-zero", "--request-size=32K"];
        if sync {
            args.push("--synchronous");
        }
        args.extend([s(&inp), s(&out)]);
        Nbdcp::new(&args).run().assert_ok();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 << 20);
        assert!(
            fully_allocated(&out),
            "sync={sync}: {}",
            allocated_bytes(&out)
        );
        assert_same_bytes(&inp, &out);
    }
}

/// test-verbose.sh, with nbdcp's name in nbdcopy's place (the lines are
/// nbdcopy's shape; the kinds are nbdcp's words).
#[test]
fn verbose_names_each_side_and_its_size() {
    require("nbdkit");
    let run = Nbdcp::new(&["-v", "--", "[", "nbdkit", "memory", "size=1M", "]", "null:"]).run();
    run.assert_ok();
    let lines: Vec<&str> = run.stderr.lines().collect();
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    assert!(has("nbdcp: src: nbd "), "{}", run.stderr);
    assert!(has("nbdcp: src: size=1048576 (1M)"), "{}", run.stderr);
    assert!(has("nbdcp: dst: null "), "{}", run.stderr);
    let settings = lines
        .iter()
        .find(|l| l.starts_with("nbdcp: connections="))
        .expect("a settings line");
    for word in [
        "threads=",
        "requests=64",
        "request-size=",
        "queue-size=",
        "sparse=",
        "extents=true",
        "allocated=false",
        "destination-is-zero=true",
        "flush=false",
    ] {
        assert!(settings.contains(word), "{word} in {settings}");
    }
    // nbdkit memory advertises multi-conn; the connections opened are said.
    assert!(
        has("nbdcp: src: size=1048576 (1M), multi-conn=true, connections="),
        "{}",
        run.stderr
    );
}

/// --request-size=32M alone works (the queue is raised to it), and a
/// --queue-size below the request size is raised, as nbdcopy does.
#[test]
fn a_queue_smaller_than_the_request_size_is_raised() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 40 << 20, 3);
    for flags in [
        &["--request-size=32M"][..],
        &["--queue-size=4096"],
        &["--queue-size=4096", "--request-size=1M"],
    ] {
        let dst = dir.path().join("dst.img");
        let mut args = flags.to_vec();
        args.extend([s(&src), s(&dst)]);
        Nbdcp::new(&args).run().assert_ok();
        assert_same_bytes(&src, &dst);
    }
}

/// `[ nbdkit --exit-with-parent ARGS... ]` as nbdcp's arguments.
fn nbdkit(args: &[&str]) -> Vec<String> {
    // --log=null: nbdkit's own messages about the errors it injects would
    // share nbdcp's stderr, whose one line is checked.
    ["[", "nbdkit", "--exit-with-parent", "--log=null"]
        .iter()
        .chain(args)
        .chain(&["]"])
        .map(|s| s.to_string())
        .collect()
}

fn run_copy(options: &[&str], source: &[String], destination: &[String]) -> Finished {
    require("nbdkit");
    let mut args: Vec<&str> = options.to_vec();
    args.push("--");
    args.extend(source.iter().map(String::as_str));
    args.extend(destination.iter().map(String::as_str));
    Nbdcp::new(&args).run()
}

/// copy-nbd-error.sh: which server errors are fatal and which are not.
/// The script's must-fail cases inject at a 50 % rate on a handful of
/// requests, which can miss; here they inject on every request.
#[test]
fn copy_nbd_error_fails_only_where_data_would_be_lost() {
    let null: &[String] = &["null:".to_string()];
    // Block status failing is no reason to fail: everything is read.
    run_copy(
        &[],
        &nbdkit(&["--filter=error", "pattern", "5M", "error-extents-rate=1"]),
        null,
    )
    .assert_ok_after_warnings();
    // A read that fails is fatal...
    let run = run_copy(
        &[],
        &nbdkit(&["--filter=error", "pattern", "5M", "error-pread-rate=1"]),
        null,
    );
    let line = run.assert_clean_failure("nbdkit");
    assert!(line.contains("read at offset "), "{line}");
    // ...unless block status says there is nothing to read.
    run_copy(
        &[],
        &nbdkit(&["--filter=error", "null", "5M", "error-pread-rate=1"]),
        null,
    )
    .assert_ok();
    // A write that fails is fatal...
    let memory_failing = |what: &str| {
        nbdkit(&[
            "--filter=error",
            "--filter=noextents",
            "memory",
            "5M",
            &format!("error-{what}-rate=1"),
        ])
    };
    let line = run_copy(&[], &nbdkit(&["pattern", "5M"]), &memory_failing("pwrite"))
        .assert_clean_failure("nbdkit")
        .to_string();
    assert!(line.contains("write at offset "), "{line}");
    // ...unless only zeroes are written.
    run_copy(&[], &nbdkit(&["null", "5M"]), &memory_failing("pwrite")).assert_ok();
    // A zero request that fails is fatal...
    let line = run_copy(
        &[],
        &nbdkit(&["null", "5M"]),
        &nbdkit(&["--filter=error", "memory", "5M", "error-zero-rate=1"]),
    )
    .assert_clean_failure("nbdkit")
    .to_string();
    assert!(line.contains("zero at offset "), "{line}");
    // ...unless the destination is known to be zero already...
    run_copy(
        &["--destination-is-zero"],
        &nbdkit(&["null", "5M"]),
        &nbdkit(&[
            "--filter=error",
            "memory",
            "5M",
            "error-pwrite-rate=1",
            "error-zero-rate=1",
        ]),
    )
    .assert_ok();
    // ...or the server does not offer zeroing, and zeroes are written.
    run_copy(
        &[],
        &nbdkit(&["null", "5M"]),
        &nbdkit(&[
            "--filter=nozero",
            "--filter=error",
            "memory",
            "5M",
            "error-zero-rate=1",
        ]),
    )
    .assert_ok();
}

/// copy-nbd-to-small-nbd-error.sh: a destination smaller than the source
/// is an error, before anything is written.
#[test]
fn copy_nbd_to_a_smaller_nbd_fails() {
    let src = Server::nbdkit(&["pattern", "size=10M"]);
    let dst = Server::nbdkit_logged(&["memory", "size=1M"]);
    let run = Nbdcp::new(&[&src.uri(), &dst.uri()]).run();
    let line = run.assert_clean_failure(&dst.uri());
    assert!(line.contains("too small"), "{line}");
    let writes = requests_of(&dst.log_entries(), LogCommand::Write).len();
    assert_eq!(writes, 0);
}

/// copy-nbd-to-hexdump.sh: an NBD source to stdout carries its bytes in
/// order ("Hello" repeated, 8 KiB).
#[test]
fn copy_nbd_to_stdout_carries_the_bytes_in_order() {
    require("nbdkit");
    let dir = tmp();
    let path = dir.path().join("out");
    let out = std::fs::File::create(&path).unwrap();
    Nbdcp::new(&[
        "--",
        "[",
        "nbdkit",
        "--exit-with-parent",
        "data",
        "data=( \"Hello\" )*2000",
        "size=8192",
        "]",
        "-",
    ])
    .stdout(out)
    .run()
    .assert_ok();
    let want: Vec<u8> = b"Hello".iter().copied().cycle().take(8192).collect();
    assert_eq!(std::fs::read(&path).unwrap(), want);
}

/// copy-zero-to-nbd.sh: an empty source (`/dev/null`) copies to an NBD
/// server and succeeds, with -p.
#[test]
fn copy_from_dev_null_to_nbd() {
    let dst = Server::nbdkit(&["memory", "size=10M"]);
    let run = Nbdcp::new(&["-p", "/dev/null", &dst.uri()]).run();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Not a terminal: the bar's last state, one line, and nothing else.
    assert!(run.stderr.lines().count() <= 1, "{}", run.stderr);
    assert!(!run.stderr.contains("nbdcp:"), "{}", run.stderr);
}
