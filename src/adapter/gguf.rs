//! llama.cpp GGUF LoRA adapters (`convert_lora_to_gguf.py`): `general.type = adapter`,
//! `adapter.lora.alpha`, tensors `blk.N.attn_q.weight.lora_a` (A, `(r, in)`) and `.lora_b`
//! (B, `(out, r)`). Scaling is `alpha / r` with r read from A, or 1 when alpha is 0 (llama.cpp
//! `llama_adapter_lora`). For the `llama` architecture the converter has permuted B's q/k rows
//! for interleaved RoPE; they are converted back when the base is not a llama-arch GGUF.

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::lora::{adapter_error, prepare, AdapterOptions, LoraAdapter, RawModule};
use super::AdapterError;
use crate::config::Arch;
use crate::error::{Error, Result};
use crate::loader::gguf_validate::{validate_gguf, GgufLimits};
use crate::model::linear::Projection;
use crate::Model;

/// Loads the GGUF adapter at `path` for `model`.
pub(crate) fn load(path: &Path, model: &Model, opts: &AdapterOptions) -> Result<LoraAdapter> {
    let err = |e: AdapterError| adapter_error(path, e);
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    validate_gguf(&bytes, &GgufLimits::default()).map_err(|source| err(AdapterError::MalformedGguf { source }))?;
    let content = Content::read(&mut Cursor::new(&bytes[..]))?;
    let alpha = check_metadata(&content, model).map_err(err)?;
    let interleaved = gguf_arch(model.config().arch) == "llama";
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut pairs = Vec::new();
    for name in names {
        let (layer, proj, is_a) = parse_name(name).ok_or_else(|| err(AdapterError::UnexpectedTensor { tensor: name.clone() }))?;
        if layer >= model.layers().len() {
            return Err(err(AdapterError::UnexpectedTensor { tensor: name.clone() }));
        }
        let b_name = format!("blk.{layer}.{}.weight.lora_b", proj.gguf_name());
        if !is_a {
            let a_name = format!("blk.{layer}.{}.weight.lora_a", proj.gguf_name());
            if !content.tensor_infos.contains_key(&a_name) {
                return Err(err(AdapterError::MissingLoraA { module: format!("blk.{layer}.{}", proj.gguf_name()) }));
            }
            continue;
        }
        if !content.tensor_infos.contains_key(&b_name) {
            return Err(err(AdapterError::MissingLoraB { module: format!("blk.{layer}.{}", proj.gguf_name()) }));
        }
        pairs.push((layer, proj, name.clone(), b_name));
    }
    let mut modules = Vec::with_capacity(pairs.len());
    for (layer, proj, a_name, b_name) in pairs {
        let a = dense(&content, &bytes, &a_name, path)?; // (r, in)
        let b = dense(&content, &bytes, &b_name, path)?; // (out, r)
        let rank = a.dims().first().copied().unwrap_or(0);
        if rank == 0 || rank > opts.max_rank {
            return Err(err(AdapterError::RankOutOfRange { field: a_name, rank: rank as i64, max: opts.max_rank }));
        }
        let scaling = if alpha == 0.0 { 1.0 } else { alpha / rank as f64 };
        let raw = RawModule { layer, proj, a, b, a_name, b_name, rank, scaling };
        modules.push(prepare(model, path, raw, interleaved)?);
    }
    if modules.is_empty() {
        return Err(err(AdapterError::TargetWithoutTensors { module: "(any)".into() }));
    }
    LoraAdapter::from_modules(path.to_path_buf(), model, modules)
}

/// The llama.cpp architecture name a model of `arch` converts to (Mistral is written as `llama`).
fn gguf_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Llama | Arch::Mistral => "llama",
    }
}

/// Checks `general.type`, `adapter.type` and the architecture; returns `adapter.lora.alpha`.
fn check_metadata(content: &Content, model: &Model) -> std::result::Result<f64, AdapterError> {
    let string = |key: &'static str| content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
    if string("general.type").as_deref() != Some("adapter") {
        return Err(AdapterError::GgufKey { key: "general.type", expected: "\"adapter\"" });
    }
    if string("adapter.type").is_some_and(|t| t != "lora") {
        return Err(AdapterError::GgufKey { key: "adapter.type", expected: "\"lora\"" });
    }
    let arch = string("general.architecture").ok_or(AdapterError::GgufKey {
        key: "general.architecture",
        expected: "a string",
    })?;
    let base = gguf_arch(model.config().arch);
    if arch != base {
        return Err(AdapterError::ArchitectureMismatch { adapter: arch, base: base.to_string() });
    }
    let alpha = match content.metadata.get("adapter.lora.alpha") {
        Some(Value::F32(a)) if a.is_finite() => f64::from(*a),
        Some(Value::F64(a)) if a.is_finite() => *a,
        _ => return Err(AdapterError::GgufKey { key: "adapter.lora.alpha", expected: "a finite float" }),
    };
    super::config::check_alpha(alpha, "adapter.lora.alpha")?;
    Ok(alpha)
}

/// `blk.N.<short>.weight.lora_{a,b}` → (N, projection, is_a).
fn parse_name(name: &str) -> Option<(usize, Projection, bool)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok().filter(|_| layer.bytes().all(|b| b.is_ascii_digit()))?;
    let (short, is_a) = if let Some(s) = rest.strip_suffix(".weight.lora_a") {
        (s, true)
    } else {
        (rest.strip_suffix(".weight.lora_b")?, false)
    };
    let proj = Projection::ALL.into_iter().find(|p| p.gguf_name() == short)?;
    Some((layer, proj, is_a))
}

/// A tensor of the file, dequantized to f32 on the CPU. Errors: a NaN or ±Inf value (adapters
/// are small: every value is checked, always).
fn dense(content: &Content, bytes: &[u8], name: &str, path: &Path) -> Result<Tensor> {
    let q = content.tensor(&mut Cursor::new(bytes), name, &Device::Cpu)?;
    let t = q.dequantize(&Device::Cpu)?;
    match crate::model::finite::first_bad_value(&t)? {
        Some(index) => Err(Error::NonFiniteTensor { path: path.to_path_buf(), name: name.to_string(), index }),
        None => Ok(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_lora_names_parse() {
        assert_eq!(parse_name("blk.1.attn_q.weight.lora_a"), Some((1, Projection::Q, true)));
        assert_eq!(parse_name("blk.0.ffn_down.weight.lora_b"), Some((0, Projection::Down, false)));
        assert_eq!(parse_name("blk.0.attn_norm.weight"), None);
        assert_eq!(parse_name("token_embd.weight.lora_a"), None);
    }
}
