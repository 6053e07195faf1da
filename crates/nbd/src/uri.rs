//! NBD URIs, as described by the NBD project's `uri.md` and libnbd's
//! `nbd_connect_uri(3)`: `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, and their TLS forms
//! `nbds://[user@]host[:port]/export` and
//! `nbds+unix://[user@]/export?socket=PATH`, which take the query
//! parameters `tls-certificates=DIR`, `tls-verify-peer=BOOL`,
//! `tls-psk-file=FILE`, `tls-username=NAME` and `tls-hostname=NAME`
//! ([`TlsSettings`]).
//!
//! `nbd+vsock://CID[:PORT]/export` (and `nbds+vsock`) reach a server over
//! `AF_VSOCK`, from a virtual machine to its host (CID 2, the default) or
//! another guest. `nbd+ssh://[user@]host[:port]/export?socket=PATH` (and
//! `nbds+ssh`) run `ssh` to the host and, there, `nc -U -- PATH`, which
//! joins ssh's standard input and output to the server's Unix socket;
//! without `socket=`, `nc localhost NBD-PORT` (`nbd-port=`, default
//! 10809): the URIs libnbd 1.22 added, handled the way it does.
//!
//! Parsing is pure: nothing is read here (the login name, certificate
//! files and keys are looked up when connecting).

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, ErrorKind, Result};

/// The IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Longest export name accepted (the protocol's string limit).
const MAX_EXPORT_NAME: usize = 4096;

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP: host name or IP address (IPv6 without brackets), and port.
    Tcp {
        /// Host name or address literal.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket; a path starting with a NUL byte names a Linux
    /// abstract socket.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
    /// `AF_VSOCK`: context ID and port.
    Vsock {
        /// Context ID (2 is the host).
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// A server reached through `ssh` to `host`, which runs `nc` there.
    Ssh {
        /// The ssh user (`user@`); `None` leaves it to ssh.
        user: Option<String>,
        /// Host name or address literal (never starting with `-`).
        host: String,
        /// The ssh port; `None` leaves it to ssh (22 or its config).
        port: Option<u16>,
        /// `socket=PATH`: the server's Unix socket on the remote host.
        socket: Option<PathBuf>,
        /// `nbd-port=N`: without `socket=`, the TCP port on the remote
        /// host's localhost.
        nbd_port: u16,
    },
}

/// How to authenticate and what to check over TLS: the `tls-*` query
/// parameters of an `nbds` URI, and its user part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// `tls-certificates=DIR`: the X.509 directory (`ca-cert.pem`,
    /// optionally `client-cert.pem` with `client-key.pem`, and
    /// `ca-crl.pem`). Unset, libnbd's default directories are tried, then
    /// the system's trusted roots.
    pub certificates: Option<PathBuf>,
    /// `tls-verify-peer`: check the server's certificate (default true).
    pub verify_peer: bool,
    /// `tls-psk-file=FILE`: authenticate with a pre-shared key from this
    /// psktool file (`username:hexkey` lines) instead of certificates.
    pub psk_file: Option<PathBuf>,
    /// `tls-username=NAME`: the PSK identity.
    pub username: Option<String>,
    /// The user part of the URI (`nbds://alice@host/`): the PSK identity
    /// when `tls-username` is not given.
    pub user: Option<String>,
    /// `tls-hostname=NAME`: the name the server's certificate must be for,
    /// instead of the host connected to.
    pub hostname: Option<String>,
}

impl Default for TlsSettings {
    /// TLS with the default certificates and peer verification on.
    fn default() -> TlsSettings {
        TlsSettings {
            certificates: None,
            verify_peer: true,
            psk_file: None,
            username: None,
            user: None,
            hostname: None,
        }
    }
}

impl TlsSettings {
    /// The PSK identity the URI names: `tls-username`, else its user part.
    /// `None` means the login name, looked up when connecting.
    pub fn named_user(&self) -> Option<&str> {
        self.username.as_deref().or(self.user.as_deref())
    }
}

/// A parsed NBD URI: where to connect and which export to ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Server address.
    pub address: NbdAddress,
    /// Export name (may be empty: the server's default export).
    pub export: String,
    /// TLS is required (`nbds`, `nbds+unix`), with these settings; `None`
    /// is plain text.
    pub tls: Option<TlsSettings>,
}

impl NbdUri {
    /// Parse an NBD URI.
    ///
    /// Errors are [`ErrorKind::InvalidInput`] naming what is wrong. TLS URIs parse
    /// whether or not TLS was built in: connecting says if it was not.
    pub fn parse(s: &str) -> Result<NbdUri> {
        parse(s).map_err(|e| {
            let kind = e.kind();
            Error::new(kind, format!("bad NBD URI '{s}': {e}"))
        })
    }

