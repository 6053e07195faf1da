//! `--journal=FILE`: resume an interrupted copy.
//!
//! The journal is a text file: a header that identifies the copy (the
//! endpoints as given, the size, the segment size, and every option that
//! changes what is written), then one `done OFFSET` line per segment once
//! it is complete and flushed on the destination, appended and synced
//! (one small record per 128 MiB), then `complete`. A copy started again
//! with the same journal skips the segments recorded; a journal whose
//! header does not match the copy is refused, never used. A line cut off
//! by a crash (no newline yet) is ignored: its segment is copied again.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Operation, Result};

/// First line of every journal.
const MAGIC: &str = "nbdcp journal 1";
/// Ends the header.
const END_OF_HEADER: &str = "---";
/// Marks a finished copy.
const COMPLETE: &str = "complete";
/// Most bytes of a journal read: a header and one line per 128 MiB
/// segment of an 8 EiB image would not reach it.
const MAX_JOURNAL: u64 = 256 << 20;

/// What identifies a copy in its journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub source: String,
    pub destination: String,
    pub size: u64,
    pub segment_size: u64,
    pub source_offset: u64,
    pub destination_offset: u64,
    pub length: u64,
    pub allocated: bool,
    pub destination_is_zero: bool,
    pub sparse_size: usize,
}

impl Header {
    fn lines(&self) -> Vec<String> {
        vec![
            MAGIC.to_string(),
            format!("source {:?}", self.source),
            format!("destination {:?}", self.destination),
            format!("size {}", self.size),
            format!("segment-size {}", self.segment_size),
            format!(
                "range {} {} {}",
                self.source_offset, self.destination_offset, self.length
            ),
            format!("allocated {}", self.allocated),
            format!("destination-is-zero {}", self.destination_is_zero),
            format!("sparse {}", self.sparse_size),
            END_OF_HEADER.to_string(),
        ]
    }
}

/// A journal file and what an earlier run left in it.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: Mutex<File>,
    /// The header lines found, if the file had any.
    found: Option<Vec<String>>,
    done: BTreeSet<u64>,
    complete: bool,
}

fn io_error(path: &Path, op: Operation, e: std::io::Error) -> Error {
    Error::io(&format!("journal {}", path.display()), op, e)
}

fn corrupt(path: &Path, what: &str) -> Error {
    Error::usage(format!("journal {}: {what}", path.display()))
}

impl Journal {
    /// Open (or create) the journal at `path` and read what is in it.
    pub(crate) fn open(path: &Path) -> Result<Journal> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_error(path, Operation::Open, e))?;
        let mut text = String::new();
        (&mut file)
            .take(MAX_JOURNAL)
            .read_to_string(&mut text)
            .map_err(|e| io_error(path, Operation::Read, e))?;
        // A line cut off by a crash is dropped, so that the next record
        // starts a line of its own.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            file.set_len(whole as u64)
                .map_err(|e| io_error(path, Operation::Resize, e))?;
            text.truncate(whole);
        }
        let mut journal = Journal {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            found: None,
            done: BTreeSet::new(),
            complete: false,
        };
        journal.parse(&text)?;
        Ok(journal)
    }

    fn parse(&mut self, text: &str) -> Result<()> {
        // Only whole lines count: a crash can leave the last one cut off.
        let whole = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        let mut lines = whole.lines();
        let mut header = Vec::new();
        for line in lines.by_ref() {
            header.push(line.to_string());
            if line == END_OF_HEADER {
                break;
            }
        }
        if header.is_empty() {
            return Ok(());
        }
        if header.first().map(String::as_str) != Some(MAGIC)
            || header.last().map(String::as_str) != Some(END_OF_HEADER)
        {
            return Err(corrupt(&self.path, "not an nbdcp journal"));
        }
        self.found = Some(header);
        for line in lines {
            if line == COMPLETE {
                self.complete = true;
            } else if let Some(offset) = line.strip_prefix("done ").and_then(|o| o.parse().ok()) {
                self.done.insert(offset);
            } else {
                return Err(corrupt(&self.path, &format!("unreadable line {line:?}")));
            }
        }
        Ok(())
    }

    /// Whether an earlier run started this journal (the destination then
    /// holds its work and must not be truncated).
    pub(crate) fn started(&self) -> bool {
        self.found.is_some()
    }

    /// Whether an earlier run finished the copy.
    pub(crate) fn complete(&self) -> bool {
        self.complete
    }

    /// The segments (by offset) an earlier run recorded.
    pub(crate) fn done(&self) -> &BTreeSet<u64> {
        &self.done
    }

    /// Check the journal is this copy's, writing the header if it is new.
    pub(crate) fn begin(&mut self, header: &Header) -> Result<()> {
        let want = header.lines();
        match &self.found {
            Some(found) if *found == want => Ok(()),
            Some(found) => {
                let differs = found.iter().zip(&want).find(|(a, b)| a != b).map_or_else(
                    || "its header".to_string(),
                    |(a, b)| format!("it has {a:?} where this copy has {b:?}"),
                );
                Err(Error::usage(format!(
                    "journal {} belongs to another copy: {differs}",
                    self.path.display()
                )))
            }
            None => {
                let text = want.join("\n") + "\n";
                self.append(&text)?;
                self.found = Some(want);
                Ok(())
            }
        }
    }

    /// Record a segment as complete and flushed on the destination.
    pub(crate) fn record(&self, offset: u64) -> Result<()> {
        self.append(&format!("done {offset}\n"))
    }

    /// Mark the copy complete.
    pub(crate) fn finish(&self) -> Result<()> {
        self.append(&format!("{COMPLETE}\n"))
    }

    /// Append `text` and make it durable before returning.
    fn append(&self, text: &str) -> Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error(&self.path, Operation::Write, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn header(size: u64) -> Header {
        Header {
            source: "src.img".into(),
            destination: "nbd://h/".into(),
            size,
            segment_size: 128 << 20,
            source_offset: 0,
            destination_offset: 0,
            length: size,
            allocated: false,
            destination_is_zero: false,
            sparse_size: 4096,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        assert!(!j.started());
        j.begin(&header(1 << 30)).unwrap();
        j.record(0).unwrap();
        j.record(256 << 20).unwrap();
        drop(j);
        // A crash in the middle of an append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"done 1342").unwrap();
        drop(f);
        let mut j = Journal::open(&path).unwrap();
        assert!(j.started() && !j.complete());
        assert_eq!(
            j.done().iter().copied().collect::<Vec<_>>(),
            vec![0, 256 << 20]
        );
        j.begin(&header(1 << 30)).unwrap();
        j.finish().unwrap();
        assert!(Journal::open(&path).unwrap().complete());
    }

    #[test]
    fn another_copys_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        Journal::open(&path)
            .unwrap()
            .begin(&header(1 << 30))
            .unwrap();
        let e = Journal::open(&path)
            .unwrap()
            .begin(&header(2 << 30))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        assert!(e.to_string().contains("\"size 1073741824\""), "{e}");
        std::fs::write(&path, "hello\n---\n").unwrap();
        assert!(Journal::open(&path).is_err());
    }
}
