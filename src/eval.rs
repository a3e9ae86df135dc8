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
    /// The negative log-likelihoods that were scored, natural log, in order: with
    /// [`perplexity`] `nll[i]` = −log p(token[i+1] | the tokens of its window up to i); with
    /// [`perplexity_second_half`] only the second half of each window.
    pub nll: Vec<f32>,
    /// Standard error of `perplexity`, as llama.cpp's `llama-perplexity` prints it (`PPL = X +/-
    /// SE`): `perplexity · sqrt((mean(nll²) − mean(nll)²) / (n − 1))`, the standard error of the
    /// mean NLL carried through `exp` to first order. 0 with fewer than two scored tokens.
    pub std_error: f64,
}

impl PerplexityReport {
    fn from_nll(nll: Vec<f32>, tokens: usize) -> Self {
        let n = nll.len() as f64;
        let mean = nll.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let mean_sq = nll.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / n;
        let perplexity = mean.exp();
        let var = mean_sq - mean * mean;
        let std_error = if nll.len() > 1 && var > 0.0 { perplexity * (var / (n - 1.0)).sqrt() } else { 0.0 };
        Self { perplexity, tokens, nll, std_error }
    }
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
        let log_probs = window_log_probs(model, window)?; // (t, vocab)
        let targets = Tensor::new(&window[1..], model.device())?.unsqueeze(1)?; // (t-1, 1)
        let picked = log_probs.narrow(0, 0, window.len() - 1)?.gather(&targets, 1)?; // (t-1, 1)
        nll.extend(picked.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|lp| -lp));
    }
    Ok(PerplexityReport::from_nll(nll, ids.len()))
}

/// Log-probabilities (t, vocab) of one window, evaluated with a fresh KV cache.
fn window_log_probs(model: &Model, window: &[u32]) -> Result<Tensor> {
    let mut cache = model.new_cache();
    let input = Tensor::new(window, model.device())?.unsqueeze(0)?; // (1, t)
    let logits = model.forward(&input, &mut cache, Logits::All)?.squeeze(0)?; // (t, vocab) f32
    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
}

/// Perplexity as llama.cpp's `llama-perplexity` computes it (`perplexity()` in
/// tools/perplexity/perplexity.cpp), so numbers compare with its output on the same file and text:
/// `ids` (the whole text tokenized with special tokens) is cut into `ids.len() / ctx` windows of
/// exactly `ctx` tokens, without overlap (a shorter tail is dropped); where the model adds BOS
/// (`bos` is `Some`) the first token of each window is replaced by BOS; and only the second half of
/// each window is scored: the logits at positions `ctx/2 .. ctx-1` predicting the tokens after
/// them, `ctx - ctx/2 - 1` per window, so every scored token has at least `ctx/2` tokens of context.
///
/// Errors: [`Error::InvalidParameter`] `ctx` below 4, or `token_ids` shorter than one window.
pub fn perplexity_second_half(model: &Model, ids: &[u32], ctx: usize, bos: Option<u32>) -> Result<PerplexityReport> {
    if ctx < MIN_SECOND_HALF_CTX {
        return Err(Error::InvalidParameter {
            name: "ctx",
            reason: format!("second-half scoring needs a window of at least {MIN_SECOND_HALF_CTX} tokens, got {ctx}"),
        });
    }
    if ids.len() < ctx {
        return Err(Error::InvalidParameter {
            name: "token_ids",
            reason: format!("second-half scoring needs at least one window of {ctx} tokens, got {}", ids.len()),
        });
    }
    let first = ctx / 2;
    let mut nll = Vec::with_capacity((ids.len() / ctx) * (ctx - first - 1));
    for chunk in ids.chunks_exact(ctx) {
        let mut window = chunk.to_vec();
        if let (Some(bos), Some(slot)) = (bos, window.first_mut()) {
            *slot = bos;
        }
        let log_probs = window_log_probs(model, &window)?; // (ctx, vocab)
        let targets = Tensor::new(&window[first + 1..], model.device())?.unsqueeze(1)?; // (ctx-first-1, 1)
        let picked = log_probs.narrow(0, first, ctx - first - 1)?.gather(&targets, 1)?;
        nll.extend(picked.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|lp| -lp));
    }
    Ok(PerplexityReport::from_nll(nll, ids.len()))
}

/// The smallest window [`perplexity_second_half`] takes: half of it is context, and the second
/// half must score at least one token.
pub const MIN_SECOND_HALF_CTX: usize = 4;