    /// A URI for the Unix socket `path`, e.g. for a server nbdcp starts
    /// itself.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            address: NbdAddress::Unix { path: path.into() },
            export: export.into(),
            tls: None,
        }
    }

    /// A URI for a TCP server.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdUri {
        NbdUri {
            address: NbdAddress::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: None,
        }
    }

    /// The same URI with TLS required, with `settings`.
    pub fn with_tls(mut self, settings: TlsSettings) -> NbdUri {
        self.tls = Some(settings);
        self
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Whether a string looks like an NBD URI of any kind we recognise
    /// (including unsupported ones), so that callers can route it here and
    /// get a precise error rather than "no such file".
    pub fn looks_like_uri(s: &str) -> bool {
        let lower = s.get(..12).unwrap_or(s).to_ascii_lowercase();
        ["nbd://", "nbd+", "nbds://", "nbds+"]
            .iter()
            .any(|p| lower.starts_with(p))
    }
}

impl FromStr for NbdUri {
    type Err = Error;

    fn from_str(s: &str) -> Result<NbdUri> {
        NbdUri::parse(s)
    }
}

/// Percent-encode a URI component, leaving alone RFC 3986 unreserved
/// characters and the bytes in `keep` (`/` in paths, `:` in IPv6 hosts).
fn encode_component(out: &mut fmt::Formatter<'_>, bytes: &[u8], keep: &[u8]) -> fmt::Result {
    for &b in bytes {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || keep.contains(&b);
        if plain {
            write!(out, "{}", b as char)?;
        } else {
            write!(out, "%{b:02X}")?;
        }
    }
    Ok(())
}

impl fmt::Display for NbdUri {
    /// The URI in canonical form, percent-encoded where needed, so that it
    /// parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls.is_some() { "nbds" } else { "nbd" })?;
        f.write_str(match self.address {
            NbdAddress::Tcp { .. } => "",
            NbdAddress::Unix { .. } => "+unix",
            NbdAddress::Vsock { .. } => "+vsock",
            NbdAddress::Ssh { .. } => "+ssh",
        })?;
        f.write_str("://")?;
        let user = match &self.address {
            NbdAddress::Ssh { user, .. } => user.as_deref(),
            _ => self.tls.as_ref().and_then(|t| t.user.as_deref()),
        };
        if let Some(user) = user {
            encode_component(f, user.as_bytes(), b"")?;
            f.write_str("@")?;
        }
        let host_port = match &self.address {
            NbdAddress::Tcp { host, port } => {
                Some((host, (*port != DEFAULT_PORT).then_some(*port)))
            }
            NbdAddress::Ssh { host, port, .. } => Some((host, *port)),
            _ => None,
        };
        if let Some((host, port)) = host_port {
            if host.contains(':') {
                f.write_str("[")?;
                encode_component(f, host.as_bytes(), b":")?;
                f.write_str("]")?;
            } else {
                encode_component(f, host.as_bytes(), b"")?;
            }
            if let Some(port) = port {
                write!(f, ":{port}")?;
            }
        }
        if let NbdAddress::Vsock { cid, port } = &self.address {
            write!(f, "{cid}")?;
            if *port != u32::from(DEFAULT_PORT) {
                write!(f, ":{port}")?;
            }
        }
        f.write_str("/")?;
        encode_component(f, self.export.as_bytes(), b"/")?;
        let mut query = Query { f, first: true };
        match &self.address {
            NbdAddress::Unix { path } => query.param("socket", path.as_os_str().as_bytes())?,
            NbdAddress::Ssh {
                socket, nbd_port, ..
            } => match socket {
                Some(path) => query.param("socket", path.as_os_str().as_bytes())?,
                None if *nbd_port != DEFAULT_PORT => {
                    query.param("nbd-port", nbd_port.to_string().as_bytes())?
                }
                None => {}
            },
            _ => {}
        }
        if let Some(tls) = &self.tls {
            if let Some(dir) = &tls.certificates {
                query.param("tls-certificates", dir.as_os_str().as_bytes())?;
            }
            if !tls.verify_peer {
                query.param("tls-verify-peer", b"false")?;
            }
            if let Some(file) = &tls.psk_file {
                query.param("tls-psk-file", file.as_os_str().as_bytes())?;
            }
            if let Some(name) = &tls.username {
                query.param("tls-username", name.as_bytes())?;
            }
            if let Some(name) = &tls.hostname {
                query.param("tls-hostname", name.as_bytes())?;
            }
        }
        Ok(())
    }
}

/// Writes `?key=value`, then `&key=value`.
struct Query<'a, 'b> {
    f: &'a mut fmt::Formatter<'b>,
    first: bool,
}

