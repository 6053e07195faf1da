//! The blkhash of a disk image, as nbdcopy's `--blkhash` computes it.
//!
//! The image is cut into blocks of [`BlkhashSpec::block_size`] bytes (the
//! last one may be shorter). Each block is hashed on its own, at its real
//! length; a whole block of zeroes has the digest of a zero block, which
//! is computed once, so holes are never read to be hashed. The blkhash is
//! the digest of every block's digest in order followed by the image size
//! as a little-endian 64-bit number:
//!
//! ```text
//! H( H(block 0) || H(block 1) || ... || H(block N-1) || le64(size) )
//! ```
//!
//! An empty image is therefore `H(le64(0))`. The same image gives the same
//! blkhash whatever its format or allocation, and however it was copied.
//!
//! Ask a copy for it with [`CopyOptions::blkhash`](crate::CopyOptions::blkhash):
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use nbdcp::{BlkhashAlgorithm, BlkhashSpec, CopyOptions, EndpointSpec, copy};
//! let dir = tempfile::tempdir()?;
//! let disk = dir.path().join("disk.img");
//! std::fs::write(&disk, b"hello")?;
//! let mut options = CopyOptions::default();
//! options.blkhash = Some(BlkhashSpec::new(BlkhashAlgorithm::Md5, 65536));
//! let stats = copy(&EndpointSpec::parse(&disk), &EndpointSpec::Null, &options)?;
//! // What `nbdcopy --blkhash=md5` prints for the same five bytes.
//! assert_eq!(
//!     stats.blkhash.map(|h| h.to_hex()).as_deref(),
//!     Some("f741ac9ce55f5325906bb14e9c05d467")
//! );
//! # Ok(()) }
//! ```

use std::fmt;

use md5::Digest as _;

/// Default block size: 64 KiB, as nbdcopy's.
pub const DEFAULT_BLKHASH_BLOCK_SIZE: u64 = 64 * 1024;
/// Largest block size: the largest power of two nbdcopy accepts (its
/// limit is `UINT_MAX`).
pub const MAX_BLKHASH_BLOCK_SIZE: u64 = 1 << 31;

/// The digest function of a blkhash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BlkhashAlgorithm {
    /// MD5 (16-byte digests).
    Md5,
    /// SHA-1 (20-byte digests).
    Sha1,
    /// SHA-256 (32-byte digests), nbdcopy's default.
    #[default]
    Sha256,
    /// SHA-512 (64-byte digests).
    Sha512,
}

impl BlkhashAlgorithm {
    /// Every algorithm, in nbdcopy's order.
    pub const ALL: [BlkhashAlgorithm; 4] = [
        BlkhashAlgorithm::Md5,
        BlkhashAlgorithm::Sha1,
        BlkhashAlgorithm::Sha256,
        BlkhashAlgorithm::Sha512,
    ];

    /// The algorithm called `name` (`md5`, `sha1`, `sha256`, `sha512`,
    /// any case), as nbdcopy accepts it.
    pub fn from_name(name: &str) -> Option<BlkhashAlgorithm> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
    }

    /// The algorithm's name in lower case.
    pub fn name(self) -> &'static str {
        match self {
            BlkhashAlgorithm::Md5 => "md5",
            BlkhashAlgorithm::Sha1 => "sha1",
            BlkhashAlgorithm::Sha256 => "sha256",
            BlkhashAlgorithm::Sha512 => "sha512",
        }
    }

    /// Bytes in one digest.
    pub fn digest_len(self) -> usize {
        match self {
            BlkhashAlgorithm::Md5 => 16,
            BlkhashAlgorithm::Sha1 => 20,
            BlkhashAlgorithm::Sha256 => 32,
            BlkhashAlgorithm::Sha512 => 64,
        }
    }

    /// Append the digest of `data` to `out`.
    pub(crate) fn digest_into(self, data: &[u8], out: &mut Vec<u8>) {
        match self {
            BlkhashAlgorithm::Md5 => out.extend_from_slice(&md5::Md5::digest(data)),
            BlkhashAlgorithm::Sha1 => out.extend_from_slice(&sha1::Sha1::digest(data)),
            BlkhashAlgorithm::Sha256 => out.extend_from_slice(&sha2::Sha256::digest(data)),
            BlkhashAlgorithm::Sha512 => out.extend_from_slice(&sha2::Sha512::digest(data)),
        }
    }
}

