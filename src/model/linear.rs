//! The linear layer: the one place weights are multiplied, and where adapters attach.
//!
//! A [`Linear`] holds its base weight (never modified) and an `Arc<[ActiveLora]>` of attached LoRA
//! adapters. Attaching or detaching an adapter replaces that `Arc` (and, for merged adapters, a
//! merged weight computed beside the base); the base tensor is shared, never copied or
//! re-quantized. A cloned [`crate::Model`] therefore keeps the adapter set it was cloned with.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use super::lora_delta::{lora_delta, lora_delta_reference};
use crate::error::{AdapterError, Error, Result};
use crate::kernels::cpu::{cpu_matmul, CpuWeight};
use crate::kernels::{LoraBatch, QWeight};

/// A weight matrix `(out_features, in_features)`, dense or GGML-quantized.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense weight in the model dtype, `(out, in)`.
    Dense(Tensor),
    /// Quantized weight; candle's quantized matmul takes f32 activations.
    Quantized(Arc<QTensor>),
    /// Quantized weight run by our Metal kernels ([`crate::kernels::qmatmul()`]), activations in
    /// the model dtype. Chosen at load on Metal when [`crate::kernels::KernelPolicy::metal`] is on.
    Kernel(Arc<QWeight>),
    /// Quantized or F16 weight run by our CPU kernels ([`crate::kernels::cpu`]). Chosen at load on
    /// the CPU when [`crate::kernels::KernelPolicy::cpu`] is on and the CPU has the kernels.
    Cpu(Arc<CpuWeight>),
}

impl LinearWeight {
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
            Self::Kernel(w) => return w.dims(),
            Self::Cpu(w) => return w.dims(),
        };
        match dims {
            [out, inp] => (*out, *inp),
            _ => (0, 0),
        }
    }
}

/// One of the seven projections of a decoder layer: the sites adapters attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    /// `self_attn.q_proj`: hidden → n_heads·hd.
    Q,
    /// `self_attn.k_proj`: hidden → n_kv·hd.
    K,
    /// `self_attn.v_proj`: hidden → n_kv·hd.
    V,
    /// `self_attn.o_proj`: n_heads·hd → hidden.
    O,
    /// `mlp.gate_proj`: hidden → intermediate.
    Gate,
    /// `mlp.up_proj`: hidden → intermediate.
    Up,
    /// `mlp.down_proj`: intermediate → hidden.
    Down,
}

impl Projection {
    /// All seven, in HF module order.
    pub const ALL: [Projection; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The module path inside a decoder layer, HF style (`self_attn.q_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// llama.cpp's tensor name inside a block (`attn_q`), as in `tensor_mapping.py`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Q => "attn_q",
            Self::K => "attn_k",
            Self::V => "attn_v",
            Self::O => "attn_output",
            Self::Gate => "ffn_gate",
            Self::Up => "ffn_up",
            Self::Down => "ffn_down",
        }
    }

    /// The projection whose HF module path (`self_attn.q_proj`) or llama.cpp name (`attn_q`) is `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.hf_name() == s || p.gguf_name() == s)
    }
}

/// The low-rank factors of one adapted projection: `Δy = (x·Aᵀ)·Bᵀ · scaling`.
#[derive(Debug)]
pub struct LoraWeights {
    a: Tensor, // (r, in), model dtype
    b: Tensor, // (out, r), model dtype
    /// The adapter's own factor for this module: `alpha / r` (or `alpha / √r` for rsLoRA).
    scaling: f64,
    /// Training only: PEFT's `lora_dropout` on the LoRA input, applied in a differentiable
    /// forward (never at inference).
    dropout: Option<Arc<LoraDropout>>,
}

/// PEFT's `lora_dropout` (`lora_B(lora_A(dropout(x)))`): `torch.nn.Dropout(p)` on the input of
/// the LoRA branch only, the base matmul sees `x` unchanged. Each call draws a fresh mask from a
/// generator seeded by [`LoraDropout::reseed`] and a per-call counter, so a training step's masks
/// are a function of its seed (resumable) and every adapted site gets its own mask.
#[derive(Debug)]
pub struct LoraDropout {
    p: f64,
    /// The forward's seed ([`LoraDropout::reseed`]); `seed` is it or a layer's seed from it.
    base: std::sync::atomic::AtomicU64,
    seed: std::sync::atomic::AtomicU64,
    calls: std::sync::atomic::AtomicU64,
    active: std::sync::atomic::AtomicBool,
}

