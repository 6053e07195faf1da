//! The in-memory export of [`super::Server::memory`], with switches for
//! the behaviours and misbehaviours a client must handle, written with
//! [`Peer`]'s step functions.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::peer::{Export, Next, Peer};
use crate::wire::*;

/// What the in-memory export gets wrong on purpose, once: on the first
/// read (or block status request, for the block status ones, or write,
/// for [`Misbehave::HoleForWrite`]).
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

/// Switches of the in-memory export; the defaults are a modern,
/// well-behaved server.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Export name the server answers to.
    pub export: String,
    /// Offer structured replies.
    pub structured: bool,
    /// Offer extended headers (with structured replies).
    pub extended: bool,
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
            extended: false,
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

/// The context id the in-memory export gives `base:allocation`.
const CONTEXT_ID: u32 = 3;

/// How long the export waits for another request before sending the
/// replies it holds back (with `reorder`): a pause means the client is
/// waiting for them.
const REORDER_PAUSE: Duration = Duration::from_millis(50);

pub(super) struct Memory {
    cfg: FakeConfig,
    pub(super) data: Mutex<Vec<u8>>,
    pub(super) max_write: AtomicU64,
    misbehaved: AtomicUsize,
    pub(super) max_pending: AtomicUsize,
}

impl Memory {
    pub(super) fn new(cfg: FakeConfig, size: usize) -> Memory {
        Memory {
            cfg,
            data: Mutex::new(vec![0u8; size]),
            max_write: AtomicU64::new(0),
            misbehaved: AtomicUsize::new(0),
            max_pending: AtomicUsize::new(0),
        }
    }

    /// What the handshake advertises.
    fn export(&self) -> Export {
        let cfg = &self.cfg;
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
        Export {
            name: cfg.export.clone(),
            size: self.data.lock().unwrap().len() as u64,
            flags,
            structured: cfg.structured || cfg.extended,
            extended: cfg.extended,
            base_allocation: cfg.base_allocation.then_some(CONTEXT_ID),
            block_size: cfg.block_size,
        }
    }

    /// Claim the one misbehaviour, if it is one of `which` and still
    /// unclaimed.
    fn misbehave(&self, which: &[Misbehave]) -> Option<Misbehave> {
        let m = self.cfg.misbehave;
        if which.contains(&m) && self.misbehaved.fetch_add(1, Ordering::SeqCst) == 0 {
            Some(m)
        } else {
            None
        }
    }
}

/// One connection to the in-memory export.
pub(super) fn serve(m: &Memory, p: &mut Peer) -> io::Result<()> {
    if p.negotiate(&m.export())? {
        transmission(m, p)?;
    }
    Ok(())
}

fn transmission(m: &Memory, p: &mut Peer) -> io::Result<()> {
    let cfg = &m.cfg;
    let mut pending: Vec<Vec<u8>> = Vec::new();
    loop {
        let idle = (!pending.is_empty()).then_some(REORDER_PAUSE);
        let (req, payload) = match p.next_request(idle)? {
            Next::Request(r, payload) => (r, payload),
            Next::Idle => {
                for reply in pending.drain(..).rev() {
                    p.raw(&reply)?;
                }
                continue;
            }
            Next::Closed => return Ok(()),
        };
        let (off, len) = (req.offset, req.length as u64);
        let fails = cfg
            .fail_at
            .is_some_and(|f| off <= f && f < off + len.max(1));
        if req.command == NBD_CMD_DISC {
            for reply in pending.drain(..).rev() {
                p.raw(&reply)?;
            }
            return Ok(());
        }
        p.hold();
        match req.command {
            NBD_CMD_WRITE => {
                m.max_write.fetch_max(len, Ordering::SeqCst);
                if m.misbehave(&[Misbehave::HoleForWrite]).is_some() {
                    p.hole(req.cookie, NBD_REPLY_FLAG_DONE, off, req.length)?;
                } else {
                    let err = write(m, off, &payload, fails);
                    error_or_ok(m, p, &req, err)?;
                }
            }
            NBD_CMD_WRITE_ZEROES => {
                let err = if cfg.write_zeroes {
                    zero(m, off, len, fails)
                } else {
                    Some(NBD_EINVAL)
                };
                error_or_ok(m, p, &req, err)?;
            }
            NBD_CMD_TRIM | NBD_CMD_FLUSH | NBD_CMD_CACHE => {
                let err = if fails { Some(NBD_EIO) } else { None };
                error_or_ok(m, p, &req, err)?;
            }
            NBD_CMD_READ => {
                if !read(m, p, &req, fails)? {
                    return Ok(());
                }
            }
            NBD_CMD_BLOCK_STATUS => {
                let beyond = off + len > m.data.lock().unwrap().len() as u64;
                if p.context().is_none() || beyond {
                    error_or_ok(m, p, &req, Some(NBD_EINVAL))?;
                } else if cfg.fail_block_status {
                    p.error(
                        req.cookie,
                        NBD_REPLY_FLAG_DONE,
                        NBD_EIO,
                        "cannot tell",
                        None,
                    )?;
                } else {
                    block_status(m, p, &req)?;
                }
            }
            _ => error_or_ok(m, p, &req, Some(NBD_EINVAL))?,
        }
        let out = p.release();
        if cfg.reorder {
            pending.push(out);
            m.max_pending.fetch_max(pending.len(), Ordering::SeqCst);
        } else {
            p.raw(&out)?;
        }
    }
}

