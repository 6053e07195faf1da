//! Clean shutdown on SIGINT, SIGTERM and SIGHUP.
//!
//! Signals are not handled with an asynchronous handler: [`install`] blocks
//! them in the calling thread, before any other thread exists, so that every
//! thread inherits the blocked mask, and a dedicated thread collects them
//! with `sigwait(3)`. That thread can then do ordinary things (take locks,
//! shut sockets down) which a signal handler could not.
//!
//! On the first signal it records the signal number ([`received`]) and
//! cancels the copy through its [`CancelToken`], the same call a library
//! user makes: the library breaks off the connections requests are blocked
//! on, the copy returns, and dropping the endpoints stops the servers nbdcp
//! started. A second signal means the user has lost patience, and a copy
//! that has not stopped within a grace period is stuck somewhere no
//! cancellation reaches (a read from a terminal, say): either way the
//! servers get SIGKILL and the process exits at once with status
//! 128 + signal number.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nbdcp::CancelToken;

/// Signal number of the first signal received, 0 while there has been none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Set once [`install`] has run, so a second call cannot start a second
/// collector thread fighting over the same signals.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// How long the copy has, after the first signal, to stop by itself.
/// Cancelling returns within milliseconds from anything on a socket; this
/// is the last resort for what it cannot reach.
const GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Set once the interruption has been reported.
static ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// Say that the copy was interrupted by signal `sig`, once, whichever of
/// the main thread (the copy returned) and the signal thread (it did not,
/// in time) gets there first.
pub fn announce(sig: i32) {
    if !ANNOUNCED.swap(true, Ordering::SeqCst) {
        say!("nbdcp: interrupted by signal {sig}");
    }
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

/// Take over SIGINT, SIGTERM and SIGHUP: on the first one, cancel the
/// copy; on a second one, or when the copy has not stopped after
/// [`GRACE`], kill the servers and exit.
///
/// Must be called from the main thread before any other thread is started:
/// the signals are blocked only in the calling thread and in threads it
/// creates afterwards, and a thread that still has them unblocked would
/// receive them with their default action (death) instead.
pub fn install(cancel: CancelToken) -> Result<(), String> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Err("signal handling is already installed".into());
    }
    let set = signal_set();
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        INSTALLED.store(false, Ordering::SeqCst);
        return Err(format!(
            "cannot block signals: {}",
            io::Error::from_raw_os_error(rc)
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
        return Err(format!("cannot start the signal thread: {err}"));
    }
    Ok(())
}

/// Body of the signal thread.
fn collect(set: libc::sigset_t, cancel: CancelToken) {
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
            cancel.cancel();
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

/// Kill and reap the servers, then exit with 128 + the first signal,
/// saying so as the copy's own end would have.
fn exit_now() -> ! {
    nbdcp::kill_started_servers();
    let first = RECEIVED.load(Ordering::SeqCst);
    announce(first);
    // SAFETY: _exit is always safe to call; the copy was told to stop and
    // did not, so nothing is left that must be flushed.
    unsafe { libc::_exit(128 + first) }
}
