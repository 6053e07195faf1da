//! Fuzz harnesses for nbdcp's NBD code, shared by the cargo-fuzz targets in
//! `fuzz_targets/` and by this crate's tests (which replay the seed corpus
//! and any saved findings without libFuzzer).
//!
//! Every harness takes arbitrary bytes and must return normally: a panic,
//! a hang or a huge allocation is a finding. Besides "does not crash", the
//! harnesses check cheap oracles: a message that decodes re-encodes to the
//! same bytes, a URI that parses prints as a URI that parses back to the
//! same value, block status extents stay inside the request.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Once;
use std::thread;
use std::time::Duration;

use nbdcp_nbd::ErrorKind;
use nbdcp_nbd::handshake::negotiate;
use nbdcp_nbd::wire::*;
use nbdcp_nbd::{Client, NbdUri, Transport, WriteCmd};

pub mod seeds;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Exercise an error's `Display` (it formats peer data).
fn show<T, E: std::fmt::Display>(r: &Result<T, E>) {
    if let Err(e) = r {
        let _ = e.to_string();
    }
}

/// `sanitize` must leave no control characters and no surrounding space.
fn check_sanitized(s: &str) {
    assert!(!s.chars().any(char::is_control), "control char in {s:?}");
    assert_eq!(s, s.trim(), "untrimmed {s:?}");
}

// ---------------------------------------------------------------------------
// wire_decoders

/// Feed `data` to every decoder in `nbdcp_nbd::wire`. Whatever decodes
/// must re-encode to the bytes it came from (for the variable-length
/// payloads, to the whole input, since they refuse trailing bytes).
pub fn wire_decoders(data: &[u8]) {
    let r = check_init_magic(data);
    show(&r);
    let r = Greeting::decode(data);
    show(&r);
    match r {
        Ok(Greeting::Newstyle { handshake_flags }) => {
            assert_eq!(
                Greeting::encode_newstyle(handshake_flags)[..],
                data[..GREETING_LEN]
            );
        }
        Ok(Greeting::Oldstyle) => {
            assert_eq!(be32(&data[8..]), (NBD_CLISERV_MAGIC >> 32) as u32);
        }
        Err(_) => {}
    }
    if let Ok(f) = decode_client_flags(data) {
        assert_eq!(encode_client_flags(f)[..], data[..4]);
    }
    let r = OptionHeader::decode(data);
    show(&r);
    if let Ok(h) = r {
        assert_eq!(h.encode()[..], data[..OPTION_HEADER_LEN]);
    }
    let r = OptionReplyHeader::decode(data);
    show(&r);
    if let Ok(h) = r {
        assert_eq!(h.encode()[..], data[..OPTION_REPLY_HEADER_LEN]);
        assert!(h.length <= MAX_OPTION_REPLY_PAYLOAD);
        let _ = (option_name(h.option), option_reply_name(h.reply_type));
        let _ = option_error_message(h.reply_type);
    }
    let r = decode_go_payload(data);
    show(&r);
    if let Ok((name, reqs)) = r {
        assert_eq!(encode_go_payload(&name, &reqs).unwrap(), data);
    }
    let r = decode_meta_context_payload(data);
    show(&r);
    if let Ok((name, queries)) = r {
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        assert_eq!(encode_meta_context_payload(&name, &q).unwrap(), data);
    }
    let r = Info::decode(data);
    show(&r);
    match r {
        Ok(Info::Other(t)) => assert_eq!(t, be16(data)),
        Ok(info) => assert_eq!(info.encode(), data),
        Err(_) => {}
    }
    let r = decode_meta_context_reply(data);
    show(&r);
    if let Ok((id, name)) = r {
        assert_eq!(encode_meta_context_reply(id, &name), data);
    }
    if let Ok(r) = ExportNameReply::decode(data) {
        assert_eq!(r.encode()[..], data[..EXPORT_NAME_REPLY_LEN]);
    }
    let r = Request::decode(data);
    show(&r);
    if let Ok(r) = r {
        assert_eq!(r.encode()[..], data[..REQUEST_HEADER_LEN]);
        let _ = command_name(r.command);
    }
    let r = SimpleReply::decode(data);
    show(&r);
    if let Ok(r) = r {
        assert_eq!(r.encode()[..], data[..SIMPLE_REPLY_LEN]);
        let _ = errno_message(r.error);
    }
    let r = reply_header_len(data);
    show(&r);
    if let Ok(n) = r {
        assert!(
            n == SIMPLE_REPLY_LEN
                || n == STRUCTURED_REPLY_HEADER_LEN
                || n == EXTENDED_REPLY_HEADER_LEN
        );
    }
    let r = ChunkHeader::decode(data);
    show(&r);
    if let Ok(h) = r {
        assert_eq!(h.encode()[..], data[..STRUCTURED_REPLY_HEADER_LEN]);
        assert!(check_chunk_length(h.chunk_type, h.length).is_ok());
        assert!(h.length <= MAX_DATA_PAYLOAD.max(MAX_BLOCK_STATUS_PAYLOAD));
    }
    let r = ExtendedChunkHeader::decode(data);
    show(&r);
    if let Ok(h) = r {
        assert_eq!(h.encode()[..], data[..EXTENDED_REPLY_HEADER_LEN]);
        assert!(check_extended_chunk_length(h.chunk_type, h.length.into()).is_ok());
        assert!(h.length <= MAX_DATA_PAYLOAD.max(MAX_BLOCK_STATUS_EXT_PAYLOAD));
    }
    let r = decode_extended_request(data);
    show(&r);
    if let Ok((r, len)) = r
        && let Ok(l) = u32::try_from(len)
    {
        assert_eq!(r.length, l);
        assert_eq!(r.encode_extended()[..], data[..EXTENDED_REQUEST_HEADER_LEN]);
    }
    let r = ExtendedBlockDescriptor::decode(data);
    show(&r);
    if let Ok(d) = r {
        assert_eq!(d.encode()[..], data[..EXTENDED_BLOCK_DESCRIPTOR_LEN]);
        assert_ne!(d.length, 0);
    }
    let _ = decode_block_status_ext_prefix(data, data.len() as u32);
    let _ = decode_offset_data_prefix(data);
    let r = OffsetHole::decode(data);
    show(&r);
    if let Ok(h) = r {
        assert_eq!(h.encode()[..], data[..12]);
        assert_ne!(h.length, 0);
    }
    for t in [NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET] {
        check_error_chunk(t, data);
    }
    if data.len() >= 2 {
        check_error_chunk(be16(data), &data[2..]);
    }
    let r = BlockDescriptor::decode(data);
    show(&r);
    if let Ok(d) = r {
        assert_eq!(d.encode()[..], data[..BLOCK_DESCRIPTOR_LEN]);
        assert_ne!(d.length, 0);
    }
    let r = decode_block_status(data);
    show(&r);
    if let Ok((id, descs)) = r {
        assert_eq!(encode_block_status(id, &descs), data);
        assert!(descs.iter().all(|d| d.length != 0));
    }
    if data.len() >= 6 {
        let r = check_chunk_length(be16(data), be32(&data[2..]));
        show(&r);
    }
    check_sanitized(&sanitize(data));
}

