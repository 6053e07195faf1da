//! Scripted NBD servers for tests (feature `testkit`), built on this
//! crate's own encoders: [`FakeServer`], an in-memory export with switches
//! for the misbehaviours a client must survive, and [`Peer`], for tests
//! that play the server's side of a handshake step by step.

mod peer;
mod server;

pub use peer::Peer;
pub use server::{FakeConfig, FakeServer, Misbehave};
