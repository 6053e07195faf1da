//! Client side of the fixed newstyle handshake.
//!
//! Order of business: greeting and client flags; for TLS,
//! `NBD_OPT_STARTTLS` before any other option, after which the caller
//! upgrades the stream and everything else goes through TLS
//! ([`Handshake`]); `NBD_OPT_EXTENDED_HEADERS` (64-bit request and
//! reply headers, which imply structured replies), and when the server
//! refuses it `NBD_OPT_STRUCTURED_REPLY` (sparse reads and error
//! messages); `NBD_OPT_SET_META_CONTEXT` for
//! `base:allocation` (only possible with structured replies);
//! `NBD_OPT_GO` asking for block size constraints, falling back to
//! `NBD_OPT_EXPORT_NAME` for servers that predate `NBD_OPT_GO`.

use std::io::{self, Read, Write};

use super::wire::*;
use crate::block_size::BlockSize;
use crate::error::{Error, ErrorKind, Operation, Result};

/// What the handshake settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`); zero if the server did not set
    /// `NBD_FLAG_HAS_FLAGS`.
    pub flags: u16,
    /// Block size constraints the server sent and that passed validation.
    pub block_size: Option<BlockSize>,
    /// Structured replies were negotiated (extended headers imply them).
    pub structured_replies: bool,
    /// Extended headers were negotiated: requests and replies use the
    /// 32-byte headers with 64-bit lengths, and block status comes as
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
    pub extended_headers: bool,
    /// Context id of `base:allocation`, if the server selected it.
    pub base_allocation: Option<u32>,
}

const OP: Operation = Operation::Handshake;

/// Most bytes a server may send during the handshake. A real one sends a
/// few hundred; the bound stops a server that sends valid replies for ever
/// (informational replies to `NBD_OPT_GO`, say) from keeping nbdcp busy
/// for ever, which no timeout would catch.
pub const MAX_HANDSHAKE_BYTES: usize = 1024 * 1024;

struct Negotiator<'a, S> {
    stream: &'a mut S,
    name: &'a str,
    export: &'a str,
    /// Bytes read from the server so far.
    received: usize,
    /// The stream runs TLS already.
    tls: bool,
    /// TLS has just been set up and no reply has come through it yet.
    tls_fresh: bool,
}

/// Hint for a plain-text client that met a server insisting on TLS.
fn tls_hint() -> &'static str {
    if cfg!(feature = "tls") {
        "; connect with an nbds:// or nbds+unix:// URI"
    } else {
        "; connecting with TLS (nbds://) needs a build with TLS (cargo feature \"tls\")"
    }
}

/// Show the first bytes a non-NBD peer sent, as text when printable: it is
/// usually the best clue to what answered (`SSH-2.0-`, `HTTP/1.`).
fn describe_garbage(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("0x{hex} (\"{}\")", String::from_utf8_lossy(bytes))
    } else {
        format!("0x{hex}")
    }
}