fn check_error_chunk(chunk_type: u16, payload: &[u8]) {
    let r = ErrorChunk::decode(chunk_type, payload);
    show(&r);
    if let Ok(e) = r {
        assert_ne!(e.error, 0);
        assert_eq!(
            e.offset.is_some(),
            chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET
        );
        check_sanitized(&e.message);
        // At most MAX_STRING input bytes, each at most a 3-byte U+FFFD.
        assert!(e.message.len() <= 3 * MAX_STRING);
        let _ = errno_message(e.error);
    }
}

// ---------------------------------------------------------------------------
// handshake

/// Most the client may write during one handshake; more means it is
/// looping.
const MAX_HANDSHAKE_WRITES: usize = 64 * 1024;

/// A server whose every byte comes from the fuzzer; what the client sends
/// is counted and dropped.
struct FakeServer<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for FakeServer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for FakeServer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        assert!(
            self.written <= MAX_HANDSHAKE_WRITES,
            "client wrote {} bytes during the handshake",
            self.written
        );
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Run the client side of the handshake against a server that sends
/// `data` and then hangs up. It must end (the input is finite, so any loop
/// must consume it) with `Ok` or `Err`, and an `Ok` must be consistent.
pub fn handshake(data: &[u8]) {
    let mut server = FakeServer {
        input: data,
        written: 0,
    };
    let r = negotiate(&mut server, "fuzz", "fuzz");
    show(&r);
    if let Ok(n) = r {
        if !n.structured_replies {
            assert_eq!(n.base_allocation, None);
        }
        if let Some(b) = n.block_size {
            assert!(b.minimum.is_power_of_two() && b.minimum <= 64 * 1024);
            assert!(b.preferred.is_power_of_two() && b.preferred >= b.minimum);
            assert!(b.maximum >= b.minimum);
        }
    }
}

