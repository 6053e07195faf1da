//! nbdcp copies whole disk images between NBD servers, NBD servers it
//! starts itself, files, block devices, pipes and `null:`, with the command
//! line of libnbd's `nbdcopy`.
//!
//! The library is synchronous: it uses one OS thread per connection and
//! blocking sockets, and needs no async runtime. Open and copy in one call
//! with [`copy`], or open [`endpoint`]s yourself and call
//! [`copy::copy_endpoints`].
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
//! let options = CopyOptions { connections: 2, ..CopyOptions::default() };
//! let stats = nbdcp::copy(
//!     &EndpointSpec::parse(src.to_str().unwrap()),
//!     &EndpointSpec::parse(dst.to_str().unwrap()),
//!     &options,
//! )?;
//! assert_eq!(stats.bytes, 64 << 20);
//! assert_eq!(std::fs::read(&src)?, std::fs::read(&dst)?);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod cli;
pub mod copy;
pub mod endpoint;
pub mod error;

pub mod signals;

pub use copy::{CancelToken, CopyOptions, CopyStats, Progress, copy};
pub use endpoint::EndpointSpec;
pub use error::{Error, ErrorKind, Operation, Result};
