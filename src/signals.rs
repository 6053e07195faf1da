//! Clean shutdown on SIGINT, SIGTERM and SIGHUP, for the command line.
//!
//! Signals are not handled with an asynchronous handler: [`install`] blocks
//! them in the calling thread, before any other thread exists, so that every
//! thread inherits the blocked mask, and a dedicated thread collects them
//! with `sigwait(3)`. That thread can then do ordinary things (take locks,
//! send signals) which a signal handler could not.
//!
//! On the first signal it records the signal number ([`received`]), sets the
//! caller's cancel flag, and sends SIGTERM to every server subprocess in the
//! child registry. Killing the servers matters: a worker blocked in `recv`
//! on a server socket would otherwise never look at the cancel flag; once
//! its server is gone the socket reports end of file and the worker returns.
//! A second signal means the user has lost patience, and a copy that has
//! not stopped within a grace period is blocked on a server that is not
//! ours: either way the children get SIGKILL and the process exits at once
//! with status 128 + signal number.
//!
//! Library users who do not call [`install`] handle signals themselves; the
//! child registry is still kept (it costs nothing) but nothing acts on it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};

/// Signal number of the first signal received, 0 while there has been none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Set once [`install`] has run, so a second call cannot start a second
/// collector thread fighting over the same signals.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Process ids of live, unreaped server subprocesses.
///
/// Reaping happens with this lock held (see [`try_reap`]) so that the
/// signal thread can never send a signal to a process id that has already
/// been reaped and possibly reused.
static CHILDREN: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// The registry, even if a thread panicked while holding the lock: a list
/// of process ids cannot be left half-updated by a panic.
fn children() -> MutexGuard<'static, Vec<libc::pid_t>> {
    CHILDREN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Record a child process that must be terminated when a signal arrives.
pub fn register_child(pid: i32) {
    let mut list = children();
    if !list.contains(&pid) {
        list.push(pid);
    }
}

/// Forget a child process, once it has been reaped or handed to someone
/// else.
pub fn unregister_child(pid: i32) {
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

/// The first signal received since [`install`], if any. The command line
/// exits with 128 + this number (130 for SIGINT, 143 for SIGTERM).
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signo => Some(signo),
    }
}

/// The signals [`install`] takes over.
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and modify the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Send `sig` to every registered child and, as each runs in its own
/// process group, to whatever helpers it started.
fn signal_children(sig: libc::c_int) {
    let list = children();
    for &pid in list.iter() {
        // SAFETY: plain system calls; the pid is unreaped (see CHILDREN),
        // so it still names our child.
        unsafe {
            libc::kill(-pid, sig);
            libc::kill(pid, sig);
        }
    }
}

/// Take over SIGINT, SIGTERM and SIGHUP: on the first one, set `cancel`
/// and terminate the server subprocesses; on a second one, exit at once.
///
/// Must be called from the main thread before any other thread is started:
/// the signals are blocked only in the calling thread and in threads it
/// creates afterwards, and a thread that still has them unblocked would
/// receive them with their default action (death) instead.
pub fn install(cancel: Arc<AtomicBool>) -> Result<()> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Err(Error::new(
            ErrorKind::Usage,
            "signal handling is already installed",
        ));
    }
    let set = signal_set();
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        INSTALLED.store(false, Ordering::SeqCst);
        return Err(Error::new(
            ErrorKind::Io,
            format!("cannot block signals: {}", io::Error::from_raw_os_error(rc)),
        ));
    }
    let spawned = std::thread::Builder::new()
        .name("nbdcp-signals".into())
        .spawn(move || collect(set, cancel));
    if let Err(err) = spawned {
        // Without the collector the blocked signals would be ignored
        // forever; restore the default behaviour rather than hang.
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
        INSTALLED.store(false, Ordering::SeqCst);
        return Err(Error::new(
            ErrorKind::Io,
            format!("cannot start the signal thread: {err}"),
        ));
    }
    Ok(())
}

/// How long the copy has, after the first signal, to stop by itself. A
/// worker blocked on a server that is not ours and does not answer never
/// looks at the cancel flag; after this the process exits anyway.
const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Body of the signal thread.
fn collect(set: libc::sigset_t, cancel: Arc<AtomicBool>) {
    loop {
        let mut signo: libc::c_int = 0;
        // SAFETY: `set` is initialised and blocked in this thread (it
        // inherited the mask), as sigwait requires.
        let rc = unsafe { libc::sigwait(&set, &mut signo) };
        if rc != 0 {
            continue;
        }
        if RECEIVED
            .compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            log::debug!("received signal {signo}, cancelling");
            cancel.store(true, Ordering::SeqCst);
            signal_children(libc::SIGTERM);
            // A second signal, or the grace period running out, ends the
            // process; the copy finishing first ends it normally.
            let timeout = libc::timespec {
                tv_sec: GRACE.as_secs() as libc::time_t,
                tv_nsec: 0,
            };
            // SAFETY: as for sigwait; a null info pointer is allowed.
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        }
        exit_now();
    }
}

/// Kill and reap the servers, then exit with 128 + the first signal.
fn exit_now() -> ! {
    signal_children(libc::SIGKILL);
    for pid in children().drain(..) {
        let mut status = 0;
        // SAFETY: the pid is our unreaped child; SIGKILL makes this quick.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    let first = RECEIVED.load(Ordering::SeqCst);
    // SAFETY: _exit is always safe to call; the copy was told to stop and
    // did not, so nothing is left that must be flushed.
    unsafe { libc::_exit(128 + first) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_adds_once_and_removes() {
        // Ids far above pid_max, so nothing real is touched.
        register_child(0x7fff_fff0);
        register_child(0x7fff_fff0);
        assert_eq!(children().iter().filter(|&&p| p == 0x7fff_fff0).count(), 1);
        unregister_child(0x7fff_fff0);
        assert!(!children().contains(&0x7fff_fff0));
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by try_reap, the code under test
    fn try_reap_reports_exit_and_unregisters() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        register_child(pid);
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
