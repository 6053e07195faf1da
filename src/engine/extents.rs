//! Turning what an endpoint says about allocation into a clean extent list.

use crate::endpoint::{Endpoint, Extent, ExtentKind};
use crate::error::Result;

use super::segments::Segment;

/// Describe `segment` of `source` as a sorted, gap-free, merged list of
/// extents covering it exactly.
///
/// The endpoint may answer in pieces (NBD servers often describe only part
/// of a range); it is asked again from where each answer ends. Answers are
/// clipped to the segment, and an answer that makes no progress ends the
/// questioning with the rest treated as data, so a confused endpoint can
/// cost speed but never correctness.
pub fn describe(source: &mut dyn Endpoint, segment: Segment) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = segment.offset;
    let end = segment.end();
    while pos < end {
        let answer = source.extents(pos, end - pos)?;
        let before = pos;
        for e in answer {
            // Only accept an extent that starts where we are and has length;
            // anything else means the answer is unusable from here on.
            if e.offset != pos || e.length == 0 {
                break;
            }
            let stop = e.offset.saturating_add(e.length).min(end);
            push_merged(&mut out, pos, stop - pos, e.kind);
            pos = stop;
            if pos >= end {
                break;
            }
        }
        if pos == before {
            push_merged(&mut out, pos, end - pos, ExtentKind::Data);
            pos = end;
        }
    }
    Ok(out)
}

/// One data extent covering `segment`, for when extents are not wanted.
pub fn all_data(segment: Segment) -> Vec<Extent> {
    vec![Extent {
        offset: segment.offset,
        length: segment.length,
        kind: ExtentKind::Data,
    }]
}

/// Append a run, merging it into the last one when of the same kind.
fn push_merged(out: &mut Vec<Extent>, offset: u64, length: u64, kind: ExtentKind) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.end() == offset {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        offset,
        length,
        kind,
    });
}

/// Shrink every zero extent inward to multiples of `align` (a power of
/// two), turning the cut-off edges into data, and merge the result.
///
/// A destination with a minimum block size cannot zero a partial block,
/// and it must never be read to do a read-modify-write; reading those few
/// edge bytes from the source and writing them is always correct.
pub fn align_zeroes(extents: &[Extent], align: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(extents.len());
    for e in extents {
        match e.kind {
            ExtentKind::Data => push_merged(&mut out, e.offset, e.length, ExtentKind::Data),
            ExtentKind::Zero => {
                let start = e.offset.next_multiple_of(align).min(e.end());
                let stop = (e.end() / align * align).max(start);
                push_merged(&mut out, e.offset, start - e.offset, ExtentKind::Data);
                push_merged(&mut out, start, stop - start, ExtentKind::Zero);
                push_merged(&mut out, stop, e.end() - stop, ExtentKind::Data);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Capabilities, Endpoint};

    fn ext(offset: u64, length: u64, zero: bool) -> Extent {
        Extent::test(offset, length, zero)
    }

    /// An endpoint that answers extent queries from a fixed script.
    struct Scripted {
        answers: Vec<Vec<Extent>>,
    }

    impl Endpoint for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn size(&self) -> Option<u64> {
            Some(1 << 20)
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        fn read_at(&mut self, _: &mut [u8], _: u64) -> Result<()> {
            Ok(())
        }
        fn write_at(&mut self, _: &[u8], _: u64) -> Result<()> {
            Ok(())
        }
        fn zero(&mut self, _: u64, _: u64, _: bool) -> Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            Ok(())
        }
        fn extents(&mut self, _: u64, _: u64) -> Result<Vec<Extent>> {
            Ok(if self.answers.is_empty() {
                vec![]
            } else {
                self.answers.remove(0)
            })
        }
        fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
            Ok(None)
        }
    }

    #[test]
    fn pieces_are_joined_merged_and_clipped() {
        let mut ep = Scripted {
            answers: vec![
                vec![ext(100, 10, false), ext(110, 10, false)],
                vec![ext(120, 30, true), ext(150, 1000, false)],
            ],
        };
        let got = describe(
            &mut ep,
            Segment {
                offset: 100,
                length: 100,
            },
        )
        .unwrap();
        assert_eq!(
            got,
            vec![ext(100, 20, false), ext(120, 30, true), ext(150, 50, false)]
        );
    }

    #[test]
    fn useless_answers_become_data() {
        // Wrong start, then nothing at all: the rest must be data.
        let mut ep = Scripted {
            answers: vec![vec![ext(0, 10, true), ext(50, 10, true)]],
        };
        let got = describe(
            &mut ep,
            Segment {
                offset: 0,
                length: 100,
            },
        )
        .unwrap();
        assert_eq!(got, vec![ext(0, 10, true), ext(10, 90, false)]);
        let mut ep = Scripted {
            answers: vec![vec![ext(0, 0, true)]],
        };
        let got = describe(
            &mut ep,
            Segment {
                offset: 0,
                length: 100,
            },
        )
        .unwrap();
        assert_eq!(got, vec![ext(0, 100, false)]);
    }

    #[test]
    fn zero_extents_shrink_to_alignment() {
        let input = vec![
            ext(0, 1000, false),
            ext(1000, 9000, true),
            ext(10000, 100, false),
        ];
        let got = align_zeroes(&input, 4096);
        assert_eq!(
            got,
            vec![
                ext(0, 4096, false),
                ext(4096, 4096, true),
                ext(8192, 10100 - 8192, false)
            ]
        );
        // A zero run smaller than one block becomes data entirely.
        let got = align_zeroes(&[ext(10, 100, true)], 4096);
        assert_eq!(got, vec![ext(10, 100, false)]);
        // Alignment 1 changes nothing.
        assert_eq!(align_zeroes(&input, 1), input);
    }
}
