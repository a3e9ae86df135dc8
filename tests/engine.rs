//! The batch-first engine: one step of many sequences equals each sequence alone (HF and PEFT
//! references), the scheduler's prefix reuse, cancellation, forks and adapter isolation.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{argmax_rows, engine_idle_soon as idle_soon, ids_of, load_cpu, max_abs_diff, model_dir, reference, smollm2_path};
use metal_candle::adapter::{AdapterOptions, ApplyAdapter, LoraAdapter, SharedModel};
use metal_candle::chat::Message;
use metal_candle::engine::{Engine, EngineConfig, Request};
use metal_candle::generation::{Event, FinishReason, GenerateParams, Generator};
use metal_candle::model::{KvPool, RowLogits, StepBatch};
use metal_candle::{Error, Model};

/// f32 fixtures: our logits equal HF's within this (see tests/model_logits.rs).
const TOL: f32 = 1e-4;

fn lora_dir(base: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(base)
}

fn adapter(model: &Model, base: &str, which: &str) -> LoraAdapter {
    let path = lora_dir(base).join(which);
    LoraAdapter::load(&path, model, &AdapterOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One sequence's part of a step, and where its expected logits are.
struct Part {
    slot: usize,
    range: std::ops::Range<usize>,
    variant: usize,
    logits: RowLogits,
}

/// Runs `parts` as one step over `pool` and checks every returned logits row against
/// `refs[variant]` (HF/PEFT logits (t, vocab) of `ids`) at the row's positions.
fn check_step(model: &Model, variants: &[Model], pool: &mut KvPool, ids: &[u32], parts: &[Part], refs: &[Tensor], what: &str) {
    let mut batch = StepBatch::with_variants(variants.to_vec());
    for p in parts {
        batch.push(p.slot, p.range.start, &ids[p.range.clone()], p.variant, p.logits).unwrap();
    }
    let logits = model.forward_batch(&batch, pool).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(logits.dim(0).unwrap(), batch.logit_rows());
    let mut row = 0;
    for p in parts {
        let positions: Vec<usize> = match p.logits {
            RowLogits::None => vec![],
            RowLogits::Last => vec![p.range.end - 1],
            RowLogits::All => p.range.clone().collect(),
        };
        for pos in positions {
            let got = logits.narrow(0, row, 1).unwrap();
            let want = refs[p.variant].narrow(0, pos, 1).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= TOL, "{what}: slot {} variant {} position {pos}: differs from the reference by {d}", p.slot, p.variant);
            row += 1;
        }
        assert_eq!(pool.seq_len(p.slot), p.range.end, "{what}: slot {} holds its tokens", p.slot);
    }
}

/// Two mixed steps over four slots: different lengths, positions and adapter variants in one
/// forward pass, each row equal to the reference of its own sequence.
fn check_mixed_steps(model: &Model, variants: &[Model], ids: &[u32], refs: &[Tensor], what: &str) {
    let v = |i: usize| i % variants.len().max(1);
    let mut pool = model.new_pool(4, 64);
    let first = [
        Part { slot: 0, range: 0..10, variant: v(0), logits: RowLogits::All },
        Part { slot: 1, range: 0..20, variant: v(1), logits: RowLogits::Last },
        Part { slot: 3, range: 0..3, variant: v(2), logits: RowLogits::None },
    ];
    check_step(model, variants, &mut pool, ids, &first, refs, what);
    let second = [
        Part { slot: 1, range: 20..21, variant: v(1), logits: RowLogits::Last }, // decode deep in the context
        Part { slot: 0, range: 10..14, variant: v(0), logits: RowLogits::All },  // a prefill chunk
        Part { slot: 2, range: 0..7, variant: v(2), logits: RowLogits::All },    // a fresh prompt
        Part { slot: 3, range: 3..4, variant: v(2), logits: RowLogits::Last },   // after a chunk with no logits
    ];
    check_step(model, variants, &mut pool, ids, &second, refs, what);
}

#[test]
fn mixed_steps_equal_hf_for_every_architecture() {
    for arch in ["qwen2", "qwen3", "llama2", "llama3", "mistral"] {
        // llama.cpp's converter drops Mistral's sliding window, so its GGUF runs full attention.
        let files: &[Option<&str>] = if arch == "mistral" { &[None] } else { &[None, Some("model-f32.gguf")] };
        for &file in files {
            let dir = model_dir(arch);
            let model = load_cpu(&file.map_or(dir.clone(), |f| dir.join(f))).model;
            let r = reference(&dir.join("reference.safetensors"));
            let ids = ids_of(&r["input_ids"]);
            assert!(ids.len() >= 21);
            check_mixed_steps(&model, &[], &ids, &[r["logits"].clone()], &format!("{arch} {file:?}"));
        }
    }
}

#[test]
fn rows_with_different_adapters_equal_peft_in_one_step() {
    for base in ["qwen2", "qwen3", "llama2", "llama3"] {
        let model = load_cpu(&model_dir(base)).model;
        let (a, b, rs) = (adapter(&model, base, "a"), adapter(&model, base, "b"), adapter(&model, base, "rs"));
        let mut with_a = model.clone();
        with_a.apply_adapter("a", &a, 1.0).unwrap();
        let mut with_ab = model.clone();
        with_ab.apply_adapter("a", &a, 0.7).unwrap();
        with_ab.apply_adapter("b", &b, 1.5).unwrap();
        let mut with_rs = model.clone();
        with_rs.apply_adapter("rs", &rs, 1.0).unwrap();
        let r = reference(&lora_dir(base).join("reference.safetensors"));
        let ids = ids_of(&r["input_ids"]);
        // Variant 0 is the base (no adapter), then three adapter sets.
        let variants = vec![model.clone(), with_a, with_ab, with_rs];
        let refs: Vec<Tensor> = ["logits_base", "logits_a", "logits_ab", "logits_rs"].iter().map(|k| r[*k].clone()).collect();
        check_mixed_steps(&model, &variants, &ids, &refs, base);
        // All four variants in one step, one row each, positions 0..5 of fresh slots.
        let mut pool = model.new_pool(4, 32);
        let parts: Vec<Part> = (0..4).map(|i| Part { slot: i, range: 0..5 + i, variant: i, logits: RowLogits::All }).collect();
        check_step(&model, &variants, &mut pool, &ids, &parts, &refs, &format!("{base}: four variants"));
    }
}

/// Quantized fixtures: rows of a mixed step equal the same sequences run alone (the kernels
/// quantize activations per row, so a row's result should not depend on its neighbours).
#[test]
fn quantized_rows_in_a_mixed_step_equal_each_sequence_alone() {
    for (arch, file) in [("qwen2", "model-q8_0.gguf"), ("llama3", "model-q8_0.gguf"), ("llama-256", "model-q4_k.gguf"), ("llama-256", "model-q4_0.gguf")] {
        let model = load_cpu(&model_dir(arch).join(file)).model;
        let ids = ids_of(&reference(&model_dir(arch).join("reference.safetensors"))["input_ids"]);
        let alone = common::full_logits(&model, &ids); // (t, vocab)
        let mut pool = model.new_pool(4, 64);
        let mut worst = 0f32;
        let mut step = |parts: &[(usize, std::ops::Range<usize>)]| {
            let mut batch = StepBatch::new();
            for (slot, r) in parts {
                batch.push(*slot, r.start, &ids[r.clone()], 0, RowLogits::All).unwrap();
            }
            let logits = model.forward_batch(&batch, &mut pool).unwrap();
            let mut row = 0;
            for (_, r) in parts {
                let got = logits.narrow(0, row, r.len()).unwrap();
                worst = worst.max(max_abs_diff(&got, &alone.narrow(0, r.start, r.len()).unwrap()));
                row += r.len();
            }
        };
        step(&[(0, 0..10), (1, 0..20), (2, 0..1)]);
        step(&[(1, 20..21), (0, 10..14), (2, 1..2), (3, 0..7)]);
        eprintln!("{arch} {file}: rows in mixed steps vs alone: max diff {worst:.2e}");
        assert!(worst <= 1e-3, "{arch} {file}: a row depends on its batch by {worst}");
    }
}

#[test]
fn pools_of_other_models_and_bad_rows_are_typed_errors() {
    let model = load_cpu(&model_dir("qwen2")).model;
    let other = load_cpu(&model_dir("qwen2")).model;
    let mistral = load_cpu(&model_dir("mistral")).model;
    let ids = [1u32, 2, 3];
    let run = |m: &Model, pool: &mut KvPool, slot: usize, start: usize| {
        let mut b = StepBatch::new();
        b.push(slot, start, &ids, 0, RowLogits::Last).unwrap();
        m.forward_batch(&b, pool)
    };
    let mut pool = other.new_pool(2, 16);
    assert!(matches!(run(&model, &mut pool, 0, 0), Err(Error::KvPoolMismatch { .. })), "another model's pool");
    let mut pool = mistral.new_pool(2, 16);
    assert!(matches!(run(&model, &mut pool, 0, 0), Err(Error::KvPoolMismatch { .. })), "other windows");
    let mut pool = model.new_pool(2, 16);
    assert!(matches!(run(&model, &mut pool, 0, 1), Err(Error::RowPosition { slot: 0, start: 1, held: 0 })));
    assert!(matches!(run(&model, &mut pool, 5, 0), Err(Error::KvSlot { slot: 5, .. })));
    let mut small = model.new_pool(1, 2);
    assert!(matches!(run(&model, &mut small, 0, 0), Err(Error::ContextOverflow { prompt_tokens: 3, context: 2 })));
    let mut b = StepBatch::with_variants(vec![other.clone()]);
    b.push(0, 0, &ids, 0, RowLogits::Last).unwrap();
    assert!(matches!(model.forward_batch(&b, &mut pool), Err(Error::InvalidBatch { .. })), "variant of another model");
    // Nothing above changed the pool.
    assert_eq!(pool.seq_len(0), 0);
}

fn generator(path: &Path) -> Generator {
    Generator::from_loaded(&load_cpu(path)).unwrap()
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams { max_tokens: n, ignore_eos: true, ..GenerateParams::default() }
}

#[test]
fn engine_requests_equal_solo_streams_and_free_their_slots() {
    let g = generator(&model_dir("llama3"));
    let engine = Engine::new(g.clone(), EngineConfig { max_sequences: 3, max_step_tokens: 8, ..EngineConfig::default() }).unwrap();
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| (0..(3 + 2 * i)).map(|j| (7 * i + 3 * j + 1) % 200).collect()).collect();
    let solo: Vec<Vec<u32>> = prompts.iter().map(|p| g.generate(p.clone(), &greedy(6)).unwrap().tokens).collect();
    // Six requests on three slots with an 8-token budget: queueing, chunked prefill (the longest
    // prompt has 13 tokens) and decode rows mixed in the same steps.
    let handles: Vec<_> = prompts.iter().map(|p| engine.submit(p.clone(), &greedy(6)).unwrap()).collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.collect_generation().unwrap();
        assert_eq!(out.tokens, solo[i], "request {i}");
        assert_eq!(out.finished.reason, FinishReason::Length);
    }
    assert!(idle_soon(&engine));
}

