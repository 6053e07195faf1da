//! Harness for the fault tests (`tests/faults.rs`, `tests/faults_peers.rs`):
//!
//! - [`Watched`]: nbdcp run as a child with a hang watchdog, its peak
//!   memory (from `wait4`'s rusage, plus a live RSS cap that kills a run
//!   allocating without bound), its exit status and its stderr;
//! - [`Finished::assert_clean_failure`]: the shape every failure must have
//!   (status 1, one `nbdcp: ` line naming the endpoint, no panic);
//! - [`Daemon`]: an nbdkit or qemu-nbd that can be killed with SIGKILL and
//!   started again on the same socket or port;
//! - [`Peer`]: a scripted NBD "server" on a Unix socket, a thread per
//!   connection, written with the wire helpers below, for peers that break
//!   the protocol in exactly one way.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{nbdcp, process_exists, processes_mentioning, require, spawn_until_pidfile};

/// A run still going after this long is a hang: killed, and the test fails.
pub const HANG_DEADLINE: Duration = Duration::from_secs(20);

/// nbdcp is killed (and the test fails) if its resident set ever exceeds
/// this: a peer has made it allocate without bound.
pub const RSS_KILL_KIB: u64 = 512 * 1024;

/// Peak resident set a failing run may reach. A normal copy at -C 1 needs
/// well under 64 MiB; -C 4 with the default 16 MiB queue about 100 MiB.
pub const RSS_LIMIT_KIB: u64 = 256 * 1024;

/// Address space limit (`RLIMIT_AS`) for nbdcp runs without server
/// subprocesses. nbdcp normally maps well under 1 GiB (-C 4: about
/// 700 MiB, mostly malloc arenas and thread stacks); a 4 GiB allocation
/// caused by a length a peer sent fails under this limit, so nbdcp aborts
/// loudly instead of the allocation going unnoticed because its pages
/// were never touched.
pub const ADDRESS_SPACE_LIMIT: u64 = 4 << 30;

/// Poll interval of every bounded wait here.
const POLL: Duration = Duration::from_millis(5);

/// A temporary directory with a short, recognisable name.
pub fn fault_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nbdcp-fault-")
        .tempdir()
        .unwrap()
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

// ---------------------------------------------------------------------
// Watched nbdcp runs
// ---------------------------------------------------------------------

/// How a watched nbdcp run ended.
#[derive(Debug)]
pub struct Finished {
    /// The arguments, for messages.
    pub args: Vec<String>,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// From spawn to exit.
    pub elapsed: Duration,
    /// Peak resident set in KiB: `VmHWM`, sampled every few milliseconds
    /// while it ran. (`wait4`'s `ru_maxrss` is no use: Linux counts the
    /// test process's own memory at the fork in it.)
    pub max_rss_kib: u64,
    /// Peak virtual size in KiB (`VmPeak`, sampled likewise).
    pub max_vm_kib: u64,
    /// Its process id (reaped by now).
    pub pid: u32,
}

/// An nbdcp child being watched.
pub struct Watched {
    args: Vec<String>,
    child: Child,
    pid: libc::pid_t,
    started: Instant,
    stderr: Option<JoinHandle<Vec<u8>>>,
    /// Raw wait status, once reaped.
    exited: Option<libc::c_int>,
    /// Highest `VmHWM` and `VmPeak` seen, in KiB.
    max_rss_kib: u64,
    max_vm_kib: u64,
}

