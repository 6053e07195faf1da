//! The OpenSSL side of [`super`]: the context, the handshake and the
//! stream.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use openssl::error::ErrorStack;
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslStream,
    SslVerifyMode, SslVersion,
};
use openssl::x509::X509VerifyResult;
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::{X509CheckFlags, X509VerifyFlags};

use super::{
    CA_CERT, CA_CRL, CLIENT_CERT, CLIENT_KEY, certificate_dir, load_psk, peer_name, psk_identity,
    tls_error,
};
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::transport::Transport;
use crate::uri::{NbdUri, TlsSettings};

/// TLS 1.3 suites, fastest first where the CPU has AES instructions (as
/// x86-64 and arm64 servers have). `openssl speed -evp`, 16 KiB blocks,
/// on the 2-core EPYC this was measured on: AES-128-GCM 4.46 GB/s,
/// AES-256-GCM 4.19 GB/s, ChaCha20-Poly1305 3.70 GB/s. GnuTLS servers
/// take the client's order; libnbd's own order gets ChaCha20-Poly1305
/// from nbdkit with a pre-shared key and AES-256-GCM from qemu-nbd. A
/// pre-shared key from a psktool file is used with SHA-256, which leaves
/// the first and the last.
const TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/// TLS 1.2 suites for a pre-shared key, forward-secret ones first. Only
/// PSK suites are offered: a GnuTLS server (nbdkit, qemu-nbd) takes the
/// first suite of the client's it knows and fails the handshake if that
/// one needs a certificate it does not have. OpenSSL has ECDHE-PSK only
/// with ChaCha20 or CBC; DHE-PSK with AES-GCM is faster where AES
/// instructions are.
const TLS12_PSK_SUITES: &str = "DHE-PSK-AES128-GCM-SHA256:ECDHE-PSK-CHACHA20-POLY1305:\
DHE-PSK-AES256-GCM-SHA384:DHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-CBC-SHA256:\
PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305";

/// TLS 1.2 suites for certificates: AES-128-GCM first, as in TLS 1.3,
/// then OpenSSL's defaults.
const TLS12_SUITES: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:DEFAULT";

/// Encrypted bytes gathered before they go to the socket. OpenSSL hands
/// over one record (at most 16 KiB of data) at a time; gathering a whole
/// request (up to a batch) makes it one system call instead of one per
/// record.
const WIRE_BUFFER: usize = 2 * 1024 * 1024 + 64 * 1024;

/// How the client proves who it is.
#[derive(Debug, Clone)]
enum Credentials {
    /// A pre-shared key, for this identity.
    Psk { user: String },
    /// X.509, trusting `ca-cert.pem` in this directory (else the system's
    /// roots); with a client certificate or not.
    X509 {
        ca: Option<PathBuf>,
        client_cert: bool,
    },
}

/// A URI's TLS settings made ready for connecting: files read, keys
/// loaded. Shared by every connection to the server.
pub struct TlsContext {
    ctx: SslContext,
    credentials: Credentials,
    /// The name the server's certificate must be for, if any.
    peer: Option<String>,
    verify: bool,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext")
            .field("credentials", &self.credentials)
            .field("peer", &self.peer)
            .field("verify", &self.verify)
            .finish_non_exhaustive()
    }
}

fn setup(what: &str) -> impl Fn(ErrorStack) -> Error + '_ {
    move |e| tls_error(format!("{what}: {}", reasons(&e)))
}

/// OpenSSL's reasons, without its codes and file names.
fn reasons(stack: &ErrorStack) -> String {
    let mut out: Vec<String> = Vec::new();
    for e in stack.errors() {
        let r = e.reason().unwrap_or("unknown error").to_string();
        if !out.contains(&r) {
            out.push(r);
        }
    }
    if out.is_empty() {
        "unknown error".to_string()
    } else {
        out.join(", ")
    }
}

