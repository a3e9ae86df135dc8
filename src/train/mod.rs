//! LoRA training on candle autograd, with PyTorch + PEFT semantics.
//!
//! The forward is the crate's one decoder ([`crate::Model`]): trainable A/B factors are candle
//! [`candle_core::Var`]s attached to a snapshot of the base as an unmerged adapter, and the fused
//! ops without a backward (rms_norm, RoPE, softmax, our attention and the row-wise LoRA delta)
//! switch to their plain-op twins whenever an input is part of a graph
//! ([`crate::model::ops::needs_grad`]); inference is unchanged. The base is frozen: dense
//! weights get no gradient, and a GGML-quantized base (loaded with
//! [`crate::kernels::KernelPolicy::CANDLE`]) back-propagates `dX = dY·W` through candle's
//! quantized matmul.
//!
//! - [`lora`]: [`LoraSpec`], [`TrainableLora`] (new adapters as PEFT initialises them, or from a
//!   PEFT directory), saving a PEFT directory;
//! - [`loss`]: HF `ForCausalLM` loss over a right-padded batch;
//! - [`optim`]: `torch.optim.SGD` / `AdamW`, `clip_grad_norm_`, transformers' LR schedules;
//! - [`data`]: JSONL datasets (pre-tokenized, text, prompt/completion, chat messages);
//! - [`recompute`]: the loss and gradients of a micro-batch a layer at a time (what [`Trainer`]
//!   steps with), each layer's graph kept or recomputed ([`GradCheckpoint`]);
//! - [`session`]: a whole run ([`TrainRun`]): seeded data order, gradient accumulation,
//!   checkpoints that resume bit for bit.
//!
//! Checked against PyTorch 2.15 + PEFT 0.21.2 by `tests/train.rs` (references from
//! `scripts/fixtures/make_train_refs.py`).

pub mod data;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod recompute;
pub mod session;

use std::path::PathBuf;

pub use data::{read_jsonl, Example, Record};
pub use lora::{LoraSpec, Targets, TrainableLora};
pub use loss::{causal_lm_loss, causal_lm_loss_over, loss_tokens, LossOutput, IGNORE_INDEX};
pub use recompute::GradCheckpoint;
pub use optim::{clip_grad_norm, lr_factor, AdamW, LrSchedule, Optimizer, Sgd};
pub use session::{find_checkpoint, AnyOptimizer, OptimizerChoice, RunOptions, TrainRun, CHECKPOINT_PREFIX};