impl Query<'_, '_> {
    fn param(&mut self, key: &str, value: &[u8]) -> fmt::Result {
        self.f.write_str(if self.first { "?" } else { "&" })?;
        self.first = false;
        write!(self.f, "{key}=")?;
        encode_component(self.f, value, b"/")
    }
}

fn usage(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, msg)
}

/// Decode `%XY` escapes; `what` names the component for the error.
fn percent_decode(s: &str, what: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => {
                    let end = (i + 3).min(b.len());
                    let bad = String::from_utf8_lossy(&b[i..end]);
                    return Err(usage(format!("bad percent escape '{bad}' in {what}")));
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn percent_decode_utf8(s: &str, what: &str) -> Result<String> {
    String::from_utf8(percent_decode(s, what)?)
        .map_err(|_| usage(format!("{what} is not valid UTF-8")))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Tcp,
    Unix,
    Vsock,
    Ssh,
}

/// The scheme: its transport, and whether TLS is required.
fn parse_scheme(scheme: &str) -> Result<(Scheme, bool)> {
    Ok(match scheme.to_ascii_lowercase().as_str() {
        "nbd" => (Scheme::Tcp, false),
        "nbd+unix" => (Scheme::Unix, false),
        "nbds" => (Scheme::Tcp, true),
        "nbds+unix" => (Scheme::Unix, true),
        "nbd+vsock" => (Scheme::Vsock, false),
        "nbds+vsock" => (Scheme::Vsock, true),
        "nbd+ssh" => (Scheme::Ssh, false),
        "nbds+ssh" => (Scheme::Ssh, true),
        other => {
            return Err(usage(format!(
                "unknown scheme '{other}' (expected nbd, nbd+unix, nbd+vsock, nbd+ssh or their nbds forms)"
            )));
        }
    })
}

/// What the query string says.
#[derive(Default)]
struct QueryParams {
    socket: Option<PathBuf>,
    nbd_port: Option<u16>,
    tls: TlsSettings,
}

/// Store `value` in `slot`, refusing a second one.
fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(usage(format!("{key}= given more than once")));
    }
    *slot = Some(value);
    Ok(())
}

/// A non-empty path parameter; paths need not be UTF-8.
fn path_param(key: &str, value: &str) -> Result<PathBuf> {
    let bytes = percent_decode(value, key)?;
    if bytes.is_empty() {
        return Err(usage(format!("{key}= is empty")));
    }
    if bytes.contains(&0) && key != "socket" {
        return Err(usage(format!("{key}= contains a NUL byte")));
    }
    Ok(PathBuf::from(OsStr::from_bytes(&bytes)))
}

/// A non-empty name parameter, at most `MAX_EXPORT_NAME` bytes.
fn name_param(key: &str, value: &str) -> Result<String> {
    let name = percent_decode_utf8(value, key)?;
    if name.is_empty() {
        return Err(usage(format!("{key}= is empty")));
    }
    if name.len() > MAX_EXPORT_NAME || name.contains('\0') {
        return Err(usage(format!("{key}= is not a usable name")));
    }
    Ok(name)
}

/// A boolean as libnbd takes it: `1`/`0`, `true`/`false`, `yes`/`no`,
/// `on`/`off`, in any case.
fn bool_param(key: &str, value: &str) -> Result<bool> {
    match percent_decode_utf8(value, key)?
        .to_ascii_lowercase()
        .as_str()
    {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        v => Err(usage(format!(
            "{key}={v} is not a boolean (expected true or false)"
        ))),
    }
}

