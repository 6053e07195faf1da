//! The copy engine.
//!
//! The source is cut into disjoint segments ([`segments`]) handed out by a
//! queue to workers ([`worker`]), one per connection. Each worker asks its
//! source which parts of a segment hold data ([`extents`]), reads the data
//! in batches ([`batch`]), finds zero runs in it ([`zero`]) and sends the
//! destination writes and zero requests. Because segments never overlap,
//! several connections are safe even to servers that do not promise
//! consistency between connections, and the destination is never read.
//! A source of unknown size (a pipe) is copied in order by [`stream`].
//!
//! The engine only sees [`Endpoint`]s; it does not know what kind of thing
//! it copies from or to.

pub mod batch;
pub mod extents;
pub mod progress;
pub mod segments;
pub(crate) mod stream;
pub(crate) mod worker;
pub mod zero;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::endpoint::{self, Endpoint, EndpointSpec, OpenOptions};
use crate::error::{Error, ErrorKind, Result};

use batch::Limits;
use progress::Tracker;
pub use progress::{Progress, ProgressFn};
use segments::DEFAULT_SEGMENT_SIZE;

/// The largest request nbdcp ever sends, as NBD servers commonly allow.
pub const MAX_REQUEST_SIZE: usize = 32 * 1024 * 1024;
/// Most data in one batch. Measured on qcow2 -> qcow2 through qemu-nbd
/// (2 cores shared with both servers): 2 MiB batches cost 0.34 s of CPU
/// and 1.0 s wall for 2 GiB, 8 MiB batches 0.45 s and 1.6-3.8 s, because
/// data received into a small batch is still in cache when it is sent on.
/// `--queue-size` stays the upper bound.
pub const BATCH_TARGET: usize = 2 * 1024 * 1024;
/// Most segments waiting in the queue at once.
const MAX_QUEUED_SEGMENTS: u64 = 65536;
/// Default `--retries`: with the back-off this gives a server about three
/// seconds to come back.
pub const DEFAULT_RETRIES: u32 = 5;
/// The request size for endpoints that state no preference (files, pipes,
/// NBD over TCP), as nbdcopy's default.
pub const DEFAULT_REQUEST_SIZE: usize = 256 * 1024;
/// The smallest `--request-size`.
pub const MIN_REQUEST_SIZE: usize = 4096;

/// Lets another thread stop a copy. Cloning shares the same flag.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    /// A token sharing an existing flag (e.g. one set by a signal handler).
    pub fn from_flag(flag: Arc<AtomicBool>) -> CancelToken {
        CancelToken(flag)
    }

    /// The flag behind the token.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Ask the copy to stop; it ends with an [`ErrorKind::Cancelled`] error
    /// after the requests in flight complete.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How to copy. `Default` gives nbdcopy's defaults (flushing at the end,
/// unlike nbdcopy, so that a reported success is on stable storage).
#[derive(Clone)]
pub struct CopyOptions {
    /// Connections to open to each NBD endpoint (`-C`); also the most
    /// workers for other kinds.
    pub connections: usize,
    /// Most workers (`-T`); 0 means the number of cores, plus one when the
    /// source is a server that is waited on.
    pub threads: usize,
    /// Most requests in flight per connection (`-R`).
    pub requests: usize,
    /// Largest single read (`--request-size`), a power of two; `None`
    /// lets each copy choose from its endpoints (see [`DEFAULT_REQUEST_SIZE`]).
    pub request_size: Option<usize>,
    /// Bytes of data in flight per worker (`--queue-size`).
    pub queue_size: usize,
    /// Zero-detection block size in data (`-S`), 0 for none.
    pub sparse_size: usize,
    /// Leave the destination fully allocated (`--allocated`).
    pub allocated: bool,
    /// The destination already reads as zeroes (`--destination-is-zero`).
    pub destination_is_zero: bool,
    /// Flush the destination at the end (default; `--no-flush` clears it).
    pub flush: bool,
    /// Ask the source which parts hold data (`--no-extents` clears it).
    pub extents: bool,
    /// One worker, one request at a time (`--synchronous`).
    pub synchronous: bool,
    /// Fail a request to an NBD server that takes longer than this.
    pub timeout: Option<Duration>,
    /// Times a segment is retried after a dropped or stalled connection,
    /// reconnecting first (`--retries`); 0 turns retrying off.
    pub retries: u32,
    /// Size of the pieces the source is cut into for the workers.
    pub segment_size: u64,
    /// Told about progress from worker threads.
    pub progress: Option<ProgressFn>,
    /// Lets another thread stop the copy.
    pub cancel: CancelToken,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            connections: 4,
            threads: 0,
            requests: 64,
            request_size: None,
            queue_size: 16 * 1024 * 1024,
            sparse_size: 4096,
            allocated: false,
            destination_is_zero: false,
            flush: true,
            extents: true,
            synchronous: false,
            timeout: None,
            retries: DEFAULT_RETRIES,
            segment_size: DEFAULT_SEGMENT_SIZE,
            progress: None,
            cancel: CancelToken::new(),
        }
    }
}

