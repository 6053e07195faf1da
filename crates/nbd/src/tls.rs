//! NBD over TLS: credentials, the TLS handshake after `NBD_OPT_STARTTLS`,
//! and the encrypted stream (cargo feature `tls`, through the system's
//! OpenSSL).
//!
//! A [`TlsContext`] is made once from a URI's [`TlsSettings`] (its files
//! are read then) and shared by every connection to that server, the
//! extra ones and reconnections included. Credentials, as libnbd takes
//! them:
//!
//! - **Pre-shared key** (`tls-psk-file=FILE`): the key of the user
//!   `tls-username`, else the URI's user part, else the login name, from a
//!   psktool file of `username:hexkey` lines. TLS 1.3 with (EC)DHE-PSK, or
//!   TLS 1.2 PSK cipher suites, as GnuTLS servers (nbdkit, qemu-nbd) offer.
//! - **X.509**: `ca-cert.pem` (the only trusted root), and
//!   `client-cert.pem` with `client-key.pem` if both are there, and
//!   `ca-crl.pem` if it is there, from `tls-certificates=DIR`, or else the
//!   first of `$HOME/.pki/libnbd`, `$HOME/.config/pki/libnbd` and
//!   `/etc/pki/libnbd` that has a `ca-cert.pem`; with none, the system's
//!   trusted roots.
//!
//! The server's certificate is verified unless `tls-verify-peer=false`:
//! its chain always, and its name against `tls-hostname`, else the TCP
//! host (a DNS name or an IP address). Over a Unix socket without
//! `tls-hostname` there is no name to check, so only the chain is.
//!
//! Built without the feature, [`TlsContext::new`] fails with
//! [`ErrorKind::Tls`]: TLS was not built in.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Operation, Result};
use crate::uri::{NbdAddress, NbdUri, TlsSettings};

#[cfg(feature = "tls")]
pub use imp::{TlsContext, TlsStream};

/// Longest PSK file read: a real one holds a few lines.
const MAX_PSK_FILE: u64 = 1024 * 1024;

/// Longest pre-shared key, in bytes (OpenSSL's `PSK_MAX_PSK_LEN`).
pub const MAX_PSK_LEN: usize = 512;

/// The file names libnbd and nbdkit use in a certificates directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The client's certificate (optional).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key (optional, with the certificate).
pub const CLIENT_KEY: &str = "client-key.pem";
/// A certificate revocation list (optional).
pub const CA_CRL: &str = "ca-crl.pem";

fn tls_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Tls, msg).during(Operation::Connect)
}

/// The certificate directories libnbd looks in when a URI names none, in
/// order, for a home directory `home`.
pub fn default_certificate_dirs(home: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = home.filter(|h| !h.as_os_str().is_empty()) {
        dirs.push(home.join(".pki/libnbd"));
        dirs.push(home.join(".config/pki/libnbd"));
    }
    dirs.push(PathBuf::from("/etc/pki/libnbd"));
    dirs
}

/// The directory to take X.509 credentials from: the one the URI names
/// (which must exist), else the first default one with a `ca-cert.pem`;
/// `None` means the system's trusted roots.
pub fn certificate_dir(settings: &TlsSettings) -> Result<Option<PathBuf>> {
    if let Some(dir) = &settings.certificates {
        return match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(Some(dir.clone())),
            Ok(_) => Err(tls_error(format!(
                "tls-certificates: {} is not a directory",
                dir.display()
            ))),
            Err(e) => Err(tls_error(format!(
                "tls-certificates: {}: {e}",
                dir.display()
            ))),
        };
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    Ok(default_certificate_dirs(home.as_deref())
        .into_iter()
        .find(|d| d.join(CA_CERT).is_file()))
}

