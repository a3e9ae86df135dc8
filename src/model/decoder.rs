//! The transformer decoder shared by every architecture.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use super::attention::{Attention, QkNorm, StepCtx};
use super::batch::{RowLogits, StepBatch, StepPlan, StepTensors};
use super::embedding::EmbeddingWeight;
use super::kv_cache::{KvCache, KvPool};
use super::linear::{Linear, LinearWeight, Projection, RowRange};
use super::ops;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::kernels::KernelPolicy;
use crate::error::{Error, Result};
use crate::loader::weights::WeightSource;

/// SwiGLU MLP: down(silu(gate(x)) · up(x)).
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear, // hidden → intermediate
    up_proj: Linear,   // hidden → intermediate
    down_proj: Linear, // intermediate → hidden
}

impl Mlp {
    /// x (N, hidden) → (N, hidden); rows in each range use that range's variant of this MLP.
    fn forward_batch(variants: &[&Mlp], x: &Tensor, ranges: &[RowRange]) -> Result<Tensor> {
        let sites = |f: fn(&Mlp) -> &Linear| variants.iter().map(|m| f(m)).collect::<Vec<_>>();
        let [gate, up]: [Tensor; 2] =
            Linear::forward_mixed(&[sites(|m| &m.gate_proj), sites(|m| &m.up_proj)], x, ranges)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("mlp: expected two outputs".into()))?;
        let h = ops::silu_mul(&gate, &up)?; // (N, intermediate)
        let [down]: [Tensor; 1] = Linear::forward_mixed(&[sites(|m| &m.down_proj)], &h, ranges)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("mlp: expected one output".into()))?;
        Ok(down)
    }
}

/// Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: Tensor, // (hidden,)
    self_attn: Attention,
    post_attention_layernorm: Tensor, // (hidden,)
    mlp: Mlp,
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: (b, t, vocab). For perplexity and tests.
    All,
    /// Only the last position: (b, vocab). For generation.
    Last,
}

/// A loaded decoder-only transformer. Cheap to clone (tensors are reference-counted).
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    embed_tokens: EmbeddingWeight, // (vocab, hidden); the lm_head's weight when tied
    layers: Vec<DecoderLayer>,
    norm: Tensor, // (hidden,)
    lm_head: Linear, // hidden → vocab
    rope: Rope,
    max_positions: usize,
    device: Device,
    dtype: DType,
    /// Identity of the loaded weights, shared by clones (adapter variants): KV pools and step
    /// batches are checked against it.
    uid: u64,
    kernels: KernelPolicy,
}

/// Source of [`Model::uid`].
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

