//! `kind u8 | page u64 | bounds u64 | payload`: one metadata page, sealed with a valid
//! checksum, through its decoder (see storage::thin::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| storage::thin::fuzzing::meta_page(data));
