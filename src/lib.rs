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
//!
//! # Progress
//!
//! The callback is called from worker threads with the bytes done so far.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
//! # let dir = tempfile::tempdir()?;
//! # let (src, dst) = (dir.path().join("a"), dir.path().join("b"));
//! # std::fs::write(&src, vec![1u8; 3 << 20])?;
//! let seen = Arc::new(AtomicU64::new(0));
//! let mut options = nbdcp::CopyOptions::default();
//! let s = seen.clone();
//! options.progress = Some(Arc::new(move |p: nbdcp::Progress| {
//!     s.fetch_max(p.done, Ordering::Relaxed);
//! }));
//! let spec = nbdcp::EndpointSpec::parse;
//! nbdcp::copy(&spec(&src), &spec(&dst), &options)?;
//! assert_eq!(seen.load(Ordering::Relaxed), 3 << 20);
//! # Ok(()) }
//! ```
//!
//! # Cancelling from another thread
//!
//! [`CancelToken::cancel`] breaks off requests blocked on a server, so the
//! copy returns promptly even if the server stopped answering.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let (src, dst) = (dir.path().join("a"), dir.path().join("b"));
//! # std::fs::write(&src, vec![1u8; 1 << 20])?;
//! let mut options = nbdcp::CopyOptions::default();
//! let cancel = options.cancel.clone();
//! std::thread::spawn(move || cancel.cancel()).join().unwrap();
//! let spec = nbdcp::EndpointSpec::parse;
//! let err = nbdcp::copy(&spec(&src), &spec(&dst), &options).unwrap_err();
//! assert_eq!(err.kind(), nbdcp::ErrorKind::Cancelled);
//! # Ok(()) }
//! ```
//!
//! # An endpoint of your own
//!
//! Implement [`Endpoint`] and hand it to [`copy_endpoints`]; the engine
//! asks it for its size, capabilities and data, and for further handles
//! for further workers.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use nbdcp::{Capabilities, Endpoint, Result};
//!
//! /// A read-only disk in memory, shared by all its handles.
//! struct Memory(Arc<Vec<u8>>);
//!
//! impl Endpoint for Memory {
//!     fn name(&self) -> &str { "memory" }
//!     fn size(&self) -> Option<u64> { Some(self.0.len() as u64) }
//!     fn capabilities(&self) -> Capabilities {
//!         let mut c = Capabilities::default();
//!         c.read_only = true;
//!         c
//!     }
//!     fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
//!         let start = offset as usize;
//!         buf.copy_from_slice(&self.0[start..start + buf.len()]);
//!         Ok(())
//!     }
//!     fn write_at(&mut self, _: &[u8], _: u64) -> Result<()> { unreachable!("read-only") }
//!     fn zero(&mut self, _: u64, _: u64, _: bool) -> Result<()> { unreachable!("read-only") }
//!     fn flush(&mut self) -> Result<()> { Ok(()) }
//!     fn connect_another(&self) -> Result<Option<Box<dyn Endpoint>>> {
//!         Ok(Some(Box::new(Memory(self.0.clone()))))
//!     }
//! }
//!
//! # let dir = tempfile::tempdir()?;
//! let disk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
//! let out = dir.path().join("copy.img");
//! let source = Box::new(Memory(Arc::new(disk.clone())));
//! let destination = nbdcp::open_destination(
//!     &nbdcp::EndpointSpec::parse(&out),
//!     source.size(),
//!     &nbdcp::OpenOptions::default(),
//! )?;
//! nbdcp::copy_endpoints(source, destination, &nbdcp::CopyOptions::default())?;
//! assert_eq!(std::fs::read(&out)?, disk);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod blkhash;
mod cancel;
pub mod endpoint;
pub mod engine;
mod error;
mod options;

pub use blkhash::{
    Blkhash, BlkhashAlgorithm, BlkhashSpec, DEFAULT_BLKHASH_BLOCK_SIZE, MAX_BLKHASH_BLOCK_SIZE,
};
pub use cancel::CancelToken;
pub use endpoint::{
    BlockSize, Capabilities, Endpoint, EndpointSpec, Extent, ExtentKind, Interrupter, OpenOptions,
    Payload, ReadOp, Tuning, WriteBuffer, WriteOp, open_destination, open_source,
};
pub use engine::events::{Event, EventFn};
pub use engine::progress::{Progress, ProgressFn};
pub use engine::report::{Report, ReportFn, SideReport};
pub use engine::{CopyStats, copy, copy_endpoints};
pub use error::{Error, ErrorKind, Operation, Result};
pub use options::{
    CopyOptions, DEFAULT_CONNECTIONS, DEFAULT_QUEUE_SIZE, DEFAULT_REQUEST_SIZE, DEFAULT_REQUESTS,
    DEFAULT_RETRIES, DEFAULT_SPARSE_SIZE, MAX_REQUEST_SIZE, MIN_REQUEST_SIZE, OptionError,
};

/// This library's version, which is also the version of the `nbdcp`
/// command built from the same package.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// For a program's last-resort exit (a second Ctrl-C, a copy stuck where
/// cancelling cannot reach): SIGKILL every NBD server subprocess this
/// library started that is still running, with the helpers it started,
/// and reap them. Copies using them fail.
pub fn kill_started_servers() {
    endpoint::kill_started_servers();
}