/// What can go wrong when training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A `--targets` entry that is not one of the seven projections or `all-linear`.
    #[error("unknown target module `{name}` (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)")]
    UnknownTarget { /** The entry as given. */ name: String },
    /// No target modules.
    #[error("no target modules")]
    NoTargets,
    /// LoRA rank 0.
    #[error("LoRA rank must be at least 1")]
    ZeroRank,
    /// An option outside its range.
    #[error("option `{name}`: {reason}")]
    InvalidOption { /** The option. */ name: &'static str, /** What is wrong with its value. */ reason: String },
    /// The base computes in a dtype training does not support.
    #[error("training needs an f32 model (got {dtype}); load it with dtype F32")]
    UnsupportedDtype { /** The model's dtype. */ dtype: String },
    /// A dataset with no examples.
    #[error("{path}: no examples")]
    EmptyData { /** The dataset file. */ path: PathBuf },
    /// A dataset line that is not an example.
    #[error("{path}:{line}: field `{field}`: {reason}")]
    BadLine { /** The dataset file. */ path: PathBuf, /** 1-based line number. */ line: usize, /** The JSON field at fault. */ field: &'static str, /** What is wrong. */ reason: String },
    /// A batch in which no label carries loss.
    #[error("the batch has no tokens that carry loss (every shifted label is -100)")]
    NoLossTokens,
    /// A label outside the vocabulary.
    #[error("label {label} is outside the vocabulary of {vocab}")]
    LabelOutOfRange { /** The label. */ label: i64, /** The vocabulary size. */ vocab: usize },
    /// A checkpoint that cannot be read.
    #[error("checkpoint {path}: {reason}")]
    BadCheckpoint { /** The checkpoint directory. */ path: PathBuf, /** What is wrong with it. */ reason: String },
    /// A checkpoint written with other options or data than the run resuming it.
    #[error("cannot resume: `{field}` was {checkpoint} in the checkpoint, is {now} now")]
    ResumeMismatch { /** The option that differs. */ field: &'static str, /** Its value in the checkpoint. */ checkpoint: String, /** Its value in this run. */ now: String },
    /// The loss or the gradient norm is NaN or ±Inf; nothing was updated.
    /// `step` is 0-based: the message names the 1-based step that failed.
    #[error("non-finite {what} in step {}: training stopped, parameters are those of the last good step", .step + 1)]
    NonFinite { /** `loss` or `gradient norm`. */ what: &'static str, /** The step that produced it. */ step: usize },
}

/// One optimizer step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// 0-based index of the step taken.
    pub step: usize,
    /// The loss before the update.
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The total gradient norm before clipping.
    pub grad_norm: f64,
    /// Labels that carried loss.
    pub tokens: usize,
    /// Input tokens of the step's rows (what tokens/s counts).
    pub input_tokens: usize,
}

/// A training loop's state: the adapter, the optimizer and the schedule, stepped one batch at a
/// time exactly as a PyTorch loop does (`loss.backward()`, `clip_grad_norm_`, `opt.step()`,
/// `scheduler.step()`).
#[derive(Debug)]
pub struct Trainer<O: Optimizer> {
    /// The trainable adapter and the model it is attached to.
    pub lora: TrainableLora,
    /// The optimizer and its state.
    pub opt: O,
    /// The base learning rate.
    pub lr: f64,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// Warmup steps of the schedule.
    pub warmup: usize,
    /// Total optimizer steps (for linear/cosine decay).
    pub total_steps: usize,
    /// `clip_grad_norm_`'s `max_norm`; `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Steps taken so far.
    pub step: usize,
}

impl<O: Optimizer> Trainer<O> {
    /// One optimizer step on `batch`. A non-finite loss or gradient norm is
    /// [`TrainError::NonFinite`] and leaves the parameters as they were.
    pub fn train_step(&mut self, batch: &[Example]) -> crate::Result<StepReport> {
        self.train_step_accum(&[batch])
    }

    /// One optimizer step over the micro-batches `micro` (gradient accumulation), each run
    /// through [`recompute::loss_and_grads`] (checkpointed as the adapter says): each
    /// micro-batch's summed token loss is divided by the loss tokens of all of them together
    /// and the gradients are added, so the step equals one step on a single batch holding every
    /// row (transformers' Trainer with `num_items_in_batch`; not the older "mean per
    /// micro-batch, divided by K", which agrees only when the micro-batches carry equal token
    /// counts). Micro-batches without loss tokens are skipped; dropout masks derive from
    /// (step, micro-batch index).
    ///
    /// Errors: [`TrainError::NoLossTokens`] when none carries loss, [`TrainError::NonFinite`]
    /// (parameters untouched), the model's errors.
    pub fn train_step_accum(&mut self, micro: &[&[Example]]) -> crate::Result<StepReport> {
        let total = micro.iter().map(|b| loss_tokens(b)).sum::<usize>();
        if total == 0 {
            return Err(TrainError::NoLossTokens.into());
        }
        let (mut loss, mut grads) = (0f64, None::<Vec<candle_core::Tensor>>);
        for (i, batch) in micro.iter().enumerate().filter(|(_, b)| loss_tokens(b) > 0) {
            self.lora.begin_forward(self.step, i, true);
            let denom = if micro.len() == 1 { None } else { Some(total) };
            let (part, g) = recompute::loss_and_grads(&self.lora, batch, denom, true)?;
            let g = match g {
                Some(g) if part.is_finite() => g,
                _ => return Err(TrainError::NonFinite { what: "loss", step: self.step }.into()),
            };
            loss += part;
            grads = Some(match grads {
                None => g,
                Some(acc) => acc.iter().zip(&g).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = grads.ok_or(TrainError::NoLossTokens)?;
        let grad_norm = match self.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => optim::total_norm(&grads)?,
        };
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite { what: "gradient norm", step: self.step }.into());
        }
        let lr = self.lr * lr_factor(self.schedule, self.step, self.warmup, self.total_steps);
        self.opt.step(&self.lora.vars(), &grads, lr)?;
        let input_tokens = micro.iter().flat_map(|b| b.iter()).map(|e| e.input_ids.len()).sum();
        let report = StepReport { step: self.step, loss, lr, grad_norm, tokens: total, input_tokens };
        self.step += 1;
        Ok(report)
    }

    /// The mean loss over `examples` in batches of `batch_size` (each loss token weighs the
    /// same, as one batch of them all), dropout off, no update.
    ///
    /// Errors: [`TrainError::NoLossTokens`], the model's errors.
    pub fn eval_loss(&self, examples: &[Example], batch_size: usize) -> crate::Result<f64> {
        let total = loss_tokens(examples);
        if total == 0 {
            return Err(TrainError::NoLossTokens.into());
        }
        let mut sum = 0f64;
        for chunk in examples.chunks(batch_size.max(1)).filter(|c| loss_tokens(c) > 0) {
            self.lora.begin_forward(self.step, 0, false);
            sum += recompute::loss_and_grads(&self.lora, chunk, Some(1), false)?.0;
        }
        self.lora.begin_forward(self.step, 0, true);
        Ok(sum / total as f64)
    }
}
