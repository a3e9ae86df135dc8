//! LoRA adapters equal PEFT (fixtures from scripts/fixtures/make_lora_fixtures.py): one adapter,
//! two at different scales, rsLoRA + rank_pattern/alpha_pattern, merged; on safetensors and GGUF
//! F32 bases (llama-arch GGUFs prove the q/k permutation), with PEFT and llama.cpp GGUF adapters.
//! Plus: apply/remove is bit-exact, A → B → A reproduces A, generations are isolated from
//! concurrent swaps, and the registry's budget.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use common::*;
use metal_candle::adapter::{AdapterOptions, AdapterRegistry, ApplyAdapter, LoraAdapter, SharedModel};
use metal_candle::{Logits, Model};

/// f32 tolerance against PEFT (absolute, on logits).
const TOL: f32 = 1e-4;
/// Bases with PEFT fixtures; every one has a model-f32.gguf too.
const BASES: [&str; 4] = ["qwen2", "qwen3", "llama3", "llama2"];
/// Bases with a llama.cpp-converted `a.gguf`.
const GGUF_ADAPTER_BASES: [&str; 2] = ["qwen2", "llama3"];
const SCALE_A: f64 = 0.7;
const SCALE_B: f64 = 1.5;

fn lora_dir(base: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(base)
}

fn base_model(base: &str, gguf: bool) -> Model {
    let dir = model_dir(base);
    load_cpu(&if gguf { dir.join("model-f32.gguf") } else { dir }).model
}

