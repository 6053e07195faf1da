//! Peers that are not NBD servers, or that break the protocol in one way
//! each, built as small scripted servers in this process
//! (`nbd::testkit::Server`, scripts on a `nbd::testkit::Peer`). Every one must make nbdcp end cleanly: status 1, one
//! `nbdcp: ` line naming the peer's URI and what was wrong, no panic text,
//! within the hang deadline, with bounded memory, and nothing left
//! running. Peers that claim huge sizes or lengths check the memory bound
//! in particular.

mod common;

use std::io;
use std::time::Duration;

use common::*;
// The scripted server, not common's real-server `Server`.
use nbd::testkit::{Export, Hook, Peer, Server, pattern_at};
use nbd::wire::*;

const MIB: u64 = 1024 * 1024;

/// The newstyle greeting nbdcp expects, and its answer (the client flags).
fn greeted(p: &mut Peer) -> io::Result<()> {
    p.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)?;
    p.client_flags()?;
    Ok(())
}

/// Run `nbdcp -C 1 --retries 0 ARGS PEER null:` and check it failed
/// cleanly, naming the peer and every string in `expect`; returns the
/// error line.
fn fails_against(peer: &Server, args: &[&str], expect: &[&str]) -> String {
    let uri = peer.uri_string();
    let mut all = vec!["-C", "1", "--retries", "0"];
    all.extend_from_slice(args);
    all.extend([uri.as_str(), "null:"]);
    let run = run_watched(&all);
    let line = run.assert_clean_failure(&uri).to_string();
    for e in expect {
        assert!(line.contains(e), "expected {e:?} in the error line: {line}");
    }
    assert_nothing_mentions(peer.dir());
    line
}

/// What nbdcp may say when a peer hangs up: end of file, or, when it was
/// still sending, a reset or a broken pipe. Each is a clear description.
fn assert_hangup(line: &str) {
    assert!(
        [
            "closed the connection",
            "Connection reset by peer",
            "Broken pipe"
        ]
        .iter()
        .any(|m| line.contains(m)),
        "expected a hang-up in: {line}"
    );
}

/// A hook that answers everything normally.
fn well_behaved(_: &mut Peer, _: &Request, _: usize) -> io::Result<Hook> {
    Ok(Hook::Pass)
}

/// A hook that lets `f` answer the first read and passes everything else.
fn on_first_read(
    f: impl Fn(&mut Peer, &Request) -> io::Result<Hook> + Send + Sync + 'static,
) -> impl Fn(&mut Peer, &Request, usize) -> io::Result<Hook> + Send + Sync + 'static {
    let done = std::sync::atomic::AtomicBool::new(false);
    move |p, r, _| {
        if r.command == NBD_CMD_READ && !done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            f(p, r)
        } else {
            Ok(Hook::Pass)
        }
    }
}

// ---------------------------------------------------------------------
// Controls: the scripted peer itself is a working server
// ---------------------------------------------------------------------

#[test]
fn control_well_behaved_peer_copies_correctly() {
    let d = tmp();
    for export in [
        Export::new(3 * MIB + 512),
        Export::new(3 * MIB + 512).simple(),
    ] {
        let peer = Server::nbd(export.clone(), well_behaved);
        let out = d.path().join("out.img");
        let run = run_watched(&["-C", "2", &peer.uri_string(), s(&out)]);
        run.assert_ok();
        run.assert_memory_bounded();
        assert_file_is(&out, &pattern_bytes(export.size));
        // And as a destination (it drops what it is sent).
        let run = run_watched(&["-C", "2", s(&out), &peer.uri_string()]);
        run.assert_ok();
    }
}

/// Block status that describes only the first 4 KiB of each request is
/// legal: nbdcp must ask again (or read) for the rest, and the copy must
/// be exact.
#[test]
fn control_short_block_status_replies_are_completed() {
    let d = tmp();
    let size = 2 * MIB;
    let peer = Server::nbd(Export::new(size), |p, r, _| {
        if r.command == NBD_CMD_BLOCK_STATUS {
            p.block_status(r.cookie, NBD_REPLY_FLAG_DONE, &[(4096.min(r.length), 0)])?;
            return Ok(Hook::Done);
        }
        Ok(Hook::Pass)
    });
    let out = d.path().join("out.img");
    let run = run_watched(&["-C", "1", &peer.uri_string(), s(&out)]);
    run.assert_ok();
    assert_file_is(&out, &pattern_bytes(size));
}

