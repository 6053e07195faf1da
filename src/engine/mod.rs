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
pub mod events;
pub mod extents;
mod journal;
pub mod plan;
pub mod progress;
mod rate;
pub mod report;
pub mod segments;
mod stream;
mod verify;
mod worker;
pub mod zero;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cancel::OnCancel;
use crate::endpoint::{self, Endpoint, EndpointSpec};
use crate::error::{Error, ErrorKind, Result};
use crate::options::CopyOptions;

use journal::Journal;
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
    /// Bytes an earlier run had copied, by its journal, and were skipped.
    pub resumed: u64,
    /// The journal said the copy was already complete: nothing was done.
    pub already_complete: bool,
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
    let mut journal = options.journal.as_deref().map(Journal::open).transpose()?;
    let mut open = options.open_options();
    // Resuming: the destination holds the earlier run's work.
    if journal.as_ref().is_some_and(Journal::started) {
        open.preserve_destination = true;
    }
    let src = endpoint::open_source(source, &open)?;
    // Another copy's journal is refused before the destination is even
    // opened (opening a file destination may truncate or grow it).
    if let Some(journal) = &mut journal {
        let name = destination.name();
        journal.begin(&journal_header(src.name(), src.size(), &name, options))?;
    }
    // A range ends where it ends on the destination; past the end of the
    // source is refused by the plan.
    let end = match (src.size(), options.is_range()) {
        (Some(size), true) => {
            let length = options
                .length
                .unwrap_or_else(|| size.saturating_sub(options.source_offset));
            Some(options.destination_offset.saturating_add(length))
        }
        (size, _) => size,
    };
    let dst = endpoint::open_destination(destination, end, &open)?;
    run(src, dst, options, journal)
}

/// The number of cores, which bounds the workers unless `-T` says.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Copy between endpoints already open. The handles are closed at the end.
///
/// With [`CopyOptions::journal`] naming a journal an earlier run started,
/// `destination` must have been opened without truncating it (as
/// [`copy()`] does).
pub fn copy_endpoints(
    source: Box<dyn Endpoint>,
    destination: Box<dyn Endpoint>,
    options: &CopyOptions,
) -> Result<CopyStats> {
    let journal = options.journal.as_deref().map(Journal::open).transpose()?;
    run(source, destination, options, journal)
}

/// The journal's header for a copy from `source` (of `size` bytes) to
/// `destination`, by their names.
fn journal_header(
    source: &str,
    size: Option<u64>,
    destination: &str,
    options: &CopyOptions,
) -> journal::Header {
    let size = size.unwrap_or(0);
    journal::Header {
        source: source.to_string(),
        destination: destination.to_string(),
        size,
        segment_size: options.segment_size,
        source_offset: options.source_offset,
        destination_offset: options.destination_offset,
        length: options
            .length
            .unwrap_or_else(|| size.saturating_sub(options.source_offset)),
        allocated: options.allocated,
        destination_is_zero: options.destination_is_zero,
        sparse_size: options.sparse_size,
    }
}

/// Check the journal belongs to this copy (writing its header if new);
/// `Ok(true)` if an earlier run already finished it.
fn resume(
    journal: Option<&mut Journal>,
    source: &dyn Endpoint,
    destination: &dyn Endpoint,
    options: &CopyOptions,
) -> Result<bool> {
    let Some(journal) = journal else {
        return Ok(false);
    };
    let header = journal_header(source.name(), source.size(), destination.name(), options);
    journal.begin(&header)?;
    Ok(journal.complete())
}

/// Time one small read of a server source before the plan, when its
/// answer could change the number of workers (a slow source gets `-C`,
/// see [`plan::SLOW_SOURCE`]); the worker connections then start from
/// it (see `Client::share_latencies_with`), as it is the one read
/// answered while the server has nothing else to do. One round trip, for
/// the first block of data the copy reads (a hole is not read, by the
/// copy or here), so that a server that refuses it or breaks the
/// protocol fails the copy as the copy's own read would; a failed
/// connection that may be retried is left to the first worker, which
/// reconnects with the back-off.
fn sample_read_latency(source: &mut dyn Endpoint, options: &CopyOptions) -> Result<()> {
    let could_matter = source.tuning().waits_on_peer
        && options.threads == 0
        && !options.synchronous
        && options.connections > cores() + 1
        && !source.capabilities().sequential
        && source.read_latency().is_none();
    let at = options.source_offset;
    let Some(left) = source
        .size()
        .map(|size| size.saturating_sub(at))
        .filter(|&left| left > 0 && could_matter)
    else {
        return Ok(());
    };
    let first = segments::Segment {
        offset: at,
        length: left.min(options.segment_size.max(1)),
    };
    let data = if options.extents && source.capabilities().extents {
        // The first worker asks the same; a server keeps the answer.
        match extents::describe(source, first) {
            Ok(found) => found
                .into_iter()
                .find(|e| e.kind == endpoint::ExtentKind::Data),
            // The copy meets this too, and says so.
            Err(_) => return Ok(()),
        }
    } else {
        extents::all_data(first).into_iter().next()
    };
    let Some(data) = data else {
        return Ok(());
    };
    let minimum = u64::from(source.block_size().minimum.max(1));
    let len = minimum.max(4096).min(data.length);
    let len = len - len % minimum;
    if len == 0 {
        return Ok(());
    }
    let mut probe = vec![0u8; len as usize];
    // A server that does not answer must not hold up a cancel: the read
    // is broken off at once (the copy then ends as cancelled).
    let _linked = source
        .interrupter()
        .map(|i| options.cancel.on_cancel(move || i.interrupt()));
    let Err(e) = source.read_at(&mut probe, data.offset) else {
        log::debug!("{}: a read took {:?}", source.name(), source.read_latency());
        return Ok(());
    };
    if options.cancel.is_cancelled() {
        return Err(Error::new(ErrorKind::Cancelled, "copy cancelled"));
    }
    match e.kind() {
        ErrorKind::Io | ErrorKind::Timeout
            if options.retries > 0 && source.capabilities().reconnect =>
        {
            log::debug!("{e}");
            Ok(())
        }
        _ => Err(e),
    }
}

