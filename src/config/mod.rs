//! The normalised model configuration.
//!
//! HF `config.json` ([`hf`]) and GGUF metadata ([`gguf`]) both become one [`ModelConfig`]; derived
//! values (head_dim, per-layer sliding windows, bias flags) are computed here, once, so the decoder
//! never looks at architecture names.

pub mod gguf;
pub mod hf;

use std::path::Path;

use crate::error::{Error, Result};

/// The architectures metal-candle implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Qwen2 / Qwen2.5: q/k/v bias.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k, explicit head_dim.
    Qwen3,
    /// LLaMA 2 / 3 / 3.1 / 3.2 (and GGUF `llama` files, which include Mistral conversions).
    Llama,
    /// Mistral: sliding-window attention.
    Mistral,
}

/// What [`Error::UnsupportedArchitecture`] lists as supported.
pub const SUPPORTED_ARCHS: &str = "Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM, \
MistralForCausalLM (GGUF: qwen2, qwen3, llama)";

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1 scaling (HF `_compute_llama3_parameters`).
    Llama3 {
        /// How much the context is stretched (`rope_scaling.factor`, 8.0 for Llama 3.1).
        factor: f64,
        /// Wavelengths above the original context / this are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below the original context / this are left unscaled.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with, in tokens.
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors, as llama.cpp bakes Llama 3 scaling into `rope_freqs.weight`.
    FreqFactors(Vec<f32>),
}

/// Everything the decoder needs to know about a model, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which decoder architecture to run.
    pub arch: Arch,
    /// Number of tokens in the embedding and output matrices.
    pub vocab_size: usize,
    /// Width of the residual stream (the embedding dimension).
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (fewer than query heads under GQA).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// The epsilon added inside every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE frequency scaling, if the model uses any.
    pub rope_scaling: Option<RopeScaling>,
    /// GGUF `llama` files store Q/K rows permuted for interleaved (GPT-J style) rotation; attention
    /// scores are unchanged if RoPE rotates adjacent pairs instead of halves (llama.cpp
    /// `convert_hf_to_gguf.py`, `LlamaModel.permute`).
    pub rope_interleaved: bool,
    /// The longest context the model supports, in tokens.
    pub max_position_embeddings: usize,
    /// Whether the output matrix is the token embedding (no separate `lm_head`).
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2; Llama/Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama/Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding window per layer: `Some(w)` means a query at position p sees keys at p-w+1..=p.
    pub layer_windows: Vec<Option<usize>>,
    /// The beginning-of-sequence token id, if the config names one.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation; may be empty.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// GQA group size: query heads per key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Checks the invariants the decoder relies on; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        for (field, value, max) in [
            ("vocab_size", self.vocab_size, MAX_DIM),
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
        ] {
            check_limit(field, value, max, path)?;
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", format!("{} is odd; RoPE needs pairs", self.head_dim)));
        }
        // theta ≤ 1 would make every frequency ≥ 1 rad/token (and tiny values overflow to NaN);
        // real models use 1e4..1e6.
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(bad("rope_theta", format!("{} is not a number above 1", self.rope_theta)));
        }
        // eps ≤ 0 divides a zero row by zero (NaN); eps ≥ 1 swamps the mean square of real
        // activations. Real models use 1e-6..1e-5.
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(bad("rms_norm_eps", format!("{} is outside (0, 1)", self.rms_norm_eps)));
        }
        if self.layer_windows.len() != self.num_hidden_layers {
            return Err(bad(
                "layer_types",
                format!("{} entries for {} layers", self.layer_windows.len(), self.num_hidden_layers),
            ));
        }
        if self.layer_windows.contains(&Some(0)) {
            return Err(bad("sliding_window", "must be positive".into()));
        }
        self.validate_rope_scaling(path)
    }

    fn validate_rope_scaling(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            field: "rope_scaling".into(),
            reason,
        };
        match &self.rope_scaling {
            None => Ok(()),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let finite_pos = |v: f64| v.is_finite() && v > 0.0;
                if !finite_pos(*factor) || !finite_pos(*low_freq_factor) || !finite_pos(*high_freq_factor) {
                    return Err(bad("factors must be positive numbers".into()));
                }
                if high_freq_factor <= low_freq_factor {
                    return Err(bad("high_freq_factor must exceed low_freq_factor".into()));
                }
                if *original_max_position_embeddings == 0 {
                    return Err(bad("original_max_position_embeddings must be positive".into()));
                }
                Ok(())
            }
            Some(RopeScaling::FreqFactors(f)) => {
                // Only GGUF's `rope_freqs.weight` gives these: name the tensor, not an HF key.
                let bad = |reason: String| Error::InvalidConfig {
                    path: path.to_path_buf(),
                    field: "rope_freqs.weight".into(),
                    reason,
                };
                if f.len() != self.head_dim / 2 {
                    return Err(bad(format!(
                        "rope_freqs has {} entries, head_dim/2 is {}",
                        f.len(),
                        self.head_dim / 2
                    )));
                }
                if f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(bad("rope_freqs entries must be positive numbers".into()));
                }
                Ok(())
            }
        }
    }
}

/// Largest width accepted for any single dimension; a guard against absurd configs allocating
/// terabytes, far above any real model (Llama 3 405B has hidden 16384, vocab 128256).
pub const MAX_DIM: usize = 1 << 20;
/// Largest head dimension accepted (real models use 64..=256): RoPE tables hold
/// `max_positions × head_dim` values, so an absurd explicit `head_dim` with a tiny hidden size
/// would turn a small file into gigabytes of tables.
pub const MAX_HEAD_DIM: usize = 1024;
/// Largest layer count accepted.
pub const MAX_LAYERS: usize = 1024;
/// Largest head count accepted.
pub const MAX_HEADS: usize = 1024;

/// `value` must not exceed `max`. Used by [`ModelConfig::validate`], and by the parsers on counts
/// that size allocations before the config is complete (per-layer window lists).
pub(crate) fn check_limit(field: &str, value: usize, max: usize, path: &Path) -> Result<()> {
    if value > max {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason: format!("{value} exceeds the limit {max}"),
        });
    }
    Ok(())
}
