//! Harness for the fault tests (`tests/faults.rs`, `tests/faults_peers.rs`):
//!
//! - [`wait_until`]: a bounded poll for a condition, and
//!   [`log_shows_requests`] for one such condition: nbdkit's log filter
//!   shows requests on so many connections;
//! - [`Daemon`]: an nbdkit or qemu-nbd that can be killed with SIGKILL and
//!   started again on the same socket or port.
//!
//! nbdcp itself runs under the shared runner (`run.rs`: [`super::Watched`],
//! [`super::Finished::assert_clean_failure`]); the scripted NBD peers are
//! `nbd::testkit` (`Server`, `Peer`), from the nbdcp-nbd crate.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{LogCommand, parse_nbdkit_log, processes_mentioning, require, spawn_until_pidfile};

/// Poll interval of every bounded wait here.
const POLL: Duration = Duration::from_millis(5);

/// Whether an nbdkit log (`text`) shows `command` requests on at least
/// `connections` different connections.
pub fn log_shows_requests(text: &str, command: &LogCommand, connections: usize) -> bool {
    let mut seen: Vec<u64> = parse_nbdkit_log(text)
        .iter()
        .filter(|e| &e.command == command)
        .map(|e| e.connection)
        .collect();
    seen.sort();
    seen.dedup();
    seen.len() >= connections
}

/// Poll `cond` every 5 ms until it holds; panic with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Panic unless no live process mentions `needle` in its command line.
pub fn assert_nothing_mentions(needle: &Path) {
    let left = processes_mentioning(needle.to_str().unwrap());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

// ---------------------------------------------------------------------
// Servers that can be killed and started again at the same address
// ---------------------------------------------------------------------

/// Where a [`Daemon`] listens.
#[derive(Clone, Debug)]
pub enum Listen {
    /// A Unix socket.
    Unix(PathBuf),
    /// TCP on 127.0.0.1.
    Tcp(u16),
}

impl Listen {
    /// A Unix socket `name` in `dir`.
    pub fn unix(dir: &Path, name: &str) -> Listen {
        Listen::Unix(dir.join(name))
    }

    /// A TCP port on 127.0.0.1 that was free a moment ago.
    pub fn tcp() -> Listen {
        let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        Listen::Tcp(l.local_addr().unwrap().port())
    }

    /// The NBD URI.
    pub fn uri(&self) -> String {
        match self {
            Listen::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/"),
        }
    }
}

/// Which server program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// nbdkit (args: filters, plugin, parameters).
    Nbdkit,
    /// qemu-nbd (args: `-f raw FILE` and options; `-t` is added).
    QemuNbd,
}

/// An NBD server that a test can kill with SIGKILL and start again on the
/// same address, as a crash and a restart would.
pub struct Daemon {
    /// Unique in this test process, for file names.
    id: usize,
    program: Program,
    listen: Listen,
    args: Vec<String>,
    dir: PathBuf,
    log: Option<PathBuf>,
    child: Option<Child>,
    starts: usize,
}

impl Daemon {
    /// Start `program` with `args`, listening at `listen`; pid file, log
    /// and output go to `dir`. With `logged`, nbdkit gets the log filter
    /// outermost (see [`Daemon::log_text`]).
    pub fn start(
        program: Program,
        dir: &Path,
        listen: Listen,
        args: &[&str],
        logged: bool,
    ) -> Daemon {
        require(match program {
            Program::Nbdkit => "nbdkit",
            Program::QemuNbd => "qemu-nbd",
        });
        assert!(
            !logged || program == Program::Nbdkit,
            "only nbdkit has a log filter"
        );
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let id = NEXT.fetch_add(1, Ordering::SeqCst);
        let mut d = Daemon {
            id,
            program,
            listen,
            args: args.iter().map(|s| s.to_string()).collect(),
            dir: dir.to_path_buf(),
            log: logged.then(|| dir.join(format!("server{id}.log"))),
            child: None,
            starts: 0,
        };
        d.restart();
        d
    }

