//! [`Server`]: a Unix socket in a fresh directory, a thread per
//! connection running a script on a [`Peer`], or the in-memory export of
//! [`super::memory`].

use std::io::{self, Write};
use std::os::unix::net::UnixListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::memory::{self, FakeConfig, Memory};
use super::peer::{Export, Hook, Peer};
use crate::uri::NbdUri;
use crate::wire::Request;

/// Poll interval of the accept loop.
const POLL: Duration = Duration::from_millis(5);

/// No connection thread blocks longer than this on a silent client.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// What a server's connections share with the test.
pub(super) struct State {
    connections: AtomicUsize,
    /// Every request read, in order: (connection, request).
    log: Mutex<Vec<(usize, Request)>>,
    logged: Condvar,
    errors: Mutex<Vec<String>>,
    panics: Mutex<Vec<String>>,
}

impl State {
    pub(super) fn log_request(&self, connection: usize, r: Request) {
        self.log.lock().unwrap().push((connection, r));
        self.logged.notify_all();
    }
}

type Script = dyn Fn(&mut Peer, usize) -> io::Result<()> + Send + Sync;

/// A scripted NBD server on a Unix socket in its own temporary directory.
///
/// Each connection runs on its own thread: either a script
/// ([`Server::start`], [`Server::nbd`]) or the in-memory export
/// ([`Server::memory`]). Every request a connection reads is logged, and
/// a test can wait for one ([`Server::wait_for_request`]) instead of
/// sleeping. Dropping the server stops accepting connections (those open
/// go on until their client leaves); if a script panicked (a failed
/// assertion about what the client sent), the drop panics too, so the
/// test fails.
pub struct Server {
    dir: tempfile::TempDir,
    socket: PathBuf,
    export: String,
    state: Arc<State>,
    memory: Option<Arc<Memory>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Listen, and run `script(peer, connection)` (from 1) for every
    /// connection. What a script returns as an error is kept (see
    /// [`Server::errors`]): mostly the client hanging up, as expected.
    pub fn start(
        script: impl Fn(&mut Peer, usize) -> io::Result<()> + Send + Sync + 'static,
    ) -> Server {
        Server::listen(String::new(), None, usize::MAX, Arc::new(script))
    }

    /// A server that negotiates `export` ([`Peer::negotiate`]) and then
    /// serves it ([`Peer::serve`]), letting `hook` take over any request.
    pub fn nbd(
        export: Export,
        hook: impl Fn(&mut Peer, &Request, usize) -> io::Result<Hook> + Send + Sync + 'static,
    ) -> Server {
        let name = export.name.clone();
        let script = move |p: &mut Peer, _: usize| {
            if p.negotiate(&export)? {
                p.serve(&hook)?;
            }
            Ok(())
        };
        Server::listen(name, None, usize::MAX, Arc::new(script))
    }

    /// A server that sends `bytes` on every connection, then reads and
    /// drops whatever comes until the client hangs up.
    pub fn sends_then_waits(bytes: Vec<u8>) -> Server {
        Server::start(move |p, _| {
            p.raw(&bytes)?;
            p.drain();
            Ok(())
        })
    }

    /// The in-memory export: `size` zero bytes, behaving (and
    /// misbehaving) as `configure` sets up its [`FakeConfig`].
    pub fn memory(size: usize, configure: impl FnOnce(&mut FakeConfig)) -> Server {
        let mut cfg = FakeConfig::default();
        configure(&mut cfg);
        let name = cfg.export.clone();
        let max = cfg.max_connections;
        let m = Arc::new(Memory::new(cfg, size));
        let m2 = m.clone();
        let script = move |p: &mut Peer, _: usize| memory::serve(&m2, p);
        Server::listen(name, Some(m), max, Arc::new(script))
    }