impl Watched {
    /// Start nbdcp with `args`, stdin and stdout on /dev/null, stderr
    /// collected, and (unless it starts servers of its own, which would
    /// inherit it) [`ADDRESS_SPACE_LIMIT`].
    pub fn spawn(args: &[&str]) -> Watched {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut cmd = nbdcp();
        if !args.iter().any(|a| a == "[") {
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: ADDRESS_SPACE_LIMIT,
                        rlim_max: ADDRESS_SPACE_LIMIT,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nbdcp {args:?}: {e}"));
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            v
        });
        Watched {
            args,
            pid: child.id() as libc::pid_t,
            child,
            started: Instant::now(),
            stderr: Some(stderr),
            exited: None,
            max_rss_kib: 0,
            max_vm_kib: 0,
        }
    }

    /// nbdcp's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Time since it was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Reap it if it has exited; true while it runs. Samples its memory
    /// and enforces [`RSS_KILL_KIB`].
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        // Sample first: the high-water marks are gone once it is reaped.
        let memory = memory_kib(self.pid as u32);
        if let Some((hwm, peak, _)) = memory {
            self.max_rss_kib = self.max_rss_kib.max(hwm);
            self.max_vm_kib = self.max_vm_kib.max(peak);
        }
        let mut status = 0;
        // SAFETY: plain system call on our own child.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if r == self.pid {
            self.exited = Some(status);
            return false;
        }
        assert!(
            r == 0,
            "waitpid({}) failed: {}",
            self.pid,
            io::Error::last_os_error()
        );
        if let Some((_, _, rss)) = memory {
            if rss > RSS_KILL_KIB {
                self.kill_and_reap();
                let stderr = self.take_stderr();
                panic!(
                    "nbdcp {:?} reached a resident set of {} MiB: unbounded allocation \
                     (killed); stderr: {stderr}",
                    self.args,
                    rss / 1024,
                );
            }
        }
        true
    }

    /// Send `sig` to nbdcp.
    pub fn signal(&self, sig: libc::c_int) {
        if self.exited.is_none() {
            // SAFETY: our unreaped child.
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    fn kill_and_reap(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let mut status = 0;
            // SAFETY: plain system call on our own child.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
            self.exited = Some(status);
        }
    }

    fn take_stderr(&mut self) -> String {
        let bytes = self
            .stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Wait for it to end; if it is still running `limit` after it was
    /// started it is killed and the test fails as hung.
    pub fn wait(mut self, limit: Duration) -> Finished {
        while self.is_running() {
            if self.started.elapsed() > limit {
                self.kill_and_reap();
                let stderr = self.take_stderr();
                panic!(
                    "nbdcp {:?} still running after {limit:?}: hung (killed); stderr so far:\n{stderr}",
                    self.args,
                );
            }
            std::thread::sleep(POLL);
        }
        let elapsed = self.started.elapsed();
        let status = self.exited.unwrap();
        let stderr = self.take_stderr();
        Finished {
            args: self.args.clone(),
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            stderr,
            elapsed,
            max_rss_kib: self.max_rss_kib,
            max_vm_kib: self.max_vm_kib,
            pid: self.pid as u32,
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // A test that panicked half way must not leave nbdcp running.
        self.kill_and_reap();
    }
}

/// Run nbdcp with `args` under the watchdog ([`HANG_DEADLINE`]).
pub fn run_watched(args: &[&str]) -> Finished {
    Watched::spawn(args).wait(HANG_DEADLINE)
}

/// `VmHWM`, `VmPeak` and `VmRSS` of `pid` in KiB, while it runs.
fn memory_kib(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmHWM:")?, field("VmPeak:")?, field("VmRSS:")?))
}

impl Finished {
    /// The single line starting with `nbdcp: `, checking there is exactly
    /// one and that it is the last line.
    pub fn error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.is_empty()).collect();
        let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("nbdcp: ")).collect();
        assert_eq!(
            errors.len(),
            1,
            "nbdcp {:?}: expected exactly one `nbdcp: ` line, stderr:\n{}",
            self.args,
            self.stderr
        );
        assert_eq!(
            lines.last(),
            errors.first().copied(),
            "nbdcp {:?}: the error must be the last line, stderr:\n{}",
            self.args,
            self.stderr
        );
        errors[0]
    }

    /// Assert the run failed the way every fault must end: exit status 1
    /// (not a signal), no panic text, within `HANG_DEADLINE`, one
    /// `nbdcp: ` line naming `endpoint`, and, when `only_line`, nothing
    /// else on stderr (with retries on, `[WARN ]` retry lines may precede
    /// it). Peak memory is checked against [`RSS_LIMIT_KIB`]. Returns the
    /// error line.
    pub fn assert_clean_failure(&self, endpoint: &str, only_line: bool) -> &str {
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "nbdcp {:?} panicked:\n{}",
            self.args,
            self.stderr
        );
        assert_eq!(
            (self.code, self.signal),
            (Some(1), None),
            "nbdcp {:?} should exit with status 1; stderr:\n{}",
            self.args,
            self.stderr
        );
        let line = self.error_line();
        // Shown with --nocapture, to review the messages.
        eprintln!(
            "[{:.2?}, {} MiB] {line}",
            self.elapsed,
            self.max_rss_kib / 1024
        );
        assert!(
            line.starts_with(&format!("nbdcp: {endpoint}")) || line.contains(endpoint),
            "nbdcp {:?}: the error should name {endpoint}: {line}",
            self.args
        );
        if only_line {
            assert_eq!(
                self.stderr.trim_end().lines().count(),
                1,
                "nbdcp {:?}: expected one line on stderr, got:\n{}",
                self.args,
                self.stderr
            );
        } else {
            for l in self.stderr.lines().filter(|l| !l.starts_with("nbdcp: ")) {
                assert!(
                    l.starts_with("[WARN ]"),
                    "nbdcp {:?}: unexpected stderr line {l:?} in:\n{}",
                    self.args,
                    self.stderr
                );
            }
        }
        self.assert_memory_bounded();
        assert!(
            !process_exists(self.pid),
            "nbdcp (pid {}) still exists after it was reaped",
            self.pid
        );
        line
    }

    /// Assert a successful run (status 0, no error line).
    pub fn assert_success(&self) {
        assert_eq!(
            (self.code, self.signal),
            (Some(0), None),
            "nbdcp {:?} should succeed; stderr:\n{}",
            self.args,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "nbdcp {:?} panicked:\n{}",
            self.args,
            self.stderr
        );
        assert!(
            !self.stderr.lines().any(|l| l.starts_with("nbdcp: ")),
            "nbdcp {:?} succeeded but printed an error:\n{}",
            self.args,
            self.stderr
        );
    }

    /// Assert the peak resident set stayed under [`RSS_LIMIT_KIB`], and
    /// that nbdcp was not killed by an allocation failure.
    pub fn assert_memory_bounded(&self) {
        assert!(
            self.signal.is_none() && !self.stderr.contains("memory allocation"),
            "nbdcp {:?} died (allocation failure under the {} GiB address space limit?):\n{}",
            self.args,
            ADDRESS_SPACE_LIMIT >> 30,
            self.stderr
        );
        assert!(
            self.max_rss_kib < RSS_LIMIT_KIB,
            "nbdcp {:?} peaked at {} MiB of memory (limit {} MiB); stderr:\n{}",
            self.args,
            self.max_rss_kib / 1024,
            RSS_LIMIT_KIB / 1024,
            self.stderr
        );
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

// ---------------------------------------------------------------------
// Scripted NBD peers
// ---------------------------------------------------------------------

/// NBD wire constants the peers need.
pub mod nbd {
    pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
    pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    pub const REP_ACK: u32 = 1;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;

    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    pub const TFLAG_HAS_FLAGS: u16 = 1;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
    pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    pub const REPLY_FLAG_DONE: u16 = 1;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

    pub const EIO: u32 = 5;

    /// The context id peers give base:allocation.
    pub const BASE_ALLOCATION_ID: u32 = 1;
}

/// What a scripted peer advertises.
#[derive(Clone, Debug)]
pub struct Export {
    /// Export size.
    pub size: u64,
    /// Transmission flags (HAS_FLAGS is added).
    pub flags: u16,
    /// Agree to structured replies.
    pub structured: bool,
    /// Offer base:allocation (needs `structured`).
    pub base_allocation: bool,
    /// NBD_INFO_BLOCK_SIZE to send: minimum, preferred, maximum.
    pub block_size: Option<(u32, u32, u32)>,
}

impl Export {
    /// A writable export of `size` bytes with structured replies,
    /// base:allocation, flush, trim, write zeroes and multi-conn.
    pub fn new(size: u64) -> Export {
        Export {
            size,
            flags: nbd::TFLAG_SEND_FLUSH
                | nbd::TFLAG_SEND_TRIM
                | nbd::TFLAG_SEND_WRITE_ZEROES
                | nbd::TFLAG_CAN_MULTI_CONN,
            structured: true,
            base_allocation: true,
            block_size: None,
        }
    }

    /// Without structured replies (and so without base:allocation).
    pub fn simple(mut self) -> Export {
        self.structured = false;
        self.base_allocation = false;
        self
    }

    /// Without base:allocation.
    pub fn no_extents(mut self) -> Export {
        self.base_allocation = false;
        self
    }
}

/// One request as the peer read it.
#[derive(Clone, Debug)]
pub struct Req {
    /// Command flags.
    pub flags: u16,
    /// `nbd::CMD_*`.
    pub command: u16,
    /// Cookie (handle).
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub length: u32,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Send the newstyle greeting and read the client's flags.
pub fn greet(s: &mut UnixStream) -> io::Result<()> {
    let mut g = Vec::new();
    g.extend_from_slice(nbd::NBDMAGIC);
    g.extend_from_slice(&nbd::IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(nbd::FLAG_FIXED_NEWSTYLE | nbd::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)
}

/// Read one option: its number and data (refusing more than 64 KiB, so a
/// broken client cannot make the peer allocate either).
pub fn read_option(s: &mut UnixStream) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    if be64(&h) != nbd::IHAVEOPT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad option magic",
        ));
    }
    let (opt, len) = (be32(&h[8..]), be32(&h[12..]));
    if len > 65536 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "option too long",
        ));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((opt, data))
}

