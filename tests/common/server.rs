//! Real NBD servers (nbdkit, qemu-nbd, nbd-server) started per test.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::nbdkit_log::{LogCommand, LogEntry, parse_nbdkit_log};
use super::require;

/// How long a server may take to become ready, or to go away.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of readiness polls.
const POLL: Duration = Duration::from_millis(2);
/// Attempts at a free TCP port before giving up.
const PORT_ATTEMPTS: usize = 10;

/// Which program runs the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// nbdkit, in the foreground.
    Nbdkit,
    /// qemu-nbd, in the foreground.
    QemuNbd,
    /// nbd-server, which always daemonizes.
    NbdServer,
}

/// Where the server listens.
#[derive(Clone, Debug)]
enum Address {
    Unix(PathBuf),
    Tcp(u16),
}

/// How we hold on to the server process.
enum Process {
    /// Our direct child (nbdkit, qemu-nbd).
    Child(Child),
    /// A daemon reparented to this test process (nbd-server), which is a
    /// child subreaper so the daemon can be reaped like a child.
    Daemon(libc::pid_t),
    /// Already stopped and reaped.
    Gone,
}

/// A running NBD server, killed and reaped when dropped.
///
/// The process gets `PR_SET_PDEATHSIG` so it dies with the test, but Linux
/// ties that to the *thread* that started it: create and drop a `Server`
/// on the same test thread (the normal case), not in a helper thread that
/// exits early.
pub struct Server {
    kind: ServerKind,
    process: Process,
    pid: u32,
    dir: tempfile::TempDir,
    address: Address,
    export: String,
    log: Option<PathBuf>,
    stderr: PathBuf,
    command: String,
}

impl Server {
    /// `nbdkit -U SOCK -P PIDFILE -f --exit-with-parent ARGS...` on a Unix
    /// socket in a fresh temporary directory. `args` are the plugin and its
    /// parameters, optionally preceded by nbdkit options such as
    /// `--filter=...` or `-r`.
    pub fn nbdkit(args: &[&str]) -> Server {
        Self::nbdkit_with_log(args, false)
    }

    /// [`Server::nbdkit`] with `--filter=log` outermost, logging every
    /// request to [`Server::log_path`]; read it with
    /// [`Server::log_entries`].
    pub fn nbdkit_logged(args: &[&str]) -> Server {
        Self::nbdkit_with_log(args, true)
    }

    fn nbdkit_with_log(args: &[&str], logged: bool) -> Server {
        require("nbdkit");
        let dir = tempdir();
        let sock = dir.path().join("nbd.sock");
        let log = logged.then(|| dir.path().join("nbdkit.log"));
        let argv = nbdkit_argv(&["-U".into(), path_str(&sock)], &dir, args, log.as_deref());
        let mut server = start_foreground(ServerKind::Nbdkit, dir, Address::Unix(sock), "", argv)
            .unwrap_or_else(|e| panic!("{e}"));
        server.log = log;
        server
    }

    /// nbdkit on TCP, on `127.0.0.1` only, with a free port.
    pub fn nbdkit_tcp(args: &[&str]) -> Server {
        Self::nbdkit_tcp_with_log(args, false)
    }

    /// [`Server::nbdkit_tcp`] with the log filter, as
    /// [`Server::nbdkit_logged`].
    pub fn nbdkit_tcp_logged(args: &[&str]) -> Server {
        Self::nbdkit_tcp_with_log(args, true)
    }

    fn nbdkit_tcp_with_log(args: &[&str], logged: bool) -> Server {
        require("nbdkit");
        retry_ports(|port| {
            let dir = tempdir();
            let log = logged.then(|| dir.path().join("nbdkit.log"));
            let argv = nbdkit_argv(
                &[
                    "-i".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                ],
                &dir,
                args,
                log.as_deref(),
            );
            let mut server =
                start_foreground(ServerKind::Nbdkit, dir, Address::Tcp(port), "", argv)?;
            server.log = log;
            Ok(server)
        })
    }

