//! A worker: copies whole segments from its own source handle to its own
//! destination handle.
//!
//! Unless the copy is synchronous, a worker is two threads joined by a
//! two-batch ring: the reading half fills one batch from the source while
//! the writing half sends the previous one to the destination, so neither
//! server waits for the other.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, bounded};

use crate::endpoint::Endpoint;
use crate::error::{Error, ErrorKind, Result};

use super::CancelToken;
use super::batch::{Batch, Cursor, Limits};
use super::extents;
use super::progress::Tracker;
use super::segments::Segment;

/// State shared by all workers of one copy.
pub(crate) struct Shared<'a> {
    pub limits: Limits,
    pub use_extents: bool,
    pub zero_align: u64,
    pub overlap: bool,
    pub cancel: &'a CancelToken,
    pub tracker: Tracker,
    pub written: AtomicU64,
    pub zeroed: AtomicU64,
    first_error: Mutex<Option<Error>>,
    warned_extents: std::sync::atomic::AtomicBool,
}

impl<'a> Shared<'a> {
    pub(crate) fn new(
        limits: Limits,
        use_extents: bool,
        zero_align: u64,
        overlap: bool,
        cancel: &'a CancelToken,
        tracker: Tracker,
    ) -> Shared<'a> {
        Shared {
            limits,
            use_extents,
            zero_align,
            overlap,
            cancel,
            tracker,
            written: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            first_error: Mutex::new(None),
            warned_extents: Default::default(),
        }
    }

    /// Record a failure and stop every other worker. The first real error
    /// is kept: the "cancelled" errors it causes elsewhere are not news.
    pub(crate) fn fail(&self, err: Error) {
        if let Ok(mut slot) = self.first_error.lock() {
            let replace = match slot.as_ref() {
                None => true,
                Some(old) => {
                    old.kind() == ErrorKind::Cancelled && err.kind() != ErrorKind::Cancelled
                }
            };
            if replace {
                *slot = Some(err);
            }
        }
        self.cancel.cancel();
    }

    /// The error that ended the copy, if any.
    pub(crate) fn take_error(&self) -> Option<Error> {
        self.first_error.lock().ok().and_then(|mut e| e.take())
    }

    fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::new(ErrorKind::Cancelled, "copy cancelled"))
        } else {
            Ok(())
        }
    }

    /// Account for a batch whose destination operations completed.
    pub(crate) fn completed(&self, batch: &Batch, written: u64, zeroed: u64) {
        self.written.fetch_add(written, Ordering::Relaxed);
        self.zeroed.fetch_add(zeroed, Ordering::Relaxed);
        self.tracker.add(batch.covered());
    }

    /// The extents of `segment`, or all data if the source cannot say.
    fn extents_of(
        &self,
        source: &mut dyn Endpoint,
        segment: Segment,
    ) -> Vec<crate::endpoint::Extent> {
        let raw = if self.use_extents {
            match extents::describe(source, segment) {
                Ok(e) => e,
                Err(err) => {
                    // Allocation information only saves work; losing it
                    // must not lose the copy.
                    if !self.warned_extents.swap(true, Ordering::Relaxed) {
                        log::warn!("{err}; copying the rest as data");
                    }
                    extents::all_data(segment)
                }
            }
        } else {
            extents::all_data(segment)
        };
        extents::align_zeroes(&raw, self.zero_align)
    }
}

/// Copy segments from `segments` until it is empty or the copy is cancelled.
/// Errors are recorded in `shared`.
pub(crate) fn run(
    shared: &Shared<'_>,
    source: &mut dyn Endpoint,
    destination: &mut dyn Endpoint,
    segments: &Receiver<Segment>,
) {
    let result = if shared.overlap {
        run_overlapped(shared, source, destination, segments)
    } else {
        run_inline(shared, source, destination, segments)
    };
    if let Err(err) = result {
        shared.fail(err);
    }
}

/// Read a batch: its source reads, then plan its destination operations.
fn read_batch(shared: &Shared<'_>, source: &mut dyn Endpoint, batch: &mut Batch) -> Result<()> {
    let mut reads = batch.read_ops();
    if !reads.is_empty() {
        source.read_batch(&mut reads)?;
    }
    drop(reads);
    batch.plan_writes(&shared.limits);
    Ok(())
}

/// Write a batch's planned operations to the destination.
pub(crate) fn write_batch(
    shared: &Shared<'_>,
    destination: &mut dyn Endpoint,
    batch: &Batch,
) -> Result<()> {
    let ops = batch.write_ops(shared.limits.allocate);
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
    shared.completed(batch, written, zeroed);
    Ok(())
}

fn run_inline(
    shared: &Shared<'_>,
    source: &mut dyn Endpoint,
    destination: &mut dyn Endpoint,
    segments: &Receiver<Segment>,
) -> Result<()> {
    let mut batch = Batch::default();
    for segment in segments.iter() {
        shared.check_cancelled()?;
        let mut cursor = Cursor::new(shared.extents_of(source, segment));
        while !cursor.is_done() {
            shared.check_cancelled()?;
            cursor.fill(&mut batch, &shared.limits);
            read_batch(shared, source, &mut batch)?;
            write_batch(shared, destination, &batch)?;
        }
    }
    Ok(())
}

fn run_overlapped(
    shared: &Shared<'_>,
    source: &mut dyn Endpoint,
    destination: &mut dyn Endpoint,
    segments: &Receiver<Segment>,
) -> Result<()> {
    let (full_tx, full_rx) = bounded::<Batch>(2);
    let (free_tx, free_rx) = bounded::<Batch>(2);
    for _ in 0..2 {
        // Cannot fail: the channel has room for both and the receiver lives.
        let _ = free_tx.send(Batch::default());
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            for batch in full_rx.iter() {
                shared.check_cancelled()?;
                write_batch(shared, destination, &batch)?;
                if free_tx.send(batch).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let reader = (|| -> Result<()> {
            for segment in segments.iter() {
                shared.check_cancelled()?;
                let mut cursor = Cursor::new(shared.extents_of(source, segment));
                while !cursor.is_done() {
                    shared.check_cancelled()?;
                    // The writer gone means it failed; its error is recorded.
                    let Ok(mut batch) = free_rx.recv() else {
                        return Ok(());
                    };
                    cursor.fill(&mut batch, &shared.limits);
                    read_batch(shared, source, &mut batch)?;
                    if full_tx.send(batch).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })();
        drop(full_tx);
        if let Err(err) = reader {
            shared.fail(err);
        }
        match writer.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::new(
                ErrorKind::Io,
                "internal error: writer thread panicked",
            )),
        }
    })
}
