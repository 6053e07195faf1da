//! A blocking NBD client for one connection, with pipelining.
//!
//! A [`Client`] is driven by one thread. The batch calls
//! ([`Client::read_many`], [`Client::write_many`]) keep several requests in
//! flight: they send until a limit is reached, then read one reply, match it
//! to its request by cookie, and send more. Read data goes from the socket
//! straight into the caller's buffers; write payloads go from the caller's
//! buffers straight to the socket with vectored writes.
//!
//! Replies to reads are validated: every chunk must lie inside its request
//! and not overlap another, and a successful reply must cover the request
//! exactly. Anything else the server gets wrong (bad magic, unknown cookie,
//! malformed chunk) is a protocol error, and the connection is unusable
//! afterwards: later calls fail at once. Errors the server reports for a
//! request (an errno) leave the connection usable; the batch stops
//! sending, collects the replies still due and returns the first error.

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::handshake::{Handshake, Negotiated};
use super::round_trip::RoundTrip;
use super::splice::{MIN_SPLICE_PAYLOAD, SpliceError, SplicePipe};
use super::tls::TlsContext;
use super::transport::Transport;
use super::uri::NbdUri;
use super::wire::*;
use crate::block_size::BlockSize;
use crate::error::{Error, ErrorKind, Operation, Result};

/// How to connect.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Name used in error messages (the URI as the user typed it); the
    /// canonical URI if empty.
    pub name: String,
    /// Bound on connecting and on every socket read or write.
    pub timeout: Option<Duration>,
    /// TLS credentials made ready earlier, for a URI that requires TLS:
    /// share one between the connections to a server so that its files
    /// are read once. Unset, [`Client::connect`] makes one from the URI.
    pub tls: Option<Arc<TlsContext>>,
}

/// A read request the client can fill: an offset and a buffer. Implemented
/// for `(u64, &mut [u8])`; a program implements it for its own request
/// type, so that nothing needs converting (and allocating) per batch.
pub trait ReadRequest {
    /// Offset in the export.
    fn offset(&self) -> u64;
    /// Buffer to fill completely.
    fn buffer(&mut self) -> &mut [u8];
}

impl ReadRequest for (u64, &mut [u8]) {
    fn offset(&self) -> u64 {
        self.0
    }

    fn buffer(&mut self) -> &mut [u8] {
        self.1
    }
}

/// One write-side command for [`Client::write_many`]. Lengths may exceed
/// what one NBD request can carry: the client splits them.
#[derive(Clone, Copy, Debug)]
pub enum WriteCmd<'a> {
    /// `NBD_CMD_WRITE`.
    Write {
        /// Offset in the export.
        offset: u64,
        /// Bytes to write.
        data: &'a [u8],
        /// The payload may be lent to the kernel instead of copied (on a
        /// Unix socket, for 64 KiB or more). Then, after an I/O error, the
        /// server may still read `data` later: the caller must not put
        /// other bytes in that memory. With `false` the bytes are copied
        /// and the memory is free again when the call returns.
        lend: bool,
    },
    /// `NBD_CMD_WRITE_ZEROES`; on servers without it, zero bytes are
    /// written from a static buffer instead.
    WriteZeroes {
        /// Offset in the export.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// Keep the blocks allocated (`NBD_CMD_FLAG_NO_HOLE`).
        no_hole: bool,
        /// Fail with `ENOTSUP` unless faster than writing
        /// (`NBD_CMD_FLAG_FAST_ZERO`); an `Unsupported` error at once if
        /// the server cannot do this.
        fast_zero: bool,
    },
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Offset in the export.
        offset: u64,
        /// Length in bytes.
        length: u64,
    },
}

/// Buffer size for reply headers and small payloads; data beyond what one
/// fill happened to fetch is read straight into the caller's buffer.
const READ_BUFFER_SIZE: usize = 16 * 1024;

/// Zeroes written for servers without `NBD_CMD_WRITE_ZEROES`. A zeroed
/// static lives in .bss: it costs nothing until read, and reading it maps
/// the kernel's shared zero page, so no allocation of the zeroed length.
const ZERO_BUF_LEN: usize = 4 * 1024 * 1024;
static ZERO_BUF: [u8; ZERO_BUF_LEN] = [0; ZERO_BUF_LEN];

/// State of one request in flight. Slots are reused, so their coverage
/// vectors keep their capacity and the hot path does not allocate.
#[derive(Debug)]
struct Slot {
    busy: bool,
    cookie: u64,
    command: u16,
    op: Operation,
    offset: u64,
    /// The request's length, saturated to 32 bits (a payload's length
    /// always fits).
    length: u32,
    /// The request's whole length, beyond 32 bits only for a block status
    /// request with extended headers.
    effect: u64,
    /// The read window group this read belongs to ([`NO_GROUP`] outside
    /// [`Client::read_window`]).
    group: u64,
    /// Index of the caller's read request this fills.
    target: usize,
    /// Where this (possibly split) request starts in that buffer.
    buf_start: usize,
    /// Parts of a read covered so far, relative to `offset`, sorted and
    /// merged.
    covered: Vec<(u32, u32)>,
    /// A block status chunk for our context arrived.
    got_status: bool,
    /// Chunks that cover nothing (errors, other contexts' block status):
    /// bounded, or a server could send them for ever.
    idle_chunks: u32,
    error: Option<Error>,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            busy: false,
            cookie: 0,
            command: 0,
            op: Operation::Reply,
            offset: 0,
            length: 0,
            effect: 0,
            group: NO_GROUP,
            target: 0,
            buf_start: 0,
            covered: Vec::new(),
            got_status: false,
            idle_chunks: 0,
            error: None,
        }
    }
}

/// One NBD request carved out of a [`WriteCmd`].
struct SubRequest {
    op: Operation,
    command: u16,
    flags: u16,
    offset: u64,
    /// At most the payload limit for a write; beyond 32 bits only for a
    /// zero or trim with extended headers.
    length: u64,
    /// Where the payload starts in the command's data.
    data_at: usize,
}

impl SubRequest {
    fn new(
        op: Operation,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        data_at: usize,
    ) -> Self {
        SubRequest {
            op,
            command,
            flags,
            offset,
            length,
            data_at,
        }
    }
}

/// A request that got its final reply.
struct Completed {
    group: u64,
    error: Option<Error>,
}

/// The group of requests outside a read window.
const NO_GROUP: u64 = u64::MAX;

/// Where reply data goes: the caller's read buffers, found by the group
/// and index a request was sent with. `None` drops the data (reads of a
/// window being abandoned).
trait Targets {
    fn buffer(&mut self, group: u64, target: usize) -> Option<&mut [u8]>;
}

impl<R: ReadRequest> Targets for [R] {
    fn buffer(&mut self, _group: u64, target: usize) -> Option<&mut [u8]> {
        self.get_mut(target).map(|r| r.buffer())
    }
}

/// The buffers of a read window's groups, `first` being the id of
/// `groups[0]`.
struct WindowTargets<'a, 'b, R> {
    first: u64,
    groups: &'a mut [&'b mut [R]],
}

impl<R: ReadRequest> Targets for WindowTargets<'_, '_, R> {
    fn buffer(&mut self, group: u64, target: usize) -> Option<&mut [u8]> {
        let at = usize::try_from(group.checked_sub(self.first)?).ok()?;
        self.groups.get_mut(at)?.get_mut(target).map(|r| r.buffer())
    }
}

/// Data of abandoned reads, read off the socket and dropped.
struct Discard;

impl Targets for Discard {
    fn buffer(&mut self, _group: u64, _target: usize) -> Option<&mut [u8]> {
        None
    }
}

/// One group of a read window (see [`Client::read_window`]).
#[derive(Debug)]
struct WindowGroup {
    id: u64,
    /// The next request to send: read index, and bytes of it sent.
    next: (usize, usize),
    /// Every request of the group has been sent.
    sent: bool,
    /// Requests sent and not yet answered.
    outstanding: usize,
    error: Option<Error>,
}

