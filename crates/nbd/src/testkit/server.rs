//! An in-memory NBD server for tests, on a Unix socket, with switches for
//! the behaviours and misbehaviours the client must handle.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::uri::NbdUri;
use crate::wire::*;

/// What the fake server gets wrong on purpose, on the first read (or
/// block status request, for the block status ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// Behave.
    Nothing,
    /// Send less data than a read asked for.
    ShortRead,
    /// Answer with a cookie no request had.
    UnknownCookie,
    /// Send a data chunk outside the read's range.
    ChunkOutside,
    /// Send a reply with a bad magic number.
    BadMagic,
    /// Send two data chunks that overlap.
    Overlap,
    /// Send an error chunk whose errno is 0.
    ZeroErrno,
    /// Claim a chunk longer than any request.
    HugeChunk,
    /// Answer a write with a hole chunk.
    HoleForWrite,
    /// Send extents past the end of a block status request.
    ExtentsBeyond,
    /// Send an extent of length 0.
    ZeroLengthExtent,
    /// Finish a block status reply without extents.
    NoExtents,
    /// Hang up halfway through a reply.
    CloseMidReply,
}

/// Switches; the defaults are a modern, well-behaved server.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Export name the server answers to.
    pub export: String,
    /// Offer structured replies.
    pub structured: bool,
    /// Offer the `base:allocation` context.
    pub base_allocation: bool,
    /// Advertise a read-only export.
    pub read_only: bool,
    /// Advertise `NBD_CMD_WRITE_ZEROES`.
    pub write_zeroes: bool,
    /// Advertise `NBD_CMD_FLAG_FAST_ZERO`.
    pub fast_zero: bool,
    /// Advertise `NBD_CMD_TRIM`.
    pub trim: bool,
    /// Advertise `NBD_CMD_FLUSH`.
    pub flush: bool,
    /// Answer every block status request with EIO.
    pub fail_block_status: bool,
    /// Requests touching this offset fail with EIO.
    pub fail_at: Option<u64>,
    /// Send the fault as a simple reply even with structured replies.
    pub simple_errors: bool,
    /// Connections beyond this many are dropped at once.
    pub max_connections: usize,
    /// Block size constraints to send (minimum, preferred, maximum).
    pub block_size: Option<(u32, u32, u32)>,
    /// Zero blocks of reads go out as OFFSET_HOLE chunks.
    pub holes: bool,
    /// Chunks of one read reply go out last first.
    pub reverse_chunks: bool,
    /// Replies to a burst of requests go out last first.
    pub reorder: bool,
    /// Send a block status chunk for a context nobody asked for.
    pub extra_context: bool,
    /// What to get wrong on purpose.
    pub misbehave: Misbehave,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            export: String::new(),
            structured: true,
            base_allocation: true,
            read_only: false,
            write_zeroes: true,
            fast_zero: true,
            trim: true,
            flush: true,
            fail_block_status: false,
            fail_at: None,
            simple_errors: false,
            max_connections: usize::MAX,
            block_size: None,
            holes: true,
            reverse_chunks: true,
            reorder: true,
            extra_context: false,
            misbehave: Misbehave::Nothing,
        }
    }
}

struct Shared {
    cfg: FakeConfig,
    data: Mutex<Vec<u8>>,
    connections: AtomicUsize,
    max_write: AtomicU64,
    misbehaved: AtomicUsize,
    max_pending: AtomicUsize,
    log: Mutex<Vec<Request>>,
}

/// A running fake server; it lives as long as the test process (its
/// threads block in accept), which is fine for tests. Its helpers panic
/// on failure, as test code does.
pub struct FakeServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shared: Arc<Shared>,
}

const CONTEXT_ID: u32 = 3;

impl FakeServer {
    /// Listen on a Unix socket in a fresh directory with an export of `size` zero bytes, set up by `configure`.
    pub fn start(size: usize, configure: impl FnOnce(&mut FakeConfig)) -> FakeServer {
        let mut cfg = FakeConfig::default();
        configure(&mut cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let shared = Arc::new(Shared {
            cfg,
            data: Mutex::new(vec![0u8; size]),
            connections: AtomicUsize::new(0),
            max_write: AtomicU64::new(0),
            misbehaved: AtomicUsize::new(0),
            max_pending: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let n = s.connections.fetch_add(1, Ordering::SeqCst);
                if n >= s.cfg.max_connections {
                    drop(conn);
                    continue;
                }
                let s = s.clone();
                thread::spawn(move || {
                    let _ = serve(&s, conn);
                });
            }
        });
        FakeServer {
            _dir: dir,
            path,
            shared,
        }
    }

