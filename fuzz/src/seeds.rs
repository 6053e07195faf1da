//! Seed inputs for every target, built with nbdcp's own encoders: valid
//! messages, complete handshakes and reply streams, plus a few of the
//! classic ways servers go wrong. `examples/gen_seeds.rs` writes them out
//! for libFuzzer; the tests replay them directly.

use nbdcp_nbd::wire::*;

use crate::{Op, REPLIES_CONFIG_LEN, RepliesConfig, option_reply};

/// Every seed: (target, name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut v = Vec::new();
    for (n, d) in wire_decoders() {
        v.push(("wire_decoders", n, d));
    }
    for (n, d) in handshake() {
        v.push(("handshake", n, d));
    }
    for (n, d) in replies_ok().into_iter().chain(replies_bad()) {
        v.push(("replies", n, d));
    }
    for (n, d) in uri() {
        v.push(("uri", n, d));
    }
    v
}

fn named(items: Vec<(&str, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    items.into_iter().map(|(n, d)| (n.to_string(), d)).collect()
}

/// One of each message `wire.rs` decodes.
pub fn wire_decoders() -> Vec<(String, Vec<u8>)> {
    let mut oldstyle = NBD_MAGIC.to_be_bytes().to_vec();
    oldstyle.extend_from_slice(&NBD_CLISERV_MAGIC.to_be_bytes());
    let chunk = |chunk_type: u16, length: u32| {
        ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type,
            cookie: 1,
            length,
        }
        .encode()
        .to_vec()
    };
    let error = ErrorChunk {
        error: NBD_EIO,
        message: "disk on fire".into(),
        offset: Some(4096),
    };
    let (t, e) = error.encode();
    let mut typed_error = t.to_be_bytes().to_vec();
    typed_error.extend_from_slice(&e);
    let descs = [
        BlockDescriptor {
            length: 4096,
            flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
        },
        BlockDescriptor {
            length: 512,
            flags: 0,
        },
    ];
    named(vec![
        ("greeting", Greeting::encode_newstyle(3).to_vec()),
        ("greeting_oldstyle", oldstyle),
        ("client_flags", encode_client_flags(3).to_vec()),
        (
            "option_header",
            OptionHeader {
                option: NBD_OPT_GO,
                length: 10,
            }
            .encode()
            .to_vec(),
        ),
        (
            "option_reply_header",
            OptionReplyHeader {
                option: NBD_OPT_GO,
                reply_type: NBD_REP_INFO,
                length: 12,
            }
            .encode()
            .to_vec(),
        ),
        (
            "go_payload",
            encode_go_payload("export", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]).unwrap(),
        ),
        (
            "meta_context_payload",
            encode_meta_context_payload("export", &[BASE_ALLOCATION, "qemu:dirty-bitmap:b"])
                .unwrap(),
        ),
        (
            "info_export",
            Info::Export {
                size: 1 << 30,
                flags: 0x1ff,
            }
            .encode(),
        ),
        (
            "info_block_size",
            Info::BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 25,
            }
            .encode(),
        ),
        ("info_name", [&[0u8, 1][..], b"name"].concat()),
        (
            "meta_context_reply",
            encode_meta_context_reply(7, BASE_ALLOCATION),
        ),
        (
            "export_name_reply",
            ExportNameReply {
                size: 1 << 20,
                flags: 3,
            }
            .encode()
            .to_vec(),
        ),
        (
            "request",
            Request {
                flags: NBD_CMD_FLAG_FUA,
                command: NBD_CMD_WRITE,
                cookie: 9,
                offset: 1 << 32,
                length: 65536,
            }
            .encode()
            .to_vec(),
        ),
        (
            "simple_reply",
            SimpleReply {
                error: NBD_ENOSPC,
                cookie: 3,
            }
            .encode()
            .to_vec(),
        ),
        ("chunk_none", chunk(NBD_REPLY_TYPE_NONE, 0)),
        ("chunk_data", chunk(NBD_REPLY_TYPE_OFFSET_DATA, 8 + 512)),
        ("chunk_hole", chunk(NBD_REPLY_TYPE_OFFSET_HOLE, 12)),
        ("chunk_block_status", chunk(NBD_REPLY_TYPE_BLOCK_STATUS, 20)),
        ("chunk_error", chunk(NBD_REPLY_TYPE_ERROR, 10)),
        (
            "offset_hole",
            OffsetHole {
                offset: 512,
                length: 4096,
            }
            .encode()
            .to_vec(),
        ),
        ("error_chunk", e),
        ("typed_error_chunk", typed_error),
        ("block_status", encode_block_status(7, &descs)),
        ("descriptor", descs[0].encode().to_vec()),
        ("text", b" server said:\tno\r\n\x1b[31m \xff".to_vec()),
    ])
}

