//! NBD through `ssh`: the `nbd+ssh` and `nbds+ssh` URIs.
//!
//! nbdcp runs `ssh [-p PORT] [-l USER] -- HOST nc -U -- SOCKET` (or
//! `nc localhost PORT` without `socket=`): netcat on the remote side, as
//! libnbd 1.22 does for these URIs, so the remote host needs only sshd and
//! OpenBSD netcat. ssh's standard
//! input and output are both one end of a Unix socket pair whose other end
//! is the connection: reads come from ssh's stdout, writes go to its stdin,
//! and timeouts, `shutdown` (what an interrupt does) and duplicated
//! handles work as on any Unix socket. Shutting the socket down makes ssh
//! see the end of its input and fail its writes, so it exits; dropping the
//! stream waits for it briefly, then kills it, and always reaps it.
//!
//! `NBDCP_SSH` names the ssh program to run instead of `ssh` (a wrapper
//! adding `-F CONFIG` or `-i KEY`, for example).
//!
//! A server speaks first in NBD, so the connection is not handed to the
//! handshake until a byte can be read: if ssh fails (host unreachable, a
//! key refused, `nc` missing or the socket absent on the remote host), the
//! error is the last line ssh wrote on its standard error.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use crate::transport::Transport;

/// Environment variable naming the ssh program (default `ssh`).
pub const SSH_PROGRAM_ENV: &str = "NBDCP_SSH";

/// How long a dropped connection's ssh is given to exit before it is
/// killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Where to log in and what to reach there.
#[derive(Clone, Copy, Debug)]
pub struct SshTarget<'a> {
    /// ssh user, if the URI names one.
    pub user: Option<&'a str>,
    /// Remote host.
    pub host: &'a str,
    /// ssh port, if the URI names one.
    pub port: Option<u16>,
    /// The server's Unix socket on the remote host.
    pub socket: Option<&'a Path>,
    /// Without a socket, the server's TCP port on the remote localhost.
    pub nbd_port: u16,
}

/// An NBD connection carried by an ssh child process.
#[derive(Debug)]
pub struct SshStream {
    /// Our end of the socket pair (always [`Transport::Unix`]).
    sock: Transport,
    /// The ssh process; `None` once reaped.
    child: Option<Child>,
}

/// Quote `s` for the remote POSIX shell, which ssh hands its command to.
fn shell_quote(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'\'');
    for &b in s {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The command run on the remote host.
fn remote_command(t: &SshTarget<'_>) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let cmd = match t.socket {
        Some(path) => {
            let mut c = b"nc -U -- ".to_vec();
            c.extend(shell_quote(path.as_os_str().as_bytes()));
            c
        }
        None => format!("nc localhost {}", t.nbd_port).into_bytes(),
    };
    std::ffi::OsString::from_vec(cmd)
}

/// The last non-empty line of what a failed ssh wrote on stderr.
fn last_line(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(String::from)
}

/// Wait until `fd` is readable (or hung up); `false` on timeout.
fn wait_readable(fd: i32, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            }
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
    }
}

/// Log what ssh writes on stderr once the connection is up.
fn drain_stderr(host: String, mut stderr: ChildStderr) {
    let spawned = std::thread::Builder::new()
        .name("nbdcp-ssh-stderr".into())
        .spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            if let Some(line) = last_line(&buf) {
                log::debug!("ssh {host}: {line}");
            }
        });
    if let Err(e) = spawned {
        log::debug!("cannot watch ssh's stderr: {e}");
    }
}

