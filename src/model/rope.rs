//! Rotary position embeddings: precomputed cos/sin tables, Llama 3 frequency scaling, and the
//! half-split (HF) or interleaved (llama.cpp GGUF `llama`) rotation.

use candle_core::{DType, Device, Tensor};

use super::ops;
use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor, // (max_positions, head_dim / 2)
    sin: Tensor, // (max_positions, head_dim / 2)
    interleaved: bool,
}

impl Rope {
    /// Tables for `max_positions` positions, in `dtype` on `device`. Computed in f32 like HF's
    /// `LlamaRotaryEmbedding` (inv_freq and position products in float32).
    pub fn new(cfg: &ModelConfig, max_positions: usize, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = inv_freq(cfg);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            interleaved: cfg.rope_interleaved,
        })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims().first().copied().unwrap_or(0)
    }

    /// cos/sin rows for each of `positions` (N,) u32: (N, head_dim / 2) each, for
    /// [`Rope::apply_gathered`]. Positions past the tables are an error.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }

    /// Rotates `x` (1, heads, N, head_dim) whose token i is at the position `cos`/`sin` row i was
    /// gathered for: every token of a step at its own position.
    pub fn apply_gathered(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        ops::rope(x, cos, sin, self.interleaved)
    }

    /// Rotates `x` (b, heads, t, head_dim), contiguous, whose first token is at `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, t)?; // (t, hd/2)
        let sin = self.sin.narrow(0, offset, t)?;
        ops::rope(x, &cos, &sin, self.interleaved)
    }
}

/// Inverse frequencies `theta^(-2i/d)`, with Llama 3 scaling or llama.cpp's frequency factors.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / (cfg.rope_theta.powf((2 * i) as f64 / d as f64) as f32))
        .collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::FreqFactors(factors)) => base.iter().zip(factors).map(|(f, k)| f / k).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            // HF `_compute_llama3_parameters` (modeling_rope_utils.py).
            let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
            let old_ctx = *original_max_position_embeddings as f32;
            let low_freq_wavelen = old_ctx / low;
            let high_freq_wavelen = old_ctx / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}
