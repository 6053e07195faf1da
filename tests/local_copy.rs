//! Copies between local endpoints (files, pipes, null:) through the built
//! binary, and the command line's handling of bad input.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{allocated_bytes, assert_same_bytes, mixed_image, nbdcp_bin};

/// An odd size: not a multiple of any block or request size.
const SIZE: u64 = 24 * 1024 * 1024 + 1234;

fn nbdcp(args: &[&str]) -> Output {
    Command::new(nbdcp_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nbdcp")
}

fn ok(args: &[&str]) {
    let out = nbdcp(args);
    assert!(
        out.status.success(),
        "nbdcp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs nbdcp expecting failure; returns its stderr, checked to be a
/// single `nbdcp: ...` line without panic text.
fn fails(args: &[&str]) -> String {
    let out = nbdcp(args);
    check_failure(&out, &args)
}

fn check_failure(out: &Output, what: &dyn std::fmt::Debug) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what:?} should fail");
    assert_ne!(out.status.code(), Some(0));
    assert!(!stderr.contains("panicked"), "{what:?} panicked: {stderr}");
    assert!(
        stderr.trim_end().lines().count() >= 1,
        "{what:?}: no message"
    );
    assert!(
        stderr.contains("nbdcp: ") || stderr.contains("error:"),
        "{what:?}: {stderr}"
    );
    stderr
}

struct Fixture {
    dir: tempfile::TempDir,
    src: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        mixed_image(&src, SIZE, 42);
        Fixture { dir, src }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }
}

#[test]
fn file_to_file_copies_bytes_and_keeps_holes() {
    let f = Fixture::new();
    let dst = f.path("dst.img");
    ok(&[Fixture::s(&f.src), Fixture::s(&dst)]);
    assert_same_bytes(&f.src, &dst);
    // The mixed image has written zero blocks as well as holes: nbdcp must
    // leave both unallocated, so the copy takes less space than the source.
    let (a_src, a_dst) = (allocated_bytes(&f.src), allocated_bytes(&dst));
    assert!(
        a_dst < a_src,
        "copy allocates {a_dst} bytes, source {a_src}"
    );
    assert!(a_dst < SIZE / 2, "copy is not sparse: {a_dst} of {SIZE}");
}

#[test]
fn existing_destination_is_replaced_and_resized() {
    let f = Fixture::new();
    let dst = f.path("dst.img");
    std::fs::write(&dst, vec![0xffu8; (SIZE * 2) as usize]).unwrap();
    ok(&[Fixture::s(&f.src), Fixture::s(&dst)]);
    assert_same_bytes(&f.src, &dst);
}

#[test]
fn allocated_output_has_no_holes() {
    let f = Fixture::new();
    let dst = f.path("dst.img");
    ok(&["--allocated", Fixture::s(&f.src), Fixture::s(&dst)]);
    assert_same_bytes(&f.src, &dst);
    let a = allocated_bytes(&dst);
    assert!(
        a >= SIZE / 4096 * 4096,
        "--allocated left holes: {a} of {SIZE}"
    );
}

#[test]
fn sparse_zero_turns_off_zero_detection() {
    let f = Fixture::new();
    let (d1, d2) = (f.path("d1.img"), f.path("d2.img"));
    ok(&["-S", "0", Fixture::s(&f.src), Fixture::s(&d1)]);
    ok(&[Fixture::s(&f.src), Fixture::s(&d2)]);
    assert_same_bytes(&f.src, &d1);
    assert_same_bytes(&f.src, &d2);
    // With -S 0 the written zero blocks of the source are written as data.
    assert!(
        allocated_bytes(&d1) > allocated_bytes(&d2),
        "-S 0 should allocate the zero blocks: {} vs {}",
        allocated_bytes(&d1),
        allocated_bytes(&d2)
    );
}

#[test]
fn no_extents_and_destination_is_zero_give_the_same_bytes() {
    let f = Fixture::new();
    for (i, flag) in [
        "--no-extents",
        "--destination-is-zero",
        "--target-is-zero",
        "--synchronous",
        "--no-flush",
    ]
    .iter()
    .enumerate()
    {
        let dst = f.path(&format!("d{i}.img"));
        ok(&[flag, Fixture::s(&f.src), Fixture::s(&dst)]);
        assert_same_bytes(&f.src, &dst);
    }
}

#[test]
fn connections_and_request_sizes_give_identical_output() {
    let f = Fixture::new();
    for args in [
        &["-C", "1"][..],
        &["-C", "4", "-T", "4"],
        &["-C", "3", "-T", "3", "--request-size", "64K", "-R", "1"],
        &["--request-size", "32M", "--queue-size", "64M"],
        &["--request-size=4K", "-S", "512"],
    ] {
        let dst = f.path("dst.img");
        let mut all: Vec<&str> = args.to_vec();
        all.extend([Fixture::s(&f.src), Fixture::s(&dst)]);
        ok(&all);
        assert_same_bytes(&f.src, &dst);
    }
}

