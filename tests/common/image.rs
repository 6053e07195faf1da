//! Deterministic test images and byte-exact comparison.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// xorshift64*: tiny, deterministic, good enough for test data.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> XorShift {
        // Never let the state be 0, which xorshift cannot leave.
        XorShift((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` random bytes for `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    XorShift::new(seed).fill(&mut buf);
    buf
}

/// What a region of a [`mixed_image`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// Random bytes (never a whole block of zeroes).
    Data,
    /// Zero bytes that were written: allocated on disk.
    Zero,
    /// Never written: a hole, not allocated.
    Hole,
}

/// One region of a [`mixed_image`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Start offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Contents.
    pub kind: SegmentKind,
}

/// Write a deterministic sparse image of exactly `size` bytes at `path`
/// (replacing any file there) and return its layout.
///
/// It is a sequence of segments of 4 KiB to 256 KiB (multiples of 4 KiB,
/// the last one cut short at `size`, so a `size` such as 3 MiB + 1234 gives
/// a partial last block), each random data, written zeroes (allocated), or
/// a hole. The first three segments are data, hole, zero, so all three
/// kinds occur whenever `size` exceeds 12 KiB.
pub fn mixed_image(path: &Path, size: u64, seed: u64) -> Vec<Segment> {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut rng = XorShift::new(seed);
    let mut segments = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let blocks = 1 + rng.below(64);
        let length = (blocks * 4096).min(size - offset);
        let kind = match segments.len() {
            0 => SegmentKind::Data,
            1 => SegmentKind::Hole,
            2 => SegmentKind::Zero,
            _ => match rng.below(3) {
                0 => SegmentKind::Data,
                1 => SegmentKind::Zero,
                _ => SegmentKind::Hole,
            },
        };
        match kind {
            SegmentKind::Data => {
                let mut buf = vec![0u8; length as usize];
                rng.fill(&mut buf);
                file.write_all_at(&buf, offset).unwrap();
            }
            SegmentKind::Zero => {
                file.write_all_at(&vec![0u8; length as usize], offset)
                    .unwrap();
            }
            SegmentKind::Hole => {}
        }
        segments.push(Segment {
            offset,
            length,
            kind,
        });
        offset += length;
    }
    file.sync_all().unwrap();
    segments
}

/// A fully random (non-sparse) file of `size` bytes.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut file = File::create(path).unwrap();
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// An all-hole file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// Bytes actually allocated on disk (`st_blocks` × 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The first offset where `a` and `b` differ, counting a length difference
/// as a difference at the shorter length; `None` if identical.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        // Slice equality is a memcmp even in a debug build; the byte loop
        // that finds where runs only on a difference (it took 21 s a GiB).
        if ba[..n] != bb[..n] {
            if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
                return Some(offset + i as u64);
            }
        }
        if na != nb {
            return Some(offset + n as u64);
        }
        if na == 0 {
            return None;
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]).unwrap() {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// Whether the two files have the same length and bytes.
pub fn files_equal(a: &Path, b: &Path) -> bool {
    first_difference(a, b).is_none()
}

/// Panic, naming the first differing offset and the sizes, unless `a` and
/// `b` have the same length and bytes.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    if let Some(offset) = first_difference(a, b) {
        let byte_at = |p: &Path| {
            let mut byte = [0u8; 1];
            match File::open(p).unwrap().read_at(&mut byte, offset) {
                Ok(1) => format!("{:#04x}", byte[0]),
                _ => "end of file".to_string(),
            }
        };
        panic!(
            "{} ({} bytes) and {} ({} bytes) differ first at offset {offset} \
             ({:#x}, block {} of 4096): {} vs {}",
            a.display(),
            std::fs::metadata(a).unwrap().len(),
            b.display(),
            std::fs::metadata(b).unwrap().len(),
            offset,
            offset / 4096,
            byte_at(a),
            byte_at(b),
        );
    }
}