fn run(
    mut source: Box<dyn Endpoint>,
    mut destination: Box<dyn Endpoint>,
    options: &CopyOptions,
    mut journal: Option<Journal>,
) -> Result<CopyStats> {
    let options = &*effective(options);
    let started = Instant::now();
    let resuming = journal.as_ref().is_some_and(Journal::started);
    sample_read_latency(source.as_mut(), options)?;
    let mut plan = Plan::new(
        &Side::of(source.as_ref()),
        &Side::of(destination.as_ref()),
        options,
        cores(),
    )?;
    if resuming {
        plan.resume();
    }
    if resume(journal.as_mut(), &*source, &*destination, options)? {
        // Nothing to do; say goodbye to the servers politely.
        destination.close()?;
        source.close()?;
        return Ok(CopyStats {
            already_complete: true,
            elapsed: started.elapsed(),
            ..CopyStats::default()
        });
    }
    let Shape::Segments {
        length: size,
        workers,
        ..
    } = plan.shape
    else {
        let tracker = Tracker::new(None, options.progress.clone());
        let shared = worker::Shared::new(&plan, tracker).with_events(options.events.clone());
        let _linked = link_cancel(options, &shared);
        let _interrupts = interrupt_on_stop(&shared, [&*source, &*destination]);
        tell(options, &plan, &*source, &*destination, 1);
        let result = stream::copy(&shared, source.as_mut(), destination.as_mut());
        let bytes = shared.outcome(result)?;
        let mut stats = shared.stats(bytes, 1, started);
        stats.blkhash = shared.blkhash(bytes)?;
        let check = checked(options, &stats, bytes);
        finish(&plan, &shared, vec![(source, destination)], options, check)?;
        return Ok(stats);
    };

    let mut handles = open_workers(source, destination, workers)?;
    tell(
        options,
        &plan,
        &*handles[0].0,
        &*handles[0].1,
        handles.len(),
    );
    let tracker = Tracker::new(Some(size), options.progress.clone());
    let journal = journal.map(std::sync::Arc::new);
    let shared = worker::Shared::new(&plan, tracker)
        .with_journal(journal.clone())
        .with_events(options.events.clone());
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
    let mut stats = shared.stats(size, handles.len(), started);
    stats.blkhash = shared.blkhash(size)?;
    let check = checked(options, &stats, size);
    finish(&plan, &shared, handles, options, check)?;
    if let Some(journal) = &journal {
        journal.finish()?;
    }
    Ok(stats)
}

/// What `--verify` checks the destination against: the source's
/// blkhash and size.
fn checked<'a>(
    options: &CopyOptions,
    stats: &'a CopyStats,
    size: u64,
) -> Option<(&'a crate::blkhash::Blkhash, u64)> {
    if !options.verify {
        return None;
    }
    stats.blkhash.as_ref().map(|h| (h, size))
}

/// The options as the copy runs them: `--verify` needs the source's
/// blkhash, sha256/64K unless `--blkhash` chose.
fn effective(options: &CopyOptions) -> std::borrow::Cow<'_, CopyOptions> {
    if options.verify && options.blkhash.is_none() {
        let mut o = options.clone();
        o.blkhash = Some(crate::blkhash::BlkhashSpec::default());
        std::borrow::Cow::Owned(o)
    } else {
        std::borrow::Cow::Borrowed(options)
    }
}

