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
        });
        println!("{json}");
    }
    Ok(())
}