impl std::fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("connections", &self.connections)
            .field("threads", &self.threads)
            .field("requests", &self.requests)
            .field("request_size", &self.request_size)
            .field("queue_size", &self.queue_size)
            .field("sparse_size", &self.sparse_size)
            .field("allocated", &self.allocated)
            .field("destination_is_zero", &self.destination_is_zero)
            .field("flush", &self.flush)
            .field("extents", &self.extents)
            .field("synchronous", &self.synchronous)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl CopyOptions {
    /// Check the values make sense together.
    pub fn validate(&self) -> Result<()> {
        if self.connections == 0 {
            return Err(Error::usage("--connections must be at least 1"));
        }
        if self.requests == 0 {
            return Err(Error::usage("--requests must be at least 1"));
        }
        if let Some(size) = self.request_size {
            if !size.is_power_of_two() || !(MIN_REQUEST_SIZE..=MAX_REQUEST_SIZE).contains(&size) {
                return Err(Error::usage(format!(
                    "--request-size must be a power of two from {MIN_REQUEST_SIZE} to {MAX_REQUEST_SIZE}, not {size}"
                )));
            }
        }
        let smallest_request = self.request_size.unwrap_or(MIN_REQUEST_SIZE);
        if self.queue_size < smallest_request {
            return Err(Error::usage(format!(
                "--queue-size ({}) must be at least --request-size ({smallest_request})",
                self.queue_size
            )));
        }
        if self.sparse_size != 0
            && (!self.sparse_size.is_power_of_two()
                || self.sparse_size < 512
                || self.sparse_size > self.request_size.unwrap_or(MAX_REQUEST_SIZE))
        {
            return Err(Error::usage(format!(
                "--sparse must be 0 or a power of two from 512 to --request-size, not {}",
                self.sparse_size
            )));
        }
        // A power of two at least the request size is a multiple of it.
        if !self.segment_size.is_power_of_two() || self.segment_size < smallest_request as u64 {
            return Err(Error::usage(
                "segment size must be a power of two, at least the request size",
            ));
        }
        Ok(())
    }

    /// Options for opening endpoints for this copy.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            requests: if self.synchronous { 1 } else { self.requests },
            queue_size: self.queue_size,
            timeout: self.timeout,
        }
    }

    /// Most workers: `-C` bounded by `-T`. Left to choose (`-T 0`), the
    /// bound is the number of cores, plus one when the source is a server
    /// that is waited on (`source_waits`).
    ///
    /// Each worker asks the source, waits for its answer, then sends on,
    /// so with a server as source a worker spends part of its time idle.
    /// Measured on 2 cores (alternating runs, medians): nbdkit
    /// sparse-random to `null:` took 0.76 times as long with 3 workers as
    /// with 2 (1 TiB with 0.1 % data) and 0.87 times (16 GiB with 6 %);
    /// qemu-nbd qcow2 to qcow2 0.96 times, qemu-nbd to a file and to
    /// `null:` the same. Copies from a local file are CPU work: 3 workers
    /// took 1.15 times as long file to file and 1.04 times file to
    /// qemu-nbd, so they keep one per core.
    fn worker_limit(&self, source_waits: bool) -> usize {
        if self.synchronous {
            return 1;
        }
        let threads = if self.threads == 0 {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores + usize::from(source_waits)
        } else {
            self.threads
        };
        self.connections.min(threads).max(1)
    }
}

