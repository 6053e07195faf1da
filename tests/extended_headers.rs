//! NBD extended headers (64-bit request and reply headers) against real
//! servers: qemu-nbd 10 offers them, nbdkit 1.32 does not, and nbdcp must
//! copy byte for byte either way.

mod common;
use common::*;

use std::fs::File;

/// qemu-nbd's trace of the options it is asked for (on its stderr).
const OPTIONS_TRACE: &str = "nbd_negotiate_options_check_option";
/// qemu-nbd's trace of every request's type.
const REQUESTS_TRACE: &str = "nbd_co_receive_request_decode_type";

/// What the client's handshake logged (at debug level) about the header
/// kinds, from nbdcp's stderr.
fn negotiated_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains("extended headers "))
        .unwrap_or_else(|| panic!("no handshake summary in:\n{stderr}"))
}

#[test]
fn qemu_nbd_source_negotiates_extended_headers_and_copies_a_sparse_image() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 48 << 20, 0x11);
    let dst = dir.path().join("dst.img");
    let server = Server::qemu_nbd(&[
        "--trace",
        OPTIONS_TRACE,
        "--trace",
        REQUESTS_TRACE,
        "-f",
        "raw",
        "-r",
        "-e",
        "4",
        s(&src),
    ]);
    let done = Nbdcp::new(&["-v", &server.uri(), s(&dst)])
        .env("RUST_LOG", "debug")
        .run();
    done.assert_ok();
    assert_same_bytes(&src, &dst);
    let trace = server.stderr_text();
    // Asked for (option 11) and granted: nbdcp then never asks for plain
    // structured replies (option 8).
    assert!(trace.contains("option 11 (extended headers)"), "{trace}");
    assert!(!trace.contains("option 8 "), "{trace}");
    assert!(trace.contains("type = 7 (block status)"), "{trace}");
    assert!(trace.contains("type = 0 (read)"), "{trace}");
    let line = negotiated_line(&done.stderr);
    assert!(line.contains("extended headers true"), "{line}");
    assert!(line.contains("structured replies true"), "{line}");
}

#[test]
fn qemu_nbd_destination_takes_writes_and_zeroes_with_extended_headers() {
    let dir = tmp();
    let size = 40u64 << 20;
    let (src, _) = mixed(dir.path(), "src.img", size, 0x22);
    let dst = dir.path().join("dst.img");
    // Start from garbage, so holes must really be zeroed.
    std::fs::write(&dst, vec![0xee; size as usize]).unwrap();
    let server = Server::qemu_nbd(&[
        "--trace",
        OPTIONS_TRACE,
        "--trace",
        REQUESTS_TRACE,
        "-f",
        "raw",
        "-e",
        "4",
        s(&dst),
    ]);
    let done = Nbdcp::new(&["-v", s(&src), &server.uri()])
        .env("RUST_LOG", "debug")
        .run();
    done.assert_ok();
    assert_same_bytes(&src, &dst);
    let trace = server.stderr_text();
    assert!(trace.contains("option 11 (extended headers)"), "{trace}");
    assert!(!trace.contains("option 8 "), "{trace}");
    assert!(trace.contains("type = 1 (write)"), "{trace}");
    assert!(trace.contains("type = 6 (write zeroes)"), "{trace}");
    let line = negotiated_line(&done.stderr);
    assert!(line.contains("extended headers true"), "{line}");
}

#[test]
fn qemu_nbd_to_qemu_nbd_with_extended_headers_on_both_ends() {
    let dir = tmp();
    let size = 32u64 << 20;
    let (src, _) = mixed(dir.path(), "src.img", size, 0x33);
    let dst = dir.path().join("dst.img");
    File::create(&dst).unwrap().set_len(size).unwrap();
    let from = Server::qemu_nbd(&["-f", "raw", "-r", "-e", "4", s(&src)]);
    let to = Server::qemu_nbd(&["-f", "raw", "-e", "4", s(&dst)]);
    let done = Nbdcp::new(&["-v", &from.uri(), &to.uri()])
        .env("RUST_LOG", "debug")
        .run();
    done.assert_ok();
    assert_same_bytes(&src, &dst);
    let n = done
        .stderr
        .lines()
        .filter(|l| l.contains("extended headers true"))
        .count();
    assert!(n >= 2, "{}", done.stderr);
}