/// The reply to a request without data: `err`, or success.
fn error_or_ok(m: &Memory, p: &mut Peer, req: &Request, err: Option<u32>) -> io::Result<()> {
    let (off, len) = (req.offset, u64::from(req.length));
    // Report the injected fault where it is, else at the request start.
    let at = match m.cfg.fail_at {
        Some(f) if off <= f && f < off + len.max(1) => f,
        _ => off,
    };
    match err {
        Some(e) if p.structured() && !m.cfg.simple_errors => p.error(
            req.cookie,
            NBD_REPLY_FLAG_DONE,
            e,
            "injected failure",
            Some(at),
        ),
        Some(e) => p.simple_reply(req.cookie, e, &[]),
        None => p.simple_reply(req.cookie, 0, &[]),
    }
}

fn write(m: &Memory, off: u64, bytes: &[u8], fails: bool) -> Option<u32> {
    if fails {
        return Some(NBD_EIO);
    }
    if m.cfg.read_only {
        return Some(NBD_EPERM);
    }
    let mut d = m.data.lock().unwrap();
    let end = off as usize + bytes.len();
    if end > d.len() {
        return Some(NBD_ENOSPC);
    }
    d[off as usize..end].copy_from_slice(bytes);
    None
}

fn zero(m: &Memory, off: u64, len: u64, fails: bool) -> Option<u32> {
    if fails {
        return Some(NBD_EIO);
    }
    if m.cfg.read_only {
        return Some(NBD_EPERM);
    }
    let mut d = m.data.lock().unwrap();
    let end = (off + len) as usize;
    if end > d.len() {
        return Some(NBD_ENOSPC);
    }
    d[off as usize..end].fill(0);
    None
}

