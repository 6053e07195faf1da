//! Tests of the integration-test harness itself: the servers start, are
//! reachable, and are gone after drop; images and the log parser behave.

mod common;

use common::*;

fn assert_gone(pid: u32) {
    assert!(
        !process_exists(pid),
        "server pid {pid} still exists after drop"
    );
}

#[test]
fn nbdkit_memory_on_unix_socket() {
    let server = Server::nbdkit(&["memory", "1M"]);
    assert!(
        server.uri().starts_with("nbd+unix:///?socket="),
        "{}",
        server.uri()
    );
    assert_eq!(server.greeting(), b"NBDMAGIC");
    let pid = server.pid();
    let sock = server.socket_path().to_path_buf();
    assert!(process_exists(pid));
    drop(server);
    assert_gone(pid);
    assert!(!sock.exists());
}

#[test]
fn nbdkit_on_tcp_loopback() {
    let server = Server::nbdkit_tcp(&["memory", "1M"]);
    assert_eq!(server.uri(), format!("nbd://127.0.0.1:{}/", server.port()));
    assert_eq!(server.greeting(), b"NBDMAGIC");
    let pid = server.pid();
    drop(server);
    assert_gone(pid);
}

#[test]
fn qemu_nbd_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    mixed_image(&img, (1 << 20) + 1234, 1);
    let server = Server::qemu_nbd(&["-f", "raw", img.to_str().unwrap()]);
    assert_eq!(server.greeting(), b"NBDMAGIC");
    // Persistent (-t): still serving after a client left.
    assert_eq!(server.greeting(), b"NBDMAGIC");
    let pid = server.pid();
    drop(server);
    assert_gone(pid);
}

#[test]
fn qemu_nbd_on_tcp_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_file(&img, 1 << 20);
    let server = Server::qemu_nbd_tcp(&["-f", "raw", img.to_str().unwrap()]);
    assert_eq!(server.greeting(), b"NBDMAGIC");
    let pid = server.pid();
    drop(server);
    assert_gone(pid);
}

#[test]
fn nbd_server_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    mixed_image(&img, 1 << 20, 2);
    let server = Server::nbd_server(&img, true);
    assert_eq!(server.export(), "export");
    assert!(server.uri().starts_with("nbd+unix:///export?socket="));
    assert_eq!(server.greeting(), b"NBDMAGIC");
    assert_eq!(server.greeting(), b"NBDMAGIC");
    let pid = server.pid();
    assert!(process_exists(pid));
    drop(server);
    assert_gone(pid);
}

#[test]
fn nbd_server_on_tcp_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_file(&img, 1 << 20);
    let server = Server::nbd_server_tcp(&img, false);
    assert_eq!(
        server.uri(),
        format!("nbd://127.0.0.1:{}/export", server.port())
    );
    assert_eq!(server.greeting(), b"NBDMAGIC");
    let pid = server.pid();
    drop(server);
    assert_gone(pid);
}

