#![no_main]
//! libFuzzer entry point; the checks live in `cowsnap_fuzz::cow`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cowsnap_fuzz::cow::check_load(data));