/// Server sides of handshakes: successful ones of every shape, refusals,
/// and non-NBD peers.
pub fn handshake() -> Vec<(String, Vec<u8>)> {
    let greet = |flags: u16| Greeting::encode_newstyle(flags).to_vec();
    let modern = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
    let export = Info::Export {
        size: 1 << 30,
        flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
    }
    .encode();
    let mut v = Vec::new();
    for bits in 0..8u8 {
        let cfg = RepliesConfig::decode(&[bits]);
        v.push((format!("scripted_{bits}"), cfg.handshake_script()));
    }

    // Everything optional refused; NBD_OPT_GO unknown, so EXPORT_NAME.
    for (name, flags) in [
        ("export_name_no_zeroes", modern),
        ("export_name_zeroes", NBD_FLAG_FIXED_NEWSTYLE),
    ] {
        let mut b = greet(flags);
        option_reply(&mut b, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_UNSUP, &[]);
        option_reply(&mut b, NBD_OPT_GO, NBD_REP_ERR_UNSUP, &[]);
        b.extend_from_slice(
            &ExportNameReply {
                size: 1 << 20,
                flags: NBD_FLAG_HAS_FLAGS,
            }
            .encode(),
        );
        if flags & NBD_FLAG_NO_ZEROES == 0 {
            b.extend_from_slice(&[0; EXPORT_NAME_PADDING]);
        }
        v.push((name.to_string(), b));
    }

    // Meta context refused with a message; extra infos in NBD_OPT_GO.
    let mut b = greet(modern);
    option_reply(&mut b, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]);
    let other = encode_meta_context_reply(3, "qemu:allocation-depth");
    option_reply(
        &mut b,
        NBD_OPT_SET_META_CONTEXT,
        NBD_REP_META_CONTEXT,
        &other,
    );
    option_reply(
        &mut b,
        NBD_OPT_SET_META_CONTEXT,
        NBD_REP_ERR_POLICY,
        b"no contexts for you",
    );
    option_reply(&mut b, NBD_OPT_GO, NBD_REP_INFO, &[0, 2, b'h', b'i']);
    let bad_bs = Info::BlockSize {
        minimum: 3,
        preferred: 4096,
        maximum: 1 << 25,
    };
    option_reply(&mut b, NBD_OPT_GO, NBD_REP_INFO, &bad_bs.encode());
    option_reply(&mut b, NBD_OPT_GO, NBD_REP_INFO, &export);
    option_reply(&mut b, NBD_OPT_GO, NBD_REP_ACK, &[]);
    v.push(("meta_refused_extra_info".to_string(), b));

    // Refusals.
    let mut b = greet(modern);
    option_reply(
        &mut b,
        NBD_OPT_STRUCTURED_REPLY,
        NBD_REP_ERR_TLS_REQD,
        b"TLS first",
    );
    v.push(("tls_required".to_string(), b));
    let mut b = greet(modern);
    option_reply(&mut b, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[]);
    option_reply(&mut b, NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[]);
    option_reply(&mut b, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, b"no such export");
    v.push(("unknown_export".to_string(), b));
    let mut b = greet(modern);
    option_reply(&mut b, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_SHUTDOWN, &[]);
    v.push(("shutdown".to_string(), b));

    // Not (modern) NBD at all.
    let mut old = NBD_MAGIC.to_be_bytes().to_vec();
    old.extend_from_slice(&NBD_CLISERV_MAGIC.to_be_bytes());
    old.extend_from_slice(&[0; 136]);
    v.push(("oldstyle".to_string(), old));
    v.push(("unfixed_newstyle".to_string(), greet(0)));
    v.push(("ssh".to_string(), b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()));
    v
}

/// Appends replies for a transmission-phase exchange.
struct Replies {
    structured: bool,
    b: Vec<u8>,
}

impl Replies {
    fn chunk(&mut self, flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) {
        let h = ChunkHeader {
            flags,
            chunk_type,
            cookie,
            length: payload.len() as u32,
        };
        self.b.extend_from_slice(&h.encode());
        self.b.extend_from_slice(payload);
    }

    fn simple(&mut self, error: u32, cookie: u64) {
        self.b
            .extend_from_slice(&SimpleReply { error, cookie }.encode());
    }