impl<S: Read + Write> Negotiator<'_, S> {
    fn fail(&self, kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error::new(kind, msg).during(OP)
    }

    fn proto(&self, msg: impl Into<String>) -> Error {
        self.fail(ErrorKind::Protocol, msg)
    }

    fn wire(&self, e: WireError) -> Error {
        Error::wire(OP, e)
    }

    fn io(&self, e: io::Error) -> Error {
        use io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
        if self.tls_fresh && matches!(e.kind(), BrokenPipe | ConnectionReset | UnexpectedEof) {
            // A TLS 1.3 server checks the client's certificate after the
            // client has finished its side of the handshake, and one that
            // refuses it just hangs up.
            let what = if e.kind() == UnexpectedEof {
                "closed the connection".to_string()
            } else {
                format!("dropped the connection ({e})")
            };
            return Error::new(
                ErrorKind::Tls,
                format!(
                    "the server {what} right after the TLS handshake: it did not accept our credentials (a server that checks client certificates wants client-cert.pem and client-key.pem in the tls-certificates directory)"
                ),
            )
            .during(OP);
        }
        let e = if e.kind() == UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection during the handshake",
            )
        } else {
            e
        };
        Error::io(OP, e)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.received = self.received.saturating_add(buf.len());
        if self.received > MAX_HANDSHAKE_BYTES {
            return Err(self.proto(format!(
                "server sent more than {} KiB during the handshake",
                MAX_HANDSHAKE_BYTES / 1024
            )));
        }
        self.stream.read_exact(buf).map_err(|e| self.io(e))
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.stream.write_all(buf).map_err(|e| self.io(e))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let length = u32::try_from(data.len())
            .map_err(|_| self.fail(ErrorKind::InvalidInput, "option data too long"))?;
        let mut msg = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
        msg.extend_from_slice(&OptionHeader { option, length }.encode());
        msg.extend_from_slice(data);
        self.write_all(&msg)
    }

    /// Read one option reply to `option`. The payload length was bounded by
    /// the decoder, so allocating it is safe.
    fn read_reply(&mut self, option: u32) -> Result<(OptionReplyHeader, Vec<u8>)> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut h)?;
        let hdr = OptionReplyHeader::decode(&h).map_err(|e| self.wire(e))?;
        if hdr.option != option {
            return Err(self.proto(format!(
                "server replied to {} while {} was pending",
                option_name(hdr.option),
                option_name(option)
            )));
        }
        let mut payload = vec![0u8; hdr.length as usize];
        self.read_exact(&mut payload)?;
        self.tls_fresh = false;
        Ok((hdr, payload))
    }

    /// Politely end negotiation after a failure the server reported; the
    /// connection is dropped next, so errors do not matter.
    fn abort(&mut self) {
        let h = OptionHeader {
            option: NBD_OPT_ABORT,
            length: 0,
        };
        let _ = self.stream.write_all(&h.encode());
    }

    /// The text of an option error reply: what it means, plus what the
    /// server said, if anything.
    fn describe_error(hdr: &OptionReplyHeader, payload: &[u8]) -> String {
        let what = match hdr.reply_type {
            NBD_REP_ERR_UNSUP..=NBD_REP_ERR_TOO_BIG => {
                option_error_message(hdr.reply_type).to_string()
            }
            t => format!("unknown error {t:#x}"),
        };
        format!("{what}{}", server_said(payload))
    }

    /// Errors that end negotiation whatever option they answer.
    fn fatal_option_error(&mut self, hdr: &OptionReplyHeader, payload: &[u8]) -> Option<Error> {
        let err = match hdr.reply_type {
            NBD_REP_ERR_TLS_REQD if self.tls => self.proto(format!(
                "server asked for TLS on a connection already using it{}",
                server_said(payload)
            )),
            NBD_REP_ERR_TLS_REQD => self.fail(
                ErrorKind::Tls,
                format!("server requires TLS{}{}", server_said(payload), tls_hint()),
            ),
            NBD_REP_ERR_SHUTDOWN => self.fail(
                ErrorKind::Server,
                format!("server is shutting down{}", server_said(payload)),
            ),
            _ => return None,
        };
        self.abort();
        Some(err)
    }

    fn oldstyle(&self) -> Error {
        self.fail(
            ErrorKind::Unsupported,
            "server uses the oldstyle handshake, which is not supported",
        )
    }

    fn greeting(&mut self) -> Result<bool> {
        let mut g = [0u8; GREETING_LEN];
        self.read_exact(&mut g[..8])?;
        if check_init_magic(&g[..8]).is_err() {
            return Err(self.proto(format!(
                "not an NBD server: bad magic {}",
                describe_garbage(&g[..8])
            )));
        }
        self.read_exact(&mut g[8..16])?;
        match Greeting::decode(&g[..16]) {
            Ok(Greeting::Oldstyle) => return Err(self.oldstyle()),
            // Newstyle: the flags are still to come.
            Err(WireError::Truncated { .. }) | Ok(Greeting::Newstyle { .. }) => {}
            Err(_) => {
                return Err(self.proto(format!(
                    "not an NBD server: bad magic {} after NBDMAGIC",
                    describe_garbage(&g[8..16])
                )));
            }
        }
        self.read_exact(&mut g[16..])?;
        let flags = match Greeting::decode(&g) {
            Ok(Greeting::Newstyle { handshake_flags }) => handshake_flags,
            Ok(Greeting::Oldstyle) => return Err(self.oldstyle()),
            Err(e) => return Err(self.wire(e)),
        };
        if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.fail(
                ErrorKind::Unsupported,
                "server does not support fixed newstyle negotiation",
            ));
        }
        let no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
        let mut client = NBD_FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client |= NBD_FLAG_C_NO_ZEROES;
        }
        self.write_all(&encode_client_flags(client))?;
        Ok(no_zeroes)
    }

    /// `NBD_OPT_STARTTLS`: anything but an acknowledgement ends the
    /// connection, as TLS was asked for and plain text will not do.
    fn start_tls(&mut self) -> Result<()> {
        self.send_option(NBD_OPT_STARTTLS, &[])?;
        let (hdr, payload) = self.read_reply(NBD_OPT_STARTTLS)?;
        match hdr.reply_type {
            NBD_REP_ACK => Ok(()),
            _ if hdr.is_error() => {
                self.abort();
                let what = match hdr.reply_type {
                    NBD_REP_ERR_UNSUP | NBD_REP_ERR_POLICY => "server does not offer TLS",
                    _ => "server refused to start TLS",
                };
                Err(self.fail(
                    ErrorKind::Tls,
                    format!(
                        "{what}: {}; TLS was required, so not continuing in plain text",
                        Self::describe_error(&hdr, &payload)
                    ),
                ))
            }
            t => Err(self.proto(format!(
                "unexpected {} reply to NBD_OPT_STARTTLS",
                option_reply_name(t)
            ))),
        }
    }

    /// Ask for extended headers; `false` (and the caller falls back to
    /// structured replies) when the server refuses them in any
    /// non-fatal way.
    fn extended_headers(&mut self) -> Result<bool> {
        self.yes_no_option(
            NBD_OPT_EXTENDED_HEADERS,
            "NBD_OPT_EXTENDED_HEADERS",
            "extended headers",
        )
    }

    /// Ask for structured replies; `false` when refused non-fatally.
    fn structured_replies(&mut self) -> Result<bool> {
        self.yes_no_option(
            NBD_OPT_STRUCTURED_REPLY,
            "NBD_OPT_STRUCTURED_REPLY",
            "structured replies",
        )
    }

    /// An option without data that the server grants with an empty
    /// `NBD_REP_ACK` or refuses with an error; fatal errors end the
    /// handshake, others are `false`.
    fn yes_no_option(&mut self, option: u32, option_name: &str, what: &str) -> Result<bool> {
        self.send_option(option, &[])?;
        let (hdr, payload) = self.read_reply(option)?;
        match hdr.reply_type {
            NBD_REP_ACK if payload.is_empty() => Ok(true),
            NBD_REP_ACK => Err(self.proto(format!("NBD_REP_ACK to {option_name} with a payload"))),
            _ if hdr.is_error() => {
                if let Some(e) = self.fatal_option_error(&hdr, &payload) {
                    return Err(e);
                }
                log::debug!(
                    "{}: no {what}: {}",
                    self.name,
                    Self::describe_error(&hdr, &payload)
                );
                Ok(false)
            }
            t => Err(self.proto(format!(
                "unexpected {} reply to {option_name}",
                option_reply_name(t)
            ))),
        }
    }

    fn base_allocation(&mut self) -> Result<Option<u32>> {
        let data = encode_meta_context_payload(self.export, &[BASE_ALLOCATION])
            .map_err(|e| self.fail(ErrorKind::InvalidInput, e.to_string()))?;
        self.send_option(NBD_OPT_SET_META_CONTEXT, &data)?;
        let mut found = None;
        loop {
            let (hdr, payload) = self.read_reply(NBD_OPT_SET_META_CONTEXT)?;
            match hdr.reply_type {
                NBD_REP_META_CONTEXT => {
                    let (id, name) =
                        decode_meta_context_reply(&payload).map_err(|e| self.wire(e))?;
                    if name == BASE_ALLOCATION {
                        found = Some(id);
                    } else {
                        log::debug!(
                            "{}: server selected unrequested context '{name}'",
                            self.name
                        );
                    }
                }
                NBD_REP_ACK => return Ok(found),
                _ if hdr.is_error() => {
                    if let Some(e) = self.fatal_option_error(&hdr, &payload) {
                        return Err(e);
                    }
                    // The protocol says to forget contexts sent before an
                    // error; extents are then just not available.
                    log::debug!(
                        "{}: no base:allocation: {}",
                        self.name,
                        Self::describe_error(&hdr, &payload)
                    );
                    return Ok(None);
                }
                t => {
                    return Err(self.proto(format!(
                        "unexpected {} reply to NBD_OPT_SET_META_CONTEXT",
                        option_reply_name(t)
                    )));
                }
            }
        }
    }

    /// `NBD_OPT_GO`; `Ok(None)` if the server does not know the option.
    fn go(&mut self) -> Result<Option<(u64, u16, Option<BlockSize>)>> {
        let data = encode_go_payload(self.export, &[NBD_INFO_BLOCK_SIZE])
            .map_err(|e| self.fail(ErrorKind::InvalidInput, e.to_string()))?;
        self.send_option(NBD_OPT_GO, &data)?;
        let mut export = None;
        let mut block_size = None;
        loop {
            let (hdr, payload) = self.read_reply(NBD_OPT_GO)?;
            match hdr.reply_type {
                NBD_REP_INFO => match Info::decode(&payload).map_err(|e| self.wire(e))? {
                    Info::Export { size, flags } => export = Some((size, flags)),
                    Info::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => block_size = validate_block_size(self.name, minimum, preferred, maximum),
                    Info::Other(_) => {}
                },
                NBD_REP_ACK => {
                    let Some((size, flags)) = export else {
                        return Err(self
                            .proto("server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT"));
                    };
                    return Ok(Some((size, flags, block_size)));
                }
                NBD_REP_ERR_UNSUP => return Ok(None),
                _ if hdr.is_error() => {
                    let msg = Self::describe_error(&hdr, &payload);
                    let kind = match hdr.reply_type {
                        NBD_REP_ERR_TLS_REQD if self.tls => ErrorKind::Protocol,
                        NBD_REP_ERR_TLS_REQD => ErrorKind::Tls,
                        // We always ask for block sizes, so this is the
                        // server not following the protocol.
                        NBD_REP_ERR_BLOCK_SIZE_REQD => ErrorKind::Protocol,
                        _ => ErrorKind::Server,
                    };
                    let msg = if hdr.reply_type == NBD_REP_ERR_TLS_REQD {
                        format!(
                            "server requires TLS for export '{}'{}{}",
                            self.export,
                            server_said(&payload),
                            if self.tls {
                                " (on a TLS connection)"
                            } else {
                                tls_hint()
                            }
                        )
                    } else {
                        format!("server refused export '{}': {msg}", self.export)
                    };
                    self.abort();
                    return Err(self.fail(kind, msg));
                }
                t => {
                    return Err(self.proto(format!(
                        "unexpected {} reply to NBD_OPT_GO",
                        option_reply_name(t)
                    )));
                }
            }
        }
    }

    fn export_name(&mut self, no_zeroes: bool) -> Result<(u64, u16)> {
        let name_len = self.export.len();
        if name_len > MAX_STRING {
            return Err(self.fail(ErrorKind::InvalidInput, "export name too long"));
        }
        let export = self.export.as_bytes().to_vec();
        self.send_option(NBD_OPT_EXPORT_NAME, &export)?;
        let mut b = [0u8; EXPORT_NAME_REPLY_LEN + EXPORT_NAME_PADDING];
        let want = if no_zeroes {
            EXPORT_NAME_REPLY_LEN
        } else {
            b.len()
        };
        // This option cannot fail politely: a server that does not like the
        // export name just hangs up.
        if let Err(e) = self.stream.read_exact(&mut b[..want]) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Err(self.fail(
                    ErrorKind::Server,
                    format!(
                        "server refused export '{}' (it closed the connection: the export may not exist or may require TLS)",
                        self.export
                    ),
                ));
            }
            return Err(self.io(e));
        }
        let r = ExportNameReply::decode(&b).map_err(|e| self.wire(e))?;
        Ok((r.size, r.flags))
    }
}

