//! `metal-candle train-lora`: fine-tune a LoRA adapter on a JSONL dataset and save it as a PEFT
//! directory (see `metal_candle::train`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use metal_candle::chat::ChatTemplate;
use metal_candle::kernels::KernelPolicy;
use metal_candle::train::data::load_examples;
use metal_candle::train::{GradCheckpoint, 
    find_checkpoint, read_jsonl, Example, Record, LoraSpec, LrSchedule, OptimizerChoice, RunOptions, StepReport, Targets, TrainError, TrainRun,
    TrainableLora, CHECKPOINT_PREFIX,
};
use metal_candle::{load_model, DeviceChoice, Error, LoadOptions, Result, Tokenizer};

use crate::common::{library, no_tokenizer, positive, set_threads};

#[derive(Args)]
pub struct TrainArgs {
    /// A GGUF file (a quantized base: QLoRA), a directory with config.json + safetensors
    /// (F32/F16/BF16, widened to f32 at load), or a library model's name.
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// cpu, metal, cuda or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads.
    #[arg(long)]
    threads: Option<i64>,
    /// Training data, one JSON object per line: {"text"}, {"prompt","completion"},
    /// {"messages":[...]} or {"input_ids","labels"?}.
    #[arg(long)]
    data: PathBuf,
    /// Validation data (same formats): its loss every --eval-every steps and at the end.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Steps between validation losses (default: only at the end).
    #[arg(long)]
    eval_every: Option<i64>,
    /// The output PEFT directory (checkpoints go to OUT/checkpoint-N).
    #[arg(long)]
    out: PathBuf,
    /// q_proj,v_proj,… or all-linear.
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    #[arg(long, default_value_t = 8)]
    rank: i64,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Scale alpha/√r instead of alpha/r.
    #[arg(long)]
    rslora: bool,
    /// Dropout on the LoRA input (PEFT's lora_dropout).
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Start from this PEFT adapter instead of a new one (its config is kept).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<i64>,
    /// Passes over the data (default 1 when --steps is not given).
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long, default_value_t = 4)]
    batch_size: i64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: i64,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// constant, linear or cosine.
    #[arg(long, default_value = "constant")]
    lr_schedule: String,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: i64,
    /// Clip the total gradient norm to this (default: no clipping).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Examples longer than this many tokens are an error.
    #[arg(long, default_value_t = 2048)]
    max_seq_len: i64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every N steps.
    #[arg(long)]
    save_every: Option<i64>,
    /// Continue from a checkpoint directory (or an output directory's latest checkpoint-N).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Only completions / assistant turns carry loss.
    #[arg(long)]
    mask_prompt: bool,
    /// One JSON object per step (and per validation) on stdout; no progress bar.
    #[arg(long)]
    json: bool,
    /// Gradient checkpointing: recompute each layer in the backward instead of keeping its
    /// activations (less memory, one more forward of the layers per step). With a number N,
    /// only the top N layers keep theirs.
    #[arg(long, value_name = "KEEP_TOP", num_args = 0..=1, default_missing_value = "0")]
    grad_checkpoint: Option<usize>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    set_threads(args.threads)?;
    let loaded = load(&args)?;
    let tok = loaded.tokenizer.as_ref();
    let max_len = positive("max_seq_len", args.max_seq_len)?;
    let template = tok.and_then(|t| ChatTemplate::from_tokenizer(t).ok());
    let data = examples(&args.data, tok, template.as_ref(), args.mask_prompt, max_len)?;
    let valid = args.valid.as_deref().map(|v| examples(v, tok, template.as_ref(), args.mask_prompt, max_len)).transpose()?;
    let options = run_options(&args, data.len())?;
    let lora = match &args.init {
        Some(dir) => TrainableLora::from_peft(&loaded.model, dir)?,
        None => {
            let rank = positive("rank", args.rank)?;
            let spec = LoraSpec { targets: Targets::parse(&args.targets)?, rank, alpha: args.alpha, rslora: args.rslora };
            TrainableLora::new(&loaded.model, &spec, args.seed)?
        }
    };
    let checkpoint = match args.grad_checkpoint {
        None => GradCheckpoint::Off,
        Some(0) => GradCheckpoint::EveryLayer,
        Some(n) => GradCheckpoint::KeepTop(n),
    };
    let lora = lora.with_dropout(args.dropout, args.seed)?.with_grad_checkpoint(checkpoint);
    // Training allocates and frees the same large activations every step: keep freed memory in
    // the heap for reuse instead of unmapping it and faulting fresh zeroed pages in each time.
    keep_freed_memory();
    let mut run = TrainRun::new(lora, data, options)?;
    let mut resumed = None;
    if let Some(dir) = &args.resume {
        let ckpt = find_checkpoint(dir)?;
        run.resume(&ckpt)?;
        eprintln!("resumed from {} at step {}", ckpt.display(), run.step_index());
        resumed = Some(ckpt).filter(|c| c.parent() == Some(args.out.as_path()));
    }
    let eval_every = args.eval_every.map(|n| positive("eval_every", n)).transpose()?;
    let save_every = args.save_every.map(|n| positive("save_every", n)).transpose()?;
    train_loop(&args, &mut run, valid.as_deref(), (eval_every, save_every), resumed)
}

