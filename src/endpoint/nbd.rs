//! NBD servers as endpoints: one [`NbdEndpoint`] is one connection, to a
//! server given by URI or to one nbdcp started (`[ CMD ARGS ... ]`, see
//! [`super::subprocess`]).
//!
//! Batches from the engine are pipelined on the connection; further
//! workers get their own connections through
//! [`Endpoint::connect_another`]. Both kinds of server follow one policy:
//! an extra connection that cannot be had is given up on, and the copy
//! carries on with the connections it has.

use std::ffi::OsString;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::subprocess::ServerProcess;
use super::{
    BlockSize, Capabilities, Endpoint, Extent, ExtentKind, Interrupter, OpenOptions, ReadOp,
    Tuning, WriteOp,
};
use crate::error::{Error, ErrorKind, Operation, Result};
use nbd::client::{Client, ClientOptions, WriteCmd};
use nbd::uri::NbdUri;
use nbd::wire::NBD_STATE_ZERO;

/// The longest an extra connection may take to be greeted before nbdcp
/// carries on with the connections it has.
const EXTRA_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest such wait.
const EXTRA_CONNECTION_MIN_WAIT: Duration = Duration::from_millis(100);
/// Between those two bounds, the wait is the first connection's handshake
/// time multiplied by this.
const EXTRA_CONNECTION_FACTOR: u32 = 20;
/// Batch size for a TCP connection. Measured on 2 cores, nbdkit memory to
/// nbdkit memory over 127.0.0.1 (2 GiB, 5 alternating rounds): 512 KiB
/// batches took 1.21 s and 0.86 s of CPU, 2 MiB batches 1.88 s and 1.18 s.
/// Over Unix sockets the same servers were level (1.53 s against 1.45 s),
/// and qemu-nbd qcow2 to qcow2 was faster with 2 MiB (1.18 s against
/// 1.33 s), so Unix sockets keep the engine's default.
const TCP_BATCH_HINT: usize = 512 * 1024;
/// Request size on a TCP connection: two requests per batch measured
/// best (the same copy: 1.18 s with 256 KiB or 512 KiB requests, 1.40 s
/// with 1 MiB).
const TCP_REQUEST_HINT: usize = 256 * 1024;
/// Request size on a Unix socket. Servers spend much of their CPU per
/// request, and on 2 cores their CPU is the copy's: qemu-nbd raw to
/// `null:` (2 GiB, 6 alternating rounds) took 0.82 s with 1 MiB requests,
/// the server using 0.84 s of CPU, against 1.19 s and 1.27 s with 256 KiB;
/// qcow2 to qcow2 took 0.87 s against 1.06 s (2 MiB: 0.92 s).
const UNIX_REQUEST_HINT: usize = 1024 * 1024;
/// Longest write on a Unix socket while the server answers quickly (a
/// slow server gets writes as long as they merge: see
/// `engine::batch::SLOW_DESTINATION`). A server allocates a buffer for
/// each write's payload, and qemu-nbd's allocator can hand long ones
/// fresh pages, each faulting and zeroed before the payload lands.
/// Measured on 2 cores, 1 GiB of random data from a file into a qemu-nbd
/// that had served copies before (alternating rounds, medians): writes
/// merged to 2 MiB took 0.69 to 0.72 s, the server faulting on 175,000
/// to 180,000 pages; 1 MiB 0.59 s (104,000); 512 KiB 0.41 s in one
/// series (35,000) but 0.58 to 0.79 s in two others (110,000 to
/// 264,000); 256 KiB 0.47 to 0.53 s (27,000 to 50,000), nbdcopy (256 KiB
/// too) 0.48 to 0.58 s. Into qcow2: 0.85 s merged, 0.59 s with 256 KiB.
/// Between two qemu-nbd servers over TLS: 1.85 s, 1.61 s. A qemu-nbd
/// started for the copy faults on every page whatever the length
/// (0.85 s with 1 MiB, 0.88 s with 512 KiB, 0.92 s with 256 KiB), and
/// nbdkit's file and memory plugins were level. Reads stay at the
/// request size: qemu-nbd spends more CPU on shorter reads (2 GiB to
/// `null:`: 0.57 s of its CPU with 1 MiB, 0.69 s with 256 KiB).
const UNIX_WRITE_HINT: usize = 256 * 1024;
/// Longest write over TCP while the server answers quickly: a batch, as
/// before writes were cut. Each write is two system calls there (header
/// and payload apart), and 256 KiB writes cost more than they saved:
/// nbdkit memory to nbdkit memory over 127.0.0.1, 1 GiB, 0.53 s and
/// 0.39 s of CPU against 0.47 s and 0.32 s with 512 KiB (5 alternating
/// runs, medians); nbdkit to a qemu-nbd over TLS was level (1.60 s
/// against 1.63 s).
const TCP_WRITE_HINT: usize = TCP_BATCH_HINT;