    /// Success for a request without data.
    fn ok(&mut self, cookie: u64, style: usize) {
        if self.structured && style % 2 == 1 {
            self.chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, &[]);
        } else {
            self.simple(0, cookie);
        }
    }

    /// A full successful read of `[offset, offset + len)`, in one of a few
    /// shapes.
    fn read(&mut self, cookie: u64, offset: u64, len: usize, style: usize) {
        let data = |n: usize| (0..n).map(|i| i as u8).collect::<Vec<u8>>();
        let with_offset = |o: u64, d: &[u8]| [&o.to_be_bytes()[..], d].concat();
        if !self.structured {
            self.simple(0, cookie);
            self.b.extend_from_slice(&data(len));
            return;
        }
        let half = len / 2;
        match style % 4 {
            0 => self.chunk(
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_OFFSET_DATA,
                cookie,
                &with_offset(offset, &data(len)),
            ),
            1 => {
                // Second half first, then the first half as a hole.
                let second = with_offset(offset + half as u64, &data(len - half));
                self.chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &second);
                let hole = OffsetHole {
                    offset,
                    length: half as u32,
                };
                self.chunk(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_HOLE,
                    cookie,
                    &hole.encode(),
                );
            }
            2 => {
                let hole = OffsetHole {
                    offset,
                    length: len as u32,
                };
                self.chunk(0, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, &hole.encode());
                self.chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, &[]);
            }
            _ => {
                let first = with_offset(offset, &data(half));
                self.chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &first);
                let second = with_offset(offset + half as u64, &data(len - half));
                self.chunk(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    &second,
                );
            }
        }
    }

    /// Extents covering `len` bytes, plus (some styles) a chunk for a
    /// context nobody asked for.
    fn block_status(&mut self, cookie: u64, len: u64, style: usize) {
        let mut descs = Vec::new();
        let mut left = len;
        let mut i = 0u32;
        while left > 0 {
            let n = left.min(4096 << (i % 3)) as u32;
            descs.push(BlockDescriptor {
                length: n,
                flags: if i.is_multiple_of(2) {
                    0
                } else {
                    NBD_STATE_HOLE | NBD_STATE_ZERO
                },
            });
            left -= u64::from(n);
            i += 1;
        }
        if style % 2 == 1 {
            let other = encode_block_status(99, &descs[..1]);
            self.chunk(0, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, &other);
        }
        let payload = encode_block_status(crate::CONTEXT_ID, &descs);
        self.chunk(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &payload,
        );
    }

    /// A server error for `cookie`.
    fn error(&mut self, cookie: u64, offset: u64, style: usize) {
        if !self.structured || style.is_multiple_of(3) {
            self.simple(NBD_EIO, cookie);
            return;
        }
        let e = ErrorChunk {
            error: if style % 3 == 1 {
                NBD_EIO
            } else {
                NBD_ESHUTDOWN
            },
            message: "bad sector".into(),
            offset: (style % 3 == 2).then_some(offset),
        };
        let (t, p) = e.encode();
        self.chunk(NBD_REPLY_FLAG_DONE, t, cookie, &p);
    }
}

fn configs() -> Vec<RepliesConfig> {
    let mut v = Vec::new();
    for (i, op) in Op::ALL.iter().enumerate() {
        for flags in [0u8, 1, 3, 7, 0x13, 0x0b] {
            let mut cfg = RepliesConfig::decode(&[flags, i as u8, 7, 0b0111]);
            if *op == Op::Flush || flags == 3 {
                cfg.count_sel = 0;
            }
            v.push(cfg);
        }
    }
    v
}

/// Reply streams from a server that does everything right.
pub fn replies_ok() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for (k, cfg) in configs().into_iter().enumerate() {
        let op = cfg.op();
        let has_bs = cfg.structured && cfg.base_allocation;
        if !has_bs && matches!(op, Op::BlockStatus | Op::Sequence | Op::EndOfRange) {
            continue;
        }
        if cfg.read_only && op == Op::Write {
            continue;
        }
        let mut r = Replies {
            structured: cfg.structured,
            b: cfg.encode().to_vec(),
        };
        let (len, count) = (cfg.request_len(), cfg.count());
        let total = (len * count) as u64;
        let mut cookie = 1;
        let read_at = |r: &mut Replies, cookie: &mut u64, base: u64| {
            for i in 0..count {
                r.read(*cookie, base + (i * len) as u64, len, k + i);
                *cookie += 1;
            }
        };
        match op {
            Op::Read => read_at(&mut r, &mut cookie, 0),
            Op::BlockStatus => r.block_status(1, total, k),
            Op::Write => {
                for c in 1..=count as u64 + 2 {
                    r.ok(c, k + c as usize);
                }
            }
            Op::Flush => r.ok(1, k),
            Op::Sequence => {
                read_at(&mut r, &mut cookie, 0);
                r.block_status(cookie, total, k);
                r.ok(cookie + 1, k);
            }
            Op::EndOfRange => {
                let base = u64::MAX - total + 1;
                read_at(&mut r, &mut cookie, base);
                r.block_status(cookie, total, k);
            }
        }
        v.push((format!("ok_{k:02}_{op:?}_{:02x}", r.b[0]), r.b));
    }
    v
}