/// An option reply header claiming `length` bytes of data, followed by
/// `data` (which may be shorter, for lying peers).
pub fn option_reply_raw(
    s: &mut UnixStream,
    opt: u32,
    rtype: u32,
    length: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&nbd::OPT_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&length.to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// An option reply with `data`.
pub fn option_reply(s: &mut UnixStream, opt: u32, rtype: u32, data: &[u8]) -> io::Result<()> {
    option_reply_raw(s, opt, rtype, data.len() as u32, data)
}

/// NBD_INFO_EXPORT payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut p = nbd::INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&(flags | nbd::TFLAG_HAS_FLAGS).to_be_bytes());
    p
}

/// Answer options until NBD_OPT_GO (true: transmission starts) or
/// NBD_OPT_ABORT / end of file (false).
pub fn negotiate(s: &mut UnixStream, e: &Export) -> io::Result<bool> {
    greet(s)?;
    let mut structured = false;
    loop {
        let (opt, data) = match read_option(s) {
            Ok(o) => o,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(err) => return Err(err),
        };
        match opt {
            nbd::OPT_STRUCTURED_REPLY if e.structured => {
                structured = true;
                option_reply(s, opt, nbd::REP_ACK, &[])?;
            }
            nbd::OPT_SET_META_CONTEXT if structured && e.base_allocation => {
                let asked = String::from_utf8_lossy(&data).contains("base:allocation");
                if asked {
                    let mut p = nbd::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    p.extend_from_slice(b"base:allocation");
                    option_reply(s, opt, nbd::REP_META_CONTEXT, &p)?;
                }
                option_reply(s, opt, nbd::REP_ACK, &[])?;
            }
            nbd::OPT_GO => {
                option_reply(s, opt, nbd::REP_INFO, &info_export(e.size, e.flags))?;
                if let Some((min, pref, max)) = e.block_size {
                    let mut p = nbd::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    p.extend_from_slice(&min.to_be_bytes());
                    p.extend_from_slice(&pref.to_be_bytes());
                    p.extend_from_slice(&max.to_be_bytes());
                    option_reply(s, opt, nbd::REP_INFO, &p)?;
                }
                option_reply(s, opt, nbd::REP_ACK, &[])?;
                return Ok(true);
            }
            nbd::OPT_ABORT => {
                let _ = option_reply(s, opt, nbd::REP_ACK, &[]);
                return Ok(false);
            }
            _ => option_reply(s, opt, nbd::REP_ERR_UNSUP, &[])?,
        }
    }
}

