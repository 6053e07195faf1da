//! cargo-fuzz target: see [`nbdcp_fuzz::uri`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdcp_fuzz::uri(data));
