//! The NBD server subprocesses this library started and has not reaped,
//! so that a program's last-resort exit can kill them
//! ([`kill_started_servers`](crate::kill_started_servers)) rather than leave
//! them running.

use std::io;
use std::sync::{Mutex, MutexGuard};

/// Process ids of live, unreaped server subprocesses.
///
/// Reaping happens with this lock held (see [`try_reap`]) so that nothing
/// can send a signal to a process id that has already been reaped and
/// possibly reused.
static CHILDREN: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// The registry, even if a thread panicked while holding the lock: a list
/// of process ids cannot be left half-updated by a panic.
fn children() -> MutexGuard<'static, Vec<libc::pid_t>> {
    CHILDREN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Record a child process that must be killed on a last-resort exit.
pub(crate) fn register(pid: libc::pid_t) {
    let mut list = children();
    if !list.contains(&pid) {
        list.push(pid);
    }
}

/// Forget a child process, once it has been reaped.
pub(crate) fn unregister(pid: libc::pid_t) {
    children().retain(|&p| p != pid);
}

/// Reap `pid` if it has exited, without blocking, and unregister it in the
/// same critical section. Returns the raw wait status once it has exited.
pub(crate) fn try_reap(pid: libc::pid_t) -> io::Result<Option<libc::c_int>> {
    let mut list = children();
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid only writes the status integer we pass.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == 0 {
        return Ok(None);
    }
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            return Ok(None);
        }
        // ECHILD: somebody else reaped it; either way it is gone.
        list.retain(|&p| p != pid);
        return Err(err);
    }
    list.retain(|&p| p != pid);
    Ok(Some(status))
}

/// SIGKILL every server subprocess still registered (and, as each runs in
/// its own process group, the helpers it started), then reap them.
pub(crate) fn kill_all() {
    let mut list = children();
    for &pid in list.iter() {
        // SAFETY: plain system calls; the pid is unreaped (see CHILDREN),
        // so it still names our child.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
    for pid in list.drain(..) {
        let mut status = 0;
        // SAFETY: the pid is our unreaped child; SIGKILL makes this quick.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_adds_once_and_removes() {
        // Ids far above pid_max, so nothing real is touched.
        register(0x7fff_fff0);
        register(0x7fff_fff0);
        assert_eq!(children().iter().filter(|&&p| p == 0x7fff_fff0).count(), 1);
        unregister(0x7fff_fff0);
        assert!(!children().contains(&0x7fff_fff0));
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by try_reap, the code under test
    fn try_reap_reports_exit_and_unregisters() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        register(pid);
        let status = loop {
            if let Some(status) = try_reap(pid).unwrap() {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
        assert!(!children().contains(&pid));
    }
}
