//! What nbdcp sends on the wire, proven with nbdkit's log filter (which
//! is outermost, so it logs exactly the client's requests): the
//! destination is never read, writes never overlap, holes become zero
//! requests, every destination connection ends with a flush, several
//! connections are used even without multi-conn, and the source is asked
//! for block status. Bytes are still checked, read back with qemu-img.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// Connections of `log` that sent at least one request.
fn active_connections(log: &[LogEntry]) -> Vec<u64> {
    let mut conns: Vec<u64> = log
        .iter()
        .filter(|e| e.command.is_request())
        .map(|e| e.connection)
        .collect();
    conns.sort();
    conns.dedup();
    conns
}

/// The server at `uri` holds nbdkit's pattern for `size` bytes, read back
/// with qemu-img into `dir`.
fn assert_holds_pattern(uri: &str, dir: &Path, size: u64) {
    let back = dir.join("back.raw");
    read_back(uri, &back, size);
    assert_file_is(&back, &pattern_bytes(size));
}

/// The facts every destination log must show: no reads, no block status,
/// no overlapping writes/zeroes, every request succeeded, and (when
/// `flush`) a flush as the last request on every connection that sent
/// anything, or (when not) no flush at all.
fn assert_destination_log(log: &[LogEntry], flush: bool) {
    assert!(
        requests_of(log, LogCommand::Read).is_empty(),
        "the destination was read"
    );
    assert!(
        requests_of(log, LogCommand::Extents).is_empty(),
        "block status was asked of the destination"
    );
    for e in log.iter().filter(|e| e.command.is_request()) {
        assert!(e.ok(), "request failed: {e:?}");
    }
    let mut mods = modifying_requests(log);
    mods.sort_by_key(|e| (e.offset, e.end()));
    for w in mods.windows(2) {
        assert!(
            w[0].end() <= w[1].offset,
            "overlapping requests: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    for conn in active_connections(log) {
        let requests: Vec<&LogEntry> = log
            .iter()
            .filter(|e| e.connection == conn && e.command.is_request())
            .collect();
        let flushes = requests
            .iter()
            .filter(|e| e.command == LogCommand::Flush)
            .count();
        if flush {
            let last = requests.iter().max_by_key(|e| e.line).unwrap();
            assert_eq!(
                last.command,
                LogCommand::Flush,
                "connection {conn}: the last request is not a flush"
            );
            // The flush was sent after every other request completed.
            let last_done = requests
                .iter()
                .filter(|e| e.command != LogCommand::Flush)
                .filter_map(|e| e.done_line)
                .max();
            if let Some(done) = last_done {
                assert!(
                    done < last.line,
                    "connection {conn}: flush sent before writes completed"
                );
            }
        } else {
            assert_eq!(flushes, 0, "connection {conn}: flush despite --no-flush");
        }
    }
}

/// A 16 MiB file: 1 MiB of data, a 14 MiB hole, 1 MiB of data.
const HOLE: (u64, u64) = (MIB, 15 * MIB);

fn big_hole_image(path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&random_bytes(1, MIB as usize), 0).unwrap();
    f.write_all_at(&random_bytes(2, MIB as usize), HOLE.1)
        .unwrap();
}

/// The source's hole becomes zero requests (may-trim by default), never a
/// write; from a file source and from an NBD source alike.
#[test]
fn holes_become_zero_requests() {
    require("nbdkit");
    require("qemu-nbd");
    let d = tmp();
    let src = d.path().join("src.img");
    big_hole_image(&src);
    let nbd_source = Server::qemu_nbd(&["-r", "-f", "raw", s(&src)]);
    for source in [s(&src).to_string(), nbd_source.uri()] {
        let dest = Server::nbdkit_logged(&["memory", "16M"]);
        write_with_qemu_img(&src_garbage(d.path()), &dest.uri());
        let before = dest.wait_log_idle().len();
        run_ok(&["-C", "1", &source, &dest.uri()]);
        let log = dest.wait_log_idle();
        let log = &log[before..];
        assert_destination_log(log, true);
        let writes = requests_of(log, LogCommand::Write);
        let zeroes = requests_of(log, LogCommand::Zero);
        let in_hole = overlapping(&writes, HOLE.0, HOLE.1);
        assert!(
            in_hole.is_empty(),
            "{source}: writes into the hole: {in_hole:?}"
        );
        assert!(
            covers(&zeroes, HOLE.0, HOLE.1),
            "{source}: the hole is not covered by zero requests: {zeroes:?}"
        );
        assert!(
            zeroes.iter().all(|z| z.flag("trim")),
            "{source}: zero requests should allow punching holes"
        );
        let written: u64 = writes.iter().map(|w| w.count).sum();
        assert!(
            written <= 2 * MIB,
            "{source}: {written} bytes written for 2 MiB of data"
        );
        let back = d.path().join("back.raw");
        read_back(&dest.uri(), &back, 16 * MIB);
        assert_same_content(&src, &back);
    }
}