impl fmt::Display for BlkhashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which blkhash to compute: `--blkhash=ALG/SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlkhashSpec {
    /// The digest function.
    pub algorithm: BlkhashAlgorithm,
    /// Bytes per block: a power of two from 1 to
    /// [`MAX_BLKHASH_BLOCK_SIZE`].
    pub block_size: u64,
}

impl Default for BlkhashSpec {
    /// sha256 over 64 KiB blocks, what `--blkhash` alone selects.
    fn default() -> Self {
        BlkhashSpec {
            algorithm: BlkhashAlgorithm::default(),
            block_size: DEFAULT_BLKHASH_BLOCK_SIZE,
        }
    }
}

impl BlkhashSpec {
    /// A spec of `algorithm` over blocks of `block_size` bytes.
    pub fn new(algorithm: BlkhashAlgorithm, block_size: u64) -> BlkhashSpec {
        BlkhashSpec {
            algorithm,
            block_size,
        }
    }

    /// Whether the block size can be used.
    pub fn block_size_is_valid(&self) -> bool {
        self.block_size.is_power_of_two() && self.block_size <= MAX_BLKHASH_BLOCK_SIZE
    }
}

/// A computed blkhash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blkhash {
    /// What was computed.
    pub spec: BlkhashSpec,
    /// The digest's bytes.
    pub digest: Vec<u8>,
}

impl Blkhash {
    /// The digest in lower-case hexadecimal, as nbdcopy prints it.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Blkhash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.digest {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A digest being computed incrementally, for blocks that arrive in
/// pieces and for the final fold.
#[derive(Clone)]
pub(crate) enum State {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl State {
    pub(crate) fn new(algorithm: BlkhashAlgorithm) -> State {
        match algorithm {
            BlkhashAlgorithm::Md5 => State::Md5(md5::Md5::new()),
            BlkhashAlgorithm::Sha1 => State::Sha1(sha1::Sha1::new()),
            BlkhashAlgorithm::Sha256 => State::Sha256(sha2::Sha256::new()),
            BlkhashAlgorithm::Sha512 => State::Sha512(sha2::Sha512::new()),
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            State::Md5(h) => h.update(data),
            State::Sha1(h) => h.update(data),
            State::Sha256(h) => h.update(data),
            State::Sha512(h) => h.update(data),
        }
    }

    /// Feed `len` zero bytes.
    pub(crate) fn update_zeroes(&mut self, mut len: u64) {
        while len > 0 {
            let n = len.min(ZEROES.len() as u64) as usize;
            self.update(&ZEROES[..n]);
            len -= n as u64;
        }
    }

    /// Append the digest to `out`.
    pub(crate) fn finish_into(self, out: &mut Vec<u8>) {
        match self {
            State::Md5(h) => out.extend_from_slice(&h.finalize()),
            State::Sha1(h) => out.extend_from_slice(&h.finalize()),
            State::Sha256(h) => out.extend_from_slice(&h.finalize()),
            State::Sha512(h) => out.extend_from_slice(&h.finalize()),
        }
    }
}

/// Zero bytes to feed a digest from, never read from a source.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// The digest of `len` zero bytes.
pub(crate) fn zero_digest(algorithm: BlkhashAlgorithm, len: u64) -> Vec<u8> {
    let mut state = State::new(algorithm);
    state.update_zeroes(len);
    let mut out = Vec::with_capacity(algorithm.digest_len());
    state.finish_into(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lengths() {
        for a in BlkhashAlgorithm::ALL {
            assert_eq!(BlkhashAlgorithm::from_name(a.name()), Some(a));
            let mut out = Vec::new();
            a.digest_into(b"hello", &mut out);
            assert_eq!(out.len(), a.digest_len());
        }
        assert_eq!(
            BlkhashAlgorithm::from_name("SHA512"),
            Some(BlkhashAlgorithm::Sha512)
        );
        assert_eq!(BlkhashAlgorithm::from_name("sha3"), None);
        assert_eq!(BlkhashAlgorithm::from_name(""), None);
    }

    #[test]
    fn the_empty_image_is_the_digest_of_its_size() {
        // sha256 of eight zero bytes, nbdcopy's vector for an empty disk.
        let hex = Blkhash {
            spec: BlkhashSpec::default(),
            digest: zero_digest(BlkhashAlgorithm::Sha256, 8),
        }
        .to_hex();
        assert_eq!(
            hex,
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        for a in BlkhashAlgorithm::ALL {
            let mut whole = Vec::new();
            a.digest_into(&data, &mut whole);
            let mut state = State::new(a);
            for piece in data.chunks(7777) {
                state.update(piece);
            }
            let mut pieces = Vec::new();
            state.finish_into(&mut pieces);
            assert_eq!(whole, pieces, "{a}");
        }
        let mut zeros = Vec::new();
        BlkhashAlgorithm::Md5.digest_into(&[0; 100_000], &mut zeros);
        assert_eq!(zero_digest(BlkhashAlgorithm::Md5, 100_000), zeros);
    }

    #[test]
    fn block_sizes() {
        let ok = |b| BlkhashSpec::new(BlkhashAlgorithm::Md5, b).block_size_is_valid();
        assert!(ok(1) && ok(4) && ok(65536) && ok(1 << 31));
        assert!(!ok(0) && !ok(3) && !ok(1 << 32) && !ok(65535));
    }
}
