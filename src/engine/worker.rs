//! A worker: copies whole segments from its own source handle to its own
//! destination handle.
//!
//! Unless the copy is synchronous, a worker is two threads joined by a
//! two-batch ring: the reading half fills one batch from the source while
//! the writing half sends the previous one to the destination, so neither
//! server waits for the other.
//!
//! A segment is the unit of retry. Its writes are idempotent and no other
//! worker touches its range, so when a connection drops the worker
//! reconnects that side and copies the whole segment again. With retries
//! on, each finished segment is flushed before the next starts: a server
//! that restarts may lose writes it acknowledged but never flushed, and a
//! flushed segment never needs redoing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded};

use crate::cancel::CancelToken;
use crate::endpoint::Endpoint;
use crate::error::{Error, ErrorKind, Result};

use super::CopyStats;
use super::batch::{Batch, Cursor, Limits};
use super::blkhash::{Collector, SegmentHash};
use super::events::{Event, EventFn};
use super::extents;
use super::journal::Journal;
use super::plan::Plan;
use super::progress::Tracker;
use super::rate::RateLimiter;
use super::segments::Segment;

/// The error that ended a copy: the first one recorded wins, so the
/// failures a stop causes in other workers are not reported instead.
type FirstError = Arc<Mutex<Option<Error>>>;

fn first(slot: &Mutex<Option<Error>>) -> MutexGuard<'_, Option<Error>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops a copy from outside it (the caller's cancel token).
pub(crate) struct Stopper {
    stop: CancelToken,
    first_error: FirstError,
}

impl Stopper {
    /// The caller cancelled: that is the copy's outcome, unless it had
    /// already failed.
    pub(crate) fn cancelled(&self) {
        first(&self.first_error)
            .get_or_insert_with(|| Error::new(ErrorKind::Cancelled, "copy cancelled"));
        self.stop.cancel();
    }
}

/// State shared by all workers of one copy.
pub(crate) struct Shared {
    pub limits: Limits,
    pub use_extents: bool,
    pub zero_align: u64,
    pub overlap: bool,
    /// Triggered when the copy must stop: cancelled, or a worker failed
    /// for good. Breaks off every handle's blocked requests.
    stop: CancelToken,
    pub tracker: Tracker,
    pub written: AtomicU64,
    pub zeroed: AtomicU64,
    /// Times a failed segment may be retried after reconnecting.
    pub retries: u32,
    /// Flush the destination after each segment (see [`Plan`]).
    pub flush_segments: bool,
    first_error: FirstError,
    warned_extents: AtomicBool,
    /// `--rate`: shared by all workers.
    limiter: Option<RateLimiter>,
    /// `--journal`: where finished segments are recorded.
    journal: Option<Arc<Journal>>,
    /// Bytes of segments the journal said were done.
    resumed: AtomicU64,
    /// `--progress=json:FD`: told about progress and retries.
    events: Option<EventFn>,
    /// Source bytes of segments the destination acknowledged.
    acked: AtomicU64,
    /// Held while a progress event is read and told, so that events from
    /// several workers and the ticker reach the listener in the order
    /// their `done` was read: `done` never goes backwards.
    progress_order: Mutex<()>,
    /// When the copy started, for the events' elapsed time.
    started: Instant,
    /// Folds the segments' block digests into the blkhash, if one is
    /// wanted.
    pub blkhash: Option<Collector>,
}

impl Shared {
    pub(crate) fn new(plan: &Plan, tracker: Tracker) -> Shared {
        Shared {
            limits: plan.limits,
            use_extents: plan.use_extents,
            zero_align: plan.align,
            overlap: plan.overlap,
            stop: CancelToken::new(),
            tracker,
            written: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            retries: plan.retries,
            flush_segments: plan.flush_segments,
            first_error: FirstError::default(),
            warned_extents: AtomicBool::new(false),
            limiter: plan.rate.map(RateLimiter::new),
            journal: None,
            resumed: AtomicU64::new(0),
            events: None,
            acked: AtomicU64::new(0),
            progress_order: Mutex::new(()),
            started: Instant::now(),
            blkhash: plan.blkhash.map(|spec| {
                let origin = match plan.shape {
                    super::plan::Shape::Segments { start, .. } => start,
                    super::plan::Shape::Stream => 0,
                };
                Collector::new(spec).starting_at(origin)
            }),
        }
    }