// ---------------------------------------------------------------------
// Not an NBD server at all
// ---------------------------------------------------------------------

#[test]
fn peer_closes_at_once() {
    let peer = Server::start(|_, _| Ok(()));
    fails_against(&peer, &[], &["handshake", "closed the connection"]);
}

#[test]
fn peer_closes_after_the_greeting() {
    let peer = Server::start(|p, _| greeted(p));
    assert_hangup(&fails_against(&peer, &[], &["handshake"]));
}

#[test]
fn peer_closes_in_the_middle_of_the_greeting() {
    let peer = Server::start(|p, _| {
        let g = Greeting::encode_newstyle(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        p.raw(&g[..10])
    });
    fails_against(&peer, &[], &["handshake"]);
}

#[test]
fn peer_sends_random_bytes() {
    let peer = Server::sends_then_waits(random_bytes(7, 64 * 1024));
    fails_against(&peer, &[], &["handshake", "not an NBD server"]);
}

#[test]
fn peer_sends_bad_magic() {
    let peer =
        Server::sends_then_waits(b"NBDMAGIX\x49\x48\x41\x56\x45\x4f\x50\x54\x00\x03".to_vec());
    fails_against(&peer, &[], &["handshake", "bad magic"]);
    let peer = Server::sends_then_waits(b"NBDMAGICNOTNBD!!\x00\x03".to_vec());
    fails_against(&peer, &[], &["handshake", "bad magic"]);
}

#[test]
fn peer_is_an_http_server() {
    let peer = Server::start(|p, _| {
        p.raw(
            b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
    });
    fails_against(&peer, &[], &["not an NBD server", "HTTP/1.1"]);
}

#[test]
fn peer_is_an_ssh_server_that_waits() {
    // Sends its banner and then waits for the client, as sshd does.
    let peer = Server::sends_then_waits(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec());
    fails_against(&peer, &[], &["not an NBD server", "SSH-2.0-"]);
}

#[test]
fn oldstyle_server_is_refused_clearly() {
    let peer = Server::start(|p, _| {
        // No encoder for the obsolete oldstyle greeting: by hand.
        let mut g = NBD_MAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&NBD_CLISERV_MAGIC.to_be_bytes());
        g.extend_from_slice(&(1u64 << 20).to_be_bytes());
        g.extend_from_slice(&[0u8; 4 + 124]);
        p.raw(&g)?;
        p.drain();
        Ok(())
    });
    fails_against(&peer, &[], &["oldstyle"]);
}

// ---------------------------------------------------------------------
// Broken handshakes
// ---------------------------------------------------------------------

/// The option reply to `victim` claims `0xffffffff` bytes of data (and
/// then sends a few): nbdcp must refuse the length, not allocate 4 GiB.
fn oversized_option_reply(victim: u32) -> Server {
    Server::start(move |p, _| {
        greeted(p)?;
        loop {
            let (opt, _) = p.option()?;
            if opt == victim {
                p.option_reply_header(opt, NBD_REP_INFO, u32::MAX)?;
                p.raw(&[0u8; 1024])?;
                p.drain();
                return Ok(());
            }
            match opt {
                NBD_OPT_STRUCTURED_REPLY | NBD_OPT_SET_META_CONTEXT => p.ack(opt)?,
                _ => p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?,
            }
        }
    })
}

#[test]
fn oversized_option_reply_lengths_are_refused() {
    for victim in [
        NBD_OPT_STRUCTURED_REPLY,
        NBD_OPT_SET_META_CONTEXT,
        NBD_OPT_GO,
    ] {
        let peer = oversized_option_reply(victim);
        fails_against(&peer, &[], &["handshake", "too long"]);
    }
}

#[test]
fn reply_to_the_wrong_option_is_refused() {
    let peer = Server::start(|p, _| {
        greeted(p)?;
        let (opt, _) = p.option()?;
        p.ack(opt + 1)?;
        p.drain();
        Ok(())
    });
    fails_against(&peer, &[], &["handshake"]);
}

#[test]
fn go_without_export_info_is_refused() {
    let peer = Server::start(|p, _| {
        greeted(p)?;
        loop {
            let (opt, _) = p.option()?;
            if opt == NBD_OPT_GO {
                p.ack(opt)?;
                p.drain();
                return Ok(());
            }
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
        }
    });
    fails_against(&peer, &[], &["handshake", "NBD_INFO_EXPORT"]);
}

/// A peer that answers NBD_OPT_GO with informational replies for ever
/// (each one valid on its own): nbdcp must give up, not spin for ever.
#[test]
fn endless_option_replies_end_in_an_error() {
    let peer = Server::start(|p, _| {
        greeted(p)?;
        loop {
            let (opt, _) = p.option()?;
            if opt == NBD_OPT_GO {
                // An unknown NBD_INFO type, 2 bytes of type and nothing else.
                loop {
                    p.info(opt, &Info::Other(0x7777))?;
                }
            }
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
        }
    });
    fails_against(&peer, &[], &["handshake"]);
}

// ---------------------------------------------------------------------
// Broken replies in transmission
// ---------------------------------------------------------------------

#[test]
fn reply_with_an_unknown_cookie() {
    for export in [Export::new(MIB), Export::new(MIB).simple()] {
        let structured = export.structured;
        let peer = Server::nbd(
            export,
            on_first_read(move |p, r| {
                let bad = r.cookie.wrapping_add(0x1000_0000);
                if structured {
                    p.done(bad)?;
                } else {
                    p.simple_reply(bad, 0, &pattern_at(r.offset, r.length as usize))?;
                }
                p.drain();
                Ok(Hook::Done)
            }),
        );
        fails_against(&peer, &[], &["unknown cookie"]);
    }
}

#[test]
fn random_bytes_instead_of_a_reply() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, _| {
            p.raw(&random_bytes(3, 4096))?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["magic"]);
}

