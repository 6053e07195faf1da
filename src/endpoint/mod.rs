//! Endpoints: the things nbdcp copies from and to.
//!
//! Every kind (regular file, block device, pipe, `null:`, NBD server, NBD
//! server subprocess) implements [`Endpoint`]. The copy engine in
//! [`crate::engine`] only ever talks to this trait, in the manner of the
//! operations tables of libnbd's `copy/`.
//!
//! An `Endpoint` value is one *handle* (one file descriptor or one NBD
//! connection) and is driven by exactly one thread. Further handles for
//! parallel workers come from [`Endpoint::connect_another`].

use std::fmt;

use crate::error::Result;

mod buffer;
mod children;
pub mod file;
pub mod nbd;
pub mod null;
mod pagecache;
pub mod spec;
pub mod stream;
pub mod subprocess;

pub use buffer::{Payload, WriteBuffer};
pub(crate) use children::kill_all as kill_started_servers;
pub use spec::{EndpointSpec, OpenOptions, check_distinct, open_destination, open_source};

/// What a region of an endpoint holds, as far as the endpoint can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// May contain non-zero bytes: must be read.
    Data,
    /// Known to read back as zeroes (a hole, or zero-allocated blocks).
    Zero,
}

/// A run of bytes `[offset, offset + length)` of one [`ExtentKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Start of the run, in bytes from the start of the endpoint.
    pub offset: u64,
    /// Length of the run in bytes; never zero in a list an endpoint returns.
    pub length: u64,
    /// What the run holds.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last byte of the run.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// A run for unit tests: zeroes if `zero`, else data.
    #[cfg(test)]
    pub(crate) fn test(offset: u64, length: u64, zero: bool) -> Extent {
        Extent {
            offset,
            length,
            kind: if zero {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            },
        }
    }
}

/// Size constraints an endpoint places on requests, in bytes (the NBD
/// crate's type: NBD servers state them, and other kinds fit the same
/// three numbers).
pub use ::nbd::BlockSize;

/// What an endpoint can do, learnt when it is opened. The engine's plan
/// (see [`crate::engine`]) decides from these what a copy may do.
///
/// New abilities may be added in any release; start from the default
/// (nothing) and set what the endpoint has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Writes are refused.
    pub read_only: bool,
    /// Data can only be read or written in order, once (a pipe).
    pub sequential: bool,
    /// [`Endpoint::flush`] does something (otherwise it is a no-op).
    pub flush: bool,
    /// [`Endpoint::extents`] returns real information.
    pub extents: bool,
    /// [`Endpoint::reconnect`] can restore a lost connection.
    pub reconnect: bool,
    /// The endpoint reads back as all zeroes before the copy writes anything
    /// (a freshly created or truncated file, `null:`).
    pub starts_zeroed: bool,
    /// What is written can be read back (`--verify`): not `null:` or a
    /// pipe.
    pub read_back: bool,
    /// An NBD server advertised that several connections see one
    /// another's writes. nbdcp does not need it (workers write disjoint
    /// segments); it is reported (`-v`).
    pub multi_conn: bool,
}

/// How an endpoint is best driven: hints that change speed, never the
/// result. The default states no preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tuning {
    /// Several requests in flight at once go faster than one at a time,
    /// because each waits on a peer (a network server); batches are sized
    /// for it, and a source that waits gets an extra worker.
    pub waits_on_peer: bool,
    /// Request size this endpoint does best with, used unless the user
    /// sets one; 0 leaves it to the engine.
    pub request_size: usize,
    /// Largest write this destination does best with while it answers
    /// quickly, used unless the user sets a request size: longer writes
    /// are cut to it. 0 leaves it to the engine.
    pub write_size: usize,
    /// Most bytes of data per batch this endpoint does best with when
    /// requests are pipelined; 0 leaves it to the engine.
    pub batch_size: usize,
    /// Finding runs of zeroes in data and sending them as zero requests
    /// saves this destination work (`false` for `null:`, which throws
    /// writes away).
    pub zero_scan: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            waits_on_peer: false,
            request_size: 0,
            write_size: 0,
            batch_size: 0,
            zero_scan: true,
        }
    }
}

