//! HF `ForCausalLM` loss (transformers `loss_utils.ForCausalLMLoss`): labels are shifted left by
//! one, `-100` is ignored, and the loss is the mean cross-entropy over every remaining label of
//! the batch (not a mean of per-row means).

use candle_core::{DType, Tensor, D};

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
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach(); // shift only: no gradient
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (M, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (M, 1)
    Ok((lse - picked)?.sum_all()?)
}
