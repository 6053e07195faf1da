//! The one error type of the library.
//!
//! Every error names what went wrong and where: the endpoint, the
//! operation, and the offset and length where there is one, so that the
//! command line can print it as a single line. The cause (an operating
//! system error, a protocol decoding error) is kept as
//! [`std::error::Error::source`], and an error an NBD server sent keeps its
//! errno ([`Error::errno`]).

use std::fmt;
use std::io;

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Broad classes of failure, for programs that want to react differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A bad argument: option value, endpoint string, URI.
    Usage,
    /// An operating system or transport error.
    Io,
    /// The peer broke the NBD protocol or sent something unusable.
    Protocol,
    /// The server answered a request with an error ([`Error::errno`]).
    Server,
    /// The endpoint cannot do what is needed (writes, TLS, a size).
    Unsupported,
    /// The destination is smaller than the source.
    TooSmall,
    /// The copy was cancelled (by the caller or a signal).
    Cancelled,
    /// A request did not complete within the timeout.
    Timeout,
    /// `--verify` found the destination differs from the source.
    Mismatch,
    /// TLS with an NBD server could not be set up: it does not offer TLS
    /// (or requires it), a key or certificate could not be loaded, or
    /// either side did not accept the other's.
    Tls,
}

/// What was being done when an error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Opening a file or device.
    Open,
    /// Looking at a file's type and size.
    Stat,
    /// Asking a block device for its size.
    GetSize,
    /// Setting a destination file's size.
    Resize,
    /// Connecting to an NBD server.
    Connect,
    /// The NBD handshake.
    Handshake,
    /// Replacing a broken NBD connection.
    Reconnect,
    /// Reading data.
    Read,
    /// Writing data.
    Write,
    /// Making a range read as zeroes.
    Zero,
    /// Discarding a range.
    Trim,
    /// Making writes durable.
    Flush,
    /// Asking an NBD server where its data is.
    BlockStatus,
    /// Asking a file where its holes are.
    FindHoles,
    /// Waiting for an NBD reply not tied to one request.
    Reply,
    /// Ending an NBD session.
    Disconnect,
    /// Changing a socket's timeout.
    SetTimeout,
    /// Duplicating a file descriptor.
    Duplicate,
    /// Comparing the destination with the source (`--verify`).
    Verify,
}

impl Operation {
    /// The operation as messages say it ("read", "block status").
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Open => "open",
            Operation::Stat => "stat",
            Operation::GetSize => "get size",
            Operation::Resize => "resize",
            Operation::Connect => "connect",
            Operation::Handshake => "handshake",
            Operation::Reconnect => "reconnect",
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Zero => "zero",
            Operation::Trim => "trim",
            Operation::Flush => "flush",
            Operation::BlockStatus => "block status",
            Operation::FindHoles => "find holes",
            Operation::Reply => "reply",
            Operation::Disconnect => "disconnect",
            Operation::SetTimeout => "set timeout",
            Operation::Duplicate => "duplicate",
            Operation::Verify => "verify",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<nbd::Operation> for Operation {
    fn from(op: nbd::Operation) -> Operation {
        use nbd::Operation as N;
        match op {
            N::Connect => Operation::Connect,
            N::Handshake => Operation::Handshake,
            N::Read => Operation::Read,
            N::Write => Operation::Write,
            N::Zero => Operation::Zero,
            N::Trim => Operation::Trim,
            N::Flush => Operation::Flush,
            N::BlockStatus => Operation::BlockStatus,
            N::Disconnect => Operation::Disconnect,
            N::SetTimeout => Operation::SetTimeout,
            // Parsing a URI is part of opening the endpoint it names.
            N::ParseUri => Operation::Open,
            _ => Operation::Reply,
        }
    }
}

/// The cause behind an error, kept for [`std::error::Error::source`].
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error, with where it happened.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    endpoint: Option<String>,
    operation: Option<Operation>,
    offset: Option<u64>,
    length: Option<u64>,
    errno: Option<i32>,
    message: String,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            endpoint: None,
            operation: None,
            offset: None,
            length: None,
            errno: None,
            message: message.into(),
            source: None,
        }
    }

    /// A bad argument.
    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message)
    }

    /// An I/O error during `operation` on `endpoint`.
    pub fn io(endpoint: &str, operation: Operation, err: io::Error) -> Error {
        let timed_out = matches!(
            err.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        );
        let (kind, message) = if timed_out {
            (ErrorKind::Timeout, "timed out".to_string())
        } else {
            (ErrorKind::Io, nbd::error::describe_io(&err))
        };
        Error {
            endpoint: Some(endpoint.to_string()),
            operation: Some(operation),
            errno: err.raw_os_error(),
            source: Some(Box::new(err)),
            ..Error::new(kind, message)
        }
    }

    /// Attach the endpoint name (kept if one is already set).
    pub fn with_endpoint(mut self, endpoint: &str) -> Error {
        if self.endpoint.is_none() {
            self.endpoint = Some(endpoint.to_string());
        }
        self
    }

    /// Attach the operation (kept if one is already set).
    pub fn with_operation(mut self, operation: Operation) -> Error {
        if self.operation.is_none() {
            self.operation = Some(operation);
        }
        self
    }

    /// Attach the offset and length of the request that failed.
    pub fn at(mut self, offset: u64, length: u64) -> Error {
        self.offset = Some(offset);
        self.length = Some(length);
        self
    }

    /// Attach only an offset.
    pub fn at_offset(mut self, offset: u64) -> Error {
        self.offset = Some(offset);
        self
    }

    /// Add a clause to the message, e.g. what became of a server process.
    pub fn with_note(mut self, note: impl fmt::Display) -> Error {
        self.message = format!("{} ({note})", self.message);
        self
    }

    /// Keep `source` as the cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The endpoint the error happened on, if any.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The operation that failed, if known.
    pub fn operation(&self) -> Option<Operation> {
        self.operation
    }

    /// The offset of the failing request, if any.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The length of the failing request, if any.
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    /// This system's `errno` for the failure: the operating system's, or
    /// the one an NBD server answered with (`ENOSPC`, `EIO`, ...).
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }

    /// The message, without endpoint, operation or location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The underlying operating system error, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()?.downcast_ref::<io::Error>()
    }
}

