//! The one error type of the library.
//!
//! Every error names what went wrong and where: the endpoint, the
//! operation, and the offset and length where there is one, so that the
//! command line can print it as a single line.

use std::fmt;
use std::io;

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Broad classes of failure, for programs that want to react differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A bad argument: option value, endpoint string, URI.
    Usage,
    /// An operating system or transport error.
    Io,
    /// The peer broke the NBD protocol or sent something unusable.
    Protocol,
    /// The server answered a request with an error.
    Server,
    /// The endpoint cannot do what is needed (writes, TLS, a size).
    Unsupported,
    /// The destination is smaller than the source.
    TooSmall,
    /// The copy was cancelled (by the caller or a signal).
    Cancelled,
    /// A request did not complete within the timeout.
    Timeout,
}

/// An error, with where it happened.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    endpoint: Option<String>,
    operation: Option<&'static str>,
    offset: Option<u64>,
    length: Option<u64>,
    message: String,
    source: Option<io::Error>,
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
            message: message.into(),
            source: None,
        }
    }

    /// A bad argument.
    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message)
    }

    /// An I/O error during `operation` on `endpoint`.
    pub fn io(endpoint: &str, operation: &'static str, err: io::Error) -> Error {
        let kind =
            if err.kind() == io::ErrorKind::TimedOut || err.kind() == io::ErrorKind::WouldBlock {
                ErrorKind::Timeout
            } else {
                ErrorKind::Io
            };
        Error {
            kind,
            endpoint: Some(endpoint.to_string()),
            operation: Some(operation),
            offset: None,
            length: None,
            message: if kind == ErrorKind::Timeout {
                "timed out".to_string()
            } else {
                describe_io(&err)
            },
            source: Some(err),
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
    pub fn with_operation(mut self, operation: &'static str) -> Error {
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

    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The endpoint the error happened on, if any.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The offset of the failing request, if any.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The underlying operating system error, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

/// The text of an I/O error without Rust's "(os error N)" suffix.
fn describe_io(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
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
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_endpoint_operation_offset_and_length() {
        let e =
            Error::io("disk.img", "read", io::Error::from_raw_os_error(libc::EIO)).at(4096, 512);
        assert_eq!(
            e.to_string(),
            "disk.img: read at offset 4096 length 512: Input/output error"
        );
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn display_without_location() {
        let e = Error::usage("bad size '3X'");
        assert_eq!(e.to_string(), "bad size '3X'");
    }
}
