//! Regular files and block devices.
//!
//! Reads and writes use `pread`/`pwrite` on one shared descriptor, so
//! further handles for parallel workers are just clones of it. Holes in a
//! source file are found with `SEEK_DATA`/`SEEK_HOLE`; zero runs on a
//! destination become punched holes (or allocated zeroes with
//! `--allocated`) where the file system or device can do it.
//!
//! Each handle also keeps the page cache clean behind it (see
//! `src/endpoint/pagecache.rs`): a source handle drops the pages it read
//! that were not cached before, a destination handle drops what it wrote
//! once it is on disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::pagecache::{self, ReadBehind, WriteBehind, WritebackError};
use super::{BlockSize, Capabilities, Endpoint, Extent, ExtentKind};
use crate::error::{Error, ErrorKind, Operation, Result};

/// Zero bytes written when a file or device cannot zero a range itself.
const ZERO_BUF_LEN: usize = 1024 * 1024;

/// What sort of file an endpoint is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Regular,
    Block,
}

/// What a handle does to keep the page cache clean.
#[derive(Debug)]
enum Hygiene {
    /// Nothing: the file is on tmpfs or ramfs, whose pages are its data.
    Off,
    /// A source: drop what the reads brought in.
    Source(ReadBehind),
    /// A destination: drop what was written, once written back.
    Destination(WriteBehind),
}

impl Hygiene {
    /// The same for a new handle, with none of this one's history.
    fn sibling(&self) -> Hygiene {
        match self {
            Hygiene::Off => Hygiene::Off,
            Hygiene::Source(r) => Hygiene::Source(r.sibling()),
            Hygiene::Destination(_) => Hygiene::Destination(WriteBehind::default()),
        }
    }
}

fn writeback_error(name: &str, w: WritebackError) -> Error {
    Error::io(name, Operation::Write, w.error).at(w.offset, w.length)
}

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileEndpoint {
    name: String,
    file: Arc<File>,
    kind: Kind,
    size: u64,
    writable: bool,
    /// Created or truncated by nbdcp: reads as zeroes, may be resized.
    fresh: bool,
    /// Sized by the copy as it goes (the source is a pipe): no size limit.
    growable: bool,
    sector: u32,
    hygiene: Hygiene,
}

impl FileEndpoint {
    /// Open `path` for reading.
    pub fn open_source(name: &str, path: &Path) -> Result<FileEndpoint> {
        let file = File::open(path).map_err(|e| Error::io(name, Operation::Open, e))?;
        FileEndpoint::from_file(name, file, false, false)
    }

    /// Open `path` for writing. A regular file (created if missing) is
    /// truncated and sized to `source_size`, or grows as a pipe source is
    /// copied when that is unknown; a block device keeps its size.
    pub fn open_destination(
        name: &str,
        path: &Path,
        source_size: Option<u64>,
    ) -> Result<FileEndpoint> {
        let meta = std::fs::metadata(path);
        let is_block = matches!(&meta, Ok(m) if m.file_type().is_block_device());
        if let Ok(m) = &meta {
            if m.is_dir() {
                return Err(Error::new(ErrorKind::Usage, "is a directory")
                    .with_endpoint(name)
                    .with_operation(Operation::Open));
            }
        }
        let file = if is_block {
            OpenOptions::new().read(true).write(true).open(path)
        } else {
            // Read too: `--verify` reads the copy back.
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(path)
        }
        .map_err(|e| Error::io(name, Operation::Open, e))?;
        let mut ep = FileEndpoint::from_file(name, file, true, !is_block)?;
        if ep.kind == Kind::Regular {
            ep.resize_to(source_size.unwrap_or(0))?;
            ep.growable = source_size.is_none();
        }
        Ok(ep)
    }