    /// The URI to connect to.
    pub fn uri(&self) -> NbdUri {
        NbdUri::unix(&self.path, self.shared.cfg.export.clone())
    }

    /// Longest write request received.
    pub fn max_write_seen(&self) -> u64 {
        self.shared.max_write.load(Ordering::SeqCst)
    }

    /// Most replies held back at once: with `reorder`, how many requests
    /// the client had in flight.
    pub fn max_pending(&self) -> usize {
        self.shared.max_pending.load(Ordering::SeqCst)
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The export's contents.
    pub fn data(&self) -> Vec<u8> {
        self.shared.data.lock().unwrap().clone()
    }

    /// Overwrite the export's contents at `offset`.
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        self.shared.data.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

fn opt_reply(w: &mut UnixStream, option: u32, reply_type: u32, payload: &[u8]) -> io::Result<()> {
    let h = OptionReplyHeader {
        option,
        reply_type,
        length: payload.len() as u32,
    };
    w.write_all(&h.encode())?;
    w.write_all(payload)
}

fn chunk(out: &mut Vec<u8>, flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) {
    let h = ChunkHeader {
        flags,
        chunk_type,
        cookie,
        length: payload.len() as u32,
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
}

fn simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SimpleReply { error, cookie }.encode());
}

fn serve(s: &Shared, mut c: UnixStream) -> io::Result<()> {
    let cfg = &s.cfg;
    c.write_all(&Greeting::encode_newstyle(
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
    ))?;
    let mut b4 = [0u8; 4];
    c.read_exact(&mut b4)?;
    let mut structured = false;
    let mut context = false;
    loop {
        let mut h = [0u8; OPTION_HEADER_LEN];
        c.read_exact(&mut h)?;
        let h = OptionHeader::decode(&h).map_err(io::Error::other)?;
        let mut data = vec![0u8; h.length as usize];
        c.read_exact(&mut data)?;
        match h.option {
            NBD_OPT_STRUCTURED_REPLY if cfg.structured => {
                structured = true;
                opt_reply(&mut c, h.option, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_SET_META_CONTEXT if structured && cfg.base_allocation => {
                let (_, queries) = decode_meta_context_payload(&data).map_err(io::Error::other)?;
                if queries.iter().any(|q| q == BASE_ALLOCATION) {
                    context = true;
                    opt_reply(
                        &mut c,
                        h.option,
                        NBD_REP_META_CONTEXT,
                        &encode_meta_context_reply(CONTEXT_ID, BASE_ALLOCATION),
                    )?;
                }
                opt_reply(&mut c, h.option, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_GO => {
                let (name, _) = decode_go_payload(&data).map_err(io::Error::other)?;
                if name != cfg.export {
                    opt_reply(&mut c, h.option, NBD_REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                if let Some((min, pref, max)) = cfg.block_size {
                    let i = Info::BlockSize {
                        minimum: min,
                        preferred: pref,
                        maximum: max,
                    };
                    opt_reply(&mut c, h.option, NBD_REP_INFO, &i.encode())?;
                }
                let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN;
                if cfg.read_only {
                    flags |= NBD_FLAG_READ_ONLY;
                }
                if cfg.write_zeroes {
                    flags |= NBD_FLAG_SEND_WRITE_ZEROES;
                    if cfg.fast_zero {
                        flags |= NBD_FLAG_SEND_FAST_ZERO;
                    }
                }
                if cfg.trim {
                    flags |= NBD_FLAG_SEND_TRIM;
                }
                if cfg.flush {
                    flags |= NBD_FLAG_SEND_FLUSH;
                }
                let size = s.data.lock().unwrap().len() as u64;
                let i = Info::Export { size, flags };
                opt_reply(&mut c, h.option, NBD_REP_INFO, &i.encode())?;
                opt_reply(&mut c, h.option, NBD_REP_ACK, &[])?;
                break;
            }
            NBD_OPT_ABORT => {
                opt_reply(&mut c, h.option, NBD_REP_ACK, &[])?;
                return Ok(());
            }
            _ => opt_reply(&mut c, h.option, NBD_REP_ERR_UNSUP, &[])?,
        }
    }
    transmission(s, c, structured, context)
}

/// Claim the one misbehaviour, if it is still unclaimed.
fn misbehave(s: &Shared, which: &[Misbehave]) -> Option<Misbehave> {
    let m = s.cfg.misbehave;
    if which.contains(&m) && s.misbehaved.fetch_add(1, Ordering::SeqCst) == 0 {
        Some(m)
    } else {
        None
    }
}

fn transmission(s: &Shared, mut c: UnixStream, structured: bool, context: bool) -> io::Result<()> {
    let cfg = &s.cfg;
    let mut pending: Vec<Vec<u8>> = Vec::new();
    loop {
        // Wait briefly for the next request when holding replies back; a
        // pause means the client is waiting for them.
        let mut first = [0u8; 1];
        if !pending.is_empty() {
            c.set_read_timeout(Some(Duration::from_millis(50)))?;
        }
        let r = c.read(&mut first);
        c.set_read_timeout(None)?;
        match r {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                for reply in pending.drain(..).rev() {
                    c.write_all(&reply)?;
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        let mut h = [0u8; REQUEST_HEADER_LEN];
        h[0] = first[0];
        c.read_exact(&mut h[1..])?;
        let req = Request::decode(&h).map_err(io::Error::other)?;
        s.log.lock().unwrap().push(req);
        let mut out = Vec::new();
        let (off, len) = (req.offset, req.length as u64);
        let fails = cfg
            .fail_at
            .is_some_and(|f| off <= f && f < off + len.max(1));
        match req.command {
            NBD_CMD_DISC => {
                for reply in pending.drain(..).rev() {
                    c.write_all(&reply)?;
                }
                return Ok(());
            }
            NBD_CMD_WRITE => {
                let mut payload = vec![0u8; req.length as usize];
                c.read_exact(&mut payload)?;
                s.max_write.fetch_max(len, Ordering::SeqCst);
                if misbehave(s, &[Misbehave::HoleForWrite]).is_some() {
                    let hole = OffsetHole {
                        offset: off,
                        length: req.length,
                    };
                    chunk(
                        &mut out,
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_OFFSET_HOLE,
                        req.cookie,
                        &hole.encode(),
                    );
                } else {
                    let err = write(s, off, &payload, fails);
                    error_or_ok(&mut out, s, structured, req.cookie, err, (off, len));
                }
            }
            NBD_CMD_WRITE_ZEROES => {
                let err = if cfg.write_zeroes {
                    zero(s, off, len, fails)
                } else {
                    Some(NBD_EINVAL)
                };
                error_or_ok(&mut out, s, structured, req.cookie, err, (off, len));
            }
            NBD_CMD_TRIM | NBD_CMD_FLUSH | NBD_CMD_CACHE => {
                let err = if fails { Some(NBD_EIO) } else { None };
                error_or_ok(&mut out, s, structured, req.cookie, err, (off, len));
            }
            NBD_CMD_READ => read(s, &mut out, &mut c, structured, &req, fails)?,
            NBD_CMD_BLOCK_STATUS => {
                let beyond = off + len > s.data.lock().unwrap().len() as u64;
                if !context || beyond {
                    let einval = Some(NBD_EINVAL);
                    error_or_ok(&mut out, s, structured, req.cookie, einval, (off, len));
                } else if cfg.fail_block_status {
                    let e = ErrorChunk {
                        error: NBD_EIO,
                        message: "cannot tell".into(),
                        offset: None,
                    };
                    let (t, p) = e.encode();
                    chunk(&mut out, NBD_REPLY_FLAG_DONE, t, req.cookie, &p);
                } else {
                    block_status(s, &mut out, &req);
                }
            }
            _ => error_or_ok(
                &mut out,
                s,
                structured,
                req.cookie,
                Some(NBD_EINVAL),
                (off, len),
            ),
        }
        if out.is_empty() {
            continue;
        }
        if cfg.reorder {
            pending.push(out);
            s.max_pending.fetch_max(pending.len(), Ordering::SeqCst);
        } else {
            c.write_all(&out)?;
        }
    }
}

fn error_or_ok(
    out: &mut Vec<u8>,
    s: &Shared,
    structured: bool,
    cookie: u64,
    err: Option<u32>,
    req: (u64, u64),
) {
    let (off, len) = req;
    // Report the injected fault where it is, else at the request start.
    let off = match s.cfg.fail_at {
        Some(f) if off <= f && f < off + len.max(1) => f,
        _ => off,
    };
    match err {
        Some(e) if structured && !s.cfg.simple_errors => {
            let ec = ErrorChunk {
                error: e,
                message: "injected failure".into(),
                offset: Some(off),
            };
            let (t, p) = ec.encode();
            chunk(out, NBD_REPLY_FLAG_DONE, t, cookie, &p);
        }
        Some(e) => simple(out, e, cookie),
        None => simple(out, 0, cookie),
    }
}

fn write(s: &Shared, off: u64, p: &[u8], fails: bool) -> Option<u32> {
    if fails {
        return Some(NBD_EIO);
    }
    if s.cfg.read_only {
        return Some(NBD_EPERM);
    }
    let mut d = s.data.lock().unwrap();
    let end = off as usize + p.len();
    if end > d.len() {
        return Some(NBD_ENOSPC);
    }
    d[off as usize..end].copy_from_slice(p);
    None
}

fn zero(s: &Shared, off: u64, len: u64, fails: bool) -> Option<u32> {
    if fails {
        return Some(NBD_EIO);
    }
    if s.cfg.read_only {
        return Some(NBD_EPERM);
    }
    let mut d = s.data.lock().unwrap();
    let end = (off + len) as usize;
    if end > d.len() {
        return Some(NBD_ENOSPC);
    }
    d[off as usize..end].fill(0);
    None
}

fn read(
    s: &Shared,
    out: &mut Vec<u8>,
    c: &mut UnixStream,
    structured: bool,
    req: &Request,
    fails: bool,
) -> io::Result<()> {
    let cfg = &s.cfg;
    let (off, len) = (req.offset as usize, req.length as usize);
    let data = {
        let d = s.data.lock().unwrap();
        if off + len > d.len() {
            None
        } else {
            Some(d[off..off + len].to_vec())
        }
    };
    let Some(data) = data else {
        error_or_ok(
            out,
            s,
            structured,
            req.cookie,
            Some(NBD_EINVAL),
            (req.offset, req.length.into()),
        );
        return Ok(());
    };
    if fails {
        error_or_ok(
            out,
            s,
            structured,
            req.cookie,
            Some(NBD_EIO),
            (req.offset, req.length.into()),
        );
        return Ok(());
    }
    if !structured {
        simple(out, 0, req.cookie);
        out.extend_from_slice(&data);
        return Ok(());
    }
    let bad = misbehave(
        s,
        &[
            Misbehave::ShortRead,
            Misbehave::UnknownCookie,
            Misbehave::ChunkOutside,
            Misbehave::BadMagic,
            Misbehave::Overlap,
            Misbehave::ZeroErrno,
            Misbehave::HugeChunk,
            Misbehave::CloseMidReply,
        ],
    );
    let data_chunk = |out: &mut Vec<u8>, flags: u16, cookie: u64, at: u64, bytes: &[u8]| {
        let mut p = at.to_be_bytes().to_vec();
        p.extend_from_slice(bytes);
        chunk(out, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &p);
    };
    match bad {
        Some(Misbehave::ShortRead) => {
            data_chunk(
                out,
                NBD_REPLY_FLAG_DONE,
                req.cookie,
                req.offset,
                &data[..len / 2],
            );
            return Ok(());
        }
        Some(Misbehave::UnknownCookie) => {
            data_chunk(
                out,
                NBD_REPLY_FLAG_DONE,
                req.cookie + 1000,
                req.offset,
                &data,
            );
            return Ok(());
        }
        Some(Misbehave::ChunkOutside) => {
            data_chunk(out, NBD_REPLY_FLAG_DONE, req.cookie, req.offset + 1, &data);
            return Ok(());
        }
        Some(Misbehave::BadMagic) => {
            out.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
            out.extend_from_slice(&[0u8; 16]);
            return Ok(());
        }
        Some(Misbehave::Overlap) => {
            data_chunk(out, 0, req.cookie, req.offset, &data[..len / 2 + 1]);
            data_chunk(
                out,
                NBD_REPLY_FLAG_DONE,
                req.cookie,
                req.offset + len as u64 / 2,
                &data[len / 2..],
            );
            return Ok(());
        }
        Some(Misbehave::ZeroErrno) => {
            chunk(
                out,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_ERROR,
                req.cookie,
                &[0, 0, 0, 0, 0, 0],
            );
            return Ok(());
        }
        Some(Misbehave::HugeChunk) => {
            let h = ChunkHeader {
                flags: NBD_REPLY_FLAG_DONE,
                chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
                cookie: req.cookie,
                length: u32::MAX,
            };
            out.extend_from_slice(&h.encode());
            return Ok(());
        }
        Some(Misbehave::CloseMidReply) => {
            let mut partial = Vec::new();
            data_chunk(
                &mut partial,
                NBD_REPLY_FLAG_DONE,
                req.cookie,
                req.offset,
                &data,
            );
            partial.truncate(partial.len() / 2);
            c.write_all(&partial)?;
            c.shutdown(std::net::Shutdown::Both)?;
            return Err(io::Error::other("closed on purpose"));
        }
        _ => {}
    }
    // Runs of 4 KiB blocks that are all zero or not, as chunks.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut at = 0;
    while at < len {
        let next = ((off + at) / 4096 + 1) * 4096 - off;
        let end = next.min(len);
        let zero = cfg.holes && data[at..end].iter().all(|&b| b == 0);
        match runs.last_mut() {
            Some(r) if r.2 == zero => r.1 = end,
            _ => runs.push((at, end, zero)),
        }
        at = end;
    }
    if cfg.reverse_chunks {
        runs.reverse();
    }
    for (a, e, zero) in runs {
        let at = req.offset + a as u64;
        if zero {
            let hole = OffsetHole {
                offset: at,
                length: (e - a) as u32,
            };
            chunk(
                out,
                0,
                NBD_REPLY_TYPE_OFFSET_HOLE,
                req.cookie,
                &hole.encode(),
            );
        } else {
            data_chunk(out, 0, req.cookie, at, &data[a..e]);
        }
    }
    chunk(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_NONE,
        req.cookie,
        &[],
    );
    Ok(())
}

fn block_status(s: &Shared, out: &mut Vec<u8>, req: &Request) {
    let d = s.data.lock().unwrap();
    let (off, len) = (req.offset as usize, req.length as usize);
    let end = (off + len).min(d.len());
    let mut descs: Vec<BlockDescriptor> = Vec::new();
    let mut at = off;
    while at < end {
        let next = ((at / 4096 + 1) * 4096).min(end);
        let flags = if d[at..next].iter().all(|&b| b == 0) {
            NBD_STATE_HOLE | NBD_STATE_ZERO
        } else {
            0
        };
        match descs.last_mut() {
            Some(l) if l.flags == flags => l.length += (next - at) as u32,
            _ => descs.push(BlockDescriptor {
                length: (next - at) as u32,
                flags,
            }),
        }
        at = next;
    }
    match misbehave(
        s,
        &[
            Misbehave::ExtentsBeyond,
            Misbehave::ZeroLengthExtent,
            Misbehave::NoExtents,
        ],
    ) {
        Some(Misbehave::ExtentsBeyond) => descs.push(BlockDescriptor {
            length: 4096,
            flags: 0,
        }),
        Some(Misbehave::ZeroLengthExtent) => descs.insert(
            0,
            BlockDescriptor {
                length: 0,
                flags: 0,
            },
        ),
        Some(Misbehave::NoExtents) => {
            chunk(
                out,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_NONE,
                req.cookie,
                &[],
            );
            return;
        }
        _ => {}
    }
    if s.cfg.extra_context {
        let other = encode_block_status(
            99,
            &[BlockDescriptor {
                length: req.length,
                flags: 7,
            }],
        );
        chunk(out, 0, NBD_REPLY_TYPE_BLOCK_STATUS, req.cookie, &other);
    }
    let ours = encode_block_status(CONTEXT_ID, &descs);
    chunk(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        &ours,
    );
}
