//! The NBD protocol for programs without an async runtime: wire format,
//! handshake, a blocking client with pipelined requests, and URIs.
//!
//! This crate knows nothing of copying; nbdcp builds on it. The layers,
//! bottom up:
//!
//! - [`wire`]: constants and message encoding/decoding, no I/O, every
//!   length bounded before anything is allocated;
//! - [`transport`]: TCP or Unix socket, tuned for bulk transfer, or
//!   either inside TLS;
//! - [`tls`]: TLS credentials (X.509 or pre-shared keys) and the TLS
//!   handshake after `NBD_OPT_STARTTLS` (cargo feature `tls`, on by
//!   default, through the system's OpenSSL);
//! - [`handshake`]: fixed newstyle negotiation (structured replies,
//!   `base:allocation`, `NBD_OPT_GO` with block sizes, `NBD_OPT_EXPORT_NAME`
//!   fallback);
//! - [`client`]: one connection with pipelined requests;
//! - [`round_trip`]: how long the server takes to answer, from the
//!   replies themselves;
//! - [`uri`]: `nbd://`, `nbd+unix://`, `nbd+vsock://`, `nbd+ssh://`
//!   and their `nbds` forms;
//! - [`ssh`]: the ssh child process an `nbd+ssh` connection runs through;
//! - [`error`]: one error type, with kind, operation, offset and length,
//!   the server's errno and the underlying cause.
//!
//! `nbds` URIs require TLS: a server that does not offer it is an
//! [`ErrorKind::Tls`] error, never a fallback to plain text. Built without
//! the `tls` feature, connecting to one says TLS was not built in.
#![deny(missing_docs)]

pub mod block_size;
pub mod client;
pub mod error;
pub mod handshake;
pub mod round_trip;
pub mod splice;
pub mod ssh;
pub mod tls;
pub mod transport;
pub mod uri;
pub mod wire;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use block_size::BlockSize;
pub use client::{Client, ClientOptions, Interrupter, ReadRequest, WriteCmd};
pub use error::{Error, ErrorKind, Operation, Result, ServerErrno};
pub use handshake::Negotiated;
pub use tls::TlsContext;
pub use transport::Transport;
pub use uri::{NbdAddress, NbdUri, TlsSettings};