    /// `qemu-nbd -k SOCK --pid-file PIDFILE -t ARGS...` (persistent, so it
    /// survives clients coming and going). `args` must include the image,
    /// e.g. `&["-f", "raw", path]`; add `-e N` for N clients at once (the
    /// default is 1, and then qemu-nbd does not advertise multi-conn).
    pub fn qemu_nbd(args: &[&str]) -> Server {
        require("qemu-nbd");
        let dir = tempdir();
        let sock = dir.path().join("nbd.sock");
        let argv = qemu_nbd_argv(&["-k".into(), path_str(&sock)], &dir, args);
        start_foreground(ServerKind::QemuNbd, dir, Address::Unix(sock), "", argv)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Server::qemu_nbd`] on TCP, `127.0.0.1` only, with a free port.
    pub fn qemu_nbd_tcp(args: &[&str]) -> Server {
        require("qemu-nbd");
        retry_ports(|port| {
            let dir = tempdir();
            let argv = qemu_nbd_argv(
                &[
                    "-b".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                ],
                &dir,
                args,
            );
            start_foreground(ServerKind::QemuNbd, dir, Address::Tcp(port), "", argv)
        })
    }

    /// nbd-server exporting `path` as export `export` on a Unix socket.
    pub fn nbd_server(path: &Path, readonly: bool) -> Server {
        Self::nbd_server_with(path, readonly, &[])
    }

    /// [`Server::nbd_server`] with extra lines for the `[export]` section
    /// of the configuration, e.g. `&["trim = true", "flush = true"]`.
    pub fn nbd_server_with(path: &Path, readonly: bool, export_options: &[&str]) -> Server {
        require("nbd-server");
        let dir = tempdir();
        let sock = dir.path().join("nbd.sock");
        let generic = format!("unixsock = {}\n", sock.display());
        start_nbd_server(
            dir,
            Address::Unix(sock),
            &generic,
            path,
            readonly,
            export_options,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// nbd-server on TCP, `127.0.0.1` only, with a free port.
    pub fn nbd_server_tcp(path: &Path, readonly: bool) -> Server {
        require("nbd-server");
        retry_ports(|port| {
            let dir = tempdir();
            let generic = format!("listenaddr = 127.0.0.1\nport = {port}\n");
            start_nbd_server(dir, Address::Tcp(port), &generic, path, readonly, &[])
        })
    }

    /// The NBD URI, `nbd+unix:///EXPORT?socket=PATH` or
    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self) -> String {
        match &self.address {
            Address::Unix(p) => format!("nbd+unix:///{}?socket={}", self.export, p.display()),
            Address::Tcp(port) => format!("nbd://127.0.0.1:{port}/{}", self.export),
        }
    }

    /// The Unix socket; panics for a TCP server.
    pub fn socket_path(&self) -> &Path {
        match &self.address {
            Address::Unix(p) => p,
            Address::Tcp(_) => panic!("{} listens on TCP, not a Unix socket", self.command),
        }
    }

    /// The TCP port; panics for a Unix socket server.
    pub fn port(&self) -> u16 {
        match &self.address {
            Address::Tcp(port) => *port,
            Address::Unix(_) => panic!("{} listens on a Unix socket, not TCP", self.command),
        }
    }

    /// The export name ("" for nbdkit and qemu-nbd, "export" for
    /// nbd-server).
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Which program this is.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The server's private temporary directory, removed on drop; tests
    /// may put their files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Everything the server wrote to stdout and stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The nbdkit log file; panics unless started with
    /// [`Server::nbdkit_logged`].
    pub fn log_path(&self) -> &Path {
        self.log
            .as_deref()
            .unwrap_or_else(|| panic!("{} was not started with the log filter", self.command))
    }

    /// The nbdkit log as text.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The parsed nbdkit log.
    pub fn log_entries(&self) -> Vec<LogEntry> {
        parse_nbdkit_log(&self.log_text())
    }

    /// Wait until every connection in the nbdkit log has disconnected (and
    /// at least one has connected), then return the parsed log. A client
    /// process that has exited may still have its last lines unwritten by
    /// nbdkit for a moment; this closes that race without sleeping blindly.
    pub fn wait_log_idle(&self) -> Vec<LogEntry> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let entries = self.log_entries();
            let connects = entries
                .iter()
                .filter(|e| e.command == LogCommand::Connect)
                .count();
            let disconnects = entries
                .iter()
                .filter(|e| e.command == LogCommand::Disconnect)
                .count();
            if connects > 0 && connects == disconnects {
                return entries;
            }
            if Instant::now() > deadline {
                panic!(
                    "nbdkit log still has open connections ({connects} connected, \
                     {disconnects} disconnected) after {READY_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Open a raw connection and return the first 8 bytes the server sends
    /// (b"NBDMAGIC" for any NBD server).
    pub fn greeting(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 8];
        match &self.address {
            Address::Unix(p) => {
                let mut s = UnixStream::connect(p).unwrap();
                s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
                s.read_exact(&mut buf).unwrap();
            }
            Address::Tcp(port) => {
                let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).unwrap();
                s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
                s.read_exact(&mut buf).unwrap();
            }
        }
        buf
    }