/// 16 MiB of garbage to fill a destination with first.
fn src_garbage(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("garbage.img");
    if !p.exists() {
        garbage(dir, "garbage.img", 16 * MIB);
    }
    p
}

/// --allocated: zero requests must not punch holes (NO_HOLE, logged as
/// trim=0); --destination-is-zero: no zero requests at all.
#[test]
fn allocated_and_destination_is_zero_change_the_zero_requests() {
    require("nbdkit");
    let d = tmp();
    let src = d.path().join("src.img");
    big_hole_image(&src);

    let dest = Server::nbdkit_logged(&["memory", "16M"]);
    run_ok(&["--allocated", s(&src), &dest.uri()]);
    let log = dest.wait_log_idle();
    assert_destination_log(&log, true);
    let zeroes = requests_of(&log, LogCommand::Zero);
    assert!(covers(&zeroes, HOLE.0, HOLE.1), "{zeroes:?}");
    assert!(
        zeroes.iter().all(|z| !z.flag("trim")),
        "--allocated sent zero requests that may punch holes: {zeroes:?}"
    );

    let dest = Server::nbdkit_logged(&["memory", "16M"]);
    run_ok(&["--destination-is-zero", s(&src), &dest.uri()]);
    let log = dest.wait_log_idle();
    assert_destination_log(&log, true);
    assert!(requests_of(&log, LogCommand::Zero).is_empty());
    let writes = requests_of(&log, LogCommand::Write);
    assert!(covers(&writes, 0, HOLE.0) && covers(&writes, HOLE.1, 16 * MIB));
    assert!(overlapping(&writes, HOLE.0, HOLE.1).is_empty());
    let back = d.path().join("back.raw");
    read_back(&dest.uri(), &back, 16 * MIB);
    assert_same_content(&src, &back);
}

/// A mixed image over two connections: the destination invariants hold
/// and, with --no-flush, no flush is sent at all.
#[test]
fn destination_is_never_read_and_flushed_last_on_each_connection() {
    require("nbdkit");
    let d = tmp();
    let src = d.path().join("src.img");
    let size = 16 * MIB + 4096;
    mixed_image(&src, size, 40);
    let size_arg = size.to_string();
    for (flags, flush) in [(&[][..], true), (&["--no-flush"][..], false)] {
        let dest = Server::nbdkit_logged(&["memory", &size_arg]);
        let mut args = vec!["-C", "2", "-T", "2"];
        args.extend_from_slice(flags);
        let uri = dest.uri();
        args.push(s(&src));
        args.push(&uri);
        run_ok(&args);
        let log = dest.wait_log_idle();
        assert_destination_log(&log, flush);
        assert!(
            !modifying_requests(&log).is_empty(),
            "{flags:?}: nothing was written"
        );
        let back = d.path().join("back.raw");
        read_back(&dest.uri(), &back, size);
        assert_same_content(&src, &back);
    }
}