/// Writes answered slower than this are copied to the socket rather than
/// lent (see `write_batch`). nbdkit memory with writes delayed 10 ms, one
/// connection, 1 GiB: 6.5 s lending, where nbdcopy took 2.8 s.
const SLOW_WRITES: std::time::Duration = std::time::Duration::from_millis(1);

/// Samples of write latency (over every connection to the server) before
/// it counts. Only a connection that starts from idle takes a sample, and
/// once writes count as slow they are copied, not waited for, so a
/// connection seldom idles again: a first sample taken while the server
/// was busy with the others would stand for the whole copy. Into a
/// qemu-nbd on a Unix socket (1 GiB, 3 connections), counting the first
/// sample made 3 copies in 4 take it as 2.3 to 4.1 ms, where the server
/// answers in 0.06 to 0.3 ms; 2 samples left 2 copies in 6 slow, 4 one in
/// 6, 8 none in 8. Until then payloads are lent, one round trip a batch,
/// which a server far away pays: 10 ms away, 1 GiB of the mixed image
/// took 0.67 s on one connection against 0.60 s, 0.39 s against 0.35 s
/// on three.
const WRITE_LATENCY_SAMPLES: u64 = 8;

/// Where an endpoint's connections go.
#[derive(Clone, Debug)]
struct Target {
    /// What the user typed, for messages.
    name: String,
    uri: NbdUri,
    opts: OpenOptions,
    /// Opened as a destination: a read-only export is refused up front.
    writable: bool,
    /// The server nbdcp started, shared by every connection to it; it is
    /// stopped when the last one is dropped.
    server: Option<Arc<ServerProcess>>,
    /// TLS credentials, read once and shared by every connection (the
    /// extra ones and reconnections too), for a URI that requires TLS.
    tls: Option<Arc<nbd::TlsContext>>,
}

/// What lets another thread break the current connection off. Reconnecting
/// swaps the connection, so the slot is shared and updated in place.
#[derive(Debug, Default)]
struct InterruptSlot {
    interrupted: bool,
    current: Option<nbd::Interrupter>,
}

/// One connection to an NBD server, as an [`Endpoint`].
#[derive(Debug)]
pub struct NbdEndpoint {
    // Declared first so the connection closes before the last handle
    // stops a server nbdcp started.
    client: Client,
    target: Target,
    interrupt: Arc<Mutex<InterruptSlot>>,
    /// Block status failures are reported once per connection.
    warned_extents: bool,
    /// Extents learnt ahead of the range asked for, contiguous, in order
    /// (with extended headers one block status request of a read-only
    /// endpoint looks [`EXTENT_LOOKAHEAD`] ahead).
    lookahead: Vec<Extent>,
    /// Writes or zeroes were sent on this connection since its last
    /// successful flush.
    dirty: bool,
    /// How long connecting and negotiating took, a measure of how quickly
    /// this server greets a client.
    handshake_time: Duration,
}

