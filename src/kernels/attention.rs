//! Flash attention: `softmax(q·kᵀ·scale + mask)·v` with GQA/MQA (K/V never repeated), causal and
//! sliding-window masks, an optional additive mask, and an online softmax accumulated in f32.
//!
//! Shapes: q (b, h, t, d), k/v (b, n_kv, kv_len, d) with h a multiple of n_kv, mask (t, kv_len)
//! broadcast over batch and heads; output (b, h, t, d) in q's dtype. Query i sits at absolute
//! position `q_offset + i` (default `kv_len − t`): causal hides keys after it, a window `w` hides
//! keys at or before `pos − w`. A row that sees no key yields zeros.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::abi::{self, AttnArgs, Launch};
use super::KernelPolicy;
use super::names::{kernel_name, ElemType, Family, Variant};
use super::qmatmul::{cpu_to_f32, f32_to_cpu};
use crate::error::{Error, Result};

const OP: &str = "flash_attention";

/// What to attend with besides q, k, v.
#[derive(Debug, Clone)]
pub struct AttnParams {
    /// Softmax scale, usually `1/√d`.
    pub scale: f32,
    /// Hide keys after each query's position.
    pub causal: bool,
    /// Sliding window: a query at p sees keys p−w+1..=p.
    pub window: Option<usize>,
    /// Additive mask (t, kv_len), any float dtype (−inf hides).
    pub mask: Option<Tensor>,
    /// Absolute position of query 0; `None` = kv_len − t.
    pub q_offset: Option<usize>,
    /// Decode tuning override: keys per split (rounded up to the K/V tile); `None` = automatic.
    pub decode_keys_per_split: Option<usize>,
}

impl AttnParams {
    /// Plain (unmasked, non-causal) attention with scale `1/√head_dim`.
    pub fn new(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            causal: false,
            window: None,
            mask: None,
            q_offset: None,
            decode_keys_per_split: None,
        }
    }
}

/// Which implementation [`flash_attention`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnBackend {
    /// Our Metal kernels.
    Custom,
    /// candle tensor ops ([`attend_reference`] with a built mask).
    Candle,
}

/// Custom kernels on Metal for head dims `ATTN_HEAD_DIMS`, candle ops otherwise.
pub fn attn_backend(device: &Device, head_dim: usize) -> AttnBackend {
    if cfg!(feature = "metal") && device.is_metal() && abi::ATTN_HEAD_DIMS.contains(&head_dim) {
        AttnBackend::Custom
    } else {
        AttnBackend::Candle
    }
}

/// Flash attention (see the module docs for shapes). Errors: `UnsupportedKernel` for mismatched
/// shapes or dtypes.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor> {
    let dims = AttnDims::of(q, k, v, p)?;
    match attn_backend(q.device(), dims.d) {
        AttnBackend::Custom => {
            let mask = match &p.mask {
                Some(m) => Some(m.to_dtype(DType::F32)?.contiguous()?),
                None => None,
            };
            let op = FlashAttention {
                params: AttnParams { mask, ..p.clone() },
            };
            Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?)
        }
        AttnBackend::Candle => {
            let mask = combined_mask(&dims, p, q.device(), q.dtype())?;
            attend_reference(q, k, v, mask.as_ref(), p.scale as f64)
        }
    }
}

