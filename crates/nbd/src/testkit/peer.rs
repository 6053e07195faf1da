//! [`Peer`]: the server's end of one connection, driven one protocol step
//! at a time, every message built with this crate's encoders
//! ([`crate::wire`]).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use super::server::State;
use crate::wire::*;

/// Longest option a peer reads (a broken client cannot make it allocate).
const MAX_OPTION: u32 = 64 * 1024;
/// Longest write payload a peer reads.
const MAX_WRITE: u32 = 64 << 20;

/// What a peer advertises, for [`Peer::negotiate`] and [`Peer::serve_go`].
#[derive(Clone, Debug)]
pub struct Export {
    /// Export name the peer answers to (`NBD_OPT_GO` for any other name
    /// gets `NBD_REP_ERR_UNKNOWN`).
    pub name: String,
    /// Export size.
    pub size: u64,
    /// Transmission flags, sent as they are (`NBD_FLAG_HAS_FLAGS`
    /// included, or not).
    pub flags: u16,
    /// Agree to structured replies.
    pub structured: bool,
    /// Agree to extended headers (which imply structured replies); when
    /// false, `NBD_OPT_EXTENDED_HEADERS` gets `NBD_REP_ERR_UNSUP`.
    pub extended: bool,
    /// The context id given to `base:allocation`, if it is offered (only
    /// with structured replies).
    pub base_allocation: Option<u32>,
    /// `NBD_INFO_BLOCK_SIZE` to send: minimum, preferred, maximum.
    pub block_size: Option<(u32, u32, u32)>,
}

impl Export {
    /// A writable export named "" of `size` bytes with structured replies,
    /// `base:allocation` (context id 3, so that a client assuming another
    /// id is caught), flush, trim, write zeroes and multi-conn.
    pub fn new(size: u64) -> Export {
        Export {
            name: String::new(),
            size,
            flags: NBD_FLAG_HAS_FLAGS
                | NBD_FLAG_SEND_FLUSH
                | NBD_FLAG_SEND_TRIM
                | NBD_FLAG_SEND_WRITE_ZEROES
                | NBD_FLAG_CAN_MULTI_CONN,
            structured: true,
            extended: false,
            base_allocation: Some(3),
            block_size: None,
        }
    }

    /// Agreeing to extended headers too.
    pub fn extended(mut self) -> Export {
        self.structured = true;
        self.extended = true;
        self
    }

    /// With another name.
    pub fn named(mut self, name: &str) -> Export {
        self.name = name.to_string();
        self
    }

    /// With exactly these transmission flags.
    pub fn flags(mut self, flags: u16) -> Export {
        self.flags = flags;
        self
    }

    /// Without structured replies (and so without `base:allocation`).
    pub fn simple(mut self) -> Export {
        self.structured = false;
        self.extended = false;
        self.base_allocation = None;
        self
    }

    /// Without `base:allocation`.
    pub fn no_extents(mut self) -> Export {
        self.base_allocation = None;
        self
    }

    /// Giving `base:allocation` the context id `id`.
    pub fn context(mut self, id: u32) -> Export {
        self.base_allocation = Some(id);
        self
    }

    /// Sending these block size constraints.
    pub fn block_size(mut self, minimum: u32, preferred: u32, maximum: u32) -> Export {
        self.block_size = Some((minimum, preferred, maximum));
        self
    }
}

/// What a [`Peer::serve`] hook did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Not handled: answer it normally.
    Pass,
    /// Handled (the hook sent whatever it wanted).
    Done,
    /// Hang up now.
    Close,
    /// Stop answering, but keep the connection open until the client goes.
    Stall,
}

/// What [`Peer::next_request`] found.
#[derive(Debug)]
pub enum Next {
    /// A request, with its payload for a write (else empty).
    Request(Request, Vec<u8>),
    /// Nothing arrived in the time given.
    Idle,
    /// The client hung up.
    Closed,
}

/// What the default export of [`Peer::serve`] holds at `[offset, offset +
/// len)`: each 8-byte big-endian word is its own offset, as with nbdkit's
/// pattern plugin.
pub fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let at = offset.wrapping_add(i);
            (at & !7).to_be_bytes()[(at & 7) as usize]
        })
        .collect()
}