impl LoraDropout {
    /// Dropout with probability `p` in [0, 1), active.
    pub fn new(p: f64) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        Self { p, base: AtomicU64::new(0), seed: AtomicU64::new(0), calls: AtomicU64::new(0), active: AtomicBool::new(true) }
    }

    /// The dropout probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// Starts a new forward: masks come from `seed` and the call order from here on.
    pub fn reseed(&self, seed: u64) {
        use std::sync::atomic::Ordering;
        self.base.store(seed, Ordering::SeqCst);
        self.seed.store(seed, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    /// Starts layer `layer` of the forward begun by [`LoraDropout::reseed`]: its masks come from
    /// (forward seed, layer) and the call order inside the layer, so a layer recomputed for its
    /// backward (gradient checkpointing) draws the masks it drew the first time.
    pub fn begin_layer(&self, layer: usize) {
        use std::sync::atomic::Ordering;
        let base = self.base.load(Ordering::SeqCst);
        self.seed.store(base ^ (layer as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F), Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    /// `false`: identity (PyTorch's `model.eval()`), e.g. for a validation loss.
    pub fn set_active(&self, on: bool) {
        self.active.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// x (rows, in) → x · mask / (1 − p), mask Bernoulli(1 − p), as `torch.nn.functional.dropout`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        use std::sync::atomic::Ordering;
        if self.p <= 0.0 || !self.active.load(Ordering::SeqCst) {
            return Ok(x.clone());
        }
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let seed = self.seed.load(Ordering::SeqCst) ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f64>() < keep { scale } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}

impl LoraWeights {
    /// Factors `a` (r, in) and `b` (out, r) with the module's `scaling`.
    ///
    /// Errors: [`AdapterError::ShapeMismatch`] if the ranks of `a` and `b` differ or are zero.
    pub fn new(a: Tensor, b: Tensor, scaling: f64) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (out, rb) = b.dims2()?;
        if r != rb || r == 0 {
            return Err(site_error(AdapterError::ShapeMismatch {
                tensor: "lora_B".into(),
                expected: vec![out, r],
                got: vec![out, rb],
            }));
        }
        Ok(Self { a, b, scaling, dropout: None })
    }

    /// The same factors with dropout on their input in a differentiable forward (training).
    pub fn with_dropout(mut self, dropout: Arc<LoraDropout>) -> Self {
        self.dropout = Some(dropout);
        self
    }

    /// A: (r, in).
    pub fn a(&self) -> &Tensor {
        &self.a
    }

    /// B: (out, r).
    pub fn b(&self) -> &Tensor {
        &self.b
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
    }

    /// `alpha / r` (or `alpha / √r`).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// `(out_features, in_features)` of the projection these factors adapt.
    pub fn dims(&self) -> (usize, usize) {
        let out = self.b.dims().first().copied().unwrap_or(0);
        let inp = self.a.dims().get(1).copied().unwrap_or(0);
        (out, inp)
    }

    /// Bytes held by A and B.
    pub fn bytes(&self) -> usize {
        (self.a.elem_count() + self.b.elem_count()) * self.a.dtype().size_in_bytes()
    }

    /// `scale · scaling · B·A` in f32: (out, in).
    pub fn delta_weight_f32(&self, scale: f64) -> Result<Tensor> {
        let b = self.b.to_dtype(DType::F32)?;
        let a = self.a.to_dtype(DType::F32)?;
        Ok((b.matmul(&a)? * (scale * self.scaling))?)
    }
}

/// An adapter attached to one linear layer.
#[derive(Debug, Clone)]
pub struct ActiveLora {
    /// The name it was applied under.
    pub name: Arc<str>,
    /// Its factors for this projection (shared with the adapter and every model clone).
    pub weights: Arc<LoraWeights>,
    /// The user's scale, multiplied with the module's own `scaling`.
    pub scale: f64,
    /// Folded into the layer's merged weight instead of computed per forward.
    pub merged: bool,
}

/// `y = x · Wᵀ (+ b) + Σ scale·(x·Aᵀ)·Bᵀ` over the attached, unmerged adapters.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight, // (out, in), the base: never modified
    bias: Option<Tensor>, // (out,)
    adapters: Arc<[ActiveLora]>,
    /// `W + Σ merged deltas` in the model dtype, (out, in); `None` when nothing is merged.
    merged_weight: Option<Tensor>,
}

impl Linear {
    /// A linear layer with no adapters.
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapters: Arc::from(Vec::new()),
            merged_weight: None,
        }
    }

    /// The base weight (unchanged by adapters, merged or not).
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The attached adapters, in application order.
    pub fn adapters(&self) -> &Arc<[ActiveLora]> {
        &self.adapters
    }

    /// Replaces the attached adapters. Merged ones are folded into a merged weight computed from
    /// the base (never from a previous merge), so removing every merged adapter restores the base
    /// weight exactly; with none merged, no merged weight is kept.
    ///
    /// Errors: [`AdapterError::ShapeMismatch`] if an adapter's dims differ from the base's;
    /// [`AdapterError::MergeQuantized`] when merging into a quantized base.
    pub fn set_adapters(&mut self, adapters: Vec<ActiveLora>) -> Result<()> {
        let (out, inp) = self.weight.dims();
        if let Some(bad) = adapters.iter().find(|a| a.weights.dims() != (out, inp)) {
            let (o, i) = bad.weights.dims();
            return Err(site_error(AdapterError::ShapeMismatch {
                tensor: format!("adapter `{}`", bad.name),
                expected: vec![out, inp],
                got: vec![o, i],
            }));
        }
        let merged_before: Vec<_> = self.merged_set();
        let merged_after: Vec<_> = merged_of(&adapters);
        if merged_before != merged_after {
            self.merged_weight = self.merge(&adapters)?;
        }
        self.adapters = Arc::from(adapters);
        Ok(())
    }

    fn merged_set(&self) -> Vec<(Arc<str>, u64, usize)> {
        merged_of(&self.adapters)
    }

    /// `W + Σ scale·scaling·B·A` over merged adapters, accumulated in f32 and cast back once.
    fn merge(&self, adapters: &[ActiveLora]) -> Result<Option<Tensor>> {
        let merged: Vec<&ActiveLora> = adapters.iter().filter(|a| a.merged).collect();
        if merged.is_empty() {
            return Ok(None);
        }
        let LinearWeight::Dense(w) = &self.weight else {
            return Err(site_error(AdapterError::MergeQuantized {
                adapter: merged.first().map(|a| a.name.to_string()).unwrap_or_default(),
            }));
        };
        let mut acc = w.to_dtype(DType::F32)?; // (out, in)
        for a in merged {
            acc = (acc + a.weights.delta_weight_f32(a.scale)?)?;
        }
        Ok(Some(acc.to_dtype(w.dtype())?))
    }

    /// x: (..., in) → (..., out), in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, lead) = rows_of(x)?; // (rows, in)
        let y = self.base_forward(&x2)?; // (rows, out)
        self.finish(&x2, y, &lead)
    }

    /// Several layers reading the same `x` (q/k/v, gate/up): the same outputs as calling
    /// [`Linear::forward`] on each. When all of them run on our CPU kernels (and none has merged
    /// adapters) their base matmuls are one kernel call: the activations are quantized once and
    /// the thread pool is dispatched once.
    pub fn forward_group(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let (x2, lead) = rows_of(x)?; // (rows, in)
        let bases = Self::base_group(layers, &x2)?;
        layers.iter().zip(bases).map(|(l, y)| l.finish(&x2, y, &lead)).collect()
    }

    /// Base outputs (rows, out) of `layers` on `x2` (rows, in), bias included, adapters not:
    /// one CPU kernel call when every layer can share it.
    fn base_group(layers: &[&Linear], x2: &Tensor) -> Result<Vec<Tensor>> {
        let rows = x2.dim(0)?;
        let cpu: Option<Vec<&CpuWeight>> = layers
            .iter()
            .map(|l| match (&l.weight, &l.merged_weight) {
                (LinearWeight::Cpu(w), None) if w.prefers_candle(rows).is_none() => Some(w.as_ref()),
                _ => None,
            })
            .collect();
        let Some(weights) = cpu.filter(|w| w.len() > 1 && !super::ops::needs_grad(&[x2])) else {
            return layers.iter().map(|l| l.base_forward(x2)).collect();
        };
        let y = cpu_matmul(x2, &weights)?; // (rows, Σ out)
        let mut start = 0;
        let mut outs = Vec::with_capacity(layers.len());
        for (l, w) in layers.iter().zip(&weights) {
            let (n, _) = w.dims();
            let part = y.narrow(1, start, n)?.contiguous()?; // (rows, out)
            outs.push(match &l.bias {
                Some(b) => part.broadcast_add(b)?,
                None => part,
            });
            start += n;
        }
        Ok(outs)
    }

    /// The rows of one step where contiguous row ranges use different adapter sets:
    /// `sites[p][v]` is projection p as variant v of the model has it (every variant shares the
    /// base weights; their adapters differ). x2: (rows, in) → one (rows, out) per projection.
    /// The base matmul runs once over all rows; each range then adds its own variant's unmerged
    /// deltas (a range whose variant merged an adapter into this site runs that site whole).
    pub(crate) fn forward_mixed(sites: &[Vec<&Linear>], x2: &Tensor, ranges: &[RowRange]) -> Result<Vec<Tensor>> {
        let on_kernels = |v: &Vec<&Linear>| matches!(v.first().map(|l| &l.weight), Some(LinearWeight::Kernel(_)));
        if !sites.iter().any(on_kernels) {
            return Self::forward_mixed_plain(sites, x2, ranges);
        }
        // Projections the epilogue takes are done; the others run the plain path together.
        let fused: Vec<Option<Tensor>> = sites.iter().map(|v| Self::fused_mixed(v, x2, ranges)).collect::<Result<_>>()?;
        let rest: Vec<Vec<&Linear>> = sites.iter().zip(&fused).filter(|(_, f)| f.is_none()).map(|(v, _)| v.clone()).collect();
        let mut plain = Self::forward_mixed_plain(&rest, x2, ranges)?.into_iter();
        fused.into_iter().map(|f| f.or_else(|| plain.next()).ok_or_else(no_variant)).collect()
    }

    /// [`Linear::forward_mixed`] without the fused epilogue: one base matmul over all rows, then
    /// each range's unmerged deltas through the plain ops.
    fn forward_mixed_plain(sites: &[Vec<&Linear>], x2: &Tensor, ranges: &[RowRange]) -> Result<Vec<Tensor>> {
        if sites.is_empty() {
            return Ok(Vec::new());
        }
        if let [only] = ranges {
            let layers: Vec<&Linear> = sites.iter().map(|v| v.get(only.variant).copied()).collect::<Option<_>>().ok_or_else(no_variant)?;
            let bases = Self::base_group(&layers, x2)?;
            return layers.iter().zip(bases).map(|(l, y)| l.add_adapters(x2, y)).collect();
        }
        let base_sites: Vec<&Linear> = sites.iter().map(|v| v.first().copied()).collect::<Option<_>>().ok_or_else(no_variant)?;
        let bases = Self::base_group(&base_sites, x2)?;
        let mut outs = Vec::with_capacity(sites.len());
        for (variants, base) in sites.iter().zip(bases) {
            let mut pieces = Vec::with_capacity(ranges.len());
            for r in ranges {
                let site = variants.get(r.variant).copied().ok_or_else(no_variant)?;
                let xr = x2.narrow(0, r.start, r.len)?; // (len, in)
                let piece = if site.merged_weight.is_some() {
                    site.base_forward(&xr)?
                } else {
                    base.narrow(0, r.start, r.len)?
                };
                pieces.push(site.add_adapters(&xr, piece)?);
            }
            outs.push(Tensor::cat(&pieces, 0)?); // (rows, out)
        }
        Ok(outs)
    }

    /// One projection of a step through our quantized kernels' fused per-row LoRA epilogue
    /// ([`crate::kernels::qmatmul()`] with a [`LoraBatch`]): the base matmul and every row's own
    /// adapter in one call, rows of different variants (adapter sets) together. `variants[v]` is
    /// the projection as variant `v` has it. `None` (the caller takes the plain path) unless the
    /// base weight runs on those kernels ([`LinearWeight::Kernel`]: Metal with
    /// [`crate::kernels::KernelPolicy::metal`]), no variant merged an adapter here, each variant
    /// has at most one unmerged adapter here, some row has one, and nothing needs a gradient.
    /// Ranks may differ: A and B are zero-padded to the largest (the padded terms add exact zeros).
    fn fused_mixed(variants: &[&Linear], x2: &Tensor, ranges: &[RowRange]) -> Result<Option<Tensor>> {
        let Some(base) = variants.first() else { return Ok(None) };
        let LinearWeight::Kernel(w) = &base.weight else { return Ok(None) };
        if super::ops::needs_grad(&[x2]) {
            return Ok(None);
        }
        // The adapter of each range, deduplicated into the bank's entries.
        let mut bank: Vec<&ActiveLora> = Vec::new();
        let mut range_ids = Vec::with_capacity(ranges.len());
        for r in ranges {
            let site = variants.get(r.variant).copied().ok_or_else(no_variant)?;
            let same_base = matches!(&site.weight, LinearWeight::Kernel(v) if Arc::ptr_eq(v, w));
            if site.merged_weight.is_some() || !same_base || site.bias.is_some() != base.bias.is_some() {
                return Ok(None);
            }
            let mut unmerged = site.adapters.iter().filter(|a| !a.merged);
            let (first, second) = (unmerged.next(), unmerged.next());
            if second.is_some() || first.is_some_and(|a| super::ops::needs_grad(&[&a.weights.a, &a.weights.b])) {
                return Ok(None);
            }
            range_ids.push(match first {
                None => crate::kernels::NO_ADAPTER,
                Some(a) => {
                    let same = |b: &&ActiveLora| Arc::ptr_eq(&b.weights, &a.weights) && b.scale.to_bits() == a.scale.to_bits();
                    let i = bank.iter().position(same).unwrap_or_else(|| {
                        bank.push(a);
                        bank.len() - 1
                    });
                    i as u32 // at most one entry per range
                }
            });
        }
        if bank.is_empty() {
            return Ok(None);
        }
        let (dtype, dev) = (x2.dtype(), x2.device());
        let r_max = bank.iter().map(|a| a.weights.rank()).max().unwrap_or(0);
        let mut a_s = Vec::with_capacity(bank.len());
        let mut b_s = Vec::with_capacity(bank.len());
        let mut scales = Vec::with_capacity(bank.len());
        for a in &bank {
            let (lw, pad) = (&a.weights, r_max - a.weights.rank());
            a_s.push(lw.a.to_dtype(dtype)?.pad_with_zeros(0, 0, pad)?); // (r_max, in)
            b_s.push(lw.b.to_dtype(dtype)?.pad_with_zeros(1, 0, pad)?); // (out, r_max)
            scales.push((a.scale * lw.scaling) as f32);
        }
        let ids: Vec<u32> = ranges.iter().zip(&range_ids).flat_map(|(r, &id)| std::iter::repeat_n(id, r.len)).collect();
        let lora = LoraBatch {
            a: Tensor::stack(&a_s, 0)?,                     // (n_adapters, r, in)
            b: Tensor::stack(&b_s, 0)?,                     // (n_adapters, out, r)
            scales: Tensor::new(scales.as_slice(), dev)?,   // (n_adapters,)
            ids: Tensor::new(ids.as_slice(), dev)?,         // (rows,)
        };
        let y = crate::kernels::qmatmul(x2, w, Some(&lora))?; // (rows, out)
        Ok(Some(match &base.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
    }

    /// `y` (rows, out) plus this layer's unmerged adapter deltas on `x2` (rows, in).
    fn add_adapters(&self, x2: &Tensor, mut y: Tensor) -> Result<Tensor> {
        for a in self.adapters.iter().filter(|a| !a.merged) {
            let w = &a.weights;
            let factor = a.scale * w.scaling;
            // The dot-product path has no backward: training (a graph through x, A or B) takes
            // the plain-op twin.
            let delta = if super::ops::needs_grad(&[x2, &w.a, &w.b]) {
                let x_in = match &w.dropout {
                    Some(d) => d.apply(x2)?,
                    None => x2.clone(),
                };
                lora_delta_reference(&x_in, &w.a, &w.b, factor)?
            } else {
                lora_delta(x2, &w.a, &w.b, factor)?
            };
            y = (y + delta)?; // (rows, out)
        }
        Ok(y)
    }

    /// Adds the unmerged adapters to the base output `y` (rows, out) of `x2` (rows, in), then
    /// restores the leading dims: (..., out).
    fn finish(&self, x2: &Tensor, y: Tensor, lead: &[usize]) -> Result<Tensor> {
        let y = self.add_adapters(x2, y)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(y.dim(1)?);
        Ok(y.reshape(out_dims)?)
    }

    /// x2: (rows, in) → (rows, out) through the base (or merged) weight and the bias.
    fn base_forward(&self, x2: &Tensor) -> Result<Tensor> {
        let grad = super::ops::needs_grad(&[x2]);
        let y = match (&self.merged_weight, &self.weight) {
            (Some(w), _) | (None, LinearWeight::Dense(w)) if grad && !super::ops::needs_grad(&[w]) => x2.apply_op2(w, FrozenDense)?,
            (Some(w), _) | (None, LinearWeight::Dense(w)) => x2.matmul(&w.t()?)?,
            (None, LinearWeight::Quantized(q)) if grad => trainable_qmatmul(x2, q)?,
            (None, LinearWeight::Kernel(_) | LinearWeight::Cpu(_)) if grad => {
                return Err(Error::UnsupportedKernel {
                    op: "linear",
                    reason: "our quantized kernels have no backward: load the base with KernelPolicy::CANDLE to train".into(),
                })
            }
            (None, LinearWeight::Quantized(q)) => candle_qmatmul(x2, q)?,
            (None, LinearWeight::Kernel(w)) => crate::kernels::qmatmul(x2, w, None)?,
            (None, LinearWeight::Cpu(w)) => match w.prefers_candle(x2.dim(0)?) {
                Some(q) => candle_qmatmul(x2, q)?,
                None => cpu_matmul(x2, &[w.as_ref()])?,
            },
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// A run of consecutive token rows of one step that use the same variant (adapter set) of the
/// model: rows `start..start + len` use variant `variant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowRange {
    pub variant: usize,
    pub start: usize,
    pub len: usize,
}

fn no_variant() -> Error {
    Error::InvalidBatch { reason: "a row names a model variant the step does not have".into() }
}

/// candle's quantized matmul (f32 inside) on x2 (rows, in) → (rows, out) in x2's dtype. Rows of
/// x2 holding NaN/Inf give NaN rows (candle's 8-bit activations would make them 0: issue 18).
fn candle_qmatmul(x2: &Tensor, q: &QTensor) -> Result<Tensor> {
    let dtype = x2.dtype();
    let x = x2.to_dtype(DType::F32)?;
    let y = super::finite::propagate_rows(&x, &x.apply_op1_no_bwd(q)?)?;
    Ok(y.to_dtype(dtype)?)
}

/// [`candle_qmatmul`] with a backward for the activations: a frozen quantized base in a training
/// graph (QLoRA). dX = dY·W with W dequantized for the call and dropped after it; W itself gets no
/// gradient. x2 (rows, in) → (rows, out).
fn trainable_qmatmul(x2: &Tensor, q: &Arc<QTensor>) -> Result<Tensor> {
    let dtype = x2.dtype();
    let x = x2.to_dtype(DType::F32)?;
    let y = x.apply_op1(FrozenQMatMul(q.clone()))?;
    Ok(super::finite::propagate_rows(&x, &y)?.to_dtype(dtype)?)
}

/// candle's quantized matmul as a differentiable op (see [`trainable_qmatmul`]).
struct FrozenQMatMul(Arc<QTensor>);

impl candle_core::CustomOp1 for FrozenQMatMul {
    fn name(&self) -> &'static str {
        "frozen-qmatmul"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::CustomOp1::cpu_fwd(self.0.as_ref(), s, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &candle_core::MetalStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
        candle_core::CustomOp1::metal_fwd(self.0.as_ref(), s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        candle_core::CustomOp1::cuda_fwd(self.0.as_ref(), s, l)
    }

    /// dL/dx = dL/dy · W: (rows, out) · (out, in).
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.0.dequantize(grad_y.device())?; // (out, in) f32
        Ok(Some(grad_y.matmul(&w)?))
    }
}

/// `x2 (rows, in) · Wᵀ` for a frozen dense weight `W (out, in)` in a training graph, with a
/// backward for the activations only: dX = dY·W. candle's own matmul backward also computes
/// dW = Xᵀ·dY, a second product as large as the forward, for a weight that never trains (and
/// keeps it until the backward ends). The forward is the backend's own matmul, so the values are
/// those of `x2.matmul(&w.t())` on every device.
struct FrozenDense;

impl FrozenDense {
    fn fwd<S: candle_core::backend::BackendStorage>(
        x: &S,
        xl: &candle_core::Layout,
        w: &S,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, kw) = wl.shape().dims2()?;
        if k != kw {
            candle_core::bail!("frozen-dense: activations have {k} features, the weight takes {kw}");
        }
        let y = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((y, candle_core::Shape::from((m, n))))
    }
}

impl candle_core::CustomOp2 for FrozenDense {
    fn name(&self) -> &'static str {
        "frozen-dense"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Self::fwd(x, xl, w, wl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &candle_core::Layout,
        w: &candle_core::MetalStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
        Self::fwd(x, xl, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        w: &candle_core::CudaStorage,
        wl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Self::fwd(x, xl, w, wl)
    }

    /// dL/dx = dL/dy · W: (rows, out) · (out, in); none for W.
    fn bwd(&self, _x: &Tensor, w: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_y.matmul(w)?), None))
    }
}

