//! `metal-candle quantize`: an HF directory or GGUF file → one GGUF file (see
//! `metal_candle::quantize`).

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use metal_candle::quantize::{quantize_model_with_progress, FileType, MergeAdapter, QuantizeOptions};
use metal_candle::{Error, Result};

#[derive(Args)]
pub struct QuantizeArgs {
    /// An HF model directory (config.json, safetensors, tokenizer.json) or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_0, q5_1, q4_k_m, q4_k_s, q4_0, q4_1,
    /// q3_k_l, q3_k_m, q3_k_s or q2_k (llama.cpp's mixes for the *_K_* types).
    #[arg(long = "type", value_name = "TYPE")]
    file_type: String,
    /// The output GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// A LoRA adapter (PEFT directory or GGUF LoRA) baked into the weights before quantizing,
    /// optionally scaled (`PATH:0.5`). Repeatable.
    #[arg(long = "merge-adapter", value_name = "PATH[:SCALE]")]
    merge_adapter: Vec<String>,
    /// Tensors whose GGUF name matches this regex stay F32 (e.g. `token_embd|output`).
    #[arg(long, value_name = "REGEX")]
    keep_f32: Option<String>,
    /// Every quantizable tensor in TYPE's default type, without llama.cpp's mix rules (like
    /// `llama-quantize --pure`; row-length fallbacks still apply).
    #[arg(long)]
    pure: bool,
    /// An importance matrix (not implemented: refused with an error).
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON on stdout (and no progress bar).
    #[arg(long)]
    json: bool,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let keep_f32 = args
        .keep_f32
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| Error::InvalidParameter { name: "keep-f32", reason: e.to_string() })?;
    let opts = QuantizeOptions {
        model: args.model,
        file_type: FileType::parse(&args.file_type)?,
        out: args.out,
        merge_adapters: args.merge_adapter.iter().map(|s| MergeAdapter::parse(s)).collect::<Result<_>>()?,
        keep_f32,
        pure: args.pure,
        force: args.force,
        imatrix: args.imatrix,
    };
    let bar = ProgressBar::new(0);
    if args.json || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {elapsed} {msg}")
        .map_err(|e| Error::InvalidParameter { name: "progress", reason: e.to_string() })?;
    bar.set_style(style);
    let report = quantize_model_with_progress(&opts, &mut |done, total, t| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("{} {}", t.name, t.dtype));
    })?;
    bar.finish_and_clear();
    if args.json {
        let text = serde_json::to_string(&report).map_err(|e| Error::InvalidParameter { name: "json", reason: e.to_string() })?;
        println!("{text}");
    } else {
        let mut types = std::collections::BTreeMap::<&str, usize>::new();
        for t in &report.tensors {
            *types.entry(t.dtype.as_str()).or_default() += 1;
        }
        let types: Vec<String> = types.iter().map(|(t, n)| format!("{t}×{n}")).collect();
        let fallbacks = report.tensors.iter().filter(|t| t.fallback).count();
        eprintln!(
            "wrote {} ({}, {:.1} MB, {} tensors: {}; {fallbacks} row-length fallbacks) in {:.1} s",
            report.out.display(),
            report.file_type,
            report.bytes as f64 / 1e6,
            report.tensors.len(),
            types.join(" "),
            report.seconds
        );
    }
    Ok(())
}
