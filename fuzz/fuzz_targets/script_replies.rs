#![no_main]
//! See `backstop::fuzz::script_replies` for the property this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| backstop::fuzz::script_replies(data));