#[test]
fn data_chunk_outside_the_request() {
    // Just after the request, just before it, and far away.
    for shift in [0i64, -1, 1 << 40] {
        let peer = Server::nbd(
            Export::new(MIB),
            on_first_read(move |p, r| {
                let at = match shift {
                    0 => r.offset + u64::from(r.length),
                    -1 => r.offset.wrapping_sub(1),
                    far => r.offset + far as u64,
                };
                p.data(r.cookie, NBD_REPLY_FLAG_DONE, at, &[0xa5; 4096])?;
                p.drain();
                Ok(Hook::Done)
            }),
        );
        // The first read is at offset 0 when `shift` is -1: then the chunk
        // starts at u64::MAX, which must not overflow anything.
        fails_against(&peer, &["--no-extents"], &["outside the request"]);
    }
}

#[test]
fn hole_chunk_claiming_4_gib() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            p.hole(r.cookie, NBD_REPLY_FLAG_DONE, r.offset, u32::MAX)?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["outside the request"]);
}

#[test]
fn overlapping_data_chunks() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            // Two halves of the request that overlap by half.
            let half = r.length as u64 / 2;
            let data = pattern_at(r.offset, half as usize);
            p.data(r.cookie, 0, r.offset, &data)?;
            p.data(r.cookie, NBD_REPLY_FLAG_DONE, r.offset + half / 2, &data)?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["overlapping"]);
}

#[test]
fn short_structured_read_reply() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            let half = r.length as usize / 2;
            p.data(
                r.cookie,
                NBD_REPLY_FLAG_DONE,
                r.offset,
                &pattern_at(r.offset, half),
            )?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["short read reply"]);
}