/// Parse the query string of a URI with `scheme`; `tls` says whether the
/// scheme requires TLS (and so whether `tls-*` parameters mean anything).
fn parse_query(query: &str, scheme: Scheme, tls: bool) -> Result<QueryParams> {
    let mut q = QueryParams::default();
    let mut verify = None;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let key = percent_decode_utf8(key, "query parameter name")?;
        let t = &mut q.tls;
        match key.as_str() {
            "socket" => {
                if !matches!(scheme, Scheme::Unix | Scheme::Ssh) {
                    return Err(usage(
                        "socket= is only valid with nbd+unix://, nbd+ssh:// or their nbds forms",
                    ));
                }
                let path = path_param("socket", value)?;
                if scheme == Scheme::Ssh && path.as_os_str().as_bytes().contains(&0) {
                    return Err(usage("socket= of an ssh URI contains a NUL byte"));
                }
                set_once(&mut q.socket, "socket", path)?;
            }
            "nbd-port" => {
                if scheme != Scheme::Ssh {
                    return Err(usage(
                        "nbd-port= is only valid with nbd+ssh:// or nbds+ssh://",
                    ));
                }
                let v = percent_decode_utf8(value, "nbd-port")?;
                set_once(&mut q.nbd_port, "nbd-port", parse_port(&v)?)?;
            }
            // Without TLS these mean nothing; the scheme did not ask for
            // TLS, so they are ignored (libnbd ignores them too).
            k if k.starts_with("tls-") && !tls => {
                log::debug!("ignoring URI parameter '{k}': the scheme does not use TLS");
            }
            "tls-certificates" => {
                let dir = path_param(&key, value)?;
                set_once(&mut t.certificates, &key, dir)?;
            }
            "tls-psk-file" => {
                let file = path_param(&key, value)?;
                set_once(&mut t.psk_file, &key, file)?;
            }
            "tls-username" => set_once(&mut t.username, &key, name_param(&key, value)?)?,
            "tls-hostname" => set_once(&mut t.hostname, &key, name_param(&key, value)?)?,
            "tls-verify-peer" => set_once(&mut verify, &key, bool_param(&key, value)?)?,
            // Experimental parameters are for other clients.
            k if k.starts_with("x-") => {
                log::debug!("ignoring URI parameter '{k}'");
            }
            k => return Err(usage(format!("unknown query parameter '{k}'"))),
        }
    }
    q.tls.verify_peer = verify.unwrap_or(true);
    Ok(q)
}

fn parse(s: &str) -> Result<NbdUri> {
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(usage(
            "not a URI (expected nbd://HOST/EXPORT or nbd+unix:///EXPORT?socket=PATH)",
        ));
    };
    let (scheme, tls) = parse_scheme(scheme)?;

    // A fragment means nothing to NBD; RFC 3986 puts it last.
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };

    let export = if path.is_empty() {
        String::new()
    } else {
        percent_decode_utf8(&path[1..], "export name")?
    };
    if export.len() > MAX_EXPORT_NAME {
        return Err(usage(format!(
            "export name is {} bytes long (limit {MAX_EXPORT_NAME})",
            export.len()
        )));
    }
    if export.contains('\0') {
        return Err(usage("export name contains a NUL byte"));
    }

    let mut q = parse_query(query, scheme, tls)?;
    // The user part names the TLS user; without TLS it is dropped.
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((user, hostport)) => (Some(user), hostport),
        None => (None, authority),
    };
    if tls {
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            q.tls.user = Some(name_param("user name", user)?);
        }
    }
    let address = match scheme {
        Scheme::Vsock => {
            let (cid, port) = parse_vsock_authority(hostport)?;
            NbdAddress::Vsock { cid, port }
        }
        Scheme::Ssh => {
            if q.socket.is_some() && q.nbd_port.is_some() {
                return Err(usage("socket= and nbd-port= cannot both be given"));
            }
            let user = match user {
                Some(u) if !u.is_empty() => Some(name_param("user name", u)?),
                _ => None,
            };
            let (host, port) = parse_authority(hostport)?;
            if host.starts_with('-') {
                return Err(usage(format!(
                    "host '{host}' starts with '-' (ssh would take it for an option)"
                )));
            }
            if user.as_deref().is_some_and(|u| u.starts_with('-')) {
                return Err(usage("user name starts with '-'"));
            }
            let port = hostport_has_port(hostport).then_some(port);
            NbdAddress::Ssh {
                user,
                host,
                port,
                socket: q.socket.take(),
                nbd_port: q.nbd_port.unwrap_or(DEFAULT_PORT),
            }
        }
        Scheme::Unix => {
            if !hostport.is_empty() {
                return Err(usage(format!(
                    "a +unix URI must not name a host ('{hostport}'); use nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            let Some(path) = q.socket else {
                return Err(usage("a +unix URI needs a socket=PATH query parameter"));
            };
            NbdAddress::Unix { path }
        }
        Scheme::Tcp => {
            let (host, port) = parse_authority(hostport)?;
            NbdAddress::Tcp { host, port }
        }
    };
    Ok(NbdUri {
        address,
        export,
        tls: tls.then_some(q.tls),
    })
}

/// A port number: 1 to 65535, digits only.
fn parse_port(p: &str) -> Result<u16> {
    match p.parse::<u16>() {
        Ok(n) if n != 0 && p.bytes().all(|c| c.is_ascii_digit()) => Ok(n),
        _ => Err(usage(format!("bad port '{p}'"))),
    }
}

/// Whether `host[:port]` names a port that is not empty.
fn hostport_has_port(hostport: &str) -> bool {
    let after = match hostport.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(_, a)| a),
        None => hostport,
    };
    after.split_once(':').is_some_and(|(_, p)| !p.is_empty())
}

