//! The one way tests run nbdcp and judge how it ended:
//!
//! - [`Nbdcp`]: a run being set up (stdin bytes, where stdout goes,
//!   environment, a wrapper command such as `setpriv`, a deadline), then
//!   spawned as a [`Watched`] child with a hang watchdog, a live memory
//!   cap and (unless it starts servers of its own) an address space limit;
//!   [`run`], [`run_ok`] and [`run_watched`] are the short forms;
//! - [`Finished`]: how it ended (status, stdout, stderr, time, peak
//!   memory), with the checks every test uses:
//!   [`Finished::assert_ok`] (status 0, stderr empty unless verbose) and
//!   [`Finished::assert_clean_failure`] (status 1, exactly one line on
//!   stderr, `nbdcp: ` naming the endpoint, no panic), with
//!   [`Finished::assert_failure`] for another status and
//!   [`Finished::assert_clean_failure_after_retries`] for runs with
//!   retries on, whose `[WARN ]` retry lines come first.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{nbdcp_bin, process_exists};

/// A fault-test run still going after this long is a hang: killed, and
/// the test fails.
pub const HANG_DEADLINE: Duration = Duration::from_secs(20);

/// Longest any other single nbdcp run may take before it is declared
/// hung, killed, and the test failed.
pub const NBDCP_DEADLINE: Duration = Duration::from_secs(60);

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

/// Poll interval of the watchdog.
const POLL: Duration = Duration::from_millis(5);

/// Where a run's stdout goes.
enum Stdout {
    Capture,
    File(File),
}

/// An nbdcp run being set up.
pub struct Nbdcp {
    args: Vec<String>,
    /// The arguments byte for byte, when they are not all UTF-8 (`args`
    /// then holds them lossily, for messages).
    raw_args: Option<Vec<std::ffi::OsString>>,
    /// Given to nbdcp as its file descriptor 3.
    fd3: Option<File>,
    stdin: Option<Vec<u8>>,
    stdin_piece: usize,
    stdout: Stdout,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    deadline: Duration,
}

impl Nbdcp {
    /// nbdcp with `args`, stdin from /dev/null, stdout and stderr
    /// collected, `RUST_LOG` cleared (so that a developer's environment
    /// does not change what tests see), [`NBDCP_DEADLINE`].
    pub fn new(args: &[&str]) -> Nbdcp {
        Nbdcp {
            args: args.iter().map(|s| s.to_string()).collect(),
            raw_args: None,
            fd3: None,
            stdin: None,
            stdin_piece: usize::MAX,
            stdout: Stdout::Capture,
            env: Vec::new(),
            wrapper: Vec::new(),
            deadline: NBDCP_DEADLINE,
        }
    }

    /// nbdcp with arguments that need not be UTF-8 (file names), passed
    /// byte for byte.
    pub fn new_os<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Nbdcp {
        let lossy: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let lossy: Vec<&str> = lossy.iter().map(String::as_str).collect();
        let mut run = Nbdcp::new(&lossy);
        run.raw_args = Some(args.iter().map(|a| a.as_ref().to_os_string()).collect());
        run
    }

    /// Feed `bytes` to stdin (from a helper thread; nbdcp may stop
    /// reading early when it fails).
    pub fn stdin(mut self, bytes: &[u8]) -> Nbdcp {
        self.stdin = Some(bytes.to_vec());
        self
    }

    /// Feed stdin like [`Nbdcp::stdin`], in writes of `piece` bytes (odd
    /// sizes make nbdcp's reads see partial buffers).
    pub fn stdin_in_pieces(mut self, bytes: &[u8], piece: usize) -> Nbdcp {
        self.stdin = Some(bytes.to_vec());
        self.stdin_piece = piece;
        self
    }

    /// Give nbdcp `file` as its file descriptor 3 (`--progress=json:3`).
    pub fn fd3(mut self, file: File) -> Nbdcp {
        self.fd3 = Some(file);
        self
    }

