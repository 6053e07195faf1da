use std::thread;
use std::time::Duration;

use super::*;
use crate::error::ServerErrno;
use crate::testkit::{Export, FakeConfig, Misbehave, Peer, Server};

fn connect(server: &Server) -> Client {
    let opts = ClientOptions {
        name: "fake".into(),
        timeout: Some(Duration::from_secs(10)),
        ..ClientOptions::default()
    };
    Client::connect(&server.uri(), &opts).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ seed)
        .collect()
}

fn start(size: usize, f: impl FnOnce(&mut FakeConfig)) -> Server {
    Server::memory(size, f)
}

/// The modern handshake nbdcp's client does, checked step by step, for a
/// 64 KiB export whose `base:allocation` has context id 1.
fn small_export() -> Export {
    Export::new(65536).flags(NBD_FLAG_HAS_FLAGS).context(1)
}

/// Run `script` as the server of a connection on a thread; the client's
/// end is returned with the thread, whose script must not fail.
fn scripted(
    script: impl FnOnce(&mut Peer) -> io::Result<()> + Send + 'static,
) -> (Transport, thread::JoinHandle<io::Result<()>>) {
    let (c, mut p) = Peer::pair();
    let t = thread::spawn(move || script(&mut p));
    (Transport::from_unix(c), t)
}

#[test]
fn cover_tracks_ranges() {
    let mut r = Vec::new();
    assert!(cover(&mut r, 10, 20));
    assert!(cover(&mut r, 0, 5));
    assert_eq!(r, vec![(0, 5), (10, 20)]);
    assert!(!cover(&mut r, 4, 6));
    assert!(!cover(&mut r, 19, 21));
    assert!(!cover(&mut r, 12, 13));
    assert!(!cover(&mut r, 0, 30));
    assert!(cover(&mut r, 5, 10));
    assert_eq!(r, vec![(0, 20)]);
    assert!(cover(&mut r, 25, 30));
    assert!(cover(&mut r, 20, 25));
    assert_eq!(r, vec![(0, 30)]);
}

#[test]
fn capabilities_and_block_size_defaults() {
    let server = start(1 << 20, |_| {});
    let c = connect(&server);
    assert_eq!(c.size(), 1 << 20);
    assert!(c.can_flush() && c.can_trim() && c.can_zero() && c.can_fast_zero());
    assert!(c.multi_conn() && c.has_base_allocation() && !c.read_only());
    assert_eq!(
        c.block_size(),
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20
        }
    );

    let server = start(4096, |c| c.block_size = Some((512, 4096, u32::MAX)));
    let c = connect(&server);
    assert_eq!(
        c.block_size(),
        BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20
        }
    );
}

#[test]
fn pipelined_reads_with_holes_and_reordered_replies() {
    let server = start(1 << 20, |_| {});
    let data = pattern(1 << 20, 1);
    server.fill(0, &data);
    // Zero stretches become hole chunks.
    server.fill(8192, &[0u8; 3 * 4096]);
    let mut expect = data.clone();
    expect[8192..8192 + 3 * 4096].fill(0);
    let mut c = connect(&server);
    let sizes = [4096usize, 100, 65536, 12288 + 7, 1, 200_000];
    let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xaa; n]).collect();
    let offsets = [8192u64, 3, 100_000, 4095, 0, 500_000];
    let mut reqs: Vec<(u64, &mut [u8])> = offsets
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&o, b)| (o, b.as_mut_slice()))
        .collect();
    c.read_many(&mut reqs, 3, 1 << 20).unwrap();
    for (o, b) in offsets.iter().zip(&bufs) {
        let o = *o as usize;
        assert_eq!(&b[..], &expect[o..o + b.len()], "offset {o}");
    }
    assert!(server.max_pending() <= 3, "{}", server.max_pending());
    assert!(server.max_pending() >= 2, "{}", server.max_pending());
}

#[test]
fn bytes_in_flight_are_bounded() {
    let server = start(1 << 20, |_| {});
    let mut c = connect(&server);
    let mut bufs = vec![vec![0u8; 65536]; 8];
    let mut reqs: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| (i as u64 * 65536, b.as_mut_slice()))
        .collect();
    c.read_many(&mut reqs, 64, 2 * 65536).unwrap();
    assert!(server.max_pending() <= 2, "{}", server.max_pending());
    // One request bigger than the byte limit still goes.
    let mut big = vec![0u8; 1 << 20];
    c.read_many(&mut [(0u64, big.as_mut_slice())], 64, 1)
        .unwrap();
}

