//! `metal-candle perplexity`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use metal_candle::tokenizer::Tokenizer;
use metal_candle::{perplexity, perplexity_second_half, Error, Result};

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
    /// Which tokens of each window are scored: `all` (every prediction, HF's perplexity when one
    /// window holds the text) or `second-half` (llama.cpp's `llama-perplexity`: windows of exactly
    /// `--ctx` tokens starting with BOS where the model adds one, only their second half scored).
    #[arg(long, value_enum, default_value_t = Score::All)]
    score: Score,
    /// Print a last line {"perplexity": X, "std_error": SE, "tokens": N, "scored": M, "nll": [..]}.
    #[arg(long)]
    json: bool,
}

/// The scoring of `--score`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Score {
    All,
    SecondHalf,
}

/// The BOS id the tokenizer prepends when encoding with special tokens, if it does (llama.cpp's
/// `llama_vocab_get_add_bos`).
fn added_bos(tok: &Tokenizer) -> Result<Option<u32>> {
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    let bos = tok.bos_token_id().filter(|&b| with.len() > without.len() && with.first() == Some(&b));
    Ok(bos)
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
    let report = match args.score {
        Score::All => perplexity(&loaded.model, &ids, ctx)?,
        Score::SecondHalf => {
            let bos = match &loaded.tokenizer {
                Some(tok) => added_bos(tok)?,
                None => None,
            };
            perplexity_second_half(&loaded.model, &ids, ctx, bos)?
        }
    };
    println!("perplexity: {:.6}", report.perplexity);
    // llama-perplexity's "Final estimate" line.
    println!("PPL = {:.4} +/- {:.5}", report.perplexity, report.std_error);
    if args.json {
        let json = serde_json::json!({
            "perplexity": report.perplexity,
            "std_error": report.std_error,
            "tokens": report.tokens,
            "scored": report.nll.len(),
            "nll": report.nll,
        });
        println!("{json}");
    }
    Ok(())
}