    /// Record finished segments in `journal`, and skip those it has.
    pub(crate) fn with_journal(mut self, journal: Option<Arc<Journal>>) -> Shared {
        self.journal = journal;
        self
    }

    /// Tell `events` about progress and retries.
    pub(crate) fn with_events(mut self, events: Option<EventFn>) -> Shared {
        self.events = events;
        self
    }

    /// Whether anyone listens to events.
    pub(crate) fn has_events(&self) -> bool {
        self.events.is_some()
    }

    /// Tell the events function how far the copy is.
    pub(crate) fn emit_progress(&self) {
        let Some(events) = &self.events else {
            return;
        };
        // A listener that panicked poisons nothing this guards.
        let _in_order = self
            .progress_order
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let done = self.acked.load(Ordering::SeqCst);
        let written = self.written.load(Ordering::Relaxed);
        let zeroed = self.zeroed.load(Ordering::Relaxed);
        events(&Event::Progress {
            done,
            total: self.tracker.total(),
            written,
            zeroed,
            skipped: done.saturating_sub(written.saturating_add(zeroed)),
            elapsed: self.started.elapsed(),
        });
    }

    /// `bytes` more of the source are acknowledged by the destination.
    pub(crate) fn acknowledged(&self, bytes: u64) {
        self.acked.fetch_add(bytes, Ordering::SeqCst);
        self.emit_progress();
    }

    /// Tell the events function a segment is being retried.
    fn emit_retry(&self, endpoint: &str, offset: u64, error: &Error) {
        if let Some(events) = &self.events {
            events(&Event::Retry {
                endpoint: endpoint.to_string(),
                offset,
                error: error.to_string(),
            });
        }
    }

    /// Whether the journal has `segment`, and the blkhash needs it read:
    /// it is then hashed, not skipped (nor written again).
    fn journal_has(&self, segment: Segment) -> bool {
        self.blkhash.is_some()
            && self
                .journal
                .as_ref()
                .is_some_and(|j| j.done().contains(&segment.offset))
    }

    /// Whether an earlier run recorded `segment` as done, so that it can
    /// be skipped (unless the blkhash needs it read).
    pub(crate) fn already_done(&self, segment: Segment) -> bool {
        if self.blkhash.is_some() {
            return false;
        }
        let done = self
            .journal
            .as_ref()
            .is_some_and(|j| j.done().contains(&segment.offset));
        if done {
            self.resumed.fetch_add(segment.length, Ordering::Relaxed);
        }
        done
    }

    /// A segment is complete (and flushed, when journalled): record it.
    fn segment_done(&self, segment: Segment) -> Result<()> {
        match &self.journal {
            Some(journal) => journal.record(segment.offset),
            None => Ok(()),
        }
    }

    /// What stops this copy from outside.
    pub(crate) fn stopper(&self) -> Stopper {
        Stopper {
            stop: self.stop.clone(),
            first_error: Arc::clone(&self.first_error),
        }
    }

    /// The token triggered when the copy stops.
    pub(crate) fn stop_token(&self) -> CancelToken {
        self.stop.clone()
    }

    /// Whether the copy is stopping.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Record a failure and stop every other worker. The first error is
    /// kept: the ones the stop causes elsewhere are not news.
    pub(crate) fn fail(&self, err: Error) {
        first(&self.first_error).get_or_insert(err);
        self.stop.cancel();
    }

    /// The copy's result: the first recorded error if there is one (a
    /// failure, or the cancellation that broke `result` off), else
    /// `result`.
    pub(crate) fn outcome<T>(&self, result: Result<T>) -> Result<T> {
        match first(&self.first_error).take() {
            Some(err) => Err(err),
            None => result,
        }
    }

    /// Statistics for a finished copy of `bytes` by `workers` workers.
    pub(crate) fn stats(&self, bytes: u64, workers: usize, started: Instant) -> CopyStats {
        CopyStats {
            bytes,
            written: self.written.load(Ordering::Relaxed),
            zeroed: self.zeroed.load(Ordering::Relaxed),
            workers,
            elapsed: started.elapsed(),
            resumed: self.resumed.load(Ordering::Relaxed),
            already_complete: false,
            blkhash: None,
        }
    }

    /// Wait until `bytes` of data may be read from the source (`--rate`).
    pub(crate) fn pace(&self, bytes: u64) {
        if let Some(limiter) = &self.limiter {
            limiter.take(bytes, || self.stopped());
        }
    }

