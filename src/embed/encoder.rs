//! One bidirectional encoder for the BERT family and MPNet:
//! embeddings → N × (self-attention → add & LayerNorm → GELU MLP → add & LayerNorm).
//!
//! The two differ only in weight names, the position ids of the embeddings and MPNet's relative
//! position bias (one table shared by every layer, HF `MPNetEncoder.compute_position_bias`).

use candle_core::{DType, Device, Tensor};

use super::config::{Activation, EncoderArch, EncoderConfig};
use super::kernels::{self, ScoreBias, Span};
use crate::error::Result;
use crate::loader::weights::WeightSource;
use crate::model::linear::Linear;
use crate::model::ops;

/// MPNet's `relative_position_bucket` max_distance (HF default, never configured).
const MPNET_MAX_DISTANCE: i64 = 128;

/// LayerNorm weight and bias.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor, // (hidden,)
    bias: Tensor,   // (hidden,)
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// LayerNorm over the last dim (candle's fused op).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if x.is_contiguous() {
        Ok(candle_nn::ops::layer_norm(x, weight, bias, eps as f32)?)
    } else {
        layer_norm_reference(x, weight, bias, eps)
    }
}

/// Plain-op twin of [`layer_norm`].
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32)?)
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    q: Linear,             // hidden → hidden
    k: Linear,             // hidden → hidden
    v: Linear,             // hidden → hidden
    o: Linear,             // hidden → hidden
    attn_norm: LayerNorm,  // after attention + residual
    up: Linear,            // hidden → intermediate
    down: Linear,          // intermediate → hidden
    out_norm: LayerNorm,   // after MLP + residual
}

/// A loaded BERT or MPNet encoder.
#[derive(Debug, Clone)]
pub struct Encoder {
    config: EncoderConfig,
    word_embeddings: Tensor,      // (vocab, hidden)
    position_embeddings: Tensor,  // (max_position_embeddings, hidden)
    token_type_zero: Option<Tensor>, // (hidden,): BERT's type-0 row; every input is one segment
    embed_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    relative_bias: Option<Tensor>, // (buckets, heads): MPNet
    device: Device,
}

/// HF's tensor names, per family.
struct Names {
    prefix: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    o: &'static str,
    attn_norm: &'static str,
}