impl Model {
    /// Builds the decoder from `weights` (HF names). `max_positions` bounds the context (RoPE
    /// tables and KV caches); it is clamped to the model's `max_position_embeddings`.
    pub fn load(
        config: ModelConfig,
        weights: &dyn WeightSource,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = &config;
        let (hidden, vocab) = (cfg.hidden_size, cfg.vocab_size);
        const EMBED: &str = "model.embed_tokens.weight";
        // Tied: the table is read once, as the lm_head, and the embedding looks rows up in it.
        // An untied model without `lm_head.weight` is an error, not a silent tie.
        let tied_head = if cfg.tie_word_embeddings { Some(weights.linear(EMBED, vocab, hidden)?) } else { None };
        let embed_tokens = weights.embedding(EMBED, vocab, hidden, tied_head.as_ref())?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| load_layer(cfg, weights, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = weights.tensor("model.norm.weight", &[hidden])?;
        let head = match tied_head {
            Some(head) => head,
            None => weights.linear("lm_head.weight", vocab, hidden)?,
        };
        let lm_head = Linear::new(head, None);
        let max_positions = max_positions.min(cfg.max_position_embeddings).max(1);
        let rope = Rope::new(cfg, max_positions, dtype, device)?;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            max_positions,
            device: device.clone(),
            dtype,
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            kernels: KernelPolicy::default(),
        })
    }

    /// The same model computing with `kernels` (attention; projections were chosen by the
    /// weight source at load).
    pub fn with_kernels(mut self, kernels: KernelPolicy) -> Self {
        self.kernels = kernels;
        self
    }

    /// The kernel policy the model runs with.
    pub fn kernels(&self) -> KernelPolicy {
        self.kernels
    }

    /// Identity of the loaded weights: clones (e.g. with other adapters attached) share it, a
    /// model loaded again gets a new one.
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// The normalised model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device its weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations are computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The longest sequence (prompt + generated) this instance accepts.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Bytes of projection weights (every layer's q/k/v/o/gate/up/down and the lm_head) as
    /// stored: what one decode step must read, the basis of the bandwidth roofline.
    pub fn projection_bytes(&self) -> usize {
        let linear_bytes = |l: &Linear| match l.weight() {
            LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
            LinearWeight::Kernel(w) => w.bytes().elem_count(),
            LinearWeight::Cpu(w) => w.bytes(),
        };
        let per_layer: usize =
            self.layers.iter().map(|l| l.projections().into_iter().map(|(_, p)| linear_bytes(p)).sum::<usize>()).sum();
        per_layer + linear_bytes(&self.lm_head)
    }

    /// Whether `other` computes with the same adapters at every site (clones taken between the same
    /// adapter changes do): rows of both can share one variant in a step.
    pub fn same_adapters(&self, other: &Model) -> bool {
        self.uid == other.uid
            && self.layers.len() == other.layers.len()
            && self.layers.iter().zip(&other.layers).all(|(a, b)| {
                a.projections().into_iter().zip(b.projections()).all(|((_, x), (_, y))| {
                    let (x, y) = (x.adapters(), y.adapters());
                    (x.is_empty() && y.is_empty()) || std::sync::Arc::ptr_eq(x, y)
                })
            })
    }

    /// The decoder layers (adapter plumbing: the projections are the adapter sites).
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The decoder layers, mutably: for attaching adapters ([`crate::adapter::ApplyAdapter`]).
    pub fn layers_mut(&mut self) -> &mut [DecoderLayer] {
        &mut self.layers
    }

    /// A fresh, empty KV cache for one call sequence of [`Model::forward`].
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_owner(&self.config.layer_windows, self.max_positions, self.uid)
    }

    /// A pool of `n_slots` KV slots of `capacity` positions each (at most
    /// [`Model::max_positions`]) for [`Model::forward_batch`].
    pub fn new_pool(&self, n_slots: usize, capacity: usize) -> KvPool {
        KvPool::new(&self.config.layer_windows, n_slots, capacity.min(self.max_positions)).with_owner(self.uid)
    }

    /// Runs `ids` (b, t) of u32 token ids, positioned after what `cache` holds, and appends their
    /// keys/values to `cache`. Returns logits in f32: (b, t, vocab) or (b, vocab) for
    /// [`Logits::Last`]. Ids ≥ vocab and contexts past [`Model::max_positions`] are errors.
    ///
    /// A thin wrapper over [`Model::forward_batch`]: each of the b rows is one slot of the cache.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let logits = match which {
            Logits::All => RowLogits::All,
            Logits::Last => RowLogits::Last,
        };
        let (batch, b, t) = self.wrapper_batch(ids, cache, logits)?;
        let y = self.forward_batch(&batch, cache.pool_for_rows(b)?)?; // (b·t or b, vocab)
        super::finite::check_logits(&y)?; // NaN/Inf is an error, never a distribution
        Ok(match which {
            Logits::All => y.reshape((b, t, self.config.vocab_size))?,
            Logits::Last => y,
        })
    }

    /// The step of [`Model::forward`]: row r of `ids` (b, t) continues slot r of `cache`.
    fn wrapper_batch(&self, ids: &Tensor, cache: &mut KvCache, logits: RowLogits) -> Result<(StepBatch, usize, usize)> {
        if ids.dtype() != DType::U32 {
            return Err(Error::InvalidParameter {
                name: "ids",
                reason: format!("token ids must be u32, got {:?}", ids.dtype()),
            });
        }
        let (b, t) = ids.dims2()?;
        if b * t == 0 {
            return Err(Error::InvalidParameter { name: "ids", reason: "no tokens".into() });
        }
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let pool = cache.pool_for_rows(b)?;
        let mut batch = StepBatch::new();
        for (slot, row) in rows.iter().enumerate() {
            batch.push(slot, pool.seq_len(slot), row, 0, logits)?;
        }
        Ok((batch, b, t))
    }

    /// Runs one step of many sequences: every row of `batch` continues its own slot of `pool` at
    /// its own position, with its own adapter variant. Returns f32 logits (R, vocab) where R is
    /// [`StepBatch::logit_rows`]: for each row in push order, nothing, its last token or all of
    /// its tokens. Each row's logits equal those of that sequence run alone (up to the rounding of
    /// kernels whose reduction order depends on the row count).
    ///
    /// Logits are returned as computed: the caller checks each row for non-finite values (the
    /// engine fails only the sequence whose row is bad; [`Model::forward`] fails the call).
    ///
    /// Errors: [`Error::KvPoolMismatch`] for another model's pool, [`Error::RowPosition`] for a
    /// row that does not start where its slot ends, [`Error::ContextOverflow`] past the slot's
    /// capacity, [`Error::InvalidBatch`] for a variant with other base weights,
    /// [`Error::InvalidParameter`] (`ids`) for ids outside the vocabulary.
    pub fn forward_batch(&self, batch: &StepBatch, pool: &mut KvPool) -> Result<Tensor> {
        // On the CPU the whole step runs on a rayon worker, so each matmul's parallel split starts
        // from a pool thread (the work is shared with the other workers right away) instead of
        // handing off from the caller's thread and blocking it ~100 times per token.
        if self.uses_cpu_kernels() && rayon::current_thread_index().is_none() {
            let mut out = None;
            rayon::scope(|_| out = Some(self.forward_batch_step(batch, pool)));
            return out.unwrap_or_else(|| Err(candle_core::Error::Msg("forward did not run".into()).into()));
        }
        self.forward_batch_step(batch, pool)
    }

    /// Whether any projection runs on our CPU kernels (rayon). Models entirely on candle's CPU
    /// kernels are not moved onto a rayon worker: candle's own spinning thread pool would then
    /// compete with rayon's for the cores.
    fn uses_cpu_kernels(&self) -> bool {
        let cpu = |l: &Linear| matches!(l.weight(), LinearWeight::Cpu(_));
        cpu(&self.lm_head) || self.layers.iter().any(|l| l.projections().into_iter().any(|(_, p)| cpu(p)))
    }

    fn forward_batch_step(&self, batch: &StepBatch, pool: &mut KvPool) -> Result<Tensor> {
        let (x, plan) = self.hidden_batch(batch, pool)?; // (N, hidden), execution order
        let vocab = self.config.vocab_size;
        let dev = &self.device;
        if plan.logit_tokens.is_empty() {
            return Ok(Tensor::zeros((0, vocab), DType::F32, dev)?);
        }
        let all_in_order = plan.logit_tokens.len() == plan.ids.len()
            && plan.logit_tokens.iter().enumerate().all(|(i, &t)| t as usize == i);
        let x = if all_in_order { x } else { x.index_select(&Tensor::new(plan.logit_tokens.as_slice(), dev)?, 0)? }; // (R, hidden)
        let x = ops::rms_norm(&x.contiguous()?, &self.norm, self.config.rms_norm_eps)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?) // (R, vocab)
    }

    /// Runs `ids` (b, t) like [`Model::forward`] and returns the final hidden states after the
    /// last norm instead of logits: (b, t, hidden) in f32. What decoder embedders pool
    /// ([`crate::embed`]). Same errors as [`Model::forward`].
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (batch, b, t) = self.wrapper_batch(ids, cache, RowLogits::None)?;
        let pool = cache.pool_for_rows(b)?;
        let (x, _) = self.hidden_batch(&batch, pool)?; // (b·t, hidden): one variant, push order
        let x = ops::rms_norm(&x.contiguous()?, &self.norm, self.config.rms_norm_eps)?;
        Ok(x.to_dtype(DType::F32)?.reshape((b, t, self.config.hidden_size))?)
    }

    /// Embeddings and every layer, before the final norm: the step's tokens (N, hidden) in
    /// execution order, and the plan that ordered them. Appends to the rows' slots.
    fn hidden_batch(&self, batch: &StepBatch, pool: &mut KvPool) -> Result<(Tensor, StepPlan)> {
        let variants: Vec<&Model> = match batch.variants() {
            [] => vec![self],
            v => v.iter().collect(),
        };
        if let Some(bad) = variants.iter().find(|m| m.uid != self.uid) {
            return Err(Error::InvalidBatch {
                reason: format!("variant of model {} in a step of model {}", bad.uid, self.uid),
            });
        }
        let (plan, tensors) = self.prepare_step(batch, pool)?;
        let step = StepCtx { plan: &plan, tensors: &tensors, rope: &self.rope, kernels: self.kernels };
        let mut x = self.embed_tokens.lookup(&plan.ids, self.dtype, &self.device)?; // (N, hidden)
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_variants: Vec<&DecoderLayer> = variants.iter().map(|m| m.layers.get(i).unwrap_or(layer)).collect();
            x = layer.forward_batch(&layer_variants, &x, &step, pool, i, self.config.rms_norm_eps)?;
        }
        Ok((x, plan))
    }

    /// Training's layer-at-a-time view of one step ([`crate::train`]'s gradient checkpointing):
    /// the computation of [`Model::forward_batch`] on the base model (no variants), split at the
    /// layer boundaries so that a caller can keep only each layer's input and recompute the rest.
    /// `pool` is checked as `forward_batch` checks it; each layer then runs on whatever pool the
    /// caller passes (a fresh one to recompute a layer).
    pub(crate) fn layer_steps(&self, batch: &StepBatch, pool: &KvPool) -> Result<LayerSteps<'_>> {
        if !batch.variants().is_empty() {
            return Err(Error::InvalidBatch { reason: "a layer-at-a-time step runs the base model only".into() });
        }
        let (plan, tensors) = self.prepare_step(batch, pool)?;
        Ok(LayerSteps { model: self, plan, tensors })
    }

    /// What every layer of a step reads, after checking `pool` and the rows against it: the plan
    /// and the RoPE rows gathered for each token's position.
    fn prepare_step(&self, batch: &StepBatch, pool: &KvPool) -> Result<(StepPlan, StepTensors)> {
        pool.check_fits(self.uid, &self.config.layer_windows)?;
        let plan = batch.plan();
        self.check_rows(&plan, pool)?;
        let (cos, sin) = self.rope.gather(&Tensor::new(plan.positions.as_slice(), &self.device)?)?; // (N, hd/2)
        Ok((plan, StepTensors { cos, sin }))
    }

    /// Every row continues its slot, fits the context, and has ids inside the vocabulary.
    fn check_rows(&self, plan: &StepPlan, pool: &KvPool) -> Result<()> {
        for (row, _) in &plan.spans {
            if row.slot >= pool.n_slots() {
                return Err(Error::KvSlot { slot: row.slot, reason: "does not exist" });
            }
            let held = pool.seq_len(row.slot);
            if held != row.start {
                return Err(Error::RowPosition { slot: row.slot, start: row.start, held });
            }
            let end = row.start + row.len;
            let context = self.max_positions.min(pool.capacity());
            if end > context {
                return Err(Error::ContextOverflow { prompt_tokens: end, context });
            }
        }
        if let Some(bad) = plan.ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(Error::InvalidParameter {
                name: "ids",
                reason: format!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size),
            });
        }
        Ok(())
    }
}