/// What a finished copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of the source copied (its size, for a complete copy).
    pub bytes: u64,
    /// Bytes sent to the destination as data.
    pub written: u64,
    /// Bytes zeroed on the destination by zero requests.
    pub zeroed: u64,
    /// Workers (connections per endpoint) used.
    pub workers: usize,
    /// Wall-clock time of the copy, including opening extra connections
    /// and the final flush.
    pub elapsed: Duration,
}

/// Open `source` and `destination` and copy the one to the other.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use nbdcp::{copy, CopyOptions, EndpointSpec};
/// let dir = tempfile::tempdir()?;
/// let src = dir.path().join("src.img");
/// let dst = dir.path().join("dst.img");
/// std::fs::write(&src, vec![7u8; 1 << 20])?;
/// let stats = copy(
///     &EndpointSpec::parse(src.to_str().unwrap()),
///     &EndpointSpec::parse(dst.to_str().unwrap()),
///     &CopyOptions::default(),
/// )?;
/// assert_eq!(stats.bytes, 1 << 20);
/// assert_eq!(std::fs::read(&dst)?, vec![7u8; 1 << 20]);
/// # Ok(()) }
/// ```
pub fn copy(
    source: &EndpointSpec,
    destination: &EndpointSpec,
    options: &CopyOptions,
) -> Result<CopyStats> {
    options.validate()?;
    endpoint::check_distinct(source, destination)?;
    let open = options.open_options();
    let src = endpoint::open_source(source, &open)?;
    let dst = endpoint::open_destination(destination, src.size(), &open)?;
    copy_endpoints(src, dst, options)
}

/// The request size when the user did not choose one: the smallest that
/// an endpoint asks for, else [`DEFAULT_REQUEST_SIZE`]; never more than
/// the queue holds, nor less than the zero-detection block.
fn auto_request_size(
    scaps: &endpoint::Capabilities,
    dcaps: &endpoint::Capabilities,
    options: &CopyOptions,
) -> usize {
    let asked =
        smallest_hint(scaps.request_hint, dcaps.request_hint).unwrap_or(DEFAULT_REQUEST_SIZE);
    let queue_bound = 1usize << options.queue_size.max(MIN_REQUEST_SIZE).ilog2();
    let segment_bound = usize::try_from(options.segment_size).unwrap_or(MAX_REQUEST_SIZE);
    asked
        .min(queue_bound)
        .min(segment_bound)
        .max(options.sparse_size)
        .clamp(MIN_REQUEST_SIZE, MAX_REQUEST_SIZE)
}

/// The smaller of two endpoint hints, where 0 means "no preference".
fn smallest_hint(a: usize, b: usize) -> Option<usize> {
    [a, b].into_iter().filter(|&hint| hint > 0).min()
}