    /// Open `path` for writing a range that ends at `end`: a regular file
    /// (created if missing) keeps its contents and grows to `end` if it
    /// is shorter; a block device keeps its size.
    pub fn open_to_extend(name: &str, path: &Path, end: u64) -> Result<FileEndpoint> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|e| Error::io(name, Operation::Open, e))?;
        let mut ep = FileEndpoint::from_file(name, file, true, false)?;
        if ep.kind == Kind::Regular && ep.size < end {
            if i64::try_from(end).is_err() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("size {end} is too large for a file"),
                )
                .with_endpoint(name)
                .with_operation(Operation::Resize));
            }
            ep.file
                .set_len(end)
                .map_err(|e| Error::io(name, Operation::Resize, e).at_offset(end))?;
            ep.size = end;
        }
        Ok(ep)
    }

    /// Wrap an open file or block device (e.g. standard input or output
    /// redirected from a file). `fresh` says it reads as zeroes and its
    /// size is nbdcp's to set.
    pub fn from_file(name: &str, file: File, writable: bool, fresh: bool) -> Result<FileEndpoint> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io(name, Operation::Stat, e))?;
        let ft = meta.file_type();
        let (kind, size, sector) = if ft.is_file() {
            (Kind::Regular, meta.len(), 1)
        } else if ft.is_block_device() {
            (
                Kind::Block,
                block_device_size(&file).map_err(|e| Error::io(name, Operation::GetSize, e))?,
                1,
            )
        } else if ft.is_dir() {
            return Err(Error::new(ErrorKind::Usage, "is a directory")
                .with_endpoint(name)
                .with_operation(Operation::Open));
        } else {
            return Err(
                Error::new(ErrorKind::Usage, "not a regular file or block device")
                    .with_endpoint(name),
            );
        };
        let hygiene = if kind == Kind::Regular && pagecache::is_memory_backed(&file) {
            Hygiene::Off
        } else if writable {
            Hygiene::Destination(WriteBehind::default())
        } else {
            let readahead = pagecache::readahead_bytes(&file, kind == Kind::Block);
            Hygiene::Source(ReadBehind::new(size, readahead))
        };
        Ok(FileEndpoint {
            name: name.to_string(),
            file: Arc::new(file),
            kind,
            size,
            writable,
            fresh,
            growable: false,
            sector,
            hygiene,
        })
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Bytes went into the page cache at `[offset, offset + length)`.
    fn wrote(&mut self, offset: u64, length: u64) -> Result<()> {
        let fd = self.fd();
        if let Hygiene::Destination(w) = &mut self.hygiene {
            w.wrote(fd, offset, length)
                .map_err(|e| writeback_error(&self.name, e))?;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, length: u64) -> io::Result<()> {
        loop {
            // SAFETY: plain system call on a descriptor we own.
            let r = unsafe {
                libc::fallocate(
                    self.fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
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

    fn blkzeroout(&self, offset: u64, length: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, length];
        // SAFETY: BLKZEROOUT reads a two-u64 array that lives across the call.
        let r = unsafe { libc::ioctl(self.fd(), BLKZEROOUT, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_BUF_LEN.min(length as usize)];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = ((end - pos) as usize).min(zeroes.len());
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Zero a range, trying the cheapest way the file or device allows.
    /// Returns whether it wrote zero bytes through the page cache (the
    /// other ways leave no pages behind).
    fn zero_range(&self, offset: u64, length: u64, allocate: bool) -> io::Result<bool> {
        let unsupported = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP)
                    | Some(libc::ENOTTY)
                    | Some(libc::EINVAL)
                    | Some(libc::ENODEV)
            )
        };
        let attempts: &[i32] = match (self.kind, allocate) {
            (Kind::Regular, false) => &[
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ],
            (Kind::Regular, true) => &[libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE],
            (Kind::Block, false) => &[
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ],
            (Kind::Block, true) => &[libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE],
        };
        for &mode in attempts {
            match self.fallocate(mode, offset, length) {
                Ok(()) => return Ok(false),
                Err(e) if unsupported(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        if self.kind == Kind::Block {
            match self.blkzeroout(offset, length) {
                Ok(()) => return Ok(false),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.write_zeroes(offset, length).map(|()| true)
    }

    fn lseek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: plain system call on a descriptor we own. The file offset
        // it moves is never used: all I/O is positional.
        let r = unsafe { libc::lseek(self.fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    }

    /// Extents of a regular file from `SEEK_DATA` / `SEEK_HOLE`.
    fn seek_extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self.lseek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent {
                    offset: pos,
                    length: data - pos,
                    kind: ExtentKind::Zero,
                });
            }
            if data >= end {
                break;
            }
            let hole = self
                .lseek(data, libc::SEEK_HOLE)?
                .unwrap_or(end)
                .clamp(data + 1, end);
            out.push(Extent {
                offset: data,
                length: hole - data,
                kind: ExtentKind::Data,
            });
            pos = hole;
        }
        Ok(out)
    }
}

impl Drop for FileEndpoint {
    fn drop(&mut self) {
        let fd = self.fd();
        match &mut self.hygiene {
            Hygiene::Off => {}
            Hygiene::Source(r) => r.finish(fd),
            Hygiene::Destination(w) => w.finish(fd),
        }
    }
}

/// `_IO(0x12, 127)`: zero a range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x80081272;

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Endpoint for FileEndpoint {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        match self.kind {
            Kind::Regular => "file",
            _ => "block device",
        }
    }

    fn size(&self) -> Option<u64> {
        if self.growable { None } else { Some(self.size) }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: !self.writable,
            sequential: false,
            flush: true,
            extents: self.kind == Kind::Regular,
            reconnect: false,
            starts_zeroed: self.fresh,
            read_back: true,
            multi_conn: false,
        }
    }

    fn block_size(&self) -> BlockSize {
        BlockSize {
            minimum: self.sector,
            ..BlockSize::default()
        }
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let fd = self.fd();
        let length = buf.len() as u64;
        if let Hygiene::Source(r) = &mut self.hygiene {
            r.before_read(fd, offset, length);
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::new(
                    ErrorKind::Io,
                    "unexpected end of file (did the file shrink?)",
                )
                .with_endpoint(&self.name)
                .with_operation(Operation::Read)
            } else {
                Error::io(&self.name, Operation::Read, e)
            };
            e.at(offset, length)
        })?;
        if let Hygiene::Source(r) = &mut self.hygiene {
            r.after_read(fd, offset, length);
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io(&self.name, Operation::Write, e).at(offset, data.len() as u64)
        })?;
        self.wrote(offset, data.len() as u64)
    }

    fn zero(&mut self, offset: u64, length: u64, allocate: bool) -> Result<()> {
        let cached = self
            .zero_range(offset, length, allocate)
            .map_err(|e| Error::io(&self.name, Operation::Zero, e).at(offset, length))?;
        if cached {
            self.wrote(offset, length)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.name, Operation::Flush, e))?;
        let fd = self.fd();
        if let Hygiene::Destination(w) = &mut self.hygiene {
            w.flushed(fd);
        }
        Ok(())
    }

    fn extents(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let all_data = || {
            vec![Extent {
                offset,
                length,
                kind: ExtentKind::Data,
            }]
        };
        if self.kind != Kind::Regular || length == 0 {
            return Ok(all_data());
        }
        match self.seek_extents(offset, length) {
            Ok(v) if !v.is_empty() => Ok(v),
            Ok(_) => Ok(all_data()),
            // File systems without SEEK_DATA: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(all_data()),
            Err(e) => Err(Error::io(&self.name, Operation::FindHoles, e).at(offset, length)),
        }
    }

    fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
        Ok(Some(Box::new(FileEndpoint {
            name: self.name.clone(),
            file: self.file.clone(),
            kind: self.kind,
            size: self.size,
            writable: self.writable,
            fresh: self.fresh,
            growable: self.growable,
            sector: self.sector,
            hygiene: self.hygiene.sibling(),
        })))
    }

    fn resize_to(&mut self, size: u64) -> Result<()> {
        if self.kind == Kind::Regular && self.fresh {
            if i64::try_from(size).is_err() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("size {size} is too large for a file"),
                )
                .with_endpoint(&self.name)
                .with_operation(Operation::Resize));
            }
            self.file
                .set_len(size)
                .map_err(|e| Error::io(&self.name, Operation::Resize, e).at_offset(size))?;
            self.size = size;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_extents_find_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 256 * 1024).unwrap();
        drop(f);
        let mut ep = FileEndpoint::open_source("f", &path).unwrap();
        let ex = ep.extents(0, 1 << 20).unwrap();
        // Contiguous, covering the range, with data around 256 KiB.
        let mut pos = 0;
        for e in &ex {
            assert_eq!(e.offset, pos);
            pos = e.end();
        }
        assert_eq!(pos, 1 << 20);
        let data: Vec<_> = ex.iter().filter(|e| e.kind == ExtentKind::Data).collect();
        assert!(!data.is_empty());
        assert!(
            data.iter()
                .any(|e| e.offset <= 256 * 1024 && e.end() >= 256 * 1024 + 4096)
        );
    }

    #[test]
    fn destination_is_truncated_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        std::fs::write(&path, vec![9u8; 100_000]).unwrap();
        let ep = FileEndpoint::open_destination("d", &path, Some(5000)).unwrap();
        assert!(ep.capabilities().starts_zeroed);
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 5000]);
    }

    #[test]
    fn parallel_workers_leave_no_pages_behind() {
        // 4 MiB segments, 3 workers: twelve segment edges, where one
        // handle's readahead runs into a range another handle has read.
        let dir = pagecache::disk_dir();
        let (src, dst) = (dir.path().join("s"), dir.path().join("d"));
        let data: Vec<u8> = (0..48u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&src, &data).unwrap();
        let f = File::open(&src).unwrap();
        f.sync_all().unwrap();
        // SAFETY: plain system call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert!(pagecache::resident_share(&f) < 0.01);
        let options = crate::CopyOptions {
            segment_size: 4 << 20,
            threads: 3,
            ..crate::CopyOptions::default()
        };
        let spec = crate::EndpointSpec::parse;
        let stats = crate::copy(&spec(&src), &spec(&dst), &options).unwrap();
        assert_eq!(stats.workers, 3);
        let left = pagecache::resident_share(&f);
        // Expected: nothing. Without the record of what other handles
        // dropped, 0 to 5% stayed cached at the segment edges.
        assert!(
            left < 0.02,
            "{:.1}% of the source still cached",
            left * 100.0
        );
        let d = File::open(&dst).unwrap();
        let left = pagecache::resident_share(&d);
        assert!(
            left < 0.1,
            "{:.1}% of the destination still cached",
            left * 100.0
        );
        assert!(std::fs::read(&dst).unwrap() == data);
    }

    #[test]
    fn zeroing_punches_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z");
        let mut ep = FileEndpoint::open_destination("z", &path, Some(1 << 20)).unwrap();
        ep.write_at(&vec![5u8; 1 << 20], 0).unwrap();
        ep.zero(4096, 65536, false).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[4096..4096 + 65536].iter().all(|&b| b == 0));
        assert_eq!(data[4095], 5);
        assert_eq!(data[4096 + 65536], 5);
    }
}