/// `CID[:PORT]` of a vsock URI, both decimal; an empty CID is the host
/// (2), an empty port the NBD port.
fn parse_vsock_authority(hostport: &str) -> Result<(u32, u32)> {
    let (cid, port) = hostport.split_once(':').unwrap_or((hostport, ""));
    let number = |what: &str, v: &str| -> Result<u32> {
        match v.parse::<u32>() {
            Ok(n) if v.bytes().all(|c| c.is_ascii_digit()) => Ok(n),
            _ => Err(usage(format!(
                "bad vsock {what} '{v}' (expected nbd+vsock://CID[:PORT]/EXPORT, CID and PORT decimal)"
            ))),
        }
    };
    let cid = if cid.is_empty() {
        2
    } else {
        number("CID", cid)?
    };
    let port = if port.is_empty() {
        u32::from(DEFAULT_PORT)
    } else {
        number("port", port)?
    };
    Ok((cid, port))
}

/// `host[:port]`, the user part already taken off.
fn parse_authority(hostport: &str) -> Result<(String, u16)> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(usage("IPv6 address is missing its closing ']'"));
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return Err(usage(format!("unexpected '{after}' after IPv6 address"))),
            },
        };
        if host.is_empty() {
            return Err(usage("empty IPv6 address"));
        }
        (percent_decode_utf8(host, "host")?, port)
    } else {
        let (host, port) = match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        };
        (percent_decode_utf8(host, "host")?, port)
    };
    if host.is_empty() {
        return Err(usage("missing host (expected nbd://HOST[:PORT]/EXPORT)"));
    }
    let port = match port {
        // RFC 3986 allows an empty port, meaning the default.
        None | Some("") => DEFAULT_PORT,
        Some(p) => parse_port(p)?,
    };
    Ok((host, port))
}