/// x (..., in) → (rows, in) and the leading dims.
fn rows_of(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        return Err(candle_core::Error::Msg("linear: input has no dims".into()).into());
    };
    let rows: usize = lead.iter().product();
    Ok((x.reshape((rows, in_features))?, lead.to_vec()))
}

/// The (name, scale bits, weights identity) of the merged adapters, to detect when the merged weight must change.
fn merged_of(adapters: &[ActiveLora]) -> Vec<(Arc<str>, u64, usize)> {
    adapters
        .iter()
        .filter(|a| a.merged)
        .map(|a| (a.name.clone(), a.scale.to_bits(), Arc::as_ptr(&a.weights) as usize))
        .collect()
}

/// An adapter error found at a linear layer; the caller knows no file, so the path is empty.
fn site_error(source: AdapterError) -> Error {
    Error::Adapter {
        path: std::path::PathBuf::new(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::CpuWeight;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    /// The kernel-backed weight (what Metal uses with custom kernels on) gives the same result as
    /// candle's quantized path; on the CPU it routes through `kernels::qmatmul`'s candle path.
    #[test]
    fn kernel_weights_match_candle_quantized_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 64), &dev).unwrap(); // (out, in)
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let bias = Tensor::randn(0f32, 1.0, 40, &dev).unwrap();
        let plain = Linear::new(LinearWeight::Quantized(q.clone()), Some(bias.clone()));
        let kernel_w = QWeight::from_qtensor(q).unwrap();
        let kernel = Linear::new(LinearWeight::Kernel(Arc::new(kernel_w)), Some(bias));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap(); // (b, t, in)
        let (a, b) = (plain.forward(&x).unwrap(), kernel.forward(&x).unwrap());
        assert_eq!(a.dims(), &[2, 3, 40]);
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        assert_eq!(kernel.weight().dims(), (40, 64));
    }

    /// A mixed step on kernel weights (what Metal runs with custom kernels on) goes through the
    /// fused per-row LoRA epilogue: rows of four variants — none, a rank-2 adapter, a rank-4
    /// adapter at another scale, the rank-2 adapter again — in one call equal each variant's own
    /// plain forward on its rows. On the CPU the epilogue is `kernels::qmatmul`'s candle path.
    #[test]
    fn fused_mixed_adapters_equal_each_variant_alone() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 64), &dev).unwrap(); // (out, in)
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let bias = Tensor::randn(0f32, 1.0, 24, &dev).unwrap();
        let base = Linear::new(LinearWeight::Kernel(Arc::new(QWeight::from_qtensor(q).unwrap())), Some(bias));
        let lora = |r: usize| {
            let a = Tensor::randn(0f32, 1.0, (r, 64), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (24, r), &dev).unwrap();
            Arc::new(LoraWeights::new(a, b, 2.0 / r as f64).unwrap())
        };
        let (l2, l4) = (lora(2), lora(4));
        let with = |weights: &Arc<LoraWeights>, scale: f64| {
            let mut l = base.clone();
            l.set_adapters(vec![ActiveLora { name: "x".into(), weights: weights.clone(), scale, merged: false }]).unwrap();
            l
        };
        let variants = [base.clone(), with(&l2, 1.0), with(&l4, 0.5), with(&l2, 1.0)];
        let sites: Vec<&Linear> = variants.iter().collect();
        let ranges = [
            RowRange { variant: 1, start: 0, len: 3 },
            RowRange { variant: 0, start: 3, len: 2 },
            RowRange { variant: 2, start: 5, len: 3 },
            RowRange { variant: 3, start: 8, len: 1 },
        ];
        let x = Tensor::randn(0f32, 1.0, (9, 64), &dev).unwrap(); // (rows, in)
        assert!(Linear::fused_mixed(&sites, &x, &ranges).unwrap().is_some(), "the epilogue path applies");
        let [y]: [Tensor; 1] = Linear::forward_mixed(std::slice::from_ref(&sites), &x, &ranges).unwrap().try_into().unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        for r in &ranges {
            let xr = x.narrow(0, r.start, r.len).unwrap();
            let alone = variants[r.variant].forward(&xr).unwrap();
            let got = y.narrow(0, r.start, r.len).unwrap();
            assert!(max_diff(&got, &alone) < 1e-4, "variant {} rows {}..", r.variant, r.start);
            if r.variant != 0 {
                assert!(max_diff(&got, &base.forward(&xr).unwrap()) > 1e-2, "variant {} has an effect", r.variant);
            }
        }
        // Two unmerged adapters on one variant: the plain path (one id per row cannot hold both).
        let mut two = base.clone();
        let both = [(&l2, 1.0), (&l4, 1.0)].map(|(w, s)| ActiveLora { name: "y".into(), weights: w.clone(), scale: s, merged: false });
        two.set_adapters(both.to_vec()).unwrap();
        let only = [RowRange { variant: 0, start: 0, len: 9 }];
        assert!(Linear::fused_mixed(&[&two], &x, &only).unwrap().is_none());
        let [y2]: [Tensor; 1] = Linear::forward_mixed(&[vec![&two]], &x, &only).unwrap().try_into().unwrap();
        assert!(max_diff(&y2, &two.forward(&x).unwrap()) < 1e-4);
    }

    /// A group call (one CPU kernel call for q/k/v-like layers) equals separate forwards, with a
    /// bias on one layer and an unmerged adapter on another.
    #[test]
    fn grouped_forward_equals_separate_forwards() {
        let dev = Device::Cpu;
        let cpu = |n: usize, q: GgmlDType| {
            let w = Tensor::randn(0f32, 1.0, (n, 64), &dev).unwrap();
            let qt = QTensor::quantize(&w, q).unwrap();
            LinearWeight::Cpu(Arc::new(CpuWeight::from_qtensor(&qt).unwrap()))
        };
        let bias = Tensor::randn(0f32, 1.0, 16, &dev).unwrap();
        let a = Linear::new(cpu(16, GgmlDType::Q4_0), Some(bias));
        let mut b = Linear::new(cpu(8, GgmlDType::Q8_0), None);
        let lora = LoraWeights::new(
            Tensor::randn(0f32, 1.0, (2, 64), &dev).unwrap(),
            Tensor::randn(0f32, 1.0, (8, 2), &dev).unwrap(),
            0.5,
        )
        .unwrap();
        b.set_adapters(vec![ActiveLora { name: "x".into(), weights: Arc::new(lora), scale: 1.0, merged: false }])
            .unwrap();
        let c = Linear::new(cpu(24, GgmlDType::F16), None);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap(); // (b, t, in)
        let group = Linear::forward_group(&[&a, &b, &c], &x).unwrap();
        for (g, l) in group.iter().zip([&a, &b, &c]) {
            let single = l.forward(&x).unwrap();
            assert_eq!(g.dims(), single.dims());
            let diff = (g - single).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        }
    }
}