    /// The blkhash of a source of `size` bytes, once every segment is in.
    pub(crate) fn blkhash(&self, size: u64) -> Result<Option<crate::blkhash::Blkhash>> {
        self.blkhash.as_ref().map(|c| c.finish(size)).transpose()
    }

    /// A new blkhash for an attempt at `segment`, if one is wanted.
    fn segment_hash(&self, segment: Segment) -> Option<SegmentHash> {
        self.blkhash.as_ref().map(|c| c.segment(segment.offset))
    }

    pub(crate) fn check_cancelled(&self) -> Result<()> {
        if self.stopped() {
            Err(Error::new(ErrorKind::Cancelled, "copy cancelled"))
        } else {
            Ok(())
        }
    }

    /// The extents of `segment`, or all data if the source cannot say.
    fn extents_of(
        &self,
        source: &mut dyn Endpoint,
        segment: Segment,
    ) -> Result<Vec<crate::endpoint::Extent>> {
        let raw = if self.use_extents {
            match extents::describe(source, segment) {
                Ok(e) => e,
                // Allocation information only saves work: a source that
                // cannot give it must not lose the copy. A broken
                // connection or a protocol violation is another matter:
                // the reads that follow would fail on it too, so it fails
                // (or retries) the segment now, as one error.
                Err(err) if matches!(err.kind(), ErrorKind::Server | ErrorKind::Unsupported) => {
                    if !self.warned_extents.swap(true, Ordering::Relaxed) {
                        log::warn!("{err}; copying the rest as data");
                    }
                    extents::all_data(segment)
                }
                Err(err) => return Err(err),
            }
        } else {
            extents::all_data(segment)
        };
        Ok(extents::align_zeroes(&raw, self.zero_align))
    }

    /// Sleep before retry `attempt` (1-based), waking early on cancel.
    fn back_off(&self, attempt: u32) {
        let delay = backoff_delay(attempt);
        let step = Duration::from_millis(20);
        let mut slept = Duration::ZERO;
        while slept < delay && !self.stopped() {
            std::thread::sleep(step);
            slept += step;
        }
    }
}

/// How long to wait before retry `attempt` (1-based): 100 ms doubling up
/// to 2 s, long enough for a server to restart, short enough that a dead
/// one is given up on in seconds.
pub(crate) fn backoff_delay(attempt: u32) -> Duration {
    let ms = 100u64 << attempt.saturating_sub(1).min(10);
    Duration::from_millis(ms.min(2000))
}

/// Which of a worker's two handles an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// An error and the handle it came from.
struct Failure {
    side: Side,
    error: Error,
}

fn on(side: Side) -> impl Fn(Error) -> Failure {
    move |error| Failure { side, error }
}

/// Errors worth reconnecting for: the transport failed or stalled. Errors
/// the server reported, protocol violations and bad input are final.
fn is_transient(err: &Error) -> bool {
    matches!(err.kind(), ErrorKind::Io | ErrorKind::Timeout)
}

/// Copy segments from `segments` until it is empty or the copy is cancelled.
/// Errors are recorded in `shared`.
pub(crate) fn run(
    shared: &Shared,
    source: &mut dyn Endpoint,
    destination: &mut dyn Endpoint,
    segments: &Receiver<Segment>,
) {
    // Batches reading and one being written.
    let mut ring: Vec<Batch> = (0..shared.limits.most_read_depth() + 1)
        .map(|_| Batch::default())
        .collect();
    let result = (|| -> Result<()> {
        for segment in segments.iter() {
            shared.check_cancelled()?;
            copy_with_retries(shared, source, destination, segment, &mut ring)?;
        }
        Ok(())
    })();
    if let Err(err) = result {
        shared.fail(err);
    }
}

