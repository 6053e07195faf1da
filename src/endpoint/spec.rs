//! Endpoint strings, as the command line takes them, and opening them.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Endpoint;
use super::file::FileEndpoint;
use super::nbd::NbdEndpoint;
use super::null::NullEndpoint;
use super::stream;
use crate::error::{Error, ErrorKind, Operation, Result};
use crate::options::{DEFAULT_QUEUE_SIZE, DEFAULT_REQUESTS};
use nbd::uri::NbdUri;

/// URI schemes that name an NBD server.
const NBD_SCHEMES: &[&str] = &[
    "nbd:",
    "nbd+unix:",
    "nbds:",
    "nbds+unix:",
    "nbd+vsock:",
    "nbds+vsock:",
    "nbd+ssh:",
    "nbds+ssh:",
];

/// What the user named as a source or destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointSpec {
    /// A regular file or block device.
    Path(PathBuf),
    /// `-`: standard input or output.
    Stdio,
    /// `null:`: discard (destination only).
    Null,
    /// An NBD URI such as `nbd://host/export` or `nbd+unix:///?socket=S`.
    Nbd(String),
    /// `[ CMD ARGS ... ]`: an NBD server to run with socket activation.
    /// The words are passed to it as given, whatever their encoding.
    Command(Vec<OsString>),
}

impl EndpointSpec {
    /// Classify an endpoint string. Anything that is not `-`, `null:` or
    /// an NBD URI is a path, taken byte for byte (a file name need not be
    /// UTF-8).
    pub fn parse(s: impl AsRef<OsStr>) -> EndpointSpec {
        let s = s.as_ref();
        match s.to_str() {
            Some("-") => EndpointSpec::Stdio,
            Some("null:") => EndpointSpec::Null,
            Some(uri) if NBD_SCHEMES.iter().any(|p| uri.starts_with(p)) => {
                EndpointSpec::Nbd(uri.to_string())
            }
            _ => EndpointSpec::Path(PathBuf::from(s)),
        }
    }

    /// The name used in messages.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for EndpointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointSpec::Path(p) => write!(f, "{}", p.display()),
            EndpointSpec::Stdio => write!(f, "-"),
            EndpointSpec::Null => write!(f, "null:"),
            EndpointSpec::Nbd(uri) => write!(f, "{uri}"),
            EndpointSpec::Command(argv) => {
                f.write_str("[")?;
                for word in argv {
                    write!(f, " {}", word.to_string_lossy())?;
                }
                f.write_str(" ]")
            }
        }
    }
}

/// Settings endpoints need when they are opened.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Most requests in flight per NBD connection.
    pub requests: usize,
    /// Most bytes in flight per NBD connection.
    pub queue_size: usize,
    /// Fail an NBD request that takes longer than this.
    pub timeout: Option<Duration>,
    /// Keep a regular-file destination's contents: do not truncate it,
    /// only grow it to the size asked for if it is shorter (copying a
    /// range).
    pub preserve_destination: bool,
}

impl Default for OpenOptions {
    /// [`CopyOptions`](crate::CopyOptions)' defaults.
    fn default() -> Self {
        OpenOptions {
            requests: DEFAULT_REQUESTS,
            queue_size: DEFAULT_QUEUE_SIZE,
            timeout: None,
            preserve_destination: false,
        }
    }
}