#[test]
fn a_server_that_fails_to_start_reports_its_stderr() {
    let result = std::panic::catch_unwind(|| Server::nbdkit(&["no-such-plugin-xyz"]));
    let msg = match result {
        Ok(_) => panic!("nbdkit started with a nonexistent plugin"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(msg.contains("exited with"), "{msg}");
    assert!(msg.contains("no-such-plugin-xyz"), "{msg}");
}

#[test]
fn require_fails_for_a_missing_tool() {
    require("nbdkit");
    let result = std::panic::catch_unwind(|| require("nbdcp-no-such-tool"));
    assert!(result.is_err());
    let result = std::panic::catch_unwind(|| require("nbdcopy"));
    if which("nbdcopy").is_none() {
        let msg = result.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert_eq!(msg, "nbdcopy is not installed: apt-get install libnbd-bin");
    }
}

#[test]
fn nbdkit_log_records_requests_from_a_real_client() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    mixed_image(&img, 256 * 1024, 3);
    let server = Server::nbdkit_logged(&["memory", "1M"]);
    let status = std::process::Command::new("nbdcopy")
        .arg("--flush")
        .arg(&img)
        .arg(server.uri())
        .status()
        .unwrap();
    assert!(status.success());
    let entries = server.wait_log_idle();
    assert!(connection_count(&entries) >= 1);
    let writes = requests_of(&entries, LogCommand::Write);
    assert!(!writes.is_empty(), "{}", server.log_text());
    assert!(
        writes
            .iter()
            .all(|w| w.ok() && w.count > 0 && w.end() <= 256 * 1024)
    );
    assert!(!requests_of(&entries, LogCommand::Flush).is_empty());
    let connect = &requests_of(&entries, LogCommand::Connect)[0];
    assert_eq!(connect.arg("size"), Some("0x100000"));
    assert_eq!(connect.arg("export"), Some(""));
}

#[test]
fn log_parser_handles_every_line_shape() {
    let text = r#"2026-11-28 17:52:50.275758 Ready thread_model=3
2026-11-28 17:52:50.309530 Preconnect id=1 readonly=0 ...
2026-11-28 17:52:50.309846 connection=1 Connect export="a b" tls=0 size=0x100000 write=1
2026-11-28 17:52:50.310220 connection=1 Write id=1 offset=0x0 count=0x200 fua=1 ...
2026-11-28 17:52:50.310221 connection=1 Read id=2 offset=0x200 count=0x200 ...
2026-11-28 17:52:50.310301 connection=1 ...Write id=1 return=0
2026-11-28 17:52:50.310682 connection=1 ...Read id=2 return=-1 error=EIO
2026-11-28 17:52:50.310914 connection=1 Zero id=3 offset=0x1000 count=0x2000 trim=0 fua=1 fast=0 ...
2026-11-28 17:52:50.310928 connection=1 ...Zero id=3 return=0
2026-11-28 17:52:46.220129 connection=1 Extents id=4 offset=0x0 count=0x100000 req_one=0 ...
2026-11-28 17:52:46.220149 connection=1 ...Extents id=4 extents=(0x0 0x100000 "hole,zero") return=0
2026-11-28 17:52:50.311086 connection=1 Flush id=5 ...
2026-11-28 17:52:50.311089 connection=1 ...Flush id=5 return=0
2026-11-28 17:52:50.311973 connection=1 Disconnect transactions=5
"#;
    let e = parse_nbdkit_log(text);
    let kinds: Vec<_> = e.iter().map(|e| e.command.clone()).collect();
    assert_eq!(
        kinds,
        [
            LogCommand::Connect,
            LogCommand::Write,
            LogCommand::Read,
            LogCommand::Zero,
            LogCommand::Extents,
            LogCommand::Flush,
            LogCommand::Disconnect
        ]
    );
    assert_eq!(e[0].arg("export"), Some("a b"));
    assert_eq!((e[1].offset, e[1].count, e[1].flag("fua")), (0, 512, true));
    assert!(e[1].ok());
    assert_eq!(
        (e[2].result, e[2].error.as_deref()),
        (Some(-1), Some("EIO"))
    );
    assert_eq!(
        (e[3].offset, e[3].count, e[3].flag("fast")),
        (4096, 8192, false)
    );
    assert_eq!(
        e[4].reply.get("extents").map(String::as_str),
        Some("(0x0 0x100000 \"hole,zero\")")
    );
    assert_eq!(max_in_flight(&e, 1), 2);
    assert_eq!(e[6].arg("transactions"), Some("5"));
}

#[test]
fn mixed_image_is_deterministic_sparse_and_unaligned() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let size = 3 * 1024 * 1024 + 1234;
    let layout = mixed_image(&a, size, 7);
    assert_eq!(mixed_image(&b, size, 7), layout);
    mixed_image(&c, size, 8);
    assert_eq!(std::fs::metadata(&a).unwrap().len(), size);
    assert!(files_equal(&a, &b));
    assert!(!files_equal(&a, &c));
    for kind in [SegmentKind::Data, SegmentKind::Zero, SegmentKind::Hole] {
        assert!(layout.iter().any(|s| s.kind == kind), "no {kind:?}");
    }
    let holes: u64 = layout
        .iter()
        .filter(|s| s.kind == SegmentKind::Hole)
        .map(|s| s.length)
        .sum();
    // Holes are not allocated (allowing for the partial last block and
    // file system metadata such as ext4 extent blocks).
    assert!(
        allocated_bytes(&a) <= size - holes + 64 * 1024,
        "{layout:?}"
    );
    // Zero segments read back as zeroes, data segments do not.
    let bytes = std::fs::read(&a).unwrap();
    for s in &layout {
        let region = &bytes[s.offset as usize..(s.offset + s.length) as usize];
        let all_zero = region.iter().all(|&x| x == 0);
        assert_eq!(all_zero, s.kind != SegmentKind::Data, "{s:?}");
    }
}

#[test]
fn assert_same_bytes_names_the_first_difference() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    random_file(&a, 100_000, 1);
    std::fs::copy(&a, &b).unwrap();
    assert_same_bytes(&a, &b);
    let mut bytes = std::fs::read(&b).unwrap();
    bytes[70_000] ^= 0xff;
    std::fs::write(&b, &bytes).unwrap();
    assert_eq!(first_difference(&a, &b), Some(70_000));
    let msg = std::panic::catch_unwind(|| assert_same_bytes(&a, &b)).unwrap_err();
    let msg = msg.downcast_ref::<String>().unwrap();
    assert!(msg.contains("offset 70000"), "{msg}");
    bytes.truncate(50_000);
    std::fs::write(&b, &bytes).unwrap();
    assert_eq!(first_difference(&a, &b), Some(50_000));
}