/// What the server said with an error, ready to append to a message.
fn server_said(payload: &[u8]) -> String {
    let said = sanitize(payload);
    if said.is_empty() {
        String::new()
    } else {
        format!(" (server said: {said})")
    }
}

/// Check block size constraints against the protocol's rules; a server
/// that breaks them is ignored (with a warning) rather than trusted with
/// our request sizes.
pub fn validate_block_size(name: &str, min: u32, pref: u32, max: u32) -> Option<BlockSize> {
    let ok = min.is_power_of_two()
        && min <= 64 * 1024
        && pref.is_power_of_two()
        && pref >= min
        && max >= min
        && (max == u32::MAX || max % min == 0);
    if ok {
        Some(BlockSize {
            minimum: min,
            preferred: pref,
            maximum: max,
        })
    } else {
        log::warn!(
            "{name}: ignoring invalid block size constraints from server (minimum {min}, preferred {pref}, maximum {max})"
        );
        None
    }
}

/// The handshake in its phases, for a stream that changes in between:
/// [`Handshake::greeting`] on the plain socket, [`Handshake::start_tls`]
/// if TLS is wanted (the caller then runs the TLS handshake on the same
/// socket), and [`Handshake::finish`] on whichever stream is in use.
/// [`negotiate`] runs it without TLS.
#[derive(Debug)]
pub struct Handshake<'a> {
    export: &'a str,
    name: &'a str,
    received: usize,
    no_zeroes: bool,
    tls: bool,
    tls_fresh: bool,
}

