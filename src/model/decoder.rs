//! The transformer decoder shared by every architecture.

use candle_core::{DType, Device, Tensor, D};

use super::attention::{Attention, QkNorm};
use super::kv_cache::KvCache;
use super::linear::{Linear, LinearWeight};
use super::ops;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loader::weights::WeightSource;

/// SwiGLU MLP: down(silu(gate(x)) · up(x)).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear, // hidden → intermediate
    pub up_proj: Linear,   // hidden → intermediate
    pub down_proj: Linear, // intermediate → hidden
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = Linear::forward_group(&[&self.gate_proj, &self.up_proj], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("mlp: expected two outputs".into()))?;
        let h = ops::silu_mul(&gate, &up)?;
        self.down_proj.forward(&h)
    }
}

/// Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor, // (hidden,)
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor, // (hidden,)
    pub mlp: Mlp,
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
    embed_tokens: Tensor, // (vocab, hidden)
    layers: Vec<DecoderLayer>,
    norm: Tensor, // (hidden,)
    lm_head: Linear, // hidden → vocab
    rope: Rope,
    max_positions: usize,
    device: Device,
    dtype: DType,
}

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
        let embed_tokens = weights.tensor("model.embed_tokens.weight", &[vocab, hidden])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| load_layer(cfg, weights, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = weights.tensor("model.norm.weight", &[hidden])?;
        // An untied model without `lm_head.weight` is an error, not a silent tie.
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = Linear::new(weights.linear(head_name, vocab, hidden)?, None);
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
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

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
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                    .into_iter()
                    .map(linear_bytes)
                    .sum::<usize>()
            })
            .sum();
        per_layer + linear_bytes(&self.lm_head)
    }

    /// The decoder layers (adapter plumbing: the projections are the adapter sites).
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The decoder layers, mutably: for attaching adapters ([`crate::adapter::ApplyAdapter`]).
    pub fn layers_mut(&mut self) -> &mut [DecoderLayer] {
        &mut self.layers
    }

    /// A fresh, empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.config.layer_windows, self.max_positions)
    }

    /// Runs `ids` (b, t) of u32 token ids, positioned after what `cache` holds, and appends their
    /// keys/values to `cache`. Returns logits in f32: (b, t, vocab) or (b, vocab) for
    /// [`Logits::Last`]. Ids ≥ vocab and contexts past [`Model::max_positions`] are errors.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        // On the CPU the whole step runs on a rayon worker, so each matmul's parallel split starts
        // from a pool thread (the work is shared with the other workers right away) instead of
        // handing off from the caller's thread and blocking it ~100 times per token.
        if self.uses_cpu_kernels() && rayon::current_thread_index().is_none() {
            let mut out = None;
            rayon::scope(|_| out = Some(self.forward_step(ids, cache, which)));
            return out.unwrap_or_else(|| Err(candle_core::Error::Msg("forward did not run".into()).into()));
        }
        self.forward_step(ids, cache, which)
    }

    /// Whether any projection runs on our CPU kernels (rayon). Models entirely on candle's CPU
    /// kernels are not moved onto a rayon worker: candle's own spinning thread pool would then
    /// compete with rayon's for the cores.
    fn uses_cpu_kernels(&self) -> bool {
        let cpu = |l: &Linear| matches!(l.weight(), LinearWeight::Cpu(_));
        cpu(&self.lm_head)
            || self.layers.iter().any(|l| {
                let a = &l.self_attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]
                    .into_iter()
                    .any(cpu)
            })
    }

    fn forward_step(&self, ids: &Tensor, cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        self.check_ids(ids)?;
        let end = cache.seq_len() + t;
        if end > self.max_positions {
            return Err(Error::ContextOverflow {
                prompt_tokens: end,
                context: self.max_positions,
            });
        }
        let mut x = self.embed_tokens.embedding(&ids.flatten_all()?)?.reshape((ids.dim(0)?, t, self.config.hidden_size))?; // (b, t, hidden)
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache
                .layer_mut(i)
                .ok_or_else(|| candle_core::Error::Msg(format!("kv cache has no layer {i}")))?;
            x = layer.forward(&x, &self.rope, layer_cache, self.config.rms_norm_eps)?;
        }
        let x = match which {
            Logits::All => x,
            Logits::Last => x.narrow(1, t - 1, 1)?.squeeze(1)?, // (b, hidden)
        };
        let x = ops::rms_norm(&x.contiguous()?, &self.norm, self.config.rms_norm_eps)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        super::finite::check_logits(&logits)?; // NaN/Inf is an error, never a distribution
        Ok(logits)
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        if ids.dtype() != DType::U32 {
            return Err(Error::InvalidParameter {
                name: "ids",
                reason: format!("token ids must be u32, got {:?}", ids.dtype()),
            });
        }
        if ids.elem_count() == 0 {
            return Err(Error::InvalidParameter {
                name: "ids",
                reason: "no tokens".into(),
            });
        }
        let max = ids.flatten_all()?.max(D::Minus1)?.to_scalar::<u32>()?;
        if max as usize >= self.config.vocab_size {
            return Err(Error::InvalidParameter {
                name: "ids",
                reason: format!("token id {max} is outside the vocabulary of {}", self.config.vocab_size),
            });
        }
        Ok(())
    }
}

impl DecoderLayer {
    /// x: (b, t, hidden) → (b, t, hidden).
    fn forward(&self, x: &Tensor, rope: &Rope, cache: &mut super::kv_cache::LayerCache, eps: f64) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, eps)?;
        let x = (x + self.self_attn.forward(&h, rope, cache)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, eps)?;
        Ok((&x + self.mlp.forward(&h)?)?)
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