/// Copy between endpoints already open. The handles are closed at the end.
pub fn copy_endpoints(
    mut source: Box<dyn Endpoint>,
    mut destination: Box<dyn Endpoint>,
    options: &CopyOptions,
) -> Result<CopyStats> {
    options.validate()?;
    let started = Instant::now();
    let scaps = source.capabilities();
    let dcaps = destination.capabilities();
    if dcaps.read_only {
        return Err(
            Error::new(ErrorKind::Unsupported, "the destination is read-only")
                .with_endpoint(destination.name()),
        );
    }
    let (smin, dmin) = (
        source.block_size().minimum as usize,
        destination.block_size().minimum as usize,
    );
    let align = smin.max(dmin).max(1);
    let chunk = options
        .request_size
        .unwrap_or_else(|| auto_request_size(&scaps, &dcaps, options))
        .next_multiple_of(align);
    let overlap = !options.synchronous;
    let in_flight = if overlap {
        options.queue_size / 2
    } else {
        options.queue_size
    };
    // Batches exist to keep requests in flight; local files and pipes take
    // one request at a time, and a batch of one request stays in cache.
    let batch_bytes = if scaps.pipelined || dcaps.pipelined {
        let target = in_flight.min(BATCH_TARGET);
        smallest_hint(scaps.batch_hint, dcaps.batch_hint).map_or(target, |hint| hint.min(target))
    } else {
        chunk
    };
    let limits = Limits {
        chunk,
        requests: if options.synchronous {
            1
        } else {
            options.requests
        },
        batch_bytes: batch_bytes.max(chunk),
        sparse: if options.sparse_size == 0 || dcaps.discards {
            0
        } else {
            options.sparse_size.next_multiple_of(dmin.max(1))
        },
        skip_zeroes: (dcaps.starts_zeroed || options.destination_is_zero) && !options.allocated,
        allocate: options.allocated,
        merge_writes: chunk.clamp(4 * 1024 * 1024, MAX_REQUEST_SIZE),
        tail_end: source.size().unwrap_or(u64::MAX),
        tail_align: dmin.max(1) as u64,
    };

    if scaps.sequential || source.size().is_none() {
        let tracker = Tracker::new(None, options.progress.clone());
        let shared =
            worker::Shared::new(limits, false, align as u64, false, &options.cancel, tracker);
        let bytes = stream::copy(&shared, source.as_mut(), destination.as_mut())?;
        finish(options, &mut [(source, destination)], &dcaps)?;
        return Ok(CopyStats {
            bytes,
            written: shared.written.into_inner(),
            zeroed: shared.zeroed.into_inner(),
            workers: 1,
            elapsed: started.elapsed(),
        });
    }

    let size = source.size().unwrap_or(0);
    if let Some(dsize) = destination.size() {
        if dsize < size {
            return Err(Error::new(
                ErrorKind::TooSmall,
                format!("destination is too small: it has {dsize} bytes, the source has {size}"),
            )
            .with_endpoint(destination.name()));
        }
    }

    let want = if dcaps.sequential {
        1
    } else {
        options.worker_limit(scaps.pipelined)
    };
    let mut handles = vec![(source, destination)];
    while handles.len() < want {
        let (s, d) = &handles[0];
        let Some(s2) = s.connect_another()? else {
            break;
        };
        let Some(d2) = d.connect_another()? else {
            break;
        };
        handles.push((s2, d2));
    }
    if handles.len() < want {
        log::info!("using {} connection(s) instead of {want}", handles.len());
    }

    // Up to 65536 segments (8 TiB) are queued at once, so the feeder thread
    // normally fills the queue and ends without ever waiting; a source
    // claiming 2^63 bytes (2^36 segments) is fed as workers take from it
    // instead of costing gigabytes of queue.
    let count = size.div_ceil(options.segment_size);
    let (tx, rx) = crossbeam_channel::bounded(count.clamp(1, MAX_QUEUED_SEGMENTS) as usize);

    let tracker = Tracker::new(Some(size), options.progress.clone());
    let mut shared = worker::Shared::new(
        limits,
        options.extents && scaps.extents,
        align as u64,
        overlap,
        &options.cancel,
        tracker,
    );
    shared.retries = options.retries;
    shared.flush_segments =
        options.flush && options.retries > 0 && dcaps.flush && handles[0].1.can_reconnect();
    let workers = handles.len();
    std::thread::scope(|scope| {
        let cancel = &options.cancel;
        let segment_size = options.segment_size;
        scope.spawn(move || {
            for segment in segments::plan(size, segment_size) {
                // Stops when the workers are gone (they hold the receivers).
                if cancel.is_cancelled() || tx.send(segment).is_err() {
                    break;
                }
            }
        });
        let running: Vec<_> = handles
            .iter_mut()
            .map(|(s, d)| {
                let shared = &shared;
                let rx = rx.clone();
                scope.spawn(move || worker::run(shared, s.as_mut(), d.as_mut(), &rx))
            })
            .collect();
        drop(rx);
        for r in running {
            if r.join().is_err() {
                shared.fail(Error::new(
                    ErrorKind::Io,
                    "internal error: a worker thread panicked",
                ));
            }
        }
    });
    if let Some(err) = shared.take_error() {
        return Err(err);
    }
    if shared.tracker.done() != size {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "internal error: copied {} of {size} bytes",
                shared.tracker.done()
            ),
        ));
    }
    finish(options, &mut handles, &dcaps)?;
    Ok(CopyStats {
        bytes: size,
        written: shared.written.into_inner(),
        zeroed: shared.zeroed.into_inner(),
        workers,
        elapsed: started.elapsed(),
    })
}

