//! The byte stream under an NBD connection: a TCP, Unix domain or vsock
//! socket, an ssh child process ([`crate::ssh`]), or any of them inside
//! TLS.
//!
//! Sockets are blocking (one thread drives one connection) and TCP ones
//! have Nagle's algorithm off (the protocol asks for it: small request
//! headers must not wait for an ACK). Unix sockets get large kernel
//! buffers, so that many requests and replies can be in flight without
//! the sender stalling; TCP buffers are left to the kernel's autotuning
//! (measured in `connect_tcp_addr`).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use super::uri::{NbdAddress, NbdUri};

/// Kernel send and receive buffer size asked for on every socket.
pub const SOCKET_BUFFER_SIZE: usize = 4 * 1024 * 1024;

/// A connected stream socket.
///
/// Reads and writes need `&mut`: a TLS session changes state with each.
/// A buffered reader can own the transport and writes still go straight
/// to it through `BufReader::get_mut`, which bypasses only the buffer.
#[derive(Debug)]
pub enum Transport {
    /// TCP connection.
    Tcp(TcpStream),
    /// Unix domain socket connection.
    Unix(UnixStream),
    /// `AF_VSOCK` connection (to a virtual machine's host, or a guest).
    Vsock(Socket),
    /// A connection carried by ssh to a remote host.
    Ssh(Box<crate::ssh::SshStream>),
    /// A TCP or Unix socket inside TLS.
    #[cfg(feature = "tls")]
    Tls(Box<crate::tls::TlsStream>),
}

/// Set a Unix socket's buffer sizes; the kernel may clamp them, and a
/// failure only costs speed, so it is logged, not reported.
fn tune_buffers(sock: SockRef<'_>) {
    if let Err(e) = sock.set_send_buffer_size(SOCKET_BUFFER_SIZE) {
        log::debug!("cannot set SO_SNDBUF: {e}");
    }
    if let Err(e) = sock.set_recv_buffer_size(SOCKET_BUFFER_SIZE) {
        log::debug!("cannot set SO_RCVBUF: {e}");
    }
}

/// How long a vsock connect may take when no timeout is given.
pub const VSOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connect to vsock `cid:port` within `timeout` (else
/// [`VSOCK_CONNECT_TIMEOUT`]); the error names the address.
fn connect_vsock(cid: u32, port: u32, timeout: Option<Duration>) -> io::Result<Socket> {
    let named = |e: io::Error| {
        let hint = match e.raw_os_error() {
            Some(libc::ENODEV) => " (no vsock transport to that CID here)",
            // vsock answers a connect to a port nobody listens on so.
            Some(libc::ECONNRESET | libc::ECONNREFUSED) => " (nothing listens on that port)",
            Some(libc::EAFNOSUPPORT) => " (this kernel has no vsock)",
            _ => "",
        };
        let why = crate::error::describe_io(&e);
        io::Error::new(
            e.kind(),
            format!("vsock CID {cid} port {port}: {why}{hint}"),
        )
    };
    let sock = Socket::new(Domain::VSOCK, Type::STREAM, None).map_err(named)?;
    let sa = SockAddr::vsock(cid, port);
    sock.connect_timeout(&sa, timeout.unwrap_or(VSOCK_CONNECT_TIMEOUT))
        .map_err(named)?;
    Ok(sock)
}

fn connect_tcp_addr(addr: &SocketAddr, timeout: Option<Duration>) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
    // No SO_SNDBUF/SO_RCVBUF: setting them turns off the kernel's
    // autotuning, and where net.core.rmem_max is the usual 208 KiB it would
    // pin the window at 416 KiB, a cap on any link with a larger
    // bandwidth-delay product. On loopback they made no difference (nbdkit
    // memory to memory, 2 GiB, 8 alternating rounds: 1.41 s left to the
    // kernel, 1.44 s with 4 MiB asked).
    sock.set_nodelay(true)?;
    let sa = SockAddr::from(*addr);
    match timeout {
        Some(t) => sock.connect_timeout(&sa, t)?,
        None => sock.connect(&sa)?,
    }
    Ok(sock.into())
}