/// Read one request; `None` at end of file. A write's payload is read and
/// returned.
pub fn read_request(s: &mut UnixStream) -> io::Result<Option<(Req, Vec<u8>)>> {
    let mut h = [0u8; 28];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(e),
    }
    if be32(&h) != nbd::REQUEST_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request magic",
        ));
    }
    let r = Req {
        flags: be16(&h[4..]),
        command: be16(&h[6..]),
        cookie: be64(&h[8..]),
        offset: be64(&h[16..]),
        length: be32(&h[24..]),
    };
    let mut payload = Vec::new();
    if r.command == nbd::CMD_WRITE {
        if r.length > 64 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "write too long"));
        }
        payload = vec![0u8; r.length as usize];
        s.read_exact(&mut payload)?;
    }
    Ok(Some((r, payload)))
}

/// A simple reply, followed by `data` for a successful read.
pub fn simple_reply(s: &mut UnixStream, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&nbd::SIMPLE_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// A structured reply chunk header claiming `length` payload bytes,
/// followed by `payload` (which may be shorter, for lying peers).
pub fn chunk_raw(
    s: &mut UnixStream,
    cookie: u64,
    flags: u16,
    ctype: u16,
    length: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + payload.len());
    m.extend_from_slice(&nbd::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&ctype.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&length.to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m)
}