    /// Send stdout to `file` instead of collecting it.
    pub fn stdout(mut self, file: File) -> Nbdcp {
        self.stdout = Stdout::File(file);
        self
    }

    /// Set an environment variable (`RUST_LOG` makes the run verbose).
    pub fn env(mut self, key: &str, value: &str) -> Nbdcp {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Run nbdcp through `wrapper` (for example `setpriv --reuid=...
    /// --`), which must exec it with the arguments that follow.
    pub fn via(mut self, wrapper: &[&str]) -> Nbdcp {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Kill the run and fail the test as hung after `limit`.
    pub fn deadline(mut self, limit: Duration) -> Nbdcp {
        self.deadline = limit;
        self
    }

    /// Start it.
    pub fn spawn(self) -> Watched {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(nbdcp_bin());
                c
            }
            None => Command::new(nbdcp_bin()),
        };
        cmd.env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Servers nbdcp starts ([ CMD ]) would inherit the limit.
        if !self.args.iter().any(|a| a == "[") {
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
        let verbose = self.env.iter().any(|(k, _)| k == "RUST_LOG")
            || self.args.iter().any(|a| {
                a == "--verbose" || (a.starts_with("-v") && a[1..].chars().all(|c| c == 'v'))
            });
        if let Some(file) = &self.fd3 {
            use std::os::fd::AsRawFd;
            let raw = file.as_raw_fd();
            // SAFETY: dup2 and fcntl are async-signal-safe; `file` outlives
            // the spawn below.
            unsafe {
                cmd.pre_exec(move || {
                    if raw == 3 {
                        let flags = libc::fcntl(3, libc::F_GETFD);
                        libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                    } else if libc::dup2(raw, 3) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        match &self.raw_args {
            Some(raw) => cmd.args(raw),
            None => cmd.args(&self.args),
        }
        .stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
        let capture = match self.stdout {
            Stdout::Capture => {
                cmd.stdout(Stdio::piped());
                true
            }
            Stdout::File(f) => {
                cmd.stdout(f);
                false
            }
        };
        let args = self.args;
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nbdcp {args:?}: {e}"));
        if let Some(data) = self.stdin {
            let mut pipe = child.stdin.take().unwrap();
            let piece = self.stdin_piece;
            std::thread::spawn(move || {
                // nbdcp may legitimately stop reading (it failed): stop
                // at EPIPE, the exit status tells.
                for chunk in data.chunks(piece) {
                    if pipe.write_all(chunk).is_err() {
                        break;
                    }
                }
            });
        }
        let stdout = capture.then(|| {
            let mut pipe = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = pipe.read_to_end(&mut v);
                // Asked once nbdcp is done with the pipe.
                use std::os::fd::AsRawFd;
                // SAFETY: F_GETPIPE_SZ only reads the pipe's capacity.
                let capacity = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
                (v, capacity)
            })
        });
        // Stderr is kept as it comes, so that a test can watch it live.
        let so_far = Arc::new(Mutex::new(Vec::new()));
        let stderr = {
            let (mut pipe, so_far) = (child.stderr.take().unwrap(), so_far.clone());
            Some(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    so_far.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }))
        };
        Watched {
            args,
            verbose,
            pid: child.id() as libc::pid_t,
            child,
            started: Instant::now(),
            deadline: self.deadline,
            stdout,
            stderr,
            stderr_so_far: so_far,
            exited: None,
            max_rss_kib: 0,
            max_vm_kib: 0,
        }
    }

    /// Start it and wait for it to end.
    pub fn run(self) -> Finished {
        let deadline = self.deadline;
        self.spawn().wait(deadline)
    }
}

/// Run nbdcp with `args` ([`NBDCP_DEADLINE`]).
pub fn run(args: &[&str]) -> Finished {
    Nbdcp::new(args).run()
}

/// Run nbdcp with `args` and check it succeeded ([`Finished::assert_ok`]).
pub fn run_ok(args: &[&str]) -> Finished {
    let done = run(args);
    done.assert_ok();
    done
}

/// Run nbdcp with `args` under the fault tests' watchdog
/// ([`HANG_DEADLINE`]).
pub fn run_watched(args: &[&str]) -> Finished {
    Nbdcp::new(args).deadline(HANG_DEADLINE).run()
}

/// An nbdcp child being watched.
pub struct Watched {
    args: Vec<String>,
    verbose: bool,
    child: Child,
    pid: libc::pid_t,
    started: Instant,
    deadline: Duration,
    /// The thread collecting stdout, and the pipe's capacity at the end.
    stdout: Option<JoinHandle<(Vec<u8>, i32)>>,
    /// The thread collecting stderr into `stderr_so_far`.
    stderr: Option<JoinHandle<()>>,
    stderr_so_far: Arc<Mutex<Vec<u8>>>,
    /// Raw wait status, once reaped.
    exited: Option<libc::c_int>,
    /// Highest `VmHWM` and `VmPeak` seen, in KiB.
    max_rss_kib: u64,
    max_vm_kib: u64,
}

impl Watched {
    /// Start nbdcp with `args` under the fault tests' watchdog (see
    /// [`Nbdcp`] for more settings).
    pub fn spawn(args: &[&str]) -> Watched {
        Nbdcp::new(args).deadline(HANG_DEADLINE).spawn()
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
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        let bytes = std::mem::take(&mut *self.stderr_so_far.lock().unwrap());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// What it has written to stderr so far, while it runs.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr_so_far.lock().unwrap()).into_owned()
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
        let (stdout, stdout_pipe_capacity) = match self.stdout.take() {
            Some(t) => {
                let (v, c) = t.join().unwrap_or_default();
                (v, Some(c))
            }
            None => (Vec::new(), None),
        };
        Finished {
            args: self.args.clone(),
            verbose: self.verbose,
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            stdout,
            stdout_pipe_capacity,
            stderr,
            elapsed,
            max_rss_kib: self.max_rss_kib,
            max_vm_kib: self.max_vm_kib,
            pid: self.pid as u32,
        }
    }