/// The login name, for a PSK identity the URI does not give: `$LOGNAME`
/// (as libnbd), else the name of the user this process runs as.
pub fn login_name() -> Option<String> {
    if let Some(name) = std::env::var("LOGNAME").ok().filter(|n| !n.is_empty()) {
        return Some(name);
    }
    let mut buf = vec![0u8; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the sizes given, and
    // the strings read are NUL-terminated inside `buf` when found is set.
    let r = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: see above.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_str().ok().map(str::to_string)
}

/// The PSK identity to present for `settings`.
pub fn psk_identity(settings: &TlsSettings) -> Result<String> {
    match settings.named_user() {
        Some(u) => Ok(u.to_string()),
        None => login_name().ok_or_else(|| {
            tls_error("no user name for the pre-shared key: give tls-username= or user@ in the URI")
        }),
    }
}

/// Find `user`'s key in the text of a psktool file (`username:hexkey`
/// lines) and decode it.
pub fn find_psk(text: &str, user: &str) -> std::result::Result<Vec<u8>, String> {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        let Some((name, hex)) = line.split_once(':') else {
            continue;
        };
        if name != user {
            continue;
        }
        return decode_hex(hex.trim()).map_err(|e| format!("line {}: key of '{user}' {e}", n + 1));
    }
    Err(format!("no key for user '{user}'"))
}

