//! Evaluation: perplexity over token ids.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::model::{Logits, Model};

/// Result of [`perplexity`].
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityReport {
    /// exp(mean(nll)).
    pub perplexity: f64,
    /// Number of input tokens.
    pub tokens: usize,
    /// `nll[i]` = −log p(token[i+1] | the tokens of its window up to i), natural log.
    pub nll: Vec<f32>,
}

/// Perplexity of `ids` under `model`, evaluated in consecutive windows of `ctx` tokens, each
/// with a fresh KV cache (the first token of a window is context only, so windows after the
/// first contribute `ctx - 1` predictions). With `ctx ≥ ids.len()` this is HF's full-sequence
/// perplexity. Needs at least two tokens.
pub fn perplexity(model: &Model, ids: &[u32], ctx: usize) -> Result<PerplexityReport> {
    if ids.len() < 2 {
        return Err(Error::InvalidParameter {
            name: "token_ids",
            reason: format!("perplexity needs at least 2 tokens, got {}", ids.len()),
        });
    }
    if ctx < 2 {
        return Err(Error::InvalidParameter {
            name: "ctx",
            reason: format!("must be at least 2, got {ctx}"),
        });
    }
    let mut nll = Vec::with_capacity(ids.len() - 1);
    for window in ids.chunks(ctx) {
        if window.len() < 2 {
            break;
        }
        let mut cache = model.new_cache();
        let input = Tensor::new(window, model.device())?.unsqueeze(0)?; // (1, t)
        let logits = model.forward(&input, &mut cache, Logits::All)?.squeeze(0)?; // (t, vocab) f32
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&window[1..], model.device())?.unsqueeze(1)?; // (t-1, 1)
        let picked = log_probs.narrow(0, 0, window.len() - 1)?.gather(&targets, 1)?; // (t-1, 1)
        nll.extend(picked.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|lp| -lp));
    }
    let mean = nll.iter().map(|&x| f64::from(x)).sum::<f64>() / nll.len() as f64;
    Ok(PerplexityReport {
        perplexity: mean.exp(),
        tokens: ids.len(),
        nll,
    })
}