fn load(args: &TrainArgs) -> Result<metal_candle::LoadedModel> {
    let opts = LoadOptions {
        device: args.device.parse::<DeviceChoice>()?,
        dtype: Some(candle_core::DType::F32),
        tokenizer: args.tokenizer.clone(),
        // Our quantized kernels have no backward; candle's quantized matmul does (dX = dY·W).
        kernels: KernelPolicy::CANDLE,
        ..LoadOptions::default()
    };
    load_model(&library().resolve(&args.model)?, &opts)
}

fn examples(path: &Path, tok: Option<&Tokenizer>, template: Option<&ChatTemplate>, mask: bool, max_len: usize) -> Result<Vec<Example>> {
    if tok.is_none() && read_jsonl(path)?.iter().any(|r| !matches!(r, Record::Tokens(_))) {
        return Err(no_tokenizer());
    }
    load_examples(path, tok, template, mask, max_len)
}

fn run_options(args: &TrainArgs, examples: usize) -> Result<RunOptions> {
    let batch_size = positive("batch_size", args.batch_size)?;
    let grad_accum = positive("grad_accum", args.grad_accum)?;
    let steps = match (args.steps, args.epochs) {
        (Some(s), _) => positive("steps", s)?,
        (None, e) => {
            let e = e.unwrap_or(1.0);
            if !(e.is_finite() && e > 0.0) {
                return Err(Error::InvalidParameter { name: "epochs", reason: format!("{e} is not a positive number") });
            }
            RunOptions::steps_for_epochs(examples, batch_size, grad_accum, e).max(1)
        }
    };
    let optimizer = match args.optimizer.as_str() {
        "adamw" => OptimizerChoice::AdamW { weight_decay: args.weight_decay },
        "sgd" => OptimizerChoice::Sgd,
        other => return Err(Error::InvalidParameter { name: "optimizer", reason: format!("`{other}`: expected adamw or sgd") }),
    };
    let schedule = LrSchedule::parse(&args.lr_schedule).ok_or_else(|| Error::InvalidParameter {
        name: "lr_schedule",
        reason: format!("`{}`: expected constant, linear or cosine", args.lr_schedule),
    })?;
    let warmup = usize::try_from(args.warmup).map_err(|_| Error::InvalidParameter { name: "warmup", reason: format!("{} is negative", args.warmup) })?;
    Ok(RunOptions { batch_size, grad_accum, steps, lr: args.lr, schedule, warmup, max_grad_norm: args.max_grad_norm, optimizer, seed: args.seed })
}

