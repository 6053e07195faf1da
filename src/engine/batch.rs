//! Batches: the unit of work between a worker's reading and writing halves.
//!
//! A [`Cursor`] walks the extents of one segment and fills a [`Batch`] with
//! up to `requests` source reads (and zero operations) whose data fits the
//! batch buffer. Once the reads are done, [`Batch::plan_writes`] scans the
//! data for zero runs and produces the destination operations, in offset
//! order so that sequential destinations (stdout) receive bytes in order.

use crate::endpoint::{Extent, ExtentKind, Payload, ReadOp, WriteBuffer, WriteOp};

use super::zero;

/// How batches are shaped; fixed for a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest source read; reads are aligned to multiples of it.
    pub chunk: usize,
    /// Most requests (reads, zeroes) in one batch.
    pub requests: usize,
    /// Bytes of data one batch may hold.
    pub batch_bytes: usize,
    /// Bytes of reads one worker may keep in flight, in several batches,
    /// when its peers are slow to answer (see [`Limits::read_depth`]).
    pub most_in_flight: usize,
    /// Zero-detection granularity in bytes, 0 for none.
    pub sparse: usize,
    /// The destination already reads as zeroes: zero runs need no request.
    pub skip_zeroes: bool,
    /// Zero requests must leave the blocks allocated.
    pub allocate: bool,
    /// Neighbouring writes are merged up to this many bytes.
    pub merge_writes: usize,
    /// Writes to a destination quick to answer are cut to at most this
    /// many bytes (see [`Limits::largest_write`]); at most `merge_writes`.
    pub write_size: usize,
    /// Where the source ends (`u64::MAX` if unknown).
    pub tail_end: u64,
    /// The destination's minimum block size: a last write or zero that
    /// ends the source inside a block is padded with zeroes to the block's
    /// end, since the destination cannot take a partial block (and the
    /// destination is at least that large, its size being whole blocks).
    pub tail_align: u64,
    /// Where source offsets land on the destination (a range copied to
    /// another place).
    pub shift: Shift,
}

/// Moves source offsets to destination offsets: the source's
/// `source_start` is the destination's `destination_start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shift {
    /// First source byte copied.
    pub source_start: u64,
    /// Where it is written.
    pub destination_start: u64,
}

impl Shift {
    /// The destination offset for source offset `offset` (at least
    /// `source_start`; the plan checked the range fits both sides).
    pub fn apply(&self, offset: u64) -> u64 {
        offset - self.source_start + self.destination_start
    }
}

/// The rate one connection is sized for when its peer is slow to answer:
/// a worker keeps in flight what this rate moves in one round trip, so a
/// connection waiting on a 2 ms server still moves 4 GiB/s, about what
/// one Unix socket connection reaches here (qemu-nbd to `null:`,
/// 6.5 GB/s). Below 0.5 ms that is one batch of [`Limits::batch_bytes`],
/// and batches are read one at a time, as on a fast path they should be:
/// small batches keep data in cache.
pub const LATENCY_FILL_RATE: f64 = 4.0 * (1u64 << 30) as f64;

/// A destination that takes at least this long to answer a write gets
/// writes as long as they merge ([`Limits::merge_writes`]), not cut to
/// [`Limits::write_size`]: a server serves a few requests at a time per
/// connection, each waiting out the delay, so their length is its rate.
/// nbdkit memory with writes delayed 10 ms (1 GiB of the mixed image from
/// a file): 0.97 s with 256 KiB writes, 0.36 s merged to 2 MiB; with
/// `-C1` 1.81 s against 0.59 s. At 2 ms 0.28 s against 0.26 s.
pub const SLOW_DESTINATION: std::time::Duration = std::time::Duration::from_millis(1);

/// Reads in flight grow in steps of this many bytes, whatever the batch
/// size, so that below 0.5 ms (2 MiB at [`LATENCY_FILL_RATE`]) a worker
/// reads one batch at a time: over TCP batches are 512 KiB, and nbdkit
/// memory on loopback, answering in 0.4 ms, got three at once for 20 %
/// more CPU and no gain.
pub const READ_AHEAD_STEP: usize = 2 * 1024 * 1024;

