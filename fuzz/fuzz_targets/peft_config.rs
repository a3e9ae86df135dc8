//! PEFT `adapter_config.json` text: parsing and checking (regex patterns included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use metal_candle::adapter::{PeftConfig, DEFAULT_MAX_RANK};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PeftConfig::parse(text, DEFAULT_MAX_RANK);
    }
});
