//! `--verify`: after the copy and its flush, read the destination back
//! with all connections and compare its blkhash with the source's, which
//! was computed while copying (so the source is read once). The copy
//! itself never reads the destination. On a mismatch the first differing
//! block is found by reading both sides again from the start: slow, but
//! only ever done when something is wrong.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::blkhash::{Blkhash, BlkhashSpec};
use crate::endpoint::null::NullEndpoint;
use crate::endpoint::{
    BlockSize, Capabilities, Endpoint, Extent, Interrupter, ReadOp, Tuning, WriteOp,
};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::options::CopyOptions;

/// Bytes read at a time while looking for the first difference.
const LOCATE_CHUNK: usize = 1 << 20;

/// The options for reading the destination back: every connection, its
/// extents (zero ranges are hashed as zero, never read), nothing written.
fn reading_back(options: &CopyOptions, spec: BlkhashSpec, size: u64) -> CopyOptions {
    CopyOptions {
        // What was written, where it was written: a destination larger
        // than the source holds more than the copy.
        source_offset: options.destination_offset,
        length: Some(size),
        connections: options.connections,
        threads: options.threads,
        requests: options.requests,
        request_size: options.request_size,
        queue_size: options.queue_size,
        extents: options.extents,
        synchronous: options.synchronous,
        timeout: options.timeout,
        retries: options.retries,
        segment_size: options.segment_size,
        blkhash: Some(spec),
        flush: false,
        cancel: options.cancel.clone(),
        ..CopyOptions::default()
    }
}

/// Check `destination` against the source's `expected` blkhash, `size`
/// bytes long. `source` (if the source can be read again, with the
/// offset the copy started at) serves to find a mismatch's first block.
pub(crate) fn verify(
    destination: Box<dyn Endpoint>,
    source: Option<(&mut dyn Endpoint, u64)>,
    expected: &Blkhash,
    spec: BlkhashSpec,
    size: u64,
    options: &CopyOptions,
) -> Result<()> {
    let name = destination.name().to_string();
    // The read-back pass borrows the handle rather than own it, so that
    // it is still open to find a mismatch's block (a server nbdcp started
    // may take one connection only).
    let shared = Arc::new(Mutex::new(destination));
    let lent = Box::new(Lent {
        name: name.clone(),
        inner: Arc::clone(&shared),
    });
    let back = reading_back(options, spec, size);
    let got = super::copy_endpoints(lent, Box::new(NullEndpoint), &back)?;
    let mut destination = lock(&shared);
    if got.blkhash.as_ref() == Some(expected) {
        return destination.close();
    }
    let at = match source {
        Some((source, from)) => {
            let to = options.destination_offset;
            first_difference(source, from, destination.as_mut(), to, size)?.map(|i| to + i)
        }
        None => None,
    };
    let _ = destination.close();
    let block = spec.block_size;
    let mut e = Error::new(
        ErrorKind::Mismatch,
        match at {
            Some(_) => "the destination differs from the source, first in this block",
            None => "the destination differs from the source: the blkhash does not match",
        },
    )
    .with_endpoint(&name)
    .with_operation(Operation::Verify);
    if let Some(offset) = at {
        // Blocks are counted from where the copy starts on the destination.
        let to = options.destination_offset;
        e = e.at(offset - (offset - to) % block, block);
    }
    Err(e)
}

/// How far into the `size` bytes from `a_at` on `a` and `b_at` on `b`
/// they first differ.
fn first_difference(
    a: &mut dyn Endpoint,
    a_at: u64,
    b: &mut dyn Endpoint,
    b_at: u64,
    size: u64,
) -> Result<Option<u64>> {
    let mut x = vec![0u8; LOCATE_CHUNK];
    let mut y = vec![0u8; LOCATE_CHUNK];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(LOCATE_CHUNK as u64) as usize;
        a.read_at(&mut x[..n], a_at + at)?;
        b.read_at(&mut y[..n], b_at + at)?;
        if x[..n] != y[..n] {
            let i = x[..n]
                .iter()
                .zip(&y[..n])
                .position(|(p, q)| p != q)
                .unwrap_or(0);
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

fn lock(handle: &Mutex<Box<dyn Endpoint>>) -> MutexGuard<'_, Box<dyn Endpoint>> {
    handle.lock().unwrap_or_else(|p| p.into_inner())
}

/// A destination handle lent to the read-back pass: every call goes to
/// it, except `close`, which is left to its owner.
struct Lent {
    name: String,
    inner: Arc<Mutex<Box<dyn Endpoint>>>,
}

impl Endpoint for Lent {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        lock(&self.inner).kind()
    }
    fn size(&self) -> Option<u64> {
        lock(&self.inner).size()
    }
    fn capabilities(&self) -> Capabilities {
        lock(&self.inner).capabilities()
    }
    fn tuning(&self) -> Tuning {
        lock(&self.inner).tuning()
    }
    fn block_size(&self) -> BlockSize {
        lock(&self.inner).block_size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        lock(&self.inner).read_at(buf, offset)
    }
    fn read_stream(&mut self, buf: &mut [u8], offset: u64) -> Result<usize> {
        lock(&self.inner).read_stream(buf, offset)
    }
    fn read_batch(&mut self, ops: &mut [ReadOp<'_>]) -> Result<()> {
        lock(&self.inner).read_batch(ops)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        lock(&self.inner).write_at(data, offset)
    }
    fn zero(&mut self, offset: u64, length: u64, allocate: bool) -> Result<()> {
        lock(&self.inner).zero(offset, length, allocate)
    }
    fn write_batch(&mut self, ops: &[WriteOp<'_>]) -> Result<()> {
        lock(&self.inner).write_batch(ops)
    }
    fn settle(&mut self) -> Result<()> {
        lock(&self.inner).settle()
    }
    fn flush(&mut self) -> Result<()> {
        lock(&self.inner).flush()
    }
    fn extents(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        lock(&self.inner).extents(offset, length)
    }
    fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
        lock(&self.inner).connect_another()
    }
    fn reconnect(&mut self) -> Result<()> {
        lock(&self.inner).reconnect()
    }
    fn interrupter(&self) -> Option<Interrupter> {
        lock(&self.inner).interrupter()
    }
    fn close(&mut self) -> Result<()> {
        Ok(())
    }
}