/// One step of [`Model::forward_batch`] taken a layer at a time ([`Model::layer_steps`]): the
/// same ops on the same tensors, so `logits(layer(n-1, … layer(0, embeddings())))` equals
/// `forward_batch` with [`RowLogits::All`] row for row.
pub(crate) struct LayerSteps<'m> {
    model: &'m Model,
    plan: StepPlan,
    tensors: StepTensors,
}

impl LayerSteps<'_> {
    /// Decoder layers.
    pub(crate) fn n_layers(&self) -> usize {
        self.model.layers.len()
    }

    /// The token embeddings (N, hidden), in execution order.
    pub(crate) fn embeddings(&self) -> Result<Tensor> {
        self.model.embed_tokens.lookup(&self.plan.ids, self.model.dtype, &self.model.device)
    }

    /// Execution-order token index of every token in row push order (what
    /// [`RowLogits::All`] rows return).
    pub(crate) fn token_order(&self) -> &[u32] {
        &self.plan.logit_tokens
    }

    /// Layer `i` on x (N, hidden), appending its keys/values to `pool`.
    pub(crate) fn layer(&self, i: usize, x: &Tensor, pool: &mut KvPool) -> Result<Tensor> {
        let m = self.model;
        let layer = m.layers.get(i).ok_or_else(|| Error::InvalidParameter { name: "layer", reason: format!("no layer {i}") })?;
        let step = StepCtx { plan: &self.plan, tensors: &self.tensors, rope: &m.rope, kernels: m.kernels };
        layer.forward_batch(&[layer], x, &step, pool, i, m.config.rms_norm_eps)
    }

    /// The final norm and the output head on hidden rows (R, hidden): f32 logits (R, vocab).
    pub(crate) fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let m = self.model;
        let x = ops::rms_norm(&x.contiguous()?, &m.norm, m.config.rms_norm_eps)?;
        Ok(m.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}

