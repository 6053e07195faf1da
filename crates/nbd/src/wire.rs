//! NBD wire format: constants, and the encoding and decoding of every
//! message nbdcp sends or receives. Nothing here does I/O.
//!
//! Every decoder takes a byte slice and returns a [`WireError`] on short
//! input, a bad magic number or an out-of-range length, so a peer can never
//! make the client panic or allocate more than the documented caps below.
//! Encoders for server-side messages exist too: the scripted test servers
//! use them, and so can fuzzers.
//!
//! Caps on what a peer may make us buffer (all checked before allocating):
//!
//! | message | cap | why |
//! | --- | --- | --- |
//! | option reply payload | [`MAX_OPTION_REPLY_PAYLOAD`] (64 KiB) | strings are at most 4 KiB; INFO replies are 12 to 14 bytes |
//! | `OFFSET_DATA` chunk | [`MAX_REQUEST_SIZE`] + 8 | the client never asks for more than 32 MiB, and data goes straight into the caller's buffer |
//! | `BLOCK_STATUS` chunk | [`MAX_BLOCK_STATUS_PAYLOAD`] (8 MiB + 4) | one million extents, more than any server sends for one request |
//! | `BLOCK_STATUS_EXT` chunk | [`MAX_BLOCK_STATUS_EXT_PAYLOAD`] (16 MiB + 8) | the same million extents, 16 bytes each |
//! | any chunk with extended headers | the caps above | a 64-bit length is checked against them before anything is read |
//! | error chunk | [`MAX_ERROR_PAYLOAD`] (64 KiB) | the message is at most 4 KiB |
//! | string (export name, message) | [`MAX_STRING`] (4 KiB) | the protocol's own limit |

use std::fmt;

// ---------------------------------------------------------------------------
// Magic numbers.

/// `NBDMAGIC`: first eight bytes every server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting magic, also prefixed to every option request.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The second magic of the obsolete oldstyle handshake.
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Prefix of every transmission request once extended headers are
/// negotiated.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Prefix of every reply chunk once extended headers are negotiated.
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits).

/// Server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client does not want the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Option codes.

/// Choose an export and end negotiation (cannot report errors).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Ask about an export without choosing it.
pub const NBD_OPT_INFO: u32 = 6;
/// Choose an export and end negotiation, with error replies.
pub const NBD_OPT_GO: u32 = 7;
/// Ask for structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Ask for extended (64-bit) transmission headers, which imply structured
/// replies.
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option reply types.

/// Option accepted; end of a list of replies.
pub const NBD_REP_ACK: u32 = 1;
/// One export, in reply to `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// One piece of information about an export.
pub const NBD_REP_INFO: u32 = 3;
/// One selected metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Option unknown to the server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Option forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Option syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Option not supported on the server's platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// No such export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Client must request `NBD_INFO_BLOCK_SIZE`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// Request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------
// Information types (NBD_OPT_INFO / NBD_OPT_GO).

/// Export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits).

/// Always set by conforming servers.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Export behaves like a rotating disk.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` supported.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections see one another's writes after a flush.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` supported.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Block status requests may carry a payload (extended headers only).
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------
// Commands and command flags.

/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write (payload follows the header).
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect; no reply.
pub const NBD_CMD_DISC: u16 = 2;
/// Flush completed writes to stable storage.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard.
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes without a payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata contexts.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// `WRITE_ZEROES`: keep the blocks allocated.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `READ`: at most one content chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// `BLOCK_STATUS`: one extent only.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `WRITE_ZEROES`: fail fast unless cheaper than writing.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------
// Structured replies.

/// Last chunk of a structured reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; ends a reply.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A run of zeroes at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Extents of one metadata context.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Extents of one metadata context with 64-bit lengths (extended headers).
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Error without an offset.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// Error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation`: the extent is a hole.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// The metadata context nbdcp asks for.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------------
// Error values.

/// Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Sizes and caps.

/// Length of the newstyle greeting: two magics and the handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of the reply to `NBD_OPT_EXPORT_NAME`, without the zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Length of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;
/// Longest reply header of any kind.
pub const MAX_REPLY_HEADER_LEN: usize = EXTENDED_REPLY_HEADER_LEN;

/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest option reply payload accepted.
pub const MAX_OPTION_REPLY_PAYLOAD: u32 = 64 * 1024;
/// Largest read or write nbdcp ever sends in one request.
pub const MAX_REQUEST_SIZE: u32 = 32 * 1024 * 1024;
/// Largest `OFFSET_DATA` chunk payload accepted (offset + data).
pub const MAX_DATA_PAYLOAD: u32 = MAX_REQUEST_SIZE + 8;
/// Largest `BLOCK_STATUS` chunk payload accepted (one million extents).
pub const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * 1024 * 1024;
/// Largest `BLOCK_STATUS_EXT` chunk payload accepted (one million extents).
pub const MAX_BLOCK_STATUS_EXT_PAYLOAD: u32 = 8 + 16 * 1024 * 1024;
/// Largest error chunk payload accepted.
pub const MAX_ERROR_PAYLOAD: u32 = 64 * 1024;