// ---------------------------------------------------------------------------
// replies

/// Export size the scripted handshake announces.
pub const EXPORT_SIZE: u64 = 1 << 30;
/// Context id the scripted handshake gives `base:allocation`.
pub const CONTEXT_ID: u32 = 7;
/// Bytes at the start of a `replies` input that configure the run; the
/// server's transmission-phase bytes follow.
pub const REPLIES_CONFIG_LEN: usize = 4;
/// Longest single write payload the harness sends (keeps everything the
/// client sends well inside the socket buffers, so the scripted server
/// never has to read while writing).
pub const MAX_WRITE: usize = 4096;
/// Socket timeout for the client: if one read blocks this long, the
/// harness is broken or the client waits for bytes that will never come.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a `replies` run is set up, from the first [`REPLIES_CONFIG_LEN`]
/// bytes of the input.
#[derive(Clone, Copy, Debug)]
pub struct RepliesConfig {
    /// Negotiate structured replies.
    pub structured: bool,
    /// Select `base:allocation` (with structured replies only).
    pub base_allocation: bool,
    /// Send `NBD_INFO_BLOCK_SIZE` 512 / 4096 / 1 MiB.
    pub block_size: bool,
    /// Export is read-only.
    pub read_only: bool,
    /// Server lacks `NBD_CMD_WRITE_ZEROES`.
    pub no_write_zeroes: bool,
    /// Which operations to run ([`Op`]).
    pub op: u8,
    /// Length of each request (`(n + 1) * 512` bytes).
    pub len_sel: u8,
    /// Low two bits: number of requests - 1; next two: in-flight limit - 1.
    pub count_sel: u8,
}

/// Operations of a `replies` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `read_many`.
    Read,
    /// `block_status`.
    BlockStatus,
    /// `write_many`: writes, a zero and a trim.
    Write,
    /// `flush`.
    Flush,
    /// Read, block status and flush on one connection (exercises what
    /// happens after a server error or a dead connection).
    Sequence,
    /// Read, then block status, at the very end of the 64-bit offset range.
    EndOfRange,
}

impl Op {
    /// All operations, in selector order.
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::BlockStatus,
        Op::Write,
        Op::Flush,
        Op::Sequence,
        Op::EndOfRange,
    ];
}

impl RepliesConfig {
    /// Decode the config bytes (missing ones are zero).
    pub fn decode(data: &[u8]) -> RepliesConfig {
        let b = |i: usize| data.get(i).copied().unwrap_or(0);
        RepliesConfig {
            structured: b(0) & 1 != 0,
            base_allocation: b(0) & 2 != 0,
            block_size: b(0) & 4 != 0,
            read_only: b(0) & 8 != 0,
            no_write_zeroes: b(0) & 16 != 0,
            op: b(1),
            len_sel: b(2),
            count_sel: b(3),
        }
    }

    /// Encode as config bytes.
    pub fn encode(&self) -> [u8; REPLIES_CONFIG_LEN] {
        let flags = u8::from(self.structured)
            | u8::from(self.base_allocation) << 1
            | u8::from(self.block_size) << 2
            | u8::from(self.read_only) << 3
            | u8::from(self.no_write_zeroes) << 4;
        [flags, self.op, self.len_sel, self.count_sel]
    }

    /// The operation to run.
    pub fn op(&self) -> Op {
        Op::ALL[usize::from(self.op) % Op::ALL.len()]
    }

    /// Length of each request.
    pub fn request_len(&self) -> usize {
        (usize::from(self.len_sel) + 1) * 512
    }

    /// Number of requests.
    pub fn count(&self) -> usize {
        usize::from(self.count_sel & 3) + 1
    }

    /// In-flight limit.
    pub fn max_in_flight(&self) -> usize {
        usize::from(self.count_sel >> 2 & 3) + 1
    }

