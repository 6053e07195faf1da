//! Scripted NBD servers for tests (feature `testkit`), built on this
//! crate's own encoders and decoders ([`crate::wire`]).
//!
//! - [`Peer`]: the server's end of one connection, one protocol step at
//!   a time: greeting, client flags, options and their replies, a whole
//!   negotiation from an [`Export`] ([`Peer::negotiate`], forgiving, or
//!   [`Peer::serve_go`], which checks the client's every step), requests,
//!   simple replies, structured chunks (data, hole, error, block status),
//!   and raw bytes for deliberately malformed messages.
//! - [`Server`]: a Unix socket in a fresh temporary directory and a
//!   thread per connection, running either a script on a [`Peer`]
//!   ([`Server::start`], [`Server::nbd`] with a [`Hook`]) or an in-memory
//!   export with switches for the misbehaviours a client must survive
//!   ([`Server::memory`], [`FakeConfig`], [`Misbehave`]). It logs every
//!   request, so a test can wait for the client to reach one
//!   ([`Server::wait_for_request`]) instead of sleeping.
//!
//! This is test code: it panics (with `unwrap`, `expect` and `assert`)
//! when its own set-up fails, when a check of what the client sent fails,
//! and when a [`Server`] whose script panicked is dropped. Step functions
//! return `io::Result`, so that a script can end with `?` when the
//! client hangs up.
//!
//! The bytes come from the encoders that the client's decoders are
//! tested against, so a bug shared by an encoder and its decoder would
//! not show here: the exact-bytes tests in [`crate::wire`] and the
//! integration tests against real servers (nbdkit, qemu-nbd, nbd-server)
//! are the independent checks of the format itself.

mod memory;
mod peer;
mod server;

pub use memory::{FakeConfig, Misbehave};
pub use peer::{Export, Hook, Next, Peer, pattern_at};
pub use server::Server;