/// Record `[start, end)` as covered; false if it overlaps something
/// already covered.
fn cover(ranges: &mut Vec<(u32, u32)>, start: u32, end: u32) -> bool {
    let i = ranges.partition_point(|r| r.0 < start);
    if i > 0 && ranges[i - 1].1 > start {
        return false;
    }
    if i < ranges.len() && ranges[i].0 < end {
        return false;
    }
    let joins_prev = i > 0 && ranges[i - 1].1 == start;
    let joins_next = i < ranges.len() && ranges[i].0 == end;
    match (joins_prev, joins_next) {
        (true, true) => {
            ranges[i - 1].1 = ranges[i].1;
            ranges.remove(i);
        }
        (true, false) => ranges[i - 1].1 = end,
        (false, true) => ranges[i].0 = start,
        (false, false) => ranges.insert(i, (start, end)),
    }
    true
}

/// Most chunks that cover nothing (error chunks, block status for other
/// contexts) one request may get: one per 512 bytes of the request, at
/// least 64. A server has no reason to send more than a few.
fn max_idle_chunks(length: u32) -> u32 {
    (length / 512).max(64)
}

/// Whether a connection lends write payloads to the kernel.
#[derive(Debug)]
enum Splicing {
    /// Not decided: no large write yet.
    NotYet,
    /// Lending through this pipe.
    On(SplicePipe),
    /// Copying (TCP, or the kernel refused).
    Off,
}

/// Breaks a [`Client`]'s connection off from another thread
/// ([`Client::interrupter`]).
#[derive(Debug)]
pub struct Interrupter {
    /// A duplicate of the connection's socket: shutting it down shuts
    /// down the one socket both descriptors refer to.
    socket: Transport,
}

impl Interrupter {
    /// Shut the connection down in both directions. Calls blocked on it
    /// return with an error, and so does every later one; the server sees
    /// the connection end. Harmless on a connection already closed.
    pub fn interrupt(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

/// One NBD connection.
#[derive(Debug)]
pub struct Client {
    /// All reads go through this buffer; writes go to `reader.get_mut()`,
    /// past the buffer.
    reader: BufReader<Transport>,
    /// Lends large write payloads to a Unix socket instead of copying
    /// them (see [`super::splice`]); made on the first large write.
    splice: Splicing,
    name: String,
    neg: Negotiated,
    block: BlockSize,
    /// Largest read or write request sent: whole preferred blocks within
    /// the server's maximum payload size.
    max_request: u32,
    /// Largest zero or trim request sent. The specification bounds only
    /// payloads by the server's maximum, so requests without one may be as
    /// long as 32 bits hold: a 128 MiB hole is one request, not four of
    /// 32 MiB, as nbdcopy sends it. A server that refuses them gets
    /// [`Client::limit_requests_without_payload`].
    max_effect: u64,
    next_cookie: u64,
    /// Set once the connection can no longer be trusted.
    dead: Option<(ErrorKind, String)>,
    slots: Vec<Slot>,
    in_flight: usize,
    /// The server said ESHUTDOWN: disconnect once the replies are in.
    shutting_down: bool,
    /// Extents of the block status request in flight.
    extents: Vec<(u64, u32)>,
    /// Buffer for error chunk payloads and skipped block status chunks.
    scratch: Vec<u8>,
    /// A payload still in flight was lent to the kernel, not copied: the
    /// server may not have read it yet.
    lent: bool,
    /// Write payload bytes sent and not yet answered, including writes
    /// [`Client::send_writes`] left in flight.
    write_bytes_in_flight: u64,
    /// How long the server takes to answer reads (see
    /// [`Client::read_latency`]).
    round_trips: RoundTrip,
    /// How long it takes to answer writes, zeroes and trims (see
    /// [`Client::write_latency`]).
    write_round_trips: RoundTrip,
    /// Groups of reads sent by [`Client::read_window`] and not yet
    /// returned, oldest first.
    window: std::collections::VecDeque<WindowGroup>,
    /// Read bytes asked for and not yet answered.
    read_bytes_in_flight: u64,
    /// The group the next request is sent for.
    sending_group: u64,
}

impl Client {
    /// Connect to `uri` and negotiate.
    pub fn connect(uri: &NbdUri, opts: &ClientOptions) -> Result<Client> {
        let name = if opts.name.is_empty() {
            uri.to_string()
        } else {
            opts.name.clone()
        };
        let tls = match (&uri.tls, &opts.tls) {
            (None, _) => None,
            (Some(_), Some(ctx)) => Some(Arc::clone(ctx)),
            (Some(_), None) => Some(Arc::new(TlsContext::new(uri)?)),
        };
        let transport =
            Transport::connect(uri, opts.timeout).map_err(|e| Error::io(Operation::Connect, e))?;
        Client::handshake_with(transport, uri.export(), &name, tls.as_deref())
    }

    /// Negotiate `export` on an already connected transport (a socketpair
    /// with a server subprocess, or a test peer).
    pub fn handshake(transport: Transport, export: &str, name: &str) -> Result<Client> {
        Client::handshake_with(transport, export, name, None)
    }

    /// [`Client::handshake`], with TLS if `tls` is given: `NBD_OPT_STARTTLS`
    /// first, then the TLS handshake, then every other option and all of
    /// transmission inside TLS.
    pub fn handshake_with(
        transport: Transport,
        export: &str,
        name: &str,
        tls: Option<&TlsContext>,
    ) -> Result<Client> {
        let mut transport = transport;
        let mut h = Handshake::new(export, name);
        h.greeting(&mut transport)?;
        if let Some(ctx) = tls {
            h.start_tls(&mut transport)?;
            transport = ctx.handshake(transport, name)?;
        }
        let neg = h.finish(&mut transport)?;
        Ok(Client::new(transport, neg, name))
    }

    fn new(transport: Transport, neg: Negotiated, name: &str) -> Client {
        /// Longest zero or trim request: what the length field holds
        /// (with extended headers, the largest signed 64-bit value, as
        /// servers keep lengths in signed types), in whole minimum blocks.
        fn max_effect(extended: bool, minimum: u32) -> u64 {
            let field = if extended {
                i64::MAX as u64
            } else {
                u64::from(u32::MAX)
            };
            field - field % u64::from(minimum)
        }
        let given = neg.block_size.unwrap_or_default();
        let minimum = given.minimum.max(1);
        let mut maximum = given.maximum.min(MAX_REQUEST_SIZE);
        maximum -= maximum % minimum;
        // Prefer requests that are whole preferred blocks.
        let max_request = if maximum >= given.preferred && given.preferred > 0 {
            maximum - maximum % given.preferred
        } else {
            maximum
        };
        Client {
            reader: BufReader::with_capacity(READ_BUFFER_SIZE, transport),
            splice: Splicing::NotYet,
            name: name.to_string(),
            block: BlockSize {
                minimum,
                preferred: given.preferred,
                maximum,
            },
            max_request,
            max_effect: max_effect(neg.extended_headers, minimum),
            neg,
            next_cookie: 1,
            dead: None,
            slots: Vec::new(),
            in_flight: 0,
            shutting_down: false,
            extents: Vec::new(),
            scratch: Vec::new(),
            lent: false,
            write_bytes_in_flight: 0,
            round_trips: RoundTrip::default(),
            write_round_trips: RoundTrip::default(),
            window: std::collections::VecDeque::new(),
            read_bytes_in_flight: 0,
            sending_group: NO_GROUP,
        }
    }

    /// Name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Largest read or write request this client sends.
    pub fn max_payload(&self) -> u32 {
        self.max_request
    }

    /// Largest zero or trim request this client sends: 32 bits' worth,
    /// or far more with extended headers.
    pub fn max_request_without_payload(&self) -> u64 {
        self.max_effect
    }

    /// Bound zero and trim requests by the server's maximum payload size
    /// too, for a server that refuses longer ones (with `EINVAL` or
    /// `EOVERFLOW`, as the specification allows).
    pub fn limit_requests_without_payload(&mut self) {
        self.max_effect = self.max_request.into();
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.neg.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.neg.flags
    }

    /// What the handshake settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Block size constraints: the server's, or 1 / 4096 / 32 MiB; the
    /// maximum is never above 32 MiB.
    pub fn block_size(&self) -> BlockSize {
        self.block
    }

    fn has(&self, flag: u16) -> bool {
        self.neg.flags & flag != 0
    }

    /// `NBD_CMD_FLUSH` is supported.
    pub fn can_flush(&self) -> bool {
        self.has(NBD_FLAG_SEND_FLUSH)
    }

    /// `NBD_CMD_TRIM` is supported.
    pub fn can_trim(&self) -> bool {
        self.has(NBD_FLAG_SEND_TRIM)
    }

    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub fn can_zero(&self) -> bool {
        self.has(NBD_FLAG_SEND_WRITE_ZEROES)
    }

    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub fn can_fast_zero(&self) -> bool {
        self.can_zero() && self.has(NBD_FLAG_SEND_FAST_ZERO)
    }

    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.has(NBD_FLAG_READ_ONLY)
    }

    /// The connection crosses a network (TCP, vsock or ssh, not a local
    /// Unix socket), with or without TLS.
    pub fn is_tcp(&self) -> bool {
        self.reader.get_ref().is_tcp()
    }

    /// How long this server takes to answer a read: the shortest of the
    /// waits for a first reply after reads were sent on an idle
    /// connection (network round trip plus the server's own time; other
    /// requests are not counted, as a server may answer block status from
    /// metadata in microseconds and reads from a disk in milliseconds).
    /// `None` until a read was answered. A copier sizes the reads it
    /// keeps in flight by it.
    pub fn read_latency(&self) -> Option<Duration> {
        self.round_trips.estimate()
    }

    /// Share latency estimates with `other`, a connection to the same
    /// server: what either has seen counts for both from now on (a
    /// connection that met the server busy would otherwise keep a
    /// latency it does not have).
    pub fn share_latencies_with(&mut self, other: &Client) {
        self.round_trips.share_with(&other.round_trips);
        self.write_round_trips.share_with(&other.write_round_trips);
    }

    /// [`Client::read_latency`] for writes, zeroes and trims: the wait
    /// for the first reply once their payloads are sent.
    pub fn write_latency(&self) -> Option<Duration> {
        self.write_round_trips.estimate()
    }

    /// How many samples [`Client::write_latency`] rests on, this
    /// connection's and those of the connections it shares them with.
    pub fn write_latency_samples(&self) -> u64 {
        self.write_round_trips.samples()
    }

    /// The connection runs inside TLS.
    pub fn is_tls(&self) -> bool {
        self.reader.get_ref().is_tls()
    }

    /// What TLS negotiated (version and cipher suite), if it is on.
    pub fn tls_description(&self) -> Option<String> {
        self.reader.get_ref().tls_description()
    }

    /// Several connections see one another's writes after a flush.
    pub fn multi_conn(&self) -> bool {
        self.has(NBD_FLAG_CAN_MULTI_CONN)
    }

    /// `base:allocation` was negotiated: [`Client::block_status`] works.
    pub fn has_base_allocation(&self) -> bool {
        self.neg.base_allocation.is_some()
    }

    /// Change how long a read or write on the socket may block
    /// (`None`: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.reader
            .get_ref()
            .set_timeout(timeout)
            .map_err(|e| Error::io(Operation::SetTimeout, e))
    }

