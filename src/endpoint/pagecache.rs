//! Page-cache hygiene for files and block devices: copying a large image
//! must not leave the page cache full of it, nor push out what other
//! programs had cached.
//!
//! Each handle (each worker) keeps its own state; the handles on one source
//! share only a small record of what they dropped, locked once per 8 MiB.
//!
//! - **Source** ([`ReadBehind`]). Before a handle reads a range it knows
//!   which pages of it were resident beforehand: it snapshots residency
//!   with `mincore` on a throw-away mapping, [`SNAPSHOT_SPAN`] at a time,
//!   at least four readaheads ahead of its reads (see [`lookahead`]), or
//!   two past the next hole, so that the kernel's readahead has not
//!   touched those pages yet. Behind its reads it drops the pages that
//!   were *not* resident, with `POSIX_FADV_DONTNEED`: one call per
//!   [`DROP_WINDOW`] (or per run of pages between ones it keeps), cut on
//!   [`LARGEST_FOLIO`] boundaries. A short hole skipped over is part of
//!   the run (readahead filled it). When the reads jump elsewhere (the
//!   next segment, the end), what readahead brought in past the last read
//!   is dropped too, a little later ([`ReadBehind::end_run`]): pages still
//!   being read in cannot be. A handle's snapshot may catch another
//!   handle's reads next door before that handle dropped them, and take
//!   them for pages cached before the copy; the shared [`Dropped`] record
//!   says otherwise.
//! - **Destination** ([`WriteBehind`]). Written ranges are gathered into
//!   windows of [`WRITE_WINDOW`]; a full window is handed to writeback
//!   (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), and
//!   once [`WRITE_DEPTH`] newer windows have followed it, it is waited for
//!   and dropped. A flush makes every window clean: they are all dropped
//!   then. The destination is only written, so nothing of it is worth
//!   keeping: what was cached before was overwritten.
//!
//! On tmpfs and ramfs the page cache *is* the file: `POSIX_FADV_DONTNEED`
//! leaves dirty shmem pages alone (checked: a 32 MiB file on /dev/shm kept
//! all 8192 pages and its bytes), so there is nothing to gain, and those
//! file systems get no hygiene at all rather than useless system calls.
//! Block devices get the same treatment as regular files: their page cache
//! is the same kind of cache, `sync_file_range`, `mincore` and
//! `posix_fadvise` all work on them, only pages the copy itself brought in
//! or wrote are dropped (so a file system's cached metadata on the device,
//! which nbdcp never reads or writes, is left alone), and the write windows
//! made a 2 GiB copy to a loop device faster, not slower (2.8 and 1.9 s
//! against 11.8 and 8.3 s before).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, OnceLock};

/// Residency is snapshotted this much at a time: 8192 pages, one `mmap`,
/// `mincore` and `munmap` per 32 MiB read (64 for a 2 GiB image).
const SNAPSHOT_SPAN: u64 = 32 << 20;

/// The snapshot runs at least this far ahead of the reads, so that it
/// describes pages before readahead reaches them: four times the largest
/// readahead expected ([`readahead_bytes`], 8 MiB on the development
/// machine's virtio disk, where a run of 1 MiB reads left 8 MiB resident
/// past its end).
fn lookahead(readahead: u64) -> u64 {
    (4 * readahead).max(SNAPSHOT_SPAN)
}

/// Read pages are dropped once this many bytes of them have gathered: 256
/// calls for a 2 GiB image, while at most 8 MiB per worker read by the
/// copy sits in the cache.
const DROP_WINDOW: u64 = 8 << 20;

/// Written ranges are handed to writeback in windows of this size.
const WRITE_WINDOW: u64 = 8 << 20;

/// Windows in writeback before the oldest is waited for and dropped: 32
/// MiB per worker. On the development machine 1, 4 and 16 windows of 8
/// MiB, and 4 of 2 or 32 MiB, timed the same within noise (2 GiB file to
/// file, 1.9 to 2.1 s); four leave a slower disk room to stream.
const WRITE_DEPTH: usize = 4;