fn decode_hex(hex: &str) -> std::result::Result<Vec<u8>, String> {
    if hex.is_empty() {
        return Err("is empty".into());
    }
    if hex.len() % 2 != 0 {
        return Err("has an odd number of hex digits".into());
    }
    if hex.len() / 2 > MAX_PSK_LEN {
        return Err(format!("is longer than {MAX_PSK_LEN} bytes"));
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.as_bytes()
        .chunks(2)
        .map(|p| match (digit(p[0]), digit(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err("is not hexadecimal".to_string()),
        })
        .collect()
}

/// Read `user`'s key from the PSK file `path`.
pub fn load_psk(path: &Path, user: &str) -> Result<Vec<u8>> {
    let what = |e: String| tls_error(format!("tls-psk-file: {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| what(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_PSK_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| what(e.to_string()))?;
    if text.len() as u64 > MAX_PSK_FILE {
        return Err(what(format!("longer than {MAX_PSK_FILE} bytes")));
    }
    find_psk(&text, user).map_err(what)
}

/// The name the server's certificate must be for: `tls-hostname`, else
/// the TCP or ssh host; none over a Unix or vsock socket.
pub fn peer_name(uri: &NbdUri, settings: &TlsSettings) -> Option<String> {
    match (&settings.hostname, &uri.address) {
        (Some(h), _) => Some(h.clone()),
        (None, NbdAddress::Tcp { host, .. } | NbdAddress::Ssh { host, .. }) => Some(host.clone()),
        (None, NbdAddress::Unix { .. } | NbdAddress::Vsock { .. }) => None,
    }
}

#[cfg(not(feature = "tls"))]
mod disabled {
    use super::*;

    /// TLS settings made ready for connecting; this build has no TLS, so
    /// there are none.
    #[derive(Debug)]
    pub struct TlsContext {
        _none: (),
    }

    impl TlsContext {
        /// Always fails: TLS was not built in.
        pub fn new(uri: &NbdUri) -> Result<TlsContext> {
            let _ = uri;
            Err(tls_error(
                "TLS was not built in (build nbdcp-nbd with its cargo feature \"tls\")",
            ))
        }

        /// Never called: no context can be made.
        pub(crate) fn handshake(
            &self,
            transport: crate::transport::Transport,
            _name: &str,
        ) -> Result<crate::transport::Transport> {
            let _ = transport;
            Err(tls_error("TLS was not built in"))
        }
    }
}

#[cfg(not(feature = "tls"))]
pub use disabled::TlsContext;

#[cfg(feature = "tls")]
mod imp;

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "tls"))]
    #[test]
    fn a_build_without_tls_says_so() {
        let uri = NbdUri::parse("nbds://h/").unwrap();
        let e = TlsContext::new(&uri).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(e.to_string().contains("TLS was not built in"), "{e}");
    }

    #[test]
    fn default_dirs_in_libnbd_order() {
        assert_eq!(
            default_certificate_dirs(Some(Path::new("/home/a"))),
            [
                PathBuf::from("/home/a/.pki/libnbd"),
                PathBuf::from("/home/a/.config/pki/libnbd"),
                PathBuf::from("/etc/pki/libnbd"),
            ]
        );
        assert_eq!(
            default_certificate_dirs(None),
            [PathBuf::from("/etc/pki/libnbd")]
        );
        assert_eq!(
            default_certificate_dirs(Some(Path::new(""))),
            [PathBuf::from("/etc/pki/libnbd")]
        );
    }

    #[test]
    fn psk_file_lines() {
        let text = "bob:00ff\r\nalice:0123456789ABCDEF\n# comment\n\nal:01\n";
        let cases: &[(&str, std::result::Result<&[u8], &str>)] = &[
            (
                "alice",
                Ok(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]),
            ),
            ("bob", Ok(&[0x00, 0xff])),
            ("al", Ok(&[0x01])),
            ("carol", Err("no key for user 'carol'")),
            ("", Err("no key for user ''")),
        ];
        for (user, want) in cases {
            let got = find_psk(text, user);
            match want {
                Ok(key) => assert_eq!(got.as_deref(), Ok(*key), "{user}"),
                Err(msg) => assert_eq!(got.unwrap_err(), *msg, "{user}"),
            }
        }
        let bad = [
            ("u:", "is empty"),
            ("u:abc", "odd number"),
            ("u:zz", "not hexadecimal"),
            ("u:+1", "not hexadecimal"),
        ];
        for (text, want) in bad {
            let e = find_psk(text, "u").unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("line 1"), "{text}: {e}");
        }
        let long = format!("u:{}", "ab".repeat(MAX_PSK_LEN + 1));
        assert!(find_psk(&long, "u").unwrap_err().contains("longer than"));
        let max = format!("u:{}", "ab".repeat(MAX_PSK_LEN));
        assert_eq!(find_psk(&max, "u").unwrap().len(), MAX_PSK_LEN);
    }

    #[test]
    fn psk_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.psk");
        let e = load_psk(&missing, "u").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(e.to_string().contains("none.psk"), "{e}");
        let f = dir.path().join("k.psk");
        std::fs::write(&f, "other:00\n").unwrap();
        let e = load_psk(&f, "u").unwrap_err();
        assert!(e.to_string().contains("no key for user 'u'"), "{e}");
        std::fs::write(&f, "u:0a0b\n").unwrap();
        assert_eq!(load_psk(&f, "u").unwrap(), [10, 11]);
    }

    #[test]
    fn names_to_check() {
        let t = TlsSettings::default();
        let named = TlsSettings {
            hostname: Some("nbd.example.com".into()),
            ..TlsSettings::default()
        };
        let tcp = NbdUri::tcp("127.0.0.1", 10809, "");
        let unix = NbdUri::unix("/s", "");
        assert_eq!(peer_name(&tcp, &t).as_deref(), Some("127.0.0.1"));
        assert_eq!(peer_name(&tcp, &named).as_deref(), Some("nbd.example.com"));
        assert_eq!(peer_name(&unix, &t), None);
        assert_eq!(peer_name(&unix, &named).as_deref(), Some("nbd.example.com"));
    }

    #[test]
    fn identity_from_the_uri_first() {
        let t = TlsSettings {
            user: Some("alice".into()),
            ..TlsSettings::default()
        };
        assert_eq!(psk_identity(&t).unwrap(), "alice");
        // Otherwise some login name (whatever this test runs as).
        assert!(!psk_identity(&TlsSettings::default()).unwrap().is_empty());
    }

    #[test]
    fn certificate_dir_must_exist_when_named() {
        let dir = tempfile::tempdir().unwrap();
        let t = |p: PathBuf| TlsSettings {
            certificates: Some(p),
            ..TlsSettings::default()
        };
        assert_eq!(
            certificate_dir(&t(dir.path().to_path_buf())).unwrap(),
            Some(dir.path().to_path_buf())
        );
        let e = certificate_dir(&t(dir.path().join("nope"))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