impl Names {
    fn of(arch: EncoderArch, w: &dyn WeightSource) -> Self {
        let (prefixes, layer): ([&'static str; 3], _) = match arch {
            EncoderArch::Bert => (["", "bert.", "model."], ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "attention.output.LayerNorm"]),
            EncoderArch::MPNet => (["", "mpnet.", "model."], ["attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "attention.LayerNorm"]),
        };
        // Checkpoints saved from a task head (`BertForMaskedLM`) carry the family prefix.
        let prefix = prefixes
            .into_iter()
            .find(|p| w.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .unwrap_or("");
        let [q, k, v, o, attn_norm] = layer;
        Self { prefix, q, k, v, o, attn_norm }
    }
}

impl Encoder {
    /// Builds the encoder from `weights` (HF names, with or without the `bert.`/`mpnet.` prefix).
    ///
    /// Errors: a missing tensor or one whose shape disagrees with `config` names the tensor.
    pub fn load(config: EncoderConfig, weights: &dyn WeightSource, device: &Device) -> Result<Self> {
        let cfg = &config;
        let names = Names::of(cfg.arch, weights);
        let p = names.prefix;
        let h = cfg.hidden_size;
        let norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: weights.tensor(&format!("{name}.weight"), &[h])?,
                bias: weights.tensor(&format!("{name}.bias"), &[h])?,
                eps: cfg.layer_norm_eps,
            })
        };
        let token_type_zero = match cfg.arch {
            EncoderArch::Bert => Some(weights.tensor(&format!("{p}embeddings.token_type_embeddings.weight"), &[cfg.type_vocab_size, h])?.get(0)?),
            EncoderArch::MPNet => None,
        };
        let relative_bias = match cfg.arch {
            EncoderArch::MPNet => Some(weights.tensor(
                &format!("{p}encoder.relative_attention_bias.weight"),
                &[cfg.relative_attention_num_buckets, cfg.num_attention_heads],
            )?),
            EncoderArch::Bert => None,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| load_layer(cfg, weights, &names, i, &norm))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: weights.tensor(&format!("{p}embeddings.word_embeddings.weight"), &[cfg.vocab_size, h])?,
            position_embeddings: weights.tensor(&format!("{p}embeddings.position_embeddings.weight"), &[cfg.max_position_embeddings, h])?,
            token_type_zero,
            embed_norm: norm(&format!("{p}embeddings.LayerNorm"))?,
            layers,
            relative_bias,
            device: device.clone(),
            config,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// ids (b, t) u32, right-padded; `lengths[i]` real tokens in row i → last hidden states
    /// (b, t, hidden). Padded keys are masked out; padded rows' outputs are meaningless.
    ///
    /// An f32 model on the CPU runs packed ([`Encoder::forward_packed`]); elsewhere the padded
    /// batch runs as candle ops ([`Encoder::forward_padded`], its twin).
    pub fn forward(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        if self.device.is_cpu() && self.word_embeddings.dtype() == DType::F32 {
            self.forward_packed(ids, lengths)
        } else {
            self.forward_padded(ids, lengths)
        }
    }

    /// [`Encoder::forward`] on the real tokens only: every linear layer runs on the Σ lengths
    /// rows of the batch (no padded rows), attention runs per sequence over its own keys
    /// ([`kernels::packed_attention`]), GELU without a libm call per element. Padded rows of
    /// the result are zeros.
    pub fn forward_packed(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let padded = ids.to_vec2::<u32>()?;
        let first = match self.config.arch {
            EncoderArch::Bert => 0,
            EncoderArch::MPNet => self.config.pad_token_id + 1,
        };
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(b);
        for (row, &len) in padded.iter().zip(lengths) {
            let len = len.min(t);
            spans.push(Span { start: tokens.len(), len });
            tokens.extend_from_slice(&row[..len]);
            positions.extend((0..len).map(|j| (first + j) as u32));
        }
        let n = tokens.len();
        let tokens = Tensor::from_vec(tokens, n, &self.device)?;
        let positions = Tensor::from_vec(positions, n, &self.device)?;
        let mut x = (self.word_embeddings.embedding(&tokens)? + self.position_embeddings.embedding(&positions)?)?; // (n, hidden)
        if let Some(tt) = &self.token_type_zero {
            x = x.broadcast_add(tt)?;
        }
        x = self.embed_norm.forward(&x)?;
        let bias = match &self.relative_bias {
            Some(table) => Some(relative_position_bias(table, t)?.flatten_all()?.to_vec1::<f32>()?), // (heads, t, t)
            None => None,
        };
        let bias = bias.as_deref().map(|bias| ScoreBias { bias, t });
        let scale = 1.0 / ((h / heads) as f32).sqrt();
        for layer in &self.layers {
            let qkv = Linear::forward_group(&[&layer.q, &layer.k, &layer.v], &x)?;
            let [q, k, v] = qkv.as_slice() else {
                return Err(candle_core::Error::Msg("encoder: expected three outputs".into()).into());
            };
            let flat = |y: &Tensor| -> Result<Vec<f32>> { Ok(y.flatten_all()?.to_vec1::<f32>()?) };
            let ctx = kernels::packed_attention(&flat(q)?, &flat(k)?, &flat(v)?, &spans, heads, scale, bias);
            let ctx = Tensor::from_vec(ctx, (n, h), &self.device)?;
            x = layer.attn_norm.forward(&(&x + layer.o.forward(&ctx)?)?)?;
            let up = layer.up.forward(&x)?; // (n, intermediate)
            let up = match self.config.activation {
                Activation::GeluErf => kernels::gelu_erf(&up)?,
                Activation::GeluTanh => up.gelu()?,
            };
            x = layer.out_norm.forward(&(&x + layer.down.forward(&up)?)?)?;
        }
        // Back to (b, t, hidden): row i's tokens, then zeros.
        let zero = Tensor::zeros((1, h), x.dtype(), &self.device)?;
        let x = Tensor::cat(&[&x, &zero], 0)?;
        let index: Vec<u32> = spans
            .iter()
            .flat_map(|s| (0..t).map(move |j| if j < s.len { (s.start + j) as u32 } else { n as u32 }))
            .collect();
        let index = Tensor::from_vec(index, b * t, &self.device)?;
        Ok(x.index_select(&index, 0)?.reshape((b, t, h))?)
    }

    /// [`Encoder::forward`] as candle ops over the padded batch with an additive key mask.
    pub fn forward_padded(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed(ids)?; // (b, t, hidden)
        let dtype = x.dtype();
        let mask = key_mask(lengths, t, &self.device)?.to_dtype(dtype)?; // (b, 1, 1, t)
        let bias = match &self.relative_bias {
            Some(table) => Some(relative_position_bias(table, t)?.to_dtype(dtype)?.broadcast_add(&mask)?), // (b, heads, t, t)
            None => None,
        };
        let mask = bias.unwrap_or(mask);
        for layer in &self.layers {
            x = layer.forward(&x, &mask, self.config.num_attention_heads, self.config.activation)?;
        }
        debug_assert_eq!(x.dims(), &[b, t, self.config.hidden_size]);
        Ok(x)
    }

    /// Word + position (+ BERT's token type 0) embeddings, LayerNorm: (b, t) → (b, t, hidden).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.config.hidden_size;
        let words = self.word_embeddings.embedding(&ids.flatten_all()?)?.reshape((b, t, h))?;
        // MPNet numbers positions from padding_idx + 1; right padding makes that an arange for
        // every real token (HF `create_position_ids_from_input_ids`).
        let first = match self.config.arch {
            EncoderArch::Bert => 0,
            EncoderArch::MPNet => self.config.pad_token_id + 1,
        };
        let positions = self.position_embeddings.narrow(0, first, t)?; // (t, hidden)
        let mut x = words.broadcast_add(&positions)?;
        if let Some(tt) = &self.token_type_zero {
            x = x.broadcast_add(tt)?;
        }
        self.embed_norm.forward(&x)
    }
}

