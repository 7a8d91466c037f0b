#![no_main]
//! See `backstop::fuzz::requests` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| backstop::fuzz::requests(data));
