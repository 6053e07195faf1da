//! A test thread playing the server, one handshake step at a time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use crate::wire::*;

/// The server's end of a socket, for a test thread playing the server.
/// Its helpers panic on anything unexpected, as test code does.
pub struct Peer(pub UnixStream);

impl Peer {
    /// Send the newstyle greeting with `flags`.
    pub fn greet(&mut self, flags: u16) {
        self.0.write_all(&Greeting::encode_newstyle(flags)).unwrap();
    }

    /// Read the client's flags.
    pub fn client_flags(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.read_exact(&mut b).unwrap();
        decode_client_flags(&b).unwrap()
    }

    /// Read one option request: its code and data.
    pub fn option(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; OPTION_HEADER_LEN];
        self.0.read_exact(&mut h).unwrap();
        let h = OptionHeader::decode(&h).unwrap();
        let mut data = vec![0u8; h.length as usize];
        self.0.read_exact(&mut data).unwrap();
        (h.option, data)
    }

    /// Send one option reply.
    pub fn reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) {
        let h = OptionReplyHeader {
            option,
            reply_type,
            length: payload.len() as u32,
        };
        self.0.write_all(&h.encode()).unwrap();
        self.0.write_all(payload).unwrap();
    }

    /// A complete modern handshake for `export`.
    pub fn serve_go(&mut self, export: &str, size: u64, flags: u16, context: Option<u32>) {
        self.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(
            self.client_flags(),
            NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        );
        let (opt, _) = self.option();
        assert_eq!(opt, NBD_OPT_STRUCTURED_REPLY);
        self.reply(opt, NBD_REP_ACK, &[]);
        let (opt, data) = self.option();
        assert_eq!(opt, NBD_OPT_SET_META_CONTEXT);
        let (name, queries) = decode_meta_context_payload(&data).unwrap();
        assert_eq!(name, export);
        assert_eq!(queries, vec![BASE_ALLOCATION.to_string()]);
        if let Some(id) = context {
            self.reply(
                opt,
                NBD_REP_META_CONTEXT,
                &encode_meta_context_reply(id, BASE_ALLOCATION),
            );
        }
        self.reply(opt, NBD_REP_ACK, &[]);
        let (opt, data) = self.option();
        assert_eq!(opt, NBD_OPT_GO);
        let (name, reqs) = decode_go_payload(&data).unwrap();
        assert_eq!(name, export);
        assert_eq!(reqs, vec![NBD_INFO_BLOCK_SIZE]);
        self.reply(opt, NBD_REP_INFO, &Info::Export { size, flags }.encode());
        self.reply(opt, NBD_REP_ACK, &[]);
    }
}