/// A simple read reply whose data stops half way (the peer hangs up):
/// a transport failure, so with the default retries nbdcp reconnects and
/// tries again, meets the same peer each time, and gives up after the
/// retries, well within the deadline.
#[test]
fn short_simple_read_reply_then_hang_up() {
    let make = || {
        Server::nbd(Export::new(MIB).simple(), |p, r, _| {
            if r.command == NBD_CMD_READ {
                let data = pattern_at(r.offset, r.length as usize / 2);
                p.simple_reply(r.cookie, 0, &data)?;
                return Ok(Hook::Close);
            }
            Ok(Hook::Pass)
        })
    };
    let peer = make();
    assert_hangup(&fails_against(&peer, &[], &[]));

    let peer = make();
    let uri = peer.uri_string();
    let run = run_watched(&["-C", "1", &uri, "null:"]);
    assert_hangup(run.assert_clean_failure_after_retries(&uri));
    assert!(
        run.stderr.contains("retry 5 of 5"),
        "the default 5 retries should all be used:\n{}",
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(10),
        "5 retries took {:?}",
        run.elapsed
    );
    assert_eq!(
        peer.connections(),
        6,
        "one connection and five reconnections"
    );
}

#[test]
fn peer_hangs_up_mid_reply_header() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            // The first 13 of the header's 20 bytes: magic, flags, type
            // and 5 bytes of the cookie.
            p.hold();
            p.chunk_header(r.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 0)?;
            let header = p.release();
            p.raw(&header[..13])?;
            Ok(Hook::Close)
        }),
    );
    assert_hangup(&fails_against(&peer, &[], &[]));
}

#[test]
fn structured_reply_without_negotiating_them() {
    let peer = Server::nbd(
        Export::new(MIB).simple(),
        on_first_read(|p, r| {
            let data = pattern_at(r.offset, r.length as usize);
            p.data(r.cookie, NBD_REPLY_FLAG_DONE, r.offset, &data)?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["structured reply"]);
}

/// A server error with an errno the protocol does not define is still a
/// server error: reported once, clearly, and (being the server's answer,
/// not a dropped connection) not retried, so even with the default
/// retries there is exactly one line.
#[test]
fn error_chunk_with_a_bogus_errno() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            p.error(r.cookie, NBD_REPLY_FLAG_DONE, 0xdead_beef, "bogus", None)?;
            Ok(Hook::Done)
        }),
    );
    let uri = peer.uri_string();
    let run = run_watched(&["-C", "1", &uri, "null:"]);
    let line = run.assert_clean_failure(&uri);
    assert!(
        line.contains(&format!("{uri}: read at offset ")) && line.contains("Unknown error"),
        "{line}"
    );
    assert!(
        line.contains("bogus"),
        "the server's message should be kept: {line}"
    );
    assert_eq!(peer.connections(), 1, "a server error must not be retried");
}

#[test]
fn simple_reply_with_a_bogus_errno() {
    let peer = Server::nbd(
        Export::new(MIB).simple(),
        on_first_read(|p, r| {
            p.simple_reply(r.cookie, 0x7fff_ffff, &[])?;
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["read at offset", "Unknown error"]);
}

#[test]
fn error_chunk_with_errno_zero_or_a_lying_message_length() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            p.error(r.cookie, NBD_REPLY_FLAG_DONE, 0, "", None)?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["error value is zero"]);

    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            // Claims a 65535-byte message in a 10-byte payload: by hand,
            // as no encoder lies.
            let mut payload = NBD_EIO.to_be_bytes().to_vec();
            payload.extend_from_slice(&u16::MAX.to_be_bytes());
            payload.extend_from_slice(b"oops");
            p.chunk(
                r.cookie,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_ERROR,
                &payload,
            )?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["message length"]);
}

#[test]
fn error_offset_outside_the_request() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            let at = r.offset + u64::from(r.length) + 4096;
            p.error(r.cookie, NBD_REPLY_FLAG_DONE, NBD_EIO, "", Some(at))?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["outside the request"]);
}

/// A peer whose read reply goes on for ever with error chunks that never
/// say DONE: nbdcp must not spin on it for ever.
#[test]
fn endless_error_chunks_end_in_an_error() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            loop {
                p.error(r.cookie, 0, NBD_EIO, "more", None)?;
            }
        }),
    );
    fails_against(&peer, &[], &["read"]);
}