#[test]
fn large_requests_are_split_to_the_server_maximum() {
    let server = start(1 << 20, |c| c.block_size = Some((512, 4096, 65536)));
    let data = pattern(1 << 20, 2);
    server.fill(0, &data);
    let mut c = connect(&server);
    let mut buf = vec![0u8; 1 << 20];
    c.read_many(&mut [(0u64, buf.as_mut_slice())], 4, 1 << 20)
        .unwrap();
    assert_eq!(buf, data);
    let new = pattern(1 << 20, 3);
    c.write_many(
        [WriteCmd::Write {
            offset: 0,
            data: &new,
            lend: true,
        }],
        4,
        1 << 20,
    )
    .unwrap();
    c.write_many(
        [WriteCmd::WriteZeroes {
            offset: 0,
            length: 300_000 - 300_000 % 512,
            no_hole: true,
            fast_zero: false,
        }],
        4,
        1 << 20,
    )
    .unwrap();
    // Only payloads are bounded by the server's maximum: the zero request
    // carries none and goes out whole.
    let reqs = server.requests();
    let zeroes = |reqs: &[Request]| -> Vec<(u64, u32)> {
        reqs.iter()
            .filter(|r| r.command == NBD_CMD_WRITE_ZEROES)
            .map(|r| (r.offset, r.length))
            .collect()
    };
    assert_eq!(zeroes(&reqs), vec![(0, 299_520)]);
    let payloads = reqs.iter().filter(|r| r.command != NBD_CMD_WRITE_ZEROES);
    assert!(payloads.clone().all(|r| r.length <= 65536), "{reqs:?}");
    assert!(
        reqs.iter()
            .all(|r| r.offset % 512 == 0 && r.length % 512 == 0)
    );
    assert!(
        reqs.iter()
            .all(|r| r.command != NBD_CMD_WRITE_ZEROES || r.flags == NBD_CMD_FLAG_NO_HOLE)
    );
    let mut want = new.clone();
    want[..299_520].fill(0);
    assert_eq!(server.data(), want);
    // A server that refuses that gets zero requests split like payloads.
    c.limit_requests_without_payload();
    c.write_many(
        [WriteCmd::WriteZeroes {
            offset: 0,
            length: 196_608,
            no_hole: false,
            fast_zero: false,
        }],
        4,
        1 << 20,
    )
    .unwrap();
    let after = server.requests();
    assert_eq!(
        zeroes(&after[reqs.len()..]),
        vec![(0, 65536), (65536, 65536), (131_072, 65536)]
    );
}

