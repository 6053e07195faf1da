//! How to copy: [`CopyOptions`], the one place where the defaults live.

use std::fmt;
use std::time::Duration;

use crate::blkhash::{BlkhashSpec, MAX_BLKHASH_BLOCK_SIZE};
use crate::cancel::CancelToken;
use crate::endpoint::OpenOptions;
use crate::engine::events::EventFn;
use crate::engine::progress::ProgressFn;
use crate::engine::report::ReportFn;
use crate::error::Error;

/// The largest request nbdcp ever sends, as NBD servers commonly allow.
pub const MAX_REQUEST_SIZE: usize = 32 * 1024 * 1024;
/// The smallest `--request-size`.
pub const MIN_REQUEST_SIZE: usize = 4096;
/// The request size for endpoints that state no preference (files, pipes,
/// NBD over TCP), as nbdcopy's default.
pub const DEFAULT_REQUEST_SIZE: usize = 256 * 1024;
/// Default `--connections`, as nbdcopy's.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Default `--requests`: requests in flight per connection, as nbdcopy's.
pub const DEFAULT_REQUESTS: usize = 64;
/// Default `--queue-size`: bytes in flight per connection, as nbdcopy's.
pub const DEFAULT_QUEUE_SIZE: usize = 16 * 1024 * 1024;
/// Default `--sparse`: zero-detection block size, as nbdcopy's.
pub const DEFAULT_SPARSE_SIZE: usize = 4096;
/// Default `--retries`: with the back-off this gives a server about three
/// seconds to come back.
pub const DEFAULT_RETRIES: u32 = 5;
/// The default segment size: large enough that per-segment costs (one
/// block-status query, a queue hand-off) vanish, small enough that
/// several workers share the work of a multi-gigabyte image evenly.
pub const DEFAULT_SEGMENT_SIZE: u64 = 128 * 1024 * 1024;

/// How to copy. `Default` gives nbdcopy's defaults (flushing at the end,
/// unlike nbdcopy, so that a reported success is on stable storage).
///
/// New options may be added in any release, so build it from the default
/// and set what you need:
///
/// ```
/// let mut options = nbdcp::CopyOptions::default();
/// options.connections = 2;
/// options.sparse_size = 0;
/// assert!(options.validate().is_ok());
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct CopyOptions {
    /// Connections to open to each NBD endpoint (`-C`); also the most
    /// workers for other kinds.
    pub connections: usize,
    /// Most workers (`-T`); 0 means the number of cores, plus one when the
    /// source is a server that is waited on.
    pub threads: usize,
    /// Most requests in flight per connection (`-R`).
    pub requests: usize,
    /// Largest single read (`--request-size`), a power of two; `None`
    /// lets each copy choose from its endpoints (see [`DEFAULT_REQUEST_SIZE`]).
    pub request_size: Option<usize>,
    /// Bytes of data in flight per worker (`--queue-size`); raised to the
    /// request size if smaller.
    pub queue_size: usize,
    /// Zero-detection block size in data (`-S`), 0 for none.
    pub sparse_size: usize,
    /// Leave the destination fully allocated (`--allocated`).
    pub allocated: bool,
    /// The destination already reads as zeroes (`--destination-is-zero`).
    pub destination_is_zero: bool,
    /// Flush the destination at the end (default; `--no-flush` clears it).
    pub flush: bool,
    /// Ask the source which parts hold data (`--no-extents` clears it).
    pub extents: bool,
    /// One worker, one request at a time (`--synchronous`).
    pub synchronous: bool,
    /// Fail a request to an NBD server that takes longer than this.
    pub timeout: Option<Duration>,
    /// Times a segment is retried after a dropped or stalled connection,
    /// reconnecting first (`--retries`); 0 turns retrying off.
    pub retries: u32,
    /// Size of the pieces the source is cut into for the workers (with
    /// a blkhash, at least one block).
    pub segment_size: u64,
    /// Copy from this byte of the source on (`--source-offset`, as dd's
    /// `skip`).
    pub source_offset: u64,
    /// Write to the destination from this byte on (`--destination-offset`,
    /// as dd's `seek`); a regular-file destination is then not truncated.
    pub destination_offset: u64,
    /// Copy this many bytes (`--length`, as dd's `count`); `None` copies
    /// to the end of the source.
    pub length: Option<u64>,
    /// Record finished segments in this file and, started again with it
    /// after an interruption, copy only the others (`--journal`).
    pub journal: Option<std::path::PathBuf>,
    /// Read at most this many bytes of data a second from the source,
    /// across all workers (`--rate`); holes skipped through extents do
    /// not count.
    pub rate: Option<u64>,
    /// Compute the blkhash of the source while copying (`--blkhash`);
    /// it is returned in [`CopyStats::blkhash`](crate::CopyStats::blkhash).
    pub blkhash: Option<BlkhashSpec>,
    /// After the copy, read the destination back and compare its blkhash
    /// with the source's (`--verify`): an [`ErrorKind::Mismatch`](crate::ErrorKind::Mismatch)
    /// error names the first differing block. Uses `blkhash`'s algorithm
    /// and block size, or sha256/64K.
    pub verify: bool,
    /// Told about progress from worker threads.
    pub progress: Option<ProgressFn>,
    /// Told once what the copy is about to do (`-v`), when the endpoints
    /// are open and before data moves.
    pub report: Option<ReportFn>,
    /// Told when the copy starts, makes progress and retries
    /// (`--progress=json:FD`).
    pub events: Option<EventFn>,
    /// Lets another thread stop the copy.
    pub cancel: CancelToken,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            connections: DEFAULT_CONNECTIONS,
            threads: 0,
            requests: DEFAULT_REQUESTS,
            request_size: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            sparse_size: DEFAULT_SPARSE_SIZE,
            allocated: false,
            destination_is_zero: false,
            flush: true,
            extents: true,
            synchronous: false,
            timeout: None,
            retries: DEFAULT_RETRIES,
            segment_size: DEFAULT_SEGMENT_SIZE,
            source_offset: 0,
            destination_offset: 0,
            length: None,
            journal: None,
            rate: None,
            blkhash: None,
            verify: false,
            progress: None,
            report: None,
            events: None,
            cancel: CancelToken::new(),
        }
    }
}