// ---------------------------------------------------------------------
// Broken block status
// ---------------------------------------------------------------------

fn bad_block_status(extents: Vec<(u32, u32)>, grow_last: bool) -> Server {
    Server::nbd(Export::new(4 * MIB), move |p, r, _| {
        if r.command != NBD_CMD_BLOCK_STATUS {
            return Ok(Hook::Pass);
        }
        let mut e = extents.clone();
        if grow_last {
            // Cover the request, then describe one more extent beyond it.
            e.insert(0, (r.length, 0));
        }
        p.block_status(r.cookie, NBD_REPLY_FLAG_DONE, &e)?;
        Ok(Hook::Done)
    })
}

/// Run `-C 1 --retries 0 PEER null:` against a peer whose block status
/// replies break the protocol; returns the error line.
///
/// KNOWN PRODUCT BUG: nbdcp prints a `[WARN ] ...; copying the rest as
/// data` line for the broken reply and then fails anyway (`read:
/// connection unusable after an earlier error: ...`): two lines for one
/// failure. With `strict` the one-line promise is checked (the ignored
/// `block_status_violations_end_in_one_line`); without, the shape the
/// tests had before the strict checker: warnings, then one error line.
fn fails_on_block_status(peer: &Server, strict: bool) -> String {
    let uri = peer.uri_string();
    let run = run_watched(&["-C", "1", "--retries", "0", &uri, "null:"]);
    let line = if strict {
        run.assert_clean_failure(&uri)
    } else {
        run.assert_clean_failure_after_retries(&uri)
    };
    line.to_string()
}

fn zero_length_extent(strict: bool) {
    let peer = bad_block_status(vec![(0, 0)], false);
    let line = fails_on_block_status(&peer, strict);
    let uri = peer.uri_string();
    assert!(line.contains("zero-length extent"), "{line}");
    assert_eq!(line.matches(&uri).count(), 1, "name the peer once: {line}");
    assert_nothing_mentions(peer.dir());
}

fn extents_beyond_the_request(strict: bool) {
    let peer = bad_block_status(vec![(4096, 0)], true);
    let line = fails_on_block_status(&peer, strict);
    assert!(line.contains("beyond the end"), "{line}");
}

fn data_for_block_status(strict: bool) {
    let peer = Server::nbd(Export::new(MIB), |p, r, _| {
        if r.command == NBD_CMD_BLOCK_STATUS {
            p.data(r.cookie, NBD_REPLY_FLAG_DONE, r.offset, &[1; 512])?;
            p.drain();
            return Ok(Hook::Done);
        }
        Ok(Hook::Pass)
    });
    let line = fails_on_block_status(&peer, strict);
    assert!(line.contains("read chunk"), "{line}");
}

fn chunks_claiming_4_gib(strict: bool) {
    for chunk_type in [
        NBD_REPLY_TYPE_BLOCK_STATUS,
        NBD_REPLY_TYPE_ERROR,
        NBD_REPLY_TYPE_NONE,
        0x7fff,
    ] {
        let peer = Server::nbd(Export::new(MIB), move |p, r, _| {
            if r.command == NBD_CMD_BLOCK_STATUS || r.command == NBD_CMD_READ {
                p.chunk_header(r.cookie, NBD_REPLY_FLAG_DONE, chunk_type, u32::MAX)?;
                p.raw(&[0u8; 4096])?;
                p.drain();
                return Ok(Hook::Done);
            }
            Ok(Hook::Pass)
        });
        fails_on_block_status(&peer, strict);
    }
}

#[test]
fn block_status_with_a_zero_length_extent() {
    zero_length_extent(false);
}

#[test]
fn block_status_with_extents_beyond_the_request() {
    extents_beyond_the_request(false);
}

