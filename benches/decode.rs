//! Decode throughput on CPU: one single-token forward step (tokens/s) with a KV cache that already
//! holds a 128-token prompt, for models with random weights in two shapes:
//!
//! - `qwen2.5-0.5b`: Qwen2.5-0.5B (hidden 896, 24 layers, 14/2 heads, vocab 151936, tied, qkv bias);
//! - `smollm2-135m`: SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, vocab 49152, tied, Llama).
//!
//! Variants: `metal-candle/f32` (dense F32 projections), `metal-candle/q8_0` and
//! `metal-candle/q4_0` (every projection and the tied lm_head GGML-quantized, the rest F32), and
//! `candle-transformers/f32`, the stock candle model on the same weights, as the baseline (with
//! feature `baseline`, which brings in candle-transformers).
//!
//! Run: `cargo bench --bench decode --features baseline` (all, a few minutes), without the
//! feature (ours only) or with `-- smollm2` (the small shape only). Criterion reports `thrpt` in elem/s: one element is one
//! decoded token. Under `cargo test --benches` every variant runs once on a tiny shape instead.
//!
//! Each timed iteration starts from a copy of the prefilled cache (made outside the timed region),
//! so every step decodes position 128 against the same 128 cached keys/values. The prefill logits of metal-candle F32 and candle-transformers are compared
//! once and the largest difference is printed, a check that both run the same model.

#[cfg(feature = "baseline")]
use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
#[cfg(feature = "baseline")]
use candle_transformers::models::{llama, qwen2};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use metal_candle::loader::weights::WeightSource;
use metal_candle::model::linear::LinearWeight;
use metal_candle::{Arch, KvCache, Logits, Model, ModelConfig};

/// Tokens in the cache before the timed step.
const PROMPT_LEN: usize = 128;
/// Seed of the weight generator; every tensor's stream is this mixed with its name.
const SEED: u64 = 0x6d65_7461_6c2d_6361;
/// Standard deviation of weights, embeddings and biases (norm weights are 1 + this).
const WEIGHT_STD: f32 = 0.02;

/// The dimensions of one benchmarked model.
#[derive(Debug, Clone, Copy)]
struct Shape {
    label: &'static str,
    arch: Arch,
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    rms_eps: f64,
    prompt_len: usize,
}

const QWEN25_0_5B: Shape = Shape {
    label: "qwen2.5-0.5b",
    arch: Arch::Qwen2,
    vocab: 151_936,
    hidden: 896,
    inter: 4864,
    layers: 24,
    heads: 14,
    kv_heads: 2,
    head_dim: 64,
    rope_theta: 1e6,
    rms_eps: 1e-6,
    prompt_len: PROMPT_LEN,
};

const SMOLLM2_135M: Shape = Shape {
    label: "smollm2-135m",
    arch: Arch::Llama,
    vocab: 49_152,
    hidden: 576,
    inter: 1536,
    layers: 30,
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
    rope_theta: 1e5,
    rms_eps: 1e-5,
    prompt_len: PROMPT_LEN,
};

impl Shape {
    /// The same architecture at toy size, for criterion's test mode (`cargo test --benches`).
    /// Widths stay multiples of 32 so Q4_0/Q8_0 blocks fit.
    fn tiny(self) -> Self {
        Self {
            vocab: 256,
            hidden: 64,
            inter: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            prompt_len: 8,
            ..self
        }
    }

