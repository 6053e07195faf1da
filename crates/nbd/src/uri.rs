//! NBD URIs, as described by the NBD project's `uri.md`:
//! `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`.
//!
//! TLS schemes (`nbds`, `nbds+unix`) and vsock are recognised so that the
//! user is told they are not supported rather than that the URI is bad.

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
}

/// A parsed NBD URI: where to connect and which export to ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Server address.
    pub address: NbdAddress,
    /// Export name (may be empty: the server's default export).
    pub export: String,
}

impl NbdUri {
    /// Parse an NBD URI.
    ///
    /// Errors are [`ErrorKind::InvalidInput`] naming what is wrong, except TLS and
    /// vsock URIs, which are [`ErrorKind::Unsupported`].
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
        }
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
        match &self.address {
            NbdAddress::Tcp { host, port } => {
                f.write_str("nbd://")?;
                if host.contains(':') {
                    f.write_str("[")?;
                    encode_component(f, host.as_bytes(), b":")?;
                    f.write_str("]")?;
                } else {
                    encode_component(f, host.as_bytes(), b"")?;
                }
                if *port != DEFAULT_PORT {
                    write!(f, ":{port}")?;
                }
                f.write_str("/")?;
                encode_component(f, self.export.as_bytes(), b"/")
            }
            NbdAddress::Unix { path } => {
                f.write_str("nbd+unix:///")?;
                encode_component(f, self.export.as_bytes(), b"/")?;
                f.write_str("?socket=")?;
                encode_component(f, path.as_os_str().as_bytes(), b"/")
            }
        }
    }
}

fn usage(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, msg)
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
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
}

fn parse(s: &str) -> Result<NbdUri> {
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(usage(
            "not a URI (expected nbd://HOST/EXPORT or nbd+unix:///EXPORT?socket=PATH)",
        ));
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "nbd" => Scheme::Tcp,
        "nbd+unix" => Scheme::Unix,
        "nbds" | "nbds+unix" | "nbds+vsock" => {
            return Err(unsupported("TLS is not supported yet"));
        }
        "nbd+vsock" => return Err(unsupported("vsock is not supported")),
        other => {
            return Err(usage(format!(
                "unknown scheme '{other}' (expected nbd or nbd+unix)"
            )));
        }
    };

    // A fragment means nothing to NBD; RFC 3986 puts it last.
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
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

    let mut socket: Option<PathBuf> = None;
    for param in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let key = percent_decode_utf8(key, "query parameter name")?;
        match key.as_str() {
            "socket" => {
                if scheme != Scheme::Unix {
                    return Err(usage("socket= is only valid with nbd+unix://"));
                }
                if socket.is_some() {
                    return Err(usage("socket= given more than once"));
                }
                let bytes = percent_decode(value, "socket path")?;
                if bytes.is_empty() {
                    return Err(usage("socket= is empty"));
                }
                socket = Some(PathBuf::from(OsStr::from_bytes(&bytes)));
            }
            // Opportunistic TLS settings mean nothing without TLS; the
            // scheme did not demand it, so carry on in plain text.
            k if k.starts_with("tls-") => {
                log::debug!("ignoring URI parameter '{k}': TLS is not supported");
            }
            // Experimental parameters are for other clients.
            k if k.starts_with("x-") => {
                log::debug!("ignoring URI parameter '{k}'");
            }
            k => return Err(usage(format!("unknown query parameter '{k}'"))),
        }
    }

    let address = match scheme {
        Scheme::Unix => {
            if !authority.is_empty() {
                return Err(usage(format!(
                    "nbd+unix URI must not name a host ('{authority}'); use nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            let Some(path) = socket else {
                return Err(usage("nbd+unix URI needs a socket=PATH query parameter"));
            };
            NbdAddress::Unix { path }
        }
        Scheme::Tcp => {
            let (host, port) = parse_authority(authority)?;
            NbdAddress::Tcp { host, port }
        }
    };
    Ok(NbdUri { address, export })
}

/// `[userinfo@]host[:port]`; userinfo is only used for TLS, so it is
/// dropped.
fn parse_authority(authority: &str) -> Result<(String, u16)> {
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
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
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|c| c.is_ascii_digit()) => n,
            _ => return Err(usage(format!("bad port '{p}'"))),
        },
    };
    Ok((host, port))
}

impl NbdAddress {
    /// The socket path, for Unix addresses.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            NbdAddress::Unix { path } => Some(path),
            NbdAddress::Tcp { .. } => None,
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

    fn message_of(s: &str) -> String {
        NbdUri::parse(s).unwrap_err().to_string()
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

    #[test]
    fn tls_and_vsock_are_unsupported() {
        for s in [
            "nbds://host/x",
            "nbds+unix:///x?socket=/s",
            "nbd+vsock://1:10809/x",
            "NBDS://host/",
        ] {
            assert_eq!(kind_of(s), ErrorKind::Unsupported, "{s}");
        }
        assert!(message_of("nbds://host/x").contains("TLS is not supported yet"));
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
        ] {
            let s = u.to_string();
            assert_eq!(NbdUri::parse(&s).unwrap(), u, "{s}");
        }
        assert_eq!(tcp("::1", 10810, "x").to_string(), "nbd://[::1]:10810/x");
        assert_eq!(
            NbdUri::unix("/s", "e").to_string(),
            "nbd+unix:///e?socket=/s"
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
