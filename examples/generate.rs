//! Streamed completion with the library API.
//!
//! `cargo run --release --example generate -- --model MODEL_PATH "The capital of France is"`
//! (MODEL_PATH: a GGUF file or an HF model directory; `scripts/get_smollm2.sh` fetches one).

use std::io::Write;

use metal_candle::generation::{Event, GenerateParams, Generator};
use metal_candle::{load_model, LoadOptions};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some("--model"), Some(path), Some(prompt)) = (args.first().map(String::as_str), args.get(1), args.get(2)) else {
        return Err("usage: generate --model MODEL_PATH PROMPT".into());
    };
    let loaded = load_model(path.as_ref(), &LoadOptions::default())?;
    let generator = Generator::from_loaded(&loaded)?;
    let params = GenerateParams { max_tokens: 32, ..GenerateParams::default() };
    for event in generator.stream(prompt.as_str(), &params)? {
        match event? {
            Event::Token { text, .. } => print!("{text}"), // whole UTF-8 characters only
            Event::Finished(done) => println!("{}\n[{}, {:.1} tok/s]", done.text, done.reason.as_str(), done.timings.decode_tokens_per_s),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}