#[test]
fn reads_from_a_server_without_structured_replies() {
    let server = start(65536, |c| c.structured = false);
    let data = pattern(65536, 4);
    server.fill(0, &data);
    let mut c = connect(&server);
    assert!(!c.negotiated().structured_replies);
    assert!(!c.has_base_allocation());
    let mut a = vec![0u8; 30000];
    let mut b = vec![0u8; 30000];
    c.read_many(
        &mut [(0u64, a.as_mut_slice()), (35536, b.as_mut_slice())],
        8,
        1 << 20,
    )
    .unwrap();
    assert_eq!(a, data[..30000]);
    assert_eq!(b, data[35536..]);
    let e = c.block_status(0, 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}

#[test]
fn writes_zeroes_trims_and_flush() {
    let server = start(1 << 20, |_| {});
    let mut c = connect(&server);
    let a = pattern(100_000, 5);
    let b = pattern(50_000, 6);
    c.write_many(
        [
            WriteCmd::Write {
                offset: 0,
                data: &a,
                lend: true,
            },
            WriteCmd::Write {
                offset: 200_000,
                data: &b,
                lend: true,
            },
            WriteCmd::WriteZeroes {
                offset: 10_000,
                length: 5000,
                no_hole: false,
                fast_zero: true,
            },
            // Overlaps the first write: must land after it.
            WriteCmd::Write {
                offset: 50_000,
                data: &b,
                lend: true,
            },
            WriteCmd::Trim {
                offset: 900_000,
                length: 4096,
            },
        ],
        8,
        1 << 20,
    )
    .unwrap();
    c.flush().unwrap();
    let mut want = vec![0u8; 1 << 20];
    want[..100_000].copy_from_slice(&a);
    want[200_000..250_000].copy_from_slice(&b);
    want[10_000..15_000].fill(0);
    want[50_000..100_000].copy_from_slice(&b);
    assert_eq!(server.data(), want);
    let reqs = server.requests();
    let fz = reqs
        .iter()
        .find(|r| r.command == NBD_CMD_WRITE_ZEROES)
        .unwrap();
    assert_eq!(fz.flags, NBD_CMD_FLAG_FAST_ZERO);
    assert!(reqs.iter().any(|r| r.command == NBD_CMD_TRIM));
    assert_eq!(reqs.last().unwrap().command, NBD_CMD_FLUSH);
}

#[test]
fn zeroes_without_write_zeroes_use_the_zero_buffer() {
    let server = start(12 << 20, |c| c.write_zeroes = false);
    server.fill(0, &vec![9u8; 12 << 20]);
    let mut c = connect(&server);
    assert!(!c.can_zero() && !c.can_fast_zero());
    c.write_many(
        [WriteCmd::WriteZeroes {
            offset: 1,
            length: (10 << 20) + 5,
            no_hole: false,
            fast_zero: false,
        }],
        4,
        16 << 20,
    )
    .unwrap();
    let d = server.data();
    assert_eq!(d[0], 9);
    assert!(d[1..(10 << 20) + 6].iter().all(|&b| b == 0));
    assert_eq!(d[(10 << 20) + 6], 9);
    assert!(server.max_write_seen() <= ZERO_BUF_LEN as u64);
    let e = c
        .write_many(
            [WriteCmd::WriteZeroes {
                offset: 0,
                length: 1,
                no_hole: false,
                fast_zero: true,
            }],
            4,
            1 << 20,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(!c.is_dead());
}

#[test]
fn unsupported_commands_are_refused_locally() {
    let server = start(65536, |c| {
        c.trim = false;
        c.flush = false;
    });
    let mut c = connect(&server);
    let e = c
        .write_many(
            [WriteCmd::Trim {
                offset: 0,
                length: 1,
            }],
            1,
            1,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(c.flush().unwrap_err().kind(), ErrorKind::Unsupported);
    let server = start(65536, |c| c.read_only = true);
    let mut c = connect(&server);
    let e = c
        .write_many(
            [WriteCmd::Write {
                offset: 0,
                data: &[1],
                lend: true,
            }],
            1,
            1,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(server.requests().is_empty());
}

#[test]
fn server_errors_leave_the_connection_usable() {
    for simple_errors in [false, true] {
        let server = start(1 << 20, |c| {
            c.fail_at = Some(70_000);
            c.simple_errors = simple_errors;
        });
        let mut c = connect(&server);
        let mut bufs = vec![vec![0u8; 16384]; 40];
        let mut reqs: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| (i as u64 * 16384, b.as_mut_slice()))
            .collect();
        let e = c.read_many(&mut reqs, 4, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server);
        assert_eq!(e.offset(), Some(65536));
        // The errno travels as a value, so a caller can tell ENOSPC from
        // EIO without reading the text.
        assert_eq!(e.server_errno().map(ServerErrno::to_errno), Some(libc::EIO));
        let s = e.to_string();
        assert!(
            s.starts_with("read at offset 65536 length 16384: Input/output error"),
            "{s}"
        );
        if !simple_errors {
            assert!(s.contains("at offset 70000"), "{s}");
            assert!(s.contains("injected failure"), "{s}");
        }
        assert!(!c.is_dead());
        // Requests after the failing one were not sent.
        let sent = server.requests().len();
        assert!(sent < 40, "{sent}");
        let mut b = vec![0u8; 512];
        c.read_many(&mut [(0u64, b.as_mut_slice())], 4, 1 << 20)
            .unwrap();
        let e = c
            .write_many(
                [WriteCmd::Write {
                    offset: 69_000,
                    data: &[1u8; 2000],
                    lend: true,
                }],
                4,
                1 << 20,
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server);
        assert!(
            e.to_string()
                .starts_with("write at offset 69000 length 2000: ")
        );
        c.flush().unwrap();
    }
}

fn protocol_failure(m: Misbehave) -> Error {
    let server = start(65536, |c| {
        c.misbehave = m;
        c.reorder = false;
    });
    let mut c = connect(&server);
    let mut b = vec![0u8; 8192];
    let e = c
        .read_many(&mut [(4096u64, b.as_mut_slice())], 4, 1 << 20)
        .unwrap_err();
    assert!(c.is_dead(), "{m:?}");
    let again = c
        .read_many(&mut [(0u64, b.as_mut_slice())], 4, 1 << 20)
        .unwrap_err();
    assert!(again.to_string().contains("connection unusable"), "{again}");
    assert_eq!(again.kind(), e.kind());
    assert!(c.flush().is_err());
    e
}

#[test]
fn read_protocol_violations_kill_the_connection() {
    let cases = [
        (
            Misbehave::ShortRead,
            "short read reply (4096 of 8192 bytes)",
        ),
        (Misbehave::UnknownCookie, "unknown cookie"),
        (Misbehave::ChunkOutside, "outside the request"),
        (Misbehave::BadMagic, "bad magic"),
        (Misbehave::Overlap, "overlapping data chunk"),
        (Misbehave::ZeroErrno, "error value is zero"),
        (Misbehave::HugeChunk, "too long"),
    ];
    for (m, want) in cases {
        let e = protocol_failure(m);
        assert_eq!(e.kind(), ErrorKind::Protocol, "{m:?}: {e}");
        assert!(e.to_string().contains(want), "{m:?}: {e}");
        assert!(e.operation().is_some(), "{m:?}: {e}");
    }
    let e = protocol_failure(Misbehave::CloseMidReply);
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(
        e.to_string().contains("server closed the connection"),
        "{e}"
    );
}

#[test]
fn read_chunk_for_a_write_is_a_protocol_error() {
    let server = start(65536, |c| c.misbehave = Misbehave::HoleForWrite);
    let mut c = connect(&server);
    let e = c
        .write_many(
            [WriteCmd::Write {
                offset: 0,
                data: &[1u8; 512],
                lend: true,
            }],
            4,
            1 << 20,
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(
        e.to_string()
            .contains("read chunk in reply to NBD_CMD_WRITE"),
        "{e}"
    );
    assert!(c.is_dead());
}

#[test]
fn block_status_extents() {
    let server = start(1 << 20, |c| c.extra_context = true);
    server.fill(8192, &[1u8; 4096]);
    server.fill(20480, &[1u8; 1]);
    let mut c = connect(&server);
    let ext = c.block_status(0, 1 << 20).unwrap();
    let z = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(
        ext,
        vec![
            (8192, z),
            (4096, 0),
            (8192, z),
            (4096, 0),
            ((1 << 20) - 24576, z)
        ]
    );
    let ext = c.block_status(4096, 6000).unwrap();
    assert_eq!(ext, vec![(4096, z), (1904, 0)]);
    assert!(c.block_status(0, 0).unwrap().is_empty());
    // Lengths beyond 32 bits are clamped; the fake refuses beyond its size.
    let e = c.block_status(0, 1 << 40).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server);
    let last = *server.requests().last().unwrap();
    assert_eq!(last.command, NBD_CMD_BLOCK_STATUS);
    assert_eq!(last.length, u32::MAX);
    assert!(!c.is_dead());
}

#[test]
fn block_status_length_is_clamped_to_the_minimum_block_size() {
    let server = start(1 << 20, |c| c.block_size = Some((4096, 4096, 1 << 20)));
    let mut c = connect(&server);
    let _ = c.block_status(0, 1 << 40);
    let last = *server.requests().last().unwrap();
    assert_eq!(u64::from(last.length), (u64::from(u32::MAX) / 4096) * 4096);
}

#[test]
fn block_status_protocol_violations() {
    for (m, want) in [
        (Misbehave::ExtentsBeyond, "beyond the end"),
        (Misbehave::ZeroLengthExtent, "zero-length extent"),
        (Misbehave::NoExtents, "no extents"),
    ] {
        let server = start(65536, |c| c.misbehave = m);
        let mut c = connect(&server);
        let e = c.block_status(0, 65536).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{m:?}: {e}");
        assert!(e.to_string().contains(want), "{m:?}: {e}");
        assert!(e.to_string().starts_with("block status: "), "{m:?}: {e}");
        assert!(c.is_dead());
    }
}

#[test]
fn disconnect_sends_disc() {
    let server = start(65536, |_| {});
    let mut c = connect(&server);
    c.disconnect().unwrap();
    assert!(c.is_dead());
    assert!(c.flush().is_err());
    // Give the server thread a moment to log the request.
    for _ in 0..100 {
        if server.requests().last().map(|r| r.command) == Some(NBD_CMD_DISC) {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("no NBD_CMD_DISC: {:?}", server.requests());
}

#[test]
fn unknown_export_from_connect() {
    let server = start(4096, |c| c.export = "right".into());
    let mut uri = server.uri();
    uri.export = "wrong".into();
    let e = Client::connect(&uri, &ClientOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server);
    assert!(
        e.to_string()
            .contains("server refused export 'wrong': unknown export"),
        "{e}"
    );
    // The crate's errors say what failed; naming the server is the
    // caller's part.
    assert_eq!(e.operation(), Some(Operation::Handshake), "{e}");
    assert!(e.to_string().starts_with("handshake: "), "{e}");
}

#[test]
fn silent_server_times_out() {
    let (t, server) = scripted(|p| {
        p.serve_go(&small_export())?;
        p.request()?.expect("a request");
        // Never answer; wait for the client to give up.
        p.drain();
        Ok(())
    });
    t.set_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut client = Client::handshake(t, "", "slow").unwrap();
    let mut b = vec![0u8; 512];
    let e = client
        .read_many(&mut [(0u64, b.as_mut_slice())], 1, 1 << 20)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(e.to_string(), "read at offset 0 length 512: timed out");
    assert!(client.is_dead());
    drop(client);
    server.join().unwrap().unwrap();
}

#[test]
fn structured_reply_without_negotiation_is_refused() {
    let (t, server) = scripted(|p| {
        p.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)?;
        p.client_flags()?;
        let (opt, _) = p.option()?;
        assert_eq!(opt, NBD_OPT_STRUCTURED_REPLY);
        p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
        let (opt, _) = p.option()?;
        assert_eq!(opt, NBD_OPT_GO);
        p.info(
            opt,
            &Info::Export {
                size: 4096,
                flags: NBD_FLAG_HAS_FLAGS,
            },
        )?;
        p.ack(opt)?;
        let (r, _) = p.request()?.expect("a request");
        p.done(r.cookie)
    });
    let mut client = Client::handshake(t, "", "t").unwrap();
    let mut b = vec![0u8; 512];
    let e = client
        .read_many(&mut [(0u64, b.as_mut_slice())], 1, 1 << 20)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(e.to_string().contains("without negotiating"), "{e}");
    server.join().unwrap().unwrap();
}

#[test]
fn endless_error_chunks_are_cut_off() {
    let (t, server) = scripted(|p| {
        p.serve_go(&small_export())?;
        let (r, _) = p.request()?.expect("a request");
        // Error chunks that never say DONE, until the client hangs up.
        while p.error(r.cookie, 0, NBD_EIO, "again", None).is_ok() {}
        Ok(())
    });
    let mut client = Client::handshake(t, "", "t").unwrap();
    let mut b = vec![0u8; 512];
    let e = client
        .read_many(&mut [(0u64, b.as_mut_slice())], 1, 1 << 20)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("more than 64 error"), "{e}");
    assert!(client.is_dead());
    drop(client);
    server.join().unwrap().unwrap();
}

/// Found with the `replies` fuzz target's end-of-range case (seeds
/// `end_of_range_errors_*`): an error chunk with an offset, for a request
/// that ends exactly at 2^64, overflowed computing the end of the request
/// (a panic in debug builds).
#[test]
fn error_offset_at_end_of_offset_range() {
    let (t, server) = scripted(|p| {
        p.serve_go(&small_export())?;
        let (r, _) = p.request()?.expect("a request");
        for (at, done) in [(r.offset, 0), (u64::MAX, NBD_REPLY_FLAG_DONE)] {
            p.error(r.cookie, done, NBD_EIO, "bad", Some(at))?;
        }
        Ok(())
    });
    let mut client = Client::handshake(t, "", "t").unwrap();
    let mut b = vec![0u8; 512];
    let at = u64::MAX - 511;
    let e = client
        .read_many(&mut [(at, b.as_mut_slice())], 1, 1 << 20)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server, "{e}");
    assert!(e.to_string().contains(&format!("at offset {at}")), "{e}");
    assert!(!client.is_dead());
    drop(client);
    server.join().unwrap().unwrap();
}

/// `send_writes` returns once its requests are sent; the replies still
/// due, and a failure among them, come out of `settle` (or a flush, which
/// only covers answered writes), with the failing request's place.
#[test]
fn send_writes_leaves_replies_to_settle() {
    let server = start(1 << 20, |c| c.fail_at = Some(70_000));
    let mut c = connect(&server);
    let good = pattern(4096, 3);
    c.send_writes(
        [
            WriteCmd::Write {
                offset: 0,
                data: &good,
                lend: true,
            },
            WriteCmd::Write {
                offset: 69_632,
                data: &good,
                lend: true,
            },
        ],
        4,
        1 << 20,
    )
    .unwrap();
    let e = c.settle().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server);
    assert!(
        e.to_string()
            .starts_with("write at offset 69632 length 4096: "),
        "{e}"
    );
    assert!(!c.is_dead());
    // Nothing is left due, so settling again has nothing to report.
    c.settle().unwrap();

    // A flush first collects what is still due.
    c.send_writes(
        [WriteCmd::Write {
            offset: 8192,
            data: &good,
            lend: true,
        }],
        4,
        1 << 20,
    )
    .unwrap();
    c.flush().unwrap();
    let data = server.data();
    assert_eq!(&data[..4096], &good[..]);
    assert_eq!(&data[8192..12288], &good[..]);
    let sent = server.requests();
    let flush_at = sent.iter().position(|r| r.command == NBD_CMD_FLUSH);
    assert_eq!(flush_at, Some(sent.len() - 1), "{sent:?}");
}

/// The payload bound holds across `send_writes` calls: writes a previous
/// call left in flight count, so a third 4 KiB write under an 8 KiB bound
/// waits for a reply. (The fake server holds replies back until the
/// client pauses, so without the bound all three would be pending.)
#[test]
fn send_writes_bounds_bytes_left_in_flight_by_earlier_calls() {
    let server = start(1 << 20, |c| c.reorder = true);
    let mut c = connect(&server);
    let data = pattern(4096, 5);
    for i in 0..3u64 {
        c.send_writes(
            [WriteCmd::Write {
                offset: i * 4096,
                data: &data,
                lend: true,
            }],
            64,
            8192,
        )
        .unwrap();
    }
    c.settle().unwrap();
    assert_eq!(server.max_pending(), 2);
    let stored = server.data();
    for i in 0..3 {
        assert_eq!(&stored[i * 4096..(i + 1) * 4096], &data[..]);
    }
}

#[test]
fn extended_headers_carry_reads_writes_zeroes_and_block_status() {
    let server = start(1 << 20, |c| {
        c.extended = true;
        c.extra_context = true;
    });
    let data = pattern(1 << 20, 7);
    server.fill(0, &data);
    server.fill(8192, &[0u8; 3 * 4096]);
    let mut c = connect(&server);
    assert!(c.negotiated().extended_headers);
    assert!(c.negotiated().structured_replies);
    assert!(c.has_base_allocation());

    // Reads, with hole chunks and replies out of order.
    let mut a = vec![0xaa; 65536];
    let mut b = vec![0xaa; 200_000];
    let mut reqs = [(0u64, a.as_mut_slice()), (500_000, b.as_mut_slice())];
    c.read_many(&mut reqs, 2, 1 << 20).unwrap();
    let mut expect = data.clone();
    expect[8192..8192 + 3 * 4096].fill(0);
    assert_eq!(a, &expect[..65536]);
    assert_eq!(b, &expect[500_000..700_000]);

    // Block status comes as BLOCK_STATUS_EXT (and the extra context's
    // chunk is skipped).
    let z = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(
        c.block_status(4096, 6 * 4096).unwrap(),
        vec![(4096, 0), (3 * 4096, z), (2 * 4096, 0)]
    );

    // Writes, zeroes, trim, flush; simple answers come as chunks.
    let w = pattern(100_000, 9);
    c.write_many(
        [
            WriteCmd::Write {
                offset: 0,
                data: &w,
                lend: true,
            },
            WriteCmd::WriteZeroes {
                offset: 300_000,
                length: 100_000,
                no_hole: false,
                fast_zero: false,
            },
            WriteCmd::Trim {
                offset: 900_000,
                length: 4096,
            },
        ],
        4,
        1 << 20,
    )
    .unwrap();
    c.flush().unwrap();
    let mut want = data;
    want[..100_000].copy_from_slice(&w);
    want[300_000..400_000].fill(0);
    let got = server.data();
    assert_eq!(&got[..900_000], &want[..900_000]);
    assert_eq!(&got[904_096..], &want[904_096..]);
    assert!(server.errors().is_empty(), "{:?}", server.errors());
    // An error is still an error, the connection usable.
    let e = c.block_status(0, 1 << 40).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server);
    assert!(!c.is_dead());
    c.disconnect().unwrap();
}

