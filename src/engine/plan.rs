//! The copy's policy, decided once from both endpoints and the options:
//! request size, alignment, batch shape, zero handling, tail padding,
//! workers, flushing. Pure: no I/O, so every rule has a table test below.
//! The orchestration in [`super`] only reads the plan.

use std::time::Duration;

use crate::blkhash::BlkhashSpec;
use crate::endpoint::{BlockSize, Capabilities, Endpoint, Tuning};
use crate::error::{Error, ErrorKind, Result};
use crate::options::{CopyOptions, DEFAULT_REQUEST_SIZE, MAX_REQUEST_SIZE, MIN_REQUEST_SIZE};

use super::batch::{Limits, Shift};

/// Most data in one batch. Measured on qcow2 -> qcow2 through qemu-nbd
/// (2 cores shared with both servers): 2 MiB batches cost 0.34 s of CPU
/// and 1.0 s wall for 2 GiB, 8 MiB batches 0.45 s and 1.6-3.8 s, because
/// data received into a small batch is still in cache when it is sent on.
/// `--queue-size` stays the upper bound.
pub const BATCH_TARGET: usize = 2 * 1024 * 1024;

/// Writes next to each other in the batch buffer are merged up to the
/// request size, but at least this much: fewer, larger writes cost the
/// servers less per byte.
const MIN_MERGED_WRITE: usize = 4 * 1024 * 1024;

/// What the plan needs to know of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// The endpoint's name, for errors.
    pub name: String,
    /// Size in bytes, if known.
    pub size: Option<u64>,
    /// What it can do.
    pub capabilities: Capabilities,
    /// How it is best driven.
    pub tuning: Tuning,
    /// Its request constraints.
    pub block_size: BlockSize,
    /// How long its server took to answer a read, if it was asked.
    pub read_latency: Option<Duration>,
}

impl Side {
    /// The facts of an open endpoint.
    pub fn of(endpoint: &dyn Endpoint) -> Side {
        Side {
            name: endpoint.name().to_string(),
            size: endpoint.size(),
            capabilities: endpoint.capabilities(),
            tuning: endpoint.tuning(),
            block_size: endpoint.block_size(),
            read_latency: endpoint.read_latency(),
        }
    }
}

/// How the source is walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// In order, by one thread, until it ends (a pipe, or a size unknown).
    Stream,
    /// Cut into segments of `segment_size` over the `length` bytes from
    /// source offset `start`, copied by up to `workers` workers.
    Segments {
        /// First source byte copied.
        start: u64,
        /// Bytes copied: the source's size, or the range's length.
        length: u64,
        /// Length of each segment (the last may be shorter).
        segment_size: u64,
        /// Workers wanted; fewer if extra connections cannot be had.
        workers: usize,
    },
}

/// Everything decided about a copy before it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// How the source is walked.
    pub shape: Shape,
    /// How batches are shaped.
    pub limits: Limits,
    /// Both sides' minimum block size: extents are aligned to it.
    pub align: u64,
    /// A worker reads the next batch while writing the previous one (two
    /// threads); off with `--synchronous`.
    pub overlap: bool,
    /// Ask the source where its data is.
    pub use_extents: bool,
    /// Flush each finished segment, so that a destination that restarts
    /// cannot lose acknowledged writes of a segment counted as done
    /// (retries on, and the destination can reconnect).
    pub flush_segments: bool,
    /// Flush the destination at the end.
    pub final_flush: bool,
    /// Times a segment may be retried.
    pub retries: u32,
    /// Most bytes of data read from the source a second (`--rate`).
    pub rate: Option<u64>,
    /// The blkhash to compute while copying.
    pub blkhash: Option<BlkhashSpec>,
}

/// Most blkhash blocks in one segment: the digests of a segment being
/// copied are held until it is done (4 MiB of md5 digests).
const MAX_BLKHASH_BLOCKS_PER_SEGMENT: u64 = 1 << 18;

/// The segment size with a blkhash: whole blocks, so that no block is
/// shared by two segments (a segment is at least one block), and not so
/// many blocks that a segment's digests take much memory (tiny blocks
/// make smaller segments, never smaller than a request).
fn segment_size(options: &CopyOptions, chunk: usize) -> u64 {
    let Some(spec) = options.blkhash else {
        return options.segment_size;
    };
    let block = spec.block_size.max(1);
    options
        .segment_size
        .max(block)
        .min(block.saturating_mul(MAX_BLKHASH_BLOCKS_PER_SEGMENT))
        .max((chunk as u64).next_power_of_two())
}

