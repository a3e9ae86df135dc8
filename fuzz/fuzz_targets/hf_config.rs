//! `config.json` text: normalisation into the model config.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use metal_candle::config::hf::parse_hf_config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_hf_config(text, Path::new("config.json"));
    }
});
