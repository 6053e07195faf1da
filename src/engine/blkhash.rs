//! Computing the blkhash (see [`crate::blkhash`]) while copying.
//!
//! Workers hash the blocks of the segment they copy from the batch buffer
//! the source was just read into (still in cache), once the batch's
//! writes are sent: the writing half hashes while the destination takes
//! the writes and the reading half reads the next batch. The hashes go
//! into a [`SegmentHash`]: a list of runs,
//! either digests of data blocks or a count of zero blocks (holes and
//! zero extents cost a counter, never a read or a hash). A block that
//! straddles batches is hashed incrementally. A segment's runs are handed
//! to the [`Collector`] only once the segment is done (its writes settled
//! and flushed): a failed attempt's runs are dropped with it and the
//! retry starts a new `SegmentHash`.
//!
//! Segments finish out of order. The collector folds runs into the final
//! digest as soon as they continue it, and holds only the runs of
//! segments that finished ahead of an earlier one still being copied. A
//! worker that gets more than [`MAX_PENDING_BYTES`] of digests ahead
//! waits for the earlier segments before taking another, so memory stays
//! flat whatever the image size.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::blkhash::{Blkhash, BlkhashSpec, State, zero_digest};
use crate::cancel::CancelToken;
use crate::error::{Error, ErrorKind, Result};

use super::batch::{Batch, Piece};
use super::zero;

/// Most bytes of block digests held for segments that finished ahead of
/// an earlier one (16 GiB of data ahead at sha256/64K).
pub const MAX_PENDING_BYTES: usize = 8 << 20;

/// Consecutive blocks of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Run {
    /// This many whole zero blocks.
    Zero(u64),
    /// The digests of consecutive blocks, concatenated.
    Digests(Vec<u8>),
}

/// A block seen in part so far.
#[derive(Default)]
struct Partial {
    /// Bytes of it seen.
    seen: u64,
    /// The digest so far; `None` while every byte seen was zero, so that
    /// a zero block pieced together costs nothing.
    state: Option<State>,
}

/// The block digests of one attempt at one segment (or of a stream).
pub(crate) struct SegmentHash {
    spec: BlkhashSpec,
    /// Index of the first block of `runs`.
    first_block: u64,
    /// The next source offset expected.
    pos: u64,
    runs: Vec<Run>,
    /// Digests of the data blocks since the last run in `runs`.
    open: Vec<u8>,
    partial: Partial,
    /// Pieces did not follow each other: an internal error.
    broken: bool,
}

impl SegmentHash {
    /// An empty hash starting at source offset `offset`, a whole number
    /// of blocks after `origin`, where the hashed image starts (0, or a
    /// range's first byte).
    pub(crate) fn new(spec: BlkhashSpec, offset: u64, origin: u64) -> SegmentHash {
        let from = offset.wrapping_sub(origin);
        SegmentHash {
            spec,
            first_block: from / spec.block_size,
            pos: offset,
            runs: Vec::new(),
            open: Vec::new(),
            partial: Partial::default(),
            broken: offset < origin || from % spec.block_size != 0,
        }
    }

    /// Hash what a batch covers, after its reads: its data from the
    /// buffer, the rest as zeroes.
    pub(crate) fn feed_batch(&mut self, batch: &Batch) {
        batch.for_each_piece(|piece| match piece {
            Piece::Data { offset, bytes } => self.feed_data(offset, bytes),
            Piece::Zero { offset, len } => self.feed_zero(offset, len),
        });
    }

    fn advance(&mut self, offset: u64, len: u64) -> bool {
        if offset != self.pos {
            self.broken = true;
            return false;
        }
        self.pos += len;
        true
    }

    /// Bytes of `len` that the partial block takes before it is whole.
    fn partial_room(&self, len: u64) -> u64 {
        if self.partial.seen == 0 {
            0
        } else {
            (self.spec.block_size - self.partial.seen).min(len)
        }
    }

    /// Data read from the source at `offset`.
    pub(crate) fn feed_data(&mut self, offset: u64, mut data: &[u8]) {
        if !self.advance(offset, data.len() as u64) {
            return;
        }
        let head = self.partial_room(data.len() as u64) as usize;
        if head > 0 {
            self.partial_data(&data[..head]);
            data = &data[head..];
        }
        let block = self.spec.block_size as usize;
        let mut blocks = data.chunks_exact(block);
        for b in &mut blocks {
            if zero::is_zero(b) {
                self.push_zeroes(1);
            } else {
                self.spec.algorithm.digest_into(b, &mut self.open);
            }
        }
        let tail = blocks.remainder();
        if !tail.is_empty() {
            self.partial_data(tail);
        }
    }