fn lock(slot: &Mutex<InterruptSlot>) -> MutexGuard<'_, InterruptSlot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl NbdEndpoint {
    /// Connect to `uri` and negotiate; `name` is what the user typed, for
    /// messages. With `writable`, a read-only export is refused.
    pub fn connect(
        name: &str,
        uri: &NbdUri,
        opts: &OpenOptions,
        writable: bool,
    ) -> Result<NbdEndpoint> {
        let tls = match &uri.tls {
            Some(_) => Some(Arc::new(nbd::TlsContext::new(uri).map_err(|e| {
                Error::from(e)
                    .with_endpoint(name)
                    .with_operation(Operation::Connect)
            })?)),
            None => None,
        };
        let target = Target {
            name: name.to_string(),
            uri: uri.clone(),
            opts: opts.clone(),
            writable,
            server: None,
            tls,
        };
        let ep = NbdEndpoint::open(target, opts.timeout)?;
        if let Some(tls) = ep.client.tls_description() {
            log::info!("{name}: {tls}");
        }
        Ok(ep)
    }

    /// Start `argv` as a socket-activated NBD server and connect to it.
    ///
    /// If the server exits instead of answering, the error gives its exit
    /// status. A server that neither exits nor answers (a command that
    /// ignores fd 3) is only detected if `opts.timeout` is set.
    pub fn start(
        name: &str,
        argv: &[OsString],
        opts: &OpenOptions,
        writable: bool,
    ) -> Result<NbdEndpoint> {
        let server = ServerProcess::spawn(argv).map_err(|e| e.with_endpoint(name))?;
        let target = Target {
            name: name.to_string(),
            uri: NbdUri::unix(server.socket_path(), ""),
            opts: opts.clone(),
            writable,
            server: None,
            tls: None,
        };
        match NbdEndpoint::open(target, opts.timeout) {
            Ok(mut ep) => {
                ep.target.server = Some(Arc::new(server));
                Ok(ep)
            }
            Err(err) => Err(server.explain_failure(name, err)),
        }
    }

    /// One new connection to `target`, its socket bounded by `timeout`
    /// while it connects and negotiates.
    fn open(target: Target, timeout: Option<Duration>) -> Result<NbdEndpoint> {
        let started = Instant::now();
        let client = Self::dial(&target, timeout)?;
        let interrupt = InterruptSlot {
            interrupted: false,
            current: client.interrupter().ok(),
        };
        Ok(NbdEndpoint {
            client,
            target,
            interrupt: Arc::new(Mutex::new(interrupt)),
            warned_extents: false,
            lookahead: Vec::new(),
            dirty: false,
            handshake_time: started.elapsed(),
        })
    }

    /// Connect and negotiate, refusing a read-only export for a writer.
    fn dial(target: &Target, timeout: Option<Duration>) -> Result<Client> {
        let copts = ClientOptions {
            name: target.name.clone(),
            timeout,
            tls: target.tls.clone(),
        };
        let context = |e: nbd::Error| {
            let e = Error::from(e)
                .with_endpoint(&target.name)
                .with_operation(Operation::Connect);
            note_death(target, e)
        };
        let mut client = Client::connect(&target.uri, &copts).map_err(context)?;
        if target.writable && client.read_only() {
            let _ = client.disconnect();
            return Err(
                Error::new(ErrorKind::Unsupported, "the export is read-only")
                    .with_endpoint(&target.name)
                    .with_operation(Operation::Connect),
            );
        }
        if timeout != target.opts.timeout {
            client.set_timeout(target.opts.timeout).map_err(context)?;
        }
        Ok(client)
    }

    /// The URI this endpoint connects to.
    pub fn uri(&self) -> &NbdUri {
        &self.target.uri
    }

    /// The server process nbdcp started for this endpoint, if it did.
    pub fn server(&self) -> Option<&ServerProcess> {
        self.target.server.as_deref()
    }

    /// The server says several connections see one another's writes.
    pub fn multi_conn(&self) -> bool {
        self.client.multi_conn()
    }

    /// The underlying connection.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    fn ctx(&self, e: nbd::Error, op: Operation) -> Error {
        let e = Error::from(e)
            .with_endpoint(&self.target.name)
            .with_operation(op);
        note_death(&self.target, e)
    }

    /// Whether `e` is a server refusing a zero request longer than its
    /// maximum payload size: the specification lets it answer `EINVAL`
    /// or `EOVERFLOW`, and the connection stays usable.
    fn refused_long_zeroes(&self, e: &nbd::Error, ops: &[WriteOp<'_>]) -> bool {
        let refused = matches!(
            e.server_errno().map(nbd::ServerErrno::to_errno),
            Some(libc::EINVAL | libc::EOVERFLOW)
        );
        let limit = u64::from(self.client.max_payload());
        let long_zero = ops
            .iter()
            .any(|op| matches!(op, WriteOp::Zero { length, .. } if *length > limit));
        refused
            && long_zero
            && e.operation() == Some(nbd::Operation::Zero)
            && self.client.max_request_without_payload() > u64::from(self.client.max_payload())
            && !self.client.is_dead()
    }

    fn limits(&self) -> (usize, usize) {
        (self.target.opts.requests, self.target.opts.queue_size)
    }

    /// `op` as a client command; payloads are lent to the kernel only if
    /// `lend` allows.
    fn write_cmd<'a>(op: &WriteOp<'a>, lend: bool) -> WriteCmd<'a> {
        match op {
            WriteOp::Write { offset, data } => WriteCmd::Write {
                offset: *offset,
                data: data.bytes(),
                lend: lend && data.lendable_from().is_some(),
            },
            WriteOp::Zero {
                offset,
                length,
                allocate,
            } => WriteCmd::WriteZeroes {
                offset: *offset,
                length: *length,
                no_hole: *allocate,
                fast_zero: false,
            },
        }
    }
}

/// When an operation fails because the connection broke and a server
/// nbdcp started has died, say so in the error itself: "connection reset"
/// alone does not say why, and a separate log line would make two lines
/// of one failure. A server error or protocol violation already says what
/// it is.
fn note_death(target: &Target, e: Error) -> Error {
    match &target.server {
        Some(server) if e.kind() == ErrorKind::Io => match server.death_note() {
            Some(note) => e.with_note(note),
            None => e,
        },
        _ => e,
    }
}

impl nbd::ReadRequest for ReadOp<'_> {
    fn offset(&self) -> u64 {
        self.offset
    }

    fn buffer(&mut self) -> &mut [u8] {
        self.buf
    }
}

