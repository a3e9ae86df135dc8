//! A server request body for each endpoint, read and checked as the handlers do before any model
//! is touched (`metal_candle::server::check_request`). The first byte picks the endpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metal_candle::server::check_request;

const ENDPOINTS: [&str; 5] =
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"];

fuzz_target!(|data: &[u8]| {
    if let Some((&first, body)) = data.split_first() {
        let path = ENDPOINTS[first as usize % ENDPOINTS.len()];
        if let Err(e) = check_request(path, body) {
            assert!(e.status.is_client_error(), "{path}: {}", e.status);
        }
    }
});