/// `every`: (eval, save) intervals in steps; `last_ckpt`: a checkpoint in OUT this run replaces.
fn train_loop(args: &TrainArgs, run: &mut TrainRun, valid: Option<&[Example]>, every: (Option<usize>, Option<usize>), mut last_ckpt: Option<PathBuf>) -> Result<()> {
    let (eval_every, save_every) = every;
    metal_candle::chat::interrupt::install();
    let _ctrl_c = metal_candle::chat::interrupt::Replying::start(); // Ctrl-C sets a flag instead of exiting
    let bar = progress_bar(args, run)?;
    let (start, mut tokens) = (Instant::now(), 0usize);
    while !run.finished() {
        let report = match run.step() {
            Ok(r) => r,
            Err(e @ Error::Train(TrainError::NonFinite { .. })) => {
                bar.abandon();
                match &last_ckpt {
                    Some(p) => eprintln!("the last good checkpoint is {}", p.display()),
                    None => eprintln!("no checkpoint was written (--save-every)"),
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        tokens += report.input_tokens;
        let elapsed = start.elapsed().as_secs_f64();
        report_step(args, &bar, run, &report, (tokens as f64 / elapsed.max(1e-9), elapsed))?;
        let step = run.step_index();
        if let (Some(v), Some(n)) = (valid, eval_every) {
            if step.is_multiple_of(n) && !run.finished() {
                report_valid(args, &bar, run, v, step)?;
            }
        }
        if save_every.is_some_and(|n| step.is_multiple_of(n)) && !run.finished() {
            last_ckpt = Some(checkpoint(args, run, last_ckpt.as_deref(), &bar)?);
        }
        if metal_candle::chat::interrupt::requested() {
            let path = checkpoint(args, run, last_ckpt.as_deref(), &bar)?;
            bar.abandon();
            eprintln!("interrupted at step {step}: checkpoint saved to {} (continue with --resume {})", path.display(), args.out.display());
            std::process::exit(130);
        }
    }
    bar.finish_and_clear();
    if let Some(v) = valid {
        report_valid(args, &bar, run, v, run.step_index())?;
    }
    run.trainer.lora.save_peft(&args.out)?;
    let secs = start.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::json!({"done": true, "out": args.out, "steps": run.step_index(), "seconds": secs}));
    } else {
        eprintln!("saved {} after {} steps in {secs:.1} s", args.out.display(), run.step_index());
    }
    Ok(())
}

fn progress_bar(args: &TrainArgs, run: &TrainRun) -> Result<ProgressBar> {
    let bar = ProgressBar::new(run.options().steps as u64);
    bar.set_position(run.step_index() as u64);
    if args.json || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
        .map_err(|e| Error::InvalidParameter { name: "progress", reason: e.to_string() })?;
    bar.set_style(style);
    Ok(bar)
}

/// `speed`: (tokens/s since the start, seconds since the start).
fn report_step(args: &TrainArgs, bar: &ProgressBar, run: &TrainRun, r: &StepReport, speed: (f64, f64)) -> Result<()> {
    let (tps, elapsed) = speed;
    bar.set_position(run.step_index() as u64);
    bar.set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", r.loss, r.lr));
    if args.json {
        let line = serde_json::json!({
            "step": r.step + 1, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
            "loss_tokens": r.tokens, "tokens": r.input_tokens, "tokens_per_s": tps, "elapsed_s": elapsed, "epoch": run.epoch(),
        });
        println!("{line}");
    }
    Ok(())
}

fn report_valid(args: &TrainArgs, bar: &ProgressBar, run: &TrainRun, valid: &[Example], step: usize) -> Result<()> {
    let loss = run.trainer.eval_loss(valid, run.options().batch_size)?;
    if args.json {
        println!("{}", serde_json::json!({"step": step, "val_loss": loss}));
    } else {
        bar.println(format!("step {step}: validation loss {loss:.4}"));
    }
    Ok(())
}

/// Writes OUT/checkpoint-{step} and removes the previous one.
fn checkpoint(args: &TrainArgs, run: &TrainRun, previous: Option<&Path>, bar: &ProgressBar) -> Result<PathBuf> {
    let path = args.out.join(format!("{CHECKPOINT_PREFIX}{}", run.step_index()));
    run.save_checkpoint(&path)?;
    if let Some(p) = previous.filter(|p| *p != path) {
        std::fs::remove_dir_all(p).map_err(|source| Error::Io { path: p.to_path_buf(), source })?;
    }
    if !args.json {
        bar.println(format!("checkpoint {}", path.display()));
    }
    Ok(path)
}

/// glibc's malloc: blocks up to its 32 MiB maximum from the heap rather than fresh mappings, and
/// freed memory kept for reuse (not trimmed back to the system). Peak RSS is unchanged; memory
/// freed after the peak is not returned until exit, which suits a training process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator thresholds; called before the training allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