#[test]
fn cancelled_and_dropped_requests_free_their_slots() {
    let g = generator(&model_dir("qwen2"));
    let engine = Engine::new(g, EngineConfig { max_sequences: 1, max_queue: 2, ..EngineConfig::default() }).unwrap();
    let long = GenerateParams { max_tokens: 100_000.min(engine.context() - 8), ignore_eos: true, ..GenerateParams::default() };
    let mut first = engine.submit(vec![1u32, 2, 3], &long).unwrap();
    assert!(matches!(first.next(), Some(Ok(Event::Token { .. }))));
    // The only slot is busy: the next request waits, the queue fills, one more is refused.
    let second = engine.submit(vec![4u32, 5], &greedy(2)).unwrap();
    let third = engine.submit(vec![6u32], &greedy(2)).unwrap();
    assert!(matches!(engine.submit(vec![7u32], &greedy(2)), Err(Error::QueueFull { limit: 2 })));
    first.cancel_handle().cancel();
    let rest: Vec<_> = first.by_ref().collect::<Result<Vec<_>, _>>().unwrap();
    assert!(matches!(rest.last(), Some(Event::Finished(f)) if f.reason == FinishReason::Cancelled));
    // Dropping a waiting request frees its place; the other one runs.
    drop(second);
    let out = third.collect_generation().unwrap();
    assert_eq!(out.tokens.len(), 2);
    // A request dropped mid-decode frees the slot too: the next one completes.
    let mut h = engine.submit(vec![1u32, 2, 3], &long).unwrap();
    assert!(matches!(h.next(), Some(Ok(Event::Token { .. }))));
    drop(h);
    assert_eq!(engine.submit(vec![9u32], &greedy(3)).unwrap().collect_generation().unwrap().tokens.len(), 3);
    assert!(idle_soon(&engine));
}