impl fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyOptions")
            .field("connections", &self.connections)
            .field("threads", &self.threads)
            .field("requests", &self.requests)
            .field("request_size", &self.request_size)
            .field("queue_size", &self.queue_size)
            .field("sparse_size", &self.sparse_size)
            .field("allocated", &self.allocated)
            .field("destination_is_zero", &self.destination_is_zero)
            .field("flush", &self.flush)
            .field("extents", &self.extents)
            .field("synchronous", &self.synchronous)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("segment_size", &self.segment_size)
            .field("source_offset", &self.source_offset)
            .field("destination_offset", &self.destination_offset)
            .field("length", &self.length)
            .field("journal", &self.journal)
            .field("rate", &self.rate)
            .field("blkhash", &self.blkhash)
            .finish_non_exhaustive()
    }
}

/// A [`CopyOptions`] field with a value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionError {
    /// The field's name, as in [`CopyOptions`] (`"request_size"`).
    pub field: &'static str,
    /// What is wrong with it, to follow the field's name; it may name
    /// other fields.
    problem: Vec<Word>,
}

/// A piece of an [`OptionError`]'s problem.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Word {
    Text(String),
    Field(&'static str),
}

impl OptionError {
    /// The message with every field named by `name`: a command line says
    /// `--request-size` where the library says `request_size`.
    pub fn describe(&self, name: impl Fn(&'static str) -> String) -> String {
        let mut out = name(self.field);
        out.push(' ');
        for word in &self.problem {
            match word {
                Word::Text(t) => out.push_str(t),
                Word::Field(f) => out.push_str(&name(f)),
            }
        }
        out
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(str::to_string))
    }
}

impl std::error::Error for OptionError {}

