//! nbdcp copies whole disk images between NBD servers, NBD servers it
//! starts itself, files, block devices, pipes and `null:`, with the command
//! line of libnbd's `nbdcopy`.
//!
//! The library is synchronous: it uses one OS thread per connection and
//! blocking sockets, and needs no async runtime. Open and copy in one call
//! with [`copy()`], or open endpoints yourself ([`open_source`],
//! [`open_destination`], or your own [`Endpoint`]) and call
//! [`copy_endpoints`]. The NBD protocol itself is the `nbdcp-nbd` crate.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use nbdcp::{CopyOptions, EndpointSpec};
//! let dir = tempfile::tempdir()?;
//! let (src, dst) = (dir.path().join("disk.img"), dir.path().join("copy.img"));
//! let f = std::fs::File::create(&src)?;
//! f.set_len(64 << 20)?; // a sparse 64 MiB image...
//! std::os::unix::fs::FileExt::write_all_at(&f, b"boot sector", 0)?; // ...with some data
//!
//! let mut options = CopyOptions::default();
//! options.connections = 2;
//! let stats = nbdcp::copy(&EndpointSpec::parse(&src), &EndpointSpec::parse(&dst), &options)?;
//! assert_eq!(stats.bytes, 64 << 20);
//! assert_eq!(std::fs::read(&src)?, std::fs::read(&dst)?);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod cancel;
pub mod endpoint;
pub mod engine;
mod error;
mod options;

pub use cancel::CancelToken;
pub use endpoint::{
    BlockSize, Capabilities, Endpoint, EndpointSpec, Extent, ExtentKind, Interrupter, OpenOptions,
    Payload, ReadOp, Tuning, WriteBuffer, WriteOp, open_destination, open_source,
};
pub use engine::progress::{Progress, ProgressFn};
pub use engine::{CopyStats, copy, copy_endpoints};
pub use error::{Error, ErrorKind, Operation, Result};
pub use options::{
    CopyOptions, DEFAULT_CONNECTIONS, DEFAULT_QUEUE_SIZE, DEFAULT_REQUEST_SIZE, DEFAULT_REQUESTS,
    DEFAULT_RETRIES, DEFAULT_SPARSE_SIZE, MAX_REQUEST_SIZE, MIN_REQUEST_SIZE, OptionError,
};

/// For a program's last-resort exit (a second Ctrl-C, a copy stuck where
/// cancelling cannot reach): SIGKILL every NBD server subprocess this
/// library started that is still running, with the helpers it started,
/// and reap them. Copies using them fail.
pub fn kill_started_servers() {
    endpoint::kill_started_servers();
}