/// The smaller of two endpoint hints, where 0 means "no preference".
fn smallest_hint(a: usize, b: usize) -> Option<usize> {
    [a, b].into_iter().filter(|&hint| hint > 0).min()
}

/// The request size when the user did not choose one: the smallest that
/// an endpoint asks for, else [`DEFAULT_REQUEST_SIZE`]; never more than
/// the queue holds or a segment spans, nor less than the zero-detection
/// block.
fn auto_request_size(source: &Tuning, destination: &Tuning, options: &CopyOptions) -> usize {
    let asked = smallest_hint(source.request_size, destination.request_size)
        .unwrap_or(DEFAULT_REQUEST_SIZE);
    let queue_bound = 1usize << options.queue_size.max(MIN_REQUEST_SIZE).ilog2();
    let segment_bound = usize::try_from(options.segment_size).unwrap_or(MAX_REQUEST_SIZE);
    asked
        .min(queue_bound)
        .min(segment_bound)
        .max(options.sparse_size)
        .clamp(MIN_REQUEST_SIZE, MAX_REQUEST_SIZE)
}

/// The longest write to a destination quick to answer: as long as writes
/// merge (`merge_writes`) if the user set `--request-size` or the
/// destination states no preference, else the destination's hint
/// ([`Tuning::write_size`]: an NBD server's allocator makes long writes
/// cost it page faults), whole zero-detection blocks and blocks of the
/// destination.
fn fast_write_size(
    destination: &Side,
    options: &CopyOptions,
    merge_writes: usize,
    align: u64,
) -> usize {
    match destination.tuning.write_size {
        _ if options.request_size.is_some() => merge_writes,
        0 => merge_writes,
        hint => hint
            .max(options.sparse_size)
            .clamp(MIN_REQUEST_SIZE, MAX_REQUEST_SIZE)
            .next_multiple_of(usize::try_from(align).unwrap_or(1))
            .min(merge_writes),
    }
}

/// Most workers: `-C` bounded by `-T`. Left to choose (`-T 0`), the bound
/// is the number of cores, plus one when the source is a server that is
/// waited on (`source_waits`).
///
/// Each worker asks the source, waits for its answer, then sends on, so
/// with a server as source a worker spends part of its time idle.
/// Measured on 2 cores (alternating runs, medians): nbdkit sparse-random
/// to `null:` took 0.76 times as long with 3 workers as with 2 (1 TiB with
/// 0.1 % data) and 0.87 times (16 GiB with 6 %); qemu-nbd qcow2 to qcow2
/// 0.96 times, qemu-nbd to a file and to `null:` the same. Copies from a
/// local file are CPU work: 3 workers took 1.15 times as long file to file
/// and 1.04 times file to qemu-nbd, so they keep one per core.
///
/// A source slower to answer than [`SLOW_SOURCE`] leaves workers waiting
/// rather than computing, so the cores do not bound them: `-C` does.
fn worker_limit(options: &CopyOptions, source: &Side, cores: usize) -> usize {
    if options.synchronous {
        return 1;
    }
    let slow = source.read_latency.is_some_and(|l| l >= SLOW_SOURCE);
    let threads = match options.threads {
        0 if slow => options.connections,
        0 => cores + usize::from(source.tuning.waits_on_peer),
        threads => threads,
    };
    options.connections.min(threads).max(1)
}

/// A source that takes at least this long to answer a read gets `-C`
/// workers whatever the cores. Measured on 2 cores, nbdkit `pattern 2G`
/// with reads delayed, to `null:` (one run each): at 2 ms 3 workers took
/// 0.85 s and 4 workers 0.75 s (nbdcopy 1.24-1.56 s); at 10 ms 1.45 s and
/// 1.20 s (nbdcopy 5.3 s). On loopback a read is answered in well under
/// 1 ms, and CPU, not waiting, decides.
pub const SLOW_SOURCE: Duration = Duration::from_millis(1);