#[test]
fn extended_block_status_protocol_violations() {
    for (m, want) in [
        (Misbehave::ExtentsBeyond, "beyond the end"),
        (Misbehave::ZeroLengthExtent, "zero-length extent"),
        (Misbehave::NoExtents, "no extents"),
    ] {
        let server = start(65536, |c| {
            c.extended = true;
            c.misbehave = m;
        });
        let mut c = connect(&server);
        assert!(c.negotiated().extended_headers);
        let e = c.block_status(0, 65536).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{m:?}: {e}");
        assert!(e.to_string().contains(want), "{m:?}: {e}");
        assert!(c.is_dead());
    }
}

/// A handshake with extended headers agreed (or not), an export of 64 KiB
/// with `base:allocation` as context 1, then `reply` answering the first
/// request.
fn extended_script(
    extended: bool,
    reply: impl FnOnce(&mut Peer, &Request) -> io::Result<()> + Send + 'static,
) -> (Transport, thread::JoinHandle<io::Result<()>>) {
    scripted(move |p| {
        let mut e = small_export();
        if extended {
            e = e.extended();
        }
        p.serve_go(&e)?;
        let (r, _) = p.request()?.expect("a request");
        // The client may hang up halfway through a bad reply.
        let _ = reply(p, &r);
        p.drain();
        Ok(())
    })
}