#[test]
fn null_destination_reads_everything() {
    let f = Fixture::new();
    let out = nbdcp(&["-v", Fixture::s(&f.src), "null:"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("copied 24.0 MiB"), "{log}");
}

#[test]
fn stdin_to_file() {
    let f = Fixture::new();
    let dst = f.path("dst.img");
    let mut child = Command::new(nbdcp_bin())
        .args(["-", Fixture::s(&dst)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = std::fs::read(&f.src).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Odd-sized writes so that reads see partial buffers.
    for piece in data.chunks(100_003) {
        stdin.write_all(piece).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_bytes(&f.src, &dst);
    assert!(allocated_bytes(&dst) < SIZE / 2, "stdin copy is not sparse");
}

#[test]
fn file_to_stdout_pipe_and_redirect() {
    let f = Fixture::new();
    // Through a pipe: holes must come out as zero bytes, in order.
    let out = Command::new(nbdcp_bin())
        .args([Fixture::s(&f.src), "-"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let piped = f.path("piped.img");
    std::fs::write(&piped, &out.stdout).unwrap();
    assert_same_bytes(&f.src, &piped);
    // Redirected to a file: treated as a file.
    let redirected = f.path("redirected.img");
    let file = std::fs::File::create(&redirected).unwrap();
    let status = Command::new(nbdcp_bin())
        .args([Fixture::s(&f.src), "-"])
        .stdout(file)
        .status()
        .unwrap();
    assert!(status.success());
    assert_same_bytes(&f.src, &redirected);
}

/// A pipe on stdout is grown to 1 MiB, so that nbdcp and the reader do
/// not wake each other every 64 KiB; the bytes are unchanged.
#[test]
fn stdout_pipe_is_grown() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let f = Fixture::new();
    let mut child = Command::new(nbdcp_bin())
        .args([Fixture::s(&f.src), "-"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut bytes = Vec::new();
    stdout.read_to_end(&mut bytes).unwrap();
    assert!(child.wait().unwrap().success());
    // SAFETY: F_GETPIPE_SZ only reads the pipe's capacity.
    let capacity = unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert_eq!(capacity, 1 << 20);
    assert!(bytes == std::fs::read(&f.src).unwrap());
}

#[test]
fn progress_to_a_file_descriptor() {
    let f = Fixture::new();
    let dst = f.path("dst.img");
    // fd 3 is our stderr duplicated by the shell; read the lines back.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' --progress=3 '{}' '{}' 3>&1 1>/dev/null",
            nbdcp_bin().display(),
            f.src.display(),
            dst.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"0/100"), "{text}");
    assert_eq!(lines.last(), Some(&"100/100"), "{text}");
    let values: Vec<u32> = lines
        .iter()
        .map(|l| l.trim_end_matches("/100").parse().unwrap())
        .collect();
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {text}"
    );
}

#[test]
fn bad_input_gets_one_clear_line() {
    let f = Fixture::new();
    let src = Fixture::s(&f.src);
    let dst_path = f.path("dst.img");
    let dst = Fixture::s(&dst_path);
    let missing = f.path("missing.img");
    let dir = f.dir.path().to_str().unwrap();

    let e = fails(&[Fixture::s(&missing), dst]);
    assert!(
        e.contains("missing.img") && e.contains("No such file"),
        "{e}"
    );
    let e = fails(&[dir, dst]);
    assert!(e.contains("directory"), "{e}");
    let e = fails(&[src, dir]);
    assert!(e.contains("directory"), "{e}");
    let e = fails(&["--request-size", "3", src, dst]);
    assert!(e.contains("request-size"), "{e}");
    let e = fails(&["-C", "0", src, dst]);
    assert!(e.contains("connections") || e.contains("at least 1"), "{e}");
    let e = fails(&["--queue-size", "4Q", src, dst]);
    assert!(e.contains("suffix"), "{e}");
    let e = fails(&["-", "-"]);
    assert!(e.contains("'-'"), "{e}");
    let e = fails(&[src, src]);
    assert!(e.contains("same file"), "{e}");
    // A destination that fills up: the error names it and the offset.
    let e = fails(&[src, "/dev/full"]);
    assert!(
        e.contains("/dev/full") && e.contains("offset") && e.contains("No space"),
        "{e}"
    );
    // The source file is untouched by all of this.
    assert_eq!(std::fs::metadata(&f.src).unwrap().len(), SIZE);
}

#[test]
fn permission_denied_is_reported() {
    let f = Fixture::new();
    let dst = f.path("dst.img");
    std::fs::write(&dst, b"").unwrap();
    let as_nobody = |args: &[&str]| -> Output {
        // Root ignores file permissions: run as an unprivileged user.
        let mut cmd = if unsafe { libc_geteuid() } == 0 {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
            c.arg(nbdcp_bin());
            c
        } else {
            Command::new(nbdcp_bin())
        };
        cmd.args(args)
            .output()
            .expect("run nbdcp (setpriv from util-linux is needed as root)")
    };
    std::fs::set_permissions(
        f.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&f.src, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = as_nobody(&[Fixture::s(&f.src), "null:"]);
    let e = check_failure(&out, &"unreadable source");
    assert!(
        e.contains("Permission denied") && e.contains("src.img"),
        "{e}"
    );
    std::fs::set_permissions(&f.src, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let out = as_nobody(&[Fixture::s(&f.src), Fixture::s(&dst)]);
    let e = check_failure(&out, &"unwritable destination");
    assert!(
        e.contains("Permission denied") && e.contains("dst.img"),
        "{e}"
    );
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn refuses_to_write_to_a_terminal() {
    // script(1) gives the child a pseudo-terminal as stdout.
    let f = Fixture::new();
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("'{}' '{}' -", nbdcp_bin().display(), f.src.display()),
            "/dev/null",
        ])
        .output()
        .expect("script (util-linux) is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("terminal"), "{text}");
    assert!(!out.status.success());
}
