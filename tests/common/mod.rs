//! Shared harness for integration tests that run REAL NBD servers.
//!
//! Use it from a test file with `mod common;` and then, for example:
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn copies_from_nbdkit() {
//!     require("nbdkit");
//!     let dir = tempfile::tempdir().unwrap();
//!     let out = dir.path().join("out.img");
//!     let server = Server::nbdkit(&["memory", "1M"]);
//!     let status = nbdcp().arg(server.uri()).arg(&out).status().unwrap();
//!     assert!(status.success());
//! }
//! ```
//!
//! Servers are started per test and killed and reaped when the [`Server`]
//! is dropped. Readiness is detected (pid files, connect polls), never
//! waited for with fixed sleeps. A missing server program makes the test
//! FAIL via [`require`]; it never passes silently.

// Each test binary uses a different part of the harness.
#![allow(dead_code, unused_imports)]

mod extra;
pub use extra::*;
mod faults;
pub use faults::*;
mod image;
mod nbdkit_log;
mod server;

pub use image::*;
pub use nbdkit_log::*;
pub use server::*;

use std::path::PathBuf;
use std::process::Command;

/// The nbdcp binary built for this test run.
pub fn nbdcp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nbdcp"))
}

/// A `Command` for the nbdcp binary, with `RUST_LOG` cleared so that a
/// developer's environment does not change what tests see on stderr.
pub fn nbdcp() -> Command {
    let mut cmd = Command::new(nbdcp_bin());
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Fail the test, with the package to install, if `tool` is not on PATH.
pub fn require(tool: &str) {
    if which(tool).is_none() {
        let package = match tool {
            "nbdkit" => "nbdkit",
            "qemu-nbd" | "qemu-img" | "qemu-io" => "qemu-utils",
            "nbd-server" => "nbd-server",
            "nbdcopy" | "nbdinfo" | "nbdsh" => "libnbd-bin",
            other => other,
        };
        panic!("{tool} is not installed: apt-get install {package}");
    }
}

/// The full path of `tool` if it is an executable file on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
