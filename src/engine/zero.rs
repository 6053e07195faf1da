//! Finding runs of zero bytes in data that was read.

/// True if every byte of `buf` is zero.
///
/// Works on 64-byte blocks folded with OR so that the compiler can use wide
/// vector instructions; the early exit per block keeps data blocks (the
/// common case) cheap because they are usually non-zero in the first bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    // A quick look at the first bytes rejects most data without a full scan.
    let head = buf.len().min(16);
    if buf[..head].iter().any(|&b| b != 0) {
        return false;
    }
    let mut blocks = buf.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = [0u64; 8];
        for (a, word) in acc.iter_mut().zip(block.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            *a |= u64::from_ne_bytes(bytes);
        }
        if acc.iter().fold(0, |x, y| x | y) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// A run found by [`scan`]: `[start, end)` within the scanned buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First byte of the run, relative to the buffer.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Whether the run is all zero bytes.
    pub zero: bool,
}

/// Split `buf` into alternating data and zero runs at `granularity`.
///
/// Each `granularity`-sized block (the last may be shorter) is checked; a
/// block counts as zero only if it is entirely zero. Neighbouring blocks of
/// the same kind are merged. `granularity == 0` means no detection: the
/// whole buffer is one data run. Calls `emit` for each run in order.
pub fn scan(buf: &[u8], granularity: usize, mut emit: impl FnMut(Run)) {
    if buf.is_empty() {
        return;
    }
    if granularity == 0 {
        emit(Run {
            start: 0,
            end: buf.len(),
            zero: false,
        });
        return;
    }
    let mut current: Option<Run> = None;
    let mut start = 0;
    while start < buf.len() {
        let end = (start + granularity).min(buf.len());
        let zero = is_zero(&buf[start..end]);
        current = match current {
            Some(mut run) if run.zero == zero => {
                run.end = end;
                Some(run)
            }
            Some(run) => {
                emit(run);
                Some(Run { start, end, zero })
            }
            None => Some(Run { start, end, zero }),
        };
        start = end;
    }
    if let Some(run) = current {
        emit(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(buf: &[u8], g: usize) -> Vec<(usize, usize, bool)> {
        let mut v = Vec::new();
        scan(buf, g, |r| v.push((r.start, r.end, r.zero)));
        v
    }

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        for len in [1usize, 15, 16, 17, 63, 64, 65, 4096, 4099] {
            assert!(is_zero(&vec![0u8; len]));
            for pos in [0, len / 2, len - 1] {
                let mut v = vec![0u8; len];
                v[pos] = 1;
                assert!(!is_zero(&v), "len {len} pos {pos}");
            }
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn scan_merges_blocks_of_the_same_kind() {
        let mut buf = vec![0u8; 4096 * 5 + 100];
        buf[4096] = 7; // block 1 data
        buf[4096 * 2 + 5] = 7; // block 2 data
        buf[4096 * 5 + 99] = 1; // short tail data
        assert_eq!(
            runs(&buf, 4096),
            vec![
                (0, 4096, true),
                (4096, 4096 * 3, false),
                (4096 * 3, 4096 * 5, true),
                (4096 * 5, 4096 * 5 + 100, false),
            ]
        );
    }

    #[test]
    fn scan_without_granularity_is_one_data_run() {
        let buf = vec![0u8; 8192];
        assert_eq!(runs(&buf, 0), vec![(0, 8192, false)]);
        assert_eq!(runs(&[], 4096), vec![]);
    }

    #[test]
    fn scan_all_zero_is_one_zero_run() {
        let buf = vec![0u8; 10000];
        assert_eq!(runs(&buf, 4096), vec![(0, 10000, true)]);
    }
}
