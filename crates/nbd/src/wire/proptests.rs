//! Property tests for the wire format, with a small deterministic PRNG
//! instead of a property-testing crate: thousands of random valid messages
//! of every type must decode to what was encoded, every truncation must be
//! an error (never a panic), and random corruption must never panic.

use super::*;

/// Messages generated per message type.
const CASES: usize = 2000;

/// xorshift64*: tiny, deterministic, good enough to pick test values.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn u32(&mut self) -> u32 {
        self.next() as u32
    }

    /// Mostly small or boundary values, sometimes anything.
    fn u64(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(4096),
            1 => u64::MAX - self.below(4096),
            _ => self.next(),
        }
    }

    fn nonzero_u32(&mut self) -> u32 {
        self.u32().max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A string of up to `max` bytes mixing ASCII, multi-byte UTF-8 and
    /// (if `controls`) control characters.
    fn string(&mut self, max: usize, controls: bool) -> String {
        const POOL: &[char] = &[
            'a', 'z', 'A', '0', '9', '/', ':', '-', '.', ' ', 'é', 'ß', '漢', '🦀',
        ];
        const CONTROLS: &[char] = &['\n', '\r', '\t', '\0', '\u{1b}', '\u{7f}', '\u{85}'];
        let target = match self.below(8) {
            0 => 0,
            1 => max,
            _ => self.below(max.min(64) as u64 + 1) as usize,
        };
        let mut s = String::new();
        while s.len() < target {
            let c = if controls && self.below(8) == 0 {
                self.pick(CONTROLS)
            } else {
                self.pick(POOL)
            };
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        s
    }
}

fn is_truncated<T: fmt::Debug>(r: WireResult<T>) -> bool {
    matches!(r, Err(WireError::Truncated { .. }))
}

/// Every proper prefix of a fixed-size message is `Truncated`.
fn assert_prefixes_truncated<T: fmt::Debug>(b: &[u8], decode: impl Fn(&[u8]) -> WireResult<T>) {
    for n in 0..b.len() {
        let r = decode(&b[..n]);
        assert!(is_truncated(r), "prefix of {n} of {b:02x?}");
    }
}

/// Every proper prefix of a variable-length message is an error (for
/// long messages: the first and last few, and a random sample).
fn assert_prefixes_fail<T: fmt::Debug>(
    rng: &mut Rng,
    b: &[u8],
    decode: impl Fn(&[u8]) -> WireResult<T>,
) {
    for n in prefixes(rng, b.len()) {
        let r = decode(&b[..n]);
        assert!(r.is_err(), "prefix of {n} of {b:02x?} gave {r:?}");
    }
}

/// Lengths of proper prefixes to try for a message of `len` bytes.
fn prefixes(rng: &mut Rng, len: usize) -> Vec<usize> {
    if len <= 64 {
        return (0..len).collect();
    }
    let mut v: Vec<usize> = (0..16).chain(len - 16..len).collect();
    v.extend((0..32).map(|_| rng.below(len as u64) as usize));
    v
}

/// Flip a few random bytes and decode: any result but a panic will do.
fn corrupt<T>(rng: &mut Rng, b: &[u8], decode: impl Fn(&[u8]) -> WireResult<T>) {
    if b.is_empty() {
        return;
    }
    let mut c = b.to_vec();
    for _ in 0..=rng.below(3) {
        let i = rng.below(c.len() as u64) as usize;
        c[i] ^= 1 << rng.below(8);
    }
    let _ = decode(&c);
    let cut = rng.below(c.len() as u64) as usize;
    let _ = decode(&c[cut..]);
}

#[test]
fn handshake_headers_round_trip() {
    let mut rng = Rng::new(1);
    for _ in 0..CASES {
        let flags = rng.u16();
        let g = Greeting::encode_newstyle(flags);
        assert_eq!(
            Greeting::decode(&g).unwrap(),
            Greeting::Newstyle {
                handshake_flags: flags
            }
        );
        assert_prefixes_truncated(&g, Greeting::decode);
        corrupt(&mut rng, &g, Greeting::decode);

        let f = rng.u32();
        assert_eq!(decode_client_flags(&encode_client_flags(f)).unwrap(), f);

        let h = OptionHeader {
            option: rng.u32(),
            length: rng.u32(),
        };
        let b = h.encode();
        assert_eq!(OptionHeader::decode(&b).unwrap(), h);
        assert_prefixes_truncated(&b, OptionHeader::decode);
        corrupt(&mut rng, &b, OptionHeader::decode);

        let length = rng.below(u64::from(MAX_OPTION_REPLY_PAYLOAD) + 1) as u32;
        let h = OptionReplyHeader {
            option: rng.u32(),
            reply_type: rng.u32(),
            length,
        };
        let b = h.encode();
        assert_eq!(OptionReplyHeader::decode(&b).unwrap(), h);
        assert_prefixes_truncated(&b, OptionReplyHeader::decode);
        corrupt(&mut rng, &b, OptionReplyHeader::decode);
        let too_long = OptionReplyHeader {
            length: MAX_OPTION_REPLY_PAYLOAD + 1 + rng.below(1 << 31) as u32,
            ..h
        };
        assert!(matches!(
            OptionReplyHeader::decode(&too_long.encode()),
            Err(WireError::TooLong { .. })
        ));

        let r = ExportNameReply {
            size: rng.u64(),
            flags: rng.u16(),
        };
        let b = r.encode();
        assert_eq!(ExportNameReply::decode(&b).unwrap(), r);
        assert_prefixes_truncated(&b, ExportNameReply::decode);
    }
}

#[test]
fn option_payloads_round_trip() {
    let mut rng = Rng::new(2);
    for _ in 0..CASES {
        let name = rng.string(MAX_STRING, true);
        let reqs: Vec<u16> = (0..rng.below(20)).map(|_| rng.u16()).collect();
        let b = encode_go_payload(&name, &reqs).unwrap();
        assert_eq!(decode_go_payload(&b).unwrap(), (name.clone(), reqs));
        assert_prefixes_fail(&mut rng, &b, decode_go_payload);
        let mut long = b.clone();
        long.push(rng.next() as u8);
        assert!(decode_go_payload(&long).is_err());
        corrupt(&mut rng, &b, decode_go_payload);

        let queries: Vec<String> = (0..rng.below(5))
            .map(|_| rng.string(MAX_STRING, false))
            .collect();
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        let b = encode_meta_context_payload(&name, &q).unwrap();
        assert_eq!(decode_meta_context_payload(&b).unwrap(), (name, queries));
        assert_prefixes_fail(&mut rng, &b, decode_meta_context_payload);
        let mut long = b.clone();
        long.push(rng.next() as u8);
        assert!(decode_meta_context_payload(&long).is_err());
        corrupt(&mut rng, &b, decode_meta_context_payload);

        let id = rng.u32();
        let ctx = rng.string(MAX_STRING, false);
        let b = encode_meta_context_reply(id, &ctx);
        assert_eq!(decode_meta_context_reply(&b).unwrap(), (id, ctx));
        assert_prefixes_truncated(&b[..4], decode_meta_context_reply);
        // Cutting the name may split a character: any result but a panic.
        for n in prefixes(&mut rng, b.len()) {
            let _ = decode_meta_context_reply(&b[..n]);
        }
        corrupt(&mut rng, &b, decode_meta_context_reply);
    }
    // Names past the protocol's limit are refused both ways.
    let long = "x".repeat(MAX_STRING + 1);
    assert!(encode_go_payload(&long, &[]).is_err());
    assert!(encode_meta_context_payload("", &[&long]).is_err());
    assert!(decode_meta_context_reply(&encode_meta_context_reply(1, &long)).is_err());
}

#[test]
fn info_round_trip() {
    let mut rng = Rng::new(3);
    for _ in 0..CASES {
        let info = match rng.below(3) {
            0 => Info::Export {
                size: rng.u64(),
                flags: rng.u16(),
            },
            1 => Info::BlockSize {
                minimum: rng.u32(),
                preferred: rng.u32(),
                maximum: rng.u32(),
            },
            _ => match rng.u16() {
                NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE => Info::Other(NBD_INFO_NAME),
                t => Info::Other(t),
            },
        };
        let b = info.encode();
        assert_eq!(Info::decode(&b).unwrap(), info);
        assert_prefixes_fail(&mut rng, &b, Info::decode);
        if !matches!(info, Info::Other(_)) {
            let mut long = b.clone();
            long.push(0);
            assert!(Info::decode(&long).is_err());
        }
        corrupt(&mut rng, &b, Info::decode);
    }
}

/// A chunk type and a payload length its decoder accepts.
fn valid_chunk(rng: &mut Rng) -> (u16, u32) {
    match rng.below(6) {
        0 => (NBD_REPLY_TYPE_NONE, 0),
        1 => (
            NBD_REPLY_TYPE_OFFSET_DATA,
            9 + rng.below(u64::from(MAX_DATA_PAYLOAD - 8)) as u32,
        ),
        2 => (NBD_REPLY_TYPE_OFFSET_HOLE, 12),
        3 => {
            let n = 1 + rng.below(u64::from(MAX_BLOCK_STATUS_PAYLOAD - 4) / 8) as u32;
            (NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n)
        }
        4 => (
            NBD_REPLY_TYPE_ERROR_OFFSET,
            14 + rng.below(u64::from(MAX_ERROR_PAYLOAD - 13)) as u32,
        ),
        _ => (
            NBD_REPLY_TYPE_ERROR_BIT | rng.u16(),
            6 + rng.below(u64::from(MAX_ERROR_PAYLOAD - 5)) as u32,
        ),
    }
}

#[test]
fn transmission_headers_round_trip() {
    let mut rng = Rng::new(4);
    for _ in 0..CASES {
        let r = Request {
            flags: rng.u16(),
            command: rng.u16(),
            cookie: rng.u64(),
            offset: rng.u64(),
            length: rng.u32(),
        };
        let b = r.encode();
        assert_eq!(Request::decode(&b).unwrap(), r);
        assert_prefixes_truncated(&b, Request::decode);
        corrupt(&mut rng, &b, Request::decode);

        let r = SimpleReply {
            error: rng.u32(),
            cookie: rng.u64(),
        };
        let b = r.encode();
        assert_eq!(SimpleReply::decode(&b).unwrap(), r);
        assert_eq!(reply_header_len(&b).unwrap(), SIMPLE_REPLY_LEN);
        assert_prefixes_truncated(&b, SimpleReply::decode);
        corrupt(&mut rng, &b, SimpleReply::decode);

        let (chunk_type, length) = valid_chunk(&mut rng);
        let h = ChunkHeader {
            flags: rng.u16(),
            chunk_type,
            cookie: rng.u64(),
            length,
        };
        let b = h.encode();
        assert_eq!(ChunkHeader::decode(&b).unwrap(), h, "{h:?}");
        assert_eq!(reply_header_len(&b).unwrap(), STRUCTURED_REPLY_HEADER_LEN);
        assert_prefixes_truncated(&b, ChunkHeader::decode);
        assert_prefixes_truncated(&b[..4], reply_header_len);
        corrupt(&mut rng, &b, ChunkHeader::decode);
        corrupt(&mut rng, &b, reply_header_len);

        // Lengths a chunk's type does not allow never decode.
        let bad = ChunkHeader {
            length: rng.u32(),
            ..h
        };
        if check_chunk_length(bad.chunk_type, bad.length).is_err() {
            assert!(ChunkHeader::decode(&bad.encode()).is_err());
        }
    }
}

#[test]
fn chunk_payloads_round_trip() {
    let mut rng = Rng::new(5);
    for _ in 0..CASES {
        let h = OffsetHole {
            offset: rng.u64(),
            length: rng.nonzero_u32(),
        };
        let b = h.encode();
        assert_eq!(OffsetHole::decode(&b).unwrap(), h);
        assert_prefixes_truncated(&b, OffsetHole::decode);
        corrupt(&mut rng, &b, OffsetHole::decode);

        let offset = rng.u64();
        let mut data = offset.to_be_bytes().to_vec();
        data.resize(8 + rng.below(64) as usize, 0xa5);
        assert_eq!(decode_offset_data_prefix(&data).unwrap(), offset);
        assert_prefixes_truncated(&data[..8], decode_offset_data_prefix);

        // The message comes back sanitized, so compare with that.
        let message = rng.string(2 * MAX_STRING, true);
        let e = ErrorChunk {
            error: rng.nonzero_u32(),
            message: message.clone(),
            offset: (rng.below(2) == 0).then(|| rng.u64()),
        };
        let (t, b) = e.encode();
        let want = ErrorChunk {
            message: sanitize(message.as_bytes()),
            ..e
        };
        let decode = |buf: &[u8]| ErrorChunk::decode(t, buf);
        assert_eq!(decode(&b).unwrap(), want);
        assert_prefixes_fail(&mut rng, &b, decode);
        corrupt(&mut rng, &b, decode);
        corrupt(&mut rng, &b, |buf| {
            ErrorChunk::decode(NBD_REPLY_TYPE_ERROR_BIT | 77, buf)
        });

        let descs: Vec<BlockDescriptor> = (0..1 + rng.below(64))
            .map(|_| BlockDescriptor {
                length: rng.nonzero_u32(),
                flags: rng.u32(),
            })
            .collect();
        let id = rng.u32();
        let b = encode_block_status(id, &descs);
        assert_eq!(decode_block_status(&b).unwrap(), (id, descs.clone()));
        // A prefix ending between descriptors is a shorter valid payload.
        for n in prefixes(&mut rng, b.len()) {
            let r = decode_block_status(&b[..n]);
            if n >= 12 && (n - 4) % 8 == 0 {
                assert_eq!(r.unwrap(), (id, descs[..(n - 4) / 8].to_vec()));
            } else {
                assert!(r.is_err(), "prefix of {n} gave {r:?}");
            }
        }
        corrupt(&mut rng, &b, decode_block_status);
        let d = descs[0].encode();
        assert_eq!(BlockDescriptor::decode(&d).unwrap(), descs[0]);
        assert_prefixes_truncated(&d, BlockDescriptor::decode);
    }
}

/// Random bytes, of random lengths, through every decoder: errors are
/// fine, panics are not.
#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng::new(6);
    let mut buf = Vec::new();
    for _ in 0..20 * CASES {
        buf.clear();
        let len = rng.below(64) as usize;
        buf.extend((0..len).map(|_| rng.next() as u8));
        // Start with a real magic now and then, to get past the check.
        if len >= 8 && rng.below(2) == 0 {
            let magic = rng.pick(&[
                NBD_MAGIC,
                NBD_OPTS_MAGIC,
                NBD_REP_MAGIC,
                u64::from(NBD_REQUEST_MAGIC) << 32,
                u64::from(NBD_SIMPLE_REPLY_MAGIC) << 32,
                u64::from(NBD_STRUCTURED_REPLY_MAGIC) << 32,
            ]);
            buf[..8].copy_from_slice(&magic.to_be_bytes());
        }
        let b = &buf[..];
        let _ = check_init_magic(b);
        let _ = Greeting::decode(b);
        let _ = decode_client_flags(b);
        let _ = OptionHeader::decode(b);
        let _ = OptionReplyHeader::decode(b);
        let _ = decode_go_payload(b);
        let _ = decode_meta_context_payload(b);
        let _ = Info::decode(b);
        let _ = decode_meta_context_reply(b);
        let _ = ExportNameReply::decode(b);
        let _ = Request::decode(b);
        let _ = SimpleReply::decode(b);
        let _ = reply_header_len(b);
        let _ = ChunkHeader::decode(b);
        let _ = decode_offset_data_prefix(b);
        let _ = OffsetHole::decode(b);
        let _ = ErrorChunk::decode(rng.u16(), b);
        let _ = BlockDescriptor::decode(b);
        let _ = decode_block_status(b);
        let _ = check_chunk_length(rng.u16(), rng.u32());
        let s = sanitize(b);
        assert!(!s.chars().any(char::is_control));
    }
}
