//! Transmission-phase bytes: a session-shape byte, then request headers and payloads.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkback::fuzzing::requests(data));