/// The largest folio the page cache makes of a file: 2 MiB, the PMD size
/// with 4 KiB pages (x86-64, arm64). `POSIX_FADV_DONTNEED` drops only
/// folios wholly inside its range, so dropped ranges end on multiples of
/// it wherever more is to be read: cut anywhere (at the edges of holes),
/// a 2 GiB image with 154 data runs left 281 MiB cached in 2 MiB pieces.
const LARGEST_FOLIO: u64 = 2 << 20;

/// Readahead assumed when the file system's cannot be read from sysfs:
/// the Linux default, 128 KiB, is too small a guess for disks tuned
/// higher, so use the 8 MiB seen on the development machine's disk.
const DEFAULT_READAHEAD: u64 = 8 << 20;

/// `RAMFS_MAGIC` from `<linux/magic.h>` (not in the `libc` crate).
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The page size, the unit of the page cache.
fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory effects.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        match u64::try_from(p) {
            Ok(p) if p.is_power_of_two() => p,
            _ => 4096,
        }
    })
}

fn round_down(x: u64, page: u64) -> u64 {
    x & !(page - 1)
}

fn round_up(x: u64, page: u64) -> u64 {
    x.saturating_add(page - 1) & !(page - 1)
}

/// Whether `file` lives on a file system whose page cache is its storage
/// (tmpfs, ramfs), where dropping pages would do nothing. Unknown counts
/// as disk-backed: the system calls are then harmless at worst.
pub(crate) fn is_memory_backed(file: &File) -> bool {
    // SAFETY: fstatfs writes one statfs into the zeroed value we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if r != 0 {
        return false;
    }
    // The field's type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    #[allow(clippy::unnecessary_cast)]
    let tmpfs = libc::TMPFS_MAGIC as i64;
    magic == tmpfs || magic == RAMFS_MAGIC
}

