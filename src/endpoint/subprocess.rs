//! An NBD server run as a subprocess: `[ CMD ARGS ... ]` on the command line.
//!
//! The server is started with systemd socket activation, as libnbd's
//! `nbd_connect_systemd_socket_activation` does: nbdcp binds a listening
//! Unix socket in a private temporary directory and hands it to the server
//! as file descriptor 3 with `LISTEN_PID` and `LISTEN_FDS=1` in its
//! environment. Both qemu-nbd and nbdkit understand this. Because the socket
//! is listening before the server even starts, there is no readiness race:
//! connections made at once wait in the backlog until the server accepts.
//!
//! The server lives as long as the last [`NbdEndpoint`](super::nbd::NbdEndpoint)
//! connection to it (they share one [`ServerProcess`]); dropping that stops
//! it with SIGTERM, then SIGKILL.

use std::ffi::{CString, OsString};
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::children;
use crate::error::{Error, ErrorKind, Operation, Result};

/// How long [`ServerProcess`]'s drop waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// How long a failed first connection waits for the server to exit, so
/// that the error can name the exit status instead of a bare "connection
/// reset". Only spent on the error path.
const EXIT_WAIT_ON_ERROR: Duration = Duration::from_secs(1);

/// How long an operation that failed on a broken connection waits for
/// the server to be reaped, so that the error can say how it ended.
const DEATH_WAIT_ON_ERROR: Duration = Duration::from_millis(500);

/// Interval of the bounded polls on `waitpid(WNOHANG)`.
const POLL: Duration = Duration::from_millis(5);

/// Longest Unix socket path `sockaddr_un` can hold, without the final NUL.
const SUN_PATH_MAX: usize = 107;

unsafe extern "C" {
    /// The libc global that `execvp` takes the child's environment from.
    /// Declared here because the `libc` crate does not export it for every
    /// target, and the child-side code must store into it directly (see
    /// [`ChildEnv`]).
    static mut environ: *const *const libc::c_char;
}

/// A running NBD server subprocess, listening on a private Unix socket.
///
/// Dropping it terminates the server (SIGTERM, then SIGKILL after about two
/// seconds), reaps it, and removes the socket and its directory.
#[derive(Debug)]
pub struct ServerProcess {
    pid: libc::pid_t,
    command: String,
    dir: PathBuf,
    socket: PathBuf,
    /// Set once the process has been reaped.
    status: Mutex<Option<Ended>>,
}

/// How a reaped server ended.
#[derive(Clone, Copy, Debug)]
enum Ended {
    /// Raw wait status from our waitpid.
    Status(libc::c_int),
    /// Someone else reaped it (SIGCHLD ignored, or a stray `waitpid(-1)`).
    Unknown,
}

