//! Copying from a sequential source (a pipe) whose size is unknown.
//!
//! Data is read in order, one batch at a time, zero runs are found as for
//! any other source, and the batch is written before the next is read. A
//! pipe gives nothing to run in parallel, so one thread does it all.

use crate::endpoint::{Endpoint, Extent, ExtentKind};
use crate::error::{Error, ErrorKind, Operation, Result};

use super::batch::{Batch, Cursor};
use super::blkhash::finish_stream;
use super::worker::{Shared, write_batch};

/// Copy `source` to `destination` until the source ends. Returns the number
/// of bytes copied.
pub(crate) fn copy(
    shared: &Shared,
    source: &mut dyn Endpoint,
    destination: &mut dyn Endpoint,
) -> Result<u64> {
    let limits = shared.limits;
    let mut batch = Batch::default();
    let mut offset = 0u64;
    let mut hash = shared.blkhash.as_ref().map(|c| c.segment(0));
    loop {
        shared.check_cancelled()?;
        let mut cursor = Cursor::new(vec![Extent {
            offset,
            length: limits.batch_bytes as u64,
            kind: ExtentKind::Data,
        }]);
        cursor.fill(&mut batch, &limits);
        let mut got = 0u64;
        let mut ended = false;
        let reads = batch.read_ops();
        shared.pace(reads.iter().map(|r| r.buf.len() as u64).sum());
        for op in reads {
            let want = op.buf.len();
            let n = source.read_stream(op.buf, op.offset)?;
            got += n as u64;
            if n < want {
                ended = true;
                break;
            }
        }
        batch.truncate(offset + got);
        if got > 0 {
            if let Some(size) = destination.size() {
                if offset + got > size {
                    return Err(Error::new(
                        ErrorKind::TooSmall,
                        format!("destination is too small: {size} bytes, the source is longer"),
                    )
                    .with_endpoint(destination.name())
                    .with_operation(Operation::Write)
                    .at(offset, got));
                }
            }
            if let (Some(collector), Some(hash)) = (&shared.blkhash, hash.as_mut()) {
                hash.feed_batch(&batch);
                collector.submit_stream(hash);
            }
            batch.plan_writes(&limits);
            write_batch(shared, destination, &batch)?;
            // A stream is written in order: a batch written counts.
            shared.acknowledged(got);
            offset += got;
        }
        if ended || got == 0 {
            break;
        }
    }
    destination.resize_to(offset)?;
    if let (Some(collector), Some(hash)) = (&shared.blkhash, hash) {
        finish_stream(collector, hash);
    }
    Ok(offset)
}