fn adapter(model: &Model, base: &str, which: &str) -> LoraAdapter {
    let path = lora_dir(base).join(which);
    LoraAdapter::load(&path, model, &AdapterOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(base: &str) -> Vec<u32> {
    ids_of(&reference(&lora_dir(base).join("reference.safetensors"))["input_ids"])
}

fn expect(base: &str, key: &str, got: &Tensor, what: &str) {
    let want = &reference(&lora_dir(base).join("reference.safetensors"))[key];
    let d = max_abs_diff(got, want);
    eprintln!("{base} {what} {key}: max |ours - peft| = {d:.2e}");
    assert!(d <= TOL, "{base} {what} {key}: differs from PEFT by {d}");
}

fn check_peft_cases(base: &str, gguf: bool) {
    let what = if gguf { "gguf-f32 base" } else { "safetensors base" };
    let mut model = base_model(base, gguf);
    let ids = ids(base);
    let (a, b, rs) = (adapter(&model, base, "a"), adapter(&model, base, "b"), adapter(&model, base, "rs"));
    expect(base, "logits_base", &full_logits(&model, &ids), what);
    model.apply_adapter("a", &a, 1.0).unwrap();
    expect(base, "logits_a", &full_logits(&model, &ids), what);
    expect(base, "logits_a", &chunked_logits(&model, &ids, &[7, 1, 1, 6]), what);
    model.set_adapter_scale("a", SCALE_A).unwrap();
    model.apply_adapter("b", &b, SCALE_B).unwrap();
    expect(base, "logits_ab", &full_logits(&model, &ids), what);
    model.merge_adapter("a").unwrap();
    model.merge_adapter("b").unwrap();
    expect(base, "logits_merged", &full_logits(&model, &ids), what);
    model.remove_adapter("a").unwrap();
    model.remove_adapter("b").unwrap();
    model.apply_adapter("rs", &rs, 1.0).unwrap();
    expect(base, "logits_rs", &full_logits(&model, &ids), what);
}

#[test]
fn peft_adapters_equal_peft_on_safetensors_bases() {
    for base in BASES {
        check_peft_cases(base, false);
    }
}

#[test]
fn peft_adapters_equal_peft_on_gguf_f32_bases() {
    for base in BASES {
        check_peft_cases(base, true);
    }
}

#[test]
fn llama_cpp_gguf_adapters_equal_peft() {
    for base in GGUF_ADAPTER_BASES {
        for gguf_base in [true, false] {
            let mut model = base_model(base, gguf_base);
            let a = adapter(&model, base, "a.gguf");
            assert_eq!(a.modules().len(), 7 * 2);
            model.apply_adapter("a", &a, 1.0).unwrap();
            let what = if gguf_base { "gguf adapter, gguf base" } else { "gguf adapter, safetensors base" };
            expect(base, "logits_a", &full_logits(&model, &ids(base)), what);
        }
    }
}

#[test]
fn apply_then_remove_gives_base_logits_bit_for_bit() {
    for gguf in [false, true] {
        let mut model = base_model("llama3", gguf);
        let ids = ids("llama3");
        let before = full_logits(&model, &ids);
        let (a, b) = (adapter(&model, "llama3", "a"), adapter(&model, "llama3", "b"));
        model.apply_adapter("a", &a, 0.5).unwrap();
        model.apply_adapter("b", &b, 2.0).unwrap();
        model.merge_adapter("a").unwrap();
        assert!(max_abs_diff(&full_logits(&model, &ids), &before) > 0.1);
        model.unmerge_adapter("a").unwrap();
        model.remove_adapter("a").unwrap();
        model.remove_adapter("b").unwrap();
        assert!(model.active_adapters().is_empty());
        assert_eq!(max_abs_diff(&full_logits(&model, &ids), &before), 0.0, "gguf base: {gguf}");
    }
}

#[test]
fn switching_a_to_b_to_a_reproduces_a() {
    let mut model = base_model("qwen2", false);
    let ids = ids("qwen2");
    let (a, b) = (adapter(&model, "qwen2", "a"), adapter(&model, "qwen2", "b"));
    model.apply_adapter("task", &a, 1.0).unwrap();
    let first = full_logits(&model, &ids);
    model.apply_adapter("task", &b, 1.0).unwrap(); // replaced under the same name
    assert_eq!(model.active_adapters().len(), 1);
    let with_b = full_logits(&model, &ids);
    assert!(max_abs_diff(&with_b, &first) > 0.1);
    model.apply_adapter("task", &a, 1.0).unwrap();
    assert_eq!(max_abs_diff(&full_logits(&model, &ids), &first), 0.0);
}

#[test]
fn quantized_base_takes_unmerged_adapters() {
    let path = model_dir("llama3").join("model-q8_0.gguf");
    let mut model = load_cpu(&path).model;
    let ids = ids("llama3");
    let before = full_logits(&model, &ids);
    let a = adapter(&model, "llama3", "a");
    model.apply_adapter("a", &a, 1.0).unwrap();
    let with_a = full_logits(&model, &ids);
    // The Q8_0 base differs from F32 and quantizes activations (max 0.2 on these base logits);
    // the adapter moves logits by up to 13, and that error grows with them: measured 0.74.
    let want = &reference(&lora_dir("llama3").join("reference.safetensors"))["logits_a"];
    let agree = argmax_rows(&with_a).iter().zip(argmax_rows(want)).filter(|(x, y)| **x == *y).count();
    assert!(agree * 10 >= ids.len() * 8, "top-1 agrees on {agree}/{}", ids.len());
    eprintln!("q8_0 + adapter vs PEFT f32: max diff {}, top-1 {agree}/{}", max_abs_diff(&with_a, want), ids.len());
    assert!(max_abs_diff(&with_a, want) < 1.0);
    assert!(model.merge_adapter("a").is_err(), "merging into a quantized base must fail");
    model.remove_adapter("a").unwrap();
    assert_eq!(max_abs_diff(&full_logits(&model, &ids), &before), 0.0);
}

/// Greedy decode of `n` tokens after `prompt`, one forward per token.
fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let x = Tensor::new(input.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&x, &mut cache, Logits::Last).unwrap().squeeze(0).unwrap();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(next);
        input = vec![next];
    }
    out
}