/// Breaks off an endpoint's blocked requests from another thread
/// ([`Endpoint::interrupter`]), so that cancelling a copy does not wait for
/// a server that stopped answering.
pub struct Interrupter(Box<dyn Fn() + Send + Sync>);

impl Interrupter {
    /// An interrupter that runs `f`; it must make calls blocked on the
    /// endpoint return (with an error) promptly, and be harmless to call
    /// more than once.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Interrupter {
        Interrupter(Box::new(f))
    }

    /// Break the endpoint's requests off.
    pub fn interrupt(&self) {
        (self.0)()
    }
}

impl fmt::Debug for Interrupter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Interrupter")
    }
}

/// One write-side operation, as the engine hands them to
/// [`Endpoint::write_batch`].
#[derive(Debug)]
pub enum WriteOp<'a> {
    /// Write `data` at `offset`.
    Write {
        /// Destination offset.
        offset: u64,
        /// Bytes to write, and whether the endpoint may lend them to the
        /// kernel rather than copy them.
        data: Payload<'a>,
    },
    /// Make `[offset, offset + length)` read back as zeroes.
    Zero {
        /// Destination offset.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// Blocks must stay allocated (`--allocated`).
        allocate: bool,
    },
}

/// One read request, as the engine hands them to [`Endpoint::read_batch`].
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// Source offset.
    pub offset: u64,
    /// Buffer to fill completely.
    pub buf: &'a mut [u8],
}

/// One handle on a source or destination.
///
/// Methods take `&mut self` because a handle is owned by one thread. Errors
/// carry the endpoint name, the operation, and the offset and length.
pub trait Endpoint: Send {
    /// The name the user gave (path, URI, `-`, `null:`), for messages.
    fn name(&self) -> &str;