/// A structured reply chunk with `payload`.
pub fn chunk(
    s: &mut UnixStream,
    cookie: u64,
    flags: u16,
    ctype: u16,
    payload: &[u8],
) -> io::Result<()> {
    chunk_raw(s, cookie, flags, ctype, payload.len() as u32, payload)
}

/// OFFSET_DATA payload.
pub fn offset_data(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

/// OFFSET_HOLE payload.
pub fn offset_hole(offset: u64, length: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&length.to_be_bytes());
    p
}

/// ERROR chunk payload (`msg_len` is what the chunk claims; pass
/// `msg.len()` for an honest one).
pub fn error_payload(errno: u32, msg_len: u16, msg: &[u8]) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&msg_len.to_be_bytes());
    p.extend_from_slice(msg);
    p
}

/// BLOCK_STATUS payload for base:allocation.
pub fn block_status_payload(extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = nbd::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for (len, flags) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    p
}

/// What nbdkit's pattern plugin holds at `[offset, offset + len)`: each
/// 8-byte big-endian word is its own offset.
pub fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let at = offset + i;
            (at & !7).to_be_bytes()[(at & 7) as usize]
        })
        .collect()
}

/// What a fault hook did with a request.
pub enum Hook {
    /// Not handled: answer it normally.
    Pass,
    /// Handled (the hook sent whatever it wanted).
    Done,
    /// Hang up now.
    Close,
    /// Stop answering, but keep the connection open until the client goes.
    Stall,
}

