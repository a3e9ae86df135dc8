//! A whole training run as `metal-candle train-lora` drives it: the data order, gradient
//! accumulation, the optimizer choice, and checkpoints that resume bit for bit.
//!
//! The order of the examples is a pure function of the seed: micro-batch `j` is batch
//! `j mod per_epoch` of epoch `j / per_epoch`, whose order is a shuffle seeded by
//! (seed, epoch); optimizer step `s` takes micro-batches `s·K .. s·K + K`; dropout masks derive
//! from (seed, step, micro-batch). So a checkpoint needs only the step, the factors and the
//! optimizer state to continue exactly as an uninterrupted run.
//!
//! A checkpoint directory holds the PEFT adapter (`adapter_config.json`,
//! `adapter_model.safetensors`: loadable as is), `trainer_state.safetensors` (the variables and
//! AdamW's moments, f32, exactly as in memory) and `trainer_state.json` (step, options, data
//! fingerprint). It is written to a temporary directory beside it and renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{AdamW, Example, LrSchedule, Optimizer, Sgd, StepReport, TrainError, Trainer, TrainableLora};
use crate::error::{Error, Result};

/// `trainer_state.json`'s format version.
const STATE_VERSION: u32 = 1;
const STATE_JSON: &str = "trainer_state.json";
const STATE_TENSORS: &str = "trainer_state.safetensors";
/// Checkpoint directories are `checkpoint-{step}` inside the output directory.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// `--optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerChoice {
    /// `torch.optim.SGD(lr)`.
    Sgd,
    /// `torch.optim.AdamW(lr, weight_decay)`.
    AdamW { /** Decoupled weight decay. */ weight_decay: f64 },
}

/// SGD or AdamW behind one type (the optimizer is chosen at run time).
#[derive(Debug, Clone)]
pub enum AnyOptimizer {
    /// SGD without momentum.
    Sgd(Sgd),
    /// AdamW with its moment state.
    AdamW(AdamW),
}

impl Optimizer for AnyOptimizer {
    fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        match self {
            Self::Sgd(o) => o.step(params, grads, lr),
            Self::AdamW(o) => o.step(params, grads, lr),
        }
    }
}

/// The options of a run that a checkpoint must agree with to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub grad_accum: usize,
    /// Total optimizer steps.
    pub steps: usize,
    /// Base learning rate.
    pub lr: f64,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// Warmup steps.
    pub warmup: usize,
    /// `clip_grad_norm_`'s `max_norm`.
    pub max_grad_norm: Option<f64>,
    /// Which optimizer.
    pub optimizer: OptimizerChoice,
    /// Seeds the data order and the dropout masks.
    pub seed: u64,
}

impl RunOptions {
    /// Optimizer steps for `epochs` passes over `examples` rows (rounded up; the last
    /// micro-batch of an epoch may be short, as a PyTorch `DataLoader` without `drop_last`).
    pub fn steps_for_epochs(examples: usize, batch_size: usize, grad_accum: usize, epochs: f64) -> usize {
        let per_epoch = examples.div_ceil(batch_size.max(1));
        ((epochs * per_epoch as f64) / grad_accum.max(1) as f64).ceil() as usize
    }

    fn check(&self) -> Result<()> {
        let bad = |name: &'static str, reason: String| Err(TrainError::InvalidOption { name, reason }.into());
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1".into());
        }
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", format!("{} is not a finite non-negative rate", self.lr));
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return bad("max_grad_norm", format!("{m} is not a positive number"));
            }
        }
        if let OptimizerChoice::AdamW { weight_decay } = self.optimizer {
            if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                return bad("weight_decay", format!("{weight_decay} is not a finite non-negative number"));
            }
        }
        Ok(())
    }
}

/// What `trainer_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedState {
    version: u32,
    /// Optimizer steps taken.
    step: usize,
    options: RunOptions,
    /// Training examples and a fingerprint of their ids and labels.
    examples: usize,
    data_fingerprint: String,
    /// Adapted sites and the LoRA dropout.
    sites: usize,
    dropout: f64,
    /// AdamW's step count (`state["step"]`), 0 for SGD.
    adam_t: u64,
}

/// A training run: a [`Trainer`] over a dataset in a seeded order.
#[derive(Debug)]
pub struct TrainRun {
    /// The trainer: adapter, optimizer and schedule.
    pub trainer: Trainer<AnyOptimizer>,
    options: RunOptions,
    data: Vec<Example>,
    /// The order of the epoch last used: (epoch, permutation).
    order: (usize, Vec<usize>),
}