impl Endpoint for NbdEndpoint {
    fn name(&self) -> &str {
        &self.target.name
    }

    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn size(&self) -> Option<u64> {
        Some(self.client.size())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.client.read_only(),
            sequential: false,
            flush: self.client.can_flush(),
            extents: self.client.has_base_allocation(),
            // A server nbdcp started that dropped the connection has most
            // likely died: reconnecting would only wait out the back-off.
            reconnect: self.target.server.is_none(),
            starts_zeroed: false,
            read_back: true,
            multi_conn: self.client.multi_conn(),
        }
    }

    fn tuning(&self) -> Tuning {
        let tcp = self.client.is_tcp();
        Tuning {
            waits_on_peer: true,
            request_size: if tcp {
                TCP_REQUEST_HINT
            } else {
                UNIX_REQUEST_HINT
            },
            write_size: if tcp { TCP_WRITE_HINT } else { UNIX_WRITE_HINT },
            batch_size: if tcp { TCP_BATCH_HINT } else { 0 },
            zero_scan: true,
        }
    }

    fn block_size(&self) -> BlockSize {
        self.client.block_size()
    }

    fn read_latency(&self) -> Option<std::time::Duration> {
        self.client.read_latency()
    }

    fn write_latency(&self) -> Option<std::time::Duration> {
        (self.client.write_latency_samples() >= WRITE_LATENCY_SAMPLES)
            .then(|| self.client.write_latency())
            .flatten()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut one = [(offset, buf)];
        let (r, q) = self.limits();
        self.client
            .read_many(&mut one, r, q)
            .map_err(|e| self.ctx(e, Operation::Read))
    }

    fn read_batch(&mut self, ops: &mut [ReadOp<'_>]) -> Result<()> {
        let (r, q) = self.limits();
        self.client
            .read_many(ops, r, q)
            .map_err(|e| self.ctx(e, Operation::Read))
    }

    fn read_ahead(&mut self, first: u64, batches: &mut [Vec<ReadOp<'_>>]) -> Result<()> {
        let (r, q) = self.limits();
        let mut groups: Vec<&mut [ReadOp<'_>]> =
            batches.iter_mut().map(|b| b.as_mut_slice()).collect();
        self.client
            .read_window(first, &mut groups, r, q)
            .map_err(|e| self.ctx(e, Operation::Read))
    }

    fn abandon_reads(&mut self) -> Result<()> {
        self.client
            .abandon_window()
            .map_err(|e| self.ctx(e, Operation::Read))
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.dirty = true;
        self.lookahead.clear();
        let (r, q) = self.limits();
        let cmd = WriteCmd::Write {
            offset,
            data,
            lend: false,
        };
        self.client
            .write_many(std::iter::once(cmd), r, q)
            .map_err(|e| self.ctx(e, Operation::Write))
    }

    fn zero(&mut self, offset: u64, length: u64, allocate: bool) -> Result<()> {
        self.dirty = true;
        self.lookahead.clear();
        let (r, q) = self.limits();
        let cmd = WriteCmd::WriteZeroes {
            offset,
            length,
            no_hole: allocate,
            fast_zero: false,
        };
        self.client
            .write_many(std::iter::once(cmd), r, q)
            .map_err(|e| self.ctx(e, Operation::Zero))
    }

    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<()> {
        self.dirty = true;
        self.lookahead.clear();
        let (r, q) = self.limits();
        // A lent payload must be read by the server before the batch can
        // be refilled, so a batch with lent pages waits for its replies:
        // one round trip per batch. That saves a copy per byte where CPU
        // is the limit; a server slower than `SLOW_WRITES` is the limit
        // itself, and copied payloads let the writes of several batches
        // (up to --queue-size) be in flight at once.
        let lend = self
            .write_latency()
            .is_none_or(|latency| latency < SLOW_WRITES);
        let send = |client: &mut Client| {
            client.send_writes(ops.iter().map(|op| Self::write_cmd(op, lend)), r, q)
        };
        let mut result = send(&mut self.client);
        if let Err(e) = &result {
            if self.refused_long_zeroes(e, ops) {
                // Writes and zeroes are idempotent: the batch is sent again
                // with zero requests no longer than payloads.
                log::debug!(
                    "{}: {e}; sending zero requests of at most {} bytes",
                    self.target.name,
                    self.client.max_payload()
                );
                self.client.limit_requests_without_payload();
                result = send(&mut self.client);
            }
        }
        if result.is_err() && self.client.is_dead() {
            // Lent pages may still be read off the dead socket: make sure
            // the memory is never refilled (see `WriteBuffer`).
            for op in ops {
                if let WriteOp::Write { data, .. } = op {
                    if let Some(buffer) = data.lendable_from() {
                        buffer.poison();
                    }
                }
            }
        }
        result.map_err(|e| self.ctx(e, Operation::Write))
    }

    fn settle(&mut self) -> Result<()> {
        self.client
            .settle()
            .map_err(|e| self.ctx(e, Operation::Write))
    }

    fn flush(&mut self) -> Result<()> {
        if !self.client.can_flush() {
            return Ok(());
        }
        match self.client.flush() {
            Ok(()) => {
                self.dirty = false;
                Ok(())
            }
            // A connection that sent nothing since its last flush has
            // nothing to make durable. If it has died meanwhile (its server
            // restarted while other connections carried the copy on, or
            // it sat idle without a segment), that is no reason to fail a
            // copy whose writes were all flushed elsewhere.
            Err(e) if !self.dirty && is_transport(&e) => {
                log::debug!("{}: flush on an idle connection: {e}", self.target.name);
                Ok(())
            }
            Err(e) => Err(self.ctx(e, Operation::Flush)),
        }
    }

    fn extents(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let all_data = || {
            vec![Extent {
                offset,
                length,
                kind: ExtentKind::Data,
            }]
        };
        let size = self.client.size();
        if length == 0 || !self.client.has_base_allocation() || offset >= size {
            return Ok(all_data());
        }
        let len = length.min(size - offset);
        let known = clip_extents(&self.lookahead, offset, offset + len);
        if !known.is_empty() {
            return Ok(known);
        }
        // Only a source looks ahead: a destination's extents (read back
        // by --verify) change as any of its connections write.
        let ask = if self.client.negotiated().extended_headers && !self.target.writable {
            len.max(EXTENT_LOOKAHEAD).min(size - offset)
        } else {
            len
        };
        self.lookahead.clear();
        match self.client.block_status(offset, ask) {
            Ok(list) => {
                let out = merge_extents(offset, &list);
                if out.is_empty() {
                    return Ok(all_data());
                }
                if ask == len {
                    return Ok(out);
                }
                let wanted = clip_extents(&out, offset, offset + len);
                self.lookahead = out;
                Ok(wanted)
            }
            // The server could not tell: copying everything is slower but
            // still right, so this is not worth failing the copy over.
            Err(e) if e.kind() == nbd::ErrorKind::Server => {
                if !self.warned_extents {
                    self.warned_extents = true;
                    let e = self.ctx(e, Operation::BlockStatus);
                    log::warn!("{e}; copying without extent information");
                }
                Ok(all_data())
            }
            Err(e) => Err(self.ctx(e, Operation::BlockStatus).at(offset, len)),
        }
    }

    fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
        // qemu-nbd by default serves one client at a time (`--shared=1`,
        // and then it does not advertise multi-conn): a second connection
        // to a server nbdcp started that way would sit in the listen
        // backlog for the whole wait below, for nothing.
        if self.target.server.is_some() && !self.client.multi_conn() {
            return Ok(None);
        }
        // A server that serves one client at a time accepts the socket but
        // never greets a second client. Give up on extra connections after
        // a wait scaled to how fast the first was greeted instead of
        // hanging (qemu-nbd on a Unix socket greets in about a
        // millisecond, so nbdcp waits 100 ms, not seconds); the configured
        // timeout applies afterwards.
        let wait = extra_connection_wait(self.handshake_time);
        let timeout = Some(self.target.opts.timeout.map_or(wait, |t| t.min(wait)));
        match NbdEndpoint::open(self.target.clone(), timeout) {
            Ok(mut ep) => {
                ep.client.share_latencies_with(&self.client);
                Ok(Some(Box::new(ep)))
            }
            Err(e) => {
                log::info!("{}: cannot open another connection: {e}", self.target.name);
                Ok(None)
            }
        }
    }

    fn reconnect(&mut self) -> Result<()> {
        let fresh = Self::dial(&self.target, self.target.opts.timeout)?;
        // A server that came back as something else must not be written
        // to as if it were the same disk.
        if fresh.size() != self.client.size() {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "the server came back with size {} instead of {}",
                    fresh.size(),
                    self.client.size()
                ),
            )
            .with_endpoint(&self.target.name)
            .with_operation(Operation::Reconnect));
        }
        let mut slot = lock(&self.interrupt);
        slot.current = fresh.interrupter().ok();
        if slot.interrupted {
            // Cancelled while reconnecting: the new connection is broken
            // off too, so the worker stops instead of starting again.
            if let Some(i) = &slot.current {
                i.interrupt();
            }
        }
        drop(slot);
        let mut fresh = fresh;
        fresh.share_latencies_with(&self.client);
        self.client = fresh;
        // Whatever the old connection wrote is redone on this one.
        self.dirty = false;
        Ok(())
    }

    fn interrupter(&self) -> Option<Interrupter> {
        let slot = Arc::clone(&self.interrupt);
        Some(Interrupter::new(move || {
            let mut slot = lock(&slot);
            slot.interrupted = true;
            if let Some(i) = &slot.current {
                i.interrupt();
            }
        }))
    }

    fn close(&mut self) -> Result<()> {
        match self.client.disconnect() {
            Ok(()) => Ok(()),
            // Saying goodbye to a server that has gone away loses nothing
            // when everything written was flushed (or nothing written).
            Err(e) if !self.dirty && is_transport(&e) => {
                log::debug!("{}: disconnect: {e}", self.target.name);
                Ok(())
            }
            Err(e) => Err(self.ctx(e, Operation::Disconnect)),
        }
    }
}