    /// Whether the server process is still running (a zombie is not).
    pub fn is_running(&mut self) -> bool {
        match &mut self.process {
            Process::Child(c) => matches!(c.try_wait(), Ok(None)),
            Process::Daemon(pid) => !reap_nohang(*pid),
            Process::Gone => false,
        }
    }

    /// Stop the server now (SIGTERM, then SIGKILL after 5 s) and reap it,
    /// keeping its directory and log for inspection. Drop does the same.
    pub fn stop(&mut self) {
        let pid = self.pid as libc::pid_t;
        match std::mem::replace(&mut self.process, Process::Gone) {
            Process::Child(mut child) => {
                if matches!(child.try_wait(), Ok(None)) {
                    signal(pid, libc::SIGTERM);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while matches!(child.try_wait(), Ok(None)) {
                        if Instant::now() > deadline {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        std::thread::sleep(POLL);
                    }
                }
            }
            Process::Daemon(pid) => {
                if !reap_nohang(pid) {
                    signal(pid, libc::SIGTERM);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while !reap_nohang(pid) {
                        if Instant::now() > deadline {
                            signal(pid, libc::SIGKILL);
                            let mut status = 0;
                            unsafe { libc::waitpid(pid, &mut status, 0) };
                            break;
                        }
                        std::thread::sleep(POLL);
                    }
                }
            }
            Process::Gone => {}
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("command", &self.command)
            .field("pid", &self.pid)
            .field("uri", &self.uri())
            .finish()
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn process_exists(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may
        // itself contain spaces and parentheses.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nbdcp-test-")
        .tempdir()
        .unwrap()
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

fn nbdkit_argv(
    listen: &[String],
    dir: &tempfile::TempDir,
    args: &[&str],
    log: Option<&Path>,
) -> Vec<String> {
    let mut argv: Vec<String> = vec!["nbdkit".into()];
    argv.extend_from_slice(listen);
    argv.extend([
        "-P".into(),
        path_str(&dir.path().join("server.pid")),
        "-f".into(),
        "--exit-with-parent".into(),
    ]);
    if log.is_some() {
        // Before the caller's filters, so it is outermost and sees exactly
        // what the client sent.
        argv.push("--filter=log".into());
    }
    argv.extend(args.iter().map(|s| s.to_string()));
    if let Some(log) = log {
        argv.push(format!("logfile={}", log.display()));
    }
    argv
}

fn qemu_nbd_argv(listen: &[String], dir: &tempfile::TempDir, args: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = vec!["qemu-nbd".into()];
    argv.extend_from_slice(listen);
    argv.extend([
        "--pid-file".into(),
        path_str(&dir.path().join("server.pid")),
        "-t".into(),
    ]);
    argv.extend(args.iter().map(|s| s.to_string()));
    argv
}

/// A port that was free a moment ago on 127.0.0.1. Another process may
/// take it before the server binds it, hence [`retry_ports`].
fn free_port() -> u16 {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    l.local_addr().unwrap().port()
}

/// Start a TCP server on a free port, trying again with another port when
/// it fails to start (most likely because the port was taken meanwhile).
fn retry_ports(mut start: impl FnMut(u16) -> Result<Server, String>) -> Server {
    let mut last = String::new();
    for _ in 0..PORT_ATTEMPTS {
        match start(free_port()) {
            Ok(server) => return server,
            Err(e) => last = e,
        }
    }
    panic!("no TCP server after {PORT_ATTEMPTS} ports; last error: {last}");
}

/// Spawn `argv` with stdout and stderr to a file in `dir`, a death signal
/// tied to this test, and wait for its pid file.
fn start_foreground(
    kind: ServerKind,
    dir: tempfile::TempDir,
    address: Address,
    export: &str,
    argv: Vec<String>,
) -> Result<Server, String> {
    let command = argv.join(" ");
    let pidfile = dir.path().join("server.pid");
    let stderr = dir.path().join("server.stderr");
    let out = std::fs::File::create(&stderr).unwrap();
    let child = spawn_until_pidfile(&argv, out, libc::SIGTERM, &pidfile, || {
        std::fs::read_to_string(&stderr).unwrap_or_default()
    })?;
    let pid = child.id();
    Ok(Server {
        kind,
        process: Process::Child(child),
        pid,
        dir,
        address,
        export: export.to_string(),
        log: None,
        stderr,
        command,
    })
}

/// Spawn `argv` with stdout and stderr to `out`, `death_signal` sent to it
/// if this test dies, and wait until it writes `pidfile` (nbdkit and
/// qemu-nbd both write it only once they listen). On failure the error
/// carries `output()`, what the server said.
pub fn spawn_until_pidfile(
    argv: &[String],
    out: std::fs::File,
    death_signal: libc::c_int,
    pidfile: &Path,
    output: impl Fn() -> String,
) -> Result<Child, String> {
    let command = argv.join(" ");
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, death_signal);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while read_pid(pidfile).is_none() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "`{command}` exited with {status} before it was ready:\n{}",
                output()
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`{command}` not ready after {READY_TIMEOUT:?}:\n{}",
                output()
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(child)
}

/// The pid in `path`, once the file exists and holds a whole number (the
/// writer may have created it but not yet written it).
fn read_pid(path: &Path) -> Option<libc::pid_t> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    text.parse().ok()
}

/// Make this test process a child subreaper, once: nbd-server always
/// daemonizes, and its daemon then becomes our child instead of init's,
/// so that it can be reaped (init in a container may never reap it, and a
/// zombie would look alive to `kill(pid, 0)`).
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER failed");
    });
}