#[test]
fn nbdcp_binary_is_built() {
    assert!(nbdcp_bin().exists());
    let out = run(&["--version"]);
    out.assert_ok();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("nbdcp "));
}

/// A finished run, made up, to try the checkers on.
fn finished(code: i32, stderr: &str) -> Finished {
    Finished {
        args: vec!["made-up".into()],
        code: Some(code),
        stderr: stderr.into(),
        // No such process: reaped.
        pid: u32::MAX,
        ..Finished::default()
    }
}

fn rejects(what: &str, check: impl FnOnce() + std::panic::UnwindSafe) {
    assert!(
        std::panic::catch_unwind(check).is_err(),
        "the checker accepted {what}"
    );
}

/// The strict failure checker accepts exactly one `nbdcp: ` line naming
/// the endpoint with the right status, and nothing else.
#[test]
fn clean_failure_checker_is_strict() {
    let good = "nbdcp: nbd://x/: read at offset 0 length 512: Input/output error\n";
    assert_eq!(
        finished(1, good).assert_clean_failure("nbd://x/"),
        good.trim_end()
    );
    // Without the trailing newline too.
    finished(1, good.trim_end()).assert_clean_failure("nbd://x/");
    finished(2, good).assert_failure(2, "nbd://x/");
    rejects("status 2", || {
        finished(2, good).assert_clean_failure("nbd://x/");
    });
    rejects("status 0", || {
        finished(0, good).assert_clean_failure("nbd://x/");
    });
    rejects("a signal", || {
        let mut f = finished(1, good);
        f.code = None;
        f.signal = Some(9);
        f.assert_clean_failure("nbd://x/");
    });
    rejects("another endpoint", || {
        finished(1, good).assert_clean_failure("nbd://y/");
    });
    rejects("two lines", || {
        finished(1, &format!("{good}{good}")).assert_clean_failure("nbd://x/");
    });
    rejects("a warning first", || {
        finished(1, &format!("[WARN ] slow\n{good}")).assert_clean_failure("nbd://x/");
    });
    rejects("a blank line after", || {
        finished(1, &format!("{good}\n")).assert_clean_failure("nbd://x/");
    });
    rejects("no `nbdcp: `", || {
        finished(1, "error: nbd://x/ is bad\n").assert_clean_failure("nbd://x/");
    });
    rejects("nothing", || {
        finished(1, "").assert_clean_failure("nbd://x/");
    });
    rejects("a panic", || {
        finished(1, "nbdcp: nbd://x/: thread 'main' panicked at src/x.rs\n")
            .assert_clean_failure("nbd://x/");
    });
    rejects("RUST_BACKTRACE", || {
        finished(1, "nbdcp: nbd://x/: note: run with `RUST_BACKTRACE=1`\n")
            .assert_clean_failure("nbd://x/");
    });
    rejects("too much memory", || {
        let mut f = finished(1, good);
        f.max_rss_kib = RSS_LIMIT_KIB;
        f.assert_clean_failure("nbd://x/");
    });
    // With retries, `[WARN ]` lines may come first, and nothing else.
    let retried = format!("[WARN ] nbd://x/: gone; retry 1 of 1\n{good}");
    finished(1, &retried).assert_clean_failure_after_retries("nbd://x/");
    finished(1, good).assert_clean_failure_after_retries("nbd://x/");
    rejects("another line before the error", || {
        finished(1, &format!("hello\n{good}")).assert_clean_failure_after_retries("nbd://x/");
    });
    rejects("a line after the error", || {
        finished(1, &format!("{good}[WARN ] late\n"))
            .assert_clean_failure_after_retries("nbd://x/");
    });
}

/// The success checker wants status 0 and an empty stderr, unless the run
/// was verbose.
#[test]
fn ok_checker_is_strict() {
    finished(0, "").assert_ok();
    rejects("status 1", || {
        finished(1, "").assert_ok();
    });
    rejects("a warning", || {
        finished(0, "[WARN ] hm\n").assert_ok();
    });
    let mut verbose = finished(0, "[INFO ] copied 1 MiB\n");
    verbose.verbose = true;
    verbose.assert_ok();
    rejects("an error line in a verbose run", || {
        let mut f = finished(0, "nbdcp: x: failed\n");
        f.verbose = true;
        f.assert_ok();
    });
    finished(0, "[WARN ] retry 1 of 5\n").assert_ok_after_warnings();
    rejects("other text after warnings", || {
        finished(0, "[WARN ] retry\nnbdcp: x\n").assert_ok_after_warnings();
    });
}