    /// A handle another thread can use to break this connection off, so
    /// that a call blocked on a server that stopped answering returns at
    /// once (with an I/O error) instead of waiting for a timeout.
    pub fn interrupter(&self) -> Result<Interrupter> {
        let socket = self
            .reader
            .get_ref()
            .try_clone()
            .map_err(|e| Error::io(Operation::Connect, e))?;
        Ok(Interrupter { socket })
    }

    /// Whether an earlier error left the connection unusable.
    pub fn is_dead(&self) -> bool {
        self.dead.is_some()
    }

    // -- errors -------------------------------------------------------------

    fn error(&self, kind: ErrorKind, op: Operation, msg: impl Into<String>) -> Error {
        Error::new(kind, msg).during(op)
    }

    fn check_alive(&self, op: Operation) -> Result<()> {
        match &self.dead {
            None => Ok(()),
            Some((kind, msg)) => Err(self.error(
                *kind,
                op,
                format!("connection unusable after an earlier error: {msg}"),
            )),
        }
    }

    /// Mark the connection dead after a transport or protocol error, and
    /// hang up: after a framing error nothing more can be read safely.
    fn kill(&mut self, e: Error) -> Error {
        if self.dead.is_none() {
            self.dead = Some((e.kind(), e.to_string()));
            let _ = self.reader.get_ref().shutdown(Shutdown::Both);
        }
        for s in &mut self.slots {
            s.busy = false;
            s.error = None;
        }
        self.in_flight = 0;
        self.write_bytes_in_flight = 0;
        self.read_bytes_in_flight = 0;
        self.window.clear();
        self.lent = false;
        e
    }

    fn protocol(&mut self, op: Operation, msg: impl Into<String>) -> Error {
        let e = self.error(ErrorKind::Protocol, op, msg);
        self.kill(e)
    }

