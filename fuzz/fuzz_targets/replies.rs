//! cargo-fuzz target: see [`nbdcp_fuzz::replies`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdcp_fuzz::replies(data));