// ---------------------------------------------------------------------------
// Errors.

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The input ended before the message did.
    Truncated {
        /// The message being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// A magic number was wrong: the peer is not speaking NBD, or the
    /// stream lost its framing.
    BadMagic {
        /// The message being decoded.
        what: &'static str,
        /// The magic expected.
        expected: u64,
        /// The value received.
        got: u64,
    },
    /// A length field is larger than we accept.
    TooLong {
        /// The message being decoded.
        what: &'static str,
        /// The length received.
        length: u64,
        /// The largest accepted.
        limit: u64,
    },
    /// A field has a value the protocol forbids.
    Invalid {
        /// The message being decoded.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl WireError {
    fn invalid(what: &'static str, reason: impl Into<String>) -> WireError {
        WireError::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { what, needed, got } => {
                write!(f, "{what} truncated: needed {needed} bytes, got {got}")
            }
            WireError::BadMagic {
                what,
                expected,
                got,
            } => write!(f, "{what} has bad magic {got:#x} (expected {expected:#x})"),
            WireError::TooLong {
                what,
                length,
                limit,
            } => write!(f, "{what} too long: {length} bytes (limit {limit})"),
            WireError::Invalid { what, reason } => write!(f, "invalid {what}: {reason}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Decoding result.
pub type WireResult<T> = std::result::Result<T, WireError>;

fn need(what: &'static str, buf: &[u8], needed: usize) -> WireResult<()> {
    if buf.len() < needed {
        Err(WireError::Truncated {
            what,
            needed,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Turn bytes from the peer into printable text: lossy UTF-8, line breaks
/// and tabs made spaces, other control characters replaced, surrounding
/// space trimmed, at most [`MAX_STRING`] bytes kept, so a hostile message
/// cannot mess up the terminal.
pub fn sanitize(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(MAX_STRING)];
    let s: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| match c {
            '\n' | '\r' | '\t' => ' ',
            c if c.is_control() => '?',
            c => c,
        })
        .collect();
    s.trim().to_string()
}

fn decode_string(what: &'static str, bytes: &[u8]) -> WireResult<String> {
    if bytes.len() > MAX_STRING {
        return Err(WireError::TooLong {
            what,
            length: bytes.len() as u64,
            limit: MAX_STRING as u64,
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(_) => Err(WireError::invalid(what, "string is not UTF-8")),
    }
}

// ---------------------------------------------------------------------------
// Handshake.

/// What the server's first eight bytes must be; reports anything else,
/// showing printable garbage as text since that is usually the clue
/// (`SSH-2.0-…`, `HTTP/1.1`).
pub fn check_init_magic(buf: &[u8]) -> WireResult<()> {
    need("greeting", buf, 8)?;
    let got = be64(buf, 0);
    if got != NBD_MAGIC {
        return Err(WireError::BadMagic {
            what: "greeting",
            expected: NBD_MAGIC,
            got,
        });
    }
    Ok(())
}

/// The server's greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Greeting {
    /// Newstyle negotiation with these handshake flags.
    Newstyle {
        /// `NBD_FLAG_FIXED_NEWSTYLE`, `NBD_FLAG_NO_ZEROES`.
        handshake_flags: u16,
    },
    /// The obsolete oldstyle negotiation.
    Oldstyle,
}

impl Greeting {
    /// Decode the first [`GREETING_LEN`] bytes the server sends (an
    /// oldstyle greeting is recognised from its first 16).
    pub fn decode(buf: &[u8]) -> WireResult<Greeting> {
        check_init_magic(buf)?;
        need("greeting", buf, 16)?;
        match be64(buf, 8) {
            NBD_OPTS_MAGIC => {
                need("greeting", buf, GREETING_LEN)?;
                Ok(Greeting::Newstyle {
                    handshake_flags: be16(buf, 16),
                })
            }
            NBD_CLISERV_MAGIC => Ok(Greeting::Oldstyle),
            got => Err(WireError::BadMagic {
                what: "greeting",
                expected: NBD_OPTS_MAGIC,
                got,
            }),
        }
    }

    /// Encode a newstyle greeting (for test servers).
    pub fn encode_newstyle(handshake_flags: u16) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
        b
    }
}

/// Encode the client flags sent after the greeting.
pub fn encode_client_flags(flags: u32) -> [u8; 4] {
    flags.to_be_bytes()
}

/// Decode the client flags (for test servers).
pub fn decode_client_flags(buf: &[u8]) -> WireResult<u32> {
    need("client flags", buf, 4)?;
    Ok(be32(buf, 0))
}

/// Header of an option request; `length` bytes of data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Encode, with the `IHAVEOPT` prefix.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode (for test servers).
    pub fn decode(buf: &[u8]) -> WireResult<OptionHeader> {
        need("option request", buf, OPTION_HEADER_LEN)?;
        let magic = be64(buf, 0);
        if magic != NBD_OPTS_MAGIC {
            return Err(WireError::BadMagic {
                what: "option request",
                expected: NBD_OPTS_MAGIC,
                got: magic,
            });
        }
        Ok(OptionHeader {
            option: be32(buf, 8),
            length: be32(buf, 12),
        })
    }
}

/// Header of an option reply; `length` bytes of data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Length of the data that follows; at most [`MAX_OPTION_REPLY_PAYLOAD`].
    pub length: u32,
}

impl OptionReplyHeader {
    /// Decode, rejecting a payload longer than [`MAX_OPTION_REPLY_PAYLOAD`]
    /// so that the caller can allocate `length` bytes safely.
    pub fn decode(buf: &[u8]) -> WireResult<OptionReplyHeader> {
        need("option reply", buf, OPTION_REPLY_HEADER_LEN)?;
        let magic = be64(buf, 0);
        if magic != NBD_REP_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply",
                expected: NBD_REP_MAGIC,
                got: magic,
            });
        }
        let h = OptionReplyHeader {
            option: be32(buf, 8),
            reply_type: be32(buf, 12),
            length: be32(buf, 16),
        };
        if h.length > MAX_OPTION_REPLY_PAYLOAD {
            return Err(WireError::TooLong {
                what: "option reply",
                length: h.length.into(),
                limit: MAX_OPTION_REPLY_PAYLOAD.into(),
            });
        }
        Ok(h)
    }

    /// Encode (for test servers).
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[0..8].copy_from_slice(&NBD_REP_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.reply_type & NBD_REP_FLAG_ERROR != 0
    }
}

/// Name of an option reply type, for messages.
pub fn option_reply_name(reply_type: u32) -> &'static str {
    match reply_type {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "unknown reply type",
    }
}

/// What an option error reply means, in words.
pub fn option_error_message(reply_type: u32) -> &'static str {
    match reply_type {
        NBD_REP_ERR_UNSUP => "option not supported",
        NBD_REP_ERR_POLICY => "forbidden by server policy",
        NBD_REP_ERR_INVALID => "invalid request",
        NBD_REP_ERR_PLATFORM => "not supported on the server's platform",
        NBD_REP_ERR_TLS_REQD => "server requires TLS",
        NBD_REP_ERR_UNKNOWN => "unknown export",
        NBD_REP_ERR_SHUTDOWN => "server is shutting down",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "server requires block size negotiation",
        NBD_REP_ERR_TOO_BIG => "request or reply too big",
        _ => "unknown error",
    }
}

/// Name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

fn check_name_len(what: &'static str, name: &str) -> WireResult<u32> {
    if name.len() > MAX_STRING {
        return Err(WireError::TooLong {
            what,
            length: name.len() as u64,
            limit: MAX_STRING as u64,
        });
    }
    Ok(name.len() as u32)
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and the list of
/// `NBD_INFO_*` requested.
pub fn encode_go_payload(export: &str, info_requests: &[u16]) -> WireResult<Vec<u8>> {
    let n = check_name_len("export name", export)?;
    let count = u16::try_from(info_requests.len())
        .map_err(|_| WireError::invalid("NBD_OPT_GO", "too many information requests"))?;
    let mut b = Vec::with_capacity(4 + export.len() + 2 + 2 * info_requests.len());
    b.extend_from_slice(&n.to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&count.to_be_bytes());
    for r in info_requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    Ok(b)
}

/// Decode the data of `NBD_OPT_INFO` / `NBD_OPT_GO` (for test servers).
pub fn decode_go_payload(buf: &[u8]) -> WireResult<(String, Vec<u16>)> {
    const WHAT: &str = "NBD_OPT_GO data";
    need(WHAT, buf, 4)?;
    let n = be32(buf, 0) as usize;
    if n > MAX_STRING {
        return Err(WireError::TooLong {
            what: WHAT,
            length: n as u64,
            limit: MAX_STRING as u64,
        });
    }
    need(WHAT, buf, 4 + n + 2)?;
    let name = decode_string(WHAT, &buf[4..4 + n])?;
    let count = be16(buf, 4 + n) as usize;
    let start = 4 + n + 2;
    need(WHAT, buf, start + 2 * count)?;
    if buf.len() != start + 2 * count {
        return Err(WireError::invalid(WHAT, "trailing bytes"));
    }
    let reqs = (0..count).map(|i| be16(buf, start + 2 * i)).collect();
    Ok((name, reqs))
}

/// Data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`.
pub fn encode_meta_context_payload(export: &str, queries: &[&str]) -> WireResult<Vec<u8>> {
    let n = check_name_len("export name", export)?;
    let count = u32::try_from(queries.len())
        .map_err(|_| WireError::invalid("NBD_OPT_SET_META_CONTEXT", "too many queries"))?;
    let mut b =
        Vec::with_capacity(8 + export.len() + queries.iter().map(|q| 4 + q.len()).sum::<usize>());
    b.extend_from_slice(&n.to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&count.to_be_bytes());
    for q in queries {
        let qn = check_name_len("metadata context query", q)?;
        b.extend_from_slice(&qn.to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    Ok(b)
}

/// Decode the data of `NBD_OPT_SET_META_CONTEXT` (for test servers).
pub fn decode_meta_context_payload(buf: &[u8]) -> WireResult<(String, Vec<String>)> {
    const WHAT: &str = "NBD_OPT_SET_META_CONTEXT data";
    need(WHAT, buf, 4)?;
    let n = be32(buf, 0) as usize;
    if n > MAX_STRING {
        return Err(WireError::TooLong {
            what: WHAT,
            length: n as u64,
            limit: MAX_STRING as u64,
        });
    }
    need(WHAT, buf, 4 + n + 4)?;
    let name = decode_string(WHAT, &buf[4..4 + n])?;
    let count = be32(buf, 4 + n) as usize;
    let mut at = 4 + n + 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        need(WHAT, buf, at + 4)?;
        let qn = be32(buf, at) as usize;
        if qn > MAX_STRING {
            return Err(WireError::TooLong {
                what: WHAT,
                length: qn as u64,
                limit: MAX_STRING as u64,
            });
        }
        need(WHAT, buf, at + 4 + qn)?;
        queries.push(decode_string(WHAT, &buf[at + 4..at + 4 + qn])?);
        at += 4 + qn;
    }
    if at != buf.len() {
        return Err(WireError::invalid(WHAT, "trailing bytes"));
    }
    Ok((name, queries))
}

/// One `NBD_REP_INFO` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`, not yet validated.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        maximum: u32,
    },
    /// Any other information type, which the client ignores.
    Other(u16),
}