impl Limits {
    /// Batches whose reads a worker keeps in flight at once when its
    /// peers take `latency` to answer (the slower side's): enough to cover
    /// the round trip at [`LATENCY_FILL_RATE`], at least one, at most
    /// [`Limits::most_read_depth`].
    ///
    /// One batch at a time is one round trip per batch: with 2 MiB
    /// batches a source 10 ms away gave 180 MB/s on one connection, where
    /// nbdcopy keeps 16 requests in flight and got 400 MB/s.
    pub fn read_depth(&self, latency: Option<std::time::Duration>) -> usize {
        let Some(latency) = latency else {
            return 1;
        };
        // A float beyond usize saturates: `as` is the bound wanted here.
        let wanted = (latency.as_secs_f64() * LATENCY_FILL_RATE) as usize;
        let wanted = wanted - wanted % READ_AHEAD_STEP;
        (wanted / self.batch_bytes.max(1)).clamp(1, self.most_read_depth())
    }

    /// The longest write to a destination that took `latency` to answer
    /// one: [`Limits::write_size`] until it is known to be slower than
    /// [`SLOW_DESTINATION`], then [`Limits::merge_writes`].
    pub fn largest_write(&self, latency: Option<std::time::Duration>) -> usize {
        match latency {
            Some(latency) if latency >= SLOW_DESTINATION => self.merge_writes,
            _ => self.write_size.min(self.merge_writes),
        }
        .max(1)
    }

    /// The most batches a worker keeps reading at once: as many as fit
    /// `most_in_flight`.
    pub fn most_read_depth(&self) -> usize {
        (self.most_in_flight / self.batch_bytes.max(1)).max(1)
    }

    /// Zero bytes needed after the source's last byte to end on a block.
    fn tail_padding(&self) -> usize {
        if self.tail_end == u64::MAX || self.tail_align <= 1 {
            return 0;
        }
        (self.tail_end.next_multiple_of(self.tail_align) - self.tail_end) as usize
    }
}

#[derive(Clone, Copy, Debug)]
struct ReadSlot {
    offset: u64,
    start: usize,
    len: usize,
}

#[derive(Clone, Copy, Debug)]
enum Item {
    Data(usize),
    Zero { offset: u64, len: u64 },
}

/// A planned destination operation; data lives in the batch buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Write {
        offset: u64,
        start: usize,
        len: usize,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

/// Buffers and plans for one batch; reused from batch to batch.
#[derive(Debug, Default)]
pub struct Batch {
    /// Replaced, never refilled, once an endpoint poisons it (see
    /// [`WriteBuffer`]).
    buf: Option<WriteBuffer>,
    reads: Vec<ReadSlot>,
    items: Vec<Item>,
    ops: Vec<Op>,
    used: usize,
    /// Source offset of the first byte covered.
    start: u64,
    covered: u64,
}