/// The reference twin: plain loops accumulating in f32 on the CPU, result on q's device.
pub fn flash_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
) -> Result<Tensor> {
    AttnDims::of(q, k, v, p)?;
    let cpu = Device::Cpu;
    let mask = match &p.mask {
        Some(m) => Some(m.to_device(&cpu)?.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    let op = FlashAttention {
        params: AttnParams { mask, ..p.clone() },
    };
    let y = q.to_device(&cpu)?.contiguous()?.apply_op3_no_bwd(
        &k.to_device(&cpu)?.contiguous()?,
        &v.to_device(&cpu)?.contiguous()?,
        &op,
    )?;
    Ok(y.to_device(q.device())?)
}

/// softmax(q·kᵀ·scale + mask)·v with q (b, h, t, hd), k/v (b, n_kv, T, hd), mask (t, T).
/// On the CPU in f32: [`super::cpu::cpu_attention`] (reads the cache in place).
/// On Metal: our flash-attention kernels when the policy allows them, else candle's
/// fused `sdpa` for single-token decode; the plain path everywhere else.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, policy: KernelPolicy) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == DType::F32 && policy.cpu {
        return super::cpu::cpu_attention(q, k, v, mask, scale as f32);
    }
    if !matches!(q.device(), Device::Metal(_)) {
        return attend_reference(q, k, v, mask, scale);
    }
    let hd = q.dim(3)?;
    if policy.metal && attn_backend(q.device(), hd) == AttnBackend::Custom {
        let params = AttnParams {
            scale: scale as f32,
            mask: mask.cloned(),
            ..AttnParams::new(hd)
        };
        return flash_attention(q, k, v, &params);
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
/// dimension so K/V are never repeated: (b, n_kv, n_rep·t, hd) · (b, n_kv, hd, T). Differentiable
/// (LoRA training): its softmax is [`crate::model::ops::softmax_last_dim`], which takes the
/// plain-op twin when the scores are part of an autograd graph.
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
    let probs = crate::model::ops::softmax_last_dim(&scores)?;
    let y = probs.matmul(&v.contiguous()?)?; // (b, n_kv, n_rep·t, hd)
    Ok(y.reshape((b, h, t, hd))?)
}

fn unsupported(reason: String) -> Error {
    Error::UnsupportedKernel { op: OP, reason }
}

/// Validated sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Batch rows.
    pub b: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (h is a multiple).
    pub n_kv: usize,
    /// Query positions per row.
    pub t: usize,
    /// Key positions (cache included).
    pub kv_len: usize,
    /// Head dimension.
    pub d: usize,
    /// Position of the first query within the keys.
    pub q_offset: usize,
}