#[test]
fn mixing_header_kinds_is_a_protocol_error() {
    // Extended headers agreed, then a compact structured chunk or a
    // simple reply.
    let compact = |p: &mut Peer, r: &Request| {
        let h = ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type: NBD_REPLY_TYPE_NONE,
            cookie: r.cookie,
            length: 0,
        };
        p.raw(&h.encode())
    };
    let simple = |p: &mut Peer, r: &Request| {
        p.raw(
            &SimpleReply {
                error: 0,
                cookie: r.cookie,
            }
            .encode(),
        )
    };
    for (extended, reply, want) in [
        (
            true,
            Box::new(compact) as Box<dyn FnOnce(&mut Peer, &Request) -> io::Result<()> + Send>,
            "compact reply header",
        ),
        (true, Box::new(simple), "compact reply header"),
        // No extended headers agreed, then an extended chunk.
        (
            false,
            Box::new(|p: &mut Peer, r: &Request| {
                p.raw(&encode_extended_chunk_header(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_NONE,
                    r.cookie,
                    0,
                    0,
                ))
            }),
            "without negotiating extended headers",
        ),
        // A 32-bit block status chunk with extended headers.
        (
            true,
            Box::new(|p: &mut Peer, r: &Request| {
                let payload = encode_block_status(
                    1,
                    &[BlockDescriptor {
                        length: 4096,
                        flags: 0,
                    }],
                );
                p.raw(&encode_extended_chunk_header(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_BLOCK_STATUS,
                    r.cookie,
                    0,
                    payload.len() as u64,
                ))?;
                p.raw(&payload)
            }),
            "32-bit BLOCK_STATUS",
        ),
        // A payload length beyond 32 bits.
        (
            true,
            Box::new(|p: &mut Peer, r: &Request| {
                p.raw(&encode_extended_chunk_header(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
                    r.cookie,
                    0,
                    (1 << 40) + 8,
                ))
            }),
            "too long",
        ),
        // A descriptor count that does not match the length.
        (
            true,
            Box::new(|p: &mut Peer, r: &Request| {
                let mut payload = encode_block_status_ext(
                    1,
                    &[ExtendedBlockDescriptor {
                        length: 4096,
                        flags: 0,
                    }],
                );
                payload[7] = 2;
                p.raw(&encode_extended_chunk_header(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
                    r.cookie,
                    0,
                    payload.len() as u64,
                ))?;
                p.raw(&payload)
            }),
            "do not fill",
        ),
    ] {
        let (t, server) = extended_script(extended, reply);
        let mut c = Client::handshake(t, "", "t").unwrap();
        assert_eq!(c.negotiated().extended_headers, extended);
        let e = c.block_status(0, 65536).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{want}: {e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert!(c.is_dead());
        drop(c);
        server.join().unwrap().unwrap();
    }
}

