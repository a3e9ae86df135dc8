//! HF `ForCausalLM` loss (transformers `loss_utils.ForCausalLMLoss`): labels are shifted left by
//! one, `-100` is ignored, and the loss is the mean cross-entropy over every remaining label of
//! the batch (not a mean of per-row means).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::data::Example;
use super::TrainError;
use crate::error::Result;
use crate::model::{RowLogits, StepBatch};
use crate::Model;

/// The ignored label (PyTorch `CrossEntropyLoss(ignore_index=-100)`).
pub const IGNORE_INDEX: i64 = -100;

/// A loss and the number of labels it averages.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Scalar f32, part of the autograd graph.
    pub loss: Tensor,
    /// Labels that carried loss.
    pub tokens: usize,
}

/// The mean cross-entropy of `model` on `batch`, as HF computes it for the same rows
/// right-padded with attention mask 0 and label -100 on the padding: each row runs from position
/// 0 on its own (padding never changes a real token's logits under a causal mask), and position
/// `i` of a row predicts its label `i + 1`.
///
/// Errors: [`TrainError::NoLossTokens`] when every shifted label is ignored,
/// [`TrainError::LabelOutOfRange`], and the model's errors (ids outside the vocabulary,
/// contexts past its maximum).
pub fn causal_lm_loss(model: &Model, batch: &[Example]) -> Result<LossOutput> {
    causal_lm_loss_over(model, batch, None)
}

/// Labels of `batch` that carry loss after the shift (`(labels[:, 1:] != -100).sum()`).
pub fn loss_tokens(batch: &[Example]) -> usize {
    batch.iter().map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()).sum()
}

/// The summed cross-entropy of `batch` divided by `denominator` (default: its own
/// [`loss_tokens`]). With the token count of several micro-batches together as the
/// denominator, the micro-batch losses (and their gradients) add up to the loss of one batch
/// holding them all: transformers' `num_items_in_batch` under gradient accumulation.
///
/// Errors: as [`causal_lm_loss`].
pub fn causal_lm_loss_over(model: &Model, batch: &[Example], denominator: Option<usize>) -> Result<LossOutput> {
    let (step, rows, targets) = loss_rows(model, batch)?;
    let max_len = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(1);
    let mut pool = model.new_pool(batch.len(), max_len);
    let logits = model.forward_batch(&step, &mut pool)?; // (Σ len, vocab), push order
    let dev = model.device();
    let picked = logits.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?; // (M, vocab)
    let targets = Tensor::new(targets.as_slice(), dev)?;
    let loss = cross_entropy_sum(&picked, &targets)?;
    let denom = denominator.unwrap_or(rows.len()).max(1) as f64;
    Ok(LossOutput { loss: (loss / denom)?, tokens: rows.len() })
}

/// The step of `batch` (every row from position 0, all logits) and, for each label that carries
/// loss, the push-order index of the token that predicts it and the label.
pub(crate) fn loss_rows(model: &Model, batch: &[Example]) -> Result<(StepBatch, Vec<u32>, Vec<u32>)> {
    let vocab = model.config().vocab_size;
    let mut step = StepBatch::new();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    let mut offset = 0usize;
    for (slot, ex) in batch.iter().enumerate() {
        step.push(slot, 0, &ex.input_ids, 0, RowLogits::All)?;
        for (i, &label) in ex.labels.iter().enumerate().skip(1) {
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as usize >= vocab {
                return Err(TrainError::LabelOutOfRange { label, vocab }.into());
            }
            rows.push((offset + i - 1) as u32);
            targets.push(label as u32);
        }
        offset += ex.input_ids.len();
    }
    if targets.is_empty() {
        return Err(TrainError::NoLossTokens.into());
    }
    Ok((step, rows, targets))
}

/// `mean_i(−log softmax(logits_i)[target_i])`: logits (M, V) f32, targets (M,) u32 → scalar.
pub fn cross_entropy_mean(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let m = targets.dim(0)? as f64;
    Ok((cross_entropy_sum(logits, targets)? / m)?)
}

/// `Σ_i(−log softmax(logits_i)[target_i])`: logits (M, V), targets (M,) u32 → scalar f32.
///
/// On the CPU with f32 logits this is one fused op ([`FusedCrossEntropy`]): a pass per row for
/// the log-sum-exp, and a backward that writes `softmax − onehot` straight into the gradient,
/// where the plain ops ([`cross_entropy_sum_reference`], its twin, used on other devices) keep
/// four (M, V) intermediates alive and walk them again in the backward. Targets must be below V
/// (checked).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && logits.rank() == 2 {
        let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let vocab = logits.dim(1)?;
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
            return Err(TrainError::LabelOutOfRange { label: i64::from(t), vocab }.into());
        }
        if targets.len() != logits.dim(0)? {
            return Err(candle_core::Error::Msg(format!("cross-entropy: {} targets for {} rows", targets.len(), logits.dim(0)?)).into());
        }
        return Ok(logits.contiguous()?.apply_op1(FusedCrossEntropy { targets })?);
    }
    cross_entropy_sum_reference(logits, targets)
}