#[test]
fn block_status_for_a_read_and_data_for_block_status() {
    // Data where extents were asked for.
    data_for_block_status(false);

    // Extents where data was asked for.
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            p.block_status(r.cookie, NBD_REPLY_FLAG_DONE, &[(r.length, 0)])?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["block status in reply to NBD_CMD_READ"]);
}

/// Every block status reply that breaks the protocol ends in one line,
/// as every failure must.
#[test]
fn block_status_violations_end_in_one_line() {
    zero_length_extent(true);
    extents_beyond_the_request(true);
    data_for_block_status(true);
    chunks_claiming_4_gib(true);
}

// ---------------------------------------------------------------------
// Huge claims: memory must stay bounded
// ---------------------------------------------------------------------

/// An export that claims `size` bytes and answers every read with EIO.
fn huge_export(size: u64) -> Server {
    Server::nbd(Export::new(size), |p, r, _| {
        if r.command == NBD_CMD_READ {
            p.error(r.cookie, NBD_REPLY_FLAG_DONE, NBD_EIO, "nope", None)?;
            return Ok(Hook::Done);
        }
        Ok(Hook::Pass)
    })
}

/// An export of 2^63 bytes (and of 2^64 - 1) copied to `null:`: nbdcp
/// must start copying with bounded memory and fail at the first read.
#[test]
fn export_size_2_pow_63_to_null() {
    for size in [1u64 << 63, u64::MAX] {
        let peer = huge_export(size);
        fails_against(&peer, &[], &["read at offset", "Input/output error"]);
    }
}

/// The same exports to a file: no file can be that large (nor 1 PiB, on
/// the file systems tests run on), which must be a clean error naming the
/// file and the size, before anything is read.
#[test]
fn huge_export_sizes_to_a_file() {
    let d = tmp();
    let out = d.path().join("out.img");
    for size in [1u64 << 63, u64::MAX, 1 << 50] {
        let peer = huge_export(size);
        let uri = peer.uri_string();
        let run = run_watched(&["-C", "1", "--retries", "0", &uri, s(&out)]);
        let line = run.assert_clean_failure(s(&out));
        assert!(line.contains(&size.to_string()), "name the size: {line}");
    }
}

/// A destination that claims 2^63 bytes is simply large enough: the copy
/// succeeds, and nothing is sized by the destination's claim.
#[test]
fn destination_claiming_2_pow_63_bytes() {
    let d = tmp();
    let src = d.path().join("src.img");
    random_file(&src, 4 * MIB, 9);
    let peer = Server::nbd(Export::new(1 << 63), well_behaved);
    let run = run_watched(&["-C", "2", s(&src), &peer.uri_string()]);
    run.assert_ok();
    run.assert_memory_bounded();
}

#[test]
fn data_chunk_claiming_4_gib() {
    let peer = Server::nbd(
        Export::new(MIB),
        on_first_read(|p, r| {
            p.chunk_header(
                r.cookie,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                u32::MAX,
            )?;
            p.raw(&encode_offset_data_prefix(r.offset))?;
            p.raw(&[7u8; 4096])?;
            p.drain();
            Ok(Hook::Done)
        }),
    );
    fails_against(&peer, &[], &["too long"]);
}

#[test]
fn block_status_and_error_chunks_claiming_4_gib() {
    chunks_claiming_4_gib(false);
}

/// One block status chunk with a million 1-byte extents (the most nbdcp
/// accepts in a chunk, 8 MiB): legal, if silly; the copy must work and
/// stay small.
#[test]
fn a_million_tiny_extents() {
    let d = tmp();
    let size = 2 * MIB;
    let peer = Server::nbd(Export::new(size), |p, r, _| {
        if r.command == NBD_CMD_BLOCK_STATUS {
            let n = (r.length as usize).min(1 << 20);
            p.block_status(r.cookie, NBD_REPLY_FLAG_DONE, &vec![(1, 0); n])?;
            return Ok(Hook::Done);
        }
        Ok(Hook::Pass)
    });
    let out = d.path().join("out.img");
    let run = run_watched(&["-C", "1", &peer.uri_string(), s(&out)]);
    run.assert_ok();
    run.assert_memory_bounded();
    assert_file_is(&out, &pattern_bytes(size));
}