    /// Transmission flags the scripted server announces.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_TRIM;
        if !self.no_write_zeroes {
            f |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
        }
        if self.read_only {
            f |= NBD_FLAG_READ_ONLY;
        }
        f
    }

    /// The server's side of a successful handshake for this config.
    pub fn handshake_script(&self) -> Vec<u8> {
        let mut b =
            Greeting::encode_newstyle(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_vec();
        // Compact headers: the replies that follow are scripted with them.
        option_reply(&mut b, NBD_OPT_EXTENDED_HEADERS, NBD_REP_ERR_UNSUP, &[]);
        let opt = NBD_OPT_STRUCTURED_REPLY;
        if self.structured {
            option_reply(&mut b, opt, NBD_REP_ACK, &[]);
            let opt = NBD_OPT_SET_META_CONTEXT;
            if self.base_allocation {
                let m = encode_meta_context_reply(CONTEXT_ID, BASE_ALLOCATION);
                option_reply(&mut b, opt, NBD_REP_META_CONTEXT, &m);
            }
            option_reply(&mut b, opt, NBD_REP_ACK, &[]);
        } else {
            option_reply(&mut b, opt, NBD_REP_ERR_UNSUP, &[]);
        }
        let info = Info::Export {
            size: EXPORT_SIZE,
            flags: self.transmission_flags(),
        };
        option_reply(&mut b, NBD_OPT_GO, NBD_REP_INFO, &info.encode());
        if self.block_size {
            let bs = Info::BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 20,
            };
            option_reply(&mut b, NBD_OPT_GO, NBD_REP_INFO, &bs.encode());
        }
        option_reply(&mut b, NBD_OPT_GO, NBD_REP_ACK, &[]);
        b
    }
}

/// Append an option reply with its payload to `b`.
pub fn option_reply(b: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    let h = OptionReplyHeader {
        option,
        reply_type,
        length: payload.len() as u32,
    };
    b.extend_from_slice(&h.encode());
    b.extend_from_slice(payload);
}

fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    // libFuzzer's main, not Rust's, starts the process, so SIGPIPE still
    // has its default action; the scripted server writes to a socket the
    // client may already have shut down.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// Fail on the one error that means the client waited for bytes that a
/// server which already hung up can never send.
fn check_not_hung<T>(r: &nbdcp_nbd::Result<T>) {
    show(r);
    if let Err(e) = r {
        assert!(e.kind() != ErrorKind::Timeout, "client hung: {e}");
        if let Some(io) = e.io_error() {
            assert!(
                !matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "client hung: {e}"
            );
        }
    }
}

fn read(client: &mut Client, cfg: &RepliesConfig, base: u64) -> nbdcp_nbd::Result<()> {
    let len = cfg.request_len();
    let mut bufs: Vec<Vec<u8>> = (0..cfg.count()).map(|_| vec![0u8; len]).collect();
    let mut reqs: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| (base.wrapping_add((i * len) as u64), b.as_mut_slice()))
        .collect();
    let r = client.read_many(&mut reqs, cfg.max_in_flight(), usize::MAX);
    check_not_hung(&r);
    r
}

fn block_status(client: &mut Client, cfg: &RepliesConfig, base: u64) -> nbdcp_nbd::Result<()> {
    let length = (cfg.request_len() * cfg.count()) as u64;
    let r = client.block_status(base, length);
    check_not_hung(&r);
    let extents = r?;
    let total: u64 = extents.iter().map(|&(l, _)| l).sum();
    assert!(total <= length, "extents cover {total} of {length} bytes");
    assert!(extents.iter().all(|&(l, _)| l > 0), "empty extent");
    Ok(())
}

fn write(client: &mut Client, cfg: &RepliesConfig) -> nbdcp_nbd::Result<()> {
    let len = cfg.request_len();
    let data = vec![0xa5u8; len.min(MAX_WRITE)];
    let mut ops: Vec<WriteCmd<'_>> = (0..cfg.count())
        .map(|i| WriteCmd::Write {
            offset: (i * len) as u64,
            data: &data,
            lend: true,
        })
        .collect();
    let end = (cfg.count() * len) as u64;
    ops.push(WriteCmd::WriteZeroes {
        offset: end,
        length: len as u64,
        no_hole: cfg.count_sel & 16 != 0,
        fast_zero: false,
    });
    ops.push(WriteCmd::Trim {
        offset: end + len as u64,
        length: len as u64,
    });
    let r = client.write_many(ops, cfg.max_in_flight(), usize::MAX);
    check_not_hung(&r);
    r
}

fn flush(client: &mut Client) -> nbdcp_nbd::Result<()> {
    let r = client.flush();
    check_not_hung(&r);
    r
}

