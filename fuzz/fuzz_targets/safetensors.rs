//! safetensors bytes (u64 header length, JSON header, data): the header validator.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metal_candle::loader::safetensors_validate::validate_safetensors;

fuzz_target!(|data: &[u8]| {
    let _ = validate_safetensors(data);
});
