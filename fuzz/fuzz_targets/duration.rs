#![no_main]
//! See `backstop::fuzz::duration` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| backstop::fuzz::duration(data));
