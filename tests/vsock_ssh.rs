//! NBD over vsock and through ssh: `nbd+vsock://` and `nbd+ssh://`.
//!
//! The ssh tests start their own sshd on 127.0.0.1 (a free port, a
//! throwaway host key, an authorized_keys file holding one user key, a
//! configuration that allows only that key) and point nbdcp's
//! `NBDCP_SSH` at a wrapper running ssh with its own client
//! configuration; the "remote" side runs `nc -U` to an nbdkit socket.
//! The vsock copy needs a vsock transport to talk to (a VM's host, or the
//! `vsock_loopback` module); where there is none it says it is skipped,
//! and why.

mod common;
use common::*;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: u64 = 24 << 20;

/// Fail, naming the package to install, unless every tool the ssh tests
/// need is here: a missing sshd must not let them pass.
fn require_ssh_tools() {
    for (tool, package) in [
        ("nbdkit", "nbdkit"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("/usr/sbin/sshd", "openssh-server"),
        ("nc", "netcat-openbsd"),
    ] {
        assert!(
            which(tool).is_some() || Path::new(tool).exists(),
            "{tool} is not installed: apt-get install {package} (scripts/test.sh installs it)"
        );
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "nbdcp-test", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "ssh-keygen failed");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An sshd of our own on 127.0.0.1, killed and reaped on drop.
struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
    user: String,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        keygen(&dir.join("host_key"));
        keygen(&dir.join("user_key"));
        keygen(&dir.join("other_key"));
        let authorized = dir.join("authorized_keys");
        std::fs::copy(dir.join("user_key.pub"), &authorized).unwrap();
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600)).unwrap();
        // sshd wants its privilege separation directory (as root).
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile none\n\
                 AuthorizedKeysFile {d}/authorized_keys\nAuthenticationMethods publickey\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nAllowUsers {user}\nLogLevel ERROR\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let mut sshd = Sshd {
            child,
            port,
            dir: dir.to_path_buf(),
            user,
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = sshd.child.try_wait() {
                panic!(
                    "sshd exited ({st}): {}",
                    std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sshd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The host key is known, so ssh asks nothing.
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        std::fs::write(
            dir.join("known_hosts"),
            format!("[127.0.0.1]:{port} {host_pub}"),
        )
        .unwrap();
        sshd
    }

    /// A wrapper script running ssh with `key` and this sshd's host key,
    /// for `NBDCP_SSH`.
    fn wrapper(&self, key: &str) -> PathBuf {
        let d = self.dir.display();
        let config = self.dir.join(format!("ssh_config_{key}"));
        std::fs::write(
            &config,
            format!(
                "Host *\n  IdentityFile {d}/{key}\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile {d}/known_hosts\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n"
            ),
        )
        .unwrap();
        let script = self.dir.join(format!("ssh_{key}"));
        let mut f = std::fs::File::create(&script).unwrap();
        writeln!(f, "#!/bin/sh\nexec ssh -F '{}' \"$@\"", config.display()).unwrap();
        drop(f);
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn uri(&self, socket: &Path) -> String {
        format!(
            "nbd+ssh://{}@127.0.0.1:{}/?socket={}",
            self.user,
            self.port,
            s(socket)
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ssh_copies_both_directions() {
    require_ssh_tools();
    let dir = tmp();
    let sshd = Sshd::start(dir.path());
    let wrapper = sshd.wrapper("user_key");
    let (src, _) = mixed(dir.path(), "src.img", SIZE, 13);
    let server = Server::nbdkit(&["memory", "size=24M"]);
    let uri = sshd.uri(server.socket_path());
    Nbdcp::new(&[s(&src), &uri])
        .env("NBDCP_SSH", s(&wrapper))
        .run()
        .assert_ok();
    let back = dir.path().join("back.img");
    Nbdcp::new(&["-C", "2", &uri, s(&back)])
        .env("NBDCP_SSH", s(&wrapper))
        .run()
        .assert_ok();
    assert_same_bytes(&src, &back);
}

#[test]
fn ssh_with_a_refused_key_fails_in_one_line() {
    require_ssh_tools();
    let dir = tmp();
    let sshd = Sshd::start(dir.path());
    let wrapper = sshd.wrapper("other_key");
    let server = Server::nbdkit(&["memory", "size=1M"]);
    let uri = sshd.uri(server.socket_path());
    let out = dir.path().join("out.img");
    let run = Nbdcp::new(&[&uri, s(&out)])
        .env("NBDCP_SSH", s(&wrapper))
        .run();
    let line = run.assert_clean_failure(&uri);
    assert!(line.contains("Permission denied"), "{line}");
}

#[test]
fn ssh_to_a_missing_socket_fails_in_one_line() {
    require_ssh_tools();
    let dir = tmp();
    let sshd = Sshd::start(dir.path());
    let wrapper = sshd.wrapper("user_key");
    let uri = sshd.uri(&dir.path().join("nobody.sock"));
    let out = dir.path().join("out.img");
    let run = Nbdcp::new(&[&uri, s(&out)])
        .env("NBDCP_SSH", s(&wrapper))
        .run();
    let line = run.assert_clean_failure(&uri);
    assert!(line.contains("ssh to 127.0.0.1"), "{line}");
}

/// Whether this machine can make vsock connections to itself, or why not.
fn vsock_loopback() -> Result<(), String> {
    // SAFETY: plain socket calls on a descriptor closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(format!("no AF_VSOCK: {}", std::io::Error::last_os_error()));
        }
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_LOCAL;
        addr.svm_port = 1;
        let r = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        );
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        // Refused or reset means a transport answered: loopback works.
        match (r, e.raw_os_error()) {
            (0, _) => Ok(()),
            (_, Some(libc::ECONNREFUSED | libc::ECONNRESET)) => Ok(()),
            _ => Err(format!("no vsock loopback (CID 1: {e})")),
        }
    }
}

#[test]
fn vsock_with_nothing_listening_fails_in_one_line_in_bounded_time() {
    let dir = tmp();
    let out = dir.path().join("out.img");
    let uri = "nbd+vsock://1:10809/";
    let start = Instant::now();
    let run = Nbdcp::new(&["--timeout=3", uri, s(&out)]).run();
    let line = run.assert_clean_failure(uri);
    assert!(line.contains("vsock CID 1 port 10809"), "{line}");
    assert!(start.elapsed() < Duration::from_secs(20), "{line}");
}

#[test]
fn vsock_copies_both_directions_where_loopback_works() {
    if let Err(why) = vsock_loopback() {
        eprintln!("skipped: {why}; nbd+vsock needs a VM's host or the vsock_loopback module");
        return;
    }
    require("nbdkit");
    let dir = tmp();
    let port = u32::from(free_port());
    let mut nbdkit = Command::new("nbdkit")
        .args(["--vsock", "-f", "--exit-with-parent", "-p"])
        .arg(port.to_string())
        .args(["memory", "size=24M"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let uri = format!("nbd+vsock://1:{port}/");
    let (src, _) = mixed(dir.path(), "src.img", SIZE, 29);
    let back = dir.path().join("back.img");
    // nbdkit listens soon after it starts; retry the first copy briefly.
    let start = Instant::now();
    loop {
        let run = Nbdcp::new(&[s(&src), &uri]).run();
        if run.code == Some(0) || start.elapsed() > Duration::from_secs(10) {
            run.assert_ok();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Nbdcp::new(&[&uri, s(&back)]).run().assert_ok();
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    assert_same_bytes(&src, &back);
}

#[cfg(feature = "tls")]
#[test]
fn nbds_ssh_copies_over_tls_inside_ssh() {
    require_ssh_tools();
    let pki = common::tls::Pki::get();
    let dir = tmp();
    let sshd = Sshd::start(dir.path());
    let wrapper = sshd.wrapper("user_key");
    let (src, _) = mixed(dir.path(), "src.img", SIZE, 41);
    let tls_args = common::tls::nbdkit_psk_args(pki);
    let server = Server::nbdkit(&common::tls::with(&tls_args, &["memory", "size=24M"]));
    let uri = common::tls::psk_uri(&sshd.uri(server.socket_path()), pki);
    assert!(uri.starts_with("nbds+ssh://"), "{uri}");
    // --timeout bounds reads and writes on the socket under TLS and ssh.
    Nbdcp::new(&["--timeout=30", s(&src), &uri])
        .env("NBDCP_SSH", s(&wrapper))
        .run()
        .assert_ok();
    let back = dir.path().join("back.img");
    Nbdcp::new(&["--timeout=30", "-C", "2", &uri, s(&back)])
        .env("NBDCP_SSH", s(&wrapper))
        .run()
        .assert_ok();
    assert_same_bytes(&src, &back);
}

/// The pids of `parent`'s children whose command is `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let ppid = tail.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if comm == name && ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn ssh_killed_mid_copy_is_reconnected() {
    require_ssh_tools();
    let dir = tmp();
    let sshd = Sshd::start(dir.path());
    let wrapper = sshd.wrapper("user_key");
    let (src, _) = mixed(dir.path(), "src.img", SIZE, 53);
    let server = Server::nbdkit(&["memory", "size=24M"]);
    let uri = sshd.uri(server.socket_path());
    Nbdcp::new(&[s(&src), &server.uri()]).run().assert_ok();
    let back = dir.path().join("back.img");
    // Every byte read, at 6 MiB/s: slow enough to be caught in the middle.
    let run = Nbdcp::new(&["--rate=6M", "--no-extents", "-C", "1", &uri, s(&back)])
        .env("NBDCP_SSH", s(&wrapper))
        .spawn();
    let start = Instant::now();
    let victim = loop {
        if let Some(&pid) = children_named(run.pid(), "ssh").first() {
            break pid;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no ssh child");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: a signal to a process this test's nbdcp started.
    unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) };
    let done = run.wait(Duration::from_secs(60));
    done.assert_ok_after_warnings();
    assert!(done.stderr.contains("[WARN ]"), "no retry: {}", done.stderr);
    assert_same_bytes(&src, &back);
}