#[test]
fn nbdkit_without_extended_headers_falls_back_to_structured_replies() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 48 << 20, 0x44);
    let dst = dir.path().join("dst.img");
    let server = Server::nbdkit(&["file", s(&src)]);
    let done = Nbdcp::new(&["-v", &server.uri(), s(&dst)])
        .env("RUST_LOG", "debug")
        .run();
    done.assert_ok();
    assert_same_bytes(&src, &dst);
    let line = negotiated_line(&done.stderr);
    assert!(line.contains("extended headers false"), "{line}");
    assert!(line.contains("structured replies true"), "{line}");
    assert!(line.contains("base:allocation Some"), "{line}");
    // nbdkit refused the option, and said so.
    assert!(
        done.stderr.contains("no extended headers"),
        "{}",
        done.stderr
    );
}

#[test]
fn qemu_nbd_zeroes_and_describes_more_than_4_gib_in_one_request_each() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tmp();
    let size = 12u64 << 30;
    let img = dir.path().join("big.img");
    let mut f = File::create(&img).unwrap();
    f.set_len(size).unwrap();
    for at in [0, 5 << 30, size - (1 << 20)] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[0xee; 1 << 20]).unwrap();
    }
    drop(f);
    let server = Server::qemu_nbd(&["--trace", REQUESTS_TRACE, "-f", "raw", s(&img)]);
    let uri = nbd::NbdUri::parse(&server.uri()).unwrap();
    let mut c = nbd::Client::connect(&uri, &nbd::ClientOptions::default()).unwrap();
    assert!(c.negotiated().extended_headers);
    assert!(c.max_request_without_payload() > size);
    // One block status request for the whole 12 GiB.
    let extents = c.block_status(0, size).unwrap();
    assert_eq!(
        extents.iter().map(|e| e.0).sum::<u64>(),
        size,
        "{extents:?}"
    );
    assert!(extents.len() >= 5, "{extents:?}");
    // One zero request for all of it.
    c.write_many(
        [nbd::WriteCmd::WriteZeroes {
            offset: 0,
            length: size,
            no_hole: false,
            fast_zero: false,
        }],
        4,
        1 << 20,
    )
    .unwrap();
    c.flush().unwrap();
    let zero = nbd::wire::NBD_STATE_ZERO;
    let extents = c.block_status(0, size).unwrap();
    assert!(extents.iter().all(|e| e.1 & zero != 0), "{extents:?}");
    c.disconnect().unwrap();
    let trace = server.stderr_text();
    assert_eq!(trace.matches("(block status)").count(), 2, "{trace}");
    assert_eq!(trace.matches("(write zeroes)").count(), 1, "{trace}");
    let mut bytes = vec![0u8; 1 << 20];
    let mut f = File::open(&img).unwrap();
    for at in [0, 5 << 30, size - (1 << 20)] {
        use std::io::Read;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut bytes).unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "offset {at}");
    }
}

/// A mostly sparse 1 TiB qcow2 image is described in a few dozen block
/// status requests (one per 64 GiB looked ahead, per connection), not one
/// per 128 MiB segment (8192), and copied exactly.
#[test]
fn sparse_1_tib_qcow2_needs_few_block_status_requests() {
    require("qemu-img");
    require("qemu-io");
    let dir = tmp();
    let q = dir.path().join("big.qcow2");
    let out = dir.path().join("out.raw");
    let ok = |c: &mut std::process::Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", s(&q), "1T"]));
    ok(std::process::Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x55 0 2M",
        "-c",
        "write -P 0x66 300G 2M",
        "-c",
        "write -P 0x77 1023G 1M",
        s(&q),
    ]));
    let server = Server::qemu_nbd(&[
        "--trace",
        REQUESTS_TRACE,
        "-f",
        "qcow2",
        "-r",
        "-e",
        "4",
        s(&q),
    ]);
    Nbdcp::new(&[&server.uri(), s(&out)]).run().assert_ok();
    ok(std::process::Command::new("qemu-img").args([
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&q),
        s(&out),
    ]));
    let trace = server.stderr_text();
    let asked = trace.matches("(block status)").count();
    assert!((16..200).contains(&asked), "{asked} block status requests");
}