    /// Wait for it to end within the deadline it was set up with.
    pub fn finish(self) -> Finished {
        let limit = self.deadline;
        self.wait(limit)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // A test that panicked half way must not leave nbdcp running.
        self.kill_and_reap();
    }
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

/// How a watched nbdcp run ended.
#[derive(Debug, Default)]
pub struct Finished {
    /// The arguments, for messages.
    pub args: Vec<String>,
    /// Whether it was asked to log (`-v`, `RUST_LOG`): then stderr may
    /// hold log lines on success.
    pub verbose: bool,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Everything it wrote to stdout (unless stdout went to a file).
    pub stdout: Vec<u8>,
    /// The capacity of the stdout pipe once nbdcp was done with it
    /// (nbdcp grows it), unless stdout went to a file.
    pub stdout_pipe_capacity: Option<i32>,
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

/// Panic text nbdcp must never print.
const PANIC_TEXT: [&str; 2] = ["panicked", "RUST_BACKTRACE"];

impl Finished {
    fn assert_no_panic(&self) {
        assert!(
            !PANIC_TEXT.iter().any(|p| self.stderr.contains(p)),
            "nbdcp {:?} panicked:\n{}",
            self.args,
            self.stderr
        );
    }

    fn assert_status(&self, code: i32) {
        assert_eq!(
            (self.code, self.signal),
            (Some(code), None),
            "nbdcp {:?} should exit with status {code}; stderr:\n{}",
            self.args,
            self.stderr
        );
    }