/// Turn `base:allocation` answers (length, flags) from `offset` on into
/// extents, neighbours of the same kind merged.
/// How far past the range asked for one block status request looks when
/// extended headers lift the 4 GiB limit: a mostly sparse image is then
/// described in a few requests instead of one per segment.
const EXTENT_LOOKAHEAD: u64 = 64 << 30;

/// The part of `extents` (contiguous, in order) inside `[offset, end)`,
/// clipped to it; empty if `offset` is not covered. It may end before
/// `end`, where `extents` do.
fn clip_extents(extents: &[Extent], offset: u64, end: u64) -> Vec<Extent> {
    extents
        .iter()
        .filter(|e| e.offset < end && offset < e.offset + e.length)
        .map(|e| {
            let from = e.offset.max(offset);
            let to = (e.offset + e.length).min(end);
            Extent {
                offset: from,
                length: to - from,
                kind: e.kind,
            }
        })
        .skip_while(|e| e.offset != offset)
        .collect()
}

fn merge_extents(offset: u64, list: &[(u64, u32)]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(list.len());
    let mut at = offset;
    for &(length, flags) in list {
        let kind = if flags & NBD_STATE_ZERO != 0 {
            ExtentKind::Zero
        } else {
            ExtentKind::Data
        };
        match out.last_mut() {
            Some(last) if last.kind == kind => last.length += length,
            _ => out.push(Extent {
                offset: at,
                length,
                kind,
            }),
        }
        at += length;
    }
    out
}

