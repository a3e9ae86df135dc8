//! The token loop behind [`TokenStream`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::{CancelHandle, Event, FinishReason, Finished, GenerateParams, StopMatcher, StopOutcome, StreamDecoder, Timings};
use crate::error::{Error, Result};
use crate::model::{KvCache, Logits, Model};
use crate::sampling::{logprobs, Sampler};
use crate::tokenizer::Tokenizer;

/// Everything a stream starts from.
pub(crate) struct StreamSetup {
    pub model: Model,
    pub tokenizer: Arc<Tokenizer>,
    pub prompt: Vec<u32>,
    /// A cache holding keys/values of `prompt[..cache.seq_len()]` (empty for a fresh start).
    pub cache: KvCache,
    pub params: GenerateParams,
    pub eos: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    /// The first `next()`.
    start: Option<Instant>,
    prefill: Duration,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// An `Iterator` of [`Event`]s: one [`Event::Token`] per sampled token, then one
/// [`Event::Finished`], then `None`. An error ends the stream (it is returned once, then `None`).
///
/// The stream owns its clone of the model, its KV cache and its sampler; [`TokenStream::cancel_handle`]
/// stops it from another thread before the next token.
pub struct TokenStream {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    cache: KvCache,
    /// Prompt then generated ids.
    tokens: Vec<u32>,
    prompt_len: usize,
    cached_len: usize,
    params: GenerateParams,
    eos: Vec<u32>,
    /// Logits at or past this index (padded embedding rows) are never sampled.
    vocab_limit: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    cancel: CancelHandle,
    clock: Clock,
    generated: usize,
    queued_finish: Option<FinishReason>,
    done: bool,
}

impl TokenStream {
    /// Validates the setup and prepares the stream; nothing runs until the first `next()`.
    pub(crate) fn new(setup: StreamSetup) -> Result<Self> {
        let StreamSetup { model, tokenizer, prompt, cache, params, eos } = setup;
        params.validate()?;
        let vocab_limit = tokenizer.vocab_size().min(model.config().vocab_size);
        params.sampling.validate_ids(vocab_limit)?;
        if prompt.is_empty() {
            return Err(Error::InvalidParameter { name: "prompt", reason: "the prompt has no tokens".into() });
        }
        if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab_limit) {
            return Err(Error::InvalidParameter {
                name: "prompt",
                reason: format!("token id {bad} is outside the vocabulary of {vocab_limit}"),
            });
        }
        if prompt.len() >= model.max_positions() {
            return Err(Error::ContextOverflow { prompt_tokens: prompt.len(), context: model.max_positions() });
        }
        let cached_len = cache.seq_len();
        if cached_len >= prompt.len() {
            return Err(Error::InvalidParameter {
                name: "cache",
                reason: format!("holds {cached_len} tokens; at least one of the {} prompt tokens must be new", prompt.len()),
            });
        }
        Ok(Self {
            sampler: Sampler::from_params(&params.sampling)?,
            stop: StopMatcher::new(&params.stop)?,
            model,
            tokenizer,
            cache,
            prompt_len: prompt.len(),
            tokens: prompt,
            cached_len,
            params,
            eos,
            vocab_limit,
            decoder: StreamDecoder::new(),
            cancel: CancelHandle::default(),
            clock: Clock { start: None, prefill: Duration::ZERO, first_token: None, last_token: None },
            generated: 0,
            queued_finish: None,
            done: false,
        })
    }

    /// A handle that stops this stream before its next token.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Prompt and generated ids so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The KV cache and the ids whose keys/values it holds (a prefix of [`TokenStream::tokens`]),
    /// for reuse by a later generation that shares that prefix.
    pub fn into_cache(self) -> (KvCache, Vec<u32>) {
        let n = self.cache.seq_len().min(self.tokens.len());
        let mut tokens = self.tokens;
        tokens.truncate(n);
        (self.cache, tokens)
    }

    fn step(&mut self) -> Result<Event> {
        self.clock.start.get_or_insert_with(Instant::now);
        if let Some(reason) = self.queued_finish.take() {
            return self.finish(reason);
        }
        if self.cancel.is_cancelled() {
            return self.finish(FinishReason::Cancelled);
        }
        if self.generated >= self.params.max_tokens || self.tokens.len() >= self.model.max_positions() {
            return self.finish(FinishReason::Length);
        }
        let mut logits = self.forward()?; // (vocab_limit,)
        let raw = self.params.logprobs.map(|n| (logits.clone(), n));
        let id = self.sampler.sample_with_history(&mut logits, &self.tokens)?;
        let now = Instant::now();
        self.clock.first_token.get_or_insert(now);
        self.clock.last_token = Some(now);
        self.generated += 1;
        self.tokens.push(id);
        if !self.params.ignore_eos && self.eos.contains(&id) {
            return self.finish(FinishReason::Eos);
        }
        let delta = self.decoder.push(&self.tokenizer, id)?;
        let text = match self.stop.push(&delta) {
            StopOutcome::Continue(t) => t,
            StopOutcome::Stopped(t) => {
                self.queued_finish = Some(FinishReason::Stop);
                t
            }
        };
        let logprobs = raw.map(|(row, n)| logprobs(&row, id, n));
        Ok(Event::Token { id, text, logprobs })
    }

    /// Feeds the ids the cache does not hold yet; returns the last position's logits, cut to the
    /// tokenizer's vocabulary.
    fn forward(&mut self) -> Result<Vec<f32>> {
        let start = self.cache.seq_len();
        let began = Instant::now();
        let x = Tensor::new(&self.tokens[start..], self.model.device())?.unsqueeze(0)?; // (1, t)
        let logits = self.model.forward(&x, &mut self.cache, Logits::Last)?.squeeze(0)?; // (vocab,)
        let mut row = logits.to_vec1::<f32>()?;
        row.truncate(self.vocab_limit);
        if self.generated == 0 {
            self.clock.prefill = began.elapsed();
        }
        Ok(row)
    }

    fn finish(&mut self, reason: FinishReason) -> Result<Event> {
        self.done = true;
        let (reason, text) = match reason {
            FinishReason::Stop => (reason, String::new()),
            _ => {
                let tail = self.decoder.finish(&self.tokenizer)?;
                match self.stop.push(&tail) {
                    StopOutcome::Stopped(t) => (FinishReason::Stop, t),
                    StopOutcome::Continue(t) => (reason, t + &self.stop.flush()),
                }
            }
        };
        Ok(Event::Finished(Finished { reason, text, timings: self.timings() }))
    }

    fn timings(&self) -> Timings {
        let c = &self.clock;
        let prefilled = self.prompt_len - self.cached_len;
        let decode = match (c.first_token, c.last_token) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        };
        let per_s = |n: usize, d: Duration| if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() };
        Timings {
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached_len,
            generated_tokens: self.generated,
            ttft: match (c.start, c.first_token) {
                (Some(s), Some(t)) => t - s,
                _ => Duration::ZERO,
            },
            prefill: c.prefill,
            decode,
            prefill_tokens_per_s: per_s(prefilled, c.prefill),
            decode_tokens_per_s: per_s(self.generated.saturating_sub(1), decode),
        }
    }
}

impl Iterator for TokenStream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let event = self.step();
        if event.is_err() {
            self.done = true;
        }
        Some(event)
    }
}
