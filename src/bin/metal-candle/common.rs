//! Flags shared by every subcommand that loads a model.

use std::path::PathBuf;

use clap::Args;
use metal_candle::device::parse_dtype;
use metal_candle::{load_model, DeviceChoice, Error, LoadOptions, LoadedModel, Result};

#[derive(Args)]
pub struct ModelArgs {
    /// A GGUF file, or a directory with config.json + safetensors (+ tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    pub dtype: Option<String>,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let opts = LoadOptions {
        device: args.device.parse::<DeviceChoice>()?,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        tokenizer: args.tokenizer.clone(),
        ..LoadOptions::default()
    };
    load_model(&args.model, &opts)
}

pub fn no_tokenizer() -> Error {
    Error::InvalidParameter {
        name: "tokenizer",
        reason: "the model has no tokenizer; pass --tokenizer PATH".into(),
    }
}