/// Bytes of data per batch, and the most bytes of reads a worker keeps in
/// flight, in several batches, for peers slow to answer (see
/// [`Limits::read_depth`]). Batches exist to keep requests in flight;
/// local files and pipes take one request at a time, and a batch of one
/// request stays in cache.
fn batch_bytes(
    source: &Side,
    destination: &Side,
    options: &CopyOptions,
    chunk: usize,
) -> (usize, usize) {
    let pipelined = source.tuning.waits_on_peer || destination.tuning.waits_on_peer;
    if !pipelined {
        return (chunk, chunk);
    }
    // A queue smaller than one request is raised to it, as nbdcopy does.
    let queue = options.queue_size.max(chunk);
    // With a reader and a writer half, two batches are in flight at once.
    let in_flight = if options.synchronous {
        queue
    } else {
        queue / 2
    };
    let target = in_flight.min(BATCH_TARGET);
    let hinted = smallest_hint(source.tuning.batch_size, destination.tuning.batch_size);
    let batch = hinted.map_or(target, |hint| hint.min(target)).max(chunk);
    (batch, in_flight.max(batch))
}

/// How the source is walked: segments over the range to copy (all of a
/// source of known size unless a range is given), or a stream. Fails if
/// the range does not fit either side.
fn shape(
    source: &Side,
    destination: &Side,
    options: &CopyOptions,
    cores: usize,
    segment_size: u64,
) -> Result<Shape> {
    let size = match source.size {
        Some(size) if !source.capabilities.sequential => size,
        _ if options.is_range() => {
            return Err(Error::usage(
                "a range (--source-offset, --destination-offset, --length) needs a source that is not a pipe",
            )
            .with_endpoint(&source.name));
        }
        _ if options.journal.is_some() => {
            return Err(Error::usage("--journal needs a source that is not a pipe")
                .with_endpoint(&source.name));
        }
        _ => return Ok(Shape::Stream),
    };
    let start = options.source_offset;
    let past_end = || {
        Error::usage(format!(
            "the range from offset {start}{} is past the end of the source ({size} bytes)",
            options
                .length
                .map_or(String::new(), |l| format!(" length {l}"))
        ))
        .with_endpoint(&source.name)
    };
    let length = match options.length {
        Some(length) if start.checked_add(length).is_some_and(|end| end <= size) => length,
        Some(_) => return Err(past_end()),
        None => size.checked_sub(start).ok_or_else(past_end)?,
    };
    if destination.capabilities.sequential && options.journal.is_some() {
        return Err(
            Error::usage("--journal needs a destination that is not a pipe")
                .with_endpoint(&destination.name),
        );
    }
    if destination.capabilities.sequential && options.destination_offset != 0 {
        return Err(
            Error::usage("--destination-offset needs a destination that is not a pipe")
                .with_endpoint(&destination.name),
        );
    }
    let end = options.destination_offset.checked_add(length);
    if let Some(dsize) = destination.size.filter(|&d| end.is_none_or(|e| e > d)) {
        let message = if options.is_range() {
            format!(
                "destination is too small: it has {dsize} bytes, the range ends at {}",
                end.map_or("beyond 2^64".to_string(), |e| e.to_string())
            )
        } else {
            format!("destination is too small: it has {dsize} bytes, the source has {size}")
        };
        return Err(Error::new(ErrorKind::TooSmall, message).with_endpoint(&destination.name));
    }
    let workers = if destination.capabilities.sequential {
        1
    } else {
        worker_limit(options, source, cores)
    };
    Ok(Shape::Segments {
        start,
        length,
        segment_size,
        workers,
    })
}

/// A range must start and end on each side's minimum block size (an NBD
/// server's), except where it ends at the end of the source.
fn check_alignment(
    source: &Side,
    destination: &Side,
    options: &CopyOptions,
    shape: &Shape,
) -> Result<()> {
    let Shape::Segments { start, length, .. } = *shape else {
        return Ok(());
    };
    let smin = u64::from(source.block_size.minimum.max(1));
    let dmin = u64::from(destination.block_size.minimum.max(1));
    let ends_source = source.size == Some(start + length);
    let checks = [
        (&source.name, "--source-offset", start, smin),
        (
            &destination.name,
            "--destination-offset",
            options.destination_offset,
            dmin,
        ),
        (&destination.name, "--length", length, dmin),
    ];
    for (name, what, value, block) in checks {
        if value % block != 0 {
            return Err(Error::usage(format!(
                "{what} {value} is not a multiple of the minimum block size, {block}"
            ))
            .with_endpoint(name));
        }
    }
    if !ends_source && length % smin != 0 {
        return Err(Error::usage(format!(
            "--length {length} is not a multiple of the minimum block size, {smin}"
        ))
        .with_endpoint(&source.name));
    }
    Ok(())
}