    fn qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2
    }

    fn config(&self) -> ModelConfig {
        ModelConfig {
            arch: self.arch,
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.inter,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_eps,
            rope_theta: self.rope_theta,
            rope_scaling: None,
            rope_interleaved: false,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            qkv_bias: self.qkv_bias(),
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            layer_windows: vec![None; self.layers],
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// Every tensor name with its shape, as an HF checkpoint of this shape would hold them.
    #[cfg(feature = "baseline")]
    fn tensor_names(&self) -> Vec<(String, Vec<usize>)> {
        let (h, hd) = (self.hidden, self.head_dim);
        let (q_out, kv_out) = (self.heads * hd, self.kv_heads * hd);
        let mut names = vec![
            ("model.embed_tokens.weight".to_string(), vec![self.vocab, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            let mut push = |n: &str, shape: Vec<usize>| names.push((format!("{p}.{n}"), shape));
            push("input_layernorm.weight", vec![h]);
            push("post_attention_layernorm.weight", vec![h]);
            push("self_attn.q_proj.weight", vec![q_out, h]);
            push("self_attn.k_proj.weight", vec![kv_out, h]);
            push("self_attn.v_proj.weight", vec![kv_out, h]);
            push("self_attn.o_proj.weight", vec![h, q_out]);
            if self.qkv_bias() {
                push("self_attn.q_proj.bias", vec![q_out]);
                push("self_attn.k_proj.bias", vec![kv_out]);
                push("self_attn.v_proj.bias", vec![kv_out]);
            }
            push("mlp.gate_proj.weight", vec![self.inter, h]);
            push("mlp.up_proj.weight", vec![self.inter, h]);
            push("mlp.down_proj.weight", vec![h, self.inter]);
        }
        names
    }
}

/// Deterministic random weights: each tensor is a function of its name only, so every variant
/// (and the stock baseline) of a shape sees the same values.
struct RandomWeights {
    path: PathBuf,
    /// `None`: dense F32 projections; `Some(q)`: projections quantized to `q`.
    quant: Option<GgmlDType>,
}

impl RandomWeights {
    fn new(quant: Option<GgmlDType>) -> Self {
        Self {
            path: PathBuf::from("<random weights>"),
            quant,
        }
    }

    /// ~N(0, 0.02), or ~N(1, 0.02) for norm weights, from a SplitMix64 stream seeded by `name`.
    /// Each normal sample is an Irwin-Hall sum of four 16-bit uniforms (one u64): cheap, and close
    /// enough to Gaussian for timing.
    fn values(name: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let mean = if name.ends_with("norm.weight") { 1.0 } else { 0.0 };
        // FNV-1a of the name, mixed with the seed.
        let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64 ^ SEED, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        // Sum of 4 U(0,1) has mean 2 and variance 1/3.
        let scale = WEIGHT_STD * 3f32.sqrt() / 65536.0;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let sum = (z & 0xffff) + ((z >> 16) & 0xffff) + ((z >> 32) & 0xffff) + (z >> 48);
                mean + (sum as f32 + 2.0 - 2.0 * 65536.0) * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    /// All tensors of `shape` by name, for candle-transformers' `VarBuilder::from_tensors`.
    #[cfg(feature = "baseline")]
    fn all(shape: &Shape) -> candle_core::Result<HashMap<String, Tensor>> {
        shape
            .tensor_names()
            .into_iter()
            .map(|(name, dims)| Ok((name.clone(), Self::values(&name, &dims)?)))
            .collect()
    }
}

impl WeightSource for RandomWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight" // tied embeddings
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> metal_candle::Result<Tensor> {
        Ok(Self::values(name, shape)?)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> metal_candle::Result<LinearWeight> {
        let w = Self::values(name, &[out_features, in_features])?;
        Ok(match self.quant {
            None => LinearWeight::Dense(w),
            Some(q) => LinearWeight::Quantized(Arc::new(QTensor::quantize(&w, q)?)),
        })
    }
}

/// The prompt: `len` arbitrary in-vocabulary ids, shape (1, len).
fn prompt(shape: &Shape) -> Tensor {
    let ids: Vec<u32> = (0..shape.prompt_len as u32)
        .map(|i| (i * 7919 + 13) % shape.vocab as u32)
        .collect();
    Tensor::new(ids.as_slice(), &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("prompt ids")
}

/// The token decoded in every timed step, shape (1, 1).
fn next_token() -> Tensor {
    Tensor::new(&[[42u32]], &Device::Cpu).expect("next token id")
}

/// Sums the time of `iters` decode steps, each from a fresh copy of the prefilled state made by
/// `fresh` (copied and dropped outside the timed region).
fn time_steps<S>(iters: u64, fresh: impl Fn() -> S, mut step: impl FnMut(&mut S) -> Tensor) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut state = fresh();
        let start = Instant::now();
        let logits = step(&mut state);
        Device::Cpu.synchronize().expect("synchronize");
        total += start.elapsed();
        black_box(logits);
        drop(state);
    }
    total
}

/// metal-candle prefilled with the prompt: the model and its cache.
fn ours_prefilled(shape: &Shape, quant: Option<GgmlDType>) -> (Model, KvCache, Tensor) {
    let weights = RandomWeights::new(quant);
    let model = Model::load(shape.config(), &weights, 4096, DType::F32, &Device::Cpu).expect("load model");
    let mut cache = model.new_cache();
    let logits = model
        .forward(&prompt(shape), &mut cache, Logits::Last)
        .expect("prefill");
    (model, cache, logits)
}

/// The stock candle-transformers model of `shape`, prefilled with the prompt.
#[cfg(feature = "baseline")]
enum Stock {
    Qwen2(qwen2::ModelForCausalLM),
    Llama(llama::Llama, llama::Cache),
}

#[cfg(feature = "baseline")]
impl Stock {
    fn prefilled(shape: &Shape) -> (Self, Tensor) {
        let tensors = RandomWeights::all(shape).expect("random weights");
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let ids = prompt(shape);
        let (stock, logits) = match shape.arch {
            Arch::Qwen2 => {
                let cfg = qwen2::Config {
                    vocab_size: shape.vocab,
                    hidden_size: shape.hidden,
                    intermediate_size: shape.inter,
                    num_hidden_layers: shape.layers,
                    num_attention_heads: shape.heads,
                    num_key_value_heads: shape.kv_heads,
                    max_position_embeddings: 4096,
                    sliding_window: 4096,
                    max_window_layers: shape.layers,
                    tie_word_embeddings: true,
                    rope_theta: shape.rope_theta,
                    rms_norm_eps: shape.rms_eps,
                    use_sliding_window: false,
                    hidden_act: candle_nn::Activation::Silu,
                };
                let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).expect("stock qwen2");
                let logits = model.forward(&ids, 0).expect("stock prefill");
                (Self::Qwen2(model), logits)
            }
            _ => {
                let cfg = llama::Config {
                    hidden_size: shape.hidden,
                    intermediate_size: shape.inter,
                    vocab_size: shape.vocab,
                    num_hidden_layers: shape.layers,
                    num_attention_heads: shape.heads,
                    num_key_value_heads: shape.kv_heads,
                    use_flash_attn: false,
                    rms_norm_eps: shape.rms_eps,
                    rope_theta: shape.rope_theta as f32,
                    bos_token_id: None,
                    eos_token_id: None,
                    rope_scaling: None,
                    max_position_embeddings: 4096,
                    tie_word_embeddings: true,
                };
                let model = llama::Llama::load(vb, &cfg).expect("stock llama");
                let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).expect("stock cache");
                let logits = model.forward(&ids, 0, &mut cache).expect("stock prefill");
                (Self::Llama(model, cache), logits)
            }
        };
        (stock, logits.flatten_all().expect("flatten"))
    }
}

/// Largest |a - b| over two logit vectors (any shape, same element count).
#[cfg(feature = "baseline")]
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.flatten_all().expect("flatten") - b.flatten_all().expect("flatten")).expect("sub");
    d.abs()
        .and_then(|d| d.max(0))
        .and_then(|m| m.to_scalar::<f32>())
        .expect("max diff")
}