impl EncoderLayer {
    /// x: (b, t, hidden), mask: additive, broadcastable to (b, heads, t, t) → (b, t, hidden).
    fn forward(&self, x: &Tensor, mask: &Tensor, heads: usize, act: Activation) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        let hd = hidden / heads;
        let qkv = Linear::forward_group(&[&self.q, &self.k, &self.v], x)?;
        let split = |y: &Tensor| -> Result<Tensor> { Ok(y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = match qkv.as_slice() {
            [q, k, v] => (split(q)?, split(k)?, split(v)?), // (b, heads, t, hd)
            _ => return Err(candle_core::Error::Msg("encoder: expected three outputs".into()).into()),
        };
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?; // (b, heads, t, t)
        let probs = ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))?; // (b, t, hidden)
        let x = self.attn_norm.forward(&(x + self.o.forward(&ctx)?)?)?;
        let up = self.up.forward(&x)?; // (b, t, intermediate)
        let up = match act {
            Activation::GeluErf => up.gelu_erf()?,
            Activation::GeluTanh => up.gelu()?,
        };
        self.out_norm.forward(&(&x + self.down.forward(&up)?)?)
    }
}

fn load_layer(
    cfg: &EncoderConfig,
    w: &dyn WeightSource,
    names: &Names,
    i: usize,
    norm: &dyn Fn(&str) -> Result<LayerNorm>,
) -> Result<EncoderLayer> {
    let p = format!("{}encoder.layer.{i}", names.prefix);
    let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
        let weight = w.linear(&format!("{p}.{name}.weight"), out, inp)?;
        Ok(Linear::new(weight, Some(w.tensor(&format!("{p}.{name}.bias"), &[out])?)))
    };
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    Ok(EncoderLayer {
        q: linear(names.q, h, h)?,
        k: linear(names.k, h, h)?,
        v: linear(names.v, h, h)?,
        o: linear(names.o, h, h)?,
        attn_norm: norm(&format!("{p}.{}", names.attn_norm))?,
        up: linear("intermediate.dense", inter, h)?,
        down: linear("output.dense", h, inter)?,
        out_norm: norm(&format!("{p}.output.LayerNorm"))?,
    })
}