impl NbdAddress {
    /// The socket path, for Unix addresses.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            NbdAddress::Unix { path } => Some(path),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri::tcp(host, port, export)
    }

    fn kind_of(s: &str) -> ErrorKind {
        NbdUri::parse(s).unwrap_err().kind()
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(
            NbdUri::parse("nbd://example.com/disk").unwrap(),
            tcp("example.com", 10809, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com:1234/disk").unwrap(),
            tcp("example.com", 1234, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com/").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com").unwrap(),
            tcp("example.com", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com:/x").unwrap(),
            tcp("example.com", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com//disk").unwrap(),
            tcp("example.com", 10809, "/disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://example.com/hello%20world").unwrap(),
            tcp("example.com", 10809, "hello world")
        );
        assert_eq!(
            NbdUri::parse("NBD://user@host/a/b").unwrap(),
            tcp("host", 10809, "a/b")
        );
        assert_eq!(
            NbdUri::parse("nbd://host/x#frag").unwrap(),
            tcp("host", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://host/x?tls-verify-peer=0&x-foo=1").unwrap(),
            tcp("host", 10809, "x")
        );
    }

    #[test]
    fn ipv6() {
        assert_eq!(
            NbdUri::parse("nbd://[::1]:10810/x").unwrap(),
            tcp("::1", 10810, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/x").unwrap(),
            tcp("::1", 10809, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1%25eth0]/").unwrap(),
            tcp("fe80::1%eth0", 10809, "")
        );
        assert_eq!(kind_of("nbd://[::1/x"), ErrorKind::InvalidInput);
        assert_eq!(kind_of("nbd://[::1]x/"), ErrorKind::InvalidInput);
        assert_eq!(kind_of("nbd://[]/"), ErrorKind::InvalidInput);
    }

    #[test]
    fn unix_forms() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk?socket=/tmp/s.sock").unwrap(),
            NbdUri::unix("/tmp/s.sock", "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix://?socket=rel.sock").unwrap(),
            NbdUri::unix("rel.sock", "")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///a%2Fb?socket=%2Ftmp%2Fmy%20sock").unwrap(),
            NbdUri::unix("/tmp/my sock", "a/b")
        );
        let abs = NbdUri::parse("nbd+unix:///?socket=%00/abstract").unwrap();
        assert_eq!(
            abs.address.unix_path().unwrap().as_os_str().as_bytes(),
            b"\0/abstract"
        );
        // Socket paths need not be UTF-8.
        let raw = NbdUri::parse("nbd+unix:///?socket=/tmp/%FF").unwrap();
        assert_eq!(
            raw.address.unix_path().unwrap().as_os_str().as_bytes(),
            b"/tmp/\xff"
        );
    }

    fn vsock(cid: u32, port: u32, export: &str) -> NbdUri {
        NbdUri {
            address: NbdAddress::Vsock { cid, port },
            export: export.into(),
            tls: None,
        }
    }

    fn ssh(user: Option<&str>, host: &str, port: Option<u16>, socket: Option<&str>) -> NbdAddress {
        NbdAddress::Ssh {
            user: user.map(String::from),
            host: host.into(),
            port,
            socket: socket.map(PathBuf::from),
            nbd_port: DEFAULT_PORT,
        }
    }

    #[test]
    fn vsock_forms() {
        let cases = [
            ("nbd+vsock://1:10810/x", vsock(1, 10810, "x")),
            ("nbd+vsock://3/x", vsock(3, 10809, "x")),
            ("NBD+VSOCK://2/", vsock(2, 10809, "")),
            // No CID is the host, as libnbd takes it.
            ("nbd+vsock:///disk", vsock(2, 10809, "disk")),
            ("nbd+vsock://:99/", vsock(2, 99, "")),
            (
                "nbd+vsock://4294967295:4294967295/",
                vsock(u32::MAX, u32::MAX, ""),
            ),
            (
                "nbds+vsock://2/x",
                vsock(2, 10809, "x").with_tls(TlsSettings::default()),
            ),
            (
                "nbds+vsock://alice@2/x?tls-psk-file=/k",
                NbdUri {
                    tls: tls(|t| {
                        t.user = Some("alice".into());
                        t.psk_file = Some("/k".into());
                    }),
                    ..vsock(2, 10809, "x")
                },
            ),
        ];
        for (s, want) in cases {
            assert_eq!(NbdUri::parse(s).unwrap(), want, "{s}");
        }
        for (s, want) in [
            ("nbd+vsock://host/x", "bad vsock CID 'host'"),
            ("nbd+vsock://-1/x", "bad vsock CID '-1'"),
            ("nbd+vsock://4294967296/x", "bad vsock CID"),
            ("nbd+vsock://2:port/x", "bad vsock port 'port'"),
            ("nbd+vsock://2:+5/x", "bad vsock port '+5'"),
            ("nbd+vsock://2/x?socket=/s", "socket= is only valid"),
            ("nbd+vsock://2/x?nbd-port=1", "nbd-port= is only valid"),
        ] {
            let e = NbdUri::parse(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{s}");
            assert!(e.to_string().contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn ssh_forms() {
        let plain = |address| NbdUri {
            address,
            export: "disk".into(),
            tls: None,
        };
        let cases = [
            (
                "nbd+ssh://host/disk?socket=/run/nbd.sock",
                plain(ssh(None, "host", None, Some("/run/nbd.sock"))),
            ),
            (
                "nbd+ssh://alice@host:2222/disk?socket=/tmp/my%20sock",
                plain(ssh(Some("alice"), "host", Some(2222), Some("/tmp/my sock"))),
            ),
            (
                "NBD+SSH://[::1]:22/disk?socket=s",
                plain(ssh(None, "::1", Some(22), Some("s"))),
            ),
            ("nbd+ssh://host:/disk", plain(ssh(None, "host", None, None))),
            (
                "nbd+ssh://host/disk?nbd-port=10810",
                plain(NbdAddress::Ssh {
                    user: None,
                    host: "host".into(),
                    port: None,
                    socket: None,
                    nbd_port: 10810,
                }),
            ),
            (
                "nbds+ssh://bob@h/disk?socket=/s&tls-certificates=/c",
                NbdUri {
                    tls: tls(|t| {
                        t.user = Some("bob".into());
                        t.certificates = Some("/c".into());
                    }),
                    ..plain(ssh(Some("bob"), "h", None, Some("/s")))
                },
            ),
        ];
        for (s, want) in cases {
            assert_eq!(NbdUri::parse(s).unwrap(), want, "{s}");
        }
        for (s, want) in [
            ("nbd+ssh:///disk?socket=/s", "missing host"),
            ("nbd+ssh://-oProxyCommand=x/disk", "starts with '-'"),
            ("nbd+ssh://-l@h/disk", "user name starts with '-'"),
            ("nbd+ssh://h:0/disk", "bad port '0'"),
            ("nbd+ssh://h/?socket=/s&socket=/t", "more than once"),
            ("nbd+ssh://h/?socket=/s&nbd-port=1", "cannot both be given"),
            ("nbd+ssh://h/?nbd-port=70000", "bad port '70000'"),
            ("nbd+ssh://h/?socket=/a%00b", "NUL"),
            ("nbd://h/?nbd-port=1", "nbd-port= is only valid"),
        ] {
            let e = NbdUri::parse(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{s}");
            assert!(e.to_string().contains(want), "{s}: {e}");
        }
    }

    fn tls(f: impl FnOnce(&mut TlsSettings)) -> Option<TlsSettings> {
        let mut t = TlsSettings::default();
        f(&mut t);
        Some(t)
    }

    #[test]
    fn tls_forms() {
        let dir = |p: &str| Some(PathBuf::from(p));
        let name = |n: &str| Some(n.to_string());
        let cases: Vec<(&str, NbdUri)> = vec![
            (
                "nbds://host/x",
                tcp("host", 10809, "x").with_tls(TlsSettings::default()),
            ),
            (
                "NBDS://host:1234",
                NbdUri {
                    tls: tls(|_| {}),
                    ..tcp("host", 1234, "")
                },
            ),
            (
                "nbds://alice@host/x",
                NbdUri {
                    tls: tls(|t| t.user = name("alice")),
                    ..tcp("host", 10809, "x")
                },
            ),
            (
                "nbds://a%40b@[::1]:99/",
                NbdUri {
                    tls: tls(|t| t.user = name("a@b")),
                    ..tcp("::1", 99, "")
                },
            ),
            (
                "nbds+unix:///disk?socket=/s&tls-certificates=/etc/certs",
                NbdUri {
                    tls: tls(|t| t.certificates = dir("/etc/certs")),
                    ..NbdUri::unix("/s", "disk")
                },
            ),
            (
                "nbds+unix://alice@/?socket=/s&tls-psk-file=keys.psk",
                NbdUri {
                    tls: tls(|t| {
                        t.user = name("alice");
                        t.psk_file = dir("keys.psk");
                    }),
                    ..NbdUri::unix("/s", "")
                },
            ),
            (
                "nbds://h/?tls-username=bob&tls-hostname=nbd.example.com&tls-verify-peer=FALSE",
                NbdUri {
                    tls: tls(|t| {
                        t.username = name("bob");
                        t.hostname = name("nbd.example.com");
                        t.verify_peer = false;
                    }),
                    ..tcp("h", 10809, "")
                },
            ),
            (
                "nbds://h/?tls-verify-peer=1&tls-certificates=%2Fmy%20certs",
                NbdUri {
                    tls: tls(|t| t.certificates = dir("/my certs")),
                    ..tcp("h", 10809, "")
                },
            ),
            // An empty user part is no user.
            (
                "nbds://@h/",
                tcp("h", 10809, "").with_tls(TlsSettings::default()),
            ),
            // Without TLS the user part and tls-* parameters mean nothing.
            (
                "nbd://alice@h/?tls-psk-file=/k&tls-bogus=1",
                tcp("h", 10809, ""),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(NbdUri::parse(s).unwrap(), want, "{s}");
        }
        for (value, verify) in [
            ("0", false),
            ("no", false),
            ("off", false),
            ("yes", true),
            ("On", true),
        ] {
            let u = NbdUri::parse(&format!("nbds://h/?tls-verify-peer={value}")).unwrap();
            assert_eq!(u.tls.unwrap().verify_peer, verify, "{value}");
        }
    }

    #[test]
    fn tls_user_names() {
        let named = |s: &str| {
            NbdUri::parse(s)
                .unwrap()
                .tls
                .unwrap()
                .named_user()
                .map(String::from)
        };
        assert_eq!(named("nbds://h/"), None);
        assert_eq!(named("nbds://alice@h/"), Some("alice".into()));
        assert_eq!(
            named("nbds://alice@h/?tls-username=bob"),
            Some("bob".into())
        );
        assert_eq!(named("nbds://h/?tls-username=bob"), Some("bob".into()));
    }

    #[test]
    fn tls_usage_errors() {
        let cases = [
            ("nbds://h/?tls-verify-peer=maybe", "not a boolean"),
            ("nbds://h/?tls-certificates=", "tls-certificates= is empty"),
            ("nbds://h/?tls-psk-file=", "tls-psk-file= is empty"),
            ("nbds://h/?tls-username=", "tls-username= is empty"),
            ("nbds://h/?tls-hostname=", "tls-hostname= is empty"),
            (
                "nbds://h/?tls-psk-file=/a&tls-psk-file=/b",
                "more than once",
            ),
            (
                "nbds://h/?tls-verify-peer=0&tls-verify-peer=1",
                "more than once",
            ),
            ("nbds://h/?tls-certificates=/a%00b", "NUL"),
            (
                "nbds://h/?tls-colour=blue",
                "unknown query parameter 'tls-colour'",
            ),
            ("nbds://h/?socket=/s", "only valid with nbd+unix"),
            ("nbds+unix:///x", "socket=PATH"),
            ("nbds+unix://host/x?socket=/s", "must not name a host"),
            ("nbds+unix://alice@host/x?socket=/s", "must not name a host"),
            ("nbds:///x", "missing host"),
            ("nbds://%FF@h/", "not valid UTF-8"),
        ];
        for (s, want) in cases {
            let e = NbdUri::parse(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{s}");
            assert!(e.to_string().contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn usage_errors_name_the_problem() {
        let cases = [
            ("nbd:///x", "missing host"),
            ("nbd://:10809/x", "missing host"),
            ("nbd://host:99999/x", "bad port '99999'"),
            ("nbd://host:0/x", "bad port '0'"),
            ("nbd://host:+80/x", "bad port '+80'"),
            ("nbd://host:ab/x", "bad port 'ab'"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix:///x?socket=", "socket= is empty"),
            ("nbd+unix://host/x?socket=/s", "must not name a host"),
            ("nbd+unix:///x?socket=/a&socket=/b", "more than once"),
            ("nbd://host/x?socket=/s", "only valid with nbd+unix"),
            ("http://host/x", "unknown scheme 'http'"),
            ("nbd+tcp://host/x", "unknown scheme 'nbd+tcp'"),
            ("nbd:/host/x", "not a URI"),
            ("disk.img", "not a URI"),
            ("nbd://host/a%2", "bad percent escape '%2'"),
            ("nbd://host/a%zz", "bad percent escape '%zz'"),
            ("nbd://host/%FF", "not valid UTF-8"),
            ("nbd://host/a%00b", "NUL"),
            ("nbd://host/x?foo=bar", "unknown query parameter 'foo'"),
        ];
        for (s, want) in cases {
            let e = NbdUri::parse(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{s}");
            assert!(e.to_string().contains(want), "{s}: {e}");
            assert!(e.to_string().contains(s), "{s}: {e}");
        }
        let long = format!("nbd://host/{}", "x".repeat(MAX_EXPORT_NAME + 1));
        assert_eq!(kind_of(&long), ErrorKind::InvalidInput);
    }

    #[test]
    fn display_round_trips() {
        for u in [
            tcp("example.com", 10809, "disk"),
            tcp("example.com", 1234, ""),
            tcp("::1", 10810, "a b/c"),
            tcp("fe80::1%eth0", 10809, ""),
            tcp("h", 10809, "/lead"),
            NbdUri::unix("/tmp/my sock", "x?y"),
            NbdUri::unix(PathBuf::from(OsStr::from_bytes(b"\0abs")), ""),
            tcp("h", 10809, "x").with_tls(TlsSettings::default()),
            NbdUri {
                tls: tls(|t| {
                    t.user = Some("al ice:@".into());
                    t.username = Some("b&b=".into());
                    t.hostname = Some("nbd.example.com".into());
                    t.verify_peer = false;
                    t.certificates = Some("/c d/?".into());
                    t.psk_file = Some(PathBuf::from(OsStr::from_bytes(b"/k\xff")));
                }),
                ..NbdUri::unix("/s", "e")
            },
            NbdUri {
                tls: tls(|t| t.user = Some("u".into())),
                ..tcp("::1", 10810, "x")
            },
            vsock(2, 10809, "x"),
            vsock(7, 1234, "a b").with_tls(TlsSettings::default()),
            NbdUri {
                address: ssh(Some("a b"), "::1", Some(2222), Some("/s ock")),
                export: "e".into(),
                tls: None,
            },
            NbdUri {
                address: ssh(None, "h", None, None),
                export: String::new(),
                tls: None,
            },
            NbdUri {
                address: NbdAddress::Ssh {
                    user: None,
                    host: "h".into(),
                    port: None,
                    socket: None,
                    nbd_port: 99,
                },
                export: String::new(),
                tls: None,
            },
        ] {
            let s = u.to_string();
            assert_eq!(NbdUri::parse(&s).unwrap(), u, "{s}");
        }
        assert_eq!(tcp("::1", 10810, "x").to_string(), "nbd://[::1]:10810/x");
        assert_eq!(
            NbdUri::unix("/s", "e").to_string(),
            "nbd+unix:///e?socket=/s"
        );
        assert_eq!(
            NbdUri::parse("nbds+unix://alice@/e?tls-psk-file=/k&socket=/s")
                .unwrap()
                .to_string(),
            "nbds+unix://alice@/e?socket=/s&tls-psk-file=/k"
        );
    }

    #[test]
    fn looks_like_uri() {
        assert!(NbdUri::looks_like_uri("nbd://h/x"));
        assert!(NbdUri::looks_like_uri("NBD+unix:///x"));
        assert!(NbdUri::looks_like_uri("nbds://h/x"));
        assert!(!NbdUri::looks_like_uri("disk.img"));
        assert!(!NbdUri::looks_like_uri("nbdfile"));
    }
}