/// Readahead of the device under `file`, from sysfs: for a regular file
/// its file system's backing device (`st_dev`), for a block device the
/// device itself or, for a partition, its disk.
pub(crate) fn readahead_bytes(file: &File, block_device: bool) -> u64 {
    let Ok(meta) = file.metadata() else {
        return DEFAULT_READAHEAD;
    };
    let dev = if block_device {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let candidates = [
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        format!("/sys/dev/block/{major}:{minor}/queue/read_ahead_kb"),
        format!("/sys/dev/block/{major}:{minor}/../queue/read_ahead_kb"),
    ];
    candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
        // Bounded: a bogus value must neither make the snapshots huge nor
        // leave readahead uncovered; 256 MiB is far beyond any default.
        .map_or(DEFAULT_READAHEAD, |kb| {
            (kb << 10).clamp(128 << 10, 256 << 20)
        })
}

/// Drop `[offset, offset + length)` from the page cache, as far as it is
/// clean. Advice only: a failure loses nothing, so it is ignored.
fn drop_pages(fd: i32, offset: u64, length: u64) {
    if length == 0 {
        return;
    }
    // SAFETY: plain system call on a descriptor the caller owns.
    unsafe {
        libc::posix_fadvise(
            fd,
            offset as libc::off_t,
            length as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Append to `out` one byte per page of `[offset, offset + length)`, bit 0
/// set where the page is resident. `offset` is page-aligned.
fn residency(fd: i32, offset: u64, length: u64, out: &mut Vec<u8>) -> io::Result<()> {
    let page = page_size();
    let pages = usize::try_from(round_up(length, page) / page)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = pages * page as usize;
    // SAFETY: a fresh read-only mapping that is never touched, only
    // described by mincore and unmapped again.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = out.len();
    out.resize(start + pages, 0);
    // SAFETY: the mapping spans `len` bytes and `out[start..]` has one
    // byte for each of its pages.
    let r = unsafe { libc::mincore(ptr, len, out[start..].as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(ptr, len) };
    if r != 0 {
        out.truncate(start);
        return Err(err);
    }
    Ok(())
}

/// Trails (what readahead brought in past a run of reads) waiting to be
/// dropped, at most; more drops the oldest at once.
const MAX_DEFERRED: usize = 64;

/// Most ranges a [`Dropped`] record keeps: 64 Ki ranges (about 2 MiB) is
/// one per data run for a source of 8 GiB in 128 KiB runs, or one per
/// segment for 8 TiB; past that, new ranges are judged by the snapshots
/// alone.
const MAX_DROPPED_RANGES: usize = 65536;

/// What the copy's handles on one source dropped, as merged ranges,
/// shared between them. A handle's snapshot of the pages past its own
/// reads may see another handle's reads there before that handle dropped
/// them, and take them for pages cached before the copy; when this
/// handle's readahead brings them back, this record says they are the
/// copy's. Locked once per dropped window (8 MiB) and once per trail.
#[derive(Debug, Default)]
pub(crate) struct Dropped(Mutex<BTreeMap<u64, u64>>);

impl Dropped {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record that `[start, end)` was dropped.
    fn add(&self, mut start: u64, mut end: u64) {
        let mut map = self.lock();
        let before = map.len();
        // Merge with a range that ends at or after `start`, before it...
        if let Some((&s, &e)) = map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                map.remove(&s);
            }
        }
        // ...and with those starting inside the new one.
        while let Some((&s, &e)) = map.range(start..=end).next() {
            end = end.max(e);
            map.remove(&s);
        }
        // Merged ranges are always put back: that never grows the map.
        if map.len() < before || map.len() < MAX_DROPPED_RANGES {
            map.insert(start, end);
        }
    }

    /// The recorded ranges within `[start, end)`, clipped to it.
    fn within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if start >= end {
            return Vec::new();
        }
        let map = self.lock();
        let first = map.range(..=start).next_back().map_or(start, |(&s, _)| s);
        map.range(first..end)
            .filter(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s.max(start), e.min(end)))
            .collect()
    }
}

/// A source handle's page-cache state (see the module documentation).
#[derive(Debug)]
pub(crate) struct ReadBehind {
    /// Where the file ends: the snapshot never goes past it.
    size: u64,
    readahead: u64,
    /// Offset of the first page described by `resident`.
    snap_start: u64,
    /// One byte per page from `snap_start`, as `mincore` gives them.
    resident: Vec<u8>,
    /// Bytes read and not yet dropped; contiguous.
    pending: Option<(u64, u64)>,
    /// End of the last read of the current run of contiguous reads.
    last_end: Option<u64>,
    /// Where the hole after the current reads starts (`SEEK_HOLE`), as
    /// last looked up.
    hole: Option<u64>,
    /// Bytes read by this handle so far.
    read: u64,
    /// Ranges to drop once this handle has read [`DROP_WINDOW`] more
    /// bytes than `read` was when they were added (the first field): the
    /// readahead that filled them may still be in flight, and pages under
    /// I/O cannot be dropped. Dropped at once, trails left 34 and 44 MiB
    /// of a 2 GiB copy cached, in 2 to 8 MiB pieces at segment edges.
    deferred: VecDeque<(u64, u64, u64)>,
    /// Residency could not be learnt: nothing is dropped, since pages
    /// someone else had cached might be among them.
    blind: bool,
    /// Shared by all handles on the source.
    dropped: Arc<Dropped>,
}

impl ReadBehind {
    /// State for a new handle on a source of `size` bytes whose device
    /// reads `readahead` bytes ahead.
    pub(crate) fn new(size: u64, readahead: u64) -> ReadBehind {
        ReadBehind {
            size,
            readahead,
            snap_start: 0,
            resident: Vec::new(),
            pending: None,
            last_end: None,
            hole: None,
            read: 0,
            deferred: VecDeque::new(),
            blind: false,
            dropped: Arc::default(),
        }
    }

    /// The same for another handle on the same source, with none of this
    /// one's history.
    pub(crate) fn sibling(&self) -> ReadBehind {
        ReadBehind {
            blind: self.blind,
            dropped: Arc::clone(&self.dropped),
            ..ReadBehind::new(self.size, self.readahead)
        }
    }

    fn snap_end(&self) -> u64 {
        self.snap_start + self.resident.len() as u64 * page_size()
    }

    /// Call before reading `[offset, offset + length)`.
    pub(crate) fn before_read(&mut self, fd: i32, offset: u64, length: u64) {
        if self.blind || length == 0 {
            return;
        }
        if let Some(last) = self.last_end {
            // A short skip over a hole stays in the run: readahead filled
            // the hole, and dropping it with the reads around it keeps the
            // dropped ranges whole where large folios straddle its edges.
            // A skip over data is a new segment, where another handle
            // reads: with 4 MiB segments, runs spanning them dropped
            // pages that handle was still reading ahead.
            let short_skip =
                offset > last && offset - last <= 2 * self.readahead && no_data(fd, last, offset);
            if offset != last && !short_skip {
                self.end_run(fd);
            }
        }
        let page = page_size();
        if self.resident.is_empty() || offset < self.snap_start || offset >= self.snap_end() {
            // Outside the snapshot: the first read, a jump, or reading
            // past where the file ended when opened (it grew, and reads
            // go on without a jump). Start a new snapshot, after dropping
            // what the old one allows.
            if let Some((s, e)) = self.pending.take() {
                self.drop_unless_resident(fd, s, e);
            }
            self.snap_start = round_down(offset, page);
            self.resident.clear();
            self.hole = None;
        } else {
            // Pages behind both the reads and the undropped ones are no
            // longer needed.
            let keep_from = round_down(self.pending.map_or(offset, |(s, _)| s.min(offset)), page);
            let stale = (keep_from.saturating_sub(self.snap_start) / page) as usize;
            if stale >= (SNAPSHOT_SPAN / page) as usize {
                self.resident.drain(..stale);
                self.snap_start = keep_from;
            }
        }
        let file_end = round_up(self.size, page);
        let end = offset.saturating_add(length);
        let need = end.saturating_add(lookahead(self.readahead)).min(file_end);
        if self.snap_end() < need {
            // Readahead goes no further than twice its size past the
            // reads, holes included, so past the next hole the snapshot
            // needs only that: a run of 1 MiB after a long hole then costs
            // 17 MiB of mincore, not 65 (at 40 ns a page, 0.4 ms more CPU
            // per run; a 64 GiB file with 1024 such runs took 0.4 s more).
            if self.hole.is_none_or(|h| h < end) {
                self.hole = Some(next_hole(fd, end));
            }
            let limit = self.hole.map_or(u64::MAX, |h| {
                round_up(h.saturating_add(2 * self.readahead), page)
            });
            let to = need.saturating_add(SNAPSHOT_SPAN).min(limit).min(file_end);
            let from = self.snap_end();
            if to <= from {
                return;
            }
            if let Err(e) = residency(fd, from, to - from, &mut self.resident) {
                log::debug!("page cache: cannot tell which pages are cached ({e}); keeping them");
                self.blind = true;
                self.pending = None;
            }
        }
    }

    /// Call after `[offset, offset + length)` was read.
    pub(crate) fn after_read(&mut self, fd: i32, offset: u64, length: u64) {
        if self.blind || length == 0 {
            return;
        }
        let end = offset + length;
        self.read += length;
        let (start, _) = *self.pending.get_or_insert((offset, end));
        self.pending = Some((start, end));
        self.last_end = Some(end);
        if end - start >= DROP_WINDOW {
            // Cut where no large folio can straddle: the kernel keeps a
            // folio that a range covers only in part, and the one holding
            // the last bytes read also holds bytes about to be read.
            let cut = round_down(end, LARGEST_FOLIO);
            if cut > start {
                self.drop_unless_resident(fd, start, cut);
                self.pending = Some((cut, end));
            }
        }
        while let Some(&(at, s, len)) = self.deferred.front() {
            if self.read - at < DROP_WINDOW {
                break;
            }
            drop_pages(fd, s, len);
            self.deferred.pop_front();
        }
    }

    /// The run of contiguous reads ended. Drop what it read, up to the
    /// last folio boundary; and later, the rest with what readahead
    /// brought in past the run (twice the readahead).
    pub(crate) fn end_run(&mut self, fd: i32) {
        let pending = self.pending.take();
        let Some(last) = self.last_end.take() else {
            return;
        };
        let cut = round_down(last, LARGEST_FOLIO);
        let start = pending.map_or(cut, |(s, _)| s);
        if cut > start {
            self.drop_unless_resident(fd, start, cut);
        }
        let from = start.max(cut);
        let until = last.saturating_add(2 * self.readahead).min(self.size);
        if from >= until {
            return;
        }
        let read = self.read;
        for (s, e) in self.to_drop(from, until) {
            self.dropped.add(s, e);
            if self.deferred.len() >= MAX_DEFERRED {
                if let Some((_, s, len)) = self.deferred.pop_front() {
                    drop_pages(fd, s, len);
                }
            }
            self.deferred.push_back((read, s, e - s));
        }
    }

    /// The handle is closing: drop everything still to be dropped.
    pub(crate) fn finish(&mut self, fd: i32) {
        self.end_run(fd);
        for (_, s, len) in self.deferred.drain(..) {
            drop_pages(fd, s, len);
        }
    }

    /// Drop the pages touching `[start, end)` that the copy brought in.
    fn drop_unless_resident(&self, fd: i32, start: u64, end: u64) {
        for (s, e) in self.to_drop(start, end) {
            drop_pages(fd, s, e - s);
            self.dropped.add(s, e);
        }
    }

    /// The ranges of pages touching `[start, end)` that the copy brought
    /// in: those the snapshot says were not resident, and those another
    /// handle found so (this handle's snapshot may have caught them
    /// between that handle's reads and its dropping them). Pages that
    /// were cached before the copy are resident in every snapshot, so
    /// they are in neither. Pages the snapshot does not cover are kept.
    fn to_drop(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let page = page_size();
        let (start, end) = (
            round_down(start, page),
            round_up(end, page).min(self.snap_end()),
        );
        let mut ranges = self.dropped.within(start, end);
        self.unresident_runs(start, end, |s, len| ranges.push((s, s + len)));
        merge(ranges)
    }

    /// Call `f(offset, length)` for each run of pages touching
    /// `[start, end)` that the snapshot says were not resident.
    fn unresident_runs(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        let page = page_size();
        let first = round_down(start, page).max(self.snap_start);
        let last = round_up(end, page).min(self.snap_end());
        if first >= last {
            return;
        }
        let index = |off: u64| ((off - self.snap_start) / page) as usize;
        let pages = &self.resident[index(first)..index(last)];
        let mut i = 0;
        while i < pages.len() {
            if pages[i] & 1 != 0 {
                i += 1;
                continue;
            }
            let run = pages[i..].iter().take_while(|&&p| p & 1 == 0).count();
            f(first + i as u64 * page, run as u64 * page);
            i += run;
        }
    }
}

/// Whether `[from, to)` of the file holds no data (`SEEK_DATA`); a file
/// or device that cannot tell counts as all data.
fn no_data(fd: i32, from: u64, to: u64) -> bool {
    // SAFETY: plain system call. The file offset it moves is never used:
    // all I/O is positional.
    let r = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if r >= 0 {
        return r as u64 >= to;
    }
    // No data after `from` at all.
    io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}

/// Where the first hole at or after `from` starts (`SEEK_HOLE`; the end
/// of the file counts as one); `u64::MAX` if the file cannot tell.
fn next_hole(fd: i32, from: u64) -> u64 {
    // SAFETY: plain system call. The file offset it moves is never used.
    let r = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_HOLE) };
    u64::try_from(r).unwrap_or(u64::MAX)
}

