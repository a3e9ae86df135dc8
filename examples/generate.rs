//! Greedy completion with the library API.
//!
//! `cargo run --release --example generate -- MODEL_PATH "The capital of France is"`
//! (MODEL_PATH: a GGUF file or an HF model directory; `scripts/get_smollm2.sh` fetches one).

use std::io::Write;

use candle_core::Tensor;
use metal_candle::{load_model, sampling::argmax, LoadOptions, Logits};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(prompt)) = (args.next(), args.next()) else {
        return Err("usage: generate MODEL_PATH PROMPT".into());
    };
    let loaded = load_model(path.as_ref(), &LoadOptions::default())?;
    let (model, tok) = (&loaded.model, loaded.tokenizer.as_ref().ok_or("the model has no tokenizer")?);
    let prompt_ids = tok.encode(&prompt, true)?;
    let mut cache = model.new_cache();
    let (mut input, mut generated) = (prompt_ids, Vec::new());
    let mut printed = 0;
    for _ in 0..32 {
        let x = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?; // (1, t)
        let logits = model.forward(&x, &mut cache, Logits::Last)?.squeeze(0)?; // (vocab,)
        let next = argmax(&logits.to_vec1::<f32>()?)?;
        if tok.eos_token_ids().contains(&next) {
            break;
        }
        generated.push(next);
        input = vec![next];
        let text = tok.decode(&generated, true)?;
        if let Some(delta) = text.get(printed..).filter(|_| !text.ends_with('\u{FFFD}')) {
            print!("{delta}");
            std::io::stdout().flush()?;
            printed = text.len();
        }
    }
    println!();
    Ok(())
}