    /// `len` bytes at `offset` known to be zero, never read.
    pub(crate) fn feed_zero(&mut self, offset: u64, mut len: u64) {
        if !self.advance(offset, len) {
            return;
        }
        let head = self.partial_room(len);
        if head > 0 {
            self.partial_zero(head);
            len -= head;
        }
        self.push_zeroes(len / self.spec.block_size);
        let tail = len % self.spec.block_size;
        if tail > 0 {
            self.partial_zero(tail);
        }
    }

    fn partial_data(&mut self, data: &[u8]) {
        if self.partial.state.is_none() && zero::is_zero(data) {
            self.partial_zero(data.len() as u64);
            return;
        }
        let seen = self.partial.seen;
        let algorithm = self.spec.algorithm;
        let state = self.partial.state.get_or_insert_with(|| {
            let mut s = State::new(algorithm);
            s.update_zeroes(seen);
            s
        });
        state.update(data);
        self.partial.seen += data.len() as u64;
        self.complete_partial_if_whole();
    }

    fn partial_zero(&mut self, len: u64) {
        if let Some(state) = &mut self.partial.state {
            state.update_zeroes(len);
        }
        self.partial.seen += len;
        self.complete_partial_if_whole();
    }

    fn complete_partial_if_whole(&mut self) {
        if self.partial.seen == self.spec.block_size {
            self.complete_partial();
        }
    }

    /// Finish the partial block at the length it has: whole, or the
    /// image's last block.
    fn complete_partial(&mut self) {
        let partial = std::mem::take(&mut self.partial);
        match partial.state {
            None if partial.seen == self.spec.block_size => self.push_zeroes(1),
            // A short last block is hashed at its length, zero or not.
            None => {
                let digest = zero_digest(self.spec.algorithm, partial.seen);
                self.open.extend_from_slice(&digest);
            }
            Some(state) => state.finish_into(&mut self.open),
        }
    }

    fn push_zeroes(&mut self, count: u64) {
        if count == 0 {
            return;
        }
        self.close_digests();
        if let Some(Run::Zero(n)) = self.runs.last_mut() {
            *n += count;
        } else {
            self.runs.push(Run::Zero(count));
        }
    }

    /// Move the digests of the data blocks since the last zero run into
    /// `runs`.
    fn close_digests(&mut self) {
        if !self.open.is_empty() {
            self.runs.push(Run::Digests(std::mem::take(&mut self.open)));
        }
    }

    /// The whole blocks hashed so far, taken out (a stream hands them on
    /// batch by batch); the partial block stays.
    fn take_runs(&mut self) -> Taken {
        self.close_digests();
        let runs = std::mem::take(&mut self.runs);
        let first_block = self.first_block;
        self.first_block += blocks_in(&runs, self.spec.algorithm.digest_len());
        Taken {
            first_block,
            runs,
            broken: self.broken,
        }
    }

    /// Everything, the last (short) block included: the segment or stream
    /// has ended.
    fn finish(mut self) -> Taken {
        if self.partial.seen > 0 {
            self.complete_partial();
        }
        self.take_runs()
    }
}

/// Runs taken out of a [`SegmentHash`] for the collector.
struct Taken {
    first_block: u64,
    runs: Vec<Run>,
    broken: bool,
}

fn blocks_in(runs: &[Run], digest_len: usize) -> u64 {
    runs.iter()
        .map(|r| match r {
            Run::Zero(n) => *n,
            Run::Digests(d) => (d.len() / digest_len) as u64,
        })
        .sum()
}

fn digest_bytes(runs: &[Run]) -> usize {
    runs.iter()
        .map(|r| match r {
            Run::Zero(_) => 0,
            Run::Digests(d) => d.len(),
        })
        .sum()
}

struct Fold {
    /// The final digest so far: every block before `next_block`.
    outer: State,
    next_block: u64,
    /// Runs of segments that finished ahead, by first block.
    pending: BTreeMap<u64, Vec<Run>>,
    pending_bytes: usize,
    broken: bool,
}

/// Folds the segments' runs into the blkhash in block order.
pub(crate) struct Collector {
    spec: BlkhashSpec,
    /// Source offset of the hashed image's first byte (a range's start).
    origin: u64,
    /// The zero block's digest, repeated to feed runs of zero blocks in
    /// few calls.
    zeroes: Vec<u8>,
    fold: Mutex<Fold>,
    caught_up: Condvar,
    max_pending: usize,
}

impl Collector {
    pub(crate) fn new(spec: BlkhashSpec) -> Collector {
        Collector::with_window(spec, MAX_PENDING_BYTES)
    }