    fn listen(
        export: String,
        memory: Option<Arc<Memory>>,
        max_connections: usize,
        script: Arc<Script>,
    ) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("nbd-testkit-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            connections: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            logged: Condvar::new(),
            errors: Mutex::new(Vec::new()),
            panics: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (state, stop) = (state.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let n = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
                            if n > max_connections {
                                drop(s);
                                continue;
                            }
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(IDLE_LIMIT)).unwrap();
                            s.set_write_timeout(Some(IDLE_LIMIT)).unwrap();
                            let (script, state) = (script.clone(), state.clone());
                            thread::spawn(move || {
                                let mut peer = Peer::for_server(s, state.clone(), n);
                                match catch_unwind(AssertUnwindSafe(|| script(&mut peer, n))) {
                                    Ok(Ok(())) => {}
                                    Ok(Err(e)) => {
                                        let e = format!("connection {n}: {e}");
                                        state.errors.lock().unwrap().push(e);
                                    }
                                    Err(panic) => {
                                        let msg = panic
                                            .downcast_ref::<String>()
                                            .cloned()
                                            .or_else(|| {
                                                panic.downcast_ref::<&str>().map(|s| s.to_string())
                                            })
                                            .unwrap_or_default();
                                        let e = format!("connection {n} panicked: {msg}");
                                        state.panics.lock().unwrap().push(e);
                                    }
                                }
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
                        Err(e) => panic!("testkit server accept: {e}"),
                    }
                }
            })
        };
        Server {
            dir,
            socket,
            export,
            state,
            memory,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// The URI to connect to.
    pub fn uri(&self) -> NbdUri {
        NbdUri::unix(&self.socket, self.export.clone())
    }

    /// The URI as text, as a command line takes it.
    pub fn uri_string(&self) -> String {
        self.uri().to_string()
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The directory holding the socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Errors the scripts returned (usually the client hanging up).
    pub fn errors(&self) -> Vec<String> {
        self.state.errors.lock().unwrap().clone()
    }

    /// Every request received, in order, over all connections.
    pub fn requests(&self) -> Vec<Request> {
        self.logged().into_iter().map(|(_, r)| r).collect()
    }

    /// Every request received, in order, with its connection's number.
    pub fn logged(&self) -> Vec<(usize, Request)> {
        self.state.log.lock().unwrap().clone()
    }

    /// Wait until a request for which `wanted(connection, request)` holds
    /// has been received (it may have been already), and return it; panic
    /// naming `what` after `limit`.
    pub fn wait_for_request(
        &self,
        what: &str,
        limit: Duration,
        mut wanted: impl FnMut(usize, &Request) -> bool,
    ) -> Request {
        let end = Instant::now() + limit;
        let mut log = self.state.log.lock().unwrap();
        loop {
            if let Some((_, r)) = log.iter().find(|(c, r)| wanted(*c, r)) {
                return *r;
            }
            let now = Instant::now();
            assert!(now < end, "timed out after {limit:?} waiting for {what}");
            log = self.state.logged.wait_timeout(log, end - now).unwrap().0;
        }
    }

    fn in_memory(&self) -> &Memory {
        self.memory
            .as_deref()
            .expect("only Server::memory has an in-memory export")
    }

    /// The in-memory export's contents.
    pub fn data(&self) -> Vec<u8> {
        self.in_memory().data.lock().unwrap().clone()
    }

    /// Overwrite the in-memory export's contents at `offset`.
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        self.in_memory().data.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Longest write request the in-memory export received.
    pub fn max_write_seen(&self) -> u64 {
        self.in_memory().max_write.load(Ordering::SeqCst)
    }

    /// Most replies the in-memory export held back at once: with
    /// `reorder`, how many requests the client had in flight.
    pub fn max_pending(&self) -> usize {
        self.in_memory().max_pending.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let panics = self.state.panics.lock().unwrap().clone();
        if !panics.is_empty() && !thread::panicking() {
            let _ = writeln!(io::stderr(), "testkit server scripts panicked: {panics:?}");
            panic!("a testkit server script panicked: {panics:?}");
        }
    }
}
