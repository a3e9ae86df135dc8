//! Attention: q/k/v projections, optional per-head q/k RMSNorm (Qwen3), RoPE, the KV cache, and
//! scaled dot-product attention with GQA that never materialises repeated K/V.

use candle_core::{DType, Device, Tensor};

use super::kv_cache::LayerCache;
use super::linear::Linear;
use super::ops;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::kernels::{self, AttnBackend, AttnParams};
use crate::error::Result;

/// Per-head RMSNorm weights for q and k (Qwen3).
#[derive(Debug, Clone)]
pub struct QkNorm {
    pub q: Tensor, // (hd,)
    pub k: Tensor, // (hd,)
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear, // hidden → n_heads·hd
    pub k_proj: Linear, // hidden → n_kv·hd
    pub v_proj: Linear, // hidden → n_kv·hd
    pub o_proj: Linear, // n_heads·hd → hidden
    pub qk_norm: Option<QkNorm>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    eps: f64,
}

impl Attention {
    pub fn new(
        cfg: &ModelConfig,
        [q_proj, k_proj, v_proj, o_proj]: [Linear; 4],
        qk_norm: Option<QkNorm>,
    ) -> Self {
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            qk_norm,
            n_heads: cfg.num_attention_heads,
            n_kv: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
        }
    }

    /// x: (b, t, hidden) whose first token is at `cache.seq_len()` → (b, t, hidden).
    pub fn forward(&self, x: &Tensor, rope: &Rope, cache: &mut LayerCache) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let offset = cache.seq_len();
        let qkv = Linear::forward_group(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let [q, k, v]: [Tensor; 3] = qkv
            .try_into()
            .map_err(|_| candle_core::Error::Msg("attention: expected three outputs".into()))?;
        let q = q.reshape((b, t, self.n_heads, self.head_dim))?; // (b, t, h, hd)
        let k = k.reshape((b, t, self.n_kv, self.head_dim))?; // (b, t, n_kv, hd)
        let v = v.reshape((b, t, self.n_kv, self.head_dim))?; // (b, t, n_kv, hd)
        let (q, k) = match &self.qk_norm {
            Some(n) => (ops::rms_norm(&q, &n.q, self.eps)?, ops::rms_norm(&k, &n.k, self.eps)?),
            None => (q, k),
        };
        let q = rope.apply(&q.transpose(1, 2)?.contiguous()?, offset)?; // (b, h, t, hd)
        let k = rope.apply(&k.transpose(1, 2)?.contiguous()?, offset)?; // (b, n_kv, t, hd)
        let v = v.transpose(1, 2)?.contiguous()?; // (b, n_kv, t, hd)
        let kv = cache.append(&k, &v)?; // (b, n_kv, T, hd)
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = attend(&q, &kv.k, &kv.v, kv.mask.as_ref(), scale)?; // (b, h, t, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, self.n_heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }

}

/// softmax(q·kᵀ·scale + mask)·v with q (b, h, t, hd), k/v (b, n_kv, T, hd), mask (t, T).
/// On the CPU in f32: [`kernels::cpu::cpu_attention`] (reads the cache in place).
/// On Metal: our flash-attention kernels when [`kernels::custom_kernels_enabled`], else candle's
/// fused `sdpa` for single-token decode; the plain path everywhere else.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == DType::F32 && kernels::cpu::cpu_attention_enabled() {
        return kernels::cpu::cpu_attention(q, k, v, mask, scale as f32);
    }
    if !matches!(q.device(), Device::Metal(_)) {
        return attend_reference(q, k, v, mask, scale);
    }
    let hd = q.dim(3)?;
    if kernels::custom_kernels_enabled() && kernels::attention::attn_backend(q.device(), hd) == AttnBackend::Custom {
        let params = AttnParams {
            scale: scale as f32,
            mask: mask.cloned(),
            ..AttnParams::new(hd)
        };
        return kernels::flash_attention(q, k, v, &params);
    }
    if sdpa_supported(q, mask) {
        return Ok(candle_nn::ops::sdpa(q, &k.contiguous()?, &v.contiguous()?, None, false, scale as f32, 1.0)?);
    }
    attend_reference(q, k, v, mask, scale)
}

/// Head dims candle's Metal `sdpa` kernels exist for.
const SDPA_HEAD_DIMS: [usize; 8] = [32, 64, 72, 80, 96, 128, 256, 512];

/// candle's `sdpa` has no separate mask argument here: use it for single-token decode (no mask).
fn sdpa_supported(q: &Tensor, mask: Option<&Tensor>) -> bool {
    mask.is_none() && q.dim(2).is_ok_and(|t| t == 1) && q.dim(3).is_ok_and(|d| SDPA_HEAD_DIMS.contains(&d))
}

/// Plain-op attention (the reference twin). Queries of one KV group are folded into the row
/// dimension so K/V are never repeated: (b, n_kv, n_rep·t, hd) · (b, n_kv, hd, T).
pub fn attend_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let n_kv = k.dim(1)?;
    let kv_len = k.dim(2)?;
    let n_rep = h / n_kv;
    let q = q.reshape((b, n_kv, n_rep * t, hd))?;
    let scores = (q.matmul(&k.t()?)? * scale)?; // (b, n_kv, n_rep·t, T)
    let scores = match mask {
        Some(m) => scores
            .reshape((b, n_kv, n_rep, t, kv_len))?
            .broadcast_add(m)?
            .reshape((b, n_kv, n_rep * t, kv_len))?,
        None => scores,
    };
    let probs = ops::softmax_last_dim(&scores)?;
    let y = probs.matmul(&v.contiguous()?)?; // (b, n_kv, n_rep·t, hd)
    Ok(y.reshape((b, h, t, hd))?)
}