/// Four connections (-C 4 -T 4) to a destination that does NOT advertise
/// multi-conn all write, each in its own region, each flushed last. The
/// source has four 128 MiB segments (one per worker), almost all hole, so
/// the image is cheap despite its size.
#[test]
fn four_connections_write_to_a_server_without_multi_conn() {
    require("nbdkit");
    require("qemu-img");
    let d = tmp();
    let size = 512 * MIB;
    // A worker's reading half takes the next segment as soon as it has
    // handed its batch to the writing half, so a fast source would let
    // one worker take two segments before another has started; the slow
    // block status keeps each reader on its segment long enough.
    let source = Server::nbdkit_logged(&[
        "--filter=delay",
        "data",
        "@0 1*4096 @0x8000000 2*4096 @0x10000000 3*4096 @0x18000000 4*4096 @0x1fff0000 5*65536",
        "size=512M",
        "delay-extents=300ms",
    ]);
    let dest = Server::nbdkit_logged(&[
        "--filter=multi-conn",
        "--filter=delay",
        "memory",
        "512M",
        "multi-conn-mode=disable",
        "delay-write=20ms",
        "delay-zero=20ms",
    ]);
    let info = probe_export(dest.socket_path(), "");
    assert_eq!(info.size, size);
    assert_eq!(
        info.flags & NBD_FLAG_CAN_MULTI_CONN,
        0,
        "the destination must not advertise multi-conn for this test"
    );
    assert_ne!(info.flags & NBD_FLAG_SEND_FLUSH, 0);
    run_ok(&["-C", "4", "-T", "4", &source.uri(), &dest.uri()]);

    let log = dest.wait_log_idle();
    assert_destination_log(&log, true);
    let writers: Vec<u64> = {
        let mut v: Vec<u64> = requests_of(&log, LogCommand::Write)
            .iter()
            .map(|e| e.connection)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(
        writers.len(),
        4,
        "expected writes on 4 connections, got {writers:?}"
    );
    for conn in &writers {
        let flushes = log
            .iter()
            .filter(|e| e.connection == *conn && e.command == LogCommand::Flush)
            .count();
        assert!(flushes >= 1, "connection {conn} was not flushed");
    }
    // Each destination connection stayed within whole 128 MiB segments:
    // no segment was shared between connections.
    let seg = 128 * MIB;
    for e in modifying_requests(&log) {
        let owner = log
            .iter()
            .filter(|o| o.command.is_request() && o.command != LogCommand::Flush)
            .filter(|o| o.offset / seg == e.offset / seg)
            .map(|o| o.connection)
            .collect::<std::collections::BTreeSet<_>>();
        assert_eq!(
            owner.len(),
            1,
            "segment {} was written by {owner:?}",
            e.offset / seg
        );
    }

    // The source was asked for block status, not read in its holes.
    let slog = source.wait_log_idle();
    assert!(!requests_of(&slog, LogCommand::Extents).is_empty());
    let read: u64 = requests_of(&slog, LogCommand::Read)
        .iter()
        .map(|r| r.count)
        .sum();
    assert!(read < 16 * MIB, "read {read} bytes of a sparse source");

    // And the bytes are right.
    let expected = d.path().join("expected.raw");
    let f = File::create(&expected).unwrap();
    f.set_len(size).unwrap();
    for (i, off) in [0u64, 0x8000000, 0x10000000, 0x18000000].iter().enumerate() {
        f.write_all_at(&[i as u8 + 1; 4096], *off).unwrap();
    }
    f.write_all_at(&[5u8; 65536], 0x1fff0000).unwrap();
    drop(f);
    let back = d.path().join("back.raw");
    read_back(&dest.uri(), &back, size);
    assert_same_content(&expected, &back);
}

/// The source is asked for block status and its holes are not read;
/// --no-extents sends no block status and reads everything.
#[test]
fn source_block_status_unless_no_extents() {
    require("nbdkit");
    require("qemu-img");
    let d = tmp();
    let src = d.path().join("src.img");
    big_hole_image(&src);
    let source = Server::nbdkit_logged(&["memory", "16M"]);
    write_with_qemu_img(&src, &source.uri());
    let mut before = source.wait_log_idle().len();
    for no_extents in [false, true] {
        let out = d.path().join("out.img");
        let mut args = vec![];
        if no_extents {
            args.push("--no-extents");
        }
        let uri = source.uri();
        args.push(&uri);
        args.push(s(&out));
        run_ok(&args);
        let all = source.wait_log_idle();
        let log = &all[before..];
        before = all.len();
        let extents = requests_of(log, LogCommand::Extents);
        let reads = requests_of(log, LogCommand::Read);
        assert!(modifying_requests(log).is_empty(), "the source was written");
        if no_extents {
            assert!(extents.is_empty(), "--no-extents sent block status");
            assert!(covers(&reads, 0, 16 * MIB), "--no-extents: not all read");
        } else {
            assert!(!extents.is_empty(), "no block status asked of the source");
            let in_hole = overlapping(&reads, HOLE.0 + 64 * 1024, HOLE.1 - 64 * 1024);
            assert!(in_hole.is_empty(), "the hole was read: {in_hole:?}");
        }
        assert_same_content(&src, &out);
    }
}

/// -R bounds the requests in flight per connection on both sides (and
/// with -R 8 several really are in flight: reads are pipelined);
/// --synchronous uses one connection and one request at a time.
#[test]
fn requests_in_flight_are_bounded() {
    require("nbdkit");
    require("qemu-img");
    let d = tmp();
    let size = 8 * MIB;
    for (flags, limit, want_overlap) in [
        (&["-R", "1", "-C", "2", "-T", "2"][..], 1usize, false),
        (&["--synchronous", "-C", "2", "-T", "2"][..], 1, false),
        (
            &["-R", "8", "--request-size", "64K", "-C", "1"][..],
            8,
            true,
        ),
    ] {
        let source = Server::nbdkit_logged(&["--filter=delay", "pattern", "8M", "delay-read=2ms"]);
        let dest = Server::nbdkit_logged(&["--filter=delay", "memory", "8M", "delay-write=2ms"]);
        let mut args = flags.to_vec();
        let (su, du) = (source.uri(), dest.uri());
        args.push(&su);
        args.push(&du);
        run_ok(&args);
        let slog = source.wait_log_idle();
        let dlog = dest.wait_log_idle();
        assert_destination_log(&dlog, true);
        let mut smax = 0;
        for (what, log) in [("source", &slog), ("destination", &dlog)] {
            for conn in active_connections(log) {
                let m = max_in_flight(log, conn);
                assert!(
                    m <= limit,
                    "{flags:?}: {what} connection {conn} had {m} requests in flight"
                );
                if what == "source" {
                    smax = smax.max(m);
                }
            }
        }
        if flags.contains(&"--synchronous") {
            assert_eq!(active_connections(&slog).len(), 1, "{flags:?}");
            assert_eq!(active_connections(&dlog).len(), 1, "{flags:?}");
        }
        if want_overlap {
            assert!(
                smax > 1,
                "{flags:?}: never more than one read in flight on the source"
            );
        }
        assert_holds_pattern(&dest.uri(), d.path(), size);
    }
}

/// A server slow to answer, on one connection (nbdkit does not advertise
/// multi-conn): the reads of several batches are in flight at once, so
/// the server is never idle between batches, and the destination's
/// writes of several batches too, within -R and --queue-size. Before,
/// one connection kept one 2 MiB batch in flight whatever -R said.
#[test]
fn slow_servers_get_several_batches_in_flight_on_one_connection() {
    require("qemu-img");
    let size = 48 * MIB;
    // multi-conn outside delay: the other way round nbdkit 1.32
    // finalizes the multi-conn filter twice and aborts.
    let slow = ["--filter=multi-conn", "--filter=delay"];
    let mut src_args = slow.to_vec();
    src_args.extend(["pattern", "48M", "delay-read=20ms"]);
    let mut dst_args = slow.to_vec();
    dst_args.extend(["memory", "48M", "delay-write=20ms", "delay-zero=20ms"]);
    for args in [&mut src_args, &mut dst_args] {
        args.push("multi-conn-mode=disable");
    }
    let source = Server::nbdkit_logged(&src_args);
    let dest = Server::nbdkit_logged(&dst_args);
    let queue = 8 * MIB;
    run_ok(&[
        "-C1",
        "--queue-size",
        "8M",
        "--request-size",
        "1M",
        &source.uri(),
        &dest.uri(),
    ]);
    let slog = source.wait_log_idle();
    let dlog = dest.wait_log_idle();
    assert_destination_log(&dlog, true);
    assert_eq!(active_connections(&slog).len(), 1);
    assert_eq!(active_connections(&dlog).len(), 1);
    let conn = active_connections(&slog)[0];
    // 1 MiB reads in 2 MiB batches: more than two in flight means more
    // than one batch; the queue bounds their bytes.
    let reads = max_in_flight(&slog, conn);
    let read_bytes = max_read_bytes_in_flight(&slog, conn);
    assert!(reads > 2, "at most {reads} reads in flight at once");
    assert!(read_bytes <= queue, "{read_bytes} bytes of reads in flight");
    // Writes are merged up to --request-size, two a batch: more than two
    // in flight means writes of several batches.
    let dconn = active_connections(&dlog)[0];
    let writes = max_in_flight(&dlog, dconn);
    assert!(writes > 2, "at most {writes} writes in flight at once");
    let d = tmp();
    assert_holds_pattern(&dest.uri(), d.path(), size);
}

/// Writes to a server quick to answer are cut to 256 KiB, whatever the
/// reads (qemu-nbd's allocator faults fresh pages for long ones); a
/// server slow to answer gets them merged, one long write a batch, as
/// its rate is what it serves at once times their length.
#[test]
fn writes_are_cut_for_a_quick_server_and_merged_for_a_slow_one() {
    require("qemu-img");
    // 24 batches: the latency counts from the eighth answer on.
    let size = 48 * MIB;
    let d = tmp();
    let src = d.path().join("src.raw");
    std::fs::write(&src, pattern_bytes(size)).unwrap();
    let src = src.to_str().unwrap();
    let quick = Server::nbdkit_logged(&["memory", "48M"]);
    let slow = Server::nbdkit_logged(&["--filter=delay", "memory", "48M", "delay-write=10ms"]);
    for (dest, longest) in [(&quick, 256 * 1024), (&slow, 2 * MIB)] {
        run_ok(&[src, &dest.uri()]);
        let log = dest.wait_log_idle();
        assert_destination_log(&log, true);
        let writes = requests_of(&log, LogCommand::Write);
        let most = writes.iter().map(|w| w.count).max().unwrap_or(0);
        assert_eq!(most, longest, "{}: longest write", dest.uri());
        assert_holds_pattern(&dest.uri(), d.path(), size);
    }
}

/// A source slow to answer reads gets -C workers, not one more than the
/// cores: its workers mostly wait.
#[test]
fn a_slow_source_gets_every_connection() {
    let source = Server::nbdkit_logged(&[
        "--filter=multi-conn",
        "--filter=delay",
        "pattern",
        "1G",
        "delay-read=5ms",
        "multi-conn-mode=disable",
    ]);
    run_ok(&["-C4", &source.uri(), "null:"]);
    let log = source.wait_log_idle();
    assert_eq!(active_connections(&log).len(), 4);
}

/// --request-size bounds the reads from the source.
#[test]
fn request_size_bounds_source_reads() {
    require("nbdkit");
    for (flag, size) in [("64K", 64 * 1024u64), ("1M", MIB)] {
        let source = Server::nbdkit_logged(&["pattern", "8M"]);
        run_ok(&["--request-size", flag, &source.uri(), "null:"]);
        let log = source.wait_log_idle();
        let reads = requests_of(&log, LogCommand::Read);
        assert!(covers(&reads, 0, 8 * MIB));
        let biggest = reads.iter().map(|r| r.count).max().unwrap();
        assert!(
            biggest <= size,
            "--request-size {flag}: a read of {biggest}"
        );
        assert_eq!(
            biggest, size,
            "--request-size {flag}: reads never reached the request size"
        );
    }
}

/// Without --request-size, reads are 1 MiB on a Unix socket (servers
/// spend less CPU on fewer requests) and 256 KiB on TCP, as nbdcopy's.
#[test]
fn default_request_size_depends_on_the_transport() {
    require("nbdkit");
    let unix = Server::nbdkit_logged(&["pattern", "8M"]);
    let tcp = Server::nbdkit_tcp_logged(&["pattern", "8M"]);
    for (server, size) in [(unix, MIB), (tcp, 256 * 1024)] {
        run_ok(&[&server.uri(), "null:"]);
        let log = server.wait_log_idle();
        let mut reads = requests_of(&log, LogCommand::Read);
        assert!(covers(&reads, 0, 8 * MIB));
        // Before the copy one 4 KiB read at 0 times the source (a slow
        // one gets more workers).
        if reads
            .first()
            .is_some_and(|r| (r.offset, r.count) == (0, 4096))
        {
            reads.remove(0);
        }
        let sizes: Vec<u64> = reads.iter().map(|r| r.count).collect();
        assert!(
            sizes.iter().all(|&n| n == size),
            "{}: reads of {sizes:?}",
            server.uri()
        );
    }
}