    fn with_window(spec: BlkhashSpec, max_pending: usize) -> Collector {
        let one = zero_digest(spec.algorithm, spec.block_size);
        Collector {
            spec,
            origin: 0,
            zeroes: one.repeat(64),
            fold: Mutex::new(Fold {
                outer: State::new(spec.algorithm),
                next_block: 0,
                pending: BTreeMap::new(),
                pending_bytes: 0,
                broken: false,
            }),
            caught_up: Condvar::new(),
            max_pending,
        }
    }

    /// Hash the image that starts at source offset `origin` (a range).
    pub(crate) fn starting_at(mut self, origin: u64) -> Collector {
        self.origin = origin;
        self
    }

    /// A new hash for an attempt at the segment starting at `offset`.
    pub(crate) fn segment(&self, offset: u64) -> SegmentHash {
        SegmentHash::new(self.spec, offset, self.origin)
    }

    fn lock(&self) -> MutexGuard<'_, Fold> {
        self.fold.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A finished segment's blocks. Waits while more than the window is
    /// held for segments ahead of an earlier one, until it drains or
    /// `stop` is cancelled.
    pub(crate) fn submit_segment(&self, hash: SegmentHash, stop: &CancelToken) {
        let mut fold = self.lock();
        self.add(&mut fold, hash.finish());
        while fold.pending_bytes > self.max_pending && !stop.is_cancelled() {
            fold = match self.caught_up.wait_timeout(fold, Duration::from_millis(50)) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The whole blocks a stream hashed so far (in order: folded at once).
    pub(crate) fn submit_stream(&self, hash: &mut SegmentHash) {
        let taken = hash.take_runs();
        let mut fold = self.lock();
        self.add(&mut fold, taken);
    }

    fn add(&self, fold: &mut Fold, taken: Taken) {
        fold.broken |= taken.broken;
        if taken.runs.is_empty() {
            return;
        }
        if taken.first_block == fold.next_block {
            self.fold_in(fold, &taken.runs);
        } else {
            fold.pending_bytes += digest_bytes(&taken.runs);
            if fold.pending.insert(taken.first_block, taken.runs).is_some() {
                fold.broken = true;
            }
        }
        while let Some(entry) = fold.pending.first_entry() {
            if *entry.key() != fold.next_block {
                break;
            }
            let runs = entry.remove();
            fold.pending_bytes -= digest_bytes(&runs);
            self.fold_in(fold, &runs);
        }
        self.caught_up.notify_all();
    }

    fn fold_in(&self, fold: &mut Fold, runs: &[Run]) {
        let len = self.spec.algorithm.digest_len();
        for run in runs {
            match run {
                Run::Zero(n) => {
                    let mut left = *n;
                    while left > 0 {
                        let k = left.min((self.zeroes.len() / len) as u64);
                        fold.outer.update(&self.zeroes[..k as usize * len]);
                        left -= k;
                    }
                    fold.next_block += n;
                }
                Run::Digests(d) => {
                    fold.outer.update(d);
                    fold.next_block += (d.len() / len) as u64;
                }
            }
        }
    }

    /// The blkhash of an image of `size` bytes whose every block was
    /// submitted.
    pub(crate) fn finish(&self, size: u64) -> Result<Blkhash> {
        let fold = &mut *self.lock();
        let blocks = size.div_ceil(self.spec.block_size);
        if fold.broken || !fold.pending.is_empty() || fold.next_block != blocks {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "internal error: blkhash has {} of {blocks} blocks",
                    fold.next_block
                ),
            ));
        }
        let mut outer = std::mem::replace(&mut fold.outer, State::new(self.spec.algorithm));
        outer.update(&size.to_le_bytes());
        let mut digest = Vec::with_capacity(self.spec.algorithm.digest_len());
        outer.finish_into(&mut digest);
        Ok(Blkhash {
            spec: self.spec,
            digest,
        })
    }
}

