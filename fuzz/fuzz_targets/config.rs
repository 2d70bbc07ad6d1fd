#![no_main]

#[path = "../config_target.rs"]
mod config_target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| config_target::config(data));
