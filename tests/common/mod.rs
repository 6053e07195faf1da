//! Shared harness for the integration tests: nbdcp is run and judged
//! one way everywhere (`run.rs`: [`run`], [`run_ok`], [`Nbdcp`],
//! [`Finished::assert_ok`], [`Finished::assert_clean_failure`]), against
//! REAL NBD servers (`server.rs`, `faults.rs`) or scripted peers
//! (`nbd::testkit`), on images made here (`image.rs`, [`mixed`],
//! [`garbage`]).
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
//!     let dir = tmp();
//!     let out = dir.path().join("out.img");
//!     let server = Server::nbdkit(&["memory", "1M"]);
//!     run_ok(&[&server.uri(), s(&out)]);
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
mod run;
mod server;
#[cfg(feature = "tls")]
pub mod tls;

pub use image::*;
pub use nbdkit_log::*;
pub use run::*;
pub use server::*;

use std::path::{Path, PathBuf};

/// The nbdcp binary built for this test run (run it with [`Nbdcp`]).
pub fn nbdcp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nbdcp"))
}

/// A plain `Command` for the binary, `RUST_LOG` cleared, for the few tests
/// that must drive the process themselves (a pty, their own pipes); the
/// rest use [`Nbdcp`] and its checkers.
pub fn nbdcp() -> std::process::Command {
    let mut cmd = std::process::Command::new(nbdcp_bin());
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A path as the `&str` a command line takes (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A fresh temporary directory with a short, recognisable name (and a
/// unique path, so that [`assert_nothing_mentions`] can look for it).
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nbdcp-test-")
        .tempdir()
        .unwrap()
}

/// A [`mixed_image`] (data, allocated zeroes, holes) of `size` bytes at
/// `dir/name`, with its layout.
pub fn mixed(dir: &Path, name: &str, size: u64, seed: u64) -> (PathBuf, Vec<Segment>) {
    let path = dir.join(name);
    let segments = mixed_image(&path, size, seed);
    (path, segments)
}

/// A file of `size` bytes of 0xEE at `dir/name`: a destination whose old
/// contents must all be overwritten (holes and zeroes included) for a
/// copy to compare equal.
pub fn garbage(dir: &Path, name: &str, size: u64) -> PathBuf {
    use std::io::Write;
    const MIB: usize = 1 << 20;
    let path = dir.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let block = vec![0xEEu8; MIB];
    for _ in 0..size / MIB as u64 {
        f.write_all(&block).unwrap();
    }
    f.write_all(&block[..(size % MIB as u64) as usize]).unwrap();
    f.flush().unwrap();
    path
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
