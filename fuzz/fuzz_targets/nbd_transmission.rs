#![no_main]
//! libFuzzer entry point; the checks live in `cowsnap_fuzz::nbd`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cowsnap_fuzz::nbd::check_transmission(data));
