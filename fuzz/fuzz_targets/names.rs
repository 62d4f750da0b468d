#![no_main]
//! libFuzzer entry point; the checks live in `cowsnap_fuzz::names`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cowsnap_fuzz::names::check_names(data));
