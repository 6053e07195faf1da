//! cargo-fuzz target: see [`nbdcp_fuzz::handshake`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdcp_fuzz::handshake(data));