impl SshStream {
    /// Run ssh to `t` and wait for the server's first bytes, at most
    /// `timeout` (also ssh's `ConnectTimeout`, and afterwards the bound on
    /// every read and write).
    pub fn connect(t: &SshTarget<'_>, timeout: Option<Duration>) -> io::Result<SshStream> {
        let program = std::env::var_os(SSH_PROGRAM_ENV).unwrap_or_else(|| "ssh".into());
        let (ours, theirs) = UnixStream::pair()?;
        let theirs_out: OwnedFd = theirs.try_clone()?.into();
        let theirs_in: OwnedFd = theirs.into();
        let mut cmd = Command::new(&program);
        if let Some(limit) = timeout {
            cmd.arg("-o")
                .arg(format!("ConnectTimeout={}", limit.as_secs().max(1)));
        }
        if let Some(port) = t.port {
            cmd.arg("-p").arg(port.to_string());
        }
        if let Some(user) = t.user {
            cmd.arg("-l").arg(user);
        }
        cmd.arg("--").arg(t.host).arg(remote_command(t));
        cmd.stdin(Stdio::from(theirs_in))
            .stdout(Stdio::from(theirs_out))
            .stderr(Stdio::piped());
        log::debug!("running {cmd:?}");
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run {}: {e}", Path::new(&program).display()),
            )
        })?;
        // Only the child holds its end now: when ssh exits, reads see EOF.
        drop(cmd);
        let stderr = child.stderr.take();
        let mut stream = SshStream {
            sock: Transport::from_unix(ours),
            child: Some(child),
        };
        let fd = stream.sock.as_raw_fd();
        if !wait_readable(fd, timeout)? {
            let secs = timeout.map_or(0, |d| d.as_secs_f64().ceil() as u64);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "ssh to {}: no answer from the NBD server in {secs} s",
                    t.host
                ),
            ));
        }
        let mut byte = [0u8; 1];
        // SAFETY: a valid buffer of one byte; MSG_PEEK leaves it queued.
        let n = unsafe { libc::recv(fd, byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK) };
        if n > 0 {
            if let Some(stderr) = stderr {
                drain_stderr(t.host.to_string(), stderr);
            }
            return Ok(stream);
        }
        // ssh (or nc on the far side) ended before the server spoke.
        let status = stream.reap(EXIT_GRACE);
        let mut said = Vec::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_end(&mut said);
        }
        let why = last_line(&said).unwrap_or_else(|| match status {
            Some(s) => format!("ssh ended ({s}) before the NBD server answered"),
            None => "the connection ended before the NBD server answered".into(),
        });
        Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("ssh to {}: {why}", t.host),
        ))
    }

    /// The socket pair's end this side (a [`Transport::Unix`]).
    pub fn socket(&self) -> &Transport {
        &self.sock
    }

    /// The socket pair's end, to read and write.
    pub fn socket_mut(&mut self) -> &mut Transport {
        &mut self.sock
    }

    /// Wait for ssh to exit, at most `grace`, then kill it; reap it either
    /// way. Its exit status, if it exited by itself.
    fn reap(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for SshStream {
    /// Hang up, so that ssh ends, and reap it (killed if it lingers).
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.reap(EXIT_GRACE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_commands_quote_the_socket() {
        let path = Path::new("/tmp/it's here");
        let t = SshTarget {
            user: None,
            host: "h",
            port: None,
            socket: Some(path),
            nbd_port: 10809,
        };
        assert_eq!(remote_command(&t), "nc -U -- '/tmp/it'\\''s here'");
        let t = SshTarget {
            socket: None,
            nbd_port: 10810,
            ..t
        };
        assert_eq!(remote_command(&t), "nc localhost 10810");
    }

    #[test]
    fn last_line_skips_blank_lines() {
        assert_eq!(
            last_line(b"Warning: added\nroot@h: Permission denied (publickey).\n\n").as_deref(),
            Some("root@h: Permission denied (publickey).")
        );
        assert_eq!(last_line(b" \n"), None);
    }

    #[test]
    fn a_failing_ssh_is_reported_in_one_line() {
        // `false` as the ssh program: it exits at once, saying nothing.
        let t = SshTarget {
            user: Some("u"),
            host: "h",
            port: Some(2222),
            socket: Some(Path::new("/s")),
            nbd_port: 10809,
        };
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-ssh");
        std::fs::write(&fake, "#!/bin/sh\necho \"fake: $*\" >&2\nexit 255\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: tests in this module are the only users of the variable.
        unsafe { std::env::set_var(SSH_PROGRAM_ENV, &fake) };
        let e = SshStream::connect(&t, Some(Duration::from_secs(5))).unwrap_err();
        unsafe { std::env::remove_var(SSH_PROGRAM_ENV) };
        let msg = e.to_string();
        assert_eq!(
            msg,
            "ssh to h: fake: -o ConnectTimeout=5 -p 2222 -l u -- h nc -U -- '/s'"
        );
    }
}
