#![no_main]
//! See `backstop::fuzz::target_record` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| backstop::fuzz::target_record(data));
