//! The `metal-candle` command line. One module per subcommand; `common` holds the model flags.

mod bench;
mod chat;
mod common;
mod embed;
mod fetch;
mod generate;
mod perplexity;
mod quantize;
mod models;
mod probe;
mod train;
#[cfg(feature = "server")]
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "metal-candle", version, about = "Fast, correct LLM inference on Apple silicon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of a text or token ids under the model.
    Perplexity(perplexity::PerplexityArgs),
    /// Chat with a model: streamed replies, multi-turn, /model to switch, /save and /load.
    Chat(Box<chat::ChatArgs>),
    /// Stream a completion of a prompt to stdout.
    Generate(Box<generate::GenerateArgs>),
    /// llama-bench-style prefill/decode throughput, TTFT, peak RSS and roofline.
    Bench(bench::BenchArgs),
    /// Sentence embeddings from a sentence-transformers model directory.
    Embed(embed::EmbedArgs),
    /// Write a GGUF file (f16, q8_0, q4_k_m, …) from an HF directory or a GGUF file.
    Quantize(Box<quantize::QuantizeArgs>),
    /// OpenAI-compatible HTTP server: several models, adapters as models (feature `server`).
    #[cfg(feature = "server")]
    Serve(Box<serve::ServeArgs>),
    /// The local model library: list, show, add, rm, pull.
    Models(models::ModelsArgs),
    /// Find the largest context a model really handles here (passkey retrieval, binary search).
    ProbeContext(Box<probe::ProbeArgs>),
    /// Fine-tune a LoRA adapter on a JSONL dataset; saves a PEFT directory.
    TrainLora(Box<train::TrainArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Perplexity(args) => perplexity::run(args),
        Command::Chat(args) => chat::run(*args),
        Command::Generate(args) => generate::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Quantize(args) => quantize::run(*args),
        #[cfg(feature = "server")]
        Command::Serve(args) => serve::run(*args),
        Command::Models(args) => models::run(args),
        Command::ProbeContext(args) => probe::run(*args),
        Command::TrainLora(args) => train::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