    /// nbdkit with `args`.
    pub fn nbdkit(dir: &Path, listen: Listen, args: &[&str]) -> Daemon {
        Daemon::start(Program::Nbdkit, dir, listen, args, false)
    }

    /// nbdkit with `args` and the log filter.
    pub fn nbdkit_logged(dir: &Path, listen: Listen, args: &[&str]) -> Daemon {
        Daemon::start(Program::Nbdkit, dir, listen, args, true)
    }

    /// qemu-nbd (persistent, up to 8 clients) with `args`.
    pub fn qemu_nbd(dir: &Path, listen: Listen, args: &[&str]) -> Daemon {
        Daemon::start(Program::QemuNbd, dir, listen, args, false)
    }

    /// The NBD URI.
    pub fn uri(&self) -> String {
        self.listen.uri()
    }

    /// The server's pid (panics while it is down).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is down").id()
    }

    /// The log filter's output so far (empty unless logged).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Requests named `name` ("Read", "Write", "Zero", "Flush") in the log.
    pub fn logged(&self, name: &str) -> usize {
        let needle = format!(" {name} id=");
        self.log_text().matches(&needle).count()
    }

    /// Wait until the log shows `command` requests on `connections`
    /// different connections (data flows on every one of them); panic
    /// after `limit`.
    pub fn wait_for_requests(&self, command: LogCommand, connections: usize, limit: Duration) {
        assert!(self.log.is_some(), "only a logged nbdkit can be waited on");
        let what = format!("{command:?} requests on {connections} connection(s)");
        wait_until(&what, limit, || {
            log_shows_requests(&self.log_text(), &command, connections)
        });
    }

    fn pidfile(&self) -> PathBuf {
        self.dir
            .join(format!("server{}.{}.pid", self.id, self.starts))
    }

    fn outfile(&self) -> PathBuf {
        self.dir.join(format!("server{}.out", self.id))
    }

    /// What the server wrote to stdout and stderr, over all its starts.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.outfile()).unwrap_or_default()
    }

    fn argv(&self) -> Vec<String> {
        let pidfile = self.pidfile().display().to_string();
        let mut argv: Vec<String> = Vec::new();
        match (self.program, &self.listen) {
            (Program::Nbdkit, listen) => {
                argv.push("nbdkit".into());
                match listen {
                    Listen::Unix(p) => argv.extend(["-U".into(), p.display().to_string()]),
                    Listen::Tcp(port) => argv.extend([
                        "-i".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                    ]),
                }
                argv.extend([
                    "-P".into(),
                    pidfile,
                    "-f".into(),
                    "--exit-with-parent".into(),
                ]);
                if self.log.is_some() {
                    argv.push("--filter=log".into());
                }
                argv.extend(self.args.iter().cloned());
                if let Some(log) = &self.log {
                    argv.push(format!("logfile={}", log.display()));
                    argv.push("logappend=true".into());
                }
            }
            (Program::QemuNbd, listen) => {
                argv.push("qemu-nbd".into());
                match listen {
                    Listen::Unix(p) => argv.extend(["-k".into(), p.display().to_string()]),
                    Listen::Tcp(port) => argv.extend([
                        "-b".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                    ]),
                }
                argv.extend([
                    "--pid-file".into(),
                    pidfile,
                    "-t".into(),
                    "-e".into(),
                    "8".into(),
                ]);
                argv.extend(self.args.iter().cloned());
            }
        }
        argv
    }

    /// Start the server (again) at the same address and wait until it
    /// listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server is already running");
        if let Listen::Unix(p) = &self.listen {
            // A server killed with SIGKILL leaves its socket file behind.
            let _ = std::fs::remove_file(p);
        }
        self.starts += 1;
        let argv = self.argv();
        let pidfile = self.pidfile();
        let _ = std::fs::remove_file(&pidfile);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.outfile())
            .unwrap();
        let child = spawn_until_pidfile(&argv, out, libc::SIGKILL, &pidfile, || self.output())
            .unwrap_or_else(|e| panic!("{e}"));
        self.child = Some(child);
    }

    /// Kill the server with SIGKILL, as a crash would, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