impl ServerProcess {
    /// Start `argv` as a socket-activated NBD server.
    ///
    /// The child gets the listening socket as fd 3, `/dev/null` as stdin,
    /// and nbdcp's stderr as both stdout and stderr: its stdout is *not*
    /// inherited, because nbdcp may itself be writing the image to stdout
    /// and a chatty server must not corrupt that stream. It runs in its own
    /// process group so that a terminal Ctrl-C reaches nbdcp alone, which
    /// then stops the server after its workers.
    ///
    /// The child asks for SIGTERM when its parent dies
    /// (`PR_SET_PDEATHSIG`), so that even `kill -9 nbdcp` does not leave a
    /// server behind. Linux ties that to the *thread* that forked, so call
    /// this from a thread that lives as long as the server is needed (the
    /// main thread), not from a short-lived worker.
    pub fn spawn(argv: &[OsString]) -> Result<ServerProcess> {
        let program = match argv.first() {
            Some(p) if !p.is_empty() => p,
            _ => {
                return Err(Error::usage(
                    "empty server command: expected [ CMD ARGS ... ]",
                ));
            }
        };
        let command = display_argv(argv);

        let dir = make_private_dir()?;
        let socket = dir.join("sock");
        // From here on, remove the directory again on any failure.
        let cleanup = DirGuard {
            dir: &dir,
            socket: &socket,
        };

        let listener = UnixListener::bind(&socket).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("cannot listen on {}: {}", socket.display(), io_text(&e)),
            )
        })?;

        let mut env = ChildEnv::new()?;
        let listen_fd = listener.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };

        let stderr = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("stderr", Operation::Duplicate, e))?;

        let mut cmd = Command::new(program);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::from(stderr))
            .stderr(Stdio::inherit())
            .process_group(0);
        // Everything in this closure runs in the forked child of a possibly
        // multi-threaded process, so it sticks to async-signal-safe calls:
        // no allocation, no locks. In particular it must not call setenv(3),
        // which allocates. LISTEN_PID has to be the child's own pid, which
        // is unknown before the fork, so the parent prepares the complete
        // environment with a fixed-size slot for that entry; the child only
        // writes its pid's digits into the slot and points `environ` at the
        // prepared array. std uses `environ` as is for execvp when the
        // Command's environment was not modified, which is why this code
        // never calls `Command::env`.
        //
        // SAFETY: see above; every call below is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                env.activate(libc::getpid());

                // Overwriting fd 3 cannot hit std's exec-error pipe: the
                // listener was opened just before the fork and descriptors
                // are allocated lowest first, so fd 3 is the listener or
                // something older (unless another thread closes fd 3 in
                // that window, which nbdcp does not do).
                if listen_fd != 3 && libc::dup2(listen_fd, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // dup2 onto itself keeps FD_CLOEXEC, so clear it in every
                // case; the original (CLOEXEC) descriptor closes on exec.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }

                // nbdcp blocks SIGINT/SIGTERM/SIGHUP in all its threads
                // (signals::install) and the mask survives exec; a server
                // that cannot receive SIGTERM could only be SIGKILLed.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                if rc != 0 {
                    return Err(io::Error::from_raw_os_error(rc));
                }

                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect, in
                // which case no signal will ever come.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }

        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::Usage,
                    format!("server command `{}` not found", program.to_string_lossy()),
                ));
            }
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("cannot run server command `{command}`: {}", io_text(&e)),
                ));
            }
        };
        // Only the child may hold the listening socket: if the server dies,
        // the socket must die with it so that connections are refused
        // instead of waiting forever in the backlog of a socket we hold.
        drop(listener);
        drop(cmd);

        let pid = child.id() as libc::pid_t;
        // The Child handle is not used for waiting: reaping goes through
        // the signal registry so that a reaped pid is never signalled.
        drop(child);
        children::register(pid);
        log::debug!("started server command `{command}` as pid {pid}");

        std::mem::forget(cleanup);
        Ok(ServerProcess {
            pid,
            command,
            dir,
            socket,
            status: Mutex::new(None),
        })
    }

    /// The Unix socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The command line, quoted for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    fn status_slot(&self) -> MutexGuard<'_, Option<Ended>> {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How the server ended ("exited with status 1", "was killed by signal
    /// 9"), or `None` while it is still running. Does not block.
    pub fn exit_status(&self) -> Option<String> {
        let mut slot = self.status_slot();
        if slot.is_none() {
            match children::try_reap(self.pid) {
                Ok(Some(status)) => *slot = Some(Ended::Status(status)),
                Ok(None) => {}
                Err(_) => *slot = Some(Ended::Unknown),
            }
        }
        slot.map(|ended| match ended {
            Ended::Status(status) => describe_status(status),
            Ended::Unknown => "exited".to_string(),
        })
    }

    /// Wait up to `timeout` for the server to exit; its description as in
    /// [`ServerProcess::exit_status`], or `None` if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Send `sig` to the server and its process group, unless reaped.
    fn kill(&self, sig: libc::c_int) {
        if self.status_slot().is_some() {
            return;
        }
        // SAFETY: plain system calls. The pid is unreaped (checked above,
        // and only this struct reaps it), so it still names our child.
        unsafe {
            libc::kill(-self.pid, sig);
            libc::kill(self.pid, sig);
        }
    }

    /// The error for a first connection that failed: the exit status if the
    /// server died, since "connection reset" would hide the real cause.
    pub(crate) fn explain_failure(&self, name: &str, err: Error) -> Error {
        match self.wait_exit(EXIT_WAIT_ON_ERROR) {
            Some(how) => Error::new(
                ErrorKind::Io,
                format!("server command `{}` {how}", self.command),
            )
            .with_endpoint(name)
            .with_source(err),
            None => err,
        }
    }

    /// After an operation failed on a broken connection: how the server
    /// ended, if it has (waiting a moment for it, on this error path only,
    /// since the connection breaks a moment before the server is reaped).
    pub(crate) fn death_note(&self) -> Option<String> {
        self.wait_exit(DEATH_WAIT_ON_ERROR)
            .map(|how| format!("the server {how}"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.kill(libc::SIGTERM);
            if self.wait_exit(TERM_GRACE).is_none() {
                log::debug!(
                    "server command `{}` ignored SIGTERM, killing it",
                    self.command
                );
                self.kill(libc::SIGKILL);
                // SIGKILL cannot be ignored, but a process stuck in an
                // uninterruptible sleep takes a while; wait it out so no
                // zombie is left.
                while self.wait_exit(Duration::from_secs(1)).is_none() {}
            }
        }
        children::unregister(self.pid);
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes the temporary directory if [`ServerProcess::spawn`] fails half
/// way.
struct DirGuard<'a> {
    dir: &'a Path,
    socket: &'a Path,
}

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.socket);
        let _ = std::fs::remove_dir(self.dir);
    }
}