    /// What kind of endpoint this is, for messages: `"file"`, `"block
    /// device"`, `"pipe"`, `"null"`, `"nbd"`; `"custom"` unless an
    /// implementation says.
    fn kind(&self) -> &'static str {
        "custom"
    }

    /// Size in bytes, or `None` where it is unknown (stdin) or unbounded
    /// (`null:`, stdout).
    fn size(&self) -> Option<u64>;

    /// What this endpoint can do.
    fn capabilities(&self) -> Capabilities;

    /// How this endpoint is best driven.
    fn tuning(&self) -> Tuning {
        Tuning::default()
    }

    /// Request size constraints.
    fn block_size(&self) -> BlockSize {
        BlockSize::default()
    }

    /// How long this endpoint's peer recently took to answer a read, if
    /// it has one and has answered: the engine keeps more reads in flight
    /// the longer it is. `None` for local files and pipes.
    fn read_latency(&self) -> Option<std::time::Duration> {
        None
    }

    /// How long this endpoint's peer took to answer a write, zero or trim
    /// request, if it has one and has answered: the engine sends longer
    /// writes to a slow one. `None` for local files and pipes.
    fn write_latency(&self) -> Option<std::time::Duration> {
        None
    }

    /// Fill `buf` from `offset`. A short read (end of stream) is an error,
    /// except for sequential sources, which use [`Endpoint::read_stream`].
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Read from a sequential source into `buf`; returns the number of bytes
    /// read, 0 at end of stream, and fills `buf` completely otherwise unless
    /// the stream ends. Random-access endpoints read at the running offset.
    fn read_stream(&mut self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let len = match self.size() {
            Some(size) => (size.saturating_sub(offset)).min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        self.read_at(&mut buf[..len], offset)?;
        Ok(len)
    }

    /// Perform several reads. Network endpoints keep them in flight
    /// together; the default does them one by one.
    fn read_batch(&mut self, ops: &mut [ReadOp<'_>]) -> Result<()> {
        for op in ops.iter_mut() {
            self.read_at(op.buf, op.offset)?;
        }
        Ok(())
    }

    /// Read the batches of `batches` in order, keeping the later ones'
    /// reads in flight meanwhile, and return once `batches[0]` is filled.
    /// `batches[i]` is batch `first + i`: the next call passes the batches
    /// not yet returned again, with the same buffers, starting with
    /// `first + 1`, and may add more at the end. Any other call abandons
    /// reads left in flight ([`Endpoint::abandon_reads`]). Network
    /// endpoints keep the server busy between batches this way; the
    /// default reads the first batch alone.
    fn read_ahead(&mut self, first: u64, batches: &mut [Vec<ReadOp<'_>>]) -> Result<()> {
        let _ = first;
        match batches.first_mut() {
            Some(batch) => self.read_batch(batch),
            None => Ok(()),
        }
    }

    /// Drop the reads [`Endpoint::read_ahead`] left in flight (their
    /// batches will not be passed again): wait for them and discard the
    /// data.
    fn abandon_reads(&mut self) -> Result<()> {
        Ok(())
    }

    /// Write `data` at `offset`.
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()>;

    /// Make `[offset, offset + length)` read back as zeroes, deallocating
    /// it where possible unless `allocate` is set.
    fn zero(&mut self, offset: u64, length: u64, allocate: bool) -> Result<()>;

    /// Perform several writes and zeroes. Network endpoints keep them in
    /// flight together, and may return before the last are answered (their
    /// failures then come from a later call, [`Endpoint::settle`] or
    /// [`Endpoint::flush`]). A payload is only lent rather than copied if
    /// it lives in a [`WriteBuffer`] ([`Payload::lendable`]); should the
    /// connection fail while lent pages may still be read, the endpoint
    /// poisons that buffer, which then refuses to be written to again.
    /// The default does them one by one, in order.
    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<()> {
        for op in ops {
            match op {
                WriteOp::Write { offset, data } => self.write_at(data, *offset)?,
                WriteOp::Zero {
                    offset,
                    length,
                    allocate,
                } => self.zero(*offset, *length, *allocate)?,
            }
        }
        Ok(())
    }

    /// Wait for the outcome of every write [`Endpoint::write_batch`] left
    /// in flight, returning the first failure.
    fn settle(&mut self) -> Result<()> {
        Ok(())
    }

    /// Make all completed writes durable.
    fn flush(&mut self) -> Result<()>;

    /// Describe `[offset, offset + length)` as a sorted, gap-free list of
    /// extents starting at `offset`. It may end early (the caller asks
    /// again from where it ends) but never returns an empty list for a
    /// non-empty range. Endpoints without the information return one
    /// `Data` extent.
    fn extents(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            length,
            kind: ExtentKind::Data,
        }])
    }

    /// Open another independent handle on the same endpoint for another
    /// worker, or `None` if the endpoint cannot have more than one (a pipe,
    /// a server refusing further connections).
    fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>>;

    /// Replace a failed connection with a new one to the same place, after
    /// which requests may be sent again. Only for endpoints whose
    /// [`Capabilities::reconnect`] is set.
    fn reconnect(&mut self) -> Result<()> {
        Err(
            crate::Error::new(crate::ErrorKind::Unsupported, "cannot reconnect")
                .with_endpoint(self.name()),
        )
    }

    /// Something another thread can call to break off this handle's
    /// blocked requests, or `None` if nothing it does can block for long
    /// (a local file). The engine calls it when the copy is cancelled or
    /// another worker failed.
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }

    /// Tell the destination the final size once a source of unknown size
    /// (a pipe) has ended. A file nbdcp created takes that size; endpoints
    /// of fixed size do nothing.
    fn resize_to(&mut self, _size: u64) -> Result<()> {
        Ok(())
    }

    /// Finish cleanly (NBD: send `NBD_CMD_DISC`). Called once, after the
    /// last operation on a handle that succeeded.
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

impl fmt::Debug for dyn Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name())
            .field("size", &self.size())
            .finish()
    }
}