impl<'a> Handshake<'a> {
    /// A handshake for `export`; `name` names the server in log messages.
    pub fn new(export: &'a str, name: &'a str) -> Handshake<'a> {
        Handshake {
            export,
            name,
            received: 0,
            no_zeroes: false,
            tls: false,
            tls_fresh: false,
        }
    }

    fn run<S: Read + Write, T>(
        &mut self,
        stream: &mut S,
        phase: impl FnOnce(&mut Negotiator<'_, S>) -> Result<T>,
    ) -> Result<T> {
        let mut n = Negotiator {
            stream,
            name: self.name,
            export: self.export,
            received: self.received,
            tls: self.tls,
            tls_fresh: self.tls_fresh,
        };
        let r = phase(&mut n);
        self.received = n.received;
        self.tls_fresh = n.tls_fresh;
        r
    }

    /// Read the server's greeting and send the client flags.
    pub fn greeting<S: Read + Write>(&mut self, stream: &mut S) -> Result<()> {
        self.no_zeroes = self.run(stream, |n| n.greeting())?;
        Ok(())
    }

    /// Ask for TLS (`NBD_OPT_STARTTLS`), as the first option. On success
    /// the caller must run the TLS handshake on the socket at once, and
    /// pass the TLS stream to [`Handshake::finish`]; any refusal is an
    /// [`ErrorKind::Tls`] error, never a fallback to plain text.
    pub fn start_tls<S: Read + Write>(&mut self, stream: &mut S) -> Result<()> {
        self.run(stream, |n| n.start_tls())?;
        self.tls = true;
        self.tls_fresh = true;
        Ok(())
    }

    /// Negotiate the options and the export.
    pub fn finish<S: Read + Write>(&mut self, stream: &mut S) -> Result<Negotiated> {
        let no_zeroes = self.no_zeroes;
        self.run(stream, |n| n.options(no_zeroes))
    }
}