/// Refuse combinations that cannot work before anything is opened: the
/// same pipe on both sides, `null:` as a source, or a file copied onto
/// itself (opening the destination would truncate the source).
pub fn check_distinct(source: &EndpointSpec, destination: &EndpointSpec) -> Result<()> {
    if *source == EndpointSpec::Null {
        return Err(Error::usage("null: can only be a destination"));
    }
    if *source == EndpointSpec::Stdio && *destination == EndpointSpec::Stdio {
        return Err(Error::usage(
            "'-' can be the source or the destination, not both",
        ));
    }
    if let (EndpointSpec::Path(s), EndpointSpec::Path(d)) = (source, destination) {
        if same_file(s, d) {
            return Err(Error::usage(format!(
                "source and destination are the same file: {}",
                d.display()
            )));
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `path` is a FIFO, character device or socket: something that
/// can only be read or written in order.
fn is_stream_path(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| {
            let t = m.file_type();
            t.is_fifo() || t.is_char_device() || t.is_socket()
        })
        .unwrap_or(false)
}

fn open_path(
    name: &str,
    path: &Path,
    destination: Option<Option<u64>>,
    preserve: bool,
) -> Result<Box<dyn Endpoint>> {
    if is_stream_path(path) {
        let mut opts = std::fs::OpenOptions::new();
        match destination {
            Some(_) => opts.write(true),
            None => opts.read(true),
        };
        let file = opts
            .open(path)
            .map_err(|e| Error::io(name, Operation::Open, e))?;
        return Ok(stream::from_file(name, file, destination.is_some()));
    }
    Ok(match destination {
        Some(Some(end)) if preserve => Box::new(FileEndpoint::open_to_extend(name, path, end)?),
        Some(size) => Box::new(FileEndpoint::open_destination(name, path, size)?),
        None => Box::new(FileEndpoint::open_source(name, path)?),
    })
}

fn connect_nbd(uri: &str, writable: bool, options: &OpenOptions) -> Result<Box<dyn Endpoint>> {
    let parsed = NbdUri::parse(uri).map_err(|e| Error::from(e).with_endpoint(uri))?;
    Ok(Box::new(NbdEndpoint::connect(
        uri, &parsed, options, writable,
    )?))
}

/// Open a source.
pub fn open_source(spec: &EndpointSpec, options: &OpenOptions) -> Result<Box<dyn Endpoint>> {
    match spec {
        EndpointSpec::Path(p) => open_path(&spec.name(), p, None, false),
        EndpointSpec::Stdio => stream::open_stdin(),
        EndpointSpec::Null => Err(Error::usage("null: can only be a destination")),
        EndpointSpec::Nbd(uri) => connect_nbd(uri, false, options),
        EndpointSpec::Command(argv) => Ok(Box::new(NbdEndpoint::start(
            &spec.name(),
            argv,
            options,
            false,
        )?)),
    }
}

/// Open a destination for a source of `source_size` bytes (`None` if the
/// source is a pipe). With [`OpenOptions::preserve_destination`],
/// `source_size` is where the copied range ends on the destination: a
/// regular file keeps its contents and grows to it if shorter.
pub fn open_destination(
    spec: &EndpointSpec,
    source_size: Option<u64>,
    options: &OpenOptions,
) -> Result<Box<dyn Endpoint>> {
    let ep: Box<dyn Endpoint> = match spec {
        EndpointSpec::Path(p) => open_path(
            &spec.name(),
            p,
            Some(source_size),
            options.preserve_destination,
        )?,
        EndpointSpec::Stdio => stream::open_stdout(source_size)?,
        EndpointSpec::Null => Box::new(NullEndpoint),
        EndpointSpec::Nbd(uri) => connect_nbd(uri, true, options)?,
        EndpointSpec::Command(argv) => {
            Box::new(NbdEndpoint::start(&spec.name(), argv, options, true)?)
        }
    };
    if ep.capabilities().read_only {
        return Err(
            Error::new(ErrorKind::Unsupported, "the destination is read-only")
                .with_endpoint(ep.name()),
        );
    }
    Ok(ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_endpoint_strings() {
        assert_eq!(EndpointSpec::parse("-"), EndpointSpec::Stdio);
        assert_eq!(EndpointSpec::parse("null:"), EndpointSpec::Null);
        assert_eq!(
            EndpointSpec::parse("nbd://localhost/x"),
            EndpointSpec::Nbd("nbd://localhost/x".into())
        );
        assert_eq!(
            EndpointSpec::parse("nbd+unix:///?socket=/s"),
            EndpointSpec::Nbd("nbd+unix:///?socket=/s".into())
        );
        for uri in [
            "nbd+vsock://2/x",
            "nbds+vsock:///",
            "nbd+ssh://h/?socket=/s",
            "nbds+ssh://u@h:22/",
        ] {
            assert_eq!(EndpointSpec::parse(uri), EndpointSpec::Nbd(uri.into()));
        }
        assert_eq!(
            EndpointSpec::parse("disk.img"),
            EndpointSpec::Path("disk.img".into())
        );
        assert_eq!(
            EndpointSpec::parse("./null:"),
            EndpointSpec::Path("./null:".into())
        );
    }

    #[test]
    fn refuses_same_file_and_null_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        std::fs::write(&p, b"x").unwrap();
        let link = dir.path().join("b");
        std::fs::hard_link(&p, &link).unwrap();
        let e =
            check_distinct(&EndpointSpec::Path(p.clone()), &EndpointSpec::Path(link)).unwrap_err();
        assert!(e.to_string().contains("same file"));
        assert!(check_distinct(&EndpointSpec::Null, &EndpointSpec::Path(p)).is_err());
    }
}