    /// Assert a success: status 0 (not a signal), no panic text, and
    /// nothing on stderr, unless the run was verbose, when stderr may hold
    /// log lines but no `nbdcp: ` error line.
    pub fn assert_ok(&self) -> &Finished {
        self.assert_no_panic();
        self.assert_status(0);
        if self.verbose {
            // -v's report of the plan also starts with `nbdcp: `.
            let report = ["nbdcp: src: ", "nbdcp: dst: ", "nbdcp: connections="];
            let is_error =
                |l: &str| l.starts_with("nbdcp: ") && !report.iter().any(|r| l.starts_with(r));
            assert!(
                !self.stderr.lines().any(is_error),
                "nbdcp {:?} succeeded but printed an error:\n{}",
                self.args,
                self.stderr
            );
        } else {
            assert!(
                self.stderr.is_empty(),
                "nbdcp {:?} succeeded but printed on stderr:\n{}",
                self.args,
                self.stderr
            );
        }
        self
    }

    /// Assert a success after warnings (retries): like
    /// [`Finished::assert_ok`], but stderr may hold `[WARN ]` lines, and
    /// nothing else.
    pub fn assert_ok_after_warnings(&self) -> &Finished {
        self.assert_no_panic();
        self.assert_status(0);
        for l in self.stderr.lines() {
            assert!(
                l.starts_with("[WARN ] "),
                "nbdcp {:?} succeeded but printed {l:?} in:\n{}",
                self.args,
                self.stderr
            );
        }
        self
    }

    /// Assert the run failed the way every failure must end: exit status
    /// 1 (not a signal), no panic text, and exactly one line on stderr
    /// (a trailing newline aside) that starts with `nbdcp: ` and names
    /// `endpoint`. Peak memory is checked against [`RSS_LIMIT_KIB`] and
    /// the process must be gone. Returns the line.
    pub fn assert_clean_failure(&self, endpoint: &str) -> &str {
        self.assert_failure(1, endpoint)
    }

    /// [`Finished::assert_clean_failure`] with exit status `code` (2 for
    /// usage errors).
    pub fn assert_failure(&self, code: i32, endpoint: &str) -> &str {
        self.assert_no_panic();
        self.assert_status(code);
        let text = self.stderr.strip_suffix('\n').unwrap_or(&self.stderr);
        assert!(
            !text.is_empty() && !text.contains('\n'),
            "nbdcp {:?}: expected exactly one line on stderr, got:\n{}",
            self.args,
            self.stderr
        );
        self.check_error_line(text, endpoint)
    }

    /// [`Finished::assert_clean_failure`] for a run with retries on: the
    /// one `nbdcp: ` line is last, and every line before it is a
    /// `[WARN ]` line (a retry, or a failed reconnection).
    pub fn assert_clean_failure_after_retries(&self, endpoint: &str) -> &str {
        self.assert_no_panic();
        self.assert_status(1);
        let text = self.stderr.strip_suffix('\n').unwrap_or(&self.stderr);
        let (warnings, last) = match text.rsplit_once('\n') {
            Some((w, l)) => (Some(w), l),
            None => (None, text),
        };
        for l in warnings.iter().flat_map(|w| w.lines()) {
            assert!(
                l.starts_with("[WARN ] "),
                "nbdcp {:?}: unexpected stderr line {l:?} before the error in:\n{}",
                self.args,
                self.stderr
            );
        }
        self.check_error_line(last, endpoint)
    }

    fn check_error_line<'a>(&self, line: &'a str, endpoint: &str) -> &'a str {
        // Shown with --nocapture, to review the messages.
        eprintln!(
            "[{:.2?}, {} MiB] {line}",
            self.elapsed,
            self.max_rss_kib / 1024
        );
        assert!(
            line.starts_with("nbdcp: "),
            "nbdcp {:?}: the error should start with `nbdcp: `: {line}",
            self.args
        );
        assert!(
            line.contains(endpoint),
            "nbdcp {:?}: the error should name {endpoint}: {line}",
            self.args
        );
        self.assert_memory_bounded();
        assert!(
            !process_exists(self.pid),
            "nbdcp (pid {}) still exists after it was reaped",
            self.pid
        );
        line
    }

    /// The single line starting with `nbdcp: `, checking there is exactly
    /// one and that it is the last line (for runs that end with another
    /// status, such as a signal's).
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