impl Info {
    /// Decode an `NBD_REP_INFO` payload.
    pub fn decode(buf: &[u8]) -> WireResult<Info> {
        const WHAT: &str = "NBD_REP_INFO";
        need(WHAT, buf, 2)?;
        match be16(buf, 0) {
            NBD_INFO_EXPORT => {
                if buf.len() != 12 {
                    return Err(WireError::invalid(
                        WHAT,
                        format!("NBD_INFO_EXPORT has length {} (expected 12)", buf.len()),
                    ));
                }
                Ok(Info::Export {
                    size: be64(buf, 2),
                    flags: be16(buf, 10),
                })
            }
            NBD_INFO_BLOCK_SIZE => {
                if buf.len() != 14 {
                    return Err(WireError::invalid(
                        WHAT,
                        format!("NBD_INFO_BLOCK_SIZE has length {} (expected 14)", buf.len()),
                    ));
                }
                Ok(Info::BlockSize {
                    minimum: be32(buf, 2),
                    preferred: be32(buf, 6),
                    maximum: be32(buf, 10),
                })
            }
            other => Ok(Info::Other(other)),
        }
    }

    /// Encode (for test servers); `Other` encodes as a bare type.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(14);
        match *self {
            Info::Export { size, flags } => {
                b.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                b.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
                b.extend_from_slice(&minimum.to_be_bytes());
                b.extend_from_slice(&preferred.to_be_bytes());
                b.extend_from_slice(&maximum.to_be_bytes());
            }
            Info::Other(t) => b.extend_from_slice(&t.to_be_bytes()),
        }
        b
    }
}

/// Decode an `NBD_REP_META_CONTEXT` payload: context id and name.
pub fn decode_meta_context_reply(buf: &[u8]) -> WireResult<(u32, String)> {
    const WHAT: &str = "NBD_REP_META_CONTEXT";
    need(WHAT, buf, 4)?;
    Ok((be32(buf, 0), decode_string(WHAT, &buf[4..])?))
}

/// Encode an `NBD_REP_META_CONTEXT` payload (for test servers).
pub fn encode_meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME` (before any zero padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Decode the first [`EXPORT_NAME_REPLY_LEN`] bytes.
    pub fn decode(buf: &[u8]) -> WireResult<ExportNameReply> {
        need("NBD_OPT_EXPORT_NAME reply", buf, EXPORT_NAME_REPLY_LEN)?;
        Ok(ExportNameReply {
            size: be64(buf, 0),
            flags: be16(buf, 8),
        })
    }

    /// Encode (for test servers), without padding.
    pub fn encode(&self) -> [u8; EXPORT_NAME_REPLY_LEN] {
        let mut b = [0u8; EXPORT_NAME_REPLY_LEN];
        b[0..8].copy_from_slice(&self.size.to_be_bytes());
        b[8..10].copy_from_slice(&self.flags.to_be_bytes());
        b
    }
}

// ---------------------------------------------------------------------------
// Transmission.

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes (of the payload, for writes).
    pub length: u32,
}

impl Request {
    /// Encode to the 28 bytes sent on the wire.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode (for test servers).
    pub fn decode(buf: &[u8]) -> WireResult<Request> {
        need("request", buf, REQUEST_HEADER_LEN)?;
        let magic = be32(buf, 0);
        if magic != NBD_REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request",
                expected: NBD_REQUEST_MAGIC.into(),
                got: magic.into(),
            });
        }
        Ok(Request {
            flags: be16(buf, 4),
            command: be16(buf, 6),
            cookie: be64(buf, 8),
            offset: be64(buf, 16),
            length: be32(buf, 24),
        })
    }

    /// Encode to the 32 bytes of an extended request header (after
    /// `NBD_OPT_EXTENDED_HEADERS`), whose length field is 64 bits wide.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_HEADER_LEN] {
        encode_extended_request(
            self.flags,
            self.command,
            self.cookie,
            self.offset,
            self.length.into(),
        )
    }
}

/// Encode an extended request header with a 64-bit `length` (for zero,
/// trim and block status requests beyond 4 GiB).
pub fn encode_extended_request(
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> [u8; EXTENDED_REQUEST_HEADER_LEN] {
    let mut b = [0u8; EXTENDED_REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&length.to_be_bytes());
    b
}

/// Decode an extended request header (for test servers): the request
/// with its 64-bit length, which the caller bounds.
pub fn decode_extended_request(buf: &[u8]) -> WireResult<(Request, u64)> {
    need("extended request", buf, EXTENDED_REQUEST_HEADER_LEN)?;
    let magic = be32(buf, 0);
    if magic != NBD_EXTENDED_REQUEST_MAGIC {
        return Err(WireError::BadMagic {
            what: "extended request",
            expected: NBD_EXTENDED_REQUEST_MAGIC.into(),
            got: magic.into(),
        });
    }
    let length = be64(buf, 24);
    let r = Request {
        flags: be16(buf, 4),
        command: be16(buf, 6),
        cookie: be64(buf, 8),
        offset: be64(buf, 16),
        length: u32::try_from(length).unwrap_or(u32::MAX),
    };
    Ok((r, length))
}

/// A simple reply (for reads without structured replies, the data follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// `NBD_E*`, zero on success.
    pub error: u32,
    /// Cookie of the request answered.
    pub cookie: u64,
}

impl SimpleReply {
    /// Decode the 16 bytes of a simple reply, magic included.
    pub fn decode(buf: &[u8]) -> WireResult<SimpleReply> {
        need("simple reply", buf, SIMPLE_REPLY_LEN)?;
        let magic = be32(buf, 0);
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "simple reply",
                expected: NBD_SIMPLE_REPLY_MAGIC.into(),
                got: magic.into(),
            });
        }
        Ok(SimpleReply {
            error: be32(buf, 4),
            cookie: be64(buf, 8),
        })
    }

    /// Encode (for test servers).
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// A structured reply chunk header; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// Cookie of the request answered.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Decode the 20 bytes of a chunk header, magic included. The payload
    /// length is checked against the chunk type (see
    /// [`check_chunk_length`]) so the caller may read it safely.
    pub fn decode(buf: &[u8]) -> WireResult<ChunkHeader> {
        need("structured reply", buf, STRUCTURED_REPLY_HEADER_LEN)?;
        let magic = be32(buf, 0);
        if magic != NBD_STRUCTURED_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "structured reply",
                expected: NBD_STRUCTURED_REPLY_MAGIC.into(),
                got: magic.into(),
            });
        }
        let h = ChunkHeader {
            flags: be16(buf, 4),
            chunk_type: be16(buf, 6),
            cookie: be64(buf, 8),
            length: be32(buf, 16),
        };
        check_chunk_length(h.chunk_type, h.length)?;
        Ok(h)
    }

    /// Encode (for test servers).
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.chunk_type.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Whether this is the last chunk of its reply.
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }

    /// Whether this is an error chunk (of a known type or not).
    pub fn is_error(&self) -> bool {
        self.chunk_type & NBD_REPLY_TYPE_ERROR_BIT != 0
    }
}

/// An extended reply chunk header (after `NBD_OPT_EXTENDED_HEADERS`);
/// `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendedChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// Cookie of the request answered.
    pub cookie: u64,
    /// Offset of the request answered (informational; not trusted).
    pub offset: u64,
    /// Payload length; bounded by the decoder, so it fits in 32 bits.
    pub length: u32,
}

