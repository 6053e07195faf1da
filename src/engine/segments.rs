//! Cutting the source into disjoint segments that workers copy whole.

/// A half-open byte range `[offset, offset + length)` of the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
}

impl Segment {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Segments covering `[start, start + length)` in order, each
/// `segment_size` long except a shorter last one. None for an empty range.
pub fn plan(start: u64, length: u64, segment_size: u64) -> impl Iterator<Item = Segment> {
    let segment_size = segment_size.max(1);
    let count = length.div_ceil(segment_size);
    (0..count).map(move |i| {
        let at = i * segment_size;
        Segment {
            offset: start + at,
            length: segment_size.min(length - at),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::DEFAULT_SEGMENT_SIZE;

    fn check_cover(size: u64, seg: u64) {
        let segs: Vec<_> = plan(0, size, seg).collect();
        let mut pos = 0;
        for s in &segs {
            assert_eq!(s.offset, pos, "segments must be contiguous and disjoint");
            assert!(s.length > 0 && s.length <= seg);
            pos = s.end();
        }
        assert_eq!(pos, size, "segments must cover the whole source");
    }

    #[test]
    fn covers_every_size() {
        for size in [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 1 << 30] {
            check_cover(size, 4096);
        }
        check_cover(5 * DEFAULT_SEGMENT_SIZE + 1, DEFAULT_SEGMENT_SIZE);
    }

    #[test]
    fn empty_source_has_no_segments() {
        assert_eq!(plan(0, 0, 4096).count(), 0);
    }

    #[test]
    fn a_range_is_cut_from_its_start() {
        let segs: Vec<_> = plan(1000, 10, 4).collect();
        let got: Vec<(u64, u64)> = segs.iter().map(|s| (s.offset, s.length)).collect();
        assert_eq!(got, vec![(1000, 4), (1004, 4), (1008, 2)]);
    }

    #[test]
    fn short_tail() {
        let segs: Vec<_> = plan(0, 10, 4).collect();
        assert_eq!(
            segs,
            vec![
                Segment {
                    offset: 0,
                    length: 4
                },
                Segment {
                    offset: 4,
                    length: 4
                },
                Segment {
                    offset: 8,
                    length: 2
                },
            ]
        );
    }
}