impl<S: Read + Write> Negotiator<'_, S> {
    /// Everything after the greeting (and TLS): structured replies,
    /// `base:allocation`, then the export.
    fn options(&mut self, no_zeroes: bool) -> Result<Negotiated> {
        let name = self.name;
        let extended_headers = self.extended_headers()?;
        let structured_replies = extended_headers || self.structured_replies()?;
        let base_allocation = if structured_replies {
            self.base_allocation()?
        } else {
            None
        };
        let (size, flags, block_size) = match self.go()? {
            Some(r) => r,
            None => {
                log::debug!(
                    "{name}: server does not support NBD_OPT_GO; using NBD_OPT_EXPORT_NAME"
                );
                let (size, flags) = self.export_name(no_zeroes)?;
                (size, flags, None)
            }
        };
        let flags = if flags & NBD_FLAG_HAS_FLAGS == 0 {
            log::debug!("{name}: server did not set NBD_FLAG_HAS_FLAGS; assuming no features");
            0
        } else {
            flags
        };
        log::debug!(
            "{name}: export size {size}, flags {flags:#06x}, structured replies {structured_replies}, extended headers {extended_headers}, base:allocation {base_allocation:?}, block size {block_size:?}"
        );
        Ok(Negotiated {
            size,
            flags,
            block_size,
            structured_replies,
            extended_headers,
            base_allocation,
        })
    }
}

