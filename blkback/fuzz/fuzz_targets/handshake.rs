//! Client bytes of a whole handshake (flags, options, then transmission requests).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkback::fuzzing::handshake(data));
