//! TLS test material made here: a certificate authority with server and
//! client certificates (and broken ones: expired, for another host, from
//! another CA), laid out in the directories nbdkit, qemu-nbd and nbdcp
//! read, and psktool key files; and `nbds` URIs for servers.
//!
//! Certificates come from certtool (gnutls-bin), once per test process,
//! under cargo's `CARGO_TARGET_TMPDIR`. Server and client keys are RSA:
//! qemu-nbd refuses a server certificate whose key usage lacks key
//! encipherment, which certtool leaves out for EC keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Fail the test, naming the package, if gnutls-bin's tools are missing.
fn require_gnutls_bin() {
    for tool in ["certtool", "psktool"] {
        if super::which(tool).is_none() {
            panic!("{tool} is not installed: apt-get install gnutls-bin");
        }
    }
}

/// The user name the PSK files are for.
pub const PSK_USER: &str = "alice";

/// A host name no certificate but [`Pki::other_host`]'s is for.
pub const OTHER_HOST: &str = "other.nbd.test";

/// Certificates and keys for the TLS tests, in per-role directories.
#[derive(Debug)]
pub struct Pki {
    root: PathBuf,
}

fn certtool(args: &[&str]) {
    let out = Command::new("certtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run certtool: {e}"));
    assert!(
        out.status.success(),
        "certtool {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key(path: &Path, rsa: bool) {
    let p = path.to_str().unwrap();
    if rsa {
        certtool(&[
            "--generate-privkey",
            "--key-type=rsa",
            "--bits=2048",
            "--outfile",
            p,
        ]);
    } else {
        certtool(&["--generate-privkey", "--key-type=ecdsa", "--outfile", p]);
    }
}

