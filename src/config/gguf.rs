//! GGUF metadata (llama.cpp key names) → [`ModelConfig`].
//!
//! Quirks honoured: `llama` files have Q/K rows permuted for interleaved RoPE; Llama 3 scaling is
//! baked into `rope_freqs.weight` (read by the loader and passed in); Qwen3 states
//! `attention.key_length`; a file without `output.weight` ties the output to the embeddings.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

use super::{check_limit, Arch, ModelConfig, RopeScaling, MAX_LAYERS, SUPPORTED_ARCHS};
use crate::error::{Error, Result};

/// Builds the config from a parsed GGUF header. `rope_freqs` is the content of `rope_freqs.weight`
/// if the file has one.
pub fn config_from_gguf(content: &Content, path: &Path, rope_freqs: Option<Vec<f32>>) -> Result<ModelConfig> {
    let md = Metadata { map: &content.metadata, path };
    let arch_name = md.string("general.architecture")?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        _ => {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name,
                supported: SUPPORTED_ARCHS,
            })
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let hidden_size = md.usize(&key("embedding_length"))?;
    let num_attention_heads = md.usize(&key("attention.head_count"))?;
    if num_attention_heads == 0 {
        return Err(md.invalid(&key("attention.head_count"), "must be positive".into()));
    }
    let num_hidden_layers = md.usize(&key("block_count"))?;
    check_limit(&key("block_count"), num_hidden_layers, MAX_LAYERS, path)?;
    let head_dim = md
        .opt_usize(&key("attention.key_length"))?
        .unwrap_or(hidden_size / num_attention_heads);
    let vocab_size = match md.opt_usize(&key("vocab_size"))? {
        Some(v) => v,
        None => token_embd_rows(content, path)?,
    };
    let window = md.opt_usize(&key("attention.sliding_window"))?;
    let has = |name: &str| content.tensor_infos.contains_key(name);
    let config = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: md.usize(&key("feed_forward_length"))?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: md.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(num_attention_heads),
        head_dim,
        rms_norm_eps: md.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        rope_theta: md.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: rope_freqs.map(RopeScaling::FreqFactors),
        rope_interleaved: arch == Arch::Llama,
        max_position_embeddings: md.opt_usize(&key("context_length"))?.unwrap_or(4096),
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        qk_norm: has("blk.0.attn_q_norm.weight"),
        layer_windows: vec![window; num_hidden_layers],
        bos_token_id: md.opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: md.opt_u32("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
    };
    config.validate(path)?;
    if let Some(dims) = md.opt_usize(&key("rope.dimension_count"))? {
        if dims != config.head_dim {
            return Err(md.invalid(
                &key("rope.dimension_count"),
                format!("partial rotary embeddings ({dims} of {} dims) are not supported", config.head_dim),
            ));
        }
    }
    Ok(config)
}

fn token_embd_rows(content: &Content, path: &Path) -> Result<usize> {
    let info = content.tensor_infos.get("token_embd.weight").ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        name: "token_embd.weight".into(),
    })?;
    // candle reverses GGUF's ne order: dims are (vocab, hidden).
    info.shape.dims().first().copied().ok_or_else(|| Error::ShapeMismatch {
        path: path.to_path_buf(),
        name: "token_embd.weight".into(),
        expected: vec![0, 0],
        got: info.shape.dims().to_vec(),
    })
}

/// Typed access to the metadata map with errors naming the key.
struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Metadata<'_> {
    fn invalid(&self, key: &str, reason: String) -> Error {
        Error::InvalidConfig {
            path: self.path.to_path_buf(),
            field: key.to_string(),
            reason,
        }
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.map.get(key).ok_or_else(|| Error::MissingConfigField {
            path: self.path.to_path_buf(),
            field: key.to_string(),
        })
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.invalid(key, format!("expected a string, found {:?}", other.value_type()))),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.map.get(key) else { return Ok(None) };
        let n = match *v {
            Value::U8(n) => u64::from(n),
            Value::U16(n) => u64::from(n),
            Value::U32(n) => u64::from(n),
            Value::U64(n) => n,
            Value::I8(n) => u64::try_from(n).map_err(|_| self.invalid(key, format!("{n} is negative")))?,
            Value::I16(n) => u64::try_from(n).map_err(|_| self.invalid(key, format!("{n} is negative")))?,
            Value::I32(n) => u64::try_from(n).map_err(|_| self.invalid(key, format!("{n} is negative")))?,
            Value::I64(n) => u64::try_from(n).map_err(|_| self.invalid(key, format!("{n} is negative")))?,
            ref other => {
                return Err(self.invalid(key, format!("expected an integer, found {:?}", other.value_type())))
            }
        };
        Ok(Some(n))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.opt_u64(key)?
            .map(|n| usize::try_from(n).map_err(|_| self.invalid(key, format!("{n} is too large"))))
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.get(key)?;
        self.opt_usize(key)?.ok_or_else(|| self.invalid(key, "missing".into()))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_u64(key)?
            .map(|n| u32::try_from(n).map_err(|_| self.invalid(key, format!("{n} is too large"))))
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.invalid(key, format!("expected a float, found {:?}", other.value_type()))),
        }
    }
}
