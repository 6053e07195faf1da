//! Ranges (`--source-offset`, `--destination-offset`, `--length`, as dd's
//! skip, seek and count) and the bandwidth cap (`--rate`), against files
//! and real NBD servers.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn range(v: &[u8], from: u64, len: u64) -> &[u8] {
    &v[from as usize..(from + len) as usize]
}

#[test]
fn a_range_lands_where_asked_and_the_rest_stays() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 8 * MIB, 11);
    let dst = garbage(dir.path(), "dst.img", 12 * MIB);
    Nbdcp::new(&[
        "--source-offset=1M",
        "--destination-offset=3M",
        "--length=4M",
        s(&src),
        s(&dst),
    ])
    .run()
    .assert_ok();
    let (s, d) = (bytes(&src), bytes(&dst));
    assert_eq!(d.len() as u64, 12 * MIB, "the destination is not truncated");
    assert!(range(&s, MIB, 4 * MIB) == range(&d, 3 * MIB, 4 * MIB));
    assert!(range(&d, 0, 3 * MIB).iter().all(|&b| b == 0xEE));
    assert!(range(&d, 7 * MIB, 5 * MIB).iter().all(|&b| b == 0xEE));
}

#[test]
fn without_a_length_the_range_runs_to_the_end_and_a_short_file_grows() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 4 * MIB + 5, 12);
    let dst = garbage(dir.path(), "dst.img", MIB);
    Nbdcp::new(&["--destination-offset=2M", s(&src), s(&dst)])
        .run()
        .assert_ok();
    let (s, d) = (bytes(&src), bytes(&dst));
    assert_eq!(d.len() as u64, 6 * MIB + 5);
    assert!(range(&d, 0, MIB).iter().all(|&b| b == 0xEE));
    assert!(range(&d, MIB, MIB).iter().all(|&b| b == 0), "grown: zero");
    assert!(range(&d, 2 * MIB, 4 * MIB + 5) == &s[..]);
}

#[test]
fn ranges_between_nbd_servers_on_several_connections() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 16 * MIB, 13);
    let dst = garbage(dir.path(), "dst.img", 16 * MIB);
    let from = Server::qemu_nbd(&["-r", "-e", "4", "-f", "raw", s(&src)]);
    let to = Server::qemu_nbd(&["-e", "4", "-f", "raw", s(&dst)]);
    // Offsets that are not segment-aligned, on four connections.
    Nbdcp::new(&[
        "-C",
        "4",
        "-T",
        "4",
        "--source-offset=3M",
        "--destination-offset=5M",
        "--length=9M",
        &from.uri(),
        &to.uri(),
    ])
    .run()
    .assert_ok();
    drop(to);
    let (s, d) = (bytes(&src), bytes(&dst));
    assert!(range(&s, 3 * MIB, 9 * MIB) == range(&d, 5 * MIB, 9 * MIB));
    assert!(range(&d, 0, 5 * MIB).iter().all(|&b| b == 0xEE));
    assert!(range(&d, 14 * MIB, 2 * MIB).iter().all(|&b| b == 0xEE));
}

/// The library, with segments small enough that the range is cut into
/// many and shared by four workers: extents, zero detection and
/// segments work inside the range as for a whole image.
#[test]
fn a_range_cut_into_many_segments_by_the_library() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 24 * MIB, 14);
    let dst = garbage(dir.path(), "dst.img", 24 * MIB);
    let from = Server::qemu_nbd(&["-r", "-e", "4", "-f", "raw", s(&src)]);
    let mut options = nbdcp::CopyOptions::default();
    options.connections = 4;
    options.threads = 4;
    options.segment_size = MIB;
    options.source_offset = 2 * MIB + 4096;
    options.destination_offset = 512 * 1024;
    options.length = Some(17 * MIB);
    let stats = nbdcp::copy(
        &nbdcp::EndpointSpec::parse(from.uri()),
        &nbdcp::EndpointSpec::parse(&dst),
        &options,
    )
    .unwrap();
    assert_eq!(stats.bytes, 17 * MIB);
    let (s, d) = (bytes(&src), bytes(&dst));
    assert!(range(&s, 2 * MIB + 4096, 17 * MIB) == range(&d, 512 * 1024, 17 * MIB));
    assert!(range(&d, 0, 512 * 1024).iter().all(|&b| b == 0xEE));
    let end = 512 * 1024 + 17 * MIB;
    assert!(range(&d, end, 24 * MIB - end).iter().all(|&b| b == 0xEE));
}

#[test]
fn a_range_past_either_end_is_refused_before_any_write() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 4 * MIB, 15);
    let to = Server::nbdkit_logged(&["memory", "size=4M"]);
    let uri = to.uri();
    for flags in [
        &["--source-offset=3M", "--length=2M"][..],
        &["--source-offset=5M"],
        &["--destination-offset=3M"],
        &["--destination-offset=1M", "--length=3584K"],
    ] {
        let mut args = flags.to_vec();
        args.extend([s(&src), &uri]);
        let run = Nbdcp::new(&args).run();
        let line = if flags[0].starts_with("--source") {
            run.assert_failure(2, s(&src)).to_string()
        } else {
            run.assert_clean_failure(&uri).to_string()
        };
        assert!(
            line.contains("past the end") || line.contains("too small"),
            "{line}"
        );
    }
    let writes = requests_of(&to.log_entries(), LogCommand::Write).len();
    assert_eq!(writes, 0);
}

#[test]
fn a_range_off_an_nbd_servers_block_size_is_refused() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 4 * MIB, 16);
    let to = Server::nbdkit_logged(&[
        "--filter=blocksize-policy",
        "memory",
        "size=4M",
        "blocksize-minimum=4096",
    ]);
    let run = Nbdcp::new(&[
        "--destination-offset=1000",
        "--length=1M",
        s(&src),
        &to.uri(),
    ])
    .run();
    let line = run.assert_failure(2, &to.uri());
    assert!(line.contains("--destination-offset 1000"), "{line}");
    assert_eq!(requests_of(&to.log_entries(), LogCommand::Write).len(), 0);
}

#[test]
fn a_range_from_a_pipe_is_a_usage_error() {
    let run = Nbdcp::new(&["--source-offset=4096", "-", "null:"])
        .stdin(&[1u8; 8192])
        .run();
    run.assert_failure(2, "-");
}

/// issue 14's check: an 8 MiB image at `--rate=4M` takes between 1.5 and
/// 3.5 seconds.
#[test]
fn rate_caps_the_data_read_across_all_workers() {
    let dir = tmp();
    let src = dir.path().join("src.img");
    random_file(&src, 8 * MIB, 17);
    let started = Instant::now();
    Nbdcp::new(&["--rate=4M", "-C", "4", "-T", "4", s(&src), "null:"])
        .run()
        .assert_ok();
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(1500) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    // Holes skipped through extents do not count: 1 GiB of them is quick.
    let sparse = dir.path().join("sparse.img");
    sparse_file(&sparse, 1 << 30);
    let started = Instant::now();
    Nbdcp::new(&["--rate=4M", s(&sparse), "null:"])
        .run()
        .assert_ok();
    assert!(started.elapsed() < Duration::from_secs(2));
}