/// Copy one segment, reconnecting and starting the segment again after a
/// transient failure, up to `shared.retries` times.
fn copy_with_retries(
    shared: &Shared,
    source: &mut dyn Endpoint,
    destination: &mut dyn Endpoint,
    segment: Segment,
    ring: &mut [Batch],
) -> Result<()> {
    let mut attempt = 0;
    loop {
        // Each attempt hashes the segment afresh: a failed one's digests
        // are dropped with it.
        let mut attempt_state = Attempt {
            done: AtomicU64::new(0),
            hash: shared.segment_hash(segment),
            hash_only: shared.journal_has(segment),
        };
        let outcome = copy_segment(
            shared,
            source,
            destination,
            segment,
            ring,
            &mut attempt_state,
        )
        .and_then(|()| {
            destination.settle().map_err(on(Side::Destination))?;
            if shared.flush_segments {
                destination.flush().map_err(on(Side::Destination))
            } else {
                Ok(())
            }
        });
        let Attempt {
            done,
            hash,
            hash_only,
        } = attempt_state;
        let failure = match outcome {
            Ok(()) => {
                if let (Some(collector), Some(hash)) = (&shared.blkhash, hash) {
                    collector.submit_segment(hash, &shared.stop);
                }
                if hash_only {
                    shared.resumed.fetch_add(segment.length, Ordering::Relaxed);
                } else {
                    shared.segment_done(segment)?;
                }
                shared.acknowledged(segment.length);
                return Ok(());
            }
            Err(f) => f,
        };
        // The segment will be counted again when it is redone. Batch
        // memory a broken connection may still read was poisoned by its
        // endpoint, and the batch replaces it rather than refill it.
        shared.tracker.sub(done.load(Ordering::Relaxed));
        let endpoint: &mut dyn Endpoint = match failure.side {
            Side::Source => source,
            Side::Destination => destination,
        };
        if shared.stopped()
            || !is_transient(&failure.error)
            || !endpoint.capabilities().reconnect
            || attempt >= shared.retries
        {
            return Err(failure.error);
        }
        // Reconnect, counting failed reconnections as retries too.
        loop {
            attempt += 1;
            log::warn!(
                "{}; retry {attempt} of {} (segment at offset {}) in {} ms",
                failure.error,
                shared.retries,
                segment.offset,
                backoff_delay(attempt).as_millis()
            );
            shared.emit_retry(endpoint.name(), segment.offset, &failure.error);
            shared.back_off(attempt);
            shared.check_cancelled()?;
            match endpoint.reconnect() {
                Ok(()) => break,
                Err(e) if is_transient(&e) && attempt < shared.retries => {
                    log::warn!("{e}");
                }
                Err(e) => {
                    return Err(if is_transient(&e) { failure.error } else { e });
                }
            }
        }
    }
}

/// One attempt at a segment: the source bytes it completed, so that a
/// failed attempt can be taken back out of the progress count, and its
/// blkhash.
struct Attempt {
    done: AtomicU64,
    hash: Option<SegmentHash>,
    /// An earlier run copied this segment (the journal says): it is read
    /// and hashed, not written again.
    hash_only: bool,
}

/// Read a batch: its source reads, then plan its destination operations.
fn read_batch(shared: &Shared, source: &mut dyn Endpoint, batch: &mut Batch) -> Result<()> {
    let bytes = batch.read_bytes();
    let mut reads = batch.read_ops();
    if !reads.is_empty() {
        shared.pace(bytes);
        source.read_batch(&mut reads)?;
    }
    drop(reads);
    batch.plan_writes(&shared.limits);
    Ok(())
}

/// Write a batch, then hash what it covers while its writes are under
/// way (the data is still in cache; the reading half meanwhile reads
/// the next batch). Returns the source bytes it covered.
fn write_and_hash(
    shared: &Shared,
    destination: &mut dyn Endpoint,
    batch: &Batch,
    hash: &mut Option<SegmentHash>,
    hash_only: bool,
) -> Result<u64> {
    let n = if hash_only {
        shared.tracker.add(batch.covered());
        batch.covered()
    } else {
        write_batch(shared, destination, batch)?
    };
    if let Some(hash) = hash {
        hash.feed_batch(batch);
    }
    Ok(n)
}

/// Write a batch's planned operations to the destination and account for
/// it; returns the source bytes it covered.
pub(crate) fn write_batch(
    shared: &Shared,
    destination: &mut dyn Endpoint,
    batch: &Batch,
) -> Result<u64> {
    let largest = shared.limits.largest_write(destination.write_latency());
    let ops = batch.write_ops(&shared.limits, largest);
    let mut written = 0;
    let mut zeroed = 0;
    for op in &ops {
        match op {
            crate::endpoint::WriteOp::Write { data, .. } => written += data.len() as u64,
            crate::endpoint::WriteOp::Zero { length, .. } => zeroed += *length,
        }
    }
    if !ops.is_empty() {
        destination.write_batch(&ops)?;
    }
    shared.written.fetch_add(written, Ordering::Relaxed);
    shared.zeroed.fetch_add(zeroed, Ordering::Relaxed);
    shared.tracker.add(batch.covered());
    Ok(batch.covered())
}

