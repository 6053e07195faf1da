//! The copy engine.
//!
//! [`plan`] decides everything about a copy up front, from both endpoints
//! and the options, without I/O. The source is then cut into disjoint
//! segments ([`segments`]) handed out by a queue to workers (`worker`),
//! one per connection. Each worker asks its source which parts of a
//! segment hold data ([`extents`]), reads the data in batches ([`batch`]),
//! finds zero runs in it ([`zero`]) and sends the destination writes and
//! zero requests. Because segments never overlap, several connections are
//! safe even to servers that do not promise consistency between
//! connections, and the destination is never read. A source of unknown
//! size (a pipe) is copied in order (`stream`).
//!
//! The engine only sees [`Endpoint`]s; it does not know what kind of thing
//! it copies from or to.

pub mod batch;
mod blkhash;
pub mod extents;
pub mod plan;
pub mod progress;
pub mod segments;
mod stream;
mod worker;
pub mod zero;

use std::time::{Duration, Instant};

use crate::cancel::OnCancel;
use crate::endpoint::{self, Endpoint, EndpointSpec};
use crate::error::{Error, ErrorKind, Result};
use crate::options::CopyOptions;

use plan::{Plan, Shape, Side};
use progress::Tracker;

/// Most segments waiting in the queue at once.
const MAX_QUEUED_SEGMENTS: u64 = 65536;

/// What a finished copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The source's blkhash, if [`CopyOptions::blkhash`] asked for it.
    pub blkhash: Option<crate::blkhash::Blkhash>,
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
///     &EndpointSpec::parse(&src),
///     &EndpointSpec::parse(&dst),
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

/// The number of cores, which bounds the workers unless `-T` says.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Copy between endpoints already open. The handles are closed at the end.
pub fn copy_endpoints(
    mut source: Box<dyn Endpoint>,
    mut destination: Box<dyn Endpoint>,
    options: &CopyOptions,
) -> Result<CopyStats> {
    let started = Instant::now();
    let plan = Plan::new(
        &Side::of(source.as_ref()),
        &Side::of(destination.as_ref()),
        options,
        cores(),
    )?;
    let Shape::Segments { size, workers, .. } = plan.shape else {
        let tracker = Tracker::new(None, options.progress.clone());
        let shared = worker::Shared::new(&plan, tracker);
        let _linked = link_cancel(options, &shared);
        let _interrupts = interrupt_on_stop(&shared, [&*source, &*destination]);
        let result = stream::copy(&shared, source.as_mut(), destination.as_mut());
        let bytes = shared.outcome(result)?;
        let mut handles = [(source, destination)];
        finish(&plan, &shared, &mut handles)?;
        let mut stats = shared.stats(bytes, 1, started);
        stats.blkhash = shared.blkhash(bytes)?;
        return Ok(stats);
    };

    let mut handles = open_workers(source, destination, workers)?;
    let tracker = Tracker::new(Some(size), options.progress.clone());
    let shared = worker::Shared::new(&plan, tracker);
    let _linked = link_cancel(options, &shared);
    let _interrupts = interrupt_on_stop(&shared, handles.iter().flat_map(|(s, d)| [&**s, &**d]));
    run_workers(&plan, &shared, &mut handles);
    shared.outcome(Ok(()))?;
    if shared.tracker.done() != size {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "internal error: copied {} of {size} bytes",
                shared.tracker.done()
            ),
        ));
    }
    finish(&plan, &shared, &mut handles)?;
    let mut stats = shared.stats(size, handles.len(), started);
    stats.blkhash = shared.blkhash(size)?;
    Ok(stats)
}

/// One worker's source and destination handles.
type HandlePair = (Box<dyn Endpoint>, Box<dyn Endpoint>);

/// The first pair of handles and up to `want - 1` more, as many as both
/// endpoints can open.
fn open_workers(
    source: Box<dyn Endpoint>,
    destination: Box<dyn Endpoint>,
    want: usize,
) -> Result<Vec<HandlePair>> {
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
    Ok(handles)
}

/// The caller's cancel token stops this copy: the copy's own stop is
/// triggered, with "cancelled" as its outcome.
fn link_cancel(options: &CopyOptions, shared: &worker::Shared) -> OnCancel {
    let stop = shared.stopper();
    options.cancel.on_cancel(move || stop.cancelled())
}

/// When the copy stops (cancelled, or a worker failed for good), break
/// off every handle's blocked requests, so that no worker waits on a
/// server that stopped answering.
fn interrupt_on_stop<'a>(
    shared: &worker::Shared,
    handles: impl IntoIterator<Item = &'a dyn Endpoint>,
) -> Vec<OnCancel> {
    handles
        .into_iter()
        .filter_map(|h| h.interrupter())
        .map(|i| shared.stop_token().on_cancel(move || i.interrupt()))
        .collect()
}

/// Feed the segments to one thread per handle pair and wait for them all.
fn run_workers(plan: &Plan, shared: &worker::Shared, handles: &mut [HandlePair]) {
    let Shape::Segments {
        size, segment_size, ..
    } = plan.shape
    else {
        return;
    };
    // Up to 65536 segments (8 TiB) are queued at once, so the feeder thread
    // normally fills the queue and ends without ever waiting; a source
    // claiming 2^63 bytes (2^36 segments) is fed as workers take from it
    // instead of costing gigabytes of queue.
    let count = size.div_ceil(segment_size);
    let (tx, rx) = crossbeam_channel::bounded(count.clamp(1, MAX_QUEUED_SEGMENTS) as usize);
    std::thread::scope(|scope| {
        let stop = shared.stop_token();
        scope.spawn(move || {
            for segment in segments::plan(size, segment_size) {
                // Stops when the workers are gone (they hold the receivers).
                if stop.is_cancelled() || tx.send(segment).is_err() {
                    break;
                }
            }
        });
        let running: Vec<_> = handles
            .iter_mut()
            .map(|(s, d)| {
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
}

/// Wait for every write, flush every destination handle (each connection
/// may hold its own unflushed writes), then close every handle.
fn finish(plan: &Plan, shared: &worker::Shared, handles: &mut [HandlePair]) -> Result<()> {
    let result = (|| {
        // Writes may still be unanswered (see `Endpoint::settle`): a copy
        // has not succeeded until every one has.
        for (_, d) in handles.iter_mut() {
            d.settle()?;
        }
        if plan.final_flush {
            for (_, d) in handles.iter_mut() {
                d.flush()?;
            }
        }
        for (s, d) in handles.iter_mut() {
            d.close()?;
            s.close()?;
        }
        Ok(())
    })();
    // Cancelled meanwhile: that, not the broken connection, is the news.
    shared.outcome(result)
}
