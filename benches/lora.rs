//! LoRA cost on CPU, on a Qwen2.5-0.5B-shaped model with random F32 weights (hidden 896, 24 layers,
//! 14/2 heads, intermediate 4864, vocab 151936, tied):
//!
//! - `lora-decode/*`: one single-token decode step (tokens/s) after a 32-token prompt, for the base,
//!   one adapter of rank 8 / 16 / 64, four adapters of rank 16 (all seven projections of every
//!   layer, unmerged), and one rank-16 adapter merged into the weights. Each case also prints a
//!   paired figure (`paired decode …`): base and adapted steps alternated, medians compared, which
//!   stays meaningful when other processes load the machine.
//! - `lora-swap/apply+snapshot`: hot swap between two resident rank-16 adapters on a
//!   [`SharedModel`] (replace under one name), plus the snapshot the next generation takes: the
//!   time from the call to a model ready for the next forward.
//! - `lora-load/load+apply`: a rank-16 all-projection PEFT adapter read from disk, validated,
//!   prepared and applied.
//!
//! - `lora-mixed/*`: one decode step of 8 sequences in one batch ([`Model::forward_batch`]) whose
//!   rows use 0 (base), 1 or 4 distinct rank-16 adapters (2 rows each), with a paired overhead
//!   figure against the 8-row base step.
//!
//! Run: `cargo bench --bench lora` (about 2 minutes on 2 cores). Under `cargo test --benches` every
//! case runs once on a tiny shape.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use metal_candle::adapter::{AdapterModule, AdapterOptions, ApplyAdapter, LoraAdapter, SharedModel};
use metal_candle::loader::weights::WeightSource;
use metal_candle::model::linear::{LinearWeight, LoraWeights, Projection};
use metal_candle::model::{KvPool, RowLogits, StepBatch};
use metal_candle::{Arch, KvCache, Logits, Model, ModelConfig};

/// Tokens in the cache before the timed decode step.
const PROMPT_LEN: usize = 32;
/// Alternating base/adapted decode steps per case for the paired overhead figure.
const PAIRED_ROUNDS: usize = 40;
/// Half-width of the uniform random weights.
const WEIGHT_RANGE: f32 = 0.03;

#[derive(Debug, Clone, Copy)]
struct Shape {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    prompt_len: usize,
}

const QWEN25_0_5B: Shape = Shape {
    vocab: 151_936,
    hidden: 896,
    inter: 4864,
    layers: 24,
    heads: 14,
    kv_heads: 2,
    head_dim: 64,
    prompt_len: PROMPT_LEN,
};

const TINY: Shape = Shape {
    vocab: 256,
    hidden: 64,
    inter: 128,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    prompt_len: 4,
};

impl Shape {
    fn config(&self) -> ModelConfig {
        ModelConfig {
            arch: Arch::Qwen2,
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.inter,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: self.head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_scaling: None,
            rope_interleaved: false,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            layer_windows: vec![None; self.layers],
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }
}

/// Uniform random weights (values do not change the timing); norm weights are 1.
struct RandomWeights(PathBuf);

impl WeightSource for RandomWeights {
    fn path(&self) -> &Path {
        &self.0
    }

    fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight"
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> metal_candle::Result<Tensor> {
        if name.ends_with("norm.weight") {
            return Ok(Tensor::ones(shape, DType::F32, &Device::Cpu)?);
        }
        Ok(Tensor::rand(-WEIGHT_RANGE, WEIGHT_RANGE, shape, &Device::Cpu)?)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> metal_candle::Result<LinearWeight> {
        Ok(LinearWeight::Dense(self.tensor(name, &[out, inp])?))
    }
}

fn base_model(shape: &Shape) -> Model {
    let w = RandomWeights(PathBuf::from("<random>"));
    Model::load(shape.config(), &w, 4096, DType::F32, &Device::Cpu).expect("random model")
}

/// A random adapter of rank `r` on all seven projections of every layer.
fn random_adapter(model: &Model, r: usize) -> LoraAdapter {
    let mut modules = Vec::new();
    for (layer, l) in model.layers().iter().enumerate() {
        for proj in Projection::ALL {
            let (out, inp) = l.projection(proj).weight().dims();
            let a = Tensor::rand(-0.05f32, 0.05, (r, inp), &Device::Cpu).expect("A");
            let b = Tensor::rand(-0.05f32, 0.05, (out, r), &Device::Cpu).expect("B");
            let weights = LoraWeights::new(a, b, 2.0).expect("factors").into();
            modules.push(AdapterModule { layer, proj, weights });
        }
    }
    LoraAdapter::from_modules(PathBuf::from(format!("<random r{r}>")), model, modules).expect("adapter")
}

/// Writes `adapter` as a PEFT directory (adapter_config.json + adapter_model.safetensors).
fn write_peft(adapter: &LoraAdapter, r: usize, dir: &Path) {
    let mut tensors = std::collections::HashMap::new();
    for m in adapter.modules() {
        let key = format!("base_model.model.model.layers.{}.{}", m.layer, m.proj.hf_name());
        tensors.insert(format!("{key}.lora_A.weight"), m.weights.a().clone());
        tensors.insert(format!("{key}.lora_B.weight"), m.weights.b().clone());
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).expect("save");
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).expect("config");
}

fn prefill(model: &Model, shape: &Shape) -> KvCache {
    let ids: Vec<u32> = (0..shape.prompt_len as u32).map(|i| (i * 7919 + 13) % shape.vocab as u32).collect();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
    let mut cache = model.new_cache();
    model.forward(&x, &mut cache, Logits::Last).expect("prefill");
    cache
}

/// Total time of `iters` decode steps, each from a clone of `prefilled` made outside the clock.
fn time_decode(model: &Model, prefilled: &KvCache, iters: u64) -> Duration {
    let x = Tensor::new(&[[42u32]], &Device::Cpu).expect("token");
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut cache = prefilled.deep_clone().expect("clone cache");
        let start = Instant::now();
        black_box(model.forward(&x, &mut cache, Logits::Last).expect("decode"));
        total += start.elapsed();
    }
    total
}

/// The time of one decode step from a clone of `prefilled`.
fn step_time(model: &Model, prefilled: &KvCache) -> Duration {
    time_decode(model, prefilled, 1)
}

/// Decode overhead of `model` over `base`, measured in alternation (base, adapted, base, …) so
/// that load from other processes on a shared machine hits both alike; prints medians.
fn paired_overhead(label: &str, base: (&Model, &KvCache), model: (&Model, &KvCache), rounds: usize) {
    let (mut tb, mut ta) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        if i % 2 == 0 {
            tb.push(step_time(base.0, base.1));
            ta.push(step_time(model.0, model.1));
        } else {
            ta.push(step_time(model.0, model.1));
            tb.push(step_time(base.0, base.1));
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let (mb, ma) = (median(&mut tb), median(&mut ta));
    eprintln!(
        "paired decode {label}: base {mb:.2} ms, adapted {ma:.2} ms, overhead {:+.1}% ({rounds} rounds)",
        (ma / mb - 1.0) * 100.0
    );
}

fn bench_decode(c: &mut Criterion, shape: &Shape, base: &Model, rounds: usize) {
    let mut group = c.benchmark_group("lora-decode");
    group.throughput(Throughput::Elements(1));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(6));
    let cases: [(&str, &[usize], bool); 6] = [
        ("base", &[], false),
        ("1x-r8", &[8], false),
        ("1x-r16", &[16], false),
        ("1x-r64", &[64], false),
        ("4x-r16", &[16, 16, 16, 16], false),
        ("1x-r16-merged", &[16], true),
    ];
    let base_cache = prefill(base, shape);
    for (label, ranks, merge) in cases {
        let mut built: Option<(Model, KvCache)> = None;
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            let (model, cache) = built.get_or_insert_with(|| {
                let mut m = base.clone();
                for (i, r) in ranks.iter().enumerate() {
                    let name = format!("a{i}");
                    m.apply_adapter(&name, &random_adapter(base, *r), 0.5).expect("apply");
                    if merge {
                        m.merge_adapter(&name).expect("merge");
                    }
                }
                let cache = prefill(&m, shape);
                (m, cache)
            });
            b.iter_custom(|iters| time_decode(model, cache, iters));
        });
        if let Some((model, cache)) = &built {
            paired_overhead(label, (base, &base_cache), (model, cache), rounds);
        }
    }
    group.finish();
}

fn bench_swap(c: &mut Criterion, base: &Model) {
    let shared = SharedModel::new(base.clone());
    let (x, y) = (random_adapter(base, 16), random_adapter(base, 16));
    shared.apply_adapter("task", &x, 1.0).expect("apply");
    let mut group = c.benchmark_group("lora-swap");
    group.bench_function("apply+snapshot", |b| {
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            shared.apply_adapter("task", if flip { &y } else { &x }, 1.0).expect("swap");
            black_box(shared.snapshot())
        })
    });
    group.finish();
}