/// The connection failed or stalled (as opposed to the server answering
/// with an error, or breaking the protocol).
fn is_transport(e: &nbd::Error) -> bool {
    matches!(e.kind(), nbd::ErrorKind::Io | nbd::ErrorKind::Timeout)
}

/// How long to wait for an extra connection's greeting, given how long
/// the first connection took to connect and negotiate.
fn extra_connection_wait(first_handshake: Duration) -> Duration {
    first_handshake
        .saturating_mul(EXTRA_CONNECTION_FACTOR)
        .clamp(EXTRA_CONNECTION_MIN_WAIT, EXTRA_CONNECTION_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Payload;
    use nbd::testkit::Server;

    #[test]
    fn extra_connection_wait_scales_with_the_first_handshake() {
        let ms = Duration::from_millis;
        assert_eq!(extra_connection_wait(ms(1)), EXTRA_CONNECTION_MIN_WAIT);
        assert_eq!(extra_connection_wait(ms(30)), ms(600));
        assert_eq!(extra_connection_wait(ms(500)), EXTRA_CONNECTION_TIMEOUT);
        assert_eq!(
            extra_connection_wait(Duration::MAX),
            EXTRA_CONNECTION_TIMEOUT
        );
    }

    fn endpoint(server: &Server, writable: bool) -> Result<NbdEndpoint> {
        let opts = OpenOptions {
            timeout: Some(Duration::from_secs(10)),
            ..OpenOptions::default()
        };
        NbdEndpoint::connect("fake", &server.uri(), &opts, writable)
    }

    #[test]
    fn read_write_zero_flush_extents() {
        let server = Server::memory(1 << 20, |_| {});
        let mut ep = endpoint(&server, true).unwrap();
        assert_eq!(ep.size(), Some(1 << 20));
        let caps = ep.capabilities();
        assert!(caps.flush && caps.extents && caps.reconnect);
        assert!(!caps.read_only && !caps.starts_zeroed && !caps.sequential);
        assert!(ep.tuning().waits_on_peer);
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        ep.write_at(&data, 4096).unwrap();
        ep.flush().unwrap();
        let mut back = vec![0u8; 65536];
        ep.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        ep.zero(8192, 4096, false).unwrap();
        ep.read_at(&mut back[..4096], 8192).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        let ext = ep.extents(0, 1 << 20).unwrap();
        assert_eq!(ext[0].offset, 0);
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        assert!(ext.iter().any(|e| e.kind == ExtentKind::Data));
        assert!(ext.iter().any(|e| e.kind == ExtentKind::Zero));
        let another = ep.connect_another().unwrap();
        assert!(another.is_some());
        ep.close().unwrap();
    }

    #[test]
    fn batches() {
        let server = Server::memory(1 << 20, |_| {});
        let mut ep = endpoint(&server, true).unwrap();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 8192];
        ep.write_batch(&[
            WriteOp::Write {
                offset: 0,
                data: Payload::copied(&a),
            },
            WriteOp::Zero {
                offset: 4096,
                length: 4096,
                allocate: true,
            },
            WriteOp::Write {
                offset: 8192,
                data: Payload::copied(&b),
            },
        ])
        .unwrap();
        let mut x = vec![9u8; 4096];
        let mut y = vec![9u8; 12288];
        ep.read_batch(&mut [
            ReadOp {
                offset: 0,
                buf: &mut x,
            },
            ReadOp {
                offset: 4096,
                buf: &mut y,
            },
        ])
        .unwrap();
        assert_eq!(x, a);
        assert!(y[..4096].iter().all(|&v| v == 0));
        assert_eq!(&y[4096..], &b[..]);
    }

    #[test]
    fn read_only_destination_is_refused() {
        let server = Server::memory(4096, |c| c.read_only = true);
        let e = endpoint(&server, true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("read-only"), "{e}");
        assert!(e.to_string().starts_with("fake: connect: "), "{e}");
        let mut ep = endpoint(&server, false).unwrap();
        assert!(ep.capabilities().read_only);
        let e = ep.write_at(&[0; 512], 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn zero_without_write_zeroes_writes_zero_buffers() {
        let server = Server::memory(16 << 20, |c| c.write_zeroes = false);
        let mut ep = endpoint(&server, true).unwrap();
        assert!(!ep.client().can_zero());
        ep.write_at(&vec![7u8; 1 << 20], 0).unwrap();
        ep.zero(0, 10 << 20, false).unwrap();
        let mut back = vec![1u8; 1 << 20];
        ep.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert!(server.max_write_seen() <= 4 << 20);
    }

    #[test]
    fn no_block_status_means_one_data_extent() {
        let server = Server::memory(8192, |c| c.structured = false);
        let mut ep = endpoint(&server, false).unwrap();
        assert!(!ep.capabilities().extents);
        let ext = ep.extents(0, 8192).unwrap();
        assert_eq!(
            ext,
            vec![Extent {
                offset: 0,
                length: 8192,
                kind: ExtentKind::Data
            }]
        );
    }

    #[test]
    fn extended_headers_look_ahead_for_extents() {
        let z = ExtentKind::Zero;
        let d = ExtentKind::Data;
        let e = |offset, length, kind| Extent {
            offset,
            length,
            kind,
        };
        let mut answers = Vec::new();
        for extended in [false, true] {
            let server = Server::memory(1 << 20, |c| c.extended = extended);
            server.fill(8192, &[1u8; 4096]);
            server.fill(300_000, &[1u8; 1]);
            let mut ep = endpoint(&server, false).unwrap();
            assert_eq!(ep.client().negotiated().extended_headers, extended);
            let mut got = Vec::new();
            for seg in 0..8u64 {
                got.push(ep.extents(seg << 17, 1 << 17).unwrap());
            }
            let asked = server
                .requests()
                .iter()
                .filter(|r| r.command == nbd::wire::NBD_CMD_BLOCK_STATUS)
                .count();
            assert_eq!(asked, if extended { 1 } else { 8 });
            answers.push(got);
        }
        assert_eq!(answers[0], answers[1]);
        // A writable endpoint (a destination read back) never looks ahead.
        let server = Server::memory(1 << 20, |c| c.extended = true);
        let mut ep = endpoint(&server, true).unwrap();
        for seg in 0..4u64 {
            ep.extents(seg << 17, 1 << 17).unwrap();
        }
        let asked = server
            .requests()
            .iter()
            .filter(|r| r.command == nbd::wire::NBD_CMD_BLOCK_STATUS)
            .count();
        assert_eq!(asked, 4);
        assert_eq!(
            answers[1][0],
            vec![
                e(0, 8192, z),
                e(8192, 4096, d),
                e(12288, (1 << 17) - 12288, z)
            ]
        );
        assert_eq!(
            answers[1][2],
            vec![
                e(1 << 18, 36_864, z),
                e(299_008, 4096, d),
                e(303_104, 90_112, z)
            ]
        );
        // Clipping keeps only what starts at the offset asked for.
        let list = [e(0, 100, z), e(100, 50, d)];
        assert_eq!(clip_extents(&list, 120, 1000), vec![e(120, 30, d)]);
        assert_eq!(
            clip_extents(&list, 50, 120),
            vec![e(50, 50, z), e(100, 20, d)]
        );
        assert!(clip_extents(&list, 150, 200).is_empty());
        assert!(clip_extents(&[], 0, 10).is_empty());
    }

    #[test]
    fn block_status_failure_is_not_fatal() {
        let server = Server::memory(8192, |c| c.fail_block_status = true);
        let mut ep = endpoint(&server, false).unwrap();
        assert!(ep.capabilities().extents);
        for _ in 0..2 {
            let ext = ep.extents(0, 8192).unwrap();
            assert_eq!(ext.len(), 1);
            assert_eq!(ext[0].kind, ExtentKind::Data);
        }
        // The connection still works.
        let mut b = [1u8; 512];
        ep.read_at(&mut b, 0).unwrap();
    }

    #[test]
    fn server_errors_name_endpoint_operation_and_place() {
        let server = Server::memory(1 << 20, |c| c.fail_at = Some(65536));
        let mut ep = endpoint(&server, true).unwrap();
        let mut b = vec![0u8; 4096];
        let e = ep.read_at(&mut b, 65536).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server);
        assert_eq!(
            e.to_string(),
            "fake: read at offset 65536 length 4096: Input/output error at offset 65536 (server said: injected failure)"
        );
        let e = ep.write_at(&b, 65536).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("fake: write at offset 65536 length 4096: "),
            "{e}"
        );
    }

    #[test]
    fn connect_another_refused_is_none() {
        let server = Server::memory(4096, |c| c.max_connections = 1);
        let ep = endpoint(&server, false).unwrap();
        assert!(ep.connect_another().unwrap().is_none());
    }

    #[test]
    fn connect_failure_names_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let uri = NbdUri::unix(dir.path().join("none.sock"), "");
        let e = NbdEndpoint::connect(
            "nbd+unix:///?socket=none.sock",
            &uri,
            &OpenOptions::default(),
            false,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(
            e.to_string()
                .starts_with("nbd+unix:///?socket=none.sock: connect: "),
            "{e}"
        );
    }

    /// A server that negotiates, answers `writes` write requests, then
    /// hangs up. Returns the URI and the server thread.
    fn vanishing_server(
        dir: &std::path::Path,
        writes: usize,
    ) -> (NbdUri, std::thread::JoinHandle<()>) {
        use nbd::testkit::{Export, Peer};
        use nbd::wire::*;
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut p = Peer::new(s);
            let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;
            p.serve_go(&Export::new(1 << 20).flags(flags).no_extents())
                .unwrap();
            for _ in 0..writes {
                let (r, _) = p.request().unwrap().expect("a write");
                assert_eq!(r.command, NBD_CMD_WRITE);
                p.simple_reply(r.cookie, 0, &[]).unwrap();
            }
        });
        (NbdUri::unix(&path, ""), t)
    }

    #[test]
    fn an_idle_connection_whose_server_went_away_flushes_and_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (uri, t) = vanishing_server(dir.path(), 0);
        let mut ep = NbdEndpoint::connect("gone", &uri, &OpenOptions::default(), true).unwrap();
        t.join().unwrap();
        // Nothing was written on it: nothing to flush, nothing lost.
        ep.flush().unwrap();
        ep.close().unwrap();
    }

    /// A payload lent to a connection that dies may still be read by the
    /// server later: its buffer is poisoned and refuses to be refilled. A
    /// copied payload's memory is the caller's again at once.
    #[test]
    fn a_connection_that_dies_poisons_the_buffers_it_may_have_lent() {
        use crate::endpoint::WriteBuffer;
        let dir = tempfile::tempdir().unwrap();
        let (uri, t) = vanishing_server(dir.path(), 0);
        let mut ep = NbdEndpoint::connect("gone", &uri, &OpenOptions::default(), true).unwrap();
        t.join().unwrap();
        let mut lent = WriteBuffer::new(1 << 20);
        lent.as_mut_slice().unwrap().fill(7);
        let copied = vec![8u8; 1 << 20];
        let e = ep
            .write_batch(&[
                WriteOp::Write {
                    offset: 0,
                    data: Payload::copied(&copied),
                },
                WriteOp::Write {
                    offset: 1 << 20,
                    data: Payload::lendable(&lent, 0..1 << 20),
                },
            ])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(lent.is_poisoned());
        assert!(lent.as_mut_slice().is_none());
    }

    #[test]
    fn a_dirty_connection_whose_server_went_away_fails_to_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (uri, t) = vanishing_server(dir.path(), 1);
        let mut ep = NbdEndpoint::connect("gone", &uri, &OpenOptions::default(), true).unwrap();
        ep.write_at(&[1u8; 4096], 0).unwrap();
        t.join().unwrap();
        let e = ep.flush().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().starts_with("gone: flush"), "{e}");
    }
}