/// Run the handshake, without TLS, on a freshly connected stream for
/// `export`. `name` names the server in log messages.
pub fn negotiate<S: Read + Write>(stream: &mut S, export: &str, name: &str) -> Result<Negotiated> {
    let mut h = Handshake::new(export, name);
    h.greeting(stream)?;
    h.finish(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Peer;
    use std::thread;

    /// Negotiate `export` against `server` playing the peer on a thread;
    /// the script must run to its end without an I/O error (the client
    /// hanging up early included) or a failed check.
    fn run<F>(export: &str, server: F) -> Result<Negotiated>
    where
        F: FnOnce(&mut Peer) -> io::Result<()> + Send + 'static,
    {
        let (mut c, mut p) = Peer::pair();
        let t = thread::spawn(move || server(&mut p));
        let r = negotiate(&mut c, export, "test");
        drop(c);
        t.join().unwrap().unwrap();
        r
    }

    const MODERN: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

    /// [`run`] with `NBD_OPT_STARTTLS` asked for; the "TLS session" is the
    /// same plain stream, which is all the NBD side can tell.
    fn run_tls<F>(export: &str, server: F) -> Result<Negotiated>
    where
        F: FnOnce(&mut Peer) -> io::Result<()> + Send + 'static,
    {
        let (mut c, mut p) = Peer::pair();
        let t = thread::spawn(move || server(&mut p));
        let mut h = Handshake::new(export, "test");
        let r = h
            .greeting(&mut c)
            .and_then(|()| h.start_tls(&mut c))
            .and_then(|()| h.finish(&mut c));
        drop(c);
        t.join().unwrap().unwrap();
        r
    }

    /// The rest of a handshake after TLS: no structured replies, an
    /// export of `size` bytes through `NBD_OPT_GO`.
    fn plain_go(p: &mut Peer, size: u64) -> io::Result<()> {
        let (opt, _) = p.option()?;
        assert_eq!(opt, NBD_OPT_STRUCTURED_REPLY);
        p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
        let (opt, _) = p.option()?;
        assert_eq!(opt, NBD_OPT_GO);
        let info = Info::Export {
            size,
            flags: NBD_FLAG_HAS_FLAGS,
        };
        p.info(opt, &info)?;
        p.ack(opt)
    }

    #[test]
    fn starttls_comes_first_then_everything_else() {
        let n = run_tls("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, data) = p.option()?;
            assert_eq!((opt, data.len()), (NBD_OPT_STARTTLS, 0));
            p.ack(opt)?;
            plain_go(p, 512)
        })
        .unwrap();
        assert_eq!(n.size, 512);
    }

    #[test]
    fn starttls_refusals_never_fall_back_to_plain_text() {
        let cases = [
            (
                NBD_REP_ERR_UNSUP,
                "server does not offer TLS: option not supported",
            ),
            (
                NBD_REP_ERR_POLICY,
                "server does not offer TLS: forbidden by server policy",
            ),
            (
                NBD_REP_ERR_INVALID,
                "server refused to start TLS: invalid request",
            ),
        ];
        for (reply, want) in cases {
            let e = run_tls("x", move |p| {
                p.greet(MODERN)?;
                p.client_flags()?;
                let (opt, _) = p.option()?;
                assert_eq!(opt, NBD_OPT_STARTTLS);
                p.option_reply(opt, reply, b"no TLS here")?;
                // The client gives up politely; nothing else is asked.
                let (opt, _) = p.option()?;
                assert_eq!(opt, NBD_OPT_ABORT);
                Ok(())
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Tls, "{want}");
            let msg = e.to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(msg.contains("no TLS here"), "{msg}");
            assert!(msg.contains("not continuing in plain text"), "{msg}");
        }
    }

    #[test]
    fn starttls_odd_replies() {
        let e = run_tls("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_SERVER, &[])
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("reply to NBD_OPT_STARTTLS"), "{e}");
        // Asking for TLS again inside TLS is the server's mistake.
        let e = run_tls("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_TLS_REQD, &[])
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("already using it"), "{e}");
    }

    #[test]
    fn hanging_up_right_after_tls_blames_the_credentials() {
        let e = run_tls("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.ack(opt)
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(
            e.to_string().contains("right after the TLS handshake"),
            "{e}"
        );
        // Later, a hang-up is an ordinary I/O error.
        let e = run_tls("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn happy_path_with_go() {
        let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES;
        let n = run("disk", move |p| {
            p.greet(MODERN)?;
            assert_eq!(p.client_flags()?, 3);
            let (opt, data) = p.option()?;
            assert_eq!((opt, data.len()), (NBD_OPT_STRUCTURED_REPLY, 0));
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_SET_META_CONTEXT);
            p.meta_context(opt, 9, "qemu:dirty")?;
            p.meta_context(opt, 5, BASE_ALLOCATION)?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_GO);
            p.info(opt, &Info::Other(NBD_INFO_NAME))?;
            p.info(
                opt,
                &Info::BlockSize {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 1 << 25,
                },
            )?;
            p.info(
                opt,
                &Info::Export {
                    size: 1 << 20,
                    flags,
                },
            )?;
            p.ack(opt)
        })
        .unwrap();
        assert_eq!(
            n,
            Negotiated {
                size: 1 << 20,
                flags,
                block_size: Some(BlockSize {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 1 << 25
                }),
                structured_replies: true,
                extended_headers: false,
                base_allocation: Some(5),
            }
        );
    }

    /// SET_META_CONTEXT for `base:allocation` (context 4) and GO for a
    /// 1 MiB export, after structured replies or extended headers.
    fn meta_and_go(p: &mut Peer) -> io::Result<()> {
        let (opt, _) = p.option()?;
        assert_eq!(opt, NBD_OPT_SET_META_CONTEXT);
        p.meta_context(opt, 4, BASE_ALLOCATION)?;
        p.ack(opt)?;
        let (opt, _) = p.option()?;
        assert_eq!(opt, NBD_OPT_GO);
        let info = Info::Export {
            size: 1 << 20,
            flags: NBD_FLAG_HAS_FLAGS,
        };
        p.info(opt, &info)?;
        p.ack(opt)
    }

    #[test]
    fn extended_headers_first_and_instead_of_structured_replies() {
        let n = run("", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            p.see_extended_headers();
            let (opt, data) = p.option()?;
            assert_eq!((opt, data.len()), (NBD_OPT_EXTENDED_HEADERS, 0));
            p.ack(opt)?;
            // No NBD_OPT_STRUCTURED_REPLY: extended headers imply them.
            meta_and_go(p)
        })
        .unwrap();
        assert!(n.extended_headers);
        assert!(n.structured_replies);
        assert_eq!(n.base_allocation, Some(4));
    }

    #[test]
    fn extended_headers_after_starttls() {
        let n = run_tls("", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            p.see_extended_headers();
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_STARTTLS);
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_EXTENDED_HEADERS);
            p.ack(opt)?;
            meta_and_go(p)
        })
        .unwrap();
        assert!(n.extended_headers && n.structured_replies);
    }

    #[test]
    fn refused_extended_headers_fall_back_to_structured_replies() {
        for refusal in [
            NBD_REP_ERR_UNSUP,
            NBD_REP_ERR_POLICY,
            NBD_REP_ERR_INVALID,
            NBD_REP_ERR_PLATFORM,
            NBD_REP_FLAG_ERROR | 77,
        ] {
            let n = run("", move |p| {
                p.greet(MODERN)?;
                p.client_flags()?;
                p.see_extended_headers();
                let (opt, _) = p.option()?;
                assert_eq!(opt, NBD_OPT_EXTENDED_HEADERS);
                p.option_reply(opt, refusal, b"not here")?;
                let (opt, _) = p.option()?;
                assert_eq!(opt, NBD_OPT_STRUCTURED_REPLY);
                p.ack(opt)?;
                meta_and_go(p)
            })
            .unwrap();
            assert!(!n.extended_headers, "{refusal:#x}");
            assert!(n.structured_replies, "{refusal:#x}");
            assert_eq!(n.base_allocation, Some(4));
        }
        // Refused both: simple replies, no metadata context.
        let n = run("", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_STRUCTURED_REPLY);
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_GO);
            p.info(
                opt,
                &Info::Export {
                    size: 1,
                    flags: NBD_FLAG_HAS_FLAGS,
                },
            )?;
            p.ack(opt)
        })
        .unwrap();
        assert!(!n.extended_headers && !n.structured_replies);
    }

    #[test]
    fn odd_replies_to_extended_headers() {
        // An ACK with a payload, or a reply that is neither ACK nor error.
        for (reply, payload) in [(NBD_REP_ACK, &b"x"[..]), (NBD_REP_SERVER, &[][..])] {
            let e = run("", move |p| {
                p.greet(MODERN)?;
                p.client_flags()?;
                p.see_extended_headers();
                let (opt, _) = p.option()?;
                p.option_reply(opt, reply, payload)?;
                let _ = p.option();
                Ok(())
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            assert!(e.to_string().contains("NBD_OPT_EXTENDED_HEADERS"), "{e}");
        }
        // The server shutting down ends negotiation.
        let e = run("", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            p.see_extended_headers();
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_SHUTDOWN, &[])?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_ABORT);
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server, "{e}");
    }

    #[test]
    fn fallback_to_export_name_with_zero_padding() {
        let n = run("old", |p| {
            p.greet(NBD_FLAG_FIXED_NEWSTYLE)?;
            assert_eq!(p.client_flags()?, NBD_FLAG_C_FIXED_NEWSTYLE);
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_STRUCTURED_REPLY);
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            // No SET_META_CONTEXT without structured replies.
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_GO);
            p.option_reply(opt, NBD_REP_ERR_UNSUP, b"what is GO?")?;
            let (opt, data) = p.option()?;
            assert_eq!(opt, NBD_OPT_EXPORT_NAME);
            assert_eq!(data, b"old");
            p.export_name_reply(4096, NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY, false)
        })
        .unwrap();
        assert_eq!(n.size, 4096);
        assert_eq!(n.flags, NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY);
        assert!(!n.structured_replies);
        assert_eq!(n.base_allocation, None);
        assert_eq!(n.block_size, None);
    }

    #[test]
    fn fallback_to_export_name_without_padding() {
        let n = run("", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_GO);
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, data) = p.option()?;
            assert_eq!((opt, data.len()), (NBD_OPT_EXPORT_NAME, 0));
            p.export_name_reply(7, 0, true)
        })
        .unwrap();
        assert_eq!(n.size, 7);
        // HAS_FLAGS clear: no features assumed.
        assert_eq!(n.flags, 0);
        assert!(n.structured_replies);
        assert_eq!(n.base_allocation, None);
    }

    #[test]
    fn export_name_refused_by_hanging_up() {
        let e = run("nope", |p| {
            p.greet(NBD_FLAG_FIXED_NEWSTYLE)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_EXPORT_NAME);
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server);
        assert!(
            e.to_string().contains("server refused export 'nope'"),
            "{e}"
        );
    }

    #[test]
    fn unknown_export_is_a_clear_error() {
        let e = run("foo", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_UNKNOWN, &[])?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_GO);
            p.option_reply(opt, NBD_REP_ERR_UNKNOWN, b"no export 'foo'\n")?;
            // The client says goodbye.
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_ABORT);
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server);
        assert_eq!(
            e.to_string(),
            "handshake: server refused export 'foo': unknown export (server said: no export 'foo')"
        );
    }

    #[test]
    fn tls_required() {
        let e = run("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_TLS_REQD, b"TLS first")
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(e.to_string().contains("server requires TLS"), "{e}");
        assert!(e.to_string().contains("TLS first"), "{e}");
    }

    #[test]
    fn tls_required_for_export() {
        let e = run("secret", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_TLS_REQD, &[])
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls);
        assert!(
            e.to_string()
                .contains("server requires TLS for export 'secret'"),
            "{e}"
        );
    }

    #[test]
    fn garbage_bytes() {
        let e = run("x", |p| p.raw(b"SSH-2.0-OpenSSH_9.6\r\n")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(
            e.to_string()
                .contains("not an NBD server: bad magic 0x5353482d322e302d (\"SSH-2.0-\")"),
            "{e}"
        );
        // NBDMAGIC, then neither IHAVEOPT nor the oldstyle magic.
        let e = run("x", |p| {
            p.raw(b"NBDMAGIC\x01\x02\x03\x04\x05\x06\x07\x08\0\x01")
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("not an NBD server"), "{e}");
    }

    #[test]
    fn oldstyle_and_unfixed_newstyle_are_refused() {
        let e = run("x", |p| {
            // No encoder for the obsolete oldstyle greeting: by hand.
            let mut b = Vec::new();
            b.extend_from_slice(&NBD_MAGIC.to_be_bytes());
            b.extend_from_slice(&NBD_CLISERV_MAGIC.to_be_bytes());
            b.extend_from_slice(&[0u8; 8 + 4 + 124]);
            p.raw(&b)
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("oldstyle"), "{e}");
        let e = run("x", |p| p.greet(0)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("fixed newstyle"), "{e}");
    }

    #[test]
    fn peer_closing_early() {
        for cut in [0usize, 5, 8, 12, 17] {
            let e = run("x", move |p| {
                let g = Greeting::encode_newstyle(NBD_FLAG_FIXED_NEWSTYLE);
                p.raw(&g[..cut])
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io, "cut {cut}");
            assert!(
                e.to_string().contains("server closed the connection"),
                "cut {cut}: {e}"
            );
        }
        // Closing in the middle of option haggling.
        let e = run("x", |p| {
            p.greet(NBD_FLAG_FIXED_NEWSTYLE)?;
            p.client_flags()?;
            p.option()?;
            let h = OptionReplyHeader {
                option: NBD_OPT_STRUCTURED_REPLY,
                reply_type: NBD_REP_ACK,
                length: 0,
            }
            .encode();
            p.raw(&h[..10])
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn oversized_option_reply_is_refused_without_allocating() {
        let e = run("x", |p| {
            p.greet(NBD_FLAG_FIXED_NEWSTYLE)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.option_reply_header(opt, NBD_REP_ERR_UNSUP, u32::MAX)
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("too long"), "{e}");
    }

    #[test]
    fn reply_to_wrong_option() {
        let e = run("x", |p| {
            p.greet(NBD_FLAG_FIXED_NEWSTYLE)?;
            p.client_flags()?;
            p.option()?;
            p.ack(NBD_OPT_LIST)
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("NBD_OPT_LIST"), "{e}");
    }

    #[test]
    fn go_without_export_info() {
        let e = run("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_POLICY, &[])?;
            let (opt, _) = p.option()?;
            p.ack(opt)
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("NBD_INFO_EXPORT"), "{e}");
    }

    #[test]
    fn invalid_block_size_is_ignored() {
        let n = run("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, _) = p.option()?;
            p.info(
                opt,
                &Info::BlockSize {
                    minimum: 3,
                    preferred: 4096,
                    maximum: 1 << 20,
                },
            )?;
            p.info(
                opt,
                &Info::Export {
                    size: 1,
                    flags: NBD_FLAG_HAS_FLAGS,
                },
            )?;
            p.ack(opt)
        })
        .unwrap();
        assert_eq!(n.block_size, None);
        assert_eq!(n.size, 1);
    }

    #[test]
    fn block_size_validation() {
        assert!(validate_block_size("t", 1, 4096, u32::MAX).is_some());
        assert!(validate_block_size("t", 512, 4096, 1 << 25).is_some());
        assert!(validate_block_size("t", 0, 4096, 1 << 25).is_none());
        assert!(validate_block_size("t", 1 << 17, 1 << 17, 1 << 25).is_none());
        assert!(validate_block_size("t", 4096, 512, 1 << 25).is_none());
        assert!(validate_block_size("t", 512, 3000, 1 << 25).is_none());
        assert!(validate_block_size("t", 512, 4096, 256).is_none());
        assert!(validate_block_size("t", 512, 4096, 1000).is_none());
    }

    #[test]
    fn meta_context_error_means_no_extents() {
        let n = run("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.ack(opt)?;
            let (opt, _) = p.option()?;
            p.meta_context(opt, 1, BASE_ALLOCATION)?;
            p.option_reply(opt, NBD_REP_ERR_INVALID, &[])?;
            let (opt, _) = p.option()?;
            p.info(
                opt,
                &Info::Export {
                    size: 1,
                    flags: NBD_FLAG_HAS_FLAGS,
                },
            )?;
            p.ack(opt)
        })
        .unwrap();
        assert!(n.structured_replies);
        assert_eq!(n.base_allocation, None);
    }

    #[test]
    fn endless_option_replies_are_cut_off() {
        let e = run("x", |p| {
            p.greet(MODERN)?;
            p.client_flags()?;
            let (opt, _) = p.option()?;
            p.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, _) = p.option()?;
            assert_eq!(opt, NBD_OPT_GO);
            // Valid informational replies, for ever (until the client
            // hangs up).
            while p.info(opt, &Info::Other(0x7777)).is_ok() {}
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("during the handshake"), "{e}");
    }
}
