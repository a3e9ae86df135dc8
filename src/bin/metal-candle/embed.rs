//! `metal-candle embed`.

use std::path::PathBuf;

use clap::Args;
use metal_candle::device::parse_dtype;
use metal_candle::embed::{EmbedInput, EmbeddingModel};
use metal_candle::{DeviceChoice, Error, LoadOptions, Result};

#[derive(Args)]
pub struct EmbedArgs {
    /// A sentence-transformers (or HF) model directory: config.json, model.safetensors,
    /// tokenizer.json, optionally modules.json and 1_Pooling/config.json.
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
    /// A text to embed. Repeatable.
    #[arg(long = "text", conflicts_with = "file", required_unless_present = "file")]
    texts: Vec<String>,
    /// A UTF-8 file with one text per line.
    #[arg(long)]
    file: Option<PathBuf>,
    /// A named prompt from config_sentence_transformers.json to prepend (e.g. `query`).
    #[arg(long)]
    prompt: Option<String>,
    /// Print a last line {"model", "dim", "embeddings": [[..]], "tokens", "truncated"}.
    #[arg(long)]
    json: bool,
    /// Benchmark: embed the inputs this many more times after loading and print the median
    /// documents/s to stderr (and as `docs_per_s` in the JSON line).
    #[arg(long, default_value_t = 0)]
    repeat: usize,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let opts = LoadOptions {
        device: args.device.parse::<DeviceChoice>()?,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        tokenizer: args.tokenizer.clone(),
        ..LoadOptions::default()
    };
    let model = EmbeddingModel::load(&args.model, &opts)?;
    let texts = match &args.file {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|source| Error::Io { path: file.clone(), source })?;
            text.lines().map(str::to_string).collect()
        }
        None => args.texts.clone(),
    };
    let inputs: Vec<EmbedInput> = texts.iter().map(|t| EmbedInput::Text(t)).collect();
    let out = model.embed(&inputs, args.prompt.as_deref())?;
    let docs_per_s = median_docs_per_s(&model, &inputs, args.prompt.as_deref(), args.repeat)?;
    for (i, (v, cut)) in out.vectors.iter().zip(&out.truncated).enumerate() {
        if *cut {
            eprintln!("warning: input {i} was truncated to {} tokens", model.max_seq_length());
        }
        let values: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
        println!("{}", values.join(" "));
    }
    if args.json {
        let json = serde_json::json!({
            "model": args.model.display().to_string(),
            "dim": model.dim(),
            "embeddings": out.vectors,
            "tokens": out.tokens,
            "truncated": out.truncated,
            "docs_per_s": docs_per_s,
        });
        println!("{json}");
    }
    Ok(())
}

/// Median documents/s over `repeat` timed calls (`None` for 0).
fn median_docs_per_s(model: &EmbeddingModel, inputs: &[EmbedInput], prompt: Option<&str>, repeat: usize) -> Result<Option<f64>> {
    let mut rates = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let start = std::time::Instant::now();
        model.embed(inputs, prompt)?;
        rates.push(inputs.len() as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let median = rates.get(rates.len() / 2).copied();
    if let Some(m) = median {
        eprintln!("{} inputs: {m:.1} documents/s (median of {repeat})", inputs.len());
    }
    Ok(median)
}