/// Tell the caller's report function what the copy is about to do.
fn tell(
    options: &CopyOptions,
    plan: &Plan,
    source: &dyn Endpoint,
    destination: &dyn Endpoint,
    workers: usize,
) {
    if options.report.is_none() && options.events.is_none() {
        return;
    }
    let report = report::Report::new(plan, options, source, destination, workers);
    if let Some(events) = &options.events {
        events(&events::Event::Start {
            source: report.source.name.clone(),
            destination: report.destination.name.clone(),
            size: match plan.shape {
                Shape::Segments { length, .. } => Some(length),
                Shape::Stream => None,
            },
            connections: workers,
            request_size: report.request_size,
        });
    }
    if let Some(tell) = &options.report {
        tell(&report);
    }
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

/// How long workers have, once the copy stops, to notice at a batch
/// boundary before their connections are broken off. Requests a healthy
/// server is answering then finish, so it sees clients leave politely
/// rather than log broken pipes onto nbdcp's stderr; one that stopped
/// answering is cut off at this point, well within the second or two a
/// cancel may take.
const INTERRUPT_GRACE: Duration = Duration::from_millis(500);

/// Breaks off every handle's blocked requests [`INTERRUPT_GRACE`] after
/// the copy stops (cancelled, or a worker failed for good), so that no
/// worker waits on a server that stopped answering. Dropping it (the copy
/// is over) disarms it.
struct Watchdog {
    _armed: OnCancel,
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, wake) = &*self.done;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_all();
    }
}

fn interrupt_on_stop<'a>(
    shared: &worker::Shared,
    handles: impl IntoIterator<Item = &'a dyn Endpoint>,
) -> Watchdog {
    let interrupters: Vec<_> = handles
        .into_iter()
        .filter_map(|h| h.interrupter())
        .collect();
    let interrupters = Arc::new(interrupters);
    let done = Arc::new((Mutex::new(false), Condvar::new()));
    let wait_on = Arc::clone(&done);
    let armed = shared.stop_token().on_cancel(move || {
        let (for_thread, done) = (Arc::clone(&interrupters), Arc::clone(&wait_on));
        // A thread of its own: the stop may come from a signal thread or
        // a worker, neither of which may sleep here.
        let spawned = std::thread::Builder::new()
            .name("nbdcp-interrupt".into())
            .spawn(move || {
                let (lock, wake) = &*done;
                let finished = lock.lock().unwrap_or_else(|p| p.into_inner());
                let (finished, _) = wake
                    .wait_timeout_while(finished, INTERRUPT_GRACE, |f| !*f)
                    .unwrap_or_else(|p| p.into_inner());
                if !*finished {
                    for i in for_thread.iter() {
                        i.interrupt();
                    }
                }
            });
        if spawned.is_err() {
            for i in interrupters.iter() {
                i.interrupt();
            }
        }
    });
    Watchdog {
        _armed: armed,
        done,
    }
}

/// Feed the segments to one thread per handle pair and wait for them all.
fn run_workers(plan: &Plan, shared: &worker::Shared, handles: &mut [HandlePair]) {
    let Shape::Segments {
        start,
        length: size,
        segment_size,
        ..
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
            for segment in segments::plan(start, size, segment_size) {
                // Done by an earlier run (see the journal): counted, not
                // copied.
                if shared.already_done(segment) {
                    shared.tracker.add(segment.length);
                    shared.acknowledged(segment.length);
                    continue;
                }
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
        // Progress at least once a second, whatever the segments do.
        let (ticking, tick) = crossbeam_channel::bounded::<()>(0);
        if shared.has_events() {
            scope.spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    tick.recv_timeout(Duration::from_secs(1))
                {
                    shared.emit_progress();
                }
            });
        }
        for r in running {
            if r.join().is_err() {
                shared.fail(Error::new(
                    ErrorKind::Io,
                    "internal error: a worker thread panicked",
                ));
            }
        }
        drop(ticking);
    });
}

/// Wait for every write, flush every destination handle (each connection
/// may hold its own unflushed writes), then close every handle, or with
/// `--verify` check the destination against `expected` first.
fn finish(
    plan: &Plan,
    shared: &worker::Shared,
    handles: Vec<HandlePair>,
    options: &CopyOptions,
    check: Option<(&crate::blkhash::Blkhash, u64)>,
) -> Result<()> {
    let mut handles = handles;
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
        let mut first = None;
        for (i, (s, d)) in handles.drain(..).enumerate() {
            if i == 0 && check.is_some() {
                first = Some((s, d));
                continue;
            }
            let (mut s, mut d) = (s, d);
            d.close()?;
            s.close()?;
        }
        if let (Some((expected, size)), Some((mut s, d))) = (check, first) {
            let spec = options.blkhash.unwrap_or_default();
            let source: Option<(&mut dyn Endpoint, u64)> = match plan.shape {
                Shape::Segments { start, .. } => Some((s.as_mut(), start)),
                // A pipe cannot be read again to find where it differs.
                Shape::Stream => None,
            };
            verify::verify(d, source, expected, spec, size, options)?;
            s.close()?;
        }
        Ok(())
    })();
    // Cancelled meanwhile: that, not the broken connection, is the news.
    shared.outcome(result)
}
