//! Block size constraints: what request sizes and alignments a server
//! accepts (the specification's "block size constraints").

/// Size constraints on requests, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Offsets and lengths must be multiples of this (1 = no constraint).
    pub minimum: u32,
    /// Requests of this size and alignment are handled best.
    pub preferred: u32,
    /// No single request carrying a payload may be larger than this.
    pub maximum: u32,
}

impl Default for BlockSize {
    /// What a client may assume of a server that states nothing: any
    /// alignment, 4 KiB preferred, and requests up to 32 MiB, the
    /// specification's recommended largest payload.
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 32 * 1024 * 1024,
        }
    }
}
