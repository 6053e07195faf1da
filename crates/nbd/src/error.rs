//! The NBD crate's error: what failed (kind), during which operation,
//! where (offset and length), what the server said (errno), and the
//! underlying cause kept for [`std::error::Error::source`].
//!
//! The crate knows nothing of the program using it, so an error does not
//! name an endpoint: the caller adds that context when it wraps the error.

use std::fmt;
use std::io;

use crate::wire::{
    NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM,
    NBD_ESHUTDOWN, WireError,
};

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Broad classes of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system or the connection failed.
    Io,
    /// A socket read or write took longer than the timeout.
    Timeout,
    /// The peer broke the NBD protocol or sent something unusable; the
    /// connection is unusable afterwards.
    Protocol,
    /// The server answered a request with an error ([`Error::server_errno`]).
    Server,
    /// The server (or this build) cannot do what was asked.
    Unsupported,
    /// The caller asked for something impossible: a malformed URI, an
    /// offset that overflows.
    InvalidInput,
    /// TLS could not be set up: the server does not offer it (or insists
    /// on it), a credential could not be loaded, or the TLS handshake
    /// failed (a key or certificate not accepted, by either side).
    /// Retrying does not help.
    Tls,
}

/// What was being done when an error happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// Parsing a URI.
    ParseUri,
    /// Opening the socket.
    Connect,
    /// Negotiating the export.
    Handshake,
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_WRITE_ZEROES` (or zero writes where it is missing).
    Zero,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// Waiting for a reply that could not be matched to one request.
    Reply,
    /// Changing the socket's timeout.
    SetTimeout,
}

impl Operation {
    /// The operation as messages say it ("read", "block status").
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ParseUri => "parse URI",
            Operation::Connect => "connect",
            Operation::Handshake => "handshake",
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Zero => "zero",
            Operation::Trim => "trim",
            Operation::Flush => "flush",
            Operation::BlockStatus => "block status",
            Operation::Disconnect => "disconnect",
            Operation::Reply => "reply",
            Operation::SetTimeout => "set timeout",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error value the server sent (`NBD_E*`), kept as the protocol gives
/// it and translated to this system's `errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerErrno(pub u32);

impl ServerErrno {
    /// The same error as this system's `errno` value. The protocol's
    /// values are Linux's; an unknown one means `EINVAL`, as the
    /// specification says a client should treat it.
    pub fn to_errno(self) -> i32 {
        match self.0 {
            NBD_EPERM => libc::EPERM,
            NBD_EIO => libc::EIO,
            NBD_ENOMEM => libc::ENOMEM,
            NBD_EINVAL => libc::EINVAL,
            NBD_ENOSPC => libc::ENOSPC,
            NBD_EOVERFLOW => libc::EOVERFLOW,
            NBD_ENOTSUP => libc::ENOTSUP,
            NBD_ESHUTDOWN => libc::ESHUTDOWN,
            _ => libc::EINVAL,
        }
    }
}