#[test]
fn extended_requests_are_32_bytes_with_64_bit_lengths() {
    let (t, server) = scripted(|p| {
        p.serve_go(&small_export().extended())?;
        let mut h = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        p.stream().read_exact(&mut h)?;
        let (r, len) = decode_extended_request(&h).unwrap();
        assert_eq!(
            (r.command, r.offset, len),
            (NBD_CMD_BLOCK_STATUS, 512, 4096)
        );
        p.block_status_ext(r.cookie, NBD_REPLY_FLAG_DONE, 1, &[(1 << 33, 0)])?;
        p.drain();
        Ok(())
    });
    let mut c = Client::handshake(t, "", "t").unwrap();
    // A 64-bit extent longer than the request is clipped to it.
    assert_eq!(c.block_status(512, 4096).unwrap(), vec![(4096, 0)]);
    drop(c);
    server.join().unwrap().unwrap();
}

#[test]
fn extended_block_status_covers_more_than_4_gib_in_one_request() {
    let (t, server) = scripted(|p| {
        p.serve_go(&Export::new(16 << 30).context(1).extended())?;
        let mut h = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        p.stream().read_exact(&mut h)?;
        let (r, len) = decode_extended_request(&h).unwrap();
        assert_eq!(
            (r.command, r.offset, len),
            (NBD_CMD_BLOCK_STATUS, 4096, 12 << 30)
        );
        let z = NBD_STATE_HOLE | NBD_STATE_ZERO;
        p.block_status_ext(
            r.cookie,
            NBD_REPLY_FLAG_DONE,
            1,
            &[(5 << 30, z), (3 << 30, 0), (8 << 30, z)],
        )?;
        p.drain();
        Ok(())
    });
    let mut c = Client::handshake(t, "", "t").unwrap();
    let z = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(
        c.block_status(4096, 12 << 30).unwrap(),
        vec![(5 << 30, z), (3 << 30, 0), (4 << 30, z)]
    );
    drop(c);
    server.join().unwrap().unwrap();
}