impl DecoderLayer {
    /// x: (N, hidden) → (N, hidden), the flat tokens of one step; `variants[v]` is this layer in
    /// model variant v.
    fn forward_batch(
        &self,
        variants: &[&DecoderLayer],
        x: &Tensor,
        step: &StepCtx<'_>,
        pool: &mut KvPool,
        layer: usize,
        eps: f64,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, eps)?;
        let attn: Vec<&Attention> = variants.iter().map(|l| &l.self_attn).collect();
        let x = (x + self.self_attn.forward_batch(&attn, &h, step, pool, layer)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, eps)?;
        let mlp: Vec<&Mlp> = variants.iter().map(|l| &l.mlp).collect();
        Ok((&x + Mlp::forward_batch(&mlp, &h, &step.plan.ranges)?)?)
    }

    /// The seven projections, in HF module order: the adapter sites.
    pub fn projections(&self) -> [(Projection, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            (Projection::Q, &a.q_proj),
            (Projection::K, &a.k_proj),
            (Projection::V, &a.v_proj),
            (Projection::O, &a.o_proj),
            (Projection::Gate, &m.gate_proj),
            (Projection::Up, &m.up_proj),
            (Projection::Down, &m.down_proj),
        ]
    }

    /// One projection, mutably (adapter plumbing).
    pub fn projection_mut(&mut self, p: Projection) -> &mut Linear {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        match p {
            Projection::Q => &mut a.q_proj,
            Projection::K => &mut a.k_proj,
            Projection::V => &mut a.v_proj,
            Projection::O => &mut a.o_proj,
            Projection::Gate => &mut m.gate_proj,
            Projection::Up => &mut m.up_proj,
            Projection::Down => &mut m.down_proj,
        }
    }

    /// One projection.
    pub fn projection(&self, p: Projection) -> &Linear {
        // `projections()` is in `Projection::ALL` order, which is the enum's declaration order.
        self.projections()[p as usize].1
    }
}

