//! `metal-candle generate`.

use std::io::Write;

use clap::Args;
use metal_candle::sampling::Sampler;
use metal_candle::{Error, Logits, Result};

use crate::common::{load, no_tokenizer, ModelArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.max_tokens == 0 {
        return Err(Error::InvalidParameter { name: "max_tokens", reason: "must be at least 1".into() });
    }
    let mut sampler = Sampler::new(args.temperature, args.seed)?;
    let loaded = load(&args.model)?;
    let (model, tok) = (&loaded.model, loaded.tokenizer.as_ref().ok_or_else(no_tokenizer)?);
    let prompt = tok.encode(&args.prompt, true)?;
    if prompt.len() >= model.max_positions() {
        return Err(Error::ContextOverflow { prompt_tokens: prompt.len(), context: model.max_positions() });
    }
    let mut eos: Vec<u32> = tok.eos_token_ids().to_vec();
    eos.extend(&model.config().eos_token_ids);
    let mut cache = model.new_cache();
    let mut input = prompt.clone();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout().lock();
    let budget = args.max_tokens.min(model.max_positions() - prompt.len());
    for _ in 0..budget {
        let ids = candle_core::Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&ids, &mut cache, Logits::Last)?.squeeze(0)?.to_vec1::<f32>()?;
        let next = sampler.sample(&logits)?;
        if eos.contains(&next) {
            break;
        }
        generated.push(next);
        input = vec![next];
        // Print only whole characters: hold back while the decoded tail is an incomplete sequence.
        let text = tok.decode(&generated, true)?;
        if !text.ends_with('\u{FFFD}') {
            if let Some(delta) = text.get(printed..).filter(|d| !d.is_empty()) {
                let _ = write!(stdout, "{delta}");
                let _ = stdout.flush();
                printed = text.len();
            }
        }
    }
    let text = tok.decode(&generated, true)?;
    if let Some(delta) = text.get(printed..) {
        let _ = write!(stdout, "{delta}");
    }
    let _ = writeln!(stdout);
    Ok(())
}