#[test]
fn extended_zero_and_trim_requests_cover_more_than_4_gib() {
    let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_TRIM;
    let (t, server) = scripted(move |p| {
        p.serve_go(&Export::new(32 << 30).flags(flags).context(1).extended())?;
        let mut seen = Vec::new();
        for _ in 0..2 {
            let mut h = [0u8; EXTENDED_REQUEST_HEADER_LEN];
            p.stream().read_exact(&mut h)?;
            let (r, len) = decode_extended_request(&h).unwrap();
            seen.push((r.command, r.offset, len));
        }
        // Both were sent before either was answered: they do not overlap.
        p.done(1)?;
        p.done(2)?;
        assert_eq!(
            seen,
            vec![
                (NBD_CMD_WRITE_ZEROES, 4096, 12 << 30),
                (NBD_CMD_TRIM, 16 << 30, 6 << 30)
            ]
        );
        p.drain();
        Ok(())
    });
    let mut c = Client::handshake(t, "", "t").unwrap();
    assert!(c.max_request_without_payload() > 1 << 40);
    c.write_many(
        [
            WriteCmd::WriteZeroes {
                offset: 4096,
                length: 12 << 30,
                no_hole: false,
                fast_zero: false,
            },
            WriteCmd::Trim {
                offset: 16 << 30,
                length: 6 << 30,
            },
        ],
        4,
        1 << 20,
    )
    .unwrap();
    c.limit_requests_without_payload();
    assert_eq!(c.max_request_without_payload(), u64::from(c.max_payload()));
    drop(c);
    server.join().unwrap().unwrap();
}

/// Groups of `count` reads of `len` bytes each, from offset `from`.
fn read_groups(from: u64, groups: usize, count: usize, len: usize) -> Vec<Vec<(u64, Vec<u8>)>> {
    (0..groups)
        .map(|g| {
            (0..count)
                .map(|i| {
                    let at = from + ((g * count + i) * len) as u64;
                    (at, vec![0xaa; len])
                })
                .collect()
        })
        .collect()
}

/// The reads of `groups` as the client takes them.
fn requests(groups: &mut [Vec<(u64, Vec<u8>)>]) -> Vec<Vec<(u64, &mut [u8])>> {
    groups
        .iter_mut()
        .map(|g| g.iter_mut().map(|(o, b)| (*o, b.as_mut_slice())).collect())
        .collect()
}

/// One slice a group, for [`Client::read_window`].
fn slices<'a, 'b>(reqs: &'a mut [Vec<(u64, &'b mut [u8])>]) -> Vec<&'a mut [(u64, &'b mut [u8])]> {
    reqs.iter_mut().map(|g| g.as_mut_slice()).collect()
}