impl Transport {
    /// Send one message made of `parts` (a request header and its
    /// payload).
    ///
    /// On TCP each part is its own write: a payload written together with
    /// its 28-byte header lands 28 bytes into the kernel's buffer page, and
    /// the kernel's copy into that misaligned memory costs about 1.5 times
    /// the CPU (1 GiB over loopback: 0.89 s of system time against 0.58 s
    /// written apart). With TCP_NODELAY the header goes out as a small
    /// segment of its own, which costs far less. On Unix sockets one
    /// vectored write is faster (qcow2 to qcow2 through qemu-nbd: 0.72 s
    /// against 0.85 s), so it stays.
    ///
    /// Under TLS the parts are encrypted into records that then go to the
    /// socket in one write.
    pub fn send_message(&mut self, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => {
                let mut w: &TcpStream = s;
                for part in parts.iter() {
                    w.write_all(part)?;
                }
                Ok(())
            }
            Transport::Unix(s) => write_all_vectored(&mut &*s, parts),
            Transport::Vsock(s) => write_all_vectored(&mut &*s, parts),
            Transport::Ssh(s) => s.socket_mut().send_message(parts),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.send_message(parts),
        }
    }

    /// The plain socket: this one, the one under TLS, or this side of
    /// the socket pair an ssh child process uses.
    pub fn socket(&self) -> &Transport {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.socket().socket(),
            Transport::Ssh(s) => s.socket(),
            _ => self,
        }
    }

    /// The transport under TLS, if any: this one otherwise.
    fn under_tls(&self) -> &Transport {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.socket(),
            _ => self,
        }
    }

    /// The connection crosses a network as TCP does (with or without
    /// TLS): TCP itself, vsock, or ssh (whose own connection is TCP).
    pub fn is_tcp(&self) -> bool {
        matches!(
            self.under_tls(),
            Transport::Tcp(_) | Transport::Vsock(_) | Transport::Ssh(_)
        )
    }

    /// The connection runs inside TLS.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        {
            matches!(self, Transport::Tls(_))
        }
        #[cfg(not(feature = "tls"))]
        {
            false
        }
    }

    /// What TLS negotiated (version and cipher suite), if TLS is on.
    pub fn tls_description(&self) -> Option<String> {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(s) => Some(s.describe()),
            _ => None,
        }
    }

    /// End TLS politely (`close_notify`) if it is on; nothing otherwise.
    pub fn close_tls(&mut self) {
        #[cfg(feature = "tls")]
        if let Transport::Tls(s) = self {
            s.close();
        }
    }

    /// Connect to the server `uri` names. `timeout` bounds the TCP connect
    /// and, afterwards, every read and write.
    pub fn connect(uri: &NbdUri, timeout: Option<Duration>) -> io::Result<Transport> {
        let t = match &uri.address {
            NbdAddress::Tcp { host, port } => {
                let mut last = None;
                let mut stream = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match connect_tcp_addr(&addr, timeout) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => {
                            log::debug!("connect to {addr}: {e}");
                            last = Some(e);
                        }
                    }
                }
                match stream {
                    Some(s) => Transport::Tcp(s),
                    None => {
                        return Err(last.unwrap_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::NotFound,
                                format!("host '{host}' has no addresses"),
                            )
                        }));
                    }
                }
            }
            NbdAddress::Unix { path } => {
                let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
                tune_buffers(SockRef::from(&sock));
                // SockAddr::unix treats a leading NUL as an abstract name.
                sock.connect(&SockAddr::unix(path)?)?;
                let stream: std::os::unix::net::UnixStream = sock.into();
                Transport::Unix(stream)
            }
            NbdAddress::Vsock { cid, port } => {
                Transport::Vsock(connect_vsock(*cid, *port, timeout)?)
            }
            NbdAddress::Ssh {
                user,
                host,
                port,
                socket,
                nbd_port,
            } => {
                let target = crate::ssh::SshTarget {
                    user: user.as_deref(),
                    host,
                    port: *port,
                    socket: socket.as_deref(),
                    nbd_port: *nbd_port,
                };
                Transport::Ssh(Box::new(crate::ssh::SshStream::connect(&target, timeout)?))
            }
        };
        t.set_timeout(timeout)?;
        Ok(t)
    }

    /// Wrap an already connected Unix socket (a socketpair shared with a
    /// server subprocess, or a test peer).
    pub fn from_unix(stream: UnixStream) -> Transport {
        tune_buffers(SockRef::from(&stream));
        Transport::Unix(stream)
    }

    /// Wrap an already connected TCP socket.
    pub fn from_tcp(stream: TcpStream) -> io::Result<Transport> {
        stream.set_nodelay(true)?;
        Ok(Transport::Tcp(stream))
    }

    /// Bound every later read and write; `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self.socket() {
            Transport::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Transport::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Transport::Vsock(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            #[cfg(feature = "tls")]
            Transport::Tls(_) => unreachable!("socket() is never TLS"),
            Transport::Ssh(_) => unreachable!("socket() is never ssh"),
        }
    }

    /// Shut down one or both directions of the socket (under TLS too:
    /// a read blocked inside TLS then returns).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self.socket() {
            Transport::Tcp(s) => s.shutdown(how),
            Transport::Unix(s) => s.shutdown(how),
            Transport::Vsock(s) => s.shutdown(how),
            #[cfg(feature = "tls")]
            Transport::Tls(_) => unreachable!("socket() is never TLS"),
            Transport::Ssh(_) => unreachable!("socket() is never ssh"),
        }
    }

    /// A second handle on the same socket (a duplicated descriptor).
    /// Under TLS it is the plain socket underneath: good for shutting
    /// the connection down from another thread, not for reading or
    /// writing, which would break the TLS session.
    pub fn try_clone(&self) -> io::Result<Transport> {
        Ok(match self.socket() {
            Transport::Tcp(s) => Transport::Tcp(s.try_clone()?),
            Transport::Unix(s) => Transport::Unix(s.try_clone()?),
            Transport::Vsock(s) => Transport::Vsock(s.try_clone()?),
            #[cfg(feature = "tls")]
            Transport::Tls(_) => unreachable!("socket() is never TLS"),
            Transport::Ssh(_) => unreachable!("socket() is never ssh"),
        })
    }
}