/// Block size constraints at the edge of what is valid (64 KiB minimum,
/// 2 GiB preferred, 4 GiB - 1 maximum) must not make nbdcp use huge
/// buffers.
#[test]
fn huge_block_size_constraints_are_clamped() {
    let d = tmp();
    let size = 4 * MIB;
    let export = Export::new(size).block_size(64 * 1024, 1 << 31, u32::MAX);
    let peer = Server::nbd(export, well_behaved);
    let out = d.path().join("out.img");
    let run = run_watched(&["-C", "1", &peer.uri_string(), s(&out)]);
    run.assert_ok();
    run.assert_memory_bounded();
    assert_file_is(&out, &pattern_bytes(size));
}

// ---------------------------------------------------------------------
// Peers that stop answering
// ---------------------------------------------------------------------

#[test]
fn stalled_read_with_timeout_fails_in_time() {
    let peer = Server::nbd(Export::new(MIB), on_first_read(|_, _| Ok(Hook::Stall)));
    let uri = peer.uri_string();
    let run = run_watched(&["-C", "1", "--timeout", "1", "--retries", "0", &uri, "null:"]);
    let line = run.assert_clean_failure(&uri);
    assert!(line.contains("timed out"), "{line}");
    assert!(
        run.elapsed < Duration::from_secs(4),
        "took {:?}",
        run.elapsed
    );
}

/// With retries on, each reconnection meets the same stall: the copy must
/// still fail, after the retries, in bounded time.
#[test]
fn stalled_peer_with_timeout_and_retries_gives_up() {
    let peer = Server::nbd(Export::new(MIB), |_, r, _| {
        Ok(if r.command == NBD_CMD_READ {
            Hook::Stall
        } else {
            Hook::Pass
        })
    });
    let uri = peer.uri_string();
    let run = run_watched(&["-C", "1", "--timeout", "1", "--retries", "2", &uri, "null:"]);
    let line = run.assert_clean_failure_after_retries(&uri);
    assert!(line.contains("timed out"), "{line}");
    assert!(
        run.elapsed < Duration::from_secs(6),
        "took {:?}",
        run.elapsed
    );
    assert_eq!(
        peer.connections(),
        3,
        "one connection and two reconnections"
    );
}

#[test]
fn stalled_handshake_with_timeout_fails_in_time() {
    let peer = Server::start(|p, _| {
        greeted(p)?;
        p.drain();
        Ok(())
    });
    let uri = peer.uri_string();
    let run = run_watched(&["--timeout", "1", &uri, "null:"]);
    let line = run.assert_clean_failure(&uri);
    assert!(
        line.contains("handshake") && line.contains("timed out"),
        "{line}"
    );
    assert!(
        run.elapsed < Duration::from_secs(4),
        "took {:?}",
        run.elapsed
    );
}