/// The child's complete environment, prepared in the parent so that the
/// child needs no allocation: the parent's variables minus any `LISTEN_*`
/// of its own, plus `LISTEN_FDS=1`, `LISTEN_FDNAMES=nbd`, and a slot for
/// `LISTEN_PID=<pid>` that the child fills in.
struct ChildEnv {
    /// Owns the strings `pointers` points into.
    _strings: Vec<CString>,
    /// `LISTEN_PID=` followed by room for any pid and the final NUL. Boxed
    /// so its address, held in `pointers`, survives moves of this struct.
    pid_slot: Box<[u8; 32]>,
    /// NUL-terminated `envp` array.
    pointers: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers point into heap memory owned by the same struct
// and are only dereferenced by libc in the forked child.
unsafe impl Send for ChildEnv {}
// SAFETY: as above; the struct is never shared between threads in the
// parent, Command only requires the bound.
unsafe impl Sync for ChildEnv {}

const LISTEN_PID: &[u8] = b"LISTEN_PID=";

impl ChildEnv {
    fn new() -> Result<ChildEnv> {
        let mut strings = Vec::new();
        for (key, value) in std::env::vars_os() {
            if matches!(
                key.as_bytes(),
                b"LISTEN_PID" | b"LISTEN_FDS" | b"LISTEN_FDNAMES"
            ) {
                continue;
            }
            let mut entry: OsString = key;
            entry.push("=");
            entry.push(&value);
            // An environment entry cannot contain NUL; skip rather than fail.
            if let Ok(c) = CString::new(entry.into_vec()) {
                strings.push(c);
            }
        }
        for fixed in ["LISTEN_FDS=1", "LISTEN_FDNAMES=nbd"] {
            strings.push(CString::new(fixed).map_err(|_| Error::usage("bad environment"))?);
        }
        let mut pid_slot = Box::new([0u8; 32]);
        pid_slot[..LISTEN_PID.len()].copy_from_slice(LISTEN_PID);
        let mut pointers: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(pid_slot.as_ptr().cast());
        pointers.push(std::ptr::null());
        Ok(ChildEnv {
            _strings: strings,
            pid_slot,
            pointers,
        })
    }