    fn io_error(&mut self, op: Operation, e: io::Error) -> Error {
        let e = if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection")
        } else {
            e
        };
        // Waiting for a reply, the request that waited longest is the one
        // the user needs to hear about (offset and length included).
        let oldest = if op == Operation::Reply {
            self.slots
                .iter()
                .filter(|s| s.busy)
                .min_by_key(|s| s.cookie)
                .map(|s| (s.op, s.offset, s.effect))
        } else {
            None
        };
        let e = match oldest {
            Some((op, offset, length)) => Error::io(op, e).at(offset, length),
            None => Error::io(op, e),
        };
        self.kill(e)
    }

    // -- sending ------------------------------------------------------------

    /// The pipe to lend a payload of `len` bytes through, if it is worth
    /// it: on Unix sockets, where it saves the copy into the socket. On
    /// TCP lent pages measured slower (nbdkit memory to memory over
    /// loopback, 2 GiB: 1.91 s and 1.41 s of CPU against 1.59 s and
    /// 1.08 s copied), as the stack then handles many small fragments.
    /// Under TLS nothing can be lent: the socket carries ciphertext.
    fn splice_pipe(&mut self, len: usize) -> bool {
        if len < MIN_SPLICE_PAYLOAD {
            return false;
        }
        if let Splicing::NotYet = self.splice {
            self.splice = match self.reader.get_ref() {
                Transport::Unix(_) => match SplicePipe::new() {
                    Ok(pipe) => Splicing::On(pipe),
                    Err(e) => {
                        log::debug!("{}: no pipe to lend payloads through: {e}", self.name);
                        Splicing::Off
                    }
                },
                _ => Splicing::Off,
            };
        }
        matches!(self.splice, Splicing::On(_))
    }

    /// Put a request header and its payload on the socket.
    fn send_bytes(&mut self, header: &[u8], payload: &[u8], may_lend: bool) -> io::Result<()> {
        let lend = may_lend && self.splice_pipe(payload.len());
        let socket = self.reader.get_mut();
        let pipe = match &self.splice {
            Splicing::On(pipe) if lend => pipe,
            _ => {
                let mut slices = [IoSlice::new(header), IoSlice::new(payload)];
                return socket.send_message(&mut slices);
            }
        };
        self.lent = true;
        socket.write_all(header)?;
        match pipe.send(socket.as_raw_fd(), payload) {
            Ok(()) => Ok(()),
            Err(SpliceError::Failed(e)) => Err(e),
            Err(SpliceError::Unavailable(e)) => {
                log::debug!("{}: not lending payloads: {e}", self.name);
                self.splice = Splicing::Off;
                socket.write_all(payload)
            }
        }
    }

    fn free_slot(&mut self) -> usize {
        match self.slots.iter().position(|s| !s.busy) {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        }
    }

    /// The request header as negotiated: compact, or extended (32 bytes,
    /// 64-bit length) after `NBD_OPT_EXTENDED_HEADERS`.
    fn encode_request(&self, r: &Request) -> ([u8; EXTENDED_REQUEST_HEADER_LEN], usize) {
        self.encode_wide_request(r, r.length.into())
    }

    /// [`Client::encode_request`] with a length of up to 64 bits, which
    /// only an extended header carries (the caller sees to that).
    fn encode_wide_request(
        &self,
        r: &Request,
        length: u64,
    ) -> ([u8; EXTENDED_REQUEST_HEADER_LEN], usize) {
        if self.neg.extended_headers {
            let b = encode_extended_request(r.flags, r.command, r.cookie, r.offset, length);
            (b, EXTENDED_REQUEST_HEADER_LEN)
        } else {
            let mut b = [0u8; EXTENDED_REQUEST_HEADER_LEN];
            b[..REQUEST_HEADER_LEN].copy_from_slice(&r.encode());
            (b, REQUEST_HEADER_LEN)
        }
    }

    /// Send one request (and its payload) and record it in flight.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        op: Operation,
        command: u16,
        flags: u16,
        offset: u64,
        effect: u64,
        payload: &[u8],
        lend: bool,
        target: usize,
        buf_start: usize,
    ) -> Result<()> {
        let length = u32::try_from(effect).unwrap_or(u32::MAX);
        if u64::from(length) != effect && !self.neg.extended_headers {
            return Err(self.error(
                ErrorKind::InvalidInput,
                op,
                "internal error: request longer than 32 bits without extended headers",
            ));
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let (header, hlen) = self.encode_wide_request(&r, effect);
        if let Err(e) = self.send_bytes(&header[..hlen], payload, lend) {
            return Err(self.io_error(op, e));
        }
        match command {
            NBD_CMD_READ => self.round_trips.sent(self.in_flight, Instant::now()),
            NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES | NBD_CMD_TRIM => {
                self.write_round_trips.sent(self.in_flight, Instant::now());
            }
            _ => {}
        }
        let i = self.free_slot();
        let s = &mut self.slots[i];
        s.busy = true;
        s.cookie = cookie;
        s.command = command;
        s.op = op;
        s.offset = offset;
        s.length = length;
        s.effect = effect;
        s.group = self.sending_group;
        s.target = target;
        s.buf_start = buf_start;
        s.covered.clear();
        s.got_status = false;
        s.idle_chunks = 0;
        s.error = None;
        self.in_flight += 1;
        if command == NBD_CMD_READ {
            self.read_bytes_in_flight += u64::from(length);
        }
        Ok(())
    }

    // -- receiving ----------------------------------------------------------

    fn read_exact(&mut self, op: Operation, buf: &mut [u8]) -> Result<()> {
        match self.reader.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_error(op, e)),
        }
    }

    /// Read a payload into `dst`: whatever the buffer already holds is
    /// copied, the rest comes straight from the socket.
    fn read_payload(reader: &mut BufReader<Transport>, dst: &mut [u8]) -> io::Result<()> {
        let buffered = reader.buffer();
        let n = buffered.len().min(dst.len());
        dst[..n].copy_from_slice(&buffered[..n]);
        reader.consume(n);
        if n < dst.len() {
            // The buffer is empty now, so reading past it keeps the order.
            reader.get_mut().read_exact(&mut dst[n..])?;
        }
        Ok(())
    }

    /// The data of a read whose buffer is gone: dropped if the read was
    /// abandoned with its window; anything else is a bug.
    fn drop_payload(&mut self, op: Operation, group: u64, n: usize) -> Result<()> {
        if group == NO_GROUP {
            return Err(self.protocol(op, "internal error: read target missing"));
        }
        self.skip(op, n)
    }

    /// Read and drop `n` bytes (a chunk for a context we did not ask for).
    fn skip(&mut self, op: Operation, mut n: usize) -> Result<()> {
        let mut tmp = std::mem::take(&mut self.scratch);
        tmp.resize(tmp.len().max(64 * 1024), 0);
        let mut r = Ok(());
        while n > 0 {
            let k = n.min(tmp.len());
            if let Err(e) = self.read_exact(op, &mut tmp[..k]) {
                r = Err(e);
                break;
            }
            n -= k;
        }
        self.scratch = tmp;
        r
    }

    fn find_slot(&mut self, cookie: u64) -> Result<usize> {
        match self.slots.iter().position(|s| s.busy && s.cookie == cookie) {
            Some(i) => Ok(i),
            None => Err(self.protocol(
                Operation::Reply,
                format!("server sent a reply with unknown cookie {cookie}"),
            )),
        }
    }

    fn server_error(&self, si: usize, errno: u32, said: &str, at: Option<u64>) -> Error {
        let s = &self.slots[si];
        let mut msg = errno_message(errno).to_string();
        if let Some(at) = at {
            msg.push_str(&format!(" at offset {at}"));
        }
        let said = said.trim();
        if !said.is_empty() {
            msg.push_str(&format!(" (server said: {said})"));
        }
        let e = Error::server(s.op, errno, msg);
        // A flush has no range: "flush at offset 0 length 0" would mislead.
        if s.command == NBD_CMD_FLUSH {
            e
        } else {
            e.at(s.offset, s.effect)
        }
    }

    /// Remember the first error of a request.
    fn set_error(&mut self, si: usize, errno: u32, e: Error) {
        if errno == NBD_ESHUTDOWN {
            self.shutting_down = true;
        }
        let s = &mut self.slots[si];
        if s.error.is_none() {
            s.error = Some(e);
        }
    }

    /// Retire slot `si` after its final reply, checking that a successful
    /// reply said everything it had to.
    fn complete(&mut self, si: usize) -> Result<Completed> {
        let s = &mut self.slots[si];
        s.busy = false;
        self.in_flight -= 1;
        if self.in_flight == 0 {
            self.lent = false;
        }
        let error = s.error.take();
        let (op, length, command, group) = (s.op, s.length, s.command, s.group);
        if command == NBD_CMD_WRITE {
            self.write_bytes_in_flight =
                self.write_bytes_in_flight.saturating_sub(u64::from(length));
        }
        if command == NBD_CMD_READ {
            self.read_bytes_in_flight = self.read_bytes_in_flight.saturating_sub(u64::from(length));
        }
        if error.is_none() {
            if command == NBD_CMD_READ && s.covered.as_slice() != [(0, length)] {
                let got: u64 = s.covered.iter().map(|&(a, b)| u64::from(b - a)).sum();
                let (o, l) = (s.offset, s.length);
                let e = self
                    .error(
                        ErrorKind::Protocol,
                        op,
                        format!("server sent a short read reply ({got} of {length} bytes)"),
                    )
                    .at(o, l.into());
                return Err(self.kill(e));
            }
            if command == NBD_CMD_BLOCK_STATUS && !s.got_status {
                return Err(self.protocol(op, "server sent no extents for base:allocation"));
            }
        }
        Ok(Completed { group, error })
    }

    /// Read one reply message (a simple reply or one chunk) and act on it.
    /// Returns the request it completed, if any. Server errors are kept in
    /// the `Completed`; an `Err` means the connection is dead.
    fn receive<T: Targets + ?Sized>(&mut self, reads: &mut T) -> Result<Option<Completed>> {
        let mut h = [0u8; MAX_REPLY_HEADER_LEN];
        self.read_exact(Operation::Reply, &mut h[..4])?;
        let now = Instant::now();
        self.round_trips.answered(now);
        self.write_round_trips.answered(now);
        let hlen = match reply_header_len(&h[..4]) {
            Ok(n) => n,
            Err(e) => return Err(self.protocol(Operation::Reply, e.to_string())),
        };
        // Extended headers replace both other kinds of reply, and only
        // they may use the extended magic.
        if self.neg.extended_headers != (hlen == EXTENDED_REPLY_HEADER_LEN) {
            let msg = if self.neg.extended_headers {
                "server sent a compact reply header after negotiating extended headers"
            } else {
                "server sent an extended reply header without negotiating extended headers"
            };
            return Err(self.protocol(Operation::Reply, msg));
        }
        self.read_exact(Operation::Reply, &mut h[4..hlen])?;
        if hlen == EXTENDED_REPLY_HEADER_LEN {
            let c = match ExtendedChunkHeader::decode(&h[..hlen]) {
                Ok(c) => c.chunk(),
                Err(e) => return Err(self.protocol(Operation::Reply, e.to_string())),
            };
            let si = self.find_slot(c.cookie)?;
            self.chunk(si, &c, reads)?;
            return if c.is_done() {
                self.complete(si).map(Some)
            } else {
                Ok(None)
            };
        }
        if hlen == SIMPLE_REPLY_LEN {
            let r = match SimpleReply::decode(&h[..hlen]) {
                Ok(r) => r,
                Err(e) => return Err(self.protocol(Operation::Reply, e.to_string())),
            };
            let si = self.find_slot(r.cookie)?;
            return self.simple_reply(si, r, reads).map(Some);
        }
        let c = match ChunkHeader::decode(&h[..hlen]) {
            Ok(c) => c,
            Err(e) => return Err(self.protocol(Operation::Reply, e.to_string())),
        };
        if !self.neg.structured_replies {
            return Err(self.protocol(
                Operation::Reply,
                "server sent a structured reply without negotiating them",
            ));
        }
        let si = self.find_slot(c.cookie)?;
        self.chunk(si, &c, reads)?;
        if c.is_done() {
            self.complete(si).map(Some)
        } else {
            Ok(None)
        }
    }

    fn simple_reply<T: Targets + ?Sized>(
        &mut self,
        si: usize,
        r: SimpleReply,
        reads: &mut T,
    ) -> Result<Completed> {
        let s = &self.slots[si];
        let (op, command, length, group, target, start) =
            (s.op, s.command, s.length, s.group, s.target, s.buf_start);
        if r.error != 0 {
            // No payload follows an error, even for a read.
            let e = self.server_error(si, r.error, "", None);
            self.set_error(si, r.error, e);
        } else if command == NBD_CMD_READ {
            match reads.buffer(group, target) {
                Some(buf) => {
                    let dst = &mut buf[start..start + length as usize];
                    if let Err(e) = Self::read_payload(&mut self.reader, dst) {
                        return Err(self.io_error(op, e));
                    }
                }
                None => self.drop_payload(op, group, length as usize)?,
            }
            let s = &mut self.slots[si];
            s.covered.clear();
            s.covered.push((0, length));
        } else if command == NBD_CMD_BLOCK_STATUS {
            return Err(self.protocol(op, "server answered block status with a simple reply"));
        }
        self.complete(si)
    }

    /// Check that `[offset, offset + len)` lies inside the request in slot
    /// `si` and does not overlap earlier chunks; returns its position
    /// relative to the request.
    fn place(&mut self, si: usize, what: &str, offset: u64, len: u32) -> Result<u32> {
        let s = &mut self.slots[si];
        let rel = offset.checked_sub(s.offset).and_then(|rel| {
            let end = rel.checked_add(len.into())?;
            (end <= u64::from(s.length)).then_some(rel as u32)
        });
        let Some(rel) = rel else {
            let msg = format!(
                "server sent {what} chunk at offset {offset} length {len} outside the request (offset {} length {})",
                s.offset, s.length
            );
            let op = s.op;
            return Err(self.protocol(op, msg));
        };
        if !cover(&mut s.covered, rel, rel + len) {
            let op = s.op;
            return Err(self.protocol(
                op,
                format!("server sent overlapping {what} chunk at offset {offset} length {len}"),
            ));
        }
        Ok(rel)
    }

    fn chunk<T: Targets + ?Sized>(
        &mut self,
        si: usize,
        c: &ChunkHeader,
        reads: &mut T,
    ) -> Result<()> {
        let s = &mut self.slots[si];
        let (op, command, group, target, start) = (s.op, s.command, s.group, s.target, s.buf_start);
        // Data and hole chunks may not overlap, so there can only be so
        // many; the others are counted and bounded here.
        let covers = matches!(
            c.chunk_type,
            NBD_REPLY_TYPE_OFFSET_DATA | NBD_REPLY_TYPE_OFFSET_HOLE
        );
        if !covers {
            s.idle_chunks += 1;
            if s.idle_chunks > max_idle_chunks(s.length) {
                return Err(self.protocol(
                    op,
                    format!(
                        "server sent more than {} error or unrequested chunks for one request",
                        max_idle_chunks(self.slots[si].length)
                    ),
                ));
            }
        }
        match c.chunk_type {
            NBD_REPLY_TYPE_NONE => {
                if !c.is_done() {
                    return Err(self.protocol(op, "server sent a NONE chunk without the DONE flag"));
                }
            }
            NBD_REPLY_TYPE_OFFSET_DATA | NBD_REPLY_TYPE_OFFSET_HOLE if command != NBD_CMD_READ => {
                return Err(self.protocol(
                    op,
                    format!(
                        "server sent a read chunk in reply to {}",
                        command_name(command)
                    ),
                ));
            }
            NBD_REPLY_TYPE_OFFSET_DATA => {
                let mut b = [0u8; 8];
                self.read_exact(op, &mut b)?;
                let offset =
                    decode_offset_data_prefix(&b).map_err(|e| self.protocol(op, e.to_string()))?;
                // The header decoder bounded length to 9..=32 MiB + 8.
                let len = c.length - 8;
                let rel = self.place(si, "data", offset, len)?;
                match reads.buffer(group, target) {
                    Some(buf) => {
                        let from = start + rel as usize;
                        let dst = &mut buf[from..from + len as usize];
                        if let Err(e) = Self::read_payload(&mut self.reader, dst) {
                            return Err(self.io_error(op, e));
                        }
                    }
                    None => self.drop_payload(op, group, len as usize)?,
                }
            }
            NBD_REPLY_TYPE_OFFSET_HOLE => {
                let mut b = [0u8; 12];
                self.read_exact(op, &mut b)?;
                let hole = OffsetHole::decode(&b).map_err(|e| self.protocol(op, e.to_string()))?;
                let rel = self.place(si, "hole", hole.offset, hole.length)?;
                match reads.buffer(group, target) {
                    Some(buf) => {
                        let from = start + rel as usize;
                        buf[from..from + hole.length as usize].fill(0);
                    }
                    None => self.drop_payload(op, group, 0)?,
                }
            }
            NBD_REPLY_TYPE_BLOCK_STATUS | NBD_REPLY_TYPE_BLOCK_STATUS_EXT => {
                if command != NBD_CMD_BLOCK_STATUS {
                    return Err(self.protocol(
                        op,
                        format!(
                            "server sent block status in reply to {}",
                            command_name(command)
                        ),
                    ));
                }
                // The extended header decoder is the only one to let the
                // extended type through.
                if c.chunk_type == NBD_REPLY_TYPE_BLOCK_STATUS {
                    self.block_status_chunk(si, c.length)?;
                } else {
                    self.block_status_ext_chunk(si, c.length)?;
                }
            }
            t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 => self.error_chunk(si, t, c.length)?,
            t => {
                // The header decoder refuses unknown non-error types, but
                // be safe should that change.
                return Err(self.protocol(op, format!("server sent unknown chunk type {t}")));
            }
        }
        Ok(())
    }

    /// An error chunk for the request in slot `si`: remembered as the
    /// request's outcome, the connection staying usable.
    fn error_chunk(&mut self, si: usize, t: u16, length: u32) -> Result<()> {
        let op = self.slots[si].op;
        // Bounded to MAX_ERROR_PAYLOAD by the header decoder.
        let mut payload = std::mem::take(&mut self.scratch);
        payload.resize(length as usize, 0);
        let r = self.read_exact(op, &mut payload);
        let decoded = r.map(|()| ErrorChunk::decode(t, &payload));
        self.scratch = payload;
        let ec = match decoded? {
            Ok(ec) => ec,
            Err(e) => return Err(self.protocol(op, e.to_string())),
        };
        if let Some(at) = ec.offset {
            let s = &self.slots[si];
            if at < s.offset || at - s.offset >= s.effect {
                let msg = format!(
                    "server reported an error at offset {at}, outside the request (offset {} length {})",
                    s.offset, s.effect
                );
                return Err(self.protocol(op, msg));
            }
        }
        let mut msg = ec.message;
        if t != NBD_REPLY_TYPE_ERROR && t != NBD_REPLY_TYPE_ERROR_OFFSET {
            msg = format!("unknown error chunk type {t:#x}; {msg}");
        }
        let e = self.server_error(si, ec.error, &msg, ec.offset);
        self.set_error(si, ec.error, e);
        Ok(())
    }

    /// Decode a block status chunk piece by piece, so a long one is never
    /// buffered whole; extents past the end of the request are an error,
    /// and the last one is clipped to it.
    fn block_status_chunk(&mut self, si: usize, length: u32) -> Result<()> {
        let op = self.slots[si].op;
        let mut idb = [0u8; 4];
        self.read_exact(op, &mut idb)?;
        let id = u32::from_be_bytes(idb);
        let remaining = (length - 4) as usize;
        self.base_allocation_extents(si, id, remaining, BLOCK_DESCRIPTOR_LEN, |d| {
            BlockDescriptor::decode(d).map(|d| (u64::from(d.length), d.flags))
        })
    }

    /// [`Client::block_status_chunk`] for `BLOCK_STATUS_EXT`: 64-bit
    /// extent lengths and flags, of which `base:allocation` uses the low
    /// 32 bits.
    fn block_status_ext_chunk(&mut self, si: usize, length: u32) -> Result<()> {
        let op = self.slots[si].op;
        let mut pre = [0u8; 8];
        self.read_exact(op, &mut pre)?;
        let (id, _count) = match decode_block_status_ext_prefix(&pre, length) {
            Ok(p) => p,
            Err(e) => return Err(self.protocol(op, e.to_string())),
        };
        // Bounded to MAX_BLOCK_STATUS_EXT_PAYLOAD by the header decoder.
        let remaining = (length - 8) as usize;
        self.base_allocation_extents(si, id, remaining, EXTENDED_BLOCK_DESCRIPTOR_LEN, |d| {
            ExtendedBlockDescriptor::decode(d).map(|d| (d.length, d.flags as u32))
        })
    }

    /// The descriptors of a block status chunk for context `id`, after its
    /// prefix: `remaining` bytes of `descriptor_len`-byte descriptors that
    /// `decode` turns into (length, flags). Other contexts are skipped.
    fn base_allocation_extents(
        &mut self,
        si: usize,
        id: u32,
        mut remaining: usize,
        descriptor_len: usize,
        decode: impl Fn(&[u8]) -> WireResult<(u64, u32)>,
    ) -> Result<()> {
        let op = self.slots[si].op;
        if Some(id) != self.neg.base_allocation {
            return self.skip(op, remaining);
        }
        if self.slots[si].got_status {
            return Err(self.protocol(
                op,
                "server sent two block status chunks for base:allocation",
            ));
        }
        self.slots[si].got_status = true;
        let req_len = self.slots[si].effect;
        self.extents.clear();
        let mut total = 0u64;
        // 512 compact or 256 extended descriptors a read.
        let mut buf = [0u8; 4096];
        while remaining > 0 {
            let k = remaining.min(buf.len());
            self.read_exact(op, &mut buf[..k])?;
            remaining -= k;
            for d in buf[..k].chunks_exact(descriptor_len) {
                let (length, flags) = match decode(d) {
                    Ok(d) => d,
                    Err(e) => return Err(self.protocol(op, e.to_string())),
                };
                if total >= req_len {
                    return Err(self.protocol(
                        op,
                        "server sent extents beyond the end of the block status request",
                    ));
                }
                self.extents.push((length.min(req_len - total), flags));
                total = total.saturating_add(length);
            }
        }
        Ok(())
    }

    /// After a batch: the server asked us to go away (ESHUTDOWN), so do so
    /// politely now that nothing is in flight.
    fn after_batch(&mut self) {
        if self.shutting_down && self.in_flight == 0 && self.dead.is_none() {
            let _ = self.disconnect();
        }
    }

    // -- public operations --------------------------------------------------

    /// Fill every buffer in `reqs` from its offset, keeping at most
    /// `max_in_flight` requests and `max_bytes_in_flight` bytes in flight
    /// (at least one request is always allowed). Buffers longer than the
    /// maximum request size are split. On a server error the remaining
    /// requests are not sent; the first error is returned once the
    /// replies still due have arrived.
    pub fn read_many<R: ReadRequest>(
        &mut self,
        reqs: &mut [R],
        max_in_flight: usize,
        max_bytes_in_flight: usize,
    ) -> Result<()> {
        self.check_alive(Operation::Read)?;
        self.abandon_window()?;
        let max_in_flight = max_in_flight.max(1);
        let max_bytes = max_bytes_in_flight as u64;
        let mut first_error: Option<Error> = None;
        let mut next = (0usize, 0usize);
        loop {
            if first_error.is_none() {
                next = self
                    .send_reads(reqs, next, NO_GROUP, max_in_flight, max_bytes)?
                    .0;
            }
            if self.in_flight == 0 {
                break;
            }
            if let Some(done) = self.receive(reqs)? {
                if first_error.is_none() {
                    first_error = done.error;
                }
            }
        }
        self.after_batch();
        first_error.map_or(Ok(()), Err)
    }

    /// Fill the buffers of `groups[0]`, keeping reads of the later groups
    /// in flight meanwhile, so that the server is never idle between
    /// groups: the requests of every group are sent in order, with at most
    /// `max_in_flight` requests and `max_bytes_in_flight` bytes of reads
    /// in flight, and this returns once the first group is complete.
    ///
    /// `groups[i]` is group `first + i`. Reads of later groups may still
    /// be in flight on return; the next call must pass those groups again,
    /// with the same buffers and requests, starting with the group after
    /// the one completed (`first + 1`). Any other operation on this
    /// client ([`Client::abandon_window`]) abandons them: their data is
    /// read off the connection and dropped.
    ///
    /// A server error in a group is returned when that group comes first;
    /// from the error on, nothing more is sent, and before it is returned
    /// every reply still due is read and the window is emptied. An `Err`
    /// for a dead connection empties it too.
    pub fn read_window<R: ReadRequest>(
        &mut self,
        first: u64,
        groups: &mut [&mut [R]],
        max_in_flight: usize,
        max_bytes_in_flight: usize,
    ) -> Result<()> {
        self.check_alive(Operation::Read)?;
        if groups.is_empty() {
            return Ok(());
        }
        if self.window.front().is_some_and(|g| g.id != first) {
            // The caller lost track of what is in flight: start afresh.
            self.abandon_window()?;
        }
        let known = self.window.len();
        if known > groups.len() {
            return Err(self.error(
                ErrorKind::InvalidInput,
                Operation::Read,
                "internal error: read window groups missing",
            ));
        }
        for i in known..groups.len() {
            self.window.push_back(WindowGroup {
                id: first + i as u64,
                next: (0, 0),
                sent: false,
                outstanding: 0,
                error: None,
            });
        }
        let max_in_flight = max_in_flight.max(1);
        let max_bytes = max_bytes_in_flight as u64;
        let result = self.run_window(first, groups, max_in_flight, max_bytes);
        if result.is_err() {
            // A dead connection was cleared by `kill`; a server error
            // drains what is left.
            let _ = self.abandon_window();
        }
        result
    }

    fn run_window<R: ReadRequest>(
        &mut self,
        first: u64,
        groups: &mut [&mut [R]],
        max_in_flight: usize,
        max_bytes: u64,
    ) -> Result<()> {
        loop {
            self.send_window(groups, max_in_flight, max_bytes)?;
            let head = self.window.front().map(|g| {
                let finished = g.outstanding == 0 && (g.sent || g.error.is_some());
                (finished, g.error.is_some())
            });
            match head {
                Some((true, _)) => {
                    let done = self.window.pop_front();
                    return match done.and_then(|g| g.error) {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                Some((false, _)) if self.in_flight > 0 => {}
                // Nothing in flight and the first group unfinished: only
                // possible if nothing could be sent.
                _ => {
                    return Err(self.error(
                        ErrorKind::InvalidInput,
                        Operation::Read,
                        "internal error: read window stalled",
                    ));
                }
            }
            let mut targets = WindowTargets { first, groups };
            if let Some(done) = self.receive(&mut targets)? {
                if let Some(g) = self.window.iter_mut().find(|g| g.id == done.group) {
                    g.outstanding = g.outstanding.saturating_sub(1);
                    if g.error.is_none() {
                        g.error = done.error;
                    }
                }
            }
        }
    }

    /// Send what the window's budget allows, group by group in order;
    /// nothing once a group has failed.
    fn send_window<R: ReadRequest>(
        &mut self,
        groups: &mut [&mut [R]],
        max_in_flight: usize,
        max_bytes: u64,
    ) -> Result<()> {
        if self.window.iter().any(|g| g.error.is_some()) {
            return Ok(());
        }
        for gi in 0..self.window.len() {
            if self.window[gi].sent {
                continue;
            }
            let id = self.window[gi].id;
            let Some(reqs) = groups.get_mut(gi) else {
                break;
            };
            let from = self.window[gi].next;
            let (next, sent) = self.send_reads(reqs, from, id, max_in_flight, max_bytes)?;
            let g = &mut self.window[gi];
            g.outstanding += sent;
            g.next = next;
            g.sent = next.0 >= reqs.len();
            if !g.sent {
                break;
            }
        }
        Ok(())
    }

    /// Send the reads of `reqs` from read `from.0`, `from.1` bytes into
    /// it, split to the largest request, for `group`, while fewer than
    /// `max_in_flight` requests and (beyond the first) at most `max_bytes`
    /// bytes of reads are in flight. Returns where the next read starts
    /// and how many requests were sent.
    fn send_reads<R: ReadRequest>(
        &mut self,
        reqs: &mut [R],
        from: (usize, usize),
        group: u64,
        max_in_flight: usize,
        max_bytes: u64,
    ) -> Result<((usize, usize), usize)> {
        let max_request = self.max_request as usize;
        let (mut idx, mut pos) = from;
        let mut sent = 0;
        while idx < reqs.len() && self.in_flight < max_in_flight {
            let offset = reqs[idx].offset();
            let total = reqs[idx].buffer().len();
            if pos >= total {
                idx += 1;
                pos = 0;
                continue;
            }
            let len = (total - pos).min(max_request);
            if self.in_flight > 0 && self.read_bytes_in_flight + len as u64 > max_bytes {
                break;
            }
            let Some(at) = offset.checked_add(pos as u64) else {
                return Err(self.error(
                    ErrorKind::InvalidInput,
                    Operation::Read,
                    "offset overflows",
                ));
            };
            self.sending_group = group;
            let result = self.send(
                Operation::Read,
                NBD_CMD_READ,
                0,
                at,
                len as u64,
                &[],
                false,
                idx,
                pos,
            );
            self.sending_group = NO_GROUP;
            result?;
            sent += 1;
            pos += len;
        }
        Ok(((idx, pos), sent))
    }

    /// Abandon the reads of a [`Client::read_window`] still in flight:
    /// wait for their replies and drop the data, so that the connection
    /// can carry other requests.
    pub fn abandon_window(&mut self) -> Result<()> {
        if self.window.is_empty() {
            return Ok(());
        }
        let abandoned: Vec<u64> = self.window.drain(..).map(|g| g.id).collect();
        while self.in_flight > 0
            && self
                .slots
                .iter()
                .any(|s| s.busy && abandoned.contains(&s.group))
        {
            self.receive(&mut Discard)?;
        }
        Ok(())
    }

    /// Turn the part of `cmd` after its first `done` bytes into the next
    /// request, or `None` when it is all sent.
    fn next_write(&self, cmd: &WriteCmd<'_>, done: u64) -> Result<Option<SubRequest>> {
        let max = u64::from(self.max_request);
        let (op, offset, total) = match *cmd {
            WriteCmd::Write { offset, data, .. } => (Operation::Write, offset, data.len() as u64),
            WriteCmd::WriteZeroes { offset, length, .. } => (Operation::Zero, offset, length),
            WriteCmd::Trim { offset, length } => (Operation::Trim, offset, length),
        };
        if done >= total {
            return Ok(None);
        }
        let at = offset
            .checked_add(done)
            .ok_or_else(|| self.error(ErrorKind::InvalidInput, op, "offset overflows"))?;
        if self.read_only() {
            return Err(self
                .error(ErrorKind::Unsupported, op, "the export is read-only")
                .at(at, total - done));
        }
        let left = total - done;
        let r = match *cmd {
            WriteCmd::Write { .. } => {
                let n = left.min(max);
                SubRequest::new(op, NBD_CMD_WRITE, 0, at, n, done as usize)
            }
            WriteCmd::WriteZeroes {
                no_hole, fast_zero, ..
            } => {
                if fast_zero && !self.can_fast_zero() {
                    return Err(self
                        .error(ErrorKind::Unsupported, op, "server cannot zero fast")
                        .at(at, left));
                }
                if self.can_zero() {
                    let mut flags = 0;
                    if no_hole {
                        flags |= NBD_CMD_FLAG_NO_HOLE;
                    }
                    if fast_zero {
                        flags |= NBD_CMD_FLAG_FAST_ZERO;
                    }
                    let n = left.min(self.max_effect);
                    SubRequest::new(op, NBD_CMD_WRITE_ZEROES, flags, at, n, 0)
                } else {
                    let n = left.min(max).min(ZERO_BUF_LEN as u64);
                    SubRequest::new(op, NBD_CMD_WRITE, 0, at, n, 0)
                }
            }
            WriteCmd::Trim { .. } => {
                if !self.can_trim() {
                    return Err(self
                        .error(ErrorKind::Unsupported, op, "server does not support trim")
                        .at(at, left));
                }
                let n = left.min(self.max_effect);
                SubRequest::new(op, NBD_CMD_TRIM, 0, at, n, 0)
            }
        };
        Ok(Some(r))
    }

    fn overlaps_in_flight(&self, offset: u64, length: u64) -> bool {
        let end = offset.saturating_add(length);
        self.slots
            .iter()
            .any(|s| s.busy && s.offset < end && offset < s.offset.saturating_add(s.effect))
    }

    /// Perform `ops` with up to `max_in_flight` requests and
    /// `max_bytes_in_flight` payload bytes in flight. Long commands are
    /// split. A command overlapping one still in flight waits for it, so
    /// the result is as if the commands ran in order. On a server error
    /// no more requests are sent and the first error is returned once the
    /// replies still due have arrived.
    ///
    /// On a Unix socket, large payloads are lent to the kernel rather than
    /// copied ([`super::splice`]). When this returns `Ok` or a server's
    /// error, the server has read every payload. After an I/O error the
    /// connection is dead but bytes it queued may still reach the server:
    /// do not put other data in the payload memory and then write it again
    /// elsewhere; drop it (the copy engine starts a retried segment with
    /// fresh buffers).
    pub fn write_many<'a, I>(
        &mut self,
        ops: I,
        max_in_flight: usize,
        max_bytes_in_flight: usize,
    ) -> Result<()>
    where
        I: IntoIterator<Item = WriteCmd<'a>>,
    {
        self.send_writes(ops, max_in_flight, max_bytes_in_flight)?;
        self.settle()
    }

    /// [`Client::write_many`], but once every request is sent it returns
    /// without waiting for the last replies, unless a payload still in
    /// flight was lent (then the server has not read it yet). Replies left
    /// due are read by the next call, and [`Client::settle`] waits for
    /// them; a server error among them is returned there. The payload
    /// memory may be reused when this returns.
    ///
    /// A writer that waits for each batch's replies sleeps once a batch;
    /// nbdkit memory to memory over TCP loopback (2 GiB, 8 alternating
    /// rounds) took 1.22 s against 1.28 s, with a fifth fewer context
    /// switches.
    pub fn send_writes<'a, I>(
        &mut self,
        ops: I,
        max_in_flight: usize,
        max_bytes_in_flight: usize,
    ) -> Result<()>
    where
        I: IntoIterator<Item = WriteCmd<'a>>,
    {
        self.check_alive(Operation::Write)?;
        self.abandon_window()?;
        let max_in_flight = max_in_flight.max(1);
        let max_bytes = max_bytes_in_flight as u64;
        let mut ops = ops.into_iter();
        let mut current: Option<(WriteCmd<'a>, u64)> = None;
        let mut first_error: Option<Error> = None;
        let mut none: [(u64, &mut [u8]); 0] = [];
        let mut finished = false;
        loop {
            while first_error.is_none() && !finished && self.in_flight < max_in_flight {
                let (cmd, done) = match current {
                    Some(c) => c,
                    None => match ops.next() {
                        Some(cmd) => (cmd, 0),
                        None => {
                            finished = true;
                            break;
                        }
                    },
                };
                let next = match self.next_write(&cmd, done) {
                    Ok(n) => n,
                    Err(e) => {
                        first_error = Some(e);
                        break;
                    }
                };
                let Some(SubRequest {
                    op,
                    command,
                    flags,
                    offset,
                    length,
                    data_at,
                }) = next
                else {
                    current = None;
                    continue;
                };
                current = Some((cmd, done));
                let (payload, lend): (&[u8], bool) = match (command, cmd) {
                    (NBD_CMD_WRITE, WriteCmd::Write { data, lend, .. }) => {
                        (&data[data_at..data_at + length as usize], lend)
                    }
                    // A static of zeroes is never refilled: safe to lend.
                    (NBD_CMD_WRITE, _) => (&ZERO_BUF[..length as usize], true),
                    _ => (&[], false),
                };
                let counted = payload.len() as u64;
                if self.in_flight > 0 && self.write_bytes_in_flight + counted > max_bytes {
                    break;
                }
                if self.in_flight > 0 && self.overlaps_in_flight(offset, length) {
                    break;
                }
                self.send(op, command, flags, offset, length, payload, lend, 0, 0)?;
                self.write_bytes_in_flight += counted;
                current = Some((cmd, done + length));
            }
            // The loop above only stops with nothing in flight when the
            // commands are all sent or one failed.
            if self.in_flight == 0 {
                break;
            }
            if finished && first_error.is_none() && !self.lent {
                return Ok(());
            }
            if let Some(done) = self.receive(&mut none[..])? {
                if first_error.is_none() {
                    first_error = done.error;
                }
            }
        }
        self.after_batch();
        first_error.map_or(Ok(()), Err)
    }

    /// Run one request with no payload to completion.
    fn round_trip(
        &mut self,
        op: Operation,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
    ) -> Result<()> {
        self.check_alive(op)?;
        self.abandon_window()?;
        self.send(op, command, flags, offset, length, &[], false, 0, 0)?;
        self.settle()
    }

    /// Wait for every reply still due (see [`Client::send_writes`]);
    /// returns the first server error among them. Reads of a window still
    /// in flight are abandoned first (see [`Client::read_window`]), so no
    /// reply read here carries data.
    pub fn settle(&mut self) -> Result<()> {
        if self.in_flight == 0 {
            return Ok(());
        }
        self.check_alive(Operation::Write)?;
        self.abandon_window()?;
        let mut none: [(u64, &mut [u8]); 0] = [];
        let mut first_error = None;
        while self.in_flight > 0 {
            if let Some(done) = self.receive(&mut none[..])? {
                if first_error.is_none() {
                    first_error = done.error;
                }
            }
        }
        self.after_batch();
        first_error.map_or(Ok(()), Err)
    }

    /// Make completed writes durable (`NBD_CMD_FLUSH`); an `Unsupported`
    /// error if the server lacks it.
    pub fn flush(&mut self) -> Result<()> {
        if !self.can_flush() {
            return Err(self.error(
                ErrorKind::Unsupported,
                Operation::Flush,
                "server does not support flush",
            ));
        }
        // A flush covers only the writes already answered.
        self.settle()?;
        self.round_trip(Operation::Flush, NBD_CMD_FLUSH, 0, 0, 0)
    }

    /// `base:allocation` extents of `[offset, offset + length)`, as
    /// (length, `NBD_STATE_*` flags) pairs starting at `offset`. One
    /// request is sent, its length clamped to what 32 bits hold (rounded
    /// to the minimum block size) unless extended headers were negotiated,
    /// which carry all of it; the list may end early, and the last extent
    /// is clipped to the request.
    pub fn block_status(&mut self, offset: u64, length: u64) -> Result<Vec<(u64, u32)>> {
        const OP: Operation = Operation::BlockStatus;
        if self.neg.base_allocation.is_none() {
            return Err(self.error(
                ErrorKind::Unsupported,
                OP,
                "server does not support base:allocation",
            ));
        }
        if length == 0 {
            return Ok(Vec::new());
        }
        let min = u64::from(self.block.minimum);
        let cap = if self.neg.extended_headers {
            u64::MAX / min * min
        } else {
            u64::from(u32::MAX) / min * min
        };
        let len = length.min(cap);
        self.round_trip(OP, NBD_CMD_BLOCK_STATUS, 0, offset, len)?;
        Ok(std::mem::take(&mut self.extents))
    }

    /// End the session: send `NBD_CMD_DISC` and shut the socket down. The
    /// client is unusable afterwards.
    pub fn disconnect(&mut self) -> Result<()> {
        if self.dead.is_some() {
            return Ok(());
        }
        let (header, hlen) = self.encode_request(&Request {
            flags: 0,
            command: NBD_CMD_DISC,
            cookie: self.next_cookie,
            offset: 0,
            length: 0,
        });
        let sock = self.reader.get_mut();
        let sent = io::Write::write_all(sock, &header[..hlen]);
        if sent.is_ok() {
            sock.close_tls();
        }
        let _ = sock.shutdown(Shutdown::Write);
        self.dead = Some((ErrorKind::Io, "disconnected".to_string()));
        sent.map_err(|e| Error::io(Operation::Disconnect, e))
    }
}

#[cfg(test)]
mod tests;