/// A piece of the source range a batch covers, in offset order (see
/// [`Batch::for_each_piece`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes read from the source at `offset`.
    Data {
        /// Source offset of the first byte.
        offset: u64,
        /// What was read.
        bytes: &'a [u8],
    },
    /// `len` bytes at `offset` that the source says read as zeroes; not
    /// read.
    Zero {
        /// Source offset of the first byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl Batch {
    /// Source bytes this batch accounts for (read, zeroed or skipped).
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Call `f` with every piece of the source range the batch covers, in
    /// order and without gaps: what its reads got (once they are done)
    /// and, between and around them, the zero extents.
    pub fn for_each_piece(&self, mut f: impl FnMut(Piece<'_>)) {
        let bytes = self.bytes();
        let end = self.start + self.covered;
        let mut at = self.start;
        for slot in &self.reads {
            if slot.offset > at {
                f(Piece::Zero {
                    offset: at,
                    len: slot.offset - at,
                });
            }
            f(Piece::Data {
                offset: slot.offset,
                bytes: &bytes[slot.start..slot.start + slot.len],
            });
            at = slot.offset + slot.len as u64;
        }
        if end > at {
            f(Piece::Zero {
                offset: at,
                len: end - at,
            });
        }
    }

    /// Whether the batch holds nothing at all.
    pub fn is_empty(&self) -> bool {
        self.covered == 0
    }

    fn clear(&mut self) {
        self.reads.clear();
        self.items.clear();
        self.ops.clear();
        self.used = 0;
        self.covered = 0;
    }

    /// The batch's memory to fill, at least `len` bytes: a fresh buffer
    /// if the one it had is too small or was poisoned by a failed
    /// connection that may still read it.
    fn memory(&mut self, len: usize) -> &mut [u8] {
        memory(&mut self.buf, len)
    }

    /// The batch's contents.
    fn bytes(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], WriteBuffer::as_slice)
    }

    /// Bytes this batch reads from the source.
    pub fn read_bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.len as u64).sum()
    }

    /// The source reads of this batch, borrowing the buffer.
    pub fn read_ops(&mut self) -> Vec<ReadOp<'_>> {
        let mut out = Vec::with_capacity(self.reads.len());
        let used = self.used;
        let mut rest: &mut [u8] = &mut memory(&mut self.buf, used)[..used];
        for slot in &self.reads {
            let (head, tail) = rest.split_at_mut(slot.len);
            out.push(ReadOp {
                offset: slot.offset,
                buf: head,
            });
            rest = tail;
        }
        out
    }

    /// After the reads: find zero runs and plan the destination operations.
    pub fn plan_writes(&mut self, limits: &Limits) {
        self.ops.clear();
        let mut ops = std::mem::take(&mut self.ops);
        for item in &self.items {
            match *item {
                Item::Zero { offset, len } => push_zero(&mut ops, limits, offset, len),
                Item::Data(i) => {
                    let slot = self.reads[i];
                    let data = &self.bytes()[slot.start..slot.start + slot.len];
                    zero::scan(data, limits.sparse, |run| {
                        let offset = slot.offset + run.start as u64;
                        let len = run.end - run.start;
                        if run.zero {
                            push_zero(&mut ops, limits, offset, len as u64);
                        } else {
                            push_write(&mut ops, limits, offset, slot.start + run.start, len);
                        }
                    });
                }
            }
        }
        self.pad_tail(&mut ops, limits);
        self.ops = ops;
    }

    /// Extend an operation that ends the source inside a destination block
    /// to the end of that block (see [`Limits::tail_align`]).
    fn pad_tail(&mut self, ops: &mut [Op], limits: &Limits) {
        let pad = limits.tail_padding();
        if pad == 0 {
            return;
        }
        match ops.last_mut() {
            Some(Op::Write { offset, start, len }) if *offset + *len as u64 == limits.tail_end => {
                let end = *start + *len + pad;
                self.memory(end)[*start + *len..end].fill(0);
                *len += pad;
            }
            Some(Op::Zero { offset, len }) if *offset + *len == limits.tail_end => {
                *len += pad as u64
            }
            _ => {}
        }
    }

    /// Drop everything at or beyond source offset `end`: used when a pipe
    /// ends inside a batch.
    pub fn truncate(&mut self, end: u64) {
        let mut keep_reads = 0;
        let mut used = 0;
        for slot in self.reads.iter_mut() {
            if slot.offset >= end {
                break;
            }
            slot.len = slot.len.min((end - slot.offset) as usize);
            used = slot.start + slot.len;
            keep_reads += 1;
        }
        self.reads.truncate(keep_reads);
        self.items.retain(|item| match *item {
            Item::Data(i) => i < keep_reads,
            Item::Zero { offset, .. } => offset < end,
        });
        self.used = used;
        let start = self.reads.first().map_or(end, |s| s.offset);
        self.covered = end.saturating_sub(start);
    }

    /// The destination operations planned by [`Batch::plan_writes`], at
    /// their destination offsets, writes longer than `largest_write` cut
    /// into writes of that length (a multiple of the destination's block
    /// size, as the plan makes it) and a shorter last one.
    pub fn write_ops(&self, limits: &Limits, largest_write: usize) -> Vec<WriteOp<'_>> {
        let allocate = limits.allocate;
        let largest_write = largest_write.max(1);
        let mut out = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            match *op {
                Op::Write { offset, start, len } => {
                    let mut done = 0;
                    while done < len {
                        let piece = (len - done).min(largest_write);
                        let range = start + done..start + done + piece;
                        out.push(WriteOp::Write {
                            offset: limits.shift.apply(offset + done as u64),
                            data: match &self.buf {
                                Some(buf) => Payload::lendable(buf, range),
                                None => Payload::copied(&[]),
                            },
                        });
                        done += piece;
                    }
                }
                Op::Zero { offset, len } => out.push(WriteOp::Zero {
                    offset: limits.shift.apply(offset),
                    length: len,
                    allocate,
                }),
            }
        }
        out
    }
}