fn load_layer(cfg: &ModelConfig, w: &dyn WeightSource, i: usize) -> Result<DecoderLayer> {
    let p = format!("model.layers.{i}");
    let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
    let q_out = cfg.num_attention_heads * hd;
    let kv_out = cfg.num_key_value_heads * hd;
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let weight = w.linear(&format!("{p}.{name}.weight"), out, inp)?;
        let bias = if bias { Some(w.tensor(&format!("{p}.{name}.bias"), &[out])?) } else { None };
        Ok(Linear::new(weight, bias))
    };
    let attn_linears = [
        linear("self_attn.q_proj", q_out, hidden, cfg.qkv_bias)?,
        linear("self_attn.k_proj", kv_out, hidden, cfg.qkv_bias)?,
        linear("self_attn.v_proj", kv_out, hidden, cfg.qkv_bias)?,
        linear("self_attn.o_proj", hidden, q_out, cfg.o_bias)?,
    ];
    let qk_norm = if cfg.qk_norm {
        Some(QkNorm {
            q: w.tensor(&format!("{p}.self_attn.q_norm.weight"), &[hd])?,
            k: w.tensor(&format!("{p}.self_attn.k_norm.weight"), &[hd])?,
        })
    } else {
        None
    };
    let inter = cfg.intermediate_size;
    Ok(DecoderLayer {
        input_layernorm: w.tensor(&format!("{p}.input_layernorm.weight"), &[hidden])?,
        self_attn: Attention::new(cfg, attn_linears, qk_norm),
        post_attention_layernorm: w.tensor(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
        mlp: Mlp {
            gate_proj: linear("mlp.gate_proj", inter, hidden, cfg.mlp_bias)?,
            up_proj: linear("mlp.up_proj", inter, hidden, cfg.mlp_bias)?,
            down_proj: linear("mlp.down_proj", hidden, inter, cfg.mlp_bias)?,
        },
    })
}