/// An NBD error.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    operation: Option<Operation>,
    offset: Option<u64>,
    length: Option<u64>,
    server_errno: Option<ServerErrno>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            operation: None,
            offset: None,
            length: None,
            server_errno: None,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error during `operation`; a timed-out socket gives
    /// [`ErrorKind::Timeout`].
    pub fn io(operation: Operation, err: io::Error) -> Error {
        let timed_out = matches!(
            err.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        );
        let (kind, message) = if timed_out {
            // A timeout the transport explained (which address, what it
            // waited for) keeps its explanation.
            let message = match err.get_ref() {
                Some(_) => describe_io(&err),
                None => "timed out".to_string(),
            };
            (ErrorKind::Timeout, message)
        } else {
            (ErrorKind::Io, describe_io(&err))
        };
        Error {
            source: Some(Box::new(err)),
            ..Error::new(kind, message).during(operation)
        }
    }

    /// A protocol violation found by the wire decoders during `operation`.
    pub fn wire(operation: Operation, err: WireError) -> Error {
        Error {
            source: Some(Box::new(err.clone())),
            ..Error::new(ErrorKind::Protocol, err.to_string()).during(operation)
        }
    }

    /// The server's answer `errno` to a request.
    pub fn server(operation: Operation, errno: u32, message: impl Into<String>) -> Error {
        Error {
            server_errno: Some(ServerErrno(errno)),
            ..Error::new(ErrorKind::Server, message).during(operation)
        }
    }

    /// Set the operation.
    pub fn during(mut self, operation: Operation) -> Error {
        self.operation = Some(operation);
        self
    }

    /// Attach the offset and length of the request that failed.
    pub fn at(mut self, offset: u64, length: u64) -> Error {
        self.offset = Some(offset);
        self.length = Some(length);
        self
    }

    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
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

    /// For [`ErrorKind::Server`]: the error the server sent.
    pub fn server_errno(&self) -> Option<ServerErrno> {
        self.server_errno
    }

    /// The message, without operation or location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The operating system error behind this one, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()?.downcast_ref::<io::Error>()
    }

    /// Take the error apart, for a caller that wraps it in its own type
    /// without repeating its text.
    pub fn into_parts(self) -> Parts {
        Parts {
            kind: self.kind,
            operation: self.operation,
            offset: self.offset,
            length: self.length,
            server_errno: self.server_errno,
            message: self.message,
            source: self.source,
        }
    }
}

/// The fields of an [`Error`], from [`Error::into_parts`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Parts {
    /// See [`Error::kind`].
    pub kind: ErrorKind,
    /// See [`Error::operation`].
    pub operation: Option<Operation>,
    /// See [`Error::offset`].
    pub offset: Option<u64>,
    /// See [`Error::length`].
    pub length: Option<u64>,
    /// See [`Error::server_errno`].
    pub server_errno: Option<ServerErrno>,
    /// See [`Error::message`].
    pub message: String,
    /// The underlying cause.
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The text of an I/O error without Rust's "(os error N)" suffix.
pub fn describe_io(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(op) = self.operation {
            write!(f, "{op}")?;
            match (self.offset, self.length) {
                (Some(o), Some(l)) => write!(f, " at offset {o} length {l}")?,
                (Some(o), None) => write!(f, " at offset {o}")?,
                _ => {}
            }
            write!(f, ": ")?;
        }
        f.write_str(&self.message)
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
    fn display_names_operation_offset_and_length() {
        let e = Error::io(Operation::Read, io::Error::from_raw_os_error(libc::EIO)).at(4096, 512);
        assert_eq!(
            e.to_string(),
            "read at offset 4096 length 512: Input/output error"
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(
            e.io_error().and_then(io::Error::raw_os_error),
            Some(libc::EIO)
        );
    }

    #[test]
    fn timeouts_are_their_own_kind() {
        let e = Error::io(Operation::Reply, io::ErrorKind::WouldBlock.into());
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            (ErrorKind::Timeout, "reply: timed out")
        );
    }

    #[test]
    fn server_errors_carry_their_errno() {
        let e = Error::server(Operation::Write, NBD_ENOSPC, "No space left on device");
        assert_eq!(
            e.server_errno().map(ServerErrno::to_errno),
            Some(libc::ENOSPC)
        );
        assert_eq!(ServerErrno(NBD_ESHUTDOWN).to_errno(), libc::ESHUTDOWN);
        assert_eq!(ServerErrno(4242).to_errno(), libc::EINVAL);
    }

    #[test]
    fn wire_errors_keep_their_cause() {
        let cause = WireError::BadMagic {
            what: "reply",
            expected: 1,
            got: 2,
        };
        let e = Error::wire(Operation::Reply, cause.clone());
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert_eq!(
            e.to_string(),
            "reply: reply has bad magic 0x2 (expected 0x1)"
        );
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<WireError>());
        assert_eq!(source, Some(&cause));
    }
}