#[test]
fn invalid_requests_fail_at_submit() {
    let g = generator(&model_dir("qwen2"));
    let engine = Engine::new(g, EngineConfig { context: Some(16), ..EngineConfig::default() }).unwrap();
    let too_long: Vec<u32> = (1..=16).collect();
    assert!(matches!(engine.submit(too_long, &greedy(1)), Err(Error::ContextOverflow { prompt_tokens: 16, context: 16 })));
    let bad = GenerateParams { max_tokens: 0, ..GenerateParams::default() };
    assert!(matches!(engine.submit(vec![1u32], &bad), Err(Error::InvalidParameter { name: "max_tokens", .. })));
    let mut req = Request::new(vec![1u32], &greedy(1));
    req.n = 0;
    assert!(matches!(engine.submit_request(req), Err(Error::InvalidParameter { name: "n", .. })));
    // Context minus one tokens gives exactly one token.
    let out = engine.submit((1..=15).collect::<Vec<u32>>(), &greedy(5)).unwrap().collect_generation().unwrap();
    assert_eq!(out.tokens.len(), 1);
    assert_eq!(out.finished.reason, FinishReason::Length);
    assert!(Engine::new(generator(&model_dir("qwen2")), EngineConfig { max_step_tokens: 4, ..EngineConfig::default() }).is_err());
}

