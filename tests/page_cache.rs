//! Page-cache hygiene (issue 12): a copy from or to a file on a disk file
//! system leaves the page cache as it found it. Pages the copy read or
//! wrote are dropped; pages that were cached before the copy stay.
//!
//! Residency is read with `mincore` on a mapping of the file. These tests
//! need a disk file system (the page cache of tmpfs is the file itself):
//! they work under Cargo's target directory and fail, saying so, if that
//! is on tmpfs.

mod common;
use common::*;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// A fresh directory on a disk file system.
fn disk_dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    assert!(
        !on_tmpfs(dir.path()),
        "{} is on tmpfs, where the page cache is the storage: the page-cache \
         tests need a disk file system (set CARGO_TARGET_DIR to one)",
        base.display()
    );
    dir
}

fn on_tmpfs(path: &Path) -> bool {
    let f = File::open(path).unwrap();
    // SAFETY: fstatfs fills the zeroed struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    magic == 0x0102_1994
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap()
}

/// Which pages of `path` are resident, one flag per page.
fn resident(path: &Path) -> Vec<bool> {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return Vec::new();
    }
    let page = page_size() as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only mapping that is never touched, only described
    // by mincore into a vector with a byte per page, then unmapped.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {}", path.display());
        let r = libc::mincore(ptr, len, vec.as_mut_ptr());
        libc::munmap(ptr, len);
        assert_eq!(r, 0, "mincore {}", path.display());
    }
    vec.iter().map(|b| b & 1 != 0).collect()
}

/// Resident share of the pages of `path` in `[from, to)` bytes.
fn resident_share(path: &Path, from: u64, to: u64) -> f64 {
    let pages = resident(path);
    let page = page_size();
    let part = &pages[(from / page) as usize..to.div_ceil(page) as usize];
    part.iter().filter(|&&r| r).count() as f64 / part.len().max(1) as f64
}

/// Write `path` back and drop it from the page cache, and check it left.
fn evict(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: plain system call on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let len = f.metadata().unwrap().len();
    let left = resident_share(path, 0, len);
    assert!(
        left < 0.01,
        "could not drop {} from the page cache ({:.0}% still resident)",
        path.display(),
        left * 100.0
    );
}

/// Read `[from, to)` of `path` so that it is cached, and no more: with
/// readahead, pages past `to` could still be arriving when the copy starts
/// (`mincore` counts them only once read in), and the copy would rightly
/// keep them as cached before it.
fn cache(path: &Path, from: u64, to: u64) {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    // SAFETY: plain system call on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut buf = vec![0u8; MIB as usize];
    let mut off = from;
    while off < to {
        let n = (to - off).min(MIB) as usize;
        f.read_exact_at(&mut buf[..n], off).unwrap();
        off += n as u64;
    }
}

fn run(args: &[&std::ffi::OsStr]) {
    let out = nbdcp().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nbdcp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_mostly_dropped(path: &Path, what: &str) {
    let len = std::fs::metadata(path).unwrap().len();
    let share = resident_share(path, 0, len);
    assert!(
        share < 0.1,
        "{what}: {:.1}% of {} is still in the page cache after the copy",
        share * 100.0,
        path.display()
    );
}

#[test]
fn a_file_to_file_copy_leaves_neither_file_cached() {
    let dir = disk_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    random_file(&src, 64 * MIB, 12);
    evict(&src);
    run(&[src.as_os_str(), dst.as_os_str()]);
    assert_mostly_dropped(&src, "source");
    assert_mostly_dropped(&dst, "destination");
    assert_same_bytes(&src, &dst);
}

#[test]
fn a_sparse_image_with_zero_runs_leaves_neither_file_cached() {
    let dir = disk_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    mixed_image(&src, 64 * MIB, 13);
    evict(&src);
    run(&[src.as_os_str(), dst.as_os_str()]);
    assert_mostly_dropped(&src, "source");
    assert_mostly_dropped(&dst, "destination");
    assert_same_bytes(&src, &dst);
}

#[test]
fn a_source_cached_before_the_copy_stays_cached() {
    let dir = disk_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    random_file(&src, 64 * MIB, 14);
    evict(&src);
    cache(&src, 0, 64 * MIB);
    assert!(resident_share(&src, 0, 64 * MIB) > 0.99);
    run(&[src.as_os_str(), dst.as_os_str()]);
    let kept = resident_share(&src, 0, 64 * MIB);
    assert!(
        kept > 0.95,
        "the copy dropped pages cached before it: {:.1}% left",
        kept * 100.0
    );
    assert_mostly_dropped(&dst, "destination");
    assert_same_bytes(&src, &dst);
}

#[test]
fn only_the_pages_the_copy_brought_in_are_dropped() {
    let dir = disk_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    random_file(&src, 64 * MIB, 15);
    evict(&src);
    // Someone had the second quarter cached.
    cache(&src, 16 * MIB, 32 * MIB);
    let before = resident(&src);
    run(&[src.as_os_str(), dst.as_os_str()]);
    let after = resident(&src);
    let count = |keep: bool| {
        let pages = before.iter().zip(&after).filter(|(b, _)| **b == keep);
        let total = pages.clone().count();
        (pages.filter(|(_, a)| **a).count(), total)
    };
    let (kept, cached) = count(true);
    let quarter = (16 * MIB / page_size()) as usize;
    assert!(cached >= quarter, "caching 16 MiB left only {cached} pages");
    assert!(
        kept as f64 > 0.95 * cached as f64,
        "the copy dropped pages cached before it: {kept} of {cached} left"
    );
    let (stayed, brought) = count(false);
    assert!(
        (stayed as f64) < 0.1 * brought as f64,
        "{stayed} of the {brought} pages the copy read stayed cached"
    );
    assert_same_bytes(&src, &dst);
}

fn qemu_nbd() -> &'static str {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-nbd").is_file()));
    assert!(
        found,
        "qemu-nbd is not installed: apt-get install qemu-utils"
    );
    "qemu-nbd"
}

#[test]
fn a_file_copied_to_an_nbd_server_is_not_left_cached() {
    let qemu_nbd = qemu_nbd();
    let dir = disk_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    random_file(&src, 64 * MIB, 16);
    evict(&src);
    File::create(&dst).unwrap().set_len(64 * MIB).unwrap();
    run(&[
        src.as_os_str(),
        "[".as_ref(),
        qemu_nbd.as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        dst.as_os_str(),
        "]".as_ref(),
    ]);
    assert_mostly_dropped(&src, "source");
    assert_same_bytes(&src, &dst);
}

#[test]
fn a_file_copied_from_an_nbd_server_is_not_left_cached() {
    let qemu_nbd = qemu_nbd();
    let dir = disk_dir();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    random_file(&src, 64 * MIB, 17);
    run(&[
        "[".as_ref(),
        qemu_nbd.as_ref(),
        "-r".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        src.as_os_str(),
        "]".as_ref(),
        dst.as_os_str(),
    ]);
    assert_mostly_dropped(&dst, "destination");
    assert_same_bytes(&src, &dst);
}

#[test]
fn a_copy_on_tmpfs_keeps_every_byte() {
    // The page cache of tmpfs is the file: nbdcp must not try to drop it
    // (the kernel would refuse, but nothing may depend on that).
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir() && on_tmpfs(shm),
        "/dev/shm is not a tmpfs here; this test needs one"
    );
    let dir = tempfile::tempdir_in(shm).unwrap();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    mixed_image(&src, 16 * MIB, 18);
    run(&[src.as_os_str(), dst.as_os_str()]);
    assert_same_bytes(&src, &dst);
}
