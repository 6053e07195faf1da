//! Sending write payloads without copying them: `vmsplice` lends the
//! payload's pages to a pipe, and `splice` moves them from the pipe onto
//! the socket, where they stay until the server has read them.
//!
//! The usual copy into the socket's buffer is about a quarter of nbdcp's
//! CPU on an NBD-to-NBD copy, and on 2 cores the servers need that CPU.
//!
//! Lending pages has one rule: the caller must not change the payload's
//! memory while the server may still read it. A write's reply means the
//! server has read its payload, so memory is free again once every write
//! sent from it has been answered; after a broken connection it never is
//! (queued bytes may still be delivered), and the memory must be dropped
//! rather than refilled.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Payloads smaller than this are copied: lending pages has a fixed cost
/// (two system calls and pinning) that a small copy does not.
pub const MIN_SPLICE_PAYLOAD: usize = 64 * 1024;

/// Pipe capacity asked for: one default-sized request fits in one
/// `vmsplice`. Unprivileged users may get less (`fs.pipe-max-size`).
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// A pipe used to lend payload pages to one socket.
#[derive(Debug)]
pub struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl SplicePipe {
    /// Make the pipe.
    pub fn new() -> io::Result<SplicePipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A small pipe only means more system calls per payload.
        // SAFETY: F_SETPIPE_SZ on a pipe we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(SplicePipe { read, write })
    }

    /// Send all of `payload` to `socket`, lending its pages.
    ///
    /// [`SpliceError::Unavailable`] means nothing was sent because the
    /// kernel refuses to splice here (an old kernel, a seccomp filter):
    /// send the payload the ordinary way and stop using the pipe. After
    /// [`SpliceError::Failed`] the pipe may hold bytes that never reached
    /// the socket, and neither is usable.
    pub fn send(&self, socket: RawFd, payload: &[u8]) -> Result<(), SpliceError> {
        let mut sent = 0;
        while sent < payload.len() {
            let rest = &payload[sent..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: `iov` describes memory borrowed for this call; the
            // kernel only reads it (no SPLICE_F_GIFT) and holds references
            // to its pages for as long as it needs them.
            let lent = unsafe { libc::vmsplice(self.write.as_raw_fd(), &iov, 1, 0) };
            if lent <= 0 {
                let e = if lent == 0 {
                    io::ErrorKind::WriteZero.into()
                } else {
                    io::Error::last_os_error()
                };
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    _ if sent == 0 && is_refusal(&e) => return Err(SpliceError::Unavailable(e)),
                    _ => return Err(SpliceError::Failed(e)),
                }
            }
            let lent = lent as usize;
            let mut moved = 0;
            while moved < lent {
                // SAFETY: plain descriptors and null offsets (neither end
                // is seekable).
                let n = unsafe {
                    libc::splice(
                        self.read.as_raw_fd(),
                        std::ptr::null_mut(),
                        socket,
                        std::ptr::null_mut(),
                        lent - moved,
                        libc::SPLICE_F_MOVE,
                    )
                };
                if n > 0 {
                    moved += n as usize;
                    continue;
                }
                let e = if n == 0 {
                    io::ErrorKind::WriteZero.into()
                } else {
                    io::Error::last_os_error()
                };
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    _ if sent == 0 && moved == 0 && is_refusal(&e) => {
                        // The bytes lent are still in the pipe: the pipe
                        // is spent, but the socket is untouched.
                        return Err(SpliceError::Unavailable(e));
                    }
                    _ => return Err(SpliceError::Failed(e)),
                }
            }
            sent += lent;
        }
        Ok(())
    }
}

/// Why [`SplicePipe::send`] failed.
#[derive(Debug)]
pub enum SpliceError {
    /// Splicing is refused here; nothing reached the socket.
    Unavailable(io::Error),
    /// The send failed part way (usually the connection broke).
    Failed(io::Error),
}

/// Errors that say "this kernel or sandbox will not splice this", as
/// opposed to a broken connection.
fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn payloads_arrive_whole_and_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let pipe = SplicePipe::new().unwrap();
        // Larger than the pipe, so it takes several lends, and not a
        // multiple of the page size.
        let payload: Vec<u8> = (0..3_000_001u32).map(|i| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        pipe.send(a.as_raw_fd(), &payload[..1000]).unwrap();
        pipe.send(a.as_raw_fd(), &payload[1000..]).unwrap();
        drop(a);
        assert!(reader.join().unwrap() == payload);
    }

    #[test]
    fn a_closed_peer_is_a_failure_not_a_refusal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let pipe = SplicePipe::new().unwrap();
        match pipe.send(a.as_raw_fd(), &[7u8; 100_000]) {
            Err(SpliceError::Failed(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("expected a broken pipe, got {other:?}"),
        }
    }

    #[test]
    fn a_non_socket_target_is_refused() {
        // splice into a pipe's read end is EBADF or EINVAL, never a hang.
        let pipe = SplicePipe::new().unwrap();
        let other = SplicePipe::new().unwrap();
        assert!(pipe.send(other.read.as_raw_fd(), &[1u8; 70_000]).is_err());
    }
}