impl TrainRun {
    /// A run from step 0. Errors: [`TrainError::InvalidOption`] for a zero count or a bad rate,
    /// [`TrainError::EmptyData`]-like `data` errors are the caller's (an empty `data` is
    /// [`TrainError::InvalidOption`] `data`).
    pub fn new(lora: TrainableLora, data: Vec<Example>, options: RunOptions) -> Result<Self> {
        options.check()?;
        if data.is_empty() {
            return Err(TrainError::InvalidOption { name: "data", reason: "no training examples".into() }.into());
        }
        let opt = match options.optimizer {
            OptimizerChoice::Sgd => AnyOptimizer::Sgd(Sgd),
            OptimizerChoice::AdamW { weight_decay } => AnyOptimizer::AdamW(AdamW::new(weight_decay)),
        };
        let trainer = Trainer {
            lora,
            opt,
            lr: options.lr,
            schedule: options.schedule,
            warmup: options.warmup,
            total_steps: options.steps,
            max_grad_norm: options.max_grad_norm,
            step: 0,
        };
        let order = (0, epoch_order(options.seed, 0, data.len()));
        Ok(Self { trainer, options, data, order })
    }

    /// The options the run was made with.
    pub fn options(&self) -> &RunOptions {
        &self.options
    }

    /// Optimizer steps taken.
    pub fn step_index(&self) -> usize {
        self.trainer.step
    }

    /// Whether every step of [`RunOptions::steps`] is done.
    pub fn finished(&self) -> bool {
        self.trainer.step >= self.options.steps
    }

    /// Micro-batches in one pass over the data.
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.options.batch_size)
    }

    /// Passes over the data completed so far (fractional).
    pub fn epoch(&self) -> f64 {
        (self.trainer.step * self.options.grad_accum) as f64 / self.micro_batches_per_epoch() as f64
    }

    /// The rows of micro-batch `j` (see the module docs).
    pub fn micro_batch(&mut self, j: usize) -> Vec<Example> {
        let per_epoch = self.micro_batches_per_epoch();
        let (epoch, k) = (j / per_epoch, j % per_epoch);
        if self.order.0 != epoch {
            self.order = (epoch, epoch_order(self.options.seed, epoch, self.data.len()));
        }
        let b = self.options.batch_size;
        let end = ((k + 1) * b).min(self.data.len());
        self.order.1[k * b..end].iter().map(|&i| self.data[i].clone()).collect()
    }

    /// Takes the next optimizer step. Errors: those of [`Trainer::train_step_accum`] (a
    /// non-finite loss leaves the parameters of the last good step).
    pub fn step(&mut self) -> Result<StepReport> {
        let first = self.trainer.step * self.options.grad_accum;
        let micro: Vec<Vec<Example>> = (first..first + self.options.grad_accum).map(|j| self.micro_batch(j)).collect();
        let refs: Vec<&[Example]> = micro.iter().map(Vec::as_slice).collect();
        self.trainer.train_step_accum(&refs)
    }

    /// Writes a checkpoint of the current state to `dir` (replacing one there), through a
    /// temporary directory renamed into place.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        self.trainer.lora.save_peft(&tmp)?;
        candle_core::safetensors::save(&self.state_tensors()?, tmp.join(STATE_TENSORS))?;
        let state = SavedState {
            version: STATE_VERSION,
            step: self.trainer.step,
            options: self.options.clone(),
            examples: self.data.len(),
            data_fingerprint: fingerprint(&self.data),
            sites: self.trainer.lora.sites().len(),
            dropout: self.trainer.lora.dropout(),
            adam_t: match &self.trainer.opt {
                AnyOptimizer::AdamW(o) => o.t,
                AnyOptimizer::Sgd(_) => 0,
            },
        };
        let text = serde_json::to_string_pretty(&state).map_err(|e| TrainError::InvalidOption { name: "checkpoint", reason: e.to_string() })?;
        let json = tmp.join(STATE_JSON);
        std::fs::write(&json, text + "\n").map_err(|e| Error::io(&json, e))?;
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, v) in self.trainer.lora.vars().iter().enumerate() {
            out.insert(format!("param.{i}"), v.as_tensor().copy()?);
        }
        if let AnyOptimizer::AdamW(o) = &self.trainer.opt {
            let (m, v) = o.state();
            for (i, (m, v)) in m.iter().zip(v).enumerate() {
                out.insert(format!("adam_m.{i}"), m.copy()?);
                out.insert(format!("adam_v.{i}"), v.copy()?);
            }
        }
        Ok(out)
    }

    /// Restores the checkpoint in `dir` into this run, built with the same adapter shape,
    /// data and options; the run then continues exactly as the one that wrote it.
    ///
    /// Errors: [`TrainError::BadCheckpoint`] for a missing or damaged file,
    /// [`TrainError::ResumeMismatch`] naming the option or data that differ.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let bad = |reason: String| TrainError::BadCheckpoint { path: dir.to_path_buf(), reason };
        let json = dir.join(STATE_JSON);
        let text = std::fs::read_to_string(&json).map_err(|e| bad(format!("{STATE_JSON}: {e}")))?;
        let state: SavedState = serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_JSON}: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(bad(format!("format version {} (expected {STATE_VERSION})", state.version)).into());
        }
        let mismatch = |field: &'static str, checkpoint: String, now: String| -> Result<()> {
            Err(TrainError::ResumeMismatch { field, checkpoint, now }.into())
        };
        let (c, n) = (&state.options, &self.options);
        macro_rules! same {
            ($field:ident) => {
                if c.$field != n.$field {
                    return mismatch(stringify!($field), format!("{:?}", c.$field), format!("{:?}", n.$field));
                }
            };
        }
        same!(batch_size);
        same!(grad_accum);
        same!(steps);
        same!(lr);
        same!(schedule);
        same!(warmup);
        same!(max_grad_norm);
        same!(optimizer);
        same!(seed);
        if state.examples != self.data.len() || state.data_fingerprint != fingerprint(&self.data) {
            return mismatch("data", format!("{} examples ({})", state.examples, state.data_fingerprint), format!("{} examples ({})", self.data.len(), fingerprint(&self.data)));
        }
        if state.sites != self.trainer.lora.sites().len() {
            return mismatch("targets", format!("{} sites", state.sites), format!("{} sites", self.trainer.lora.sites().len()));
        }
        if state.dropout != self.trainer.lora.dropout() {
            return mismatch("dropout", state.dropout.to_string(), self.trainer.lora.dropout().to_string());
        }
        let path = dir.join(STATE_TENSORS);
        let tensors = candle_core::safetensors::load(&path, self.trainer.lora.model().device()).map_err(|e| bad(format!("{STATE_TENSORS}: {e}")))?;
        let get = |key: String, like: &Tensor| -> Result<Tensor> {
            let t = tensors.get(&key).ok_or_else(|| bad(format!("{STATE_TENSORS}: no tensor `{key}`")))?;
            if t.dims() != like.dims() || t.dtype() != like.dtype() {
                return Err(bad(format!("{STATE_TENSORS}: `{key}` is {:?} {:?}, expected {:?} {:?}", t.dtype(), t.dims(), like.dtype(), like.dims())).into());
            }
            Ok(t.clone())
        };
        let vars = self.trainer.lora.vars();
        let params = vars.iter().enumerate().map(|(i, v)| get(format!("param.{i}"), v.as_tensor())).collect::<Result<Vec<_>>>()?;
        if let AnyOptimizer::AdamW(o) = &mut self.trainer.opt {
            if state.adam_t > 0 {
                let m = vars.iter().enumerate().map(|(i, v)| get(format!("adam_m.{i}"), v.as_tensor())).collect::<Result<Vec<_>>>()?;
                let v = vars.iter().enumerate().map(|(i, v)| get(format!("adam_v.{i}"), v.as_tensor())).collect::<Result<Vec<_>>>()?;
                o.set_state(state.adam_t, m, v);
            }
        }
        for (v, p) in vars.iter().zip(&params) {
            v.set(p)?;
        }
        self.trainer.step = state.step;
        Ok(())
    }
}

