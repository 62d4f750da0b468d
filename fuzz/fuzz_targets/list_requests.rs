#![no_main]
//! libFuzzer entry point; the checks live in `cowsnap_fuzz::list_requests`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| cowsnap_fuzz::list_requests::check_list_requests(data));
