//! One base model, two LoRA adapters, switched mid-conversation without reloading anything.
//!
//! `cargo run --release --example adapter_swap -- [MODEL ADAPTER_A ADAPTER_B]`
//! (defaults: the tiny qwen2 test model and its fixture adapters `a` and `b`). Each turn takes a
//! snapshot of the shared model, so a generation keeps the adapter it started with while another
//! thread could swap; the swap latency printed is the call plus the snapshot the next turn uses.

use std::time::Instant;

use candle_core::Tensor;
use metal_candle::adapter::{AdapterOptions, LoraAdapter, SharedModel};
use metal_candle::{load_model, sampling::argmax, LoadOptions, Logits, Model};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// Greedy: prefill the whole conversation `ids` on `model`, then append `n` tokens to it.
fn continue_greedy(model: &Model, ids: &mut Vec<u32>, n: usize) -> metal_candle::Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let mut input = ids.clone();
    let mut new = Vec::new();
    for _ in 0..n {
        let x = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?; // (1, t)
        let logits = model.forward(&x, &mut cache, Logits::Last)?.squeeze(0)?; // (vocab,)
        let next = argmax(&logits.to_vec1::<f32>()?)?;
        new.push(next);
        input = vec![next];
    }
    ids.extend(&new);
    Ok(new)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: String| args.get(i).cloned().unwrap_or(default);
    let model_path = arg(0, format!("{FIXTURES}/models/qwen2"));
    let paths = [arg(1, format!("{FIXTURES}/lora/qwen2/a")), arg(2, format!("{FIXTURES}/lora/qwen2/b"))];

    let loaded = load_model(model_path.as_ref(), &LoadOptions::default())?;
    let tok = loaded.tokenizer.clone().ok_or("the model has no tokenizer")?;
    let mut adapters = Vec::new();
    for p in &paths {
        let start = Instant::now();
        adapters.push(LoraAdapter::load(p.as_ref(), &loaded.model, &AdapterOptions::default())?);
        println!("loaded {p} ({} bytes) in {:.2} ms", adapters[adapters.len() - 1].bytes(), ms(start));
    }
    let shared = SharedModel::new(loaded.model);

    let turns = ["Hello! Who are you?", "Tell me about foxes.", "And about dogs?", "Thanks!"];
    let mut conversation = Vec::new();
    for (i, turn) in turns.iter().enumerate() {
        let which = i % 2;
        let start = Instant::now();
        shared.apply_adapter("assistant", &adapters[which], 1.0)?; // replaces the previous one
        let model = shared.snapshot();
        println!("\n[turn {i}: adapter {} — swap {:.3} ms]", paths[which], ms(start));
        conversation.extend(tok.encode(turn, i == 0)?);
        let reply = continue_greedy(&model, &mut conversation, 12)?;
        println!("user: {turn}\nassistant: {}", tok.decode(&reply, true)?);
    }
    Ok(())
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
