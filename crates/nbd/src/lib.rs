//! The NBD protocol for programs without an async runtime: wire format,
//! handshake, a blocking client with pipelined requests, and URIs.
//!
//! This crate knows nothing of copying; nbdcp builds on it. The layers,
//! bottom up:
//!
//! - [`wire`]: constants and message encoding/decoding, no I/O, every
//!   length bounded before anything is allocated;
//! - [`transport`]: TCP or Unix socket, tuned for bulk transfer;
//! - [`handshake`]: fixed newstyle negotiation (structured replies,
//!   `base:allocation`, `NBD_OPT_GO` with block sizes, `NBD_OPT_EXPORT_NAME`
//!   fallback);
//! - [`client`]: one connection with pipelined requests;
//! - [`uri`]: `nbd://` and `nbd+unix://` URIs;
//! - [`error`]: one error type, with kind, operation, offset and length,
//!   the server's errno and the underlying cause.
//!
//! TLS is not supported yet; TLS URIs and servers that insist on TLS give
//! an [`ErrorKind::Unsupported`] error.
#![deny(missing_docs)]

pub mod block_size;
pub mod client;
pub mod error;
pub mod handshake;
pub mod splice;
pub mod transport;
pub mod uri;
pub mod wire;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use block_size::BlockSize;
pub use client::{Client, ClientOptions, Interrupter, ReadRequest, WriteCmd};
pub use error::{Error, ErrorKind, Operation, Result, ServerErrno};
pub use handshake::Negotiated;
pub use transport::Transport;
pub use uri::{NbdAddress, NbdUri};