/// Reply streams with server errors and protocol violations.
pub fn replies_bad() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    let cfg = RepliesConfig::decode(&[3, 4, 7, 0b0101]);
    let (len, count) = (cfg.request_len(), cfg.count());
    let start = |structured: bool| Replies {
        structured,
        b: {
            let mut c = cfg;
            c.structured = structured;
            c.encode().to_vec()
        },
    };
    for style in 0..3 {
        // A read fails, then block status and flush carry on.
        let mut r = start(true);
        r.error(1, 0, style);
        r.read(2, len as u64, len, style);
        r.block_status(3, (len * count) as u64, style);
        r.ok(4, style);
        v.push((format!("read_error_{style}"), r.b));
    }
    // Errors with offsets, at the very end of the 64-bit offset range.
    let mut end = cfg;
    end.op = Op::ALL.iter().position(|&o| o == Op::EndOfRange).unwrap() as u8;
    let total = (len * count) as u64;
    let base = u64::MAX - total + 1;
    for style in 0..2 {
        let mut r = Replies {
            structured: true,
            b: end.encode().to_vec(),
        };
        for i in 0..count as u64 {
            let at = base + i * len as u64 + if style == 0 { 0 } else { len as u64 - 1 };
            r.error(i + 1, at, 2);
        }
        r.error(count as u64 + 1, u64::MAX, 2);
        v.push((format!("end_of_range_errors_{style}"), r.b));
    }
    // Unknown cookie, bad magic, short read, overlapping chunks, chunk
    // outside the request, zero-length extent, extents beyond the request.
    let mut r = start(true);
    r.read(42, 0, len, 0);
    v.push(("unknown_cookie".to_string(), r.b));
    let mut r = start(false);
    r.b.extend_from_slice(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    v.push(("bad_magic".to_string(), r.b));
    let mut r = start(true);
    let short = [&0u64.to_be_bytes()[..], &[1, 2, 3]].concat();
    r.chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1, &short);
    v.push(("short_read".to_string(), r.b));
    let mut r = start(true);
    let hole = OffsetHole {
        offset: 0,
        length: 512,
    };
    r.chunk(0, NBD_REPLY_TYPE_OFFSET_HOLE, 1, &hole.encode());
    r.chunk(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_OFFSET_HOLE,
        1,
        &hole.encode(),
    );
    v.push(("overlap".to_string(), r.b));
    let mut r = start(true);
    let outside = OffsetHole {
        offset: u64::MAX - 10,
        length: 512,
    };
    r.chunk(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_OFFSET_HOLE,
        1,
        &outside.encode(),
    );
    v.push(("outside".to_string(), r.b));
    let mut c = cfg;
    c.op = 1;
    let mut r = Replies {
        structured: true,
        b: c.encode().to_vec(),
    };
    let zero = [BlockDescriptor {
        length: 0,
        flags: 0,
    }];
    r.chunk(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        1,
        &encode_block_status(crate::CONTEXT_ID, &zero),
    );
    v.push(("zero_extent".to_string(), r.b));
    let mut r = Replies {
        structured: true,
        b: c.encode().to_vec(),
    };
    r.block_status(1, (len * count) as u64 + 65536, 0);
    v.push(("extents_beyond".to_string(), r.b));
    // Truncated in the middle of a data chunk.
    let mut r = start(true);
    r.read(1, 0, len, 0);
    r.b.truncate(REPLIES_CONFIG_LEN + 40);
    v.push(("truncated".to_string(), r.b));
    v
}

/// URIs of every shape the parser knows, good and bad.
pub fn uri() -> Vec<(String, Vec<u8>)> {
    [
        "nbd://localhost",
        "nbd://example.com:10810/disk",
        "nbd://[::1]:1234/a/b%20c",
        "nbd://user@host/export?tls-certificates=/x",
        "nbd+unix:///export?socket=/tmp/nbd.sock",
        "nbd+unix:///?socket=%00abstract&x-opt=1",
        "NBD+UNIX:///e?socket=/s#frag",
        "nbds://host/e",
        "nbd+vsock://1:2/e",
        "nbds+vsock://alice@/e?tls-psk-file=/k",
        "nbd+ssh://bob@[::1]:2222/e?socket=/run/s%20s",
        "nbds+ssh://h/?nbd-port=10810&tls-hostname=n",
        "nbd+ssh://-oProxyCommand=x/",
        "nbd://host:0/",
        "nbd://h/%ff",
        "nbd://%5B%3A%5D/%3F%23",
        "http://host/",
        "nbds://alice@host:10810/e?tls-psk-file=/k&tls-username=bob&tls-hostname=h&tls-verify-peer=off",
        "nbds+unix://a%40b@/e?socket=/s&tls-certificates=/c%20d%FF",
        "nbds://h/?tls-verify-peer=maybe&tls-hostname=",
    ]
    .iter()
    .enumerate()
    .map(|(i, s)| (format!("uri_{i:02}"), s.as_bytes().to_vec()))
    .collect()
}