/// At least `len` bytes of `buf` to fill: a fresh buffer if the one there
/// is too small or was poisoned by a failed connection that may still
/// read it.
fn memory(buf: &mut Option<WriteBuffer>, len: usize) -> &mut [u8] {
    let usable = buf
        .as_ref()
        .is_some_and(|b| b.len() >= len && !b.is_poisoned());
    if !usable {
        *buf = Some(WriteBuffer::new(len));
    }
    match buf.as_mut().and_then(WriteBuffer::as_mut_slice) {
        Some(memory) => memory,
        // Just checked or made: neither missing nor poisoned.
        None => &mut [],
    }
}

fn push_zero(ops: &mut Vec<Op>, limits: &Limits, offset: u64, len: u64) {
    if limits.skip_zeroes || len == 0 {
        return;
    }
    if let Some(Op::Zero { offset: o, len: l }) = ops.last_mut() {
        if *o + *l == offset {
            *l += len;
            return;
        }
    }
    ops.push(Op::Zero { offset, len });
}

fn push_write(ops: &mut Vec<Op>, limits: &Limits, offset: u64, start: usize, len: usize) {
    if let Some(Op::Write {
        offset: o,
        start: s,
        len: l,
    }) = ops.last_mut()
    {
        if *o + *l as u64 == offset && *s + *l == start && *l + len <= limits.merge_writes {
            *l += len;
            return;
        }
    }
    ops.push(Op::Write { offset, start, len });
}

/// Walks the extents of one segment, handing them out batch by batch.
#[derive(Debug)]
pub struct Cursor {
    extents: Vec<Extent>,
    index: usize,
    pos: u64,
}

impl Cursor {
    /// A cursor at the start of `extents` (sorted, gap-free).
    pub fn new(extents: Vec<Extent>) -> Cursor {
        let pos = extents.first().map_or(0, |e| e.offset);
        Cursor {
            extents,
            index: 0,
            pos,
        }
    }

    /// Whether every extent has been handed out.
    pub fn is_done(&self) -> bool {
        self.index >= self.extents.len()
    }

    /// Clear `batch` and fill it with the next requests.
    pub fn fill(&mut self, batch: &mut Batch, limits: &Limits) {
        batch.clear();
        batch.start = self.pos;
        batch.memory(limits.batch_bytes);
        while let Some(e) = self.extents.get(self.index).copied() {
            let remaining = e.end() - self.pos;
            // Every item, data or zero, is one request on the wire.
            let request_count = batch.items.len();
            match e.kind {
                ExtentKind::Zero => {
                    if !limits.skip_zeroes {
                        if request_count >= limits.requests {
                            break;
                        }
                        batch.items.push(Item::Zero {
                            offset: self.pos,
                            len: remaining,
                        });
                    }
                    batch.covered += remaining;
                    self.advance_to(e.end());
                }
                ExtentKind::Data => {
                    let chunk = limits.chunk as u64;
                    let stop = e.end().min((self.pos / chunk + 1) * chunk);
                    let len = (stop - self.pos) as usize;
                    let room = if stop == limits.tail_end {
                        len + limits.tail_padding()
                    } else {
                        len
                    };
                    if request_count >= limits.requests || batch.used + room > limits.batch_bytes {
                        break;
                    }
                    batch.items.push(Item::Data(batch.reads.len()));
                    batch.reads.push(ReadSlot {
                        offset: self.pos,
                        start: batch.used,
                        len,
                    });
                    batch.used += room;
                    batch.covered += len as u64;
                    self.advance_to(stop);
                }
            }
        }
    }