/// Reap `pid` if it has exited; true once it is gone.
fn reap_nohang(pid: libc::pid_t) -> bool {
    let mut status = 0;
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    // r < 0 is ECHILD: already reaped (or never ours), gone either way.
    r != 0
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    unsafe { libc::kill(pid, sig) };
}

fn start_nbd_server(
    dir: tempfile::TempDir,
    address: Address,
    generic: &str,
    path: &Path,
    readonly: bool,
    export_options: &[&str],
) -> Result<Server, String> {
    become_subreaper();
    let config = dir.path().join("nbd-server.conf");
    let pidfile = dir.path().join("server.pid");
    let stderr = dir.path().join("server.stderr");
    let mut text = format!("[generic]\n{generic}allowlist = true\n[export]\n");
    text.push_str(&format!("exportname = {}\n", path.display()));
    text.push_str(&format!("readonly = {readonly}\n"));
    for line in export_options {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&config, &text).unwrap();

    let argv = [
        "nbd-server".to_string(),
        "-C".into(),
        path_str(&config),
        "-p".into(),
        path_str(&pidfile),
    ];
    let command = argv.join(" ");
    let out = std::fs::File::create(&stderr).unwrap();
    // The launcher forks the daemon and exits; the daemon detaches from
    // stdio, so only configuration errors reach the stderr file.
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .status()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let describe = || {
        format!(
            "configuration:\n{text}\noutput:\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        )
    };
    if !status.success() {
        return Err(format!("`{command}` failed with {status}; {}", describe()));
    }

    // nbd-server writes its pid file before it binds, so readiness is a
    // successful connect; the probe connection is harmless (the forked
    // handler sees end of file and exits).
    let deadline = Instant::now() + READY_TIMEOUT;
    let pid = loop {
        if let Some(pid) = read_pid(&pidfile) {
            break pid;
        }
        if Instant::now() > deadline {
            return Err(format!("`{command}` wrote no pid file; {}", describe()));
        }
        std::thread::sleep(POLL);
    };
    loop {
        let connected = match &address {
            Address::Unix(p) => UnixStream::connect(p).is_ok(),
            Address::Tcp(port) => TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).is_ok(),
        };
        if connected {
            break;
        }
        if reap_nohang(pid) {
            return Err(format!(
                "`{command}` (pid {pid}) died before listening; {}",
                describe()
            ));
        }
        if Instant::now() > deadline {
            signal(pid, libc::SIGKILL);
            return Err(format!(
                "`{command}` not listening after {READY_TIMEOUT:?}; {}",
                describe()
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(Server {
        kind: ServerKind::NbdServer,
        process: Process::Daemon(pid),
        pid: pid as u32,
        dir,
        address,
        export: "export".into(),
        log: None,
        stderr,
        command,
    })
}