impl From<nbd::Error> for Error {
    /// Keep every field of the NBD error; the caller adds the endpoint.
    fn from(e: nbd::Error) -> Error {
        let parts = e.into_parts();
        let kind = match parts.kind {
            nbd::ErrorKind::Io => ErrorKind::Io,
            nbd::ErrorKind::Timeout => ErrorKind::Timeout,
            nbd::ErrorKind::Protocol => ErrorKind::Protocol,
            nbd::ErrorKind::Server => ErrorKind::Server,
            nbd::ErrorKind::InvalidInput => ErrorKind::Usage,
            nbd::ErrorKind::Tls => ErrorKind::Tls,
            _ => ErrorKind::Unsupported,
        };
        let os_errno = parts
            .source
            .as_ref()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error);
        Error {
            kind,
            endpoint: None,
            operation: parts.operation.map(Operation::from),
            offset: parts.offset,
            length: parts.length,
            errno: parts
                .server_errno
                .map(nbd::ServerErrno::to_errno)
                .or(os_errno),
            message: parts.message,
            source: parts.source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(endpoint) = &self.endpoint {
            write!(f, "{endpoint}: ")?;
        }
        if let Some(op) = self.operation {
            write!(f, "{op}")?;
            match (self.offset, self.length) {
                (Some(o), Some(l)) => write!(f, " at offset {o} length {l}")?,
                (Some(o), None) => write!(f, " at offset {o}")?,
                _ => {}
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_endpoint_operation_offset_and_length() {
        let e = Error::io(
            "disk.img",
            Operation::Read,
            io::Error::from_raw_os_error(libc::EIO),
        )
        .at(4096, 512);
        assert_eq!(
            e.to_string(),
            "disk.img: read at offset 4096 length 512: Input/output error"
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(
            (e.operation(), e.length()),
            (Some(Operation::Read), Some(512))
        );
        assert_eq!(e.errno(), Some(libc::EIO));
    }

    #[test]
    fn display_without_location() {
        let e = Error::usage("bad size '3X'");
        assert_eq!(e.to_string(), "bad size '3X'");
    }

    #[test]
    fn nbd_errors_keep_kind_location_errno_and_cause() {
        let server =
            nbd::Error::server(nbd::Operation::Write, nbd::wire::NBD_ENOSPC, "full").at(8192, 4096);
        let e = Error::from(server).with_endpoint("nbd://h/");
        assert_eq!(
            e.to_string(),
            "nbd://h/: write at offset 8192 length 4096: full"
        );
        assert_eq!(
            (e.kind(), e.errno()),
            (ErrorKind::Server, Some(libc::ENOSPC))
        );

        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        let e = Error::from(nbd::Error::io(nbd::Operation::Read, reset));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.errno(), Some(libc::ECONNRESET));
        assert_eq!(
            e.io_error().and_then(io::Error::raw_os_error),
            Some(libc::ECONNRESET)
        );
    }
}