/// Sign a certificate for `key` with `template` (certtool's format) by
/// the CA in `ca_dir`, or self-signed when `ca_dir` is `None`.
fn cert(dir: &Path, out: &Path, key: &Path, ca_dir: Option<&Path>, template: &str) {
    let info = dir.join(format!(
        "{}.info",
        out.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&info, template).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = Vec::new();
    match ca_dir {
        Some(ca) => args.extend([
            "--generate-certificate".into(),
            "--load-ca-certificate".into(),
            s(&ca.join("ca-cert.pem")),
            "--load-ca-privkey".into(),
            s(&ca.join("ca-key.pem")),
        ]),
        None => args.push("--generate-self-signed".into()),
    }
    args.extend([
        "--load-privkey".into(),
        s(key),
        "--template".into(),
        s(&info),
        "--outfile".into(),
        s(out),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    certtool(&args);
}

const SERVER_USES: &str = "tls_www_server\nencryption_key\nsigning_key\n";
const VALID: &str = "expiration_days = 30\n";

fn copy(from: &Path, to_dir: &Path, name: &str) {
    std::fs::create_dir_all(to_dir).unwrap();
    std::fs::copy(from, to_dir.join(name)).unwrap();
}

impl Pki {
    /// The test process's PKI, made on first use.
    pub fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(Pki::make)
    }

    fn make() -> Pki {
        require_gnutls_bin();
        let root = tempfile::Builder::new()
            .prefix("tls-pki-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        let work = root.join("work");
        for ca in ["ca", "other-ca"] {
            let d = work.join(ca);
            std::fs::create_dir_all(&d).unwrap();
            key(&d.join("ca-key.pem"), false);
            let t = format!("cn = nbdcp test {ca}\nca\ncert_signing_key\n{VALID}");
            cert(&d, &d.join("ca-cert.pem"), &d.join("ca-key.pem"), None, &t);
        }
        let ca = work.join("ca");
        let server_key = work.join("server-key.pem");
        let client_key = work.join("client-key.pem");
        key(&server_key, true);
        key(&client_key, true);
        let here = "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n";
        let servers = [
            ("server", format!("{here}{SERVER_USES}{VALID}")),
            (
                "server-expired",
                format!(
                    "{here}{SERVER_USES}activation_date = \"2020-01-01 00:00:00\"\nexpiration_date = \"2020-02-01 00:00:00\"\n"
                ),
            ),
            (
                "server-other-host",
                format!("cn = {OTHER_HOST}\ndns_name = {OTHER_HOST}\n{SERVER_USES}{VALID}"),
            ),
        ];
        for (name, template) in servers {
            let d = root.join(name);
            std::fs::create_dir_all(&d).unwrap();
            cert(
                &work,
                &d.join("server-cert.pem"),
                &server_key,
                Some(&ca),
                &template,
            );
            copy(&server_key, &d, "server-key.pem");
            copy(&ca.join("ca-cert.pem"), &d, "ca-cert.pem");
        }
        let client = root.join("client");
        std::fs::create_dir_all(&client).unwrap();
        let t =
            format!("cn = nbdcp test client\ntls_www_client\nencryption_key\nsigning_key\n{VALID}");
        cert(
            &work,
            &client.join("client-cert.pem"),
            &client_key,
            Some(&ca),
            &t,
        );
        copy(&client_key, &client, "client-key.pem");
        copy(&ca.join("ca-cert.pem"), &client, "ca-cert.pem");
        copy(
            &ca.join("ca-cert.pem"),
            &root.join("client-no-cert"),
            "ca-cert.pem",
        );
        let wrong = root.join("client-wrong-ca");
        copy(&work.join("other-ca/ca-cert.pem"), &wrong, "ca-cert.pem");
        copy(&client.join("client-cert.pem"), &wrong, "client-cert.pem");
        copy(&client_key, &wrong, "client-key.pem");
        for (name, key) in [
            ("keys.psk", None),
            ("wrong.psk", Some("00112233445566778899aabbccddeeff")),
        ] {
            let d = root.join("psk");
            std::fs::create_dir_all(&d).unwrap();
            let path = d.join(name);
            match key {
                None => {
                    let out = Command::new("psktool")
                        .args(["-u", PSK_USER, "-p", path.to_str().unwrap()])
                        .output()
                        .unwrap_or_else(|e| panic!("cannot run psktool: {e}"));
                    assert!(out.status.success(), "psktool failed: {out:?}");
                }
                Some(k) => std::fs::write(&path, format!("{PSK_USER}:{k}\n")).unwrap(),
            }
        }
        Pki { root }
    }

    /// nbdkit's and qemu-nbd's directory: `ca-cert.pem`,
    /// `server-cert.pem` (for localhost and 127.0.0.1), `server-key.pem`.
    pub fn server(&self) -> PathBuf {
        self.root.join("server")
    }

    /// A server directory whose certificate expired in 2020.
    pub fn expired(&self) -> PathBuf {
        self.root.join("server-expired")
    }

    /// A server directory whose certificate is for [`OTHER_HOST`] only.
    pub fn other_host(&self) -> PathBuf {
        self.root.join("server-other-host")
    }

    /// nbdcp's directory: `ca-cert.pem`, `client-cert.pem`,
    /// `client-key.pem`.
    pub fn client(&self) -> PathBuf {
        self.root.join("client")
    }

    /// A client directory with the CA only (no client certificate).
    pub fn client_without_cert(&self) -> PathBuf {
        self.root.join("client-no-cert")
    }

    /// A client directory trusting another CA than the one that signed
    /// the servers' certificates.
    pub fn client_wrong_ca(&self) -> PathBuf {
        self.root.join("client-wrong-ca")
    }

    /// The psktool file with [`PSK_USER`]'s key, as the servers have it.
    pub fn psk(&self) -> PathBuf {
        self.root.join("psk/keys.psk")
    }

    /// A psktool file with another key for [`PSK_USER`].
    pub fn wrong_psk(&self) -> PathBuf {
        self.root.join("psk/wrong.psk")
    }

    /// The directory holding [`Pki::psk`] as `keys.psk`, as qemu-nbd's
    /// `tls-creds-psk` wants it.
    pub fn psk_dir(&self) -> PathBuf {
        self.root.join("psk")
    }
}

/// nbdkit options for TLS with pre-shared keys.
pub fn nbdkit_psk_args(pki: &Pki) -> Vec<String> {
    vec![
        "--tls=require".into(),
        format!("--tls-psk={}", pki.psk().display()),
    ]
}

/// nbdkit options for TLS with X.509 certificates from `dir`, checking
/// client certificates with `verify_peer`.
pub fn nbdkit_x509_args(dir: &Path, verify_peer: bool) -> Vec<String> {
    let mut v = vec![
        "--tls=require".into(),
        format!("--tls-certificates={}", dir.display()),
    ];
    if verify_peer {
        v.push("--tls-verify-peer".into());
    }
    v
}

/// qemu-nbd options for X.509 from `dir`, checking client certificates.
pub fn qemu_x509_args(dir: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
            dir.display()
        ),
        "--tls-creds".into(),
        "tls0".into(),
    ]
}

/// qemu-nbd options for pre-shared keys (`keys.psk` in the PKI's PSK
/// directory).
pub fn qemu_psk_args(pki: &Pki) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-psk,id=tls0,dir={},endpoint=server",
            pki.psk_dir().display()
        ),
        "--tls-creds".into(),
        "tls0".into(),
    ]
}

/// `args` (owned) followed by `rest`, as the `&[&str]` servers take.
pub fn with<'a>(args: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    args.iter()
        .map(String::as_str)
        .chain(rest.iter().copied())
        .collect()
}

/// The TLS form of a plain NBD URI (`nbd://` to `nbds://`, `nbd+unix://`
/// to `nbds+unix://`), with `params` added to its query.
pub fn tls_uri(plain: &str, params: &[(&str, &str)]) -> String {
    let rest = plain
        .strip_prefix("nbd")
        .unwrap_or_else(|| panic!("not an NBD URI: {plain}"));
    let mut uri = format!("nbds{rest}");
    for (k, v) in params {
        uri.push(if uri.contains('?') { '&' } else { '?' });
        uri.push_str(&format!("{k}={v}"));
    }
    uri
}

/// [`tls_uri`] with the PSK file and user.
pub fn psk_uri(plain: &str, pki: &Pki) -> String {
    let file = pki.psk();
    tls_uri(
        plain,
        &[
            ("tls-psk-file", file.to_str().unwrap()),
            ("tls-username", PSK_USER),
        ],
    )
}

/// [`tls_uri`] with the certificates directory `dir`.
pub fn x509_uri(plain: &str, dir: &Path) -> String {
    tls_uri(plain, &[("tls-certificates", dir.to_str().unwrap())])
}