    /// In the forked child: fill in the pid and make this the environment
    /// `execvp` passes on. Async-signal-safe: no allocation, no locks.
    ///
    /// # Safety
    /// Only to be called in the child between fork and exec.
    unsafe fn activate(&mut self, pid: libc::pid_t) {
        format_pid(&mut self.pid_slot, pid);
        // SAFETY: single-threaded child; the array and strings outlive the
        // exec, which is all that reads them.
        unsafe {
            environ = self.pointers.as_ptr();
        }
    }
}

/// Write `pid` in decimal after the `LISTEN_PID=` prefix, NUL-terminated.
/// Hand-written because `format!` allocates.
fn format_pid(slot: &mut [u8; 32], pid: libc::pid_t) {
    let mut digits = [0u8; 12];
    let mut n = pid.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    let mut pos = LISTEN_PID.len();
    for i in (0..len).rev() {
        slot[pos] = digits[i];
        pos += 1;
    }
    slot[pos] = 0;
}

/// Create a mode-0700 directory for the socket under `$TMPDIR` (or `/tmp`
/// if that is unset or so long the socket path would not fit).
fn make_private_dir() -> Result<PathBuf> {
    let base = std::env::var_os("TMPDIR")
        .filter(|t| !t.is_empty())
        .map(PathBuf::from)
        .filter(|t| t.as_os_str().len() + "/nbdcp-XXXXXX/sock".len() <= SUN_PATH_MAX)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let template = base.join("nbdcp-XXXXXX");
    let mut bytes = template.into_os_string().into_vec();
    bytes.push(0);
    // SAFETY: `bytes` is a NUL-terminated, writable template that mkdtemp
    // fills in place.
    let r = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if r.is_null() {
        let err = io::Error::last_os_error();
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "cannot create a temporary directory in {}: {}",
                base.display(),
                io_text(&err)
            ),
        ));
    }
    bytes.pop();
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

/// The command line for messages, quoting arguments a shell would split.
fn display_argv(argv: &[OsString]) -> String {
    let mut out = String::new();
    for (i, arg) in argv.iter().enumerate() {
        let arg = arg.to_string_lossy();
        if i > 0 {
            out.push(' ');
        }
        let plain = !arg.is_empty()
            && arg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=./:,+@%".contains(&b));
        if plain {
            out.push_str(&arg);
        } else {
            out.push('\'');
            out.push_str(&arg.replace('\'', "'\\''"));
            out.push('\'');
        }
    }
    out
}

/// The text of an I/O error without Rust's "(os error N)" suffix, for
/// messages that put it after their own context.
use nbd::error::describe_io as io_text;

