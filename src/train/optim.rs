//! Optimizers and learning-rate schedules as PyTorch and transformers define them.
//!
//! - [`Sgd`]: `torch.optim.SGD(lr)` without momentum or weight decay: `p ← p − lr·g`.
//! - [`AdamW`]: `torch.optim.AdamW` (single-tensor path): `p ← p·(1 − lr·wd)`, then
//!   `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`, `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)`.
//! - [`clip_grad_norm`]: `torch.nn.utils.clip_grad_norm_`: total L2 norm over all gradients,
//!   scaled by `min(1, max_norm / (norm + 1e-6))`.
//! - [`lr_factor`]: transformers' `get_{constant,linear,cosine}_schedule_with_warmup` factors.

use candle_core::{Tensor, Var};

use crate::error::Result;

/// One parameter update from gradients aligned with `params`.
pub trait Optimizer {
    /// Updates `params` in place with `grads` (same order and shapes) at learning rate `lr`.
    fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()>;
}

/// `torch.optim.SGD` without momentum.
#[derive(Debug, Clone, Default)]
pub struct Sgd;

impl Optimizer for Sgd {
    fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        for (p, g) in params.iter().zip(grads) {
            p.set(&(p.as_tensor() - (g * lr)?)?)?;
        }
        Ok(())
    }
}

/// `torch.optim.AdamW`; the moments are kept per parameter (checkpointable: [`AdamW::state`]).
#[derive(Debug, Clone)]
pub struct AdamW {
    /// First-moment decay (0.9).
    pub beta1: f64,
    /// Second-moment decay (0.999).
    pub beta2: f64,
    /// Denominator epsilon (1e-8).
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Steps taken (PyTorch's `state["step"]`).
    pub t: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// PyTorch's defaults (betas 0.9/0.999, eps 1e-8) with `weight_decay`.
    pub fn new(weight_decay: f64) -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, t: 0, m: Vec::new(), v: Vec::new() }
    }

    /// The first and second moments, aligned with the parameters (empty before the first step).
    pub fn state(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores a checkpoint's step count `t` and moments (aligned with the parameters).
    pub fn set_state(&mut self, t: u64, m: Vec<Tensor>, v: Vec<Tensor>) {
        self.t = t;
        self.m = m;
        self.v = v;
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if self.m.len() != params.len() {
            self.m = params.iter().map(|p| p.zeros_like()).collect::<candle_core::Result<_>>()?;
            self.v = params.iter().map(|p| p.zeros_like()).collect::<candle_core::Result<_>>()?;
        }
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let decayed = (p.as_tensor() * (1.0 - lr * self.weight_decay))?;
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + self.eps)?;
            p.set(&(decayed - (m.div(&denom)? * step_size)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` in place so their total L2 norm is at most `max_norm`, exactly as
/// `clip_grad_norm_` (factor `max_norm / (norm + 1e-6)`, clamped to 1). Returns the norm before
/// clipping (non-finite if any gradient is).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = total_norm(grads)?;
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    for g in grads.iter_mut() {
        *g = (&*g * coef)?;
    }
    Ok(norm)
}

/// `‖(‖g_1‖, …, ‖g_n‖)‖₂`: each gradient's norm in f32 (as PyTorch), combined in f64.
pub fn total_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        let n = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        sq += n * n;
    }
    Ok(sq.sqrt())
}

/// A learning-rate schedule: the factor on the base rate at each optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `get_constant_schedule_with_warmup`.
    Constant,
    /// `get_linear_schedule_with_warmup`.
    Linear,
    /// `get_cosine_schedule_with_warmup` (half a cycle).
    Cosine,
}

impl LrSchedule {
    /// `constant`, `linear` or `cosine`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "constant" => Some(Self::Constant),
            "linear" => Some(Self::Linear),
            "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }
}

/// The factor at 0-based optimizer step `step` (transformers' `lr_lambda(current_step)`): linear
/// warmup `step / warmup`, then constant, linear decay to 0 at `total`, or half a cosine.
pub fn lr_factor(schedule: LrSchedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let (step, warmup, total) = (step as f64, warmup as f64, total as f64);
    match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
        LrSchedule::Cosine => {
            let progress = (step - warmup) / (total - warmup).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
    }
}