/// Sort ranges and merge those that overlap or touch.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `sync_file_range` with `flags`, retried on `EINTR`.
fn sync_range(fd: i32, offset: u64, length: u64, flags: libc::c_uint) -> io::Result<()> {
    loop {
        // SAFETY: plain system call on a descriptor the caller owns.
        let r = unsafe {
            libc::sync_file_range(fd, offset as libc::off64_t, length as libc::off64_t, flags)
        };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `sync_file_range` refused as such (a file system or sandbox without
/// it), rather than a write failing.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::ESPIPE)
    )
}

/// A range written by a [`WriteBehind`] that went wrong in writeback.
#[derive(Debug)]
pub(crate) struct WritebackError {
    pub offset: u64,
    pub length: u64,
    pub error: io::Error,
}

/// A destination handle's page-cache state (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct WriteBehind {
    /// Written and not yet handed to writeback.
    pending: Option<(u64, u64)>,
    /// Handed to writeback, oldest first.
    in_flight: VecDeque<(u64, u64)>,
    /// `sync_file_range` is not available here.
    off: bool,
}

impl WriteBehind {
    /// Call after `[offset, offset + length)` was written. Fails when the
    /// writeback of an earlier window failed: `sync_file_range` reports
    /// the error once, for the file as a whole, so it must not be lost.
    pub(crate) fn wrote(
        &mut self,
        fd: i32,
        offset: u64,
        length: u64,
    ) -> Result<(), WritebackError> {
        if self.off || length == 0 {
            return Ok(());
        }
        let end = offset + length;
        match &mut self.pending {
            // Forward, with at most a window's gap (a hole left between
            // writes): the same window.
            Some((s, e)) if offset >= *s && offset <= e.saturating_add(WRITE_WINDOW) => {
                *e = (*e).max(end);
            }
            _ => {
                if let Some(w) = self.pending.replace((offset, end)) {
                    self.submit(fd, w)?;
                }
            }
        }
        if let Some((s, e)) = self.pending {
            if e - s >= WRITE_WINDOW {
                self.pending = None;
                self.submit(fd, (s, e))?;
            }
        }
        Ok(())
    }

