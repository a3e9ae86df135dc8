//! Gradient checkpointing: the loss and the LoRA gradients of one micro-batch with only one
//! layer's autograd graph alive at a time.
//!
//! candle keeps every intermediate tensor of a graph until the backward ends, so a whole-model
//! graph holds all layers' activations plus (rows × vocab) logits several times over. Here the
//! forward runs a layer at a time (the decoder's crate-internal `LayerSteps`) and keeps only each
//! layer's input (N × hidden); the output head runs in chunks of [`HEAD_CHUNK`] loss rows, each
//! back-propagated at once into the last hidden state; then, from the top layer down, each layer
//! is recomputed from its saved input and back-propagated with the gradient of its output
//! (`Σ y · dL/dy`, whose gradient is exactly `dL/dy`), which yields its LoRA factors' gradients
//! and the gradient of its input for the layer below. The recompute runs the same ops on the same
//! inputs (every layer input is a leaf [`Var`] in both passes, and the LoRA dropout reseeds per
//! layer), so the gradients are those of the whole graph up to the order of floating-point sums.
//! Cost: one more forward of the layers (about a third of a step).

use candle_core::{Tensor, Var};

use super::data::Example;
use super::loss::{cross_entropy_sum, loss_rows};
use super::TrainableLora;
use crate::error::Result;

/// Loss rows per chunk of the output head: the chunk's logits are (rows, vocab) f32, e.g.
/// 256 × 49152 × 4 B = 48 MiB for SmolLM2.
pub const HEAD_CHUNK: usize = 256;

/// The loss of `batch` (summed token cross-entropy divided by `denominator`, default its own loss
/// tokens, as [`super::causal_lm_loss_over`]) and, with `backward`, the gradient of every
/// [`TrainableLora::vars`] entry (zeros for a factor the batch does not reach). The gradients are
/// not computed when the loss is not finite.
///
/// Errors: as [`super::causal_lm_loss_over`].
pub fn loss_and_grads(lora: &TrainableLora, batch: &[Example], denominator: Option<usize>, backward: bool) -> Result<(f64, Option<Vec<Tensor>>)> {
    loss_and_grads_chunked(lora, batch, denominator, backward, HEAD_CHUNK)
}

/// [`loss_and_grads`] with `head_chunk` loss rows per chunk of the output head (at least 1).
///
/// Errors: as [`loss_and_grads`].
pub fn loss_and_grads_chunked(
    lora: &TrainableLora,
    batch: &[Example],
    denominator: Option<usize>,
    backward: bool,
    head_chunk: usize,
) -> Result<(f64, Option<Vec<Tensor>>)> {
    let head_chunk = head_chunk.max(1);
    let model = lora.model();
    let dev = model.device();
    let (step, rows, targets) = loss_rows(model, batch)?;
    let denom = denominator.unwrap_or(rows.len()).max(1) as f64;
    let max_len = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(1);
    let fresh_pool = || model.new_pool(batch.len(), max_len);
    let steps = model.layer_steps(&step, &fresh_pool())?;
    let order = steps.token_order();
    let rows = rows // execution order
        .iter()
        .map(|&r| order.get(r as usize).copied())
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| candle_core::Error::Msg("recompute: a loss row outside the step".into()))?;
    let leaf = |t: &Tensor| -> Result<Tensor> { Ok(Var::from_tensor(t)?.as_tensor().clone()) };

    // Forward: keep each layer's input (a leaf above layer 0, reused by the recompute), drop its
    // graph.
    let n = steps.n_layers();
    let mut inputs = Vec::with_capacity(n);
    let mut x = steps.embeddings()?;
    for i in 0..n {
        let xi = if i == 0 { x } else { leaf(&x)? };
        lora.begin_layer(i);
        x = steps.layer(i, &xi, &mut fresh_pool())?.detach();
        inputs.push(xi);
    }

    // Output head, a chunk of loss rows at a time, back-propagated into the last hidden state.
    let top = leaf(&x)?;
    let mut loss = 0f64;
    let mut grad: Option<Tensor> = None;
    for (r, t) in rows.chunks(head_chunk).zip(targets.chunks(head_chunk)) {
        let h = top.index_select(&Tensor::new(r, dev)?, 0)?;
        let part = (cross_entropy_sum(&steps.logits(&h)?, &Tensor::new(t, dev)?)? / denom)?;
        loss += f64::from(part.to_scalar::<f32>()?);
        if backward && loss.is_finite() {
            if let Some(g) = part.backward()?.get(&top) {
                grad = Some(match grad {
                    None => g.clone(),
                    Some(acc) => (acc + g)?,
                });
            }
        }
    }
    if !backward || !loss.is_finite() {
        return Ok((loss, None));
    }

    // Backward: recompute each layer from its input, top down.
    let vars = lora.vars();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut g = match grad {
        Some(g) => g,
        None => top.zeros_like()?,
    };
    for (i, xi) in inputs.iter().enumerate().rev() {
        lora.begin_layer(i);
        let y = steps.layer(i, xi, &mut fresh_pool())?;
        let store = (y * &g)?.sum_all()?.backward()?;
        for (acc, v) in grads.iter_mut().zip(&vars) {
            if let Some(gv) = store.get(v.as_tensor()) {
                *acc = Some(match acc.take() {
                    None => gv.clone(),
                    Some(a) => (a + gv)?,
                });
            }
        }
        if i > 0 {
            g = match store.get(xi) {
                Some(gx) => gx.clone(),
                None => xi.zeros_like()?,
            };
        }
    }
    let grads = grads
        .into_iter()
        .zip(&vars)
        .map(|(g, v)| match g {
            Some(g) => Ok(g),
            None => Ok(v.zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((loss, Some(grads)))
}