/// One worker's source and destination handles.
type HandlePair = (Box<dyn Endpoint>, Box<dyn Endpoint>);

/// Flush every destination handle (each connection may hold its own
/// unflushed writes), then close every handle.
fn finish(
    options: &CopyOptions,
    handles: &mut [HandlePair],
    dcaps: &endpoint::Capabilities,
) -> Result<()> {
    // Writes may still be unanswered (see `Endpoint::settle`): a copy has
    // not succeeded until every one has.
    for (_, d) in handles.iter_mut() {
        d.settle()?;
    }
    if options.flush && dcaps.flush {
        for (_, d) in handles.iter_mut() {
            d.flush()?;
        }
    }
    for (s, d) in handles.iter_mut() {
        d.close()?;
        s.close()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Capabilities;

    fn hinting(request_hint: usize) -> Capabilities {
        Capabilities {
            request_hint,
            ..Capabilities::default()
        }
    }

    #[test]
    fn a_server_source_gets_one_worker_more_than_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let many = CopyOptions {
            connections: 64,
            ..CopyOptions::default()
        };
        assert_eq!(many.worker_limit(false), cores);
        assert_eq!(many.worker_limit(true), cores + 1);
        // -C and an explicit -T bound it; --synchronous is one worker.
        let two = CopyOptions {
            connections: 2,
            ..CopyOptions::default()
        };
        assert_eq!(two.worker_limit(true), 2.min(cores + 1));
        let three = CopyOptions {
            threads: 3,
            ..many.clone()
        };
        assert_eq!(three.worker_limit(true), 3);
        assert_eq!(three.worker_limit(false), 3);
        let sync = CopyOptions {
            synchronous: true,
            ..many
        };
        assert_eq!(sync.worker_limit(true), 1);
    }

    #[test]
    fn request_size_follows_the_endpoints_unless_the_user_chose() {
        let o = CopyOptions::default();
        let none = Capabilities::default();
        let (unix, tcp) = (hinting(1 << 20), hinting(256 << 10));
        assert_eq!(auto_request_size(&none, &none, &o), DEFAULT_REQUEST_SIZE);
        assert_eq!(auto_request_size(&unix, &none, &o), 1 << 20);
        assert_eq!(auto_request_size(&none, &unix, &o), 1 << 20);
        // The smaller wish wins: a TCP side keeps its small requests.
        assert_eq!(auto_request_size(&unix, &tcp, &o), 256 << 10);
        // Never more than the queue holds or a segment spans.
        let small_queue = CopyOptions {
            queue_size: 600 << 10,
            ..CopyOptions::default()
        };
        assert_eq!(auto_request_size(&unix, &none, &small_queue), 512 << 10);
        let small_segments = CopyOptions {
            segment_size: 64 << 10,
            ..CopyOptions::default()
        };
        assert_eq!(auto_request_size(&unix, &none, &small_segments), 64 << 10);
        // At least a zero-detection block.
        let big_sparse = CopyOptions {
            sparse_size: 2 << 20,
            ..CopyOptions::default()
        };
        assert_eq!(auto_request_size(&unix, &none, &big_sparse), 2 << 20);
    }

    #[test]
    fn validation_with_and_without_a_request_size() {
        assert!(CopyOptions::default().validate().is_ok());
        let explicit = |request_size, queue_size, sparse_size| CopyOptions {
            request_size: Some(request_size),
            queue_size,
            sparse_size,
            ..CopyOptions::default()
        };
        assert!(explicit(64 << 10, 16 << 20, 4096).validate().is_ok());
        assert!(explicit(3000, 16 << 20, 4096).validate().is_err());
        assert!(explicit(1 << 20, 512 << 10, 4096).validate().is_err());
        assert!(explicit(64 << 10, 16 << 20, 128 << 10).validate().is_err());
        let auto_big_sparse = CopyOptions {
            sparse_size: 1 << 20,
            ..CopyOptions::default()
        };
        assert!(auto_big_sparse.validate().is_ok());
    }
}