#[test]
fn n_forks_share_one_prefill_and_equal_separate_requests() {
    let g = generator(&model_dir("qwen3"));
    let engine = Engine::new(g.clone(), EngineConfig::default()).unwrap();
    let mut params = GenerateParams { max_tokens: 8, ignore_eos: true, ..GenerateParams::default() };
    params.sampling.temperature = 0.9;
    params.sampling.seed = 11;
    let prompt: Vec<u32> = (1..20).collect();
    let mut req = Request::new(prompt.clone(), &params);
    req.n = 3;
    let outs: Vec<_> = engine.submit_request(req).unwrap().into_iter().map(|h| h.collect_generation().unwrap()).collect();
    for (i, out) in outs.iter().enumerate() {
        let mut p = params.clone();
        p.sampling.seed = 11 + i as u64;
        let solo = g.generate(prompt.clone(), &p).unwrap();
        assert_eq!(out.tokens, solo.tokens, "fork {i} equals a request with seed {}", 11 + i);
    }
    assert_ne!(outs[0].tokens, outs[1].tokens, "different seeds sample differently");
}

#[test]
fn a_conversation_resent_in_full_prefills_only_its_new_tokens() {
    let g = generator(&model_dir("qwen2"));
    let engine = Engine::new(g.clone(), EngineConfig { max_sequences: 2, ..EngineConfig::default() }).unwrap();
    let params = GenerateParams { max_tokens: 5, ..GenerateParams::default() };
    let mut chat = vec![Message::system("Be brief."), Message::user("Hello there")];
    let turn1 = engine.submit(chat.clone(), &params).unwrap().collect_generation().unwrap();
    assert_eq!(turn1.finished.timings.cached_tokens, 0);
    chat.push(Message::assistant(turn1.text.clone()));
    chat.push(Message::user("And again"));
    let ids2 = g.encode_chat(&chat, true).unwrap();
    let turn1_ids = g.encode_chat(&chat[..2], true).unwrap();
    // What the slot holds: turn 1's prompt and reply (the template re-renders the reply, so the
    // shared prefix is computed, not assumed).
    let mut held = turn1_ids.clone();
    held.extend(&turn1.tokens);
    let common = held.iter().zip(&ids2).take_while(|(a, b)| a == b).count();
    // The reply's first token may merge with the template's text before it when re-tokenized.
    assert!(common + 1 >= turn1_ids.len(), "turn 1's prompt is part of the shared prefix");
    let turn2 = engine.submit(chat.clone(), &params).unwrap().collect_generation().unwrap();
    assert_eq!(turn2.finished.timings.cached_tokens, common);
    assert_eq!(turn2.finished.timings.prompt_tokens, ids2.len());
    // And the answer equals a fresh solo run of the whole conversation.
    assert_eq!(turn2.tokens, g.generate(chat, &params).unwrap().tokens);
}

