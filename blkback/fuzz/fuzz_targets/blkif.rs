//! blkif ring slots from a hostile guest (see `blkback::fuzzing::blkif`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| blkback::fuzzing::blkif(data));
