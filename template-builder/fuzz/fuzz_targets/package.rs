//! A whole package file, as downloaded: open, verify, unpack (see
//! template_builder::package::fuzz_package).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| template_builder::package::fuzz_package(data));