#[test]
fn a_read_window_keeps_later_groups_in_flight_and_fills_every_buffer() {
    let server = start(1 << 20, |c| c.holes = true);
    let data = pattern(1 << 20, 3);
    server.fill(0, &data);
    server.fill(40_000, &[0u8; 20_000]);
    let mut expect = data.clone();
    expect[40_000..60_000].fill(0);
    let mut c = connect(&server);
    let mut groups = read_groups(1000, 6, 4, 9000);
    // The caller's loop: pass every group not yet returned, oldest first,
    // and take the first back complete.
    let mut first = 0u64;
    let mut in_flight_while_returning = 0;
    while (first as usize) < groups.len() {
        let window_end = (first as usize + 3).min(groups.len());
        let mut reqs = requests(&mut groups[first as usize..window_end]);
        let mut slices = slices(&mut reqs);
        c.read_window(first, &mut slices, 6, 1 << 20).unwrap();
        in_flight_while_returning = in_flight_while_returning.max(c.in_flight);
        for (o, b) in &groups[first as usize] {
            let o = *o as usize;
            assert_eq!(&b[..], &expect[o..o + b.len()], "group {first} offset {o}");
        }
        first += 1;
    }
    assert_eq!(c.in_flight, 0);
    assert!(c.window.is_empty());
    // Later groups' reads were still in flight when a group came back,
    // and the request bound held throughout.
    assert!(in_flight_while_returning > 0);
    assert!(server.max_pending() <= 6, "{}", server.max_pending());
    assert_eq!(server.requests().len(), 24);
}

#[test]
fn the_read_window_is_bounded_in_bytes_across_calls() {
    let server = start(1 << 20, |_| {});
    let mut c = connect(&server);
    let mut groups = read_groups(0, 2, 4, 65536);
    let mut reqs = requests(&mut groups);
    let mut slices = slices(&mut reqs);
    c.read_window(0, &mut slices, 64, 3 * 65536).unwrap();
    assert!(c.read_bytes_in_flight <= 3 * 65536);
    assert!(server.max_pending() <= 3, "{}", server.max_pending());
    c.read_window(1, &mut slices[1..], 64, 3 * 65536).unwrap();
    assert_eq!(c.read_bytes_in_flight, 0);
}

#[test]
fn other_requests_abandon_the_window_and_the_connection_stays_usable() {
    // Replies in order: the later groups are surely unanswered when the
    // first comes back.
    let server = start(1 << 20, |c| c.reorder = false);
    let data = pattern(1 << 20, 5);
    server.fill(0, &data);
    let mut c = connect(&server);
    let mut groups = read_groups(0, 3, 2, 65536);
    {
        let mut reqs = requests(&mut groups);
        let mut slices = slices(&mut reqs);
        c.read_window(0, &mut slices, 64, 1 << 20).unwrap();
    }
    assert!(
        c.in_flight > 0,
        "later groups should still be in flight: {:?}",
        c.window
    );
    // A plain read drops them: their data is read off and thrown away.
    let mut b = vec![0u8; 4096];
    c.read_many(&mut [(500_000u64, b.as_mut_slice())], 4, 1 << 20)
        .unwrap();
    assert_eq!(&b[..], &data[500_000..504_096]);
    assert!(c.window.is_empty());
    assert_eq!(c.in_flight, 0);
    // The abandoned buffers were not written.
    assert!(groups[2].iter().all(|(_, b)| b.iter().all(|&x| x == 0xaa)));
    // A window that starts over with other ids is fine too.
    let mut reqs = requests(&mut groups[1..]);
    let mut slices = slices(&mut reqs);
    c.read_window(7, &mut slices, 64, 1 << 20).unwrap();
    c.read_window(8, &mut slices[1..], 64, 1 << 20).unwrap();
    for g in &groups[1..] {
        for (o, b) in g {
            let o = *o as usize;
            assert_eq!(&b[..], &data[o..o + b.len()]);
        }
    }
}

#[test]
fn a_server_error_in_a_later_group_is_returned_with_that_group() {
    let server = start(1 << 20, |c| c.fail_at = Some(300_000));
    let mut c = connect(&server);
    // Groups of 4 x 32 KiB: group 2 covers 262144..393216.
    let mut groups = read_groups(0, 4, 4, 32768);
    let mut reqs = requests(&mut groups);
    let mut slices = slices(&mut reqs);
    c.read_window(0, &mut slices, 64, 1 << 20).unwrap();
    c.read_window(1, &mut slices[1..], 64, 1 << 20).unwrap();
    let e = c.read_window(2, &mut slices[2..], 64, 1 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server);
    assert_eq!(e.offset(), Some(294_912));
    // Everything still due was read; the connection carries on.
    assert_eq!(c.in_flight, 0);
    assert!(c.window.is_empty());
    assert!(!c.is_dead());
    let mut b = vec![0u8; 512];
    c.read_many(&mut [(0u64, b.as_mut_slice())], 4, 1 << 20)
        .unwrap();
}