impl std::os::fd::AsRawFd for Transport {
    /// The socket's descriptor (under TLS, the socket underneath).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self.socket() {
            Transport::Tcp(s) => s.as_raw_fd(),
            Transport::Unix(s) => s.as_raw_fd(),
            Transport::Vsock(s) => s.as_raw_fd(),
            #[cfg(feature = "tls")]
            Transport::Tls(_) => unreachable!("socket() is never TLS"),
            Transport::Ssh(_) => unreachable!("socket() is never ssh"),
        }
    }
}

impl From<UnixStream> for Transport {
    fn from(s: UnixStream) -> Transport {
        Transport::from_unix(s)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read(buf),
            Transport::Unix(s) => s.read(buf),
            Transport::Vsock(s) => s.read(buf),
            Transport::Ssh(s) => s.socket_mut().read(buf),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.read(buf),
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read_vectored(bufs),
            Transport::Unix(s) => s.read_vectored(bufs),
            Transport::Vsock(s) => s.read_vectored(bufs),
            Transport::Ssh(s) => s.socket_mut().read_vectored(bufs),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.read_vectored(bufs),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.write(buf),
            Transport::Unix(s) => s.write(buf),
            Transport::Vsock(s) => s.write(buf),
            Transport::Ssh(s) => s.socket_mut().write(buf),
            // What a write hands over goes out at once, as on a plain
            // socket (requests go through `send_message`).
            #[cfg(feature = "tls")]
            Transport::Tls(s) => {
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.write_vectored(bufs),
            Transport::Unix(s) => s.write_vectored(bufs),
            Transport::Vsock(s) => s.write_vectored(bufs),
            Transport::Ssh(s) => s.socket_mut().write_vectored(bufs),
            #[cfg(feature = "tls")]
            Transport::Tls(s) => {
                let n = s.write_vectored(bufs)?;
                s.flush()?;
                Ok(n)
            }
        }
    }

    /// Under TLS, sends what is gathered; plain sockets have nothing to
    /// flush.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// Write every byte of `bufs`, in order, with as few system calls as the
/// kernel allows (std's `write_all_vectored` is not stable).
///
/// Use [`Transport::send_message`] for NBD requests: it knows when one
/// vectored write is slower than several.
pub fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write whole buffer",
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;

    #[test]
    fn unix_connect_read_write_vectored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 11];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        });
        let mut t =
            Transport::connect(&NbdUri::unix(&path, ""), Some(Duration::from_secs(5))).unwrap();
        let mut slices = [
            IoSlice::new(b"hello"),
            IoSlice::new(b" "),
            IoSlice::new(b"world"),
        ];
        write_all_vectored(&mut t, &mut slices).unwrap();
        let mut back = [0u8; 11];
        t.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello world");
        t.shutdown(Shutdown::Both).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn tcp_connect_sets_nodelay_and_leaves_buffers_to_the_kernel() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"x").unwrap();
        });
        let mut t = Transport::connect(&NbdUri::tcp("127.0.0.1", port, ""), None).unwrap();
        // What the kernel makes of the size nbdcp asks for on Unix sockets.
        let asked = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        tune_buffers(SockRef::from(&asked));
        let forced = asked.recv_buffer_size().unwrap();
        match &t {
            Transport::Tcp(s) => {
                assert!(s.nodelay().unwrap());
                let got = SockRef::from(s).recv_buffer_size().unwrap();
                assert_ne!(got, forced, "SO_RCVBUF was set on a TCP socket");
            }
            _ => panic!("expected TCP"),
        }
        let mut b = [0u8; 1];
        t.read_exact(&mut b).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn connect_refused_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        assert!(Transport::connect(&NbdUri::unix(&path, ""), None).is_err());
    }
}
