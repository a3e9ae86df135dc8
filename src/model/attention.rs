//! Attention: q/k/v projections, optional per-head q/k RMSNorm (Qwen3), RoPE, the KV cache, and
//! scaled dot-product attention with GQA that never materialises repeated K/V.

use candle_core::Tensor;

use super::batch::{StepPlan, StepTensors};
use super::kv_cache::KvPool;
use super::linear::Linear;
use super::ops;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::kernels::{self, KernelPolicy};
use crate::error::{Error, Result};

/// Per-head RMSNorm weights for q and k (Qwen3).
#[derive(Debug, Clone)]
pub struct QkNorm {
    pub(crate) q: Tensor, // (hd,)
    pub(crate) k: Tensor, // (hd,)
}

#[derive(Debug, Clone)]
/// One layer's self-attention: the q/k/v/o projections and the optional per-head q/k norm.
pub struct Attention {
    pub(crate) q_proj: Linear, // hidden → n_heads·hd
    pub(crate) k_proj: Linear, // hidden → n_kv·hd
    pub(crate) v_proj: Linear, // hidden → n_kv·hd
    pub(crate) o_proj: Linear, // n_heads·hd → hidden
    pub(crate) qk_norm: Option<QkNorm>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    eps: f64,
}

impl Attention {
    /// Builds the layer from its four projections (q, k, v, o) and the optional q/k norm.
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

    /// One step's flat tokens x (N, hidden) → (N, hidden). Each row of the step reads and extends
    /// its own KV slot at its own positions; `variants[v]` is this attention block in model
    /// variant v (its adapters), used by the rows of the ranges naming v.
    pub(crate) fn forward_batch(
        &self,
        variants: &[&Attention],
        x: &Tensor,
        step: &StepCtx<'_>,
        pool: &mut KvPool,
        layer: usize,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (h, n_kv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let sites = |f: fn(&Attention) -> &Linear| variants.iter().map(|a| f(a)).collect::<Vec<_>>();
        let qkv = Linear::forward_mixed(
            &[sites(|a| &a.q_proj), sites(|a| &a.k_proj), sites(|a| &a.v_proj)],
            x,
            &step.plan.ranges,
        )?;
        let [q, k, v]: [Tensor; 3] = qkv
            .try_into()
            .map_err(|_| candle_core::Error::Msg("attention: expected three outputs".into()))?;
        let q = q.reshape((n, h, hd))?; // (N, h, hd)
        let k = k.reshape((n, n_kv, hd))?; // (N, n_kv, hd)
        let (q, k) = match &self.qk_norm {
            Some(norm) => (ops::rms_norm(&q, &norm.q, self.eps)?, ops::rms_norm(&k, &norm.k, self.eps)?),
            None => (q, k),
        };
        let heads_first = |t: Tensor| -> Result<Tensor> { Ok(t.transpose(0, 1)?.unsqueeze(0)?.contiguous()?) };
        let q = step.rope.apply_gathered(&heads_first(q)?, &step.tensors.cos, &step.tensors.sin)?; // (1, h, N, hd)
        let k = step.rope.apply_gathered(&heads_first(k)?, &step.tensors.cos, &step.tensors.sin)?; // (1, n_kv, N, hd)
        let v = heads_first(v.reshape((n, n_kv, hd))?)?; // (1, n_kv, N, hd)
        let scale = 1.0 / (hd as f64).sqrt();
        let mut ys = Vec::with_capacity(step.plan.spans.len());
        for (row, offset) in &step.plan.spans {
            let cache = pool
                .layer_mut(row.slot, layer)
                .ok_or(Error::KvSlot { slot: row.slot, reason: "does not exist" })?;
            let part = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, *offset, row.len)?.contiguous()?) };
            let (qr, kr, vr) = (part(&q)?, part(&k)?, part(&v)?);
            let kv = cache.append(&kr, &vr)?; // (1, n_kv, T, hd)
            let y = if ops::needs_grad(&[&qr, &kr, &vr]) {
                // Training: the cache copy would cut the graph, so a row attends to its own
                // keys/values, which is all it sees when it starts at position 0.
                if row.start != 0 {
                    return Err(Error::InvalidBatch { reason: "a differentiable forward needs every row to start at position 0".into() });
                }
                kernels::cpu::attention_grad::attend_trainable(&qr, &kr, &vr, kv.mask.as_ref(), scale)?
            } else {
                kernels::attend(&qr, &kv.k, &kv.v, kv.mask.as_ref(), scale, step.kernels)? // (1, h, len, hd)
            };
            ys.push(y.transpose(1, 2)?.reshape((row.len, h * hd))?); // (len, h·hd)
        }
        let y = if ys.len() == 1 { ys.remove(0) } else { Tensor::cat(&ys, 0)? }; // (N, h·hd)
        let [o]: [Tensor; 1] = Linear::forward_mixed(&[sites(|a| &a.o_proj)], &y, &step.plan.ranges)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("attention: expected one output".into()))?;
        Ok(o)
    }
}

/// What every layer of one step reads: the plan (rows, variant ranges), the gathered RoPE rows
/// and the tables they came from.
pub(crate) struct StepCtx<'a> {
    pub plan: &'a StepPlan,
    pub tensors: &'a StepTensors,
    pub rope: &'a Rope,
    pub kernels: KernelPolicy,
}