/// Copy one segment once, counting in `attempt` the source bytes
/// completed and hashing them.
fn copy_segment(
    shared: &Shared,
    source: &mut dyn Endpoint,
    destination: &mut dyn Endpoint,
    segment: Segment,
    ring: &mut [Batch],
    attempt: &mut Attempt,
) -> Result<(), Failure> {
    let Attempt {
        done,
        hash,
        hash_only,
    } = attempt;
    let hash_only = *hash_only;
    let done = &*done;
    let extents = shared
        .extents_of(source, segment)
        .map_err(on(Side::Source))?;
    let data: u64 = extents
        .iter()
        .filter(|e| e.kind == crate::endpoint::ExtentKind::Data)
        .map(|e| e.length)
        .sum();
    let mut cursor = Cursor::new(extents);
    let limits = &shared.limits;
    // Overlapping needs a second thread; a segment with at most one batch
    // of data (most of a mostly empty disk) has nothing to overlap.
    if !shared.overlap || data <= limits.batch_bytes as u64 || ring.len() < 2 {
        let batch = &mut ring[0];
        while !cursor.is_done() {
            shared.check_cancelled().map_err(on(Side::Source))?;
            cursor.fill(batch, limits);
            read_batch(shared, source, batch).map_err(on(Side::Source))?;
            let n = write_and_hash(shared, destination, batch, hash, hash_only)
                .map_err(on(Side::Destination))?;
            done.fetch_add(n, Ordering::Relaxed);
        }
        return Ok(());
    }

    let (full_tx, full_rx) = bounded::<&mut Batch>(ring.len());
    let (free_tx, free_rx) = bounded::<&mut Batch>(ring.len());
    // Batches enter the ring only as the read depth needs them, the
    // reading ones and one for the writer: a fast path circulates two, as
    // before there was a depth, and never touches the others' memory
    // (three cost 6 MiB more peak RSS on qcow2 -> qcow2).
    let mut spare: Vec<&mut Batch> = ring.iter_mut().collect();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), Failure> {
            for batch in full_rx.iter() {
                shared.check_cancelled().map_err(on(Side::Destination))?;
                let n = write_and_hash(shared, destination, batch, hash, hash_only)
                    .map_err(on(Side::Destination))?;
                done.fetch_add(n, Ordering::Relaxed);
                if free_tx.send(batch).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut reading: VecDeque<&mut Batch> = VecDeque::new();
        let reader = (|| -> Result<(), Failure> {
            // The id of `reading[0]` for the source's read-ahead.
            let mut first = 0u64;
            let mut circulating = 0usize;
            let mut last_depth = 1;
            loop {
                shared.check_cancelled().map_err(on(Side::Source))?;
                // Keep as many batches reading as the source's latency
                // asks for, each filled and paced before its reads go out.
                let depth = limits.read_depth(source.read_latency());
                if depth != last_depth {
                    log::debug!(
                        "{}: {depth} batch(es) reading at once (latency {:?})",
                        source.name(),
                        source.read_latency()
                    );
                    last_depth = depth;
                }
                while !cursor.is_done() && reading.len() < depth {
                    let batch = if let Ok(batch) = free_rx.try_recv() {
                        batch
                    } else if let Some(batch) =
                        (circulating <= depth).then(|| spare.pop()).flatten()
                    {
                        circulating += 1;
                        batch
                    } else if reading.is_empty() {
                        match free_rx.recv() {
                            Ok(batch) => batch,
                            // The writer gone means it failed; its error
                            // comes from join.
                            Err(_) => return Ok(()),
                        }
                    } else {
                        break;
                    };
                    cursor.fill(batch, limits);
                    shared.pace(batch.read_bytes());
                    reading.push_back(batch);
                }
                if reading.is_empty() {
                    return Ok(());
                }
                let mut groups: Vec<Vec<crate::endpoint::ReadOp<'_>>> =
                    reading.iter_mut().map(|b| b.read_ops()).collect();
                let read = source.read_ahead(first, &mut groups);
                drop(groups);
                read.map_err(on(Side::Source))?;
                first += 1;
                let Some(batch) = reading.pop_front() else {
                    return Ok(());
                };
                batch.plan_writes(limits);
                if full_tx.send(batch).is_err() {
                    return Ok(());
                }
            }
        })();
        if !reading.is_empty() {
            // Stopped with reads in flight (a failure on either side, or
            // cancelled): the source must not answer them into a later
            // attempt. A dead connection is reconnected by that attempt.
            if let Err(e) = source.abandon_reads() {
                log::debug!("{e}");
            }
        }
        drop(full_tx);
        let written = match writer.join() {
            Ok(r) => r,
            Err(_) => Err(Failure {
                side: Side::Destination,
                error: Error::new(ErrorKind::Io, "internal error: writer thread panicked"),
            }),
        };
        // A source failure is the cause when both fail: the writer then
        // only saw the ring close.
        reader.and(written)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::endpoint::Capabilities;
    use crate::engine::{CopyOptions, copy_endpoints};

    /// An in-memory disk whose handles can be told to fail their next
    /// reads or writes as a dropped connection would.
    struct Flaky {
        data: Arc<Mutex<Vec<u8>>>,
        fail_reads: Arc<AtomicU32>,
        fail_writes: Arc<AtomicU32>,
        reconnects: Arc<AtomicU32>,
        reconnectable: bool,
    }

    impl Flaky {
        fn new(data: Vec<u8>, reconnectable: bool) -> Flaky {
            Flaky {
                data: Arc::new(Mutex::new(data)),
                fail_reads: Arc::default(),
                fail_writes: Arc::default(),
                reconnects: Arc::default(),
                reconnectable,
            }
        }

        fn handle(&self) -> Flaky {
            Flaky {
                data: self.data.clone(),
                fail_reads: self.fail_reads.clone(),
                fail_writes: self.fail_writes.clone(),
                reconnects: self.reconnects.clone(),
                reconnectable: self.reconnectable,
            }
        }

        fn dropped(counter: &AtomicU32) -> Result<()> {
            // One atomic step: two workers that both saw 1 left would
            // otherwise both fail, one failure more than asked for.
            let took = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            });
            if took.is_ok() {
                return Err(Error::io(
                    "flaky",
                    crate::error::Operation::Read,
                    std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                ));
            }
            Ok(())
        }
    }

    impl Endpoint for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        fn size(&self) -> Option<u64> {
            Some(self.data.lock().unwrap().len() as u64)
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                flush: true,
                reconnect: self.reconnectable,
                ..Capabilities::default()
            }
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
            Flaky::dropped(&self.fail_reads)?;
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
            Flaky::dropped(&self.fail_writes)?;
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, offset: u64, length: u64, _: bool) -> Result<()> {
            Flaky::dropped(&self.fail_writes)?;
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + length) as usize].fill(0);
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            Ok(())
        }
        fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
            Ok(Some(Box::new(self.handle())))
        }
        fn reconnect(&mut self) -> Result<()> {
            self.reconnects.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect()
    }

    fn options(retries: u32) -> CopyOptions {
        CopyOptions {
            retries,
            segment_size: 1 << 20,
            request_size: Some(64 * 1024),
            queue_size: 256 * 1024,
            ..CopyOptions::default()
        }
    }

    #[test]
    fn dropped_connections_are_retried_and_the_copy_is_exact() {
        let src = Flaky::new(pattern(5 << 20), true);
        let dst = Flaky::new(vec![0xee; 5 << 20], true);
        src.fail_reads.store(2, Ordering::SeqCst);
        dst.fail_writes.store(2, Ordering::SeqCst);
        let (src_data, dst_data) = (src.data.clone(), dst.data.clone());
        let reconnects = (src.reconnects.clone(), dst.reconnects.clone());
        let stats = copy_endpoints(Box::new(src), Box::new(dst), &options(5)).unwrap();
        assert_eq!(stats.bytes, 5 << 20);
        assert!(*src_data.lock().unwrap() == *dst_data.lock().unwrap());
        assert_eq!(reconnects.0.load(Ordering::SeqCst), 2);
        assert_eq!(reconnects.1.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn retries_and_progress_are_told_as_events() {
        let src = Flaky::new(pattern(5 << 20), true);
        src.fail_reads.store(2, Ordering::SeqCst);
        let dst = Flaky::new(vec![0; 5 << 20], true);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut o = options(5);
        let s2 = seen.clone();
        o.events = Some(Arc::new(move |e: &Event| {
            s2.lock().unwrap().push(e.clone())
        }));
        copy_endpoints(Box::new(src), Box::new(dst), &o).unwrap();
        let seen = seen.lock().unwrap();
        let retries: Vec<_> = seen
            .iter()
            .filter_map(|e| match e {
                Event::Retry {
                    endpoint, error, ..
                } => Some((endpoint.clone(), error.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(retries.len(), 2, "{seen:?}");
        assert!(retries.iter().all(|(e, _)| e == "flaky"));
        assert!(matches!(seen.first(), Some(Event::Start { size: Some(s), .. }) if *s == 5 << 20));
        let dones: Vec<u64> = seen
            .iter()
            .filter_map(|e| match e {
                Event::Progress { done, .. } => Some(*done),
                _ => None,
            })
            .collect();
        assert!(dones.windows(2).all(|w| w[0] <= w[1]), "{dones:?}");
        assert_eq!(dones.last(), Some(&(5 << 20)));
    }

    /// The blkhash the naive way: hash every block of `data`.
    fn naive_blkhash(spec: crate::blkhash::BlkhashSpec, data: &[u8]) -> Vec<u8> {
        use crate::blkhash::State;
        let mut outer = State::new(spec.algorithm);
        for block in data.chunks(spec.block_size as usize) {
            let mut d = Vec::new();
            spec.algorithm.digest_into(block, &mut d);
            outer.update(&d);
        }
        outer.update(&(data.len() as u64).to_le_bytes());
        let mut out = Vec::new();
        outer.finish_into(&mut out);
        out
    }

    #[test]
    fn a_retried_segment_is_hashed_once() {
        use crate::blkhash::{BlkhashAlgorithm, BlkhashSpec};
        let mut data = pattern((5 << 20) + 1234);
        data[(1 << 20)..(3 << 20)].fill(0);
        for (synchronous, fail_reads, fail_writes) in [(false, 0, 3), (false, 2, 0), (true, 1, 2)] {
            let src = Flaky::new(data.clone(), true);
            let dst = Flaky::new(vec![0xee; data.len()], true);
            // Writes fail after their batch's reads were hashed.
            src.fail_reads.store(fail_reads, Ordering::SeqCst);
            dst.fail_writes.store(fail_writes, Ordering::SeqCst);
            let spec = BlkhashSpec::new(BlkhashAlgorithm::Sha256, 4096);
            let mut o = options(5);
            o.blkhash = Some(spec);
            o.synchronous = synchronous;
            o.connections = 3;
            let stats = copy_endpoints(Box::new(src), Box::new(dst), &o).unwrap();
            let got = stats.blkhash.unwrap();
            assert_eq!(
                got.digest,
                naive_blkhash(spec, &data),
                "{synchronous} {fail_reads} {fail_writes}"
            );
        }
    }

    #[test]
    fn without_retries_a_dropped_connection_fails_the_copy() {
        let src = Flaky::new(pattern(2 << 20), true);
        src.fail_reads.store(1, Ordering::SeqCst);
        let dst = Flaky::new(vec![0; 2 << 20], true);
        let err = copy_endpoints(Box::new(src), Box::new(dst), &options(0)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
    }

    #[test]
    fn endpoints_that_cannot_reconnect_fail_at_once() {
        let src = Flaky::new(pattern(2 << 20), false);
        src.fail_reads.store(1, Ordering::SeqCst);
        let reconnects = src.reconnects.clone();
        let dst = Flaky::new(vec![0; 2 << 20], true);
        assert!(copy_endpoints(Box::new(src), Box::new(dst), &options(5)).is_err());
        assert_eq!(reconnects.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn retries_give_up_when_the_failures_outlast_them() {
        let src = Flaky::new(pattern(1 << 20), true);
        src.fail_reads.store(100, Ordering::SeqCst);
        let dst = Flaky::new(vec![0; 1 << 20], true);
        let started = std::time::Instant::now();
        let err = copy_endpoints(Box::new(src), Box::new(dst), &options(2)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_delay(1), Duration::from_millis(100));
        assert_eq!(backoff_delay(2), Duration::from_millis(200));
        assert_eq!(backoff_delay(5), Duration::from_millis(1600));
        assert_eq!(backoff_delay(6), Duration::from_millis(2000));
        assert_eq!(backoff_delay(100), Duration::from_millis(2000));
    }
}