impl ExtendedChunkHeader {
    /// Decode the 32 bytes of an extended chunk header, magic included.
    /// The 64-bit payload length is checked against the chunk type and
    /// the caps (see [`check_extended_chunk_length`]) before it is
    /// narrowed, so the caller may read the payload safely.
    pub fn decode(buf: &[u8]) -> WireResult<ExtendedChunkHeader> {
        need("extended reply", buf, EXTENDED_REPLY_HEADER_LEN)?;
        let magic = be32(buf, 0);
        if magic != NBD_EXTENDED_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "extended reply",
                expected: NBD_EXTENDED_REPLY_MAGIC.into(),
                got: magic.into(),
            });
        }
        let chunk_type = be16(buf, 6);
        let length = check_extended_chunk_length(chunk_type, be64(buf, 24))?;
        Ok(ExtendedChunkHeader {
            flags: be16(buf, 4),
            chunk_type,
            cookie: be64(buf, 8),
            offset: be64(buf, 16),
            length,
        })
    }

    /// Encode (for test servers).
    pub fn encode(&self) -> [u8; EXTENDED_REPLY_HEADER_LEN] {
        encode_extended_chunk_header(
            self.flags,
            self.chunk_type,
            self.cookie,
            self.offset,
            self.length.into(),
        )
    }

    /// The same chunk as a [`ChunkHeader`] (the payloads are alike).
    pub fn chunk(&self) -> ChunkHeader {
        ChunkHeader {
            flags: self.flags,
            chunk_type: self.chunk_type,
            cookie: self.cookie,
            length: self.length,
        }
    }
}

/// Encode an extended chunk header with any 64-bit `length` (for test
/// servers, lying ones included).
pub fn encode_extended_chunk_header(
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> [u8; EXTENDED_REPLY_HEADER_LEN] {
    let mut b = [0u8; EXTENDED_REPLY_HEADER_LEN];
    b[0..4].copy_from_slice(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&length.to_be_bytes());
    b
}

/// Check an extended chunk's 64-bit payload length against its type:
/// `BLOCK_STATUS_EXT` is allowed and the 32-bit `BLOCK_STATUS` is not (a
/// server using extended headers must send the wide form); every other
/// type has the bounds of [`check_chunk_length`]. Returns the length,
/// which then fits in 32 bits.
pub fn check_extended_chunk_length(chunk_type: u16, length: u64) -> WireResult<u32> {
    const WHAT: &str = "extended reply chunk";
    let Ok(len) = u32::try_from(length) else {
        return Err(WireError::TooLong {
            what: WHAT,
            length,
            limit: u32::MAX.into(),
        });
    };
    match chunk_type {
        NBD_REPLY_TYPE_BLOCK_STATUS => Err(WireError::invalid(
            WHAT,
            "32-bit BLOCK_STATUS chunk with extended headers",
        )),
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT if len < 24 || (len - 8) % 16 != 0 => Err(
            WireError::invalid(WHAT, format!("BLOCK_STATUS_EXT chunk with length {len}")),
        ),
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT if len > MAX_BLOCK_STATUS_EXT_PAYLOAD => {
            Err(WireError::TooLong {
                what: WHAT,
                length,
                limit: MAX_BLOCK_STATUS_EXT_PAYLOAD.into(),
            })
        }
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT => Ok(len),
        t => check_chunk_length(t, len).map(|()| len),
    }
}

/// One block status descriptor of a `BLOCK_STATUS_EXT` chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendedBlockDescriptor {
    /// Length of the extent; never zero.
    pub length: u64,
    /// Status flags (`NBD_STATE_*` for `base:allocation`).
    pub flags: u64,
}

/// Size of one encoded [`ExtendedBlockDescriptor`].
pub const EXTENDED_BLOCK_DESCRIPTOR_LEN: usize = 16;

impl ExtendedBlockDescriptor {
    /// Decode one 16-byte descriptor.
    pub fn decode(buf: &[u8]) -> WireResult<ExtendedBlockDescriptor> {
        need(
            "extended block status descriptor",
            buf,
            EXTENDED_BLOCK_DESCRIPTOR_LEN,
        )?;
        let d = ExtendedBlockDescriptor {
            length: be64(buf, 0),
            flags: be64(buf, 8),
        };
        if d.length == 0 {
            return Err(WireError::invalid(
                "extended block status descriptor",
                "zero-length extent",
            ));
        }
        Ok(d)
    }

    /// Encode one descriptor.
    pub fn encode(&self) -> [u8; EXTENDED_BLOCK_DESCRIPTOR_LEN] {
        let mut b = [0u8; EXTENDED_BLOCK_DESCRIPTOR_LEN];
        b[0..8].copy_from_slice(&self.length.to_be_bytes());
        b[8..16].copy_from_slice(&self.flags.to_be_bytes());
        b
    }
}

/// The 8 bytes that start a `BLOCK_STATUS_EXT` payload: context id and
/// descriptor count, the count checked against the payload `length`.
pub fn decode_block_status_ext_prefix(buf: &[u8], length: u32) -> WireResult<(u32, u32)> {
    const WHAT: &str = "BLOCK_STATUS_EXT chunk";
    need(WHAT, buf, 8)?;
    let (id, count) = (be32(buf, 0), be32(buf, 4));
    if u64::from(count) * 16 + 8 != u64::from(length) {
        return Err(WireError::invalid(
            WHAT,
            format!("{count} descriptors do not fill a payload of {length} bytes"),
        ));
    }
    Ok((id, count))
}

/// Encode a `BLOCK_STATUS_EXT` payload (for test servers).
pub fn encode_block_status_ext(
    context_id: u32,
    descriptors: &[ExtendedBlockDescriptor],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + EXTENDED_BLOCK_DESCRIPTOR_LEN * descriptors.len());
    b.extend_from_slice(&context_id.to_be_bytes());
    b.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
    for d in descriptors {
        b.extend_from_slice(&d.encode());
    }
    b
}