/// No --timeout, the peer never answers a read, and the user presses
/// Ctrl-C: nbdcp must still stop, with status 130, within seconds, and
/// (with `strict`) say so in one line.
///
/// KNOWN PRODUCT BUG: when the copy does not stop within the grace
/// period, nbdcp exits with 130 but prints nothing (`exit_now` in
/// src/signals.rs `_exit`s without the `interrupted by signal` line), so
/// the strict form is the ignored test.
fn sigint_while_a_peer_does_not_answer_checked(strict: bool) {
    let peer = Server::nbd(Export::new(MIB), on_first_read(|_, _| Ok(Hook::Stall)));
    let uri = peer.uri_string();
    let mut run = Watched::spawn(&["-C", "1", &uri, "null:"]);
    // The read the peer will never answer has arrived.
    peer.wait_for_request("the read", Duration::from_secs(10), |_, r| {
        r.command == NBD_CMD_READ
    });
    assert!(run.is_running(), "nbdcp ended before the signal");
    run.signal(libc::SIGINT);
    let signalled = run.elapsed();
    let done = run.wait(HANG_DEADLINE);
    assert_eq!(done.code, Some(130), "stderr:\n{}", done.stderr);
    assert!(
        done.elapsed - signalled < Duration::from_secs(4),
        "took {:?} after SIGINT",
        done.elapsed - signalled
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    if strict {
        let line = done.assert_failure(130, "interrupted");
        assert_eq!(line, "nbdcp: interrupted by signal 2");
    }
}

#[test]
fn sigint_while_a_peer_does_not_answer() {
    sigint_while_a_peer_does_not_answer_checked(false);
}

#[test]
fn sigint_while_a_peer_does_not_answer_says_so() {
    sigint_while_a_peer_does_not_answer_checked(true);
}

// ---------------------------------------------------------------------
// Destination peers
// ---------------------------------------------------------------------

fn to_peer(peer: &Server, size: u64, expect: &[&str]) {
    let d = tmp();
    let src = d.path().join("src.img");
    random_file(&src, size, 5);
    let uri = peer.uri_string();
    let run = run_watched(&["-C", "1", "--retries", "0", s(&src), &uri]);
    let line = run.assert_clean_failure(&uri);
    for e in expect {
        assert!(line.contains(e), "expected {e:?} in: {line}");
    }
}

#[test]
fn destination_write_reply_with_an_unknown_cookie() {
    let peer = Server::nbd(Export::new(MIB), |p, r, _| {
        if r.command == NBD_CMD_WRITE {
            p.simple_reply(r.cookie ^ 0xffff_0000, 0, &[])?;
            p.drain();
            return Ok(Hook::Done);
        }
        Ok(Hook::Pass)
    });
    to_peer(&peer, MIB, &["unknown cookie"]);
}

#[test]
fn destination_write_answered_with_data() {
    let peer = Server::nbd(Export::new(MIB), |p, r, _| {
        if r.command == NBD_CMD_WRITE {
            p.data(r.cookie, NBD_REPLY_FLAG_DONE, r.offset, &[0; 512])?;
            p.drain();
            return Ok(Hook::Done);
        }
        Ok(Hook::Pass)
    });
    to_peer(&peer, MIB, &["read chunk in reply to NBD_CMD_WRITE"]);
}

#[test]
fn destination_flush_fails() {
    let peer = Server::nbd(Export::new(MIB), |p, r, _| {
        if r.command == NBD_CMD_FLUSH {
            p.simple_reply(r.cookie, NBD_ENOSPC, &[])?;
            return Ok(Hook::Done);
        }
        Ok(Hook::Pass)
    });
    // A flush has no range to report.
    to_peer(&peer, MIB, &["flush: No space left on device"]);
}

#[test]
fn destination_closes_on_the_first_write() {
    let peer = Server::nbd(Export::new(MIB), |_, r, _| {
        Ok(if r.command == NBD_CMD_WRITE {
            Hook::Close
        } else {
            Hook::Pass
        })
    });
    to_peer(&peer, MIB, &[]);
}

// ---------------------------------------------------------------------
// Several connections
// ---------------------------------------------------------------------

/// Four workers on a 512 MiB export; the second connection breaks the
/// protocol on its third read. Every worker must stop and there must be
/// exactly one error line.
#[test]
fn one_broken_connection_of_four_stops_every_worker() {
    let peer = Server::start(|p, conn| {
        let export = Export::new(512 * MIB).no_extents();
        if !p.negotiate(&export)? {
            return Ok(());
        }
        p.serve(&|p: &mut Peer, r: &Request, n| {
            if conn == 2 && r.command == NBD_CMD_READ && n == 3 {
                p.simple_reply(r.cookie.wrapping_add(999), 0, &[])?;
                p.drain();
                return Ok(Hook::Done);
            }
            Ok(Hook::Pass)
        })
    });
    let uri = peer.uri_string();
    let run = run_watched(&["-C", "4", "-T", "4", &uri, "null:"]);
    let line = run.assert_clean_failure(&uri);
    assert!(line.contains("unknown cookie"), "{line}");
    assert_eq!(peer.connections(), 4);
    assert!(
        run.elapsed < Duration::from_secs(10),
        "took {:?}",
        run.elapsed
    );
}
