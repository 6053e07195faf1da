//! The library as an embedder uses it: cancelling from another thread, and
//! a failing worker, stop a copy even while requests are blocked on a
//! server that does not answer; names that are not UTF-8 reach the file
//! system byte for byte.

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::time::{Duration, Instant};

use common::*;
use nbdcp::{CancelToken, CopyOptions, EndpointSpec, ErrorKind};

/// Longest a stopped copy may take to return: the reads it waits on take
/// a minute, so anything near this means they were not broken off.
const PROMPT: Duration = Duration::from_secs(3);

#[test]
fn cancel_breaks_off_a_copy_blocked_on_a_server_that_does_not_answer() {
    // Every read takes a minute; with no --timeout nothing else would
    // end the copy. Retries stay on: a broken-off connection must not be
    // mistaken for one to reconnect.
    let server = Server::nbdkit_logged(&["--filter=delay", "pattern", "64M", "delay-read=60"]);
    let cancel = CancelToken::new();
    let mut options = CopyOptions::default();
    options.cancel = cancel.clone();
    let source = EndpointSpec::parse(server.uri());
    let copy = std::thread::spawn(move || nbdcp::copy(&source, &EndpointSpec::Null, &options));
    wait_until("nbdkit to receive a read", Duration::from_secs(10), || {
        server.log_text().contains(" Read ")
    });
    let asked = Instant::now();
    cancel.cancel();
    let result = copy.join().expect("the copy thread panicked");
    let took = asked.elapsed();
    let err = result.expect_err("a cancelled copy must not succeed");
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    assert!(took < PROMPT, "cancel took {took:?}");
}

#[test]
fn a_failing_worker_breaks_off_the_others_blocked_requests() {
    require("nbdkit");
    // Two segments on two connections: reads of the second block for a
    // minute; reads of the first fail with EIO after a second, by when
    // the other worker is surely blocked.
    let pread = r#"if [ "$4" -ge 1048576 ]; then sleep 60; head -c "$3" /dev/zero;
                   else sleep 1; echo "EIO injected" >&2; exit 1; fi"#;
    let server = Server::nbdkit_logged(&[
        "eval",
        "get_size=echo 2097152",
        &format!("pread={pread}"),
        "thread_model=echo parallel",
    ]);
    let mut options = CopyOptions::default();
    options.connections = 2;
    options.threads = 2;
    options.segment_size = 1 << 20;
    let source = EndpointSpec::parse(server.uri());
    let started = Instant::now();
    let err = nbdcp::copy(&source, &EndpointSpec::Null, &options)
        .expect_err("the source fails its reads");
    let took = started.elapsed();
    let reads = requests_of(&server.log_entries(), LogCommand::Read).len();
    assert!(
        reads >= 2,
        "both workers must have read: {reads} reads logged"
    );
    // The first failure is the one reported, not the interruption it
    // caused.
    assert_eq!(err.kind(), ErrorKind::Server, "{err}");
    assert_eq!(err.errno(), Some(libc::EIO), "{err}");
    assert!(err.to_string().contains("at offset 0 "), "{err}");
    assert!(took < Duration::from_secs(1) + PROMPT, "took {took:?}");
}

/// `name` with a byte that is not UTF-8 in the middle.
fn not_utf8(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let mut bytes = name.as_bytes().to_vec();
    bytes.insert(bytes.len() / 2, 0xff);
    dir.join(OsString::from_vec(bytes))
}

#[test]
fn paths_that_are_not_utf8_are_used_byte_for_byte() {
    let dir = tmp();
    let src = not_utf8(dir.path(), "source.img");
    let dst = not_utf8(dir.path(), "copy.img");
    mixed_image(&src, 3 << 20, 7);
    Nbdcp::new_os(&[src.as_os_str(), dst.as_os_str()])
        .run()
        .assert_ok();
    assert_same_bytes(&src, &dst);
    // Only the two files named: no lossy look-alike was created.
    let mut names: Vec<Vec<u8>> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    let mut want = vec![
        dst.file_name().unwrap().as_bytes().to_vec(),
        src.file_name().unwrap().as_bytes().to_vec(),
    ];
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn server_command_words_that_are_not_utf8_reach_the_server() {
    require("qemu-nbd");
    let dir = tmp();
    let image = not_utf8(dir.path(), "disk.img");
    mixed_image(&image, 2 << 20, 8);
    let copy = dir.path().join("copy.img");
    let words: Vec<&std::ffi::OsStr> = ["--", "[", "qemu-nbd", "-f", "raw"]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([
            image.as_os_str(),
            std::ffi::OsStr::new("]"),
            copy.as_os_str(),
        ])
        .collect();
    Nbdcp::new_os(&words).run().assert_ok();
    assert_same_bytes(&image, &copy);
}