/// Negotiate a connection per the config bytes at the start of `data`
/// (the scripted server always agrees), then let the server answer the
/// client's requests with the rest of `data` and hang up. The client must
/// return `Ok` or `Err` from every call, never panic or wait forever, and
/// what it returns must be consistent with its requests.
pub fn replies(data: &[u8]) {
    let _ = run_replies(data);
}

/// [`replies`], returning whether each operation succeeded.
pub fn run_replies(data: &[u8]) -> Vec<bool> {
    ignore_sigpipe();
    let cfg = RepliesConfig::decode(data);
    let tail = data.get(REPLIES_CONFIG_LEN..).unwrap_or(&[]).to_vec();
    let (c, s) = UnixStream::pair().expect("socketpair");
    let script = cfg.handshake_script();
    let server = thread::spawn(move || {
        let mut s = s;
        let _ = s.write_all(&script);
        let _ = s.write_all(&tail);
        let _ = s.shutdown(Shutdown::Write);
        // Swallow requests until the client hangs up, so the client
        // never blocks sending.
        let mut sink = [0u8; 4096];
        while let Ok(n) = s.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    let transport = Transport::from_unix(c);
    transport
        .set_timeout(Some(CLIENT_TIMEOUT))
        .expect("timeout");
    let mut client = Client::handshake(transport, "fuzz", "fuzz").expect("scripted handshake");
    assert_eq!(client.size(), EXPORT_SIZE);
    assert_eq!(
        client.has_base_allocation(),
        cfg.structured && cfg.base_allocation
    );
    let outcomes = match cfg.op() {
        Op::Read => vec![read(&mut client, &cfg, 0).is_ok()],
        Op::BlockStatus => vec![block_status(&mut client, &cfg, 0).is_ok()],
        Op::Write => vec![write(&mut client, &cfg).is_ok()],
        Op::Flush => vec![flush(&mut client).is_ok()],
        Op::Sequence => {
            let r = read(&mut client, &cfg, 0).is_ok();
            let was_dead = client.is_dead();
            let b = block_status(&mut client, &cfg, 0).is_ok();
            assert!(!(was_dead && b), "a dead connection answered");
            vec![r, b, flush(&mut client).is_ok()]
        }
        Op::EndOfRange => {
            let total = (cfg.request_len() * cfg.count()) as u64;
            let base = u64::MAX - total + 1;
            vec![
                read(&mut client, &cfg, base).is_ok(),
                block_status(&mut client, &cfg, base).is_ok(),
            ]
        }
    };
    drop(client);
    server.join().expect("server thread");
    outcomes
}

// ---------------------------------------------------------------------------
// uri

/// Parse `data` (made UTF-8 lossily) as an NBD URI. A URI that parses
/// must print in canonical form, and that form must parse back to the same
/// value and print the same again.
pub fn uri(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let _ = NbdUri::looks_like_uri(&s);
    let r = NbdUri::parse(&s);
    show(&r);
    if let Ok(u) = r {
        assert!(u.export.len() <= MAX_STRING);
        let canonical = u.to_string();
        let again = match NbdUri::parse(&canonical) {
            Ok(v) => v,
            Err(e) => panic!("{s:?} parsed, but its canonical form {canonical:?} did not: {e}"),
        };
        assert_eq!(u, again, "{s:?} -> {canonical:?}");
        assert_eq!(again.to_string(), canonical);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn run(target: &str, data: &[u8]) {
        match target {
            "wire_decoders" => wire_decoders(data),
            "handshake" => handshake(data),
            "replies" => replies(data),
            "uri" => uri(data),
            t => panic!("unknown target {t}"),
        }
    }

    /// Every seed runs cleanly.
    #[test]
    fn seeds_pass() {
        for (target, name, data) in seeds::all() {
            eprintln!("{target}/{name}");
            run(target, &data);
        }
    }

    /// Inputs that once failed (saved under `regressions/TARGET/`) pass.
    #[test]
    fn regressions_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        let Ok(targets) = std::fs::read_dir(&dir) else {
            return;
        };
        for t in targets.flatten() {
            let target = t.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(t.path()).unwrap().flatten() {
                eprintln!("{target}/{}", f.file_name().to_string_lossy());
                run(&target, &std::fs::read(f.path()).unwrap());
            }
        }
    }

    /// The seeds that describe a well-behaved server really complete.
    #[test]
    fn valid_reply_seeds_succeed() {
        for (name, data) in seeds::replies_ok() {
            let outcomes = run_replies(&data);
            assert!(outcomes.iter().all(|&ok| ok), "{name}: {outcomes:?}");
        }
    }
}