fn bench_shape(c: &mut Criterion, shape: Shape, test_mode: bool) {
    let mut group = c.benchmark_group(format!("decode/{}", shape.label));
    group.throughput(Throughput::Elements(1));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(if shape.vocab > 100_000 { 8 } else { 5 }));
    let shape = if test_mode { shape.tiny() } else { shape };
    let ids = next_token();
    let pos = shape.prompt_len;

    // Reference logits of the prefill (metal-candle F32), to check the stock model agrees.
    #[cfg(feature = "baseline")]
    let mut reference: Option<Tensor> = None;

    for (variant, quant) in [
        ("f32", None),
        ("q8_0", Some(GgmlDType::Q8_0)),
        ("q4_0", Some(GgmlDType::Q4_0)),
    ] {
        // Built lazily: skipped when the name is filtered out, and dropped after its benchmark.
        let mut built: Option<(Model, KvCache)> = None;
        group.bench_function(BenchmarkId::new("metal-candle", variant), |b| {
            let (model, prefilled) = built.get_or_insert_with(|| {
                let (model, cache, _logits) = ours_prefilled(&shape, quant);
                #[cfg(feature = "baseline")]
                if quant.is_none() {
                    reference = Some(_logits.flatten_all().expect("flatten"));
                }
                (model, cache)
            });
            assert_eq!(prefilled.seq_len(), pos);
            b.iter_custom(|iters| {
                let fresh = || prefilled.deep_clone().expect("copy of the prefilled cache");
                time_steps(iters, fresh, |cache| {
                    model.forward(&ids, cache, Logits::Last).expect("decode step")
                })
            });
        });
    }

    #[cfg(feature = "baseline")]
    bench_stock(&mut group, &shape, &ids, pos, reference.as_ref());
    group.finish();
}

/// The candle-transformers baseline of one shape, in the same group as ours.
#[cfg(feature = "baseline")]
fn bench_stock(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    shape: &Shape,
    ids: &Tensor,
    pos: usize,
    reference: Option<&Tensor>,
) {
    let mut built: Option<Stock> = None;
    group.bench_function(BenchmarkId::new("candle-transformers", "f32"), |b| {
        let stock = built.get_or_insert_with(|| {
            let (stock, logits) = Stock::prefilled(shape);
            if let Some(r) = reference {
                let scale = r
                    .abs()
                    .and_then(|a| a.max(0))
                    .and_then(|m| m.to_scalar::<f32>())
                    .expect("max");
                eprintln!(
                    "{}: prefill logits max |metal-candle - candle-transformers| = {:.3e} (max |logit| {scale:.3e})",
                    shape.label,
                    max_abs_diff(r, &logits)
                );
            }
            stock
        });
        match stock {
            Stock::Qwen2(model) => {
                b.iter_custom(|iters| time_steps(iters, || model.clone(), |m| m.forward(ids, pos).expect("stock decode step")))
            }
            Stock::Llama(model, prefilled) => b.iter_custom(|iters| {
                time_steps(iters, || prefilled.clone(), |cache| {
                    model.forward(ids, pos, cache).expect("stock decode step")
                })
            }),
        }
    });
}

/// Criterion's own rule (criterion 0.7 `configure_from_args`): without `--bench`, or with
/// `--test`, the binary runs each benchmark once as a test.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    !has("--bench") || has("--test")
}

fn decode(c: &mut Criterion) {
    let test_mode = test_mode();
    bench_shape(c, SMOLLM2_135M, test_mode);
    bench_shape(c, QWEN25_0_5B, test_mode);
}

criterion_group!(benches, decode);
criterion_main!(benches);
