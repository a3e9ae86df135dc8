//! One base model, two LoRA adapters, switched mid-conversation without reloading anything.
//!
//! `cargo run --release --example adapter_swap -- [MODEL ADAPTER_A ADAPTER_B]`
//! (defaults: the tiny qwen2 test model and its fixture adapters `a` and `b`, whose text is
//! random). Each turn sends the whole conversation to an engine with a snapshot of the shared
//! model: the request keeps the adapter it started with whatever is swapped meanwhile, and the
//! engine reuses the cached prefix a slot computed with the same adapter, so only new tokens are
//! prefilled. The swap latency printed is the call plus the snapshot the turn uses.

use std::time::Instant;

use metal_candle::adapter::{AdapterOptions, LoraAdapter, SharedModel};
use metal_candle::engine::{Engine, EngineConfig, Request};
use metal_candle::generation::{GenerateParams, Generator};
use metal_candle::{load_model, LoadOptions};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: String| args.get(i).cloned().unwrap_or(default);
    let model_path = arg(0, format!("{FIXTURES}/models/qwen2"));
    let paths = [arg(1, format!("{FIXTURES}/lora/qwen2/a")), arg(2, format!("{FIXTURES}/lora/qwen2/b"))];

    let loaded = load_model(model_path.as_ref(), &LoadOptions::default())?;
    let mut adapters = Vec::new();
    for p in &paths {
        let start = Instant::now();
        adapters.push(LoraAdapter::load(p.as_ref(), &loaded.model, &AdapterOptions::default())?);
        println!("loaded {p} ({} bytes) in {:.2} ms", adapters[adapters.len() - 1].bytes(), ms(start));
    }
    let generator = Generator::from_loaded(&loaded)?;
    let tok = generator.tokenizer().clone();
    let shared = SharedModel::new(loaded.model);
    let engine = Engine::new(generator, EngineConfig { max_sequences: 2, ..EngineConfig::default() })?;
    let params = GenerateParams { max_tokens: 12, ..GenerateParams::default() };

    let turns = ["Hello! Who are you?", "Tell me about foxes.", "And about dogs?", "Thanks!"];
    let mut conversation = Vec::new();
    for (i, turn) in turns.iter().enumerate() {
        let which = i % 2;
        let start = Instant::now();
        shared.apply_adapter("assistant", &adapters[which], 1.0)?; // replaces the previous one
        let model = shared.snapshot();
        println!("\n[turn {i}: adapter {} — swap {:.3} ms]", paths[which], ms(start));
        conversation.extend(tok.encode(turn, i == 0)?);
        let mut request = Request::new(conversation.clone(), &params);
        request.model = Some(model);
        let reply = engine.submit_request(request)?.remove(0).collect_generation()?;
        let t = reply.finished.timings;
        println!("user: {turn}\nassistant: {}", reply.text);
        println!("[{} prompt tokens, {} reused from the cache]", t.prompt_tokens, t.cached_tokens);
        conversation.extend(&reply.tokens);
    }
    Ok(())
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