fn psk_credentials(b: &mut SslContextBuilder, file: &Path, t: &TlsSettings) -> Result<Credentials> {
    let user = psk_identity(t)?;
    let key = load_psk(file, &user)?;
    b.set_cipher_list(TLS12_PSK_SUITES)
        .map_err(setup("TLS 1.2 PSK cipher suites"))?;
    let identity = user.clone();
    b.set_psk_client_callback(move |_ssl, _hint, id_buf, psk_buf| {
        let id = identity.as_bytes();
        // The identity goes out NUL-terminated; both must fit OpenSSL's
        // buffers, or the handshake fails here rather than overflow.
        if id.len() >= id_buf.len() || key.len() > psk_buf.len() {
            return Err(ErrorStack::get());
        }
        id_buf[..id.len()].copy_from_slice(id);
        id_buf[id.len()] = 0;
        psk_buf[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    Ok(Credentials::Psk { user })
}

fn x509_credentials(b: &mut SslContextBuilder, t: &TlsSettings) -> Result<Credentials> {
    b.set_cipher_list(TLS12_SUITES)
        .map_err(setup("TLS 1.2 cipher suites"))?;
    let dir = certificate_dir(t)?;
    let file = |name: &str| dir.as_ref().map(|d| d.join(name)).filter(|p| p.is_file());
    let ca = file(CA_CERT);
    match &ca {
        Some(ca) => b
            .set_ca_file(ca)
            .map_err(setup(&format!("{}", ca.display())))?,
        None => {
            if let Some(d) = &dir {
                log::debug!("{}: no {CA_CERT}; trusting the system's roots", d.display());
            }
            b.set_default_verify_paths()
                .map_err(setup("the system's trusted roots"))?
        }
    }
    let client_cert = match (file(CLIENT_CERT), file(CLIENT_KEY)) {
        (Some(cert), Some(key)) => {
            b.set_certificate_chain_file(&cert)
                .map_err(setup(&format!("{}", cert.display())))?;
            b.set_private_key_file(&key, SslFiletype::PEM)
                .map_err(setup(&format!("{}", key.display())))?;
            b.check_private_key().map_err(setup(&format!(
                "{} does not match {}",
                key.display(),
                cert.display()
            )))?;
            true
        }
        _ => false,
    };
    if let Some(crl) = file(CA_CRL) {
        let what = format!("{}", crl.display());
        let store = b.cert_store_mut();
        store
            .add_lookup(X509Lookup::file())
            .map_err(setup(&what))?
            .load_crl_file(&crl, SslFiletype::PEM)
            .map_err(setup(&what))?;
        store
            .set_flags(X509VerifyFlags::CRL_CHECK)
            .map_err(setup(&what))?;
    }
    Ok(Credentials::X509 { ca, client_cert })
}

impl TlsContext {
    /// Read the credentials `uri`'s TLS settings name (the defaults for a
    /// URI without TLS). Fails with [`ErrorKind::Tls`] naming the file
    /// that could not be used.
    pub fn new(uri: &NbdUri) -> Result<TlsContext> {
        let t = uri.tls.clone().unwrap_or_default();
        let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(setup("TLS"))?;
        // The NBD specification asks for TLS 1.2 at least.
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(setup("TLS"))?;
        b.set_ciphersuites(TLS13_SUITES).map_err(setup("TLS"))?;
        // One system call per record, not one for its header and one for
        // the rest. (A read buffer of 64 or 256 KiB instead of one record,
        // through SSL_CTX_set_default_read_buffer_len, made a quarter of
        // the reads but no less CPU: 1 GiB from nbdkit over TCP, 0.54 to
        // 0.67 s with one record, 0.64 to 0.79 s with 256 KiB.)
        b.set_read_ahead(true);
        let credentials = match &t.psk_file {
            Some(file) => psk_credentials(&mut b, file, &t)?,
            None => x509_credentials(&mut b, &t)?,
        };
        b.set_verify(if t.verify_peer {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        Ok(TlsContext {
            ctx: b.build(),
            credentials,
            peer: peer_name(uri, &t),
            verify: t.verify_peer,
        })
    }

    /// Run the TLS handshake on `transport`, a plain socket whose server
    /// has just acknowledged `NBD_OPT_STARTTLS`; `name` names the server
    /// in log messages.
    pub(crate) fn handshake(&self, transport: Transport, name: &str) -> Result<Transport> {
        let mut ssl = Ssl::new(&self.ctx).map_err(setup("TLS"))?;
        if let Some(peer) = &self.peer {
            // An IPv6 literal may carry a zone, which certificates do not.
            let literal = peer.split('%').next().unwrap_or(peer);
            match literal.parse::<IpAddr>() {
                Ok(ip) if self.verify => ssl.param_mut().set_ip(ip).map_err(setup("TLS"))?,
                Ok(_) => {}
                Err(_) => {
                    ssl.set_hostname(peer)
                        .map_err(setup(&format!("host name '{peer}'")))?;
                    if self.verify {
                        let p = ssl.param_mut();
                        p.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
                        p.set_host(peer)
                            .map_err(setup(&format!("host name '{peer}'")))?;
                    }
                }
            }
        }
        let wire = Wire {
            sock: transport,
            out: Vec::new(),
        };
        match ssl.connect(wire) {
            Ok(stream) => {
                let s = TlsStream { ssl: stream };
                log::debug!("{name}: {}", s.describe());
                Ok(Transport::Tls(Box::new(s)))
            }
            Err(e) => Err(self.failure(e)),
        }
    }

    /// Say why a handshake failed, with what the user can do about it.
    fn failure(&self, e: HandshakeError<Wire>) -> Error {
        let mid = match e {
            HandshakeError::SetupFailure(stack) => return setup("TLS")(stack),
            HandshakeError::WouldBlock(_) => {
                return Error::new(ErrorKind::Timeout, "timed out during the TLS handshake")
                    .during(Operation::Handshake);
            }
            HandshakeError::Failure(mid) => mid,
        };
        let verify = mid.ssl().verify_result();
        if verify != X509VerifyResult::OK {
            return self.rejected_certificate(verify);
        }
        let err = mid.into_error();
        let reason = match err.ssl_error() {
            Some(stack) => reasons(stack),
            None => match err.into_io_error() {
                Ok(io) if io.kind() != io::ErrorKind::UnexpectedEof => {
                    return Error::io(Operation::Handshake, io);
                }
                _ => "the server closed the connection".to_string(),
            },
        };
        let msg = match &self.credentials {
            Credentials::Psk { user } => format!(
                "TLS: the server did not accept the pre-shared key of user '{user}' ({reason})"
            ),
            Credentials::X509 {
                client_cert: false, ..
            } if reason.contains("certificate required") => format!(
                "TLS: the server requires a client certificate ({reason}); put {CLIENT_CERT} and {CLIENT_KEY} in the tls-certificates directory"
            ),
            Credentials::X509 {
                client_cert: true, ..
            } if reason.contains("alert") => {
                format!("TLS: the server did not accept the client certificate ({reason})")
            }
            Credentials::X509 { .. } => format!("TLS: {reason}"),
        };
        Error::new(ErrorKind::Tls, msg).during(Operation::Handshake)
    }

    fn rejected_certificate(&self, verify: X509VerifyResult) -> Error {
        let why = verify.error_string();
        let trusted = match &self.credentials {
            Credentials::X509 { ca: Some(ca), .. } => format!("the CA in {}", ca.display()),
            _ => "the system's trusted roots".to_string(),
        };
        let peer = self.peer.as_deref().unwrap_or("");
        // X509_V_ERR_* values, stable across OpenSSL versions.
        let hint = match verify.as_raw() {
            2 | 18 | 19 | 20 | 21 => format!(" (not signed by {trusted})"),
            9 | 10 => " (check the certificate's dates and the clocks)".to_string(),
            62 | 64 => {
                format!(" (it is not for '{peer}'; tls-hostname= names the host it was issued for)")
            }
            _ => String::new(),
        };
        Error::new(
            ErrorKind::Tls,
            format!("TLS: the server's certificate was not accepted: {why}{hint}"),
        )
        .during(Operation::Handshake)
    }
}

/// The socket under a TLS session, with the encrypted bytes OpenSSL
/// writes gathered until a message is complete.
struct Wire {
    sock: Transport,
    out: Vec<u8>,
}

impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wire")
            .field("sock", &self.sock)
            .field("pending", &self.out.len())
            .finish()
    }
}

impl Wire {
    /// Send what is gathered. On an error the unsent rest is kept.
    fn send_pending(&mut self) -> io::Result<()> {
        let mut done = 0;
        let r = loop {
            if done == self.out.len() {
                break Ok(());
            }
            match self.sock.write(&self.out[done..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.out.drain(..done);
        r
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Whatever OpenSSL wrote must be out before it waits for an
        // answer (a handshake flight, an alert).
        if !self.out.is_empty() {
            self.send_pending()?;
        }
        self.sock.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > WIRE_BUFFER {
            self.send_pending()?;
        }
        if buf.len() > WIRE_BUFFER {
            return self.sock.write(buf);
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

/// An NBD connection inside TLS.
#[derive(Debug)]
pub struct TlsStream {
    ssl: SslStream<Wire>,
}

impl TlsStream {
    /// The socket underneath (for its descriptor, timeouts and shutting
    /// it down; its bytes are TLS records).
    pub fn socket(&self) -> &Transport {
        &self.ssl.get_ref().sock
    }

    /// The protocol version and cipher suite negotiated, e.g.
    /// `TLSv1.3 TLS_AES_128_GCM_SHA256`.
    pub fn describe(&self) -> String {
        let ssl = self.ssl.ssl();
        let cipher = ssl.current_cipher().map_or("no cipher", |c| c.name());
        format!("TLS: {} {cipher}", ssl.version_str())
    }

    /// Send one message made of `parts`: encrypted into records, then
    /// written to the socket together.
    pub(crate) fn send_message(&mut self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        for part in parts {
            self.ssl.write_all(part)?;
        }
        self.ssl.get_mut().send_pending()
    }

    /// Say goodbye in TLS (`close_notify`), before the socket is shut
    /// down; a failure only means the server went first.
    pub(crate) fn close(&mut self) {
        let _ = self.ssl.shutdown();
        let _ = self.ssl.get_mut().send_pending();
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.ssl.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ssl.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ssl.get_mut().send_pending()
    }
}