    /// Start writeback of window `w`; wait for and drop the oldest once
    /// more than [`WRITE_DEPTH`] are in writeback.
    fn submit(&mut self, fd: i32, (start, end): (u64, u64)) -> Result<(), WritebackError> {
        let fail = |offset: u64, length: u64, error| WritebackError {
            offset,
            length,
            error,
        };
        match sync_range(fd, start, end - start, libc::SYNC_FILE_RANGE_WRITE) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                log::debug!("page cache: no sync_file_range ({e}); written pages stay cached");
                self.off = true;
                self.in_flight.clear();
                return Ok(());
            }
            Err(e) => return Err(fail(start, end - start, e)),
        }
        self.in_flight.push_back((start, end));
        while self.in_flight.len() > WRITE_DEPTH {
            let Some((s, e)) = self.in_flight.pop_front() else {
                break;
            };
            let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            sync_range(fd, s, e - s, all).map_err(|err| fail(s, e - s, err))?;
            drop_pages(fd, s, e - s);
        }
        Ok(())
    }

    /// The file was flushed: every window is clean, drop them all.
    pub(crate) fn flushed(&mut self, fd: i32) {
        for (s, e) in self.in_flight.drain(..).chain(self.pending.take()) {
            drop_pages(fd, s, e - s);
        }
    }

    /// The handle is going away unflushed (or flushed): drop what is
    /// clean. `POSIX_FADV_DONTNEED` starts writeback of dirty pages
    /// without waiting and leaves them cached.
    pub(crate) fn finish(&mut self, fd: i32) {
        self.flushed(fd);
    }
}