/// Answer a read (into the held replies); `false` when the peer hung up
/// on purpose ([`Misbehave::CloseMidReply`]).
fn read(m: &Memory, p: &mut Peer, req: &Request, fails: bool) -> io::Result<bool> {
    let cfg = &m.cfg;
    let (off, len) = (req.offset as usize, req.length as usize);
    let data = {
        let d = m.data.lock().unwrap();
        (off + len <= d.len()).then(|| d[off..off + len].to_vec())
    };
    let Some(data) = data else {
        error_or_ok(m, p, req, Some(NBD_EINVAL))?;
        return Ok(true);
    };
    if fails {
        error_or_ok(m, p, req, Some(NBD_EIO))?;
        return Ok(true);
    }
    if !p.structured() {
        p.simple_reply(req.cookie, 0, &data)?;
        return Ok(true);
    }
    let (cookie, at, done) = (req.cookie, req.offset, NBD_REPLY_FLAG_DONE);
    let bad = m.misbehave(&[
        Misbehave::ShortRead,
        Misbehave::UnknownCookie,
        Misbehave::ChunkOutside,
        Misbehave::BadMagic,
        Misbehave::Overlap,
        Misbehave::ZeroErrno,
        Misbehave::HugeChunk,
        Misbehave::CloseMidReply,
    ]);
    match bad {
        Some(Misbehave::ShortRead) => {
            return p.data(cookie, done, at, &data[..len / 2]).map(|_| true);
        }
        Some(Misbehave::UnknownCookie) => {
            return p.data(cookie + 1000, done, at, &data).map(|_| true);
        }
        Some(Misbehave::ChunkOutside) => return p.data(cookie, done, at + 1, &data).map(|_| true),
        Some(Misbehave::BadMagic) => {
            p.raw(&[0xde, 0xad, 0xbe, 0xef])?;
            p.raw(&[0u8; 16])?;
            return Ok(true);
        }
        Some(Misbehave::Overlap) => {
            p.data(cookie, 0, at, &data[..len / 2 + 1])?;
            p.data(cookie, done, at + len as u64 / 2, &data[len / 2..])?;
            return Ok(true);
        }
        Some(Misbehave::ZeroErrno) => return p.error(cookie, done, 0, "", None).map(|_| true),
        Some(Misbehave::HugeChunk) => {
            p.chunk_header(cookie, done, NBD_REPLY_TYPE_OFFSET_DATA, u32::MAX)?;
            return Ok(true);
        }
        Some(Misbehave::CloseMidReply) => {
            // Nothing is held for this request yet: build the whole
            // reply, and send half of it.
            p.data(cookie, done, at, &data)?;
            let mut partial = p.release();
            partial.truncate(partial.len() / 2);
            p.raw(&partial)?;
            p.shutdown()?;
            return Ok(false);
        }
        _ => {}
    }
    // Runs of 4 KiB blocks that are all zero or not, as chunks.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut a = 0;
    while a < len {
        let next = ((off + a) / 4096 + 1) * 4096 - off;
        let end = next.min(len);
        let zero = cfg.holes && data[a..end].iter().all(|&b| b == 0);
        match runs.last_mut() {
            Some(r) if r.2 == zero => r.1 = end,
            _ => runs.push((a, end, zero)),
        }
        a = end;
    }
    if cfg.reverse_chunks {
        runs.reverse();
    }
    for (a, e, zero) in runs {
        let at = req.offset + a as u64;
        if zero {
            p.hole(cookie, 0, at, (e - a) as u32)?;
        } else {
            p.data(cookie, 0, at, &data[a..e])?;
        }
    }
    p.done(cookie)?;
    Ok(true)
}

fn block_status(m: &Memory, p: &mut Peer, req: &Request) -> io::Result<()> {
    let mut descs: Vec<(u32, u32)> = Vec::new();
    {
        let d = m.data.lock().unwrap();
        let (off, len) = (req.offset as usize, req.length as usize);
        let end = (off + len).min(d.len());
        let mut at = off;
        while at < end {
            let next = ((at / 4096 + 1) * 4096).min(end);
            let flags = if d[at..next].iter().all(|&b| b == 0) {
                NBD_STATE_HOLE | NBD_STATE_ZERO
            } else {
                0
            };
            match descs.last_mut() {
                Some(l) if l.1 == flags => l.0 += (next - at) as u32,
                _ => descs.push(((next - at) as u32, flags)),
            }
            at = next;
        }
    }
    match m.misbehave(&[
        Misbehave::ExtentsBeyond,
        Misbehave::ZeroLengthExtent,
        Misbehave::NoExtents,
    ]) {
        Some(Misbehave::ExtentsBeyond) => descs.push((4096, 0)),
        Some(Misbehave::ZeroLengthExtent) => descs.insert(0, (0, 0)),
        Some(Misbehave::NoExtents) => return p.done(req.cookie),
        _ => {}
    }
    if m.cfg.extra_context {
        p.block_status_in(req.cookie, 0, 99, &[(req.length, 7)])?;
    }
    p.block_status(req.cookie, NBD_REPLY_FLAG_DONE, &descs)
}
