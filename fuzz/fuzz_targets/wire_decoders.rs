//! cargo-fuzz target: see [`nbdcp_fuzz::wire_decoders`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdcp_fuzz::wire_decoders(data));