/// The checkpoint to resume from `dir`: `dir` itself if it holds `trainer_state.json`, else
/// its `checkpoint-N` with the largest N. Errors: [`TrainError::BadCheckpoint`] when there is
/// none.
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_JSON).is_file() {
        return Ok(dir.to_path_buf());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let best = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: usize = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            e.path().join(STATE_JSON).is_file().then_some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n);
    best.map(|(_, p)| p).ok_or_else(|| {
        TrainError::BadCheckpoint { path: dir.to_path_buf(), reason: format!("no {STATE_JSON} and no {CHECKPOINT_PREFIX}N directory with one") }.into()
    })
}

/// Epoch `epoch`'s order of `n` examples: a shuffle seeded by (seed, epoch).
fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    order.shuffle(&mut rng);
    order
}

/// FNV-1a over every example's ids and labels, hex.
fn fingerprint(data: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    for e in data {
        eat(e.input_ids.len() as u64);
        e.input_ids.iter().for_each(|&i| eat(u64::from(i)));
        e.labels.iter().for_each(|&l| eat(l as u64));
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_fixed_by_the_seed() {
        let a = epoch_order(7, 0, 10);
        assert_eq!(a, epoch_order(7, 0, 10));
        assert_ne!(a, epoch_order(7, 1, 10));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn steps_for_epochs_rounds_up() {
        assert_eq!(RunOptions::steps_for_epochs(10, 4, 1, 1.0), 3);
        assert_eq!(RunOptions::steps_for_epochs(10, 4, 2, 1.0), 2);
        assert_eq!(RunOptions::steps_for_epochs(10, 4, 2, 2.0), 3);
        assert_eq!(RunOptions::steps_for_epochs(8, 4, 1, 0.5), 1);
    }
}