    fn advance_to(&mut self, pos: u64) {
        self.pos = pos;
        if let Some(e) = self.extents.get(self.index) {
            if pos >= e.end() {
                self.index += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> Limits {
        Limits {
            chunk: 8192,
            requests: 4,
            batch_bytes: 16384,
            most_in_flight: 16384,
            sparse: 4096,
            skip_zeroes: false,
            allocate: false,
            merge_writes: 1 << 20,
            write_size: 1 << 20,
            tail_end: u64::MAX,
            tail_align: 1,
            shift: Shift::default(),
        }
    }

    fn ext(offset: u64, length: u64, zero: bool) -> Extent {
        Extent::test(offset, length, zero)
    }

    #[test]
    fn a_quick_destination_gets_short_writes_and_a_slow_one_merged_writes() {
        let l = Limits {
            merge_writes: 4 << 20,
            write_size: 256 << 10,
            ..limits()
        };
        let ms = Duration::from_millis;
        for (latency, want) in [
            (None, 256 << 10),
            (Some(ms(0)), 256 << 10),
            (Some(Duration::from_micros(999)), 256 << 10),
            (Some(SLOW_DESTINATION), 4 << 20),
            (Some(ms(10)), 4 << 20),
        ] {
            assert_eq!(l.largest_write(latency), want, "{latency:?}");
        }
        // Never past what merges, nor zero.
        let odd = Limits {
            merge_writes: 8192,
            write_size: 1 << 20,
            ..limits()
        };
        assert_eq!(odd.largest_write(None), 8192);
        let zero = Limits {
            merge_writes: 0,
            write_size: 0,
            ..limits()
        };
        assert_eq!(zero.largest_write(None), 1);
    }

    #[test]
    fn writes_longer_than_the_largest_are_cut() {
        let l = limits();
        let mut batch = Batch::default();
        let mut cursor = Cursor::new(vec![ext(0, 16384, false), ext(16384, 4096, true)]);
        cursor.fill(&mut batch, &l);
        for op in batch.read_ops() {
            op.buf.fill(1);
        }
        batch.plan_writes(&l);
        let cut: Vec<(u64, usize)> = batch
            .write_ops(&l, 6144)
            .iter()
            .map(|op| match op {
                WriteOp::Write { offset, data } => (*offset, data.len()),
                WriteOp::Zero { offset, length, .. } => (*offset, *length as usize),
            })
            .collect();
        // 16 KiB of data in 6 KiB writes, and the zero extent whole.
        assert_eq!(
            cut,
            vec![(0, 6144), (6144, 6144), (12288, 4096), (16384, 4096)]
        );
        let whole = batch.write_ops(&l, l.merge_writes);
        assert_eq!(whole.len(), 2);
    }

    /// Run a cursor to the end; return (read offsets+lens, ops) per batch.
    fn drive(extents: Vec<Extent>, limits: &Limits, data: &dyn Fn(u64) -> u8) -> Vec<Vec<Op>> {
        let total: u64 = extents.iter().map(|e| e.length).sum();
        let mut cursor = Cursor::new(extents);
        let mut batch = Batch::default();
        let mut out = Vec::new();
        let mut covered = 0;
        while !cursor.is_done() {
            cursor.fill(&mut batch, limits);
            assert!(!batch.is_empty(), "a batch must make progress");
            for op in batch.read_ops() {
                for (i, b) in op.buf.iter_mut().enumerate() {
                    *b = data(op.offset + i as u64);
                }
            }
            batch.plan_writes(limits);
            covered += batch.covered();
            out.push(batch.ops.clone());
        }
        assert_eq!(covered, total);
        out
    }

    #[test]
    fn batches_respect_request_and_byte_limits() {
        let l = limits();
        let batches = drive(vec![ext(0, 40000, false)], &l, &|_| 1);
        // 16 KiB per batch, chunks of 8 KiB merged into one write each.
        assert_eq!(batches.len(), 3);
        assert_eq!(
            batches[0],
            vec![Op::Write {
                offset: 0,
                start: 0,
                len: 16384
            }]
        );
        assert_eq!(
            batches[2],
            vec![Op::Write {
                offset: 32768,
                start: 0,
                len: 40000 - 32768
            }]
        );
    }

    #[test]
    fn zero_runs_in_data_and_holes_become_one_zero_op() {
        let l = limits();
        // Data 0..8192 where the second 4 KiB block is zero, then a hole.
        let batches = drive(
            vec![
                ext(0, 8192, false),
                ext(8192, 100_000, true),
                ext(108_192, 4096, false),
            ],
            &l,
            &|off| if (4096..108_192).contains(&off) { 0 } else { 9 },
        );
        let ops: Vec<Op> = batches.concat();
        assert_eq!(
            ops,
            vec![
                Op::Write {
                    offset: 0,
                    start: 0,
                    len: 4096
                },
                Op::Zero {
                    offset: 4096,
                    len: 104_096
                },
                Op::Write {
                    offset: 108_192,
                    start: 8192,
                    len: 4096
                },
            ]
        );
    }

    #[test]
    fn more_batches_are_read_at_once_the_slower_the_peers() {
        let l = Limits {
            batch_bytes: 2 << 20,
            most_in_flight: 8 << 20,
            ..limits()
        };
        let us = Duration::from_micros;
        // (latency, batches in flight)
        let cases = [
            // Unknown or short: one at a time.
            (None, 1),
            (Some(us(0)), 1),
            (Some(us(100)), 1),
            (Some(us(900)), 1),
            // 1 ms at 4 GiB/s is 4 MiB: two batches; 1.4 ms still two.
            (Some(us(1000)), 2),
            (Some(us(1400)), 2),
            (Some(us(1500)), 3),
            // Longer: the queue's share is the bound.
            (Some(us(2000)), 4),
            (Some(us(10_000)), 4),
            (Some(Duration::from_secs(1 << 40)), 4),
        ];
        for (latency, want) in cases {
            assert_eq!(l.read_depth(latency), want, "{latency:?}");
        }
        assert_eq!(l.most_read_depth(), 4);
        // Small batches (TCP's) grow in whole 2 MiB steps.
        let small = Limits {
            batch_bytes: 512 << 10,
            ..l
        };
        assert_eq!(small.read_depth(Some(us(400))), 1);
        assert_eq!(small.read_depth(Some(us(600))), 4);
        assert_eq!(small.read_depth(Some(us(1000))), 8);
        assert_eq!(small.read_depth(Some(us(10_000))), 16);
        // Where the queue holds one batch, one it is.
        let fixed = Limits {
            most_in_flight: 1 << 20,
            ..l
        };
        assert_eq!(fixed.read_depth(Some(us(10_000))), 1);
        assert_eq!(fixed.most_read_depth(), 1);
    }

    #[test]
    fn skipped_zeroes_produce_no_ops_but_count_as_covered() {
        let l = Limits {
            skip_zeroes: true,
            ..limits()
        };
        let batches = drive(
            vec![ext(0, 1 << 30, true), ext(1 << 30, 4096, false)],
            &l,
            &|_| 0,
        );
        assert!(batches.concat().is_empty());
    }

    #[test]
    fn the_last_write_is_padded_to_the_destination_block() {
        let l = Limits {
            tail_end: 10_000,
            tail_align: 4096,
            ..limits()
        };
        // Data up to the unaligned end: the last write grows to 12288 with
        // zero bytes, even though the buffer held other data before.
        let batches = drive(vec![ext(0, 10_000, false)], &l, &|_| 3);
        let ops = batches.concat();
        assert_eq!(
            ops.last(),
            Some(&Op::Write {
                offset: 0,
                start: 0,
                len: 12288
            })
        );
        // A zero run at the end is padded the same way.
        let batches = drive(vec![ext(0, 10_000, false)], &l, &|o| {
            if o < 8192 { 1 } else { 0 }
        });
        assert_eq!(
            batches.concat().last(),
            Some(&Op::Zero {
                offset: 8192,
                len: 4096
            })
        );
    }

    #[test]
    fn padding_bytes_are_zero() {
        let l = Limits {
            tail_end: 5000,
            tail_align: 4096,
            ..limits()
        };
        let mut cursor = Cursor::new(vec![ext(0, 5000, false)]);
        let mut batch = Batch::default();
        cursor.fill(&mut batch, &l);
        for op in batch.read_ops() {
            op.buf.fill(0xaa);
        }
        // Leave garbage where the padding goes, as a previous batch would.
        batch.memory(8192)[5000..8192].fill(0xbb);
        batch.plan_writes(&l);
        let ops = batch.write_ops(&l, l.merge_writes);
        let WriteOp::Write { offset, data } = ops[0] else {
            panic!("{ops:?}")
        };
        assert_eq!((offset, data.len()), (0, 8192));
        assert!(data[..5000].iter().all(|&b| b == 0xaa));
        assert!(data[5000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_poisoned_buffer_is_replaced_not_refilled() {
        let l = limits();
        let mut cursor = Cursor::new(vec![ext(0, 40000, false)]);
        let mut batch = Batch::default();
        cursor.fill(&mut batch, &l);
        for op in batch.read_ops() {
            op.buf.fill(0xaa);
        }
        batch.plan_writes(&l);
        let first = batch.bytes().as_ptr();
        // An endpoint whose connection died with the pages lent.
        for op in batch.write_ops(&l, l.merge_writes) {
            if let WriteOp::Write { data, .. } = op {
                data.lendable_from().unwrap().poison();
            }
        }
        cursor.fill(&mut batch, &l);
        assert_ne!(
            batch.bytes().as_ptr(),
            first,
            "a poisoned buffer was reused"
        );
        let reads = batch.read_ops();
        assert!(!reads.is_empty());
    }

    #[test]
    fn pieces_cover_the_batch_in_order_holes_included() {
        let l = Limits {
            skip_zeroes: true,
            ..limits()
        };
        let mut cursor = Cursor::new(vec![
            ext(100, 50, true),
            ext(150, 10, false),
            ext(160, 1000, true),
            ext(1160, 5, false),
            ext(1165, 7, true),
        ]);
        let mut batch = Batch::default();
        cursor.fill(&mut batch, &l);
        for op in batch.read_ops() {
            op.buf.fill(op.offset as u8);
        }
        let mut pieces = Vec::new();
        batch.for_each_piece(|p| {
            pieces.push(match p {
                Piece::Data { offset, bytes } => (offset, bytes.len() as u64, bytes[0] != 0),
                Piece::Zero { offset, len } => (offset, len, false),
            })
        });
        assert_eq!(
            pieces,
            vec![
                (100, 50, false),
                (150, 10, true),
                (160, 1000, false),
                (1160, 5, true),
                (1165, 7, false)
            ]
        );
    }

    #[test]
    fn reads_are_chunk_aligned() {
        let l = limits();
        let mut cursor = Cursor::new(vec![ext(1000, 20000, false)]);
        let mut batch = Batch::default();
        cursor.fill(&mut batch, &l);
        let reads: Vec<(u64, usize)> = batch
            .read_ops()
            .iter()
            .map(|r| (r.offset, r.buf.len()))
            .collect();
        assert_eq!(reads, vec![(1000, 8192 - 1000), (8192, 8192)]);
    }
}
