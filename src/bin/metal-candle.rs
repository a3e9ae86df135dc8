//! The `metal-candle` command line: perplexity and generation on a GGUF file or model directory.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use metal_candle::device::parse_dtype;
use metal_candle::sampling::Sampler;
use metal_candle::{load_model, perplexity, DeviceChoice, Error, LoadOptions, LoadedModel, Logits, Result};

#[derive(Parser)]
#[command(name = "metal-candle", version, about = "Fast, correct LLM inference on Apple silicon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a text or token ids under the model.
    Perplexity(PerplexityArgs),
    /// Stream a completion of a prompt to stdout.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// A GGUF file, or a directory with config.json + safetensors (+ tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct PerplexityArgs {
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

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Perplexity(args) => run_perplexity(args),
        Command::Generate(args) => run_generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let opts = LoadOptions {
        device: args.device.parse::<DeviceChoice>()?,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        tokenizer: args.tokenizer.clone(),
        ..LoadOptions::default()
    };
    load_model(&args.model, &opts)
}

fn no_tokenizer() -> Error {
    Error::InvalidParameter {
        name: "tokenizer",
        reason: "the model has no tokenizer; pass --tokenizer PATH".into(),
    }
}

fn run_perplexity(args: PerplexityArgs) -> Result<()> {
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

fn run_generate(args: GenerateArgs) -> Result<()> {
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