/// (b, 1, 1, t) f32: 0 for each row's first `lengths[i]` keys, -inf for padding (every row has
/// at least one real token, so no softmax row is all -inf).
fn key_mask(lengths: &[usize], t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = lengths
        .iter()
        .flat_map(|&n| (0..t).map(move |j| if j < n { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (lengths.len(), 1, 1, t), device)?)
}

/// MPNet's bias for a (t, t) attention: table (buckets, heads) → (1, heads, t, t).
fn relative_position_bias(table: &Tensor, t: usize) -> Result<Tensor> {
    let (buckets, heads) = table.dims2()?;
    let ids: Vec<u32> = (0..t as i64)
        .flat_map(|q| (0..t as i64).map(move |k| relative_position_bucket(k - q, buckets as i64)))
        .collect();
    let ids = Tensor::from_vec(ids, t * t, table.device())?;
    let bias = table.embedding(&ids)?.reshape((t, t, heads))?; // (q, k, heads)
    Ok(bias.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// HF `MPNetEncoder.relative_position_bucket` (T5's scheme): half the buckets per direction, exact
/// below a quarter, log-spaced up to `MPNET_MAX_DISTANCE`. Computed in f32 like torch.
pub fn relative_position_bucket(relative_position: i64, num_buckets: i64) -> u32 {
    let half = num_buckets / 2;
    let n = -relative_position;
    let mut bucket = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    bucket += if n < max_exact {
        n
    } else {
        let scale = (n as f32 / max_exact as f32).ln() / (MPNET_MAX_DISTANCE as f32 / max_exact as f32).ln();
        (max_exact + (scale * (half - max_exact) as f32) as i64).min(half - 1)
    };
    bucket as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_buckets_match_torch() {
        // HF MPNetEncoder.relative_position_bucket(torch.tensor(rp), 32) under torch 2.15.0.
        let neg = [(15, 9), (16, 10), (17, 10), (31, 11), (32, 12), (33, 12), (63, 13), (64, 14), (65, 14), (127, 15), (128, 15), (129, 15)];
        let pos = [(15, 25), (16, 26), (17, 26), (31, 27), (32, 28), (33, 28), (63, 29), (64, 30), (65, 30), (127, 31), (128, 31), (129, 31)];
        for (d, want) in neg {
            assert_eq!(relative_position_bucket(-d, 32), want, "rp -{d}");
        }
        for (d, want) in pos {
            assert_eq!(relative_position_bucket(d, 32), want, "rp {d}");
        }
        assert_eq!(relative_position_bucket(0, 32), 0);
        assert_eq!(relative_position_bucket(-3, 32), 3);
        assert_eq!(relative_position_bucket(3, 32), 19);
    }

    /// The packed path equals its padded twin on the BERT and MPNet fixtures, in a batch whose
    /// rows have different lengths (padded rows excluded).
    #[test]
    fn packed_equals_padded() {
        for name in ["bert", "mpnet"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embed").join(name);
            let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            let arch = EncoderConfig::detect(&json).unwrap();
            let config = EncoderConfig::from_json(&json, arch, &dir.join("config.json")).unwrap();
            let dev = Device::Cpu;
            let weights = crate::loader::safetensors::SafetensorsWeights::open(&dir, DType::F32, &dev).unwrap();
            let enc = Encoder::load(config, &weights, &dev).unwrap();
            let lengths = [7usize, 1, 3, 7, 5];
            let t = 7;
            let ids: Vec<u32> = lengths.iter().enumerate().flat_map(|(r, &n)| (0..t).map(move |j| if j < n { (5 + 3 * r + 7 * j) as u32 % 90 + 5 } else { 1 })).collect();
            let ids = Tensor::from_vec(ids, (lengths.len(), t), &dev).unwrap();
            let a = enc.forward_packed(&ids, &lengths).unwrap();
            let b = enc.forward_padded(&ids, &lengths).unwrap();
            for (r, &n) in lengths.iter().enumerate() {
                let d = (a.get(r).unwrap().narrow(0, 0, n).unwrap() - b.get(r).unwrap().narrow(0, 0, n).unwrap()).unwrap();
                let d = d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "{name} row {r}: {d}");
            }
        }
    }

    #[test]
    fn layer_norm_matches_its_twin() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 3, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 16, &dev).unwrap();
        let a = layer_norm(&x, &w, &b, 1e-12).unwrap();
        let r = layer_norm_reference(&x, &w, &b, 1e-12).unwrap();
        let d = (a - r).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