impl From<OptionError> for Error {
    fn from(e: OptionError) -> Error {
        Error::usage(e.to_string()).with_source(e)
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> Result<(), OptionError> {
    invalid_words(field, vec![Word::Text(problem.into())])
}

fn invalid_words(field: &'static str, problem: Vec<Word>) -> Result<(), OptionError> {
    Err(OptionError { field, problem })
}

impl CopyOptions {
    /// Check the values make sense together; the error names the field.
    pub fn validate(&self) -> Result<(), OptionError> {
        if self.connections == 0 {
            return invalid("connections", "must be at least 1");
        }
        if self.requests == 0 {
            return invalid("requests", "must be at least 1");
        }
        if let Some(size) = self.request_size {
            if !size.is_power_of_two() || !(MIN_REQUEST_SIZE..=MAX_REQUEST_SIZE).contains(&size) {
                return invalid(
                    "request_size",
                    format!(
                        "must be a power of two from {MIN_REQUEST_SIZE} to {MAX_REQUEST_SIZE}, not {size}"
                    ),
                );
            }
        }
        // A queue smaller than a request is raised to it when the copy is
        // planned, as nbdcopy does, rather than refused.
        let smallest_request = self.request_size.unwrap_or(MIN_REQUEST_SIZE);
        if self.sparse_size != 0
            && (!self.sparse_size.is_power_of_two()
                || self.sparse_size < 512
                || self.sparse_size > self.request_size.unwrap_or(MAX_REQUEST_SIZE))
        {
            return invalid_words(
                "sparse_size",
                vec![
                    Word::Text("must be 0 or a power of two from 512 to ".into()),
                    Word::Field("request_size"),
                    Word::Text(format!(", not {}", self.sparse_size)),
                ],
            );
        }
        if self.rate == Some(0) {
            return invalid("rate", "must be at least 1 byte a second");
        }
        // A power of two at least the request size is a multiple of it.
        if !self.segment_size.is_power_of_two() || self.segment_size < smallest_request as u64 {
            return invalid(
                "segment_size",
                "must be a power of two, at least the request size",
            );
        }
        if let Some(spec) = self.blkhash {
            if !spec.block_size_is_valid() {
                return invalid(
                    "blkhash",
                    format!(
                        "block size must be a power of two from 1 to {MAX_BLKHASH_BLOCK_SIZE}, not {}",
                        spec.block_size
                    ),
                );
            }
        }
        Ok(())
    }

    /// Whether only part of the source, or to another place, is copied
    /// (`source_offset`, `destination_offset` or `length` set).
    pub fn is_range(&self) -> bool {
        self.source_offset != 0 || self.destination_offset != 0 || self.length.is_some()
    }

    /// Options for opening endpoints for this copy.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            requests: if self.synchronous { 1 } else { self.requests },
            queue_size: self.queue_size.max(self.request_size.unwrap_or(0)),
            timeout: self.timeout,
            // Outside a range the destination stays as it was.
            preserve_destination: self.is_range(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_with_and_without_a_request_size() {
        assert!(CopyOptions::default().validate().is_ok());
        let explicit = |request_size, queue_size, sparse_size| CopyOptions {
            request_size: Some(request_size),
            queue_size,
            sparse_size,
            ..CopyOptions::default()
        };
        assert!(explicit(64 << 10, 16 << 20, 4096).validate().is_ok());
        let field = |o: CopyOptions| o.validate().unwrap_err().field;
        assert_eq!(field(explicit(3000, 16 << 20, 4096)), "request_size");
        assert!(explicit(1 << 20, 4096, 4096).validate().is_ok());
        assert_eq!(
            field(explicit(64 << 10, 16 << 20, 128 << 10)),
            "sparse_size"
        );
        let auto_big_sparse = CopyOptions {
            sparse_size: 1 << 20,
            ..CopyOptions::default()
        };
        assert!(auto_big_sparse.validate().is_ok());
        let none = CopyOptions {
            connections: 0,
            ..CopyOptions::default()
        };
        assert_eq!(
            none.validate().unwrap_err().to_string(),
            "connections must be at least 1"
        );
        let e = explicit(64 << 10, 16 << 20, 128 << 10)
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "sparse_size must be 0 or a power of two from 512 to request_size, not 131072"
        );
        let bad_block = CopyOptions {
            blkhash: Some(BlkhashSpec::new(
                crate::blkhash::BlkhashAlgorithm::Md5,
                3000,
            )),
            ..CopyOptions::default()
        };
        assert_eq!(bad_block.validate().unwrap_err().field, "blkhash");
        let flags = e.describe(|f| format!("--{}", f.replace('_', "-")));
        assert_eq!(
            flags,
            "--sparse-size must be 0 or a power of two from 512 to --request-size, not 131072"
        );
    }
}