/// Serve requests on a negotiated connection as a well-behaved read-write
/// server of the pattern (writes are accepted and dropped), letting `hook`
/// take over any request first. `n` counts requests on this connection.
pub fn serve(
    s: &mut UnixStream,
    e: &Export,
    hook: &dyn Fn(&mut UnixStream, &Req, usize) -> io::Result<Hook>,
) -> io::Result<()> {
    let mut n = 0;
    while let Some((r, _payload)) = read_request(s)? {
        n += 1;
        match hook(s, &r, n)? {
            Hook::Done => continue,
            Hook::Close => return Ok(()),
            Hook::Stall => {
                drain(s);
                return Ok(());
            }
            Hook::Pass => {}
        }
        match r.command {
            nbd::CMD_DISC => return Ok(()),
            nbd::CMD_READ => {
                let data = pattern_at(r.offset, r.length as usize);
                if e.structured {
                    chunk(
                        s,
                        r.cookie,
                        nbd::REPLY_FLAG_DONE,
                        nbd::REPLY_TYPE_OFFSET_DATA,
                        &offset_data(r.offset, &data),
                    )?;
                } else {
                    simple_reply(s, r.cookie, 0, &data)?;
                }
            }
            nbd::CMD_BLOCK_STATUS => {
                chunk(
                    s,
                    r.cookie,
                    nbd::REPLY_FLAG_DONE,
                    nbd::REPLY_TYPE_BLOCK_STATUS,
                    &block_status_payload(&[(r.length, 0)]),
                )?;
            }
            _ => simple_reply(s, r.cookie, 0, &[])?,
        }
    }
    Ok(())
}

/// Read and drop everything until the client hangs up (a peer that has
/// stopped answering but keeps the connection open).
pub fn drain(s: &mut UnixStream) {
    let mut buf = [0u8; 65536];
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

type Script = dyn Fn(&mut UnixStream, usize) -> io::Result<()> + Send + Sync;

/// A scripted peer listening on a Unix socket in its own directory: every
/// connection runs the script on its own thread.
pub struct Peer {
    dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Peer {
    /// A peer that sends `bytes` on every connection, then reads and drops
    /// whatever comes until the client hangs up.
    pub fn sends_then_waits(bytes: Vec<u8>) -> Peer {
        Peer::start(move |s, _| {
            s.write_all(&bytes)?;
            drain(s);
            Ok(())
        })
    }

    /// Listen and run `script(stream, connection_number)` (from 1) for
    /// every connection.
    pub fn start(
        script: impl Fn(&mut UnixStream, usize) -> io::Result<()> + Send + Sync + 'static,
    ) -> Peer {
        let dir = fault_dir();
        let socket = dir.path().join("peer.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let acceptor = {
            let (stop, connections, errors) = (stop.clone(), connections.clone(), errors.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let n = connections.fetch_add(1, Ordering::SeqCst) + 1;
                            s.set_nonblocking(false).unwrap();
                            // Never let a peer thread outlive a test by much.
                            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                            s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                            let (script, errors) = (script.clone(), errors.clone());
                            std::thread::spawn(move || {
                                if let Err(e) = script(&mut s, n) {
                                    // Expected for most peers: nbdcp hangs
                                    // up on them. Kept for debugging.
                                    errors.lock().unwrap().push(format!("connection {n}: {e}"));
                                }
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(POLL);
                        }
                        Err(e) => panic!("peer accept: {e}"),
                    }
                }
            })
        };
        Peer {
            dir,
            socket,
            stop,
            connections,
            errors,
            acceptor: Some(acceptor),
        }
    }

    /// A peer that negotiates `export` and then serves it with `hook`.
    pub fn nbd(
        export: Export,
        hook: impl Fn(&mut UnixStream, &Req, usize) -> io::Result<Hook> + Send + Sync + 'static,
    ) -> Peer {
        Peer::start(move |s, _| {
            if negotiate(s, &export)? {
                serve(s, &export, &hook)?;
            }
            Ok(())
        })
    }

    /// `nbd+unix:///?socket=...`
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The directory holding the socket (only nbdcp mentions it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Errors the script threads returned (usually nbdcp hanging up).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}