/// Check a chunk's payload length against what its type allows, and
/// against the caps in the module documentation.
pub fn check_chunk_length(chunk_type: u16, length: u32) -> WireResult<()> {
    const WHAT: &str = "structured reply chunk";
    let bad = |reason: String| Err(WireError::invalid(WHAT, reason));
    let too_long = |limit: u32| {
        Err(WireError::TooLong {
            what: WHAT,
            length: length.into(),
            limit: limit.into(),
        })
    };
    match chunk_type {
        NBD_REPLY_TYPE_NONE if length != 0 => bad(format!("NONE chunk with length {length}")),
        NBD_REPLY_TYPE_NONE => Ok(()),
        NBD_REPLY_TYPE_OFFSET_DATA if length < 9 => {
            bad(format!("OFFSET_DATA chunk with length {length}"))
        }
        NBD_REPLY_TYPE_OFFSET_DATA if length > MAX_DATA_PAYLOAD => too_long(MAX_DATA_PAYLOAD),
        NBD_REPLY_TYPE_OFFSET_DATA => Ok(()),
        NBD_REPLY_TYPE_OFFSET_HOLE if length != 12 => {
            bad(format!("OFFSET_HOLE chunk with length {length}"))
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => Ok(()),
        NBD_REPLY_TYPE_BLOCK_STATUS if length < 12 || (length - 4) % 8 != 0 => {
            bad(format!("BLOCK_STATUS chunk with length {length}"))
        }
        NBD_REPLY_TYPE_BLOCK_STATUS if length > MAX_BLOCK_STATUS_PAYLOAD => {
            too_long(MAX_BLOCK_STATUS_PAYLOAD)
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => Ok(()),
        NBD_REPLY_TYPE_ERROR_OFFSET if length < 14 => {
            bad(format!("ERROR_OFFSET chunk with length {length}"))
        }
        t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 && length < 6 => {
            bad(format!("error chunk with length {length}"))
        }
        t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 && length > MAX_ERROR_PAYLOAD => {
            too_long(MAX_ERROR_PAYLOAD)
        }
        t if t & NBD_REPLY_TYPE_ERROR_BIT != 0 => Ok(()),
        t => bad(format!("unknown chunk type {t}")),
    }
}

/// The part of an `OFFSET_DATA` payload before the data: its offset.
pub fn decode_offset_data_prefix(buf: &[u8]) -> WireResult<u64> {
    need("OFFSET_DATA chunk", buf, 8)?;
    Ok(be64(buf, 0))
}

/// Encode the offset that starts an `OFFSET_DATA` payload (for test
/// servers; the data follows it).
pub fn encode_offset_data_prefix(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

/// An `OFFSET_HOLE` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetHole {
    /// Offset in the export.
    pub offset: u64,
    /// Length of the hole; never zero.
    pub length: u32,
}

impl OffsetHole {
    /// Decode the 12-byte payload.
    pub fn decode(buf: &[u8]) -> WireResult<OffsetHole> {
        need("OFFSET_HOLE chunk", buf, 12)?;
        let h = OffsetHole {
            offset: be64(buf, 0),
            length: be32(buf, 8),
        };
        if h.length == 0 {
            return Err(WireError::invalid("OFFSET_HOLE chunk", "zero length"));
        }
        Ok(h)
    }

    /// Encode (for test servers).
    pub fn encode(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..8].copy_from_slice(&self.offset.to_be_bytes());
        b[8..12].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The payload of an error chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorChunk {
    /// `NBD_E*`; never zero.
    pub error: u32,
    /// Human-readable message from the server (sanitized), maybe empty.
    pub message: String,
    /// Offset of the error, for `ERROR_OFFSET`.
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// Decode the payload of an error chunk of type `chunk_type`. Unknown
    /// error types are decoded like `NBD_REPLY_TYPE_ERROR`, ignoring extra
    /// fields, as the protocol asks.
    pub fn decode(chunk_type: u16, buf: &[u8]) -> WireResult<ErrorChunk> {
        const WHAT: &str = "error chunk";
        need(WHAT, buf, 6)?;
        let error = be32(buf, 0);
        if error == 0 {
            return Err(WireError::invalid(WHAT, "error value is zero"));
        }
        let msg_len = usize::from(be16(buf, 4));
        let fixed_tail = if chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET {
            8
        } else {
            0
        };
        if 6 + msg_len + fixed_tail > buf.len() {
            return Err(WireError::invalid(
                WHAT,
                format!(
                    "message length {msg_len} does not fit in payload of {} bytes",
                    buf.len()
                ),
            ));
        }
        if chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET && 6 + msg_len + 8 != buf.len() {
            return Err(WireError::invalid(WHAT, "ERROR_OFFSET has trailing bytes"));
        }
        let message = sanitize(&buf[6..6 + msg_len]);
        let offset = if chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET {
            Some(be64(buf, 6 + msg_len))
        } else {
            None
        };
        Ok(ErrorChunk {
            error,
            message,
            offset,
        })
    }

    /// Encode (for test servers): the chunk type is `ERROR_OFFSET` when
    /// there is an offset, else `ERROR`.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let msg = &self.message.as_bytes()[..self.message.len().min(u16::MAX as usize)];
        let mut b = Vec::with_capacity(6 + msg.len() + 8);
        b.extend_from_slice(&self.error.to_be_bytes());
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg);
        match self.offset {
            Some(o) => {
                b.extend_from_slice(&o.to_be_bytes());
                (NBD_REPLY_TYPE_ERROR_OFFSET, b)
            }
            None => (NBD_REPLY_TYPE_ERROR, b),
        }
    }
}

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Length of the extent; never zero.
    pub length: u32,
    /// Status flags (`NBD_STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// Size of one encoded [`BlockDescriptor`].
pub const BLOCK_DESCRIPTOR_LEN: usize = 8;

impl BlockDescriptor {
    /// Decode one 8-byte descriptor.
    pub fn decode(buf: &[u8]) -> WireResult<BlockDescriptor> {
        need("block status descriptor", buf, BLOCK_DESCRIPTOR_LEN)?;
        let d = BlockDescriptor {
            length: be32(buf, 0),
            flags: be32(buf, 4),
        };
        if d.length == 0 {
            return Err(WireError::invalid(
                "block status descriptor",
                "zero-length extent",
            ));
        }
        Ok(d)
    }

    /// Encode one descriptor.
    pub fn encode(&self) -> [u8; BLOCK_DESCRIPTOR_LEN] {
        let mut b = [0u8; BLOCK_DESCRIPTOR_LEN];
        b[0..4].copy_from_slice(&self.length.to_be_bytes());
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b
    }
}

/// Decode a whole `BLOCK_STATUS` payload: context id and descriptors.
/// (The client streams large payloads instead; this is for tests and
/// fuzzing.)
pub fn decode_block_status(buf: &[u8]) -> WireResult<(u32, Vec<BlockDescriptor>)> {
    const WHAT: &str = "BLOCK_STATUS chunk";
    let len = u32::try_from(buf.len()).map_err(|_| WireError::TooLong {
        what: WHAT,
        length: buf.len() as u64,
        limit: MAX_BLOCK_STATUS_PAYLOAD.into(),
    })?;
    check_chunk_length(NBD_REPLY_TYPE_BLOCK_STATUS, len)?;
    let id = be32(buf, 0);
    let descs = buf[4..]
        .chunks_exact(BLOCK_DESCRIPTOR_LEN)
        .map(BlockDescriptor::decode)
        .collect::<WireResult<Vec<_>>>()?;
    Ok((id, descs))
}

/// Encode a `BLOCK_STATUS` payload (for test servers).
pub fn encode_block_status(context_id: u32, descriptors: &[BlockDescriptor]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + BLOCK_DESCRIPTOR_LEN * descriptors.len());
    b.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        b.extend_from_slice(&d.encode());
    }
    b
}