#[test]
fn adapter_requests_run_together_and_keep_their_adapter_when_it_is_removed() {
    let base = load_cpu(&model_dir("llama3"));
    let g = Generator::from_loaded(&base).unwrap();
    let shared = SharedModel::new(base.model.clone());
    let (a, b) = (adapter(&base.model, "llama3", "a"), adapter(&base.model, "llama3", "b"));
    let engine = Engine::new(g.clone(), EngineConfig::default()).unwrap();
    let prompt: Vec<u32> = (3..15).collect();
    let solo = |m: Model| {
        let mut g2 = g.clone();
        g2.set_model(m);
        g2.generate(prompt.clone(), &greedy(10)).unwrap().tokens
    };
    shared.apply_adapter("a", &a, 1.0).unwrap();
    let snap_a = shared.snapshot();
    shared.remove_adapter("a").unwrap();
    shared.apply_adapter("b", &b, 1.0).unwrap();
    let snap_b = shared.snapshot();
    let want = [solo(base.model.clone()), solo(snap_a.clone()), solo(snap_b.clone())];
    assert_ne!(want[1], want[2]);
    let submit = |m: Option<Model>| {
        let mut r = Request::new(prompt.clone(), &greedy(10));
        r.model = m;
        engine.submit_request(r).unwrap().remove(0)
    };
    let handles = [submit(None), submit(Some(snap_a)), submit(Some(shared.snapshot()))];
    // While they run, the shared model drops `b`: the running request keeps it.
    shared.remove_adapter("b").unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.collect_generation().unwrap().tokens, want[i], "request {i}");
    }
    drop(snap_b);
}

#[test]
fn smollm2_eight_prompts_together_equal_each_alone() {
    let Some(path) = smollm2_path() else { return };
    let g = generator(&path);
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time",
        "The three primary colors are",
        "In 1969, humans first",
        "Water boils at",
        "My favourite fruit is",
        "The largest planet in the solar system is",
    ];
    let params = GenerateParams { max_tokens: 12, ..GenerateParams::default() };
    let solo: Vec<Vec<u32>> = prompts.iter().map(|p| g.generate(*p, &params).unwrap().tokens).collect();
    let engine = Engine::new(g, EngineConfig { max_sequences: 8, ..EngineConfig::default() }).unwrap();
    let handles: Vec<_> = prompts.iter().map(|p| engine.submit(*p, &params).unwrap()).collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.collect_generation().unwrap();
        assert_eq!(out.tokens, solo[i], "prompt {:?}", prompts[i]);
    }
    let _ = argmax_rows;
}
