//! `metal-candle perplexity`.

use std::path::PathBuf;

use clap::Args;
use metal_candle::{perplexity, Error, Result};

use crate::common::{load, no_tokenizer, ModelArgs};

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file to score (tokenized with the model's tokenizer, special tokens added).
    #[arg(long, conflicts_with = "token_ids", required_unless_present = "token_ids")]
    text_file: Option<PathBuf>,
    /// Comma-separated token ids to score.
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    /// Window length; the text is scored in consecutive windows of this many tokens.
    #[arg(long)]
    ctx: Option<usize>,
    /// Print a last line {"perplexity": X, "tokens": N, "nll": [..]}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let loaded = load(&args.model)?;
    let ids = match (&args.token_ids, &args.text_file) {
        (Some(ids), _) => ids.clone(),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|source| Error::Io { path: file.clone(), source })?;
            loaded.tokenizer.as_ref().ok_or_else(no_tokenizer)?.encode(&text, true)?
        }
        (None, None) => return Err(Error::InvalidParameter { name: "text_file", reason: "give --text-file or --token-ids".into() }),
    };
    let ctx = args.ctx.unwrap_or(loaded.model.max_positions());
    if ctx > loaded.model.max_positions() {
        return Err(Error::InvalidParameter {
            name: "ctx",
            reason: format!("{ctx} exceeds the model's context of {}", loaded.model.max_positions()),
        });
    }
    let report = perplexity(&loaded.model, &ids, ctx)?;
    println!("perplexity: {:.6}", report.perplexity);
    if args.json {
        let json = serde_json::json!({"perplexity": report.perplexity, "tokens": report.tokens, "nll": report.nll});
        println!("{json}");
    }
    Ok(())
}