/// A directory on a disk file system (the crate's target directory),
/// where pages really come and go, for tests.
#[cfg(test)]
pub(crate) fn disk_dir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let probe = File::open(dir.path()).unwrap();
    assert!(
        !is_memory_backed(&probe),
        "{} is on tmpfs: these tests need a disk file system",
        base.display()
    );
    dir
}

/// The share of `file`'s pages that are resident, for tests.
#[cfg(test)]
pub(crate) fn resident_share(file: &File) -> f64 {
    let len = file.metadata().unwrap().len();
    let mut v = Vec::new();
    residency(file.as_raw_fd(), 0, len, &mut v).unwrap();
    v.iter().filter(|b| *b & 1 != 0).count() as f64 / v.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn resident_pages(file: &File, offset: u64, length: u64) -> Vec<bool> {
        let mut v = Vec::new();
        residency(file.as_raw_fd(), offset, length, &mut v).unwrap();
        v.iter().map(|b| b & 1 != 0).collect()
    }

    /// A file of `len` bytes, written, synced and evicted.
    fn cold_file(dir: &std::path::Path, len: usize) -> File {
        let path = dir.join("f");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&vec![0x5a; len], 0).unwrap();
        f.sync_all().unwrap();
        drop_pages(f.as_raw_fd(), 0, len as u64);
        f
    }

    #[test]
    fn dropped_ranges_merge_and_clip() {
        let d = Dropped::default();
        d.add(10, 20);
        d.add(30, 40);
        d.add(20, 25);
        d.add(35, 50);
        assert_eq!(d.within(0, 100), vec![(10, 25), (30, 50)]);
        assert_eq!(d.within(12, 33), vec![(12, 25), (30, 33)]);
        assert_eq!(d.within(25, 30), vec![]);
        d.add(0, 60);
        assert_eq!(d.within(0, 100), vec![(0, 60)]);
        assert_eq!(merge(vec![(5, 6), (0, 2), (2, 3)]), vec![(0, 3), (5, 6)]);
    }

    #[test]
    fn rounding() {
        assert_eq!(round_down(4097, 4096), 4096);
        assert_eq!(round_up(4097, 4096), 8192);
        assert_eq!(round_up(8192, 4096), 8192);
        assert_eq!(round_up(u64::MAX, 4096), !4095);
    }

    #[test]
    fn reads_drop_their_pages_and_spare_those_cached_before() {
        let dir = disk_dir();
        let len = 16 << 20;
        let f = cold_file(dir.path(), len);
        let fd = f.as_raw_fd();
        let page = page_size();
        // Cache the second MiB before the "copy".
        f.read_exact_at(&mut vec![0; 1 << 20], 1 << 20).unwrap();
        assert!(resident_pages(&f, 1 << 20, 1 << 20).iter().all(|&r| r));
        let mut rb = ReadBehind::new(len as u64, 128 << 10);
        let mut buf = vec![0; 1 << 20];
        for off in (0..len as u64).step_by(1 << 20) {
            rb.before_read(fd, off, 1 << 20);
            f.read_exact_at(&mut buf, off).unwrap();
            rb.after_read(fd, off, 1 << 20);
        }
        rb.finish(fd);
        let after = resident_pages(&f, 0, len as u64);
        let per_mib = ((1 << 20) / page) as usize;
        assert!(
            after[per_mib..2 * per_mib].iter().all(|&r| r),
            "pages cached before were dropped"
        );
        let others = after
            .iter()
            .enumerate()
            .filter(|(i, r)| **r && (*i < per_mib || *i >= 2 * per_mib));
        assert_eq!(others.count(), 0, "pages the reads brought in stayed");
    }

    #[test]
    fn a_skipped_hole_is_dropped_with_what_readahead_put_there() {
        let dir = disk_dir();
        let len = 8 << 20;
        let f = cold_file(dir.path(), len);
        let fd = f.as_raw_fd();
        // A hole at [1, 3) MiB.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(unsafe { libc::fallocate(fd, punch, 1 << 20, 2 << 20) }, 0);
        assert!(no_data(fd, 1 << 20, 3 << 20));
        assert!(!no_data(fd, 0, 3 << 20));
        let mut rb = ReadBehind::new(len as u64, 2 << 20);
        let mut buf = vec![0; 1 << 20];
        // Read the first MiB, then (as readahead would) cache the hole,
        // and skip it.
        rb.before_read(fd, 0, 1 << 20);
        f.read_exact_at(&mut buf, 0).unwrap();
        rb.after_read(fd, 0, 1 << 20);
        f.read_exact_at(&mut buf, 1 << 20).unwrap();
        rb.before_read(fd, 3 << 20, 1 << 20);
        f.read_exact_at(&mut buf, 3 << 20).unwrap();
        rb.after_read(fd, 3 << 20, 1 << 20);
        rb.finish(fd);
        assert!(resident_pages(&f, 0, len as u64).iter().all(|&r| !r));
    }

    #[test]
    fn readahead_past_a_run_is_dropped_later() {
        let dir = disk_dir();
        let len = 32 << 20;
        let f = cold_file(dir.path(), len);
        let fd = f.as_raw_fd();
        let mut rb = ReadBehind::new(len as u64, readahead_bytes(&f, false));
        let mut buf = vec![0; 1 << 20];
        let mut read = |rb: &mut ReadBehind, off: u64| {
            rb.before_read(fd, off, 1 << 20);
            f.read_exact_at(&mut buf, off).unwrap();
            rb.after_read(fd, off, 1 << 20);
        };
        read(&mut rb, 0);
        // What readahead past the first MiB would have cached.
        f.read_exact_at(&mut vec![0; 3 << 20], 1 << 20).unwrap();
        // A jump over data (another segment): the trail waits until
        // another DROP_WINDOW has been read.
        read(&mut rb, 16 << 20);
        assert!(resident_pages(&f, 1 << 20, 3 << 20).iter().all(|&r| r));
        for off in (17..24).map(|m| m << 20) {
            read(&mut rb, off);
        }
        assert!(resident_pages(&f, 0, 4 << 20).iter().all(|&r| !r));
        rb.finish(fd);
        assert!(resident_pages(&f, 0, len as u64).iter().all(|&r| !r));
    }

    #[test]
    fn a_snapshot_stops_short_of_a_long_hole() {
        let dir = disk_dir();
        let f = cold_file(dir.path(), 1 << 20);
        f.set_len(256 << 20).unwrap();
        let fd = f.as_raw_fd();
        let readahead = 2 << 20;
        let mut rb = ReadBehind::new(256 << 20, readahead);
        rb.before_read(fd, 0, 1 << 20);
        // The data, and readahead's reach past it: not 65 MiB.
        assert_eq!(rb.snap_end(), (1 << 20) + 2 * readahead);
    }

    #[test]
    fn written_windows_are_dropped_behind_and_at_the_flush() {
        let dir = disk_dir();
        let f = cold_file(dir.path(), 0);
        let fd = f.as_raw_fd();
        let mut wb = WriteBehind::default();
        let chunk = vec![7u8; 1 << 20];
        let total = (WRITE_WINDOW as usize * (WRITE_DEPTH + 3)) as u64;
        for off in (0..total).step_by(1 << 20) {
            f.write_all_at(&chunk, off).unwrap();
            wb.wrote(fd, off, 1 << 20).unwrap();
        }
        // The oldest windows were waited for and dropped already.
        let early = resident_pages(&f, 0, 2 * WRITE_WINDOW);
        assert!(early.iter().all(|&r| !r), "early windows still cached");
        f.sync_data().unwrap();
        wb.flushed(fd);
        assert!(resident_pages(&f, 0, total).iter().all(|&r| !r));
        let mut back = vec![0; 1 << 20];
        f.read_exact_at(&mut back, total - (1 << 20)).unwrap();
        assert_eq!(back, chunk);
    }

    #[test]
    fn shm_is_memory_backed_and_the_repository_is_not() {
        if let Ok(f) = File::open("/dev/shm") {
            assert!(is_memory_backed(&f));
        }
        let _ = disk_dir();
    }
}