impl Plan {
    /// Resuming from a journal: the destination holds whatever the
    /// interrupted run wrote, so it can no longer be taken to read as
    /// zeroes, and holes are zeroed rather than skipped.
    pub fn resume(&mut self) {
        self.limits.skip_zeroes = false;
    }

    /// Decide how to copy `source` to `destination` with `options` on a
    /// machine with `cores` cores. Fails if the destination is read-only
    /// or smaller than the source.
    pub fn new(
        source: &Side,
        destination: &Side,
        options: &CopyOptions,
        cores: usize,
    ) -> Result<Plan> {
        options.validate()?;
        if options.verify && !destination.capabilities.read_back {
            return Err(
                Error::usage("--verify needs a destination that can be read back")
                    .with_endpoint(&destination.name),
            );
        }
        if destination.capabilities.read_only {
            return Err(
                Error::new(ErrorKind::Unsupported, "the destination is read-only")
                    .with_endpoint(&destination.name),
            );
        }
        let smin = u64::from(source.block_size.minimum.max(1));
        let dmin = u64::from(destination.block_size.minimum.max(1));
        let align = smin.max(dmin);
        let chunk = options
            .request_size
            .unwrap_or_else(|| auto_request_size(&source.tuning, &destination.tuning, options))
            .next_multiple_of(align as usize);
        // Zero runs in data are found to leave holes; --allocated wants
        // none, so it turns the scan off, as nbdcopy does (libnbd's
        // copy-sparse-allocated.sh writes whole 32 KiB extents).
        let zero_scan =
            options.sparse_size != 0 && destination.tuning.zero_scan && !options.allocated;
        let (batch_bytes, most_in_flight) = batch_bytes(source, destination, options, chunk);
        // --request-size is a ceiling a user sets because a server or a
        // network path cannot take more: writes are merged up to it, never
        // past it. Left to choose, larger merged writes cost a slow server,
        // or a local file, less.
        let merge_writes = if options.request_size.is_some() {
            chunk
        } else {
            chunk.clamp(MIN_MERGED_WRITE, MAX_REQUEST_SIZE)
        };
        let mut limits = Limits {
            chunk,
            requests: if options.synchronous {
                1
            } else {
                options.requests
            },
            batch_bytes,
            most_in_flight,
            sparse: if zero_scan {
                options.sparse_size.next_multiple_of(dmin as usize)
            } else {
                0
            },
            skip_zeroes: (destination.capabilities.starts_zeroed || options.destination_is_zero)
                && !options.allocated,
            allocate: options.allocated,
            merge_writes,
            write_size: fast_write_size(destination, options, merge_writes, align),
            tail_end: source.size.unwrap_or(u64::MAX),
            tail_align: dmin,
            shift: Shift::default(),
        };
        let shape = shape(
            source,
            destination,
            options,
            cores,
            segment_size(options, chunk),
        )?;
        if let Shape::Segments { start, .. } = shape {
            limits.shift = Shift {
                source_start: start,
                destination_start: options.destination_offset,
            };
            if options.is_range() {
                check_alignment(source, destination, options, &shape)?;
                // The range's end is inside the source: nothing to pad.
                limits.tail_end = u64::MAX;
            }
        }
        let streaming = shape == Shape::Stream;
        Ok(Plan {
            shape,
            limits,
            align,
            overlap: !options.synchronous && !streaming,
            use_extents: options.extents && source.capabilities.extents && !streaming,
            // A journal records a segment once it is flushed; with retries
            // a destination that restarts cannot lose acknowledged writes
            // of a segment counted as done.
            flush_segments: !streaming
                && destination.capabilities.flush
                && (options.journal.is_some()
                    || (options.flush
                        && options.retries > 0
                        && destination.capabilities.reconnect)),
            final_flush: options.flush && destination.capabilities.flush,
            retries: if streaming { 0 } else { options.retries },
            rate: options.rate,
            blkhash: options.blkhash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{DEFAULT_CONNECTIONS, DEFAULT_QUEUE_SIZE};

    const CORES: usize = 2;

    fn file(size: Option<u64>) -> Side {
        Side {
            name: "file".into(),
            size,
            capabilities: Capabilities {
                flush: true,
                extents: true,
                ..Capabilities::default()
            },
            tuning: Tuning::default(),
            block_size: BlockSize::default(),
            read_latency: None,
        }
    }

    fn nbd(size: Option<u64>, tcp: bool) -> Side {
        Side {
            name: "nbd".into(),
            capabilities: Capabilities {
                flush: true,
                extents: true,
                reconnect: true,
                ..Capabilities::default()
            },
            tuning: Tuning {
                waits_on_peer: true,
                request_size: if tcp { 256 << 10 } else { 1 << 20 },
                write_size: if tcp { 512 << 10 } else { 256 << 10 },
                batch_size: if tcp { 512 << 10 } else { 0 },
                zero_scan: true,
            },
            ..file(size)
        }
    }

    /// An NBD source that answered a read in `latency`.
    fn slow(latency: Duration) -> Side {
        Side {
            read_latency: Some(latency),
            ..nbd(Some(G), false)
        }
    }

    fn null() -> Side {
        Side {
            name: "null:".into(),
            size: None,
            capabilities: Capabilities {
                starts_zeroed: true,
                ..Capabilities::default()
            },
            tuning: Tuning {
                zero_scan: false,
                ..Tuning::default()
            },
            block_size: BlockSize::default(),
            read_latency: None,
        }
    }

    fn pipe() -> Side {
        Side {
            name: "-".into(),
            size: None,
            capabilities: Capabilities {
                sequential: true,
                ..Capabilities::default()
            },
            tuning: Tuning {
                batch_size: 1 << 20,
                ..Tuning::default()
            },
            block_size: BlockSize::default(),
            read_latency: None,
        }
    }

    fn plan(source: &Side, destination: &Side, options: &CopyOptions) -> Plan {
        Plan::new(source, destination, options, CORES).unwrap()
    }

    fn with(f: impl FnOnce(&mut CopyOptions)) -> CopyOptions {
        let mut o = CopyOptions::default();
        f(&mut o);
        o
    }

    const G: u64 = 1 << 30;

    #[test]
    fn request_size_follows_the_endpoints_unless_the_user_chose() {
        let d = CopyOptions::default();
        let cases: &[(Side, Side, CopyOptions, usize)] = &[
            (file(Some(G)), file(None), d.clone(), DEFAULT_REQUEST_SIZE),
            (nbd(Some(G), false), file(None), d.clone(), 1 << 20),
            (file(Some(G)), nbd(Some(G), false), d.clone(), 1 << 20),
            // The smaller wish wins: a TCP side keeps its small requests.
            (
                nbd(Some(G), false),
                nbd(Some(G), true),
                d.clone(),
                256 << 10,
            ),
            // Never more than the queue holds or a segment spans.
            (
                nbd(Some(G), false),
                null(),
                with(|o| o.queue_size = 600 << 10),
                512 << 10,
            ),
            (
                nbd(Some(G), false),
                null(),
                with(|o| o.segment_size = 64 << 10),
                64 << 10,
            ),
            // At least a zero-detection block.
            (
                nbd(Some(G), false),
                file(None),
                with(|o| o.sparse_size = 2 << 20),
                2 << 20,
            ),
            // The user's choice stands.
            (
                nbd(Some(G), false),
                file(None),
                with(|o| o.request_size = Some(64 << 10)),
                64 << 10,
            ),
        ];
        for (i, (s, d, o, want)) in cases.iter().enumerate() {
            assert_eq!(plan(s, d, o).limits.chunk, *want, "case {i}");
        }
    }

    #[test]
    fn request_size_is_a_ceiling_on_merged_writes() {
        let nbd = || nbd(Some(G), false);
        let sizes = |p: Plan| (p.limits.chunk, p.limits.merge_writes, p.limits.write_size);
        // Left to choose, neighbouring writes merge to 4 MiB, and an NBD
        // server quick to answer gets them cut to its hint, whatever the
        // reads are...
        let auto = plan(&nbd(), &nbd(), &CopyOptions::default());
        assert_eq!(sizes(auto), (1 << 20, 4 << 20, 256 << 10));
        // ...never shorter than a zero-detection block, and whole blocks
        // of the destination...
        let big_blocks = with(|o| o.sparse_size = 1 << 20);
        assert_eq!(sizes(plan(&nbd(), &nbd(), &big_blocks)).2, 1 << 20);
        let mut odd = nbd();
        odd.block_size.minimum = 3 << 10;
        let p = plan(&nbd(), &odd, &CopyOptions::default());
        assert_eq!(p.limits.write_size, 86 * (3 << 10));
        // ...while a file, without a hint, takes them as they merge...
        let to_file = plan(&nbd(), &file(None), &CopyOptions::default());
        assert_eq!(sizes(to_file), (1 << 20, 4 << 20, 4 << 20));
        // ...and nothing goes past the size the user asked for.
        for size in [64 << 10, 1 << 20, 32 << 20] {
            let p = plan(&nbd(), &nbd(), &with(|o| o.request_size = Some(size)));
            assert_eq!(sizes(p), (size, size, size));
        }
    }

    #[test]
    fn a_queue_smaller_than_a_request_is_raised_to_it() {
        let o = with(|o| {
            o.queue_size = 4096;
            o.request_size = Some(1 << 20);
        });
        assert!(o.validate().is_ok());
        let p = plan(&nbd(Some(G), false), &null(), &o);
        assert_eq!(p.limits.batch_bytes, 1 << 20);
        let big = with(|o| o.request_size = Some(32 << 20));
        assert!(big.validate().is_ok());
        assert_eq!(
            plan(&nbd(Some(G), false), &null(), &big).limits.chunk,
            32 << 20
        );
    }

    #[test]
    fn requests_are_whole_blocks_of_either_side() {
        let mut dst = file(None);
        dst.block_size.minimum = 3 << 10;
        let p = plan(&file(Some(G)), &dst, &with(|o| o.request_size = Some(4096)));
        assert_eq!((p.limits.chunk, p.align), (6 << 10, 3 << 10));
        assert_eq!(p.limits.tail_align, 3 << 10);
        // Zero detection works in whole destination blocks.
        assert_eq!(p.limits.sparse, 6 << 10);
    }

    #[test]
    fn workers_and_threads() {
        let d = CopyOptions::default();
        let cases: &[(Side, Side, CopyOptions, usize)] = &[
            // A server source gets one worker more than the cores.
            (nbd(Some(G), false), null(), d.clone(), CORES + 1),
            (file(Some(G)), file(None), d.clone(), CORES),
            // -C and an explicit -T bound it; --synchronous is one worker.
            (nbd(Some(G), false), null(), with(|o| o.connections = 2), 2),
            (file(Some(G)), null(), with(|o| o.threads = 3), 3),
            (
                nbd(Some(G), false),
                null(),
                with(|o| o.synchronous = true),
                1,
            ),
            // A sequential destination takes bytes in order: one worker.
            (nbd(Some(G), false), pipe(), d.clone(), 1),
            // A source slow to answer gets -C workers unless -T says...
            (slow(SLOW_SOURCE), null(), d.clone(), DEFAULT_CONNECTIONS),
            (
                slow(SLOW_SOURCE * 10),
                null(),
                with(|o| o.connections = 8),
                8,
            ),
            (slow(SLOW_SOURCE), null(), with(|o| o.threads = 2), 2),
            (slow(SLOW_SOURCE), pipe(), d.clone(), 1),
            (slow(SLOW_SOURCE), null(), with(|o| o.synchronous = true), 1),
            // ...and one quicker than that is CPU work.
            (slow(SLOW_SOURCE / 2), null(), d.clone(), CORES + 1),
        ];
        for (i, (s, dst, o, want)) in cases.iter().enumerate() {
            match plan(s, dst, o).shape {
                Shape::Segments { workers, .. } => assert_eq!(workers, *want, "case {i}"),
                Shape::Stream => panic!("case {i}: streamed"),
            }
        }
    }

    #[test]
    fn batches_are_one_request_unless_a_side_waits_on_a_peer() {
        let d = CopyOptions::default();
        let half_queue = DEFAULT_QUEUE_SIZE / 2;
        // (source, destination, options) -> (batch, most reads in flight)
        let cases: &[(Side, Side, CopyOptions, (usize, usize))] = &[
            (
                file(Some(G)),
                file(None),
                d.clone(),
                (DEFAULT_REQUEST_SIZE, DEFAULT_REQUEST_SIZE),
            ),
            (
                nbd(Some(G), false),
                null(),
                d.clone(),
                (BATCH_TARGET, half_queue),
            ),
            (
                nbd(Some(G), true),
                null(),
                d.clone(),
                (512 << 10, half_queue),
            ),
            // Half the queue each for the reading and the writing half...
            (
                nbd(Some(G), false),
                null(),
                with(|o| {
                    o.queue_size = 1 << 20;
                    o.request_size = Some(64 << 10)
                }),
                (512 << 10, 512 << 10),
            ),
            // ...all of it when synchronous; never less than one request.
            (
                nbd(Some(G), false),
                null(),
                with(|o| {
                    o.queue_size = 1 << 20;
                    o.request_size = Some(64 << 10);
                    o.synchronous = true
                }),
                (1 << 20, 1 << 20),
            ),
            (
                pipe(),
                nbd(Some(G), false),
                d.clone(),
                (1 << 20, half_queue),
            ),
        ];
        for (i, (s, dst, o, want)) in cases.iter().enumerate() {
            let limits = plan(s, dst, o).limits;
            assert_eq!(
                (limits.batch_bytes, limits.most_in_flight),
                *want,
                "case {i}"
            );
        }
    }

    #[test]
    fn zero_handling() {
        // (destination, options) -> (sparse, skip_zeroes, allocate)
        let cases: &[(Side, CopyOptions, (usize, bool, bool))] = &[
            (
                nbd(Some(G), false),
                CopyOptions::default(),
                (4096, false, false),
            ),
            (null(), CopyOptions::default(), (0, true, false)),
            (
                nbd(Some(G), false),
                with(|o| o.sparse_size = 0),
                (0, false, false),
            ),
            (
                nbd(Some(G), false),
                with(|o| o.destination_is_zero = true),
                (4096, true, false),
            ),
            // --allocated writes zeroes even where the destination is zero.
            (
                Side {
                    capabilities: Capabilities {
                        starts_zeroed: true,
                        ..Capabilities::default()
                    },
                    ..file(None)
                },
                with(|o| o.allocated = true),
                (0, false, true),
            ),
        ];
        for (i, (dst, o, want)) in cases.iter().enumerate() {
            let l = plan(&file(Some(G)), dst, o).limits;
            assert_eq!((l.sparse, l.skip_zeroes, l.allocate), *want, "case {i}");
        }
    }

    #[test]
    fn pipes_and_unknown_sizes_are_streamed() {
        for source in [pipe(), file(None)] {
            let p = plan(&source, &nbd(Some(G), false), &CopyOptions::default());
            assert_eq!(p.shape, Shape::Stream);
            assert!(!p.overlap && !p.use_extents && !p.flush_segments);
            assert_eq!(p.limits.tail_end, u64::MAX);
        }
        let p = plan(&file(Some(G)), &file(None), &CopyOptions::default());
        assert_eq!(
            p.shape,
            Shape::Segments {
                start: 0,
                length: G,
                segment_size: 128 << 20,
                workers: CORES
            }
        );
        assert!(p.overlap && p.use_extents);
        assert_eq!(p.limits.tail_end, G);
    }

    #[test]
    fn ranges() {
        let src = file(Some(G));
        let dst = nbd(Some(G), false);
        let r = |so: u64, dof: u64, len: Option<u64>| {
            with(|o| {
                o.source_offset = so;
                o.destination_offset = dof;
                o.length = len;
            })
        };
        // (options) -> Ok((start, length, shift to)) or the error kind
        type Want = std::result::Result<(u64, u64, u64), ErrorKind>;
        let cases: &[(CopyOptions, Want)] = &[
            (r(0, 0, None), Ok((0, G, 0))),
            (r(1 << 20, 0, None), Ok((1 << 20, G - (1 << 20), 0))),
            (r(4096, 8192, Some(1 << 20)), Ok((4096, 1 << 20, 8192))),
            (r(G, 0, None), Ok((G, 0, 0))),
            (r(G + 1, 0, None), Err(ErrorKind::Usage)),
            (r(G - 4096, 0, Some(8192)), Err(ErrorKind::Usage)),
            (r(0, 1, Some(u64::MAX)), Err(ErrorKind::Usage)),
            (r(0, G - 4096, Some(8192)), Err(ErrorKind::TooSmall)),
        ];
        for (i, (o, want)) in cases.iter().enumerate() {
            let got = Plan::new(&src, &dst, o, CORES).map(|p| match p.shape {
                Shape::Segments { start, length, .. } => {
                    (start, length, p.limits.shift.destination_start)
                }
                Shape::Stream => panic!("case {i}: streamed"),
            });
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, *w, "case {i}"),
                (Err(e), Err(k)) => assert_eq!(e.kind(), *k, "case {i}: {e}"),
                (g, w) => panic!("case {i}: got {g:?}, want {w:?}"),
            }
        }
        // Offsets on an NBD server with 4 KiB blocks must be whole blocks.
        let mut blocky = nbd(Some(G), false);
        blocky.block_size.minimum = 4096;
        let e = Plan::new(&src, &blocky, &r(0, 1000, Some(4096)), CORES).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        assert!(e.to_string().contains("--destination-offset 1000"), "{e}");
        assert!(Plan::new(&src, &blocky, &r(0, 4096, Some(4096)), CORES).is_ok());
        // A pipe source cannot take a range, nor a journal.
        let e = Plan::new(&pipe(), &dst, &r(4096, 0, None), CORES).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        let j = with(|o| o.journal = Some("j".into()));
        assert!(Plan::new(&pipe(), &dst, &j, CORES).is_err());
        assert!(Plan::new(&src, &pipe(), &j, CORES).is_err());
        let mut p = Plan::new(&src, &null(), &j, CORES).unwrap();
        assert!(p.limits.skip_zeroes);
        p.resume();
        assert!(!p.limits.skip_zeroes);
    }

    #[test]
    fn flushing() {
        let journal = |o: &mut CopyOptions| o.journal = Some("j".into());
        // (destination, options) -> (flush_segments, final_flush)
        let cases: &[(Side, CopyOptions, (bool, bool))] = &[
            // A journal records flushed segments, even on a file.
            (file(None), with(journal), (true, true)),
            (
                file(None),
                with(|o| {
                    journal(o);
                    o.retries = 0
                }),
                (true, true),
            ),
            (nbd(Some(G), false), CopyOptions::default(), (true, true)),
            (nbd(Some(G), false), with(|o| o.retries = 0), (false, true)),
            (
                nbd(Some(G), false),
                with(|o| o.flush = false),
                (false, false),
            ),
            // A file cannot reconnect: a segment is never redone there.
            (file(None), CopyOptions::default(), (false, true)),
            (null(), CopyOptions::default(), (false, false)),
        ];
        for (i, (dst, o, want)) in cases.iter().enumerate() {
            let p = plan(&file(Some(G)), dst, o);
            assert_eq!((p.flush_segments, p.final_flush), *want, "case {i}");
        }
    }

    #[test]
    fn extents_are_asked_for_only_when_wanted_and_offered() {
        let d = CopyOptions::default();
        assert!(plan(&nbd(Some(G), false), &null(), &d).use_extents);
        assert!(!plan(&nbd(Some(G), false), &null(), &with(|o| o.extents = false)).use_extents);
        let mut blind = nbd(Some(G), false);
        blind.capabilities.extents = false;
        assert!(!plan(&blind, &null(), &d).use_extents);
    }

    #[test]
    fn blkhash_blocks_are_never_split_between_segments() {
        use crate::blkhash::{BlkhashAlgorithm, BlkhashSpec};
        let spec = |block_size| {
            with(|o| {
                o.blkhash = Some(BlkhashSpec::new(BlkhashAlgorithm::Md5, block_size));
                o.request_size = Some(256 << 10);
            })
        };
        // block size -> segment size
        let cases: &[(Option<u64>, u64)] = &[
            (None, 128 << 20),
            (Some(64 << 10), 128 << 20),
            (Some(128 << 20), 128 << 20),
            // Blocks larger than a segment: one block per segment.
            (Some(512 << 20), 512 << 20),
            (Some(1 << 31), 1 << 31),
            // Tiny blocks: at most 2^18 per segment, never below a request.
            (Some(512), 128 << 20),
            (Some(64), 16 << 20),
            (Some(1), 256 << 10),
        ];
        for (i, (block, want)) in cases.iter().enumerate() {
            let o = match block {
                Some(b) => spec(*b),
                None => with(|o| o.request_size = Some(256 << 10)),
            };
            let p = plan(&nbd(Some(8 * G), false), &null(), &o);
            let Shape::Segments { segment_size, .. } = p.shape else {
                panic!("case {i}: streamed");
            };
            assert_eq!(segment_size, *want, "case {i}");
            if let Some(b) = block {
                assert_eq!(segment_size % b, 0, "case {i}");
            }
            assert_eq!(p.blkhash, o.blkhash, "case {i}");
        }
    }

    #[test]
    fn refusals() {
        let d = CopyOptions::default();
        let mut ro = nbd(Some(G), false);
        ro.capabilities.read_only = true;
        let e = Plan::new(&file(Some(G)), &ro, &d, CORES).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert_eq!(e.to_string(), "nbd: the destination is read-only");
        let e = Plan::new(&file(Some(G)), &nbd(Some(G - 1), false), &d, CORES).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooSmall);
        let bad = with(|o| o.requests = 0);
        let e = Plan::new(&file(Some(G)), &null(), &bad, CORES).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
    }
}