/// Feed a stream's finished hash to the collector (the last block too).
pub(crate) fn finish_stream(collector: &Collector, hash: SegmentHash) {
    let taken = hash.finish();
    let mut fold = collector.lock();
    collector.add(&mut fold, taken);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkhash::BlkhashAlgorithm;

    /// The blkhash the simple way: every block hashed from the bytes.
    fn naive(spec: BlkhashSpec, image: &[u8]) -> Vec<u8> {
        let mut outer = State::new(spec.algorithm);
        for block in image.chunks(spec.block_size as usize) {
            let mut d = Vec::new();
            spec.algorithm.digest_into(block, &mut d);
            outer.update(&d);
        }
        outer.update(&(image.len() as u64).to_le_bytes());
        let mut out = Vec::new();
        outer.finish_into(&mut out);
        out
    }

    /// Feed `image` in pieces cut at `cuts`, holes (all-zero pieces
    /// whose index is odd) as zero pieces, segment by segment.
    fn pieced(spec: BlkhashSpec, image: &[u8], segment: usize, piece: usize) -> Vec<u8> {
        let c = Collector::with_window(spec, usize::MAX);
        let stop = CancelToken::new();
        let mut starts: Vec<usize> = (0..image.len()).step_by(segment).collect();
        // Out of order: last segment first.
        starts.reverse();
        for start in starts {
            let end = (start + segment).min(image.len());
            let mut h = c.segment(start as u64);
            let mut at = start;
            let mut i = 0;
            while at < end {
                let stop_at = (at + piece + i % 3).min(end);
                let bytes = &image[at..stop_at];
                if i % 2 == 1 && zero::is_zero(bytes) {
                    h.feed_zero(at as u64, bytes.len() as u64);
                } else {
                    h.feed_data(at as u64, bytes);
                }
                at = stop_at;
                i += 1;
            }
            c.submit_segment(h, &stop);
        }
        c.finish(image.len() as u64).unwrap().digest
    }

    #[test]
    fn pieces_and_order_do_not_change_the_hash() {
        let mut image = vec![0u8; 300_000];
        for (i, b) in image.iter_mut().enumerate() {
            if (i / 5000) % 3 == 0 {
                *b = (i % 251) as u8 + 1;
            }
        }
        for a in BlkhashAlgorithm::ALL {
            for bs in [4u64, 512, 4096, 65536] {
                let spec = BlkhashSpec::new(a, bs);
                // Tiny blocks are slow to hash unoptimised: a smaller image.
                let image = &image[..if bs < 512 { 70_000 } else { image.len() }];
                let want = naive(spec, image);
                for (segment, piece) in [(65536, 1000), (131072, 4096), (1 << 20, 70000)] {
                    let segment = segment.max(bs as usize);
                    assert_eq!(
                        pieced(spec, image, segment, piece),
                        want,
                        "{a}/{bs} segment {segment} piece {piece}"
                    );
                }
                // A short last block, zero or data.
                for len in [image.len() - 1, image.len() - 3000, 1, 0] {
                    let img = &image[..len];
                    assert_eq!(pieced(spec, img, 1 << 20, 777), naive(spec, img));
                }
            }
        }
    }

    #[test]
    fn the_empty_image() {
        let c = Collector::new(BlkhashSpec::default());
        let hex = c.finish(0).unwrap().to_hex();
        assert_eq!(
            hex,
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
    }

    #[test]
    fn missing_or_misplaced_blocks_are_an_internal_error() {
        let spec = BlkhashSpec::new(BlkhashAlgorithm::Md5, 4096);
        let c = Collector::new(spec);
        let mut h = c.segment(8192);
        h.feed_data(8192, &[1; 4096]);
        c.submit_segment(h, &CancelToken::new());
        assert!(c.finish(12288).is_err());

        let c = Collector::new(spec);
        let mut h = c.segment(0);
        h.feed_data(0, &[1; 4096]);
        h.feed_data(8192, &[1; 4096]);
        c.submit_segment(h, &CancelToken::new());
        assert!(c.finish(12288).is_err());
    }

    #[test]
    fn far_ahead_segments_wait_and_holes_are_held_as_counts() {
        let spec = BlkhashSpec::new(BlkhashAlgorithm::Sha256, 4096);
        let c = std::sync::Arc::new(Collector::with_window(spec, 64 * 32));
        let stop = CancelToken::new();
        // A hole far ahead costs a counter, not digests.
        let mut h = c.segment(1 << 30);
        h.feed_zero(1 << 30, 1 << 20);
        c.submit_segment(h, &stop);
        assert_eq!(c.lock().pending_bytes, 0);
        // Data ahead beyond the window waits for the earlier segment.
        let (c2, stop2) = (c.clone(), stop.clone());
        let ahead = std::thread::spawn(move || {
            let mut h = c2.segment(1 << 20);
            h.feed_data(1 << 20, &vec![7; 1 << 20]);
            c2.submit_segment(h, &stop2);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ahead.is_finished(), "a segment far ahead must wait");
        let mut h = c.segment(0);
        h.feed_data(0, &vec![7; 1 << 20]);
        c.submit_segment(h, &stop);
        ahead.join().unwrap();
        let mut h = c.segment((1 << 30) + (1 << 20));
        h.feed_zero((1 << 30) + (1 << 20), 5);
        // The segment between is missing: still pending, and an error.
        c.submit_segment(h, &stop);
        assert!(c.finish((1 << 30) + (1 << 20) + 5).is_err());
    }
}