impl AttnDims {
    /// Checks shapes and dtypes of q, k, v and the mask.
    pub fn of(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Self> {
        let (b, h, t, d) = q.dims4()?;
        let (kb, n_kv, kv_len, kd) = k.dims4()?;
        if kb != b
            || kd != d
            || v.dims() != k.dims()
            || n_kv == 0
            || h % n_kv != 0
            || t == 0
            || kv_len == 0
        {
            return Err(unsupported(format!(
                "q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        if ElemType::from_float_dtype(q.dtype()).is_none()
            || k.dtype() != q.dtype()
            || v.dtype() != q.dtype()
        {
            return Err(unsupported(format!(
                "dtypes q {:?}, k {:?}, v {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            )));
        }
        if let Some(m) = &p.mask {
            if m.dims() != [t, kv_len] {
                return Err(unsupported(format!(
                    "mask {:?}, want ({t}, {kv_len})",
                    m.dims()
                )));
            }
        }
        if p.window == Some(0) {
            return Err(unsupported("window of 0 keys".into()));
        }
        let q_offset = match p.q_offset {
            Some(o) => o,
            None => kv_len
                .checked_sub(t)
                .ok_or_else(|| unsupported(format!("t = {t} > kv_len = {kv_len}")))?,
        };
        Ok(Self {
            b,
            h,
            n_kv,
            t,
            kv_len,
            d,
            q_offset,
        })
    }

    fn visible(&self, p: &AttnParams, i: usize, key: usize) -> bool {
        let pos = self.q_offset + i;
        (!p.causal || key <= pos) && p.window.is_none_or(|w| pos < key + w)
    }
}

/// The additive mask (t, kv_len) equivalent to causal + window + mask, or `None`.
fn combined_mask(
    dims: &AttnDims,
    p: &AttnParams,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    if !p.causal && p.window.is_none() {
        return Ok(match &p.mask {
            Some(m) => Some(m.to_dtype(dtype)?),
            None => None,
        });
    }
    let mut m = vec![0f32; dims.t * dims.kv_len];
    for i in 0..dims.t {
        for key in 0..dims.kv_len {
            if !dims.visible(p, i, key) {
                m[i * dims.kv_len + key] = f32::NEG_INFINITY;
            }
        }
    }
    let m = Tensor::from_vec(m, (dims.t, dims.kv_len), device)?;
    let m = match &p.mask {
        Some(extra) => (m + extra.to_dtype(DType::F32)?)?,
        None => m,
    };
    Ok(Some(m.to_dtype(dtype)?))
}

/// The dispatches of one attention call: prefill, or decode + reduce.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnPlan {
    /// The kernel arguments.
    pub args: AttnArgs,
    /// The attention dispatch.
    pub main: Launch,
    /// The split-K reduction, for split decode.
    pub reduce: Option<Launch>,
}

/// K/V strides (elements) of a layout whose rows of d are contiguous: (batch, head), else None.
pub fn kv_strides(layout: &Layout, d: usize) -> Option<(usize, usize)> {
    match layout.stride() {
        [sb, sh, st, 1] if *st == d => Some((*sb, *sh)),
        _ => None,
    }
}

/// Plans the kernels for `dims` with K and V strides `(batch, head)` in elements.
pub fn attn_plan(
    dims: &AttnDims,
    p: &AttnParams,
    act: ElemType,
    k_strides: (usize, usize),
    v_strides: (usize, usize),
) -> Result<AttnPlan> {
    if !abi::ATTN_HEAD_DIMS.contains(&dims.d) {
        return Err(unsupported(format!(
            "head dim {} (supported: {:?})",
            dims.d,
            abi::ATTN_HEAD_DIMS
        )));
    }
    let decode = dims.t == 1;
    let kps = match p.decode_keys_per_split {
        Some(k) => k.max(1).next_multiple_of(abi::ATTN_BLOCK_KEYS),
        None => dims
            .kv_len
            .div_ceil(abi::DECODE_MAX_SPLITS)
            .next_multiple_of(abi::ATTN_BLOCK_KEYS)
            .max(abi::DECODE_MIN_KEYS_PER_SPLIT),
    };
    let n_splits = if decode { dims.kv_len.div_ceil(kps) } else { 1 };
    let u = |what: &str, v: usize| abi::to_u32(OP, what, v);
    let args = AttnArgs {
        batch: u("b", dims.b)?,
        n_heads: u("h", dims.h)?,
        n_kv_heads: u("n_kv", dims.n_kv)?,
        q_len: u("t", dims.t)?,
        kv_len: u("kv_len", dims.kv_len)?,
        q_offset: u("q_offset", dims.q_offset)?,
        window: u("window", p.window.unwrap_or(0))?,
        mask_row_stride: u("kv_len", dims.kv_len)?,
        k_batch_stride: u("k batch stride", k_strides.0)?,
        k_head_stride: u("k head stride", k_strides.1)?,
        v_batch_stride: u("v batch stride", v_strides.0)?,
        v_head_stride: u("v head stride", v_strides.1)?,
        keys_per_split: u("keys per split", kps)?,
        n_splits: u("splits", n_splits)?,
        scale: p.scale,
        pad: 0,
    };
    let constants = vec![
        (abi::FC_CAUSAL, p.causal),
        (abi::FC_HAS_MASK, p.mask.is_some()),
        (abi::FC_HAS_WINDOW, p.window.is_some()),
    ];
    let rows_per_tg = abi::ATTN_SIMDGROUPS * abi::ATTN_ROWS_PER_SIMDGROUP;
    let n_rep = dims.h / dims.n_kv;
    let shmem = (rows_per_tg * dims.d
        + abi::ATTN_BLOCK_KEYS * (dims.d + abi::ATTN_KV_PAD)
        + rows_per_tg * abi::ATTN_BLOCK_KEYS)
        * 4;
    let tg = [abi::ATTN_SIMDGROUPS * abi::SIMD_WIDTH, 1, 1];
    let name = |variant, w| kernel_name(Family::Attn, variant, w, act, Some(dims.d));
    let (main, reduce) = if decode {
        let main = Launch {
            kernel: name(Variant::Decode, act),
            grid: [n_splits, n_rep.div_ceil(rows_per_tg), dims.b * dims.n_kv],
            threadgroup: tg,
            tg_mem_bytes: Some(shmem),
            constants,
        };
        let reduce = Launch {
            kernel: name(Variant::Reduce, ElemType::F32),
            grid: [dims.b * dims.h, 1, 1],
            threadgroup: [abi::SIMD_WIDTH, 1, 1],
            tg_mem_bytes: None,
            constants: vec![],
        };
        (main, Some(reduce))
    } else {
        let main = Launch {
            kernel: name(Variant::Prefill, act),
            grid: [(n_rep * dims.t).div_ceil(rows_per_tg), dims.n_kv, dims.b],
            threadgroup: tg,
            tg_mem_bytes: Some(shmem),
            constants,
        };
        (main, None)
    };
    Ok(AttnPlan { args, main, reduce })
}

/// The custom op over (q, k, v): Metal kernels in `metal_fwd`, the reference in `cpu_fwd`.
#[derive(Debug, Clone)]
pub struct FlashAttention {
    pub(crate) params: AttnParams,
}

/// Reference attention over host f32 arrays (contiguous q, k, v; mask (t, kv_len)): the twin of
/// the Metal kernels, with their treatment of NaN and ±Inf (a key is skipped only when hidden;
/// docs/KERNELS.md, "NaN and Inf").
pub(crate) fn attention_host(
    dims: &AttnDims,
    p: &AttnParams,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
) -> Vec<f32> {
    let AttnDims {
        b,
        h,
        n_kv,
        t,
        kv_len,
        d,
        ..
    } = *dims;
    let n_rep = h / n_kv;
    let mut out = vec![0f32; b * h * t * d];
    let mut scores = vec![0f32; kv_len];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / n_rep;
            for i in 0..t {
                let qr = &q[((bi * h + hi) * t + i) * d..][..d];
                // A key is hidden by the causal/window masks or an additive −∞, and only then
                // skipped (V included); a visible key counts whatever its score or value.
                let hidden = |key: usize| !dims.visible(p, i, key) || mask.is_some_and(|m| m[i * kv_len + key] == f32::NEG_INFINITY);
                let (mut max, mut seen) = (f32::NEG_INFINITY, false);
                for (key, s) in scores.iter_mut().enumerate() {
                    if hidden(key) {
                        continue;
                    }
                    let kr = &k[((bi * n_kv + g) * kv_len + key) * d..][..d];
                    *s = qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * p.scale
                        + mask.map_or(0.0, |m| m[i * kv_len + key]);
                    max = if max.is_nan() || s.is_nan() { f32::NAN } else { max.max(*s) };
                    seen = true;
                }
                let o = &mut out[((bi * h + hi) * t + i) * d..][..d];
                if !seen {
                    continue; // no visible key: zeros
                }
                let mut sum = 0f32;
                for (key, s) in scores.iter().enumerate() {
                    if hidden(key) {
                        continue;
                    }
                    let w = (s - max).exp();
                    sum += w;
                    let vr = &v[((bi * n_kv + g) * kv_len + key) * d..][..d];
                    o.iter_mut().zip(vr).for_each(|(a, b)| *a += w * b);
                }
                o.iter_mut().for_each(|a| *a /= sum);
            }
        }
    }
    out
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "metal-candle-flash-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = ql.shape().dims4()?;
        let (_, n_kv, kv_len, _) = kl.shape().dims4()?;
        let q_offset = self.params.q_offset.unwrap_or(kv_len.saturating_sub(t));
        let dims = AttnDims {
            b,
            h,
            n_kv,
            t,
            kv_len,
            d,
            q_offset,
        };
        let mask = match &self.params.mask {
            Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let (q, k, v) = (
            cpu_to_f32(qs, ql)?,
            cpu_to_f32(ks, kl)?,
            cpu_to_f32(vs, vl)?,
        );
        let out = attention_host(&dims, &self.params, &q, &k, &v, mask.as_deref());
        Ok((f32_to_cpu(out, qs.dtype())?, ql.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        qs: &candle_core::MetalStorage,
        ql: &Layout,
        ks: &candle_core::MetalStorage,
        kl: &Layout,
        vs: &candle_core::MetalStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        super::metal::attention_fwd(self, (qs, ql), (ks, kl), (vs, vl))
    }
}
