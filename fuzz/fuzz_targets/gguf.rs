//! GGUF bytes: our validator, then (for what it accepts) candle's reader and the tokenizer built
//! from the metadata. Seeds: tests/fixtures/fuzz/gguf (copy a fixture there, e.g.
//! tests/fixtures/models/llama3/model-q4_0.gguf).
#![no_main]

use std::io::Cursor;

use candle_core::quantized::gguf_file::Content;
use libfuzzer_sys::fuzz_target;
use metal_candle::loader::gguf_validate::{validate_gguf, GgufLimits};
use metal_candle::tokenizer::gguf::tokenizer_from_gguf;

fuzz_target!(|data: &[u8]| {
    if validate_gguf(data, &GgufLimits::default()).is_err() {
        return;
    }
    let content = Content::read(&mut Cursor::new(data)).expect("candle reads what the validator accepts");
    let _ = tokenizer_from_gguf(&content.metadata);
});