fn bench_load(c: &mut Criterion, base: &Model) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_peft(&random_adapter(base, 16), 16, dir.path());
    let mut group = c.benchmark_group("lora-load");
    group.sample_size(10);
    group.bench_function("load+apply r16", |b| {
        b.iter(|| {
            let mut m = base.clone();
            let a = LoraAdapter::load(dir.path(), &m, &AdapterOptions::default()).expect("load");
            m.apply_adapter("task", &a, 1.0).expect("apply");
            black_box(m)
        })
    });
    group.finish();
}

/// Rows of the mixed-adapter step.
const MIXED_ROWS: usize = 8;

/// A pool of [`MIXED_ROWS`] slots, slot s prefilled by variant `assign[s]`.
fn mixed_pool(variants: &[Model], assign: &[usize], shape: &Shape) -> KvPool {
    let base = &variants[0];
    let mut pool = base.new_pool(MIXED_ROWS, shape.prompt_len + 2);
    let mut batch = StepBatch::with_variants(variants.to_vec());
    for (slot, &v) in assign.iter().enumerate() {
        let ids: Vec<u32> = (0..shape.prompt_len as u32).map(|i| (i * 7919 + 13 + slot as u32) % shape.vocab as u32).collect();
        batch.push(slot, 0, &ids, v, RowLogits::None).expect("row");
    }
    base.forward_batch(&batch, &mut pool).expect("prefill");
    pool
}

/// Total time of `iters` 8-row decode steps; the slots are rewound outside the clock.
fn time_mixed(variants: &[Model], assign: &[usize], pool: &mut KvPool, shape: &Shape, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut batch = StepBatch::with_variants(variants.to_vec());
        for (slot, &v) in assign.iter().enumerate() {
            pool.truncate(slot, shape.prompt_len);
            batch.push(slot, shape.prompt_len, &[42], v, RowLogits::Last).expect("row");
        }
        let start = Instant::now();
        black_box(variants[0].forward_batch(&batch, pool).expect("step"));
        total += start.elapsed();
    }
    total
}

fn bench_mixed(c: &mut Criterion, shape: &Shape, base: &Model, rounds: usize) {
    let adapters: Vec<Model> = (0..4)
        .map(|i| {
            let mut m = base.clone();
            m.apply_adapter(&format!("a{i}"), &random_adapter(base, 16), 0.5).expect("apply");
            m
        })
        .collect();
    let mut variants = vec![base.clone()];
    variants.extend(adapters);
    let cases: [(&str, [usize; MIXED_ROWS]); 3] = [
        ("8rows-0-adapters", [0; MIXED_ROWS]),
        ("8rows-1-adapter", [1; MIXED_ROWS]),
        ("8rows-4-adapters", [1, 2, 3, 4, 1, 2, 3, 4]),
    ];
    let mut group = c.benchmark_group("lora-mixed");
    group.throughput(Throughput::Elements(MIXED_ROWS as u64));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(6));
    let mut base_pool = mixed_pool(&variants, &cases[0].1, shape);
    for (label, assign) in &cases {
        let mut pool = mixed_pool(&variants, assign, shape);
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter_custom(|iters| time_mixed(&variants, assign, &mut pool, shape, iters));
        });
        let (mut tb, mut ta) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            tb.push(time_mixed(&variants, &cases[0].1, &mut base_pool, shape, 1));
            ta.push(time_mixed(&variants, assign, &mut pool, shape, 1));
        }
        tb.sort();
        ta.sort();
        let (mb, ma) = (tb[tb.len() / 2].as_secs_f64() * 1e3, ta[ta.len() / 2].as_secs_f64() * 1e3);
        eprintln!("paired 8-row step {label}: base {mb:.2} ms, this {ma:.2} ms, overhead {:+.1}% ({rounds} rounds)", (ma / mb - 1.0) * 100.0);
    }
    group.finish();
}

/// Criterion's own rule: without `--bench`, or with `--test`, each benchmark runs once.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    !has("--bench") || has("--test")
}

fn lora(c: &mut Criterion) {
    let (shape, rounds) = if test_mode() { (TINY, 1) } else { (QWEN25_0_5B, PAIRED_ROUNDS) };
    let base = base_model(&shape);
    bench_swap(c, &base);
    bench_load(c, &base);
    bench_decode(c, &shape, &base, rounds);
    bench_mixed(c, &shape, &base, rounds);
}

criterion_group!(benches, lora);
criterion_main!(benches);