#[test]
fn generation_keeps_its_adapters_while_another_thread_swaps() {
    let model = base_model("qwen2", false);
    let (a, b) = (Arc::new(adapter(&model, "qwen2", "a")), Arc::new(adapter(&model, "qwen2", "b")));
    let prompt = &ids("qwen2")[..6];
    let shared = Arc::new(SharedModel::new(model));
    shared.apply_adapter("task", &a, 1.0).unwrap();
    let sequential = greedy(&shared.snapshot(), prompt, 40);
    let done = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (shared, a, b, done) = (shared.clone(), a.clone(), b.clone(), done.clone());
        std::thread::spawn(move || {
            let mut swaps = 0;
            while !done.load(Ordering::Relaxed) {
                shared.apply_adapter("task", &b, 3.0).unwrap(); // atomic replace
                shared.apply_adapter("extra", &a, 0.5).unwrap();
                shared.set_adapter_scale("extra", 2.0).unwrap();
                shared.remove_adapter("extra").unwrap();
                shared.apply_adapter("task", &a, 1.0).unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let mut runs = Vec::new();
    for _ in 0..3 {
        let snapshot = shared.snapshot(); // a generation captures the adapter set at start
        runs.push((snapshot.active_adapters(), greedy(&snapshot, prompt, 40)));
    }
    done.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    let mut with_a = 0;
    for (active, tokens) in runs {
        if active.len() == 1 && active[0].scale == 1.0 {
            assert_eq!(tokens, sequential, "a generation started on adapter a changed tokens");
            with_a += 1;
        } else {
            let mut m = base_model("qwen2", false);
            for x in &active {
                let which = if x.name == "task" && x.scale == 3.0 { &b } else { &a };
                m.apply_adapter(&x.name, which, x.scale).unwrap();
            }
            assert_eq!(tokens, greedy(&m, prompt, 40), "concurrent run differs from sequential for {active:?}");
        }
    }
    eprintln!("{swaps} swaps during the runs; {with_a} of 3 started on adapter a");
    // A generation that holds a snapshot taken before any swap is never disturbed.
    let snapshot = shared.snapshot();
    let active = snapshot.active_adapters();
    shared.remove_adapter("task").ok();
    assert_eq!(snapshot.active_adapters(), active);
}

/// Like [`greedy`], calling `between` after every token (while the generation holds its model).
fn greedy_interleaved(model: &Model, prompt: &[u32], n: usize, mut between: impl FnMut(usize)) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for i in 0..n {
        let x = Tensor::new(input.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&x, &mut cache, Logits::Last).unwrap().squeeze(0).unwrap();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(next);
        input = vec![next];
        between(i);
    }
    out
}

#[test]
fn swaps_between_tokens_do_not_reach_a_running_generation() {
    let model = base_model("llama3", true);
    let (a, b) = (adapter(&model, "llama3", "a"), adapter(&model, "llama3", "b"));
    let prompt = &ids("llama3")[..5];
    let shared = SharedModel::new(model);
    shared.apply_adapter("task", &a, 1.0).unwrap();
    let sequential = greedy(&shared.snapshot(), prompt, 24);
    let snapshot = shared.snapshot();
    let concurrent = greedy_interleaved(&snapshot, prompt, 24, |i| match i % 4 {
        0 => shared.apply_adapter("task", &b, 2.0).unwrap(),
        1 => shared.apply_adapter("other", &a, 0.3).unwrap(),
        2 => shared.remove_adapter("task").unwrap(),
        _ => shared.update(|m| m.merge_adapter("other")).unwrap(),
    });
    assert_eq!(concurrent, sequential);
    // Fresh snapshots do see the changes.
    assert_ne!(greedy(&shared.snapshot(), prompt, 24), sequential);
}

#[test]
fn registry_loads_once_accounts_bytes_and_evicts_lru_unused() {
    let model = base_model("qwen2", false);
    let dir = lora_dir("qwen2");
    let one = LoraAdapter::load(&dir.join("a"), &model, &AdapterOptions::default()).unwrap().bytes();
    let mut reg = AdapterRegistry::new(one * 2 + one / 2).with_root(dir.clone());
    let a = reg.load_named("a", &model).unwrap();
    let a_again = reg.load_named("a", &model).unwrap();
    assert!(Arc::ptr_eq(&a, &a_again), "loaded twice");
    drop((a, a_again));
    reg.load("a-copy", &dir.join("a"), &model).unwrap();
    assert_eq!(reg.total_bytes(), 2 * one);
    // "a" is least recently used and unused: loading a third evicts it.
    let mut m = model.clone();
    m.apply_adapter("x", &reg.get("a-copy").unwrap(), 1.0).unwrap();
    reg.load("a-third", &dir.join("a"), &model).unwrap();
    let names: Vec<String> = reg.list().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["a-copy", "a-third"]);
    assert!(reg.list()[0].in_use, "attached to a model");
    // Everything in use: over budget.
    let _held = reg.get("a-third").unwrap();
    assert!(reg.load("a-fourth", &dir.join("a"), &model).is_err());
    assert!(reg.load_named("../qwen2/a", &model).is_err());
}

#[test]
fn adapter_bytes_match_the_files() {
    let model = base_model("qwen2", false);
    let a = adapter(&model, "qwen2", "a");
    // rank 4 on 2 layers × 7 projections of hidden 64 / intermediate 128 / kv 32, f32.
    let per_layer: usize = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
        .iter()
        .map(|(o, i)| 4 * (o + i) * 4)
        .sum();
    assert_eq!(a.bytes(), 2 * per_layer);
}