/// Which reply a 4-byte magic introduces, and the full header length.
pub fn reply_header_len(magic: &[u8]) -> WireResult<usize> {
    need("reply", magic, 4)?;
    match be32(magic, 0) {
        NBD_SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        NBD_STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_HEADER_LEN),
        NBD_EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_HEADER_LEN),
        got => Err(WireError::BadMagic {
            what: "reply",
            expected: NBD_STRUCTURED_REPLY_MAGIC.into(),
            got: got.into(),
        }),
    }
}

/// Text for an NBD error value; unknown values are described as such (the
/// protocol says to treat them like `EINVAL`).
pub fn errno_message(error: u32) -> &'static str {
    match error {
        NBD_EPERM => "Operation not permitted",
        NBD_EIO => "Input/output error",
        NBD_ENOMEM => "Cannot allocate memory",
        NBD_EINVAL => "Invalid argument",
        NBD_ENOSPC => "No space left on device",
        NBD_EOVERFLOW => "Value too large",
        NBD_ENOTSUP => "Operation not supported",
        NBD_ESHUTDOWN => "Server is shutting down",
        _ => "Unknown error (treated as invalid argument)",
    }
}

/// Name of a command, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_CACHE => "NBD_CMD_CACHE",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    fn truncated<T: fmt::Debug>(r: WireResult<T>) -> bool {
        matches!(r, Err(WireError::Truncated { .. }))
    }

    fn bad_magic<T: fmt::Debug>(r: WireResult<T>) -> bool {
        matches!(r, Err(WireError::BadMagic { .. }))
    }

    #[test]
    fn greeting_newstyle_exact_bytes() {
        let b = Greeting::encode_newstyle(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
        assert_eq!(
            Greeting::decode(&b).unwrap(),
            Greeting::Newstyle { handshake_flags: 3 }
        );
        for n in 0..GREETING_LEN {
            assert!(truncated(Greeting::decode(&b[..n])), "length {n}");
        }
    }

    #[test]
    fn greeting_oldstyle_and_garbage() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"NBDMAGIC");
        b[8..].copy_from_slice(&NBD_CLISERV_MAGIC.to_be_bytes());
        assert_eq!(Greeting::decode(&b).unwrap(), Greeting::Oldstyle);
        assert!(bad_magic(Greeting::decode(b"SSH-2.0-OpenSSH_9.0\r\n")));
        let mut c = Greeting::encode_newstyle(1);
        c[9] = b'X';
        assert!(bad_magic(Greeting::decode(&c)));
        assert!(check_init_magic(b"NBDMAGIC").is_ok());
        assert!(bad_magic(check_init_magic(b"HTTP/1.1")));
    }

    #[test]
    fn client_flags_round_trip() {
        let b = encode_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        assert_eq!(b, [0, 0, 0, 3]);
        assert_eq!(decode_client_flags(&b).unwrap(), 3);
        assert!(truncated(decode_client_flags(&b[..3])));
    }

    #[test]
    fn option_header_exact_bytes() {
        let h = OptionHeader {
            option: NBD_OPT_GO,
            length: 0x0102,
        };
        let b = h.encode();
        assert_eq!(&b[..8], b"IHAVEOPT");
        assert_eq!(&b[8..], &[0, 0, 0, 7, 0, 0, 1, 2]);
        assert_eq!(OptionHeader::decode(&b).unwrap(), h);
        assert!(truncated(OptionHeader::decode(&b[..15])));
        let mut bad = b;
        bad[0] = 0;
        assert!(bad_magic(OptionHeader::decode(&bad)));
    }

    #[test]
    fn option_reply_header_exact_bytes_and_cap() {
        let h = OptionReplyHeader {
            option: NBD_OPT_STRUCTURED_REPLY,
            reply_type: NBD_REP_ERR_UNSUP,
            length: 4,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [
                0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8, 0x80, 0, 0, 1, 0, 0, 0, 4
            ]
        );
        let d = OptionReplyHeader::decode(&b).unwrap();
        assert_eq!(d, h);
        assert!(d.is_error());
        assert!(truncated(OptionReplyHeader::decode(&b[..19])));
        let mut bad = b;
        bad[7] ^= 1;
        assert!(bad_magic(OptionReplyHeader::decode(&bad)));
        let big = OptionReplyHeader {
            length: MAX_OPTION_REPLY_PAYLOAD + 1,
            ..h
        }
        .encode();
        assert!(matches!(
            OptionReplyHeader::decode(&big),
            Err(WireError::TooLong { .. })
        ));
        let max = OptionReplyHeader {
            length: MAX_OPTION_REPLY_PAYLOAD,
            ..h
        }
        .encode();
        assert!(OptionReplyHeader::decode(&max).is_ok());
    }

    #[test]
    fn go_payload_exact_bytes_and_round_trip() {
        let b = encode_go_payload("ab", &[NBD_INFO_BLOCK_SIZE]).unwrap();
        assert_eq!(b, [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]);
        assert_eq!(
            decode_go_payload(&b).unwrap(),
            ("ab".to_string(), vec![NBD_INFO_BLOCK_SIZE])
        );
        for n in 0..b.len() {
            assert!(decode_go_payload(&b[..n]).is_err(), "length {n}");
        }
        let empty = encode_go_payload("", &[]).unwrap();
        assert_eq!(empty, [0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_go_payload(&empty).unwrap(), (String::new(), vec![]));
        assert!(encode_go_payload(&"x".repeat(MAX_STRING + 1), &[]).is_err());
        let mut huge = vec![0xff, 0xff, 0xff, 0xff];
        huge.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_go_payload(&huge),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn meta_context_payload_exact_bytes_and_round_trip() {
        let b = encode_meta_context_payload("e", &["base:allocation"]).unwrap();
        let mut want = vec![0, 0, 0, 1, b'e', 0, 0, 0, 1, 0, 0, 0, 15];
        want.extend_from_slice(b"base:allocation");
        assert_eq!(b, want);
        assert_eq!(
            decode_meta_context_payload(&b).unwrap(),
            ("e".to_string(), vec!["base:allocation".to_string()])
        );
        for n in 0..b.len() {
            assert!(decode_meta_context_payload(&b[..n]).is_err(), "length {n}");
        }
    }

    #[test]
    fn meta_context_reply_round_trip() {
        let b = encode_meta_context_reply(7, BASE_ALLOCATION);
        assert_eq!(&b[..4], &[0, 0, 0, 7]);
        assert_eq!(
            decode_meta_context_reply(&b).unwrap(),
            (7, BASE_ALLOCATION.to_string())
        );
        assert!(truncated(decode_meta_context_reply(&b[..3])));
        let mut bad = b.clone();
        bad.push(0xff);
        assert!(decode_meta_context_reply(&bad).is_err());
    }

    #[test]
    fn info_exact_bytes_and_round_trip() {
        let e = Info::Export {
            size: 0x0102_0304_0506_0708,
            flags: 0x0a0b,
        };
        let b = e.encode();
        assert_eq!(b, [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b]);
        assert_eq!(Info::decode(&b).unwrap(), e);
        assert!(Info::decode(&b[..11]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(Info::decode(&long).is_err());

        let s = Info::BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25,
        };
        let b = s.encode();
        assert_eq!(b, [0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 2, 0, 0, 0]);
        assert_eq!(Info::decode(&b).unwrap(), s);
        assert!(Info::decode(&b[..13]).is_err());
        assert_eq!(Info::decode(&[0, 2, b'h', b'i']).unwrap(), Info::Other(2));
        assert!(truncated(Info::decode(&[0])));
    }

    #[test]
    fn export_name_reply_round_trip() {
        let r = ExportNameReply {
            size: 1 << 30,
            flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY,
        };
        let b = r.encode();
        assert_eq!(b, [0, 0, 0, 0, 0x40, 0, 0, 0, 0, 3]);
        assert_eq!(ExportNameReply::decode(&b).unwrap(), r);
        assert!(truncated(ExportNameReply::decode(&b[..9])));
    }

    #[test]
    fn request_exact_bytes_and_round_trip() {
        let r = Request {
            flags: NBD_CMD_FLAG_NO_HOLE,
            command: NBD_CMD_WRITE_ZEROES,
            cookie: 0x1122_3344_5566_7788,
            offset: 0x0000_0001_0000_0000,
            length: 0x0010_0000,
        };
        let b = r.encode();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 2, 0, 6, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
                0, 0, 0, 1, 0, 0, 0, 0, 0, 0x10, 0, 0
            ]
        );
        assert_eq!(Request::decode(&b).unwrap(), r);
        assert!(truncated(Request::decode(&b[..27])));
        let mut bad = b;
        bad[3] = 0x14;
        assert!(bad_magic(Request::decode(&bad)));
    }

    #[test]
    fn simple_reply_exact_bytes_and_round_trip() {
        let r = SimpleReply {
            error: NBD_EIO,
            cookie: 9,
        };
        let b = r.encode();
        assert_eq!(
            b,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        assert_eq!(SimpleReply::decode(&b).unwrap(), r);
        assert_eq!(reply_header_len(&b).unwrap(), SIMPLE_REPLY_LEN);
        assert!(truncated(SimpleReply::decode(&b[..15])));
        let mut bad = b;
        bad[0] = 0;
        assert!(bad_magic(SimpleReply::decode(&bad)));
        assert!(bad_magic(reply_header_len(&bad)));
        assert!(truncated(reply_header_len(&b[..3])));
    }

    #[test]
    fn chunk_header_exact_bytes_and_round_trip() {
        let h = ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
            cookie: 2,
            length: 8 + 512,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 2, 8
            ]
        );
        let d = ChunkHeader::decode(&b).unwrap();
        assert_eq!(d, h);
        assert!(d.is_done());
        assert!(!d.is_error());
        assert_eq!(reply_header_len(&b).unwrap(), STRUCTURED_REPLY_HEADER_LEN);
        assert!(truncated(ChunkHeader::decode(&b[..19])));
        let mut bad = b;
        bad[1] = 0;
        assert!(bad_magic(ChunkHeader::decode(&bad)));
    }

    #[test]
    fn chunk_lengths_are_bounded() {
        assert!(check_chunk_length(NBD_REPLY_TYPE_NONE, 0).is_ok());
        assert!(check_chunk_length(NBD_REPLY_TYPE_NONE, 1).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_OFFSET_DATA, 8).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_OFFSET_DATA, 9).is_ok());
        assert!(check_chunk_length(NBD_REPLY_TYPE_OFFSET_DATA, MAX_DATA_PAYLOAD).is_ok());
        assert!(check_chunk_length(NBD_REPLY_TYPE_OFFSET_DATA, MAX_DATA_PAYLOAD + 1).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_OFFSET_HOLE, 12).is_ok());
        assert!(check_chunk_length(NBD_REPLY_TYPE_OFFSET_HOLE, 13).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_BLOCK_STATUS, 4).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_BLOCK_STATUS, 12).is_ok());
        assert!(check_chunk_length(NBD_REPLY_TYPE_BLOCK_STATUS, 13).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_BLOCK_STATUS, MAX_BLOCK_STATUS_PAYLOAD).is_ok());
        assert!(
            check_chunk_length(NBD_REPLY_TYPE_BLOCK_STATUS, MAX_BLOCK_STATUS_PAYLOAD + 8).is_err()
        );
        assert!(check_chunk_length(NBD_REPLY_TYPE_ERROR, 5).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_ERROR, 6).is_ok());
        assert!(check_chunk_length(NBD_REPLY_TYPE_ERROR, MAX_ERROR_PAYLOAD + 1).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_ERROR_OFFSET, 13).is_err());
        assert!(check_chunk_length(NBD_REPLY_TYPE_ERROR_OFFSET, 14).is_ok());
        assert!(check_chunk_length(NBD_REPLY_TYPE_ERROR_BIT | 77, 6).is_ok());
        assert!(check_chunk_length(42, 0).is_err());
        let h = ChunkHeader {
            flags: 0,
            chunk_type: NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie: 1,
            length: u32::MAX - 3,
        };
        assert!(ChunkHeader::decode(&h.encode()).is_err());
    }

    #[test]
    fn offset_data_prefix() {
        assert_eq!(
            decode_offset_data_prefix(&[0, 0, 0, 0, 0, 0, 2, 0, 0xaa]).unwrap(),
            512
        );
        assert!(truncated(decode_offset_data_prefix(&[0; 7])));
        assert_eq!(encode_offset_data_prefix(512), [0, 0, 0, 0, 0, 0, 2, 0]);
        assert_eq!(
            decode_offset_data_prefix(&encode_offset_data_prefix(u64::MAX)).unwrap(),
            u64::MAX
        );
    }

    #[test]
    fn offset_hole_exact_bytes_and_round_trip() {
        let h = OffsetHole {
            offset: 4096,
            length: 512,
        };
        let b = h.encode();
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0]);
        assert_eq!(OffsetHole::decode(&b).unwrap(), h);
        assert!(truncated(OffsetHole::decode(&b[..11])));
        let z = OffsetHole {
            offset: 0,
            length: 0,
        }
        .encode();
        assert!(OffsetHole::decode(&z).is_err());
    }

    #[test]
    fn error_chunk_exact_bytes_and_round_trip() {
        let e = ErrorChunk {
            error: NBD_ENOSPC,
            message: "full".into(),
            offset: Some(1024),
        };
        let (t, b) = e.encode();
        assert_eq!(t, NBD_REPLY_TYPE_ERROR_OFFSET);
        assert_eq!(
            b,
            [
                0, 0, 0, 28, 0, 4, b'f', b'u', b'l', b'l', 0, 0, 0, 0, 0, 0, 4, 0
            ]
        );
        assert_eq!(ErrorChunk::decode(t, &b).unwrap(), e);
        for n in 0..b.len() {
            assert!(ErrorChunk::decode(t, &b[..n]).is_err(), "length {n}");
        }
        let plain = ErrorChunk {
            error: NBD_EIO,
            message: String::new(),
            offset: None,
        };
        let (t, b) = plain.encode();
        assert_eq!(t, NBD_REPLY_TYPE_ERROR);
        assert_eq!(b, [0, 0, 0, 5, 0, 0]);
        assert_eq!(ErrorChunk::decode(t, &b).unwrap(), plain);
        // A zero error value is a protocol violation.
        assert!(ErrorChunk::decode(NBD_REPLY_TYPE_ERROR, &[0, 0, 0, 0, 0, 0]).is_err());
        // Message longer than the payload.
        assert!(ErrorChunk::decode(NBD_REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
        // Unknown error types decode like ERROR, ignoring trailing fields.
        let u = ErrorChunk::decode(
            NBD_REPLY_TYPE_ERROR_BIT | 9,
            &[0, 0, 0, 5, 0, 1, b'x', 1, 2],
        )
        .unwrap();
        assert_eq!(u.message, "x");
        // Control characters do not reach the terminal.
        let c = ErrorChunk::decode(NBD_REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 2, 0x1b, b'[']).unwrap();
        assert_eq!(c.message, "?[");
        assert_eq!(sanitize(b" a\nb\tc\r\n"), "a b c");
    }

    #[test]
    fn block_status_exact_bytes_and_round_trip() {
        let d = [
            BlockDescriptor {
                length: 4096,
                flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
            },
            BlockDescriptor {
                length: 512,
                flags: 0,
            },
        ];
        let b = encode_block_status(1, &d);
        assert_eq!(
            b,
            [
                0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(decode_block_status(&b).unwrap(), (1, d.to_vec()));
        assert!(decode_block_status(&b[..19]).is_err());
        assert!(decode_block_status(&b[..4]).is_err());
        let zero = encode_block_status(
            1,
            &[BlockDescriptor {
                length: 0,
                flags: 0,
            }],
        );
        assert!(decode_block_status(&zero).is_err());
        assert!(truncated(BlockDescriptor::decode(&[0; 7])));
    }

    #[test]
    fn extended_request_exact_bytes_and_round_trip() {
        let b = encode_extended_request(
            NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_WRITE_ZEROES,
            0x1122_3344_5566_7788,
            0x0000_0001_0000_0000,
            0x0000_0002_0000_0400,
        );
        assert_eq!(
            b,
            [
                0x21, 0xe4, 0x1c, 0x71, 0, 0x10, 0, 6, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                0x88, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 4, 0
            ]
        );
        let (r, len) = decode_extended_request(&b).unwrap();
        assert_eq!(len, 0x2_0000_0400);
        assert_eq!(
            (r.command, r.flags, r.cookie),
            (6, 0x10, 0x1122_3344_5566_7788)
        );
        assert_eq!(r.offset, 1 << 32);
        let small = Request {
            flags: 0,
            command: NBD_CMD_READ,
            cookie: 3,
            offset: 512,
            length: 4096,
        };
        let e = small.encode_extended();
        assert_eq!(&e[24..], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(decode_extended_request(&e).unwrap(), (small, 4096));
        assert!(truncated(decode_extended_request(&e[..31])));
        // A compact header is not an extended one.
        assert!(bad_magic(decode_extended_request(
            &[small.encode().as_slice(), &[0; 4]].concat()
        )));
    }

    #[test]
    fn extended_chunk_header_exact_bytes_and_round_trip() {
        let h = ExtendedChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type: NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie: 2,
            offset: 1 << 40,
            length: 8 + 16,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [
                0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 1, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 24
            ]
        );
        assert_eq!(ExtendedChunkHeader::decode(&b).unwrap(), h);
        assert_eq!(reply_header_len(&b).unwrap(), EXTENDED_REPLY_HEADER_LEN);
        assert_eq!(h.chunk().length, 24);
        assert!(h.chunk().is_done());
        assert!(truncated(ExtendedChunkHeader::decode(&b[..31])));
        let mut bad = b;
        bad[3] ^= 1;
        assert!(bad_magic(ExtendedChunkHeader::decode(&bad)));
        // A structured (compact) header is refused by the extended decoder.
        let compact = ChunkHeader {
            flags: 0,
            chunk_type: NBD_REPLY_TYPE_NONE,
            cookie: 1,
            length: 0,
        }
        .encode();
        assert!(bad_magic(ExtendedChunkHeader::decode(
            &[compact.as_slice(), &[0; 12]].concat()
        )));
    }

    #[test]
    fn extended_chunk_lengths_are_bounded() {
        let ok = |t, l| check_extended_chunk_length(t, l).is_ok();
        assert!(ok(NBD_REPLY_TYPE_NONE, 0));
        assert!(!ok(NBD_REPLY_TYPE_NONE, 1 << 32));
        assert!(ok(NBD_REPLY_TYPE_OFFSET_DATA, 9));
        assert!(!ok(
            NBD_REPLY_TYPE_OFFSET_DATA,
            u64::from(MAX_DATA_PAYLOAD) + 1
        ));
        assert!(!ok(NBD_REPLY_TYPE_OFFSET_DATA, u64::MAX));
        assert!(ok(NBD_REPLY_TYPE_OFFSET_HOLE, 12));
        // The 32-bit block status is a protocol violation here.
        assert!(!ok(NBD_REPLY_TYPE_BLOCK_STATUS, 12));
        assert!(!ok(NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 8));
        assert!(!ok(NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 16));
        assert!(ok(NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 24));
        assert!(!ok(NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 25));
        assert!(ok(
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            u64::from(MAX_BLOCK_STATUS_EXT_PAYLOAD)
        ));
        assert!(!ok(
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            u64::from(MAX_BLOCK_STATUS_EXT_PAYLOAD) + 16
        ));
        assert!(!ok(NBD_REPLY_TYPE_BLOCK_STATUS_EXT, (1 << 32) + 8));
        assert!(ok(NBD_REPLY_TYPE_ERROR, 6));
        assert!(!ok(NBD_REPLY_TYPE_ERROR, u64::from(MAX_ERROR_PAYLOAD) + 1));
        assert!(!ok(42, 0));
        // Without extended headers the wide type is unknown.
        assert!(check_chunk_length(NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 24).is_err());
        let huge =
            encode_extended_chunk_header(0, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 1, 0, u64::MAX - 7);
        assert!(matches!(
            ExtendedChunkHeader::decode(&huge),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn block_status_ext_exact_bytes_and_round_trip() {
        let d = [
            ExtendedBlockDescriptor {
                length: 5 << 30,
                flags: u64::from(NBD_STATE_HOLE | NBD_STATE_ZERO),
            },
            ExtendedBlockDescriptor {
                length: 512,
                flags: 0,
            },
        ];
        let b = encode_block_status_ext(3, &d);
        assert_eq!(
            b,
            [
                0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0,
                0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        let len = b.len() as u32;
        assert_eq!(decode_block_status_ext_prefix(&b, len).unwrap(), (3, 2));
        assert!(decode_block_status_ext_prefix(&b, len - 16).is_err());
        assert!(truncated(decode_block_status_ext_prefix(&b[..7], len)));
        assert_eq!(ExtendedBlockDescriptor::decode(&b[8..24]).unwrap(), d[0]);
        assert_eq!(ExtendedBlockDescriptor::decode(&b[24..]).unwrap(), d[1]);
        assert!(ExtendedBlockDescriptor::decode(&[0; 16]).is_err());
        assert!(truncated(ExtendedBlockDescriptor::decode(&[0; 15])));
        assert_eq!(
            option_name(NBD_OPT_EXTENDED_HEADERS),
            "NBD_OPT_EXTENDED_HEADERS"
        );
    }

    #[test]
    fn errno_messages() {
        assert_eq!(errno_message(NBD_EPERM), "Operation not permitted");
        assert_eq!(errno_message(NBD_EIO), "Input/output error");
        assert_eq!(errno_message(NBD_ENOMEM), "Cannot allocate memory");
        assert_eq!(errno_message(NBD_EINVAL), "Invalid argument");
        assert_eq!(errno_message(NBD_ENOSPC), "No space left on device");
        assert_eq!(errno_message(NBD_EOVERFLOW), "Value too large");
        assert_eq!(errno_message(NBD_ENOTSUP), "Operation not supported");
        assert_eq!(errno_message(NBD_ESHUTDOWN), "Server is shutting down");
        assert!(errno_message(1234).contains("Unknown"));
    }

    #[test]
    fn wire_error_text() {
        let e = WireError::BadMagic {
            what: "reply",
            expected: 1,
            got: 2,
        };
        assert_eq!(e.to_string(), "reply has bad magic 0x2 (expected 0x1)");
    }
}