/// Plain-op twin of [`cross_entropy_sum`] (candle differentiates it op by op).
pub fn cross_entropy_sum_reference(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach(); // shift only: no gradient
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (M, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (M, 1)
    Ok((lse - picked)?.sum_all()?)
}

/// The CPU cross-entropy of [`cross_entropy_sum`] over contiguous f32 logits (M, V): forward
/// `Σ_i (lse_i − x_i[t_i])`, backward `g · (softmax(x_i) − onehot(t_i))` per row, rows in
/// parallel. Each row's log-sum-exp is taken about its maximum, in f32 like the twin.
#[derive(Debug, Clone)]
pub struct FusedCrossEntropy {
    /// One target per row, each below V.
    pub targets: Vec<u32>,
}

impl FusedCrossEntropy {
    /// (max, Σ exp(x − max)) of one row.
    fn row_stats(row: &[f32]) -> (f32, f32) {
        // A NaN is skipped here but reaches the sum (exp of NaN is NaN below).
        let mut lanes = [f32::NEG_INFINITY; 8];
        let chunks = row.chunks_exact(8);
        let rest = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
        for c in chunks {
            for (m, &x) in lanes.iter_mut().zip(c) {
                *m = if x > *m { x } else { *m };
            }
        }
        let max = lanes.iter().copied().fold(rest, |m, x| if x > m { x } else { m });
        let sum = exp_sum(row, max);
        (max, sum)
    }

    fn rows<'a>(&self, x: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
        let (m, v) = l.shape().dims2()?;
        let data = match x {
            CpuStorage::F32(d) => d,
            _ => candle_core::bail!("fused cross-entropy: f32 logits only"),
        };
        let Some(data) = l.contiguous_offsets().map(|(a, b)| &data[a..b]) else {
            candle_core::bail!("fused cross-entropy: logits must be contiguous")
        };
        if m != self.targets.len() {
            candle_core::bail!("fused cross-entropy: {} targets for {m} rows", self.targets.len());
        }
        Ok((data, v))
    }
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = self.rows(x, l)?;
        let total: f32 = data
            .par_chunks(v.max(1))
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let (max, sum) = Self::row_stats(row);
                (sum.ln() + max) - row[t as usize]
            })
            .collect::<Vec<f32>>()
            .iter()
            .sum();
        Ok((CpuStorage::F32(vec![total]), Shape::from(())))
    }

    /// dL/dx_ij = g · (exp(x_ij − lse_i) − [j = t_i]).
    fn bwd(&self, x: &Tensor, _loss: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let (m, v) = x.dims2()?;
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("fused cross-entropy: CPU logits only")
        };
        let (data, _) = self.rows(cpu, layout)?;
        let mut out = vec![0f32; m * v];
        out.par_chunks_mut(v.max(1))
            .zip(data.par_chunks(v.max(1)))
            .zip(self.targets.par_iter())
            .for_each(|((o, row), &t)| {
                let (max, sum) = Self::row_stats(row);
                let lse = sum.ln() + max;
                exp_scaled(row, lse, g, o);
                o[t as usize] -= g;
            });
        drop(storage);
        Ok(Some(Tensor::from_vec(out, (m, v), x.device())?))
    }
}

/// Σ exp(x − shift) over `row` (every x − shift ≤ 0), 8 partial sums.
fn exp_sum(row: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&x| exp_f32(x - shift)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp_f32(x - shift);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// out = g · exp(x − shift) elementwise.
fn exp_scaled(row: &[f32], shift: f32, g: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = g * exp_f32(x - shift);
    }
}

/// [`crate::sampling::exp_f32`], or NaN for a NaN argument (a NaN logit must give a NaN loss
/// and gradient, as in the twin, not a weight of 0).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let e = crate::sampling::exp_f32(x);
    if x.is_nan() {
        f32::NAN
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn logits(m: usize, v: usize) -> Vec<f32> {
        // Deterministic, spread over ±12 with a few large peaks.
        (0..m * v)
            .map(|i| {
                let x = ((i as u64).wrapping_mul(2_654_435_761) % 10_007) as f32 / 10_007.0;
                (x - 0.5) * 24.0 + if i % 97 == 0 { 30.0 } else { 0.0 }
            })
            .collect()
    }

    /// The fused op against its plain-op twin: loss and the gradient candle derives for the twin.
    #[test]
    fn fused_cross_entropy_equals_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (m, v) in [(1, 7), (5, 1000), (3, 49_152)] {
            let x = Var::from_tensor(&Tensor::from_vec(logits(m, v), (m, v), &dev)?)?;
            let t: Vec<u32> = (0..m).map(|i| ((i * 7919 + 3) % v) as u32).collect();
            let t = Tensor::new(t.as_slice(), &dev)?;
            let fused = (cross_entropy_sum(x.as_tensor(), &t)? * 0.37)?;
            let plain = (cross_entropy_sum_reference(x.as_tensor(), &t)? * 0.37)?;
            let (lf, lp) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
            assert!((lf - lp).abs() <= 1e-5 * lp.abs().max(1.0), "loss {lf} vs {lp} at ({m}, {v})");
            let gf = fused.backward()?.get(x.as_tensor()).cloned().expect("fused grad").flatten_all()?.to_vec1::<f32>()?;
            let gp = plain.backward()?.get(x.as_tensor()).cloned().expect("plain grad").flatten_all()?.to_vec1::<f32>()?;
            let worst = gf.iter().zip(&gp).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-6, "gradient differs by {worst} at ({m}, {v})");
        }
        Ok(())
    }

    #[test]
    fn fused_cross_entropy_keeps_nan_and_checks_targets() -> Result<()> {
        let dev = Device::Cpu;
        let mut l = logits(2, 16);
        l[20] = f32::NAN;
        let x = Tensor::from_vec(l, (2, 16), &dev)?;
        let loss = cross_entropy_sum(&x, &Tensor::new(&[1u32, 2], &dev)?)?.to_scalar::<f32>()?;
        assert!(loss.is_nan());
        let err = cross_entropy_sum(&x, &Tensor::new(&[1u32, 16], &dev)?).expect_err("target 16 of 16");
        assert!(err.to_string().contains("16"), "{err}");
        Ok(())
    }
}