/// "exited with status N" or "was killed by signal N".
fn describe_status(status: libc::c_int) -> String {
    let mut s = String::new();
    if libc::WIFEXITED(status) {
        let _ = write!(s, "exited with status {}", libc::WEXITSTATUS(status));
    } else if libc::WIFSIGNALED(status) {
        let _ = write!(s, "was killed by signal {}", libc::WTERMSIG(status));
    } else {
        let _ = write!(s, "ended with wait status {status:#x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::nbd::NbdEndpoint;
    use crate::endpoint::{Endpoint, OpenOptions};

    fn strings(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn empty_command_is_a_usage_error() {
        let err = ServerProcess::spawn(&[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        let err = ServerProcess::spawn(&strings(&["", "x"])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
    }

    #[test]
    fn missing_command_is_named() {
        let err = ServerProcess::spawn(&strings(&["nbdcp-no-such-server", "x"])).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.to_string().contains("`nbdcp-no-such-server`"), "{err}");
    }

    #[test]
    fn pid_is_formatted_without_allocation() {
        let mut slot = [0u8; 32];
        slot[..LISTEN_PID.len()].copy_from_slice(LISTEN_PID);
        format_pid(&mut slot, 4_194_304);
        let end = slot.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&slot[..end], b"LISTEN_PID=4194304");
        format_pid(&mut slot, 7);
        let end = slot.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&slot[..end], b"LISTEN_PID=7");
    }

    #[test]
    fn argv_is_quoted_for_messages() {
        assert_eq!(
            display_argv(&strings(&[
                "qemu-nbd",
                "-f",
                "raw",
                "my disk.img",
                "it's",
                ""
            ])),
            "qemu-nbd -f raw 'my disk.img' 'it'\\''s' ''"
        );
    }

    #[test]
    fn statuses_are_described() {
        assert_eq!(describe_status(3 << 8), "exited with status 3");
        assert_eq!(describe_status(libc::SIGKILL), "was killed by signal 9");
    }

    /// The child sees exactly the socket-activation protocol: its own pid
    /// in LISTEN_PID, LISTEN_FDS=1, and a listening socket on fd 3.
    #[test]
    fn child_gets_socket_activation_environment() {
        let script = r#"
            [ "$LISTEN_PID" = "$$" ] || { echo "LISTEN_PID=$LISTEN_PID pid=$$" >&2; exit 11; }
            [ "$LISTEN_FDS" = 1 ] || exit 12
            case "$(readlink /proc/$$/fd/3)" in socket:*) ;; *) exit 13;; esac
            exit 42
        "#;
        let server = ServerProcess::spawn(&strings(&["sh", "-c", script])).unwrap();
        let how = server.wait_exit(Duration::from_secs(10)).unwrap();
        assert_eq!(how, "exited with status 42");
    }

    #[test]
    fn drop_stops_the_server_and_removes_the_socket() {
        let server = ServerProcess::spawn(&strings(&["sleep", "1000"])).unwrap();
        let pid = server.pid() as libc::pid_t;
        let dir = server.socket_path().parent().unwrap().to_path_buf();
        assert!(server.socket_path().exists());
        let meta = std::fs::metadata(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        drop(server);
        assert!(!dir.exists());
        // Reaped: not even a zombie is left.
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1);
    }

    fn nbdkit_memory() -> NbdEndpoint {
        let argv = strings(&["nbdkit", "memory", "1M"]);
        NbdEndpoint::start("[ nbdkit ]", &argv, &OpenOptions::default(), true).unwrap()
    }

    #[test]
    fn nbdkit_by_socket_activation_with_shared_connections() {
        let mut first = nbdkit_memory();
        assert_eq!(first.size(), Some(1 << 20));
        assert!(first.multi_conn());
        first.write_at(b"hello", 4096).unwrap();
        first.flush().unwrap();
        let pid = first.server().unwrap().pid() as libc::pid_t;
        let dir = first
            .server()
            .unwrap()
            .socket_path()
            .parent()
            .unwrap()
            .to_path_buf();

        let mut second = first.connect_another().unwrap().expect("multi-conn");
        let mut buf = [0u8; 5];
        second.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");

        // The server outlives the first handle while another one is open.
        first.close().unwrap();
        drop(first);
        second.read_at(&mut buf, 4096).unwrap();
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0);

        second.close().unwrap();
        drop(second);
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "server not reaped");
        assert!(!dir.exists());
    }

    #[test]
    fn qemu_nbd_by_socket_activation_without_multi_conn() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![7u8; 65536 + 512]).unwrap();
        let argv = strings(&["qemu-nbd", "-f", "raw", img.to_str().unwrap()]);
        let mut ep =
            NbdEndpoint::start("[ qemu-nbd ]", &argv, &OpenOptions::default(), false).unwrap();
        assert_eq!(ep.size(), Some(65536 + 512));
        let mut buf = vec![0u8; 512];
        ep.read_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        // qemu-nbd serves one client unless given --shared: a second
        // connection would hang in the backlog, so none is offered.
        assert!(!ep.multi_conn());
        assert!(ep.connect_another().unwrap().is_none());
        ep.close().unwrap();
    }

    #[test]
    fn a_server_that_exits_is_reported_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        let argv = strings(&["qemu-nbd", "-f", "raw", missing.to_str().unwrap()]);
        let err = NbdEndpoint::start("src", &argv, &OpenOptions::default(), false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("src: server command `qemu-nbd -f raw "),
            "{text}"
        );
        assert!(text.ends_with("` exited with status 1"), "{text}");
    }

    /// A server ignoring SIGTERM is killed after the grace period, with
    /// any helper processes it started (they share its process group).
    #[test]
    fn drop_kills_a_stubborn_server_and_its_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("helper.pid");
        let script = format!(
            "trap '' TERM; sleep 1000 & echo $! > {}; wait",
            pidfile.display()
        );
        let server = ServerProcess::spawn(&strings(&["sh", "-c", &script])).unwrap();
        let helper: libc::pid_t = loop {
            if let Ok(text) = std::fs::read_to_string(&pidfile) {
                if let Ok(pid) = text.trim().parse() {
                    break pid;
                }
            }
            std::thread::sleep(POLL);
        };
        let started = Instant::now();
        drop(server);
        assert!(started.elapsed() >= TERM_GRACE);
        // The helper is not our child, so it cannot be reaped here: wait
        // until it is gone or a zombie of someone else.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{helper}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            if stat.is_empty() || state == Some('Z') {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "helper {helper} survived: {stat}"
            );
            std::thread::sleep(POLL);
        }
    }
}
