//! The NBD protocol: wire format, handshake, blocking client and URIs.
//!
//! nbdcp speaks NBD itself rather than through libnbd. The layers, bottom
//! up:
//!
//! - [`wire`]: constants and message encoding/decoding, no I/O, every
//!   length bounded before anything is allocated;
//! - [`transport`]: TCP or Unix socket, tuned for bulk transfer;
//! - [`handshake`]: fixed newstyle negotiation (structured replies,
//!   `base:allocation`, `NBD_OPT_GO` with block sizes, `NBD_OPT_EXPORT_NAME`
//!   fallback);
//! - [`client`]: one connection with pipelined requests;
//! - [`uri`]: `nbd://` and `nbd+unix://` URIs.
//!
//! TLS is not supported yet; TLS URIs and servers that insist on TLS give
//! an [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) error.

pub mod client;
pub mod handshake;
pub mod splice;
pub mod transport;
pub mod uri;
pub mod wire;

pub use client::{Client, ClientOptions, ReadRequest, WriteCmd};
pub use handshake::Negotiated;
pub use transport::Transport;
pub use uri::{NbdAddress, NbdUri};