fn invalid(e: WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The server's end of one connection, for a test playing the server.
///
/// Step functions send or read one protocol message each, built with the
/// [`crate::wire`] encoders and decoders; [`Peer::raw`] and
/// [`Peer::chunk_header`] are the escape hatches for deliberately broken
/// bytes. They return `io::Result`, so that a script can stop with `?`
/// when the client hangs up (which is what most misbehaving peers
/// expect); helpers that check what the client sent
/// ([`Peer::serve_go`]) panic when it is not what they expect.
pub struct Peer {
    stream: UnixStream,
    /// Replies being held back instead of sent (see [`Peer::hold`]).
    held: Option<Vec<u8>>,
    structured: bool,
    /// Extended headers were agreed: requests are read, and replies sent,
    /// with the 32-byte headers.
    extended: bool,
    /// Scripts see `NBD_OPT_EXTENDED_HEADERS` ([`Peer::option`] answers
    /// it with `NBD_REP_ERR_UNSUP` by itself otherwise).
    see_extended: bool,
    context: Option<u32>,
    /// The server this connection belongs to, which logs its requests.
    state: Option<Arc<State>>,
    connection: usize,
    requests: usize,
}

impl Peer {
    /// A peer on `stream`, not part of any [`super::Server`].
    pub fn new(stream: UnixStream) -> Peer {
        Peer {
            stream,
            held: None,
            structured: false,
            extended: false,
            see_extended: false,
            context: None,
            state: None,
            connection: 1,
            requests: 0,
        }
    }

    pub(super) fn for_server(stream: UnixStream, state: Arc<State>, connection: usize) -> Peer {
        Peer {
            state: Some(state),
            connection,
            ..Peer::new(stream)
        }
    }

    /// A connected pair: the client's end, and a peer on the other.
    pub fn pair() -> (UnixStream, Peer) {
        let (client, server) = UnixStream::pair().unwrap();
        (client, Peer::new(server))
    }

    /// The socket itself.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// This connection's number on its server, from 1.
    pub fn connection(&self) -> usize {
        self.connection
    }

    /// Whether structured replies were agreed ([`Peer::negotiate`] or
    /// [`Peer::serve_go`]).
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Whether extended headers were agreed.
    pub fn extended(&self) -> bool {
        self.extended
    }

    /// Let the script see `NBD_OPT_EXTENDED_HEADERS` in [`Peer::option`]
    /// instead of the peer refusing it unseen (as a server that predates
    /// it would, which is what scripts written before it expect).
    pub fn see_extended_headers(&mut self) {
        self.see_extended = true;
    }

    /// From now on, speak extended headers (after the script agreed to
    /// `NBD_OPT_EXTENDED_HEADERS`); implies structured replies.
    pub fn set_extended(&mut self) {
        self.extended = true;
        self.structured = true;
    }

    /// The context id agreed for `base:allocation`, if any.
    pub fn context(&self) -> Option<u32> {
        self.context
    }

    /// Send `bytes` as they are (or add them to the held replies).
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.held {
            Some(h) => {
                h.extend_from_slice(bytes);
                Ok(())
            }
            None => self.stream.write_all(bytes),
        }
    }

    /// From now on, keep what the step functions send instead of sending
    /// it, until [`Peer::release`].
    pub fn hold(&mut self) {
        self.held.get_or_insert_with(Vec::new);
    }

    /// Stop holding replies back; returns what was held, unsent.
    pub fn release(&mut self) -> Vec<u8> {
        self.held.take().unwrap_or_default()
    }

    /// Read and drop everything until the client hangs up (a peer that has
    /// stopped answering but keeps the connection open). Gives up after a
    /// minute of silence, so that no peer outlives its test by much.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 65536];
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(60)));
        while matches!(self.stream.read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Hang up at once, both directions.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Both)
    }

    // -----------------------------------------------------------------
    // Handshake

    /// Send the newstyle greeting with handshake `flags`.
    pub fn greet(&mut self, flags: u16) -> io::Result<()> {
        self.raw(&Greeting::encode_newstyle(flags))
    }

    /// Read the client's flags.
    pub fn client_flags(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.stream.read_exact(&mut b)?;
        decode_client_flags(&b).map_err(invalid)
    }

    /// Read one option request: its code and data (refusing more than
    /// 64 KiB of data). `NBD_OPT_EXTENDED_HEADERS` is answered with
    /// `NBD_REP_ERR_UNSUP` and skipped unless
    /// [`Peer::see_extended_headers`] was called.
    pub fn option(&mut self) -> io::Result<(u32, Vec<u8>)> {
        loop {
            let (opt, data) = self.any_option()?;
            if opt == NBD_OPT_EXTENDED_HEADERS && !self.see_extended {
                self.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
                continue;
            }
            return Ok((opt, data));
        }
    }

    fn any_option(&mut self) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; OPTION_HEADER_LEN];
        self.stream.read_exact(&mut h)?;
        let h = OptionHeader::decode(&h).map_err(invalid)?;
        if h.length > MAX_OPTION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "option too long",
            ));
        }
        let mut data = vec![0u8; h.length as usize];
        self.stream.read_exact(&mut data)?;
        Ok((h.option, data))
    }

    /// An option reply header claiming `length` bytes of payload, which
    /// the caller sends (or not) with [`Peer::raw`]: for peers that lie.
    pub fn option_reply_header(
        &mut self,
        option: u32,
        reply_type: u32,
        length: u32,
    ) -> io::Result<()> {
        let h = OptionReplyHeader {
            option,
            reply_type,
            length,
        };
        self.raw(&h.encode())
    }

    /// One option reply with `payload`.
    pub fn option_reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) -> io::Result<()> {
        self.option_reply_header(option, reply_type, payload.len() as u32)?;
        self.raw(payload)
    }

    /// `NBD_REP_ACK` to `option`.
    pub fn ack(&mut self, option: u32) -> io::Result<()> {
        self.option_reply(option, NBD_REP_ACK, &[])
    }

    /// `NBD_REP_INFO` to `option`.
    pub fn info(&mut self, option: u32, info: &Info) -> io::Result<()> {
        self.option_reply(option, NBD_REP_INFO, &info.encode())
    }

    /// `NBD_REP_META_CONTEXT` to `option`: context `id` is `name`.
    pub fn meta_context(&mut self, option: u32, id: u32, name: &str) -> io::Result<()> {
        self.option_reply(
            option,
            NBD_REP_META_CONTEXT,
            &encode_meta_context_reply(id, name),
        )
    }

    /// The reply to `NBD_OPT_EXPORT_NAME`, with the 124 zero bytes unless
    /// `no_zeroes`.
    pub fn export_name_reply(&mut self, size: u64, flags: u16, no_zeroes: bool) -> io::Result<()> {
        self.raw(&ExportNameReply { size, flags }.encode())?;
        if !no_zeroes {
            self.raw(&[0u8; EXPORT_NAME_PADDING])?;
        }
        Ok(())
    }

    /// Greet and answer options as a forgiving server of `export` would,
    /// until `NBD_OPT_GO` succeeds (`true`: transmission starts) or the
    /// client aborts or hangs up (`false`). Options it does not know, and
    /// the ones `export` does not offer, get `NBD_REP_ERR_UNSUP`.
    pub fn negotiate(&mut self, export: &Export) -> io::Result<bool> {
        self.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)?;
        self.client_flags()?;
        self.see_extended = export.extended;
        loop {
            let (opt, data) = match self.option() {
                Ok(o) => o,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e),
            };
            match opt {
                NBD_OPT_EXTENDED_HEADERS if export.extended && !self.extended => {
                    self.set_extended();
                    self.ack(opt)?;
                }
                NBD_OPT_STRUCTURED_REPLY if export.structured && !self.extended => {
                    self.structured = true;
                    self.ack(opt)?;
                }
                NBD_OPT_SET_META_CONTEXT if self.structured && export.base_allocation.is_some() => {
                    let (_, queries) = decode_meta_context_payload(&data).map_err(invalid)?;
                    if let Some(id) = export.base_allocation {
                        if queries.iter().any(|q| q == BASE_ALLOCATION) {
                            self.context = Some(id);
                            self.meta_context(opt, id, BASE_ALLOCATION)?;
                        }
                    }
                    self.ack(opt)?;
                }
                NBD_OPT_GO => {
                    let (name, _) = decode_go_payload(&data).map_err(invalid)?;
                    if name != export.name {
                        self.option_reply(opt, NBD_REP_ERR_UNKNOWN, b"no such export")?;
                        continue;
                    }
                    self.go_replies(opt, export)?;
                    return Ok(true);
                }
                NBD_OPT_ABORT => {
                    let _ = self.ack(opt);
                    return Ok(false);
                }
                _ => self.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?,
            }
        }
    }

    fn go_replies(&mut self, opt: u32, export: &Export) -> io::Result<()> {
        if let Some((minimum, preferred, maximum)) = export.block_size {
            let i = Info::BlockSize {
                minimum,
                preferred,
                maximum,
            };
            self.info(opt, &i)?;
        }
        let i = Info::Export {
            size: export.size,
            flags: export.flags,
        };
        self.info(opt, &i)?;
        self.ack(opt)
    }

    /// The handshake nbdcp's client does, checked step by step (panicking
    /// on any difference): fixed newstyle without zeroes,
    /// `NBD_OPT_EXTENDED_HEADERS` (agreed if `export` says so), else
    /// `NBD_OPT_STRUCTURED_REPLY`, then (with structured replies)
    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation` of `export`'s
    /// name, then `NBD_OPT_GO` for it asking for `NBD_INFO_BLOCK_SIZE`;
    /// answered as `export` says.
    pub fn serve_go(&mut self, export: &Export) -> io::Result<()> {
        self.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)?;
        assert_eq!(
            self.client_flags()?,
            NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        );
        self.see_extended = true;
        let (opt, data) = self.option()?;
        assert_eq!((opt, data.len()), (NBD_OPT_EXTENDED_HEADERS, 0));
        if export.extended {
            // Extended headers imply structured replies: no
            // NBD_OPT_STRUCTURED_REPLY follows.
            self.set_extended();
            self.ack(opt)?;
        } else {
            self.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            let (opt, data) = self.option()?;
            assert_eq!((opt, data.len()), (NBD_OPT_STRUCTURED_REPLY, 0));
            if !export.structured {
                self.option_reply(opt, NBD_REP_ERR_UNSUP, &[])?;
            } else {
                self.structured = true;
                self.ack(opt)?;
            }
        }
        if self.structured {
            let (opt, data) = self.option()?;
            assert_eq!(opt, NBD_OPT_SET_META_CONTEXT);
            let (name, queries) = decode_meta_context_payload(&data).unwrap();
            assert_eq!(name, export.name);
            assert_eq!(queries, vec![BASE_ALLOCATION.to_string()]);
            if let Some(id) = export.base_allocation {
                self.context = Some(id);
                self.meta_context(opt, id, BASE_ALLOCATION)?;
            }
            self.ack(opt)?;
        }
        let (opt, data) = self.option()?;
        assert_eq!(opt, NBD_OPT_GO);
        let (name, reqs) = decode_go_payload(&data).unwrap();
        assert_eq!(name, export.name);
        assert_eq!(reqs, vec![NBD_INFO_BLOCK_SIZE]);
        self.go_replies(opt, export)
    }

    // -----------------------------------------------------------------
    // Transmission

    /// Read the next request, with a write's payload (refusing more than
    /// 64 MiB); `None` once the client has hung up.
    pub fn request(&mut self) -> io::Result<Option<(Request, Vec<u8>)>> {
        match self.next_request(None)? {
            Next::Request(r, payload) => Ok(Some((r, payload))),
            Next::Idle => unreachable!("no idle time given"),
            Next::Closed => Ok(None),
        }
    }

    /// Read the next request like [`Peer::request`], but give up with
    /// [`Next::Idle`] if none starts within `idle` (when given).
    pub fn next_request(&mut self, idle: Option<Duration>) -> io::Result<Next> {
        let mut h = [0u8; EXTENDED_REQUEST_HEADER_LEN];
        let hlen = if self.extended {
            EXTENDED_REQUEST_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        };
        let before = self.stream.read_timeout()?;
        if idle.is_some() {
            self.stream.set_read_timeout(idle)?;
        }
        let first = self.stream.read(&mut h[..1]);
        if idle.is_some() {
            self.stream.set_read_timeout(before)?;
        }
        match first {
            Ok(0) => return Ok(Next::Closed),
            Ok(_) => {}
            Err(e)
                if idle.is_some()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return Ok(Next::Idle);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Next::Closed),
            Err(e) => return Err(e),
        }
        match self.stream.read_exact(&mut h[1..hlen]) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(Next::Closed);
            }
            Err(e) => return Err(e),
        }
        let (r, wide) = if self.extended {
            decode_extended_request(&h).map_err(invalid)?
        } else {
            let r = Request::decode(&h[..hlen]).map_err(invalid)?;
            (r, r.length.into())
        };
        let mut payload = Vec::new();
        if r.command == NBD_CMD_WRITE {
            if wide > u64::from(MAX_WRITE) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "write too long"));
            }
            payload = vec![0u8; r.length as usize];
            self.stream.read_exact(&mut payload)?;
        }
        self.requests += 1;
        if let Some(s) = &self.state {
            s.log_request(self.connection, r);
        }
        Ok(Next::Request(r, payload))
    }

    /// Requests read on this connection so far.
    pub fn requests(&self) -> usize {
        self.requests
    }

    /// A simple reply, followed by `data` (for a successful read). With
    /// extended headers, which forbid simple replies, the same answer as
    /// one final chunk instead (a read's data included).
    pub fn simple_reply(&mut self, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
        if self.extended {
            return match (error, data.is_empty()) {
                (0, true) => self.done(cookie),
                (0, false) => Err(io::Error::other(
                    "simple read reply with extended headers; use data()",
                )),
                (e, _) => self.error(cookie, NBD_REPLY_FLAG_DONE, e, "", None),
            };
        }
        self.raw(&SimpleReply { error, cookie }.encode())?;
        self.raw(data)
    }

    /// A structured reply chunk header claiming `length` bytes of payload,
    /// which the caller sends (or not) with [`Peer::raw`]: for peers that
    /// lie.
    pub fn chunk_header(
        &mut self,
        cookie: u64,
        flags: u16,
        chunk_type: u16,
        length: u32,
    ) -> io::Result<()> {
        if self.extended {
            let h = encode_extended_chunk_header(flags, chunk_type, cookie, 0, length.into());
            return self.raw(&h);
        }
        let h = ChunkHeader {
            flags,
            chunk_type,
            cookie,
            length,
        };
        self.raw(&h.encode())
    }

    /// A structured reply chunk with `payload`.
    pub fn chunk(
        &mut self,
        cookie: u64,
        flags: u16,
        chunk_type: u16,
        payload: &[u8],
    ) -> io::Result<()> {
        self.chunk_header(cookie, flags, chunk_type, payload.len() as u32)?;
        self.raw(payload)
    }

    /// An `OFFSET_DATA` chunk: `data` at `offset`.
    pub fn data(&mut self, cookie: u64, flags: u16, offset: u64, data: &[u8]) -> io::Result<()> {
        let prefix = encode_offset_data_prefix(offset);
        let length = (prefix.len() + data.len()) as u32;
        self.chunk_header(cookie, flags, NBD_REPLY_TYPE_OFFSET_DATA, length)?;
        self.raw(&prefix)?;
        self.raw(data)
    }

    /// An `OFFSET_HOLE` chunk: `length` zero bytes at `offset`.
    pub fn hole(&mut self, cookie: u64, flags: u16, offset: u64, length: u32) -> io::Result<()> {
        let hole = OffsetHole { offset, length };
        self.chunk(cookie, flags, NBD_REPLY_TYPE_OFFSET_HOLE, &hole.encode())
    }

    /// An error chunk (`ERROR_OFFSET` when there is an `offset`, else
    /// `ERROR`).
    pub fn error(
        &mut self,
        cookie: u64,
        flags: u16,
        error: u32,
        message: &str,
        offset: Option<u64>,
    ) -> io::Result<()> {
        let e = ErrorChunk {
            error,
            message: message.to_string(),
            offset,
        };
        let (chunk_type, payload) = e.encode();
        self.chunk(cookie, flags, chunk_type, &payload)
    }

    /// A `BLOCK_STATUS` chunk for the `base:allocation` context agreed in
    /// the handshake: `(length, flags)` extents.
    pub fn block_status(
        &mut self,
        cookie: u64,
        flags: u16,
        extents: &[(u32, u32)],
    ) -> io::Result<()> {
        let id = self.context.expect("no base:allocation context was agreed");
        self.block_status_in(cookie, flags, id, extents)
    }

    /// A `BLOCK_STATUS` chunk for context `id` (`BLOCK_STATUS_EXT` with
    /// extended headers).
    pub fn block_status_in(
        &mut self,
        cookie: u64,
        flags: u16,
        id: u32,
        extents: &[(u32, u32)],
    ) -> io::Result<()> {
        if self.extended {
            let wide: Vec<(u64, u32)> = extents.iter().map(|&(l, f)| (l.into(), f)).collect();
            return self.block_status_ext(cookie, flags, id, &wide);
        }
        let descriptors: Vec<BlockDescriptor> = extents
            .iter()
            .map(|&(length, flags)| BlockDescriptor { length, flags })
            .collect();
        self.chunk(
            cookie,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            &encode_block_status(id, &descriptors),
        )
    }

    /// A `BLOCK_STATUS_EXT` chunk for context `id`, with 64-bit extent
    /// lengths (only meaningful with extended headers).
    pub fn block_status_ext(
        &mut self,
        cookie: u64,
        flags: u16,
        id: u32,
        extents: &[(u64, u32)],
    ) -> io::Result<()> {
        let descriptors: Vec<ExtendedBlockDescriptor> = extents
            .iter()
            .map(|&(length, f)| ExtendedBlockDescriptor {
                length,
                flags: f.into(),
            })
            .collect();
        self.chunk(
            cookie,
            flags,
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            &encode_block_status_ext(id, &descriptors),
        )
    }

    /// The `NBD_REPLY_TYPE_NONE` chunk that ends a reply.
    pub fn done(&mut self, cookie: u64) -> io::Result<()> {
        self.chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, &[])
    }

    /// Serve requests on a negotiated connection as a well-behaved
    /// read-write server of [`pattern_at`] (writes are accepted and
    /// dropped; block status says all data), letting `hook` take over any
    /// request first. The hook's `usize` counts requests on this
    /// connection, from 1.
    pub fn serve(
        &mut self,
        hook: &dyn Fn(&mut Peer, &Request, usize) -> io::Result<Hook>,
    ) -> io::Result<()> {
        while let Some((r, _payload)) = self.request()? {
            let n = self.requests;
            match hook(self, &r, n)? {
                Hook::Done => continue,
                Hook::Close => return Ok(()),
                Hook::Stall => {
                    self.drain();
                    return Ok(());
                }
                Hook::Pass => {}
            }
            match r.command {
                NBD_CMD_DISC => return Ok(()),
                NBD_CMD_READ => {
                    let data = pattern_at(r.offset, r.length as usize);
                    if self.structured {
                        self.data(r.cookie, NBD_REPLY_FLAG_DONE, r.offset, &data)?;
                    } else {
                        self.simple_reply(r.cookie, 0, &data)?;
                    }
                }
                NBD_CMD_BLOCK_STATUS if self.context.is_some() => {
                    self.block_status(r.cookie, NBD_REPLY_FLAG_DONE, &[(r.length, 0)])?;
                }
                NBD_CMD_BLOCK_STATUS => self.simple_reply(r.cookie, NBD_EINVAL, &[])?,
                _ => self.simple_reply(r.cookie, 0, &[])?,
            }
        }
        Ok(())
    }
}
