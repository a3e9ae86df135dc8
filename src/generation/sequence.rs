//! [`Sequence`]: the state of one generation between forward passes — its tokens, sampler, stop
//! matcher, detokenizer, timings and cancel flag. The engine steps many of them per forward pass;
//! nothing here touches the model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CancelHandle, Event, FinishReason, Finished, GenerateParams, StopMatcher, StopOutcome, StreamDecoder, Timings};
use super::constraint::ConstraintState;
use crate::error::{Error, Result};
use crate::sampling::{logprobs, Sampler};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy)]
struct Clock {
    /// When the sequence was started (submitted, or the stream first polled).
    start: Option<Instant>,
    /// When its first prompt token went into a forward pass.
    prefill_start: Option<Instant>,
    prefill: Duration,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// One generation's state. Created validated; fed the logits of its last token after each
/// forward pass that completes its pending tokens.
pub(crate) struct Sequence {
    tokenizer: Arc<Tokenizer>,
    /// Prompt then generated ids.
    tokens: Vec<u32>,
    prompt_len: usize,
    cached_len: usize,
    params: GenerateParams,
    eos: Vec<u32>,
    /// Logits at or past this index (padded embedding rows) are never sampled.
    vocab_limit: usize,
    /// The longest sequence (prompt + generated) the model accepts.
    context: usize,
    sampler: Sampler,
    /// The grammar the output must match, if any.
    constraint: Option<ConstraintState>,
    decoder: StreamDecoder,
    stop: StopMatcher,
    cancel: CancelHandle,
    clock: Clock,
    generated: usize,
    queued_finish: Option<FinishReason>,
    done: bool,
}

/// What a sequence is created from.
pub(crate) struct SequenceSetup {
    pub tokenizer: Arc<Tokenizer>,
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub eos: Vec<u32>,
    /// The model's vocabulary (embedding rows).
    pub model_vocab: usize,
    /// The context the sequence runs in.
    pub context: usize,
}

impl Sequence {
    /// Validates the prompt and parameters. Errors: [`Error::InvalidParameter`] naming the
    /// parameter, [`Error::ContextOverflow`] for a prompt that leaves no room for a token.
    pub fn new(setup: SequenceSetup) -> Result<Self> {
        let SequenceSetup { tokenizer, prompt, params, eos, model_vocab, context } = setup;
        params.validate()?;
        let vocab_limit = tokenizer.vocab_size().min(model_vocab);
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
        if prompt.len() >= context {
            return Err(Error::ContextOverflow { prompt_tokens: prompt.len(), context });
        }
        let constraint = match &params.constraint {
            None => None,
            Some(c) => {
                let eos = *eos.first().ok_or_else(|| Error::InvalidParameter {
                    name: "constraint",
                    reason: "constrained decoding needs the model's end-of-sequence token, and this model has none".into(),
                })?;
                Some(tokenizer.constraint_factory(vocab_limit, eos)?.matcher(c)?)
            }
        };
        Ok(Self {
            constraint,
            sampler: Sampler::from_params(&params.sampling)?,
            stop: StopMatcher::new(&params.stop)?,
            tokenizer,
            prompt_len: prompt.len(),
            tokens: prompt,
            cached_len: 0,
            params,
            eos,
            vocab_limit,
            context,
            decoder: StreamDecoder::new(),
            cancel: CancelHandle::default(),
            clock: Clock { start: None, prefill_start: None, prefill: Duration::ZERO, first_token: None, last_token: None },
            generated: 0,
            queued_finish: None,
            done: false,
        })
    }

    /// A copy that has generated nothing yet, with its own sampler seeded `seed` (`n > 1`: the
    /// continuations of one prefilled prompt).
    pub fn fork(&self, seed: u64) -> Result<Self> {
        let mut params = self.params.clone();
        params.sampling.seed = seed;
        let mut next = Self::new(SequenceSetup {
            tokenizer: Arc::clone(&self.tokenizer),
            prompt: self.tokens[..self.prompt_len].to_vec(),
            params,
            eos: self.eos.clone(),
            model_vocab: self.vocab_limit,
            context: self.context,
        })?;
        next.cached_len = self.cached_len;
        next.clock = self.clock;
        Ok(next)
    }

    /// Prompt and generated ids so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens in the prompt.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The cancel flag.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Whether the final event was produced.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Starts the clock (TTFT counts from here); later calls do nothing.
    pub fn start_clock(&mut self) {
        self.clock.start.get_or_insert_with(Instant::now);
    }

    /// Records that the first `n` prompt tokens came from a cache (not prefilled).
    pub fn set_cached(&mut self, n: usize) {
        self.cached_len = n;
    }

    /// Records that a forward pass with this sequence's tokens is about to run.
    pub fn forward_started(&mut self) {
        self.clock.prefill_start.get_or_insert_with(Instant::now);
    }

    /// The finish event due before the next forward pass (cancelled, length reached, a stop
    /// string already seen), if any.
    pub fn due_finish(&mut self) -> Option<Result<Event>> {
        self.start_clock();
        let reason = if let Some(reason) = self.queued_finish.take() {
            reason
        } else if self.cancel.is_cancelled() {
            FinishReason::Cancelled
        } else if self.generated >= self.params.max_tokens || self.tokens.len() >= self.context {
            FinishReason::Length
        } else {
            return None;
        };
        Some(self.finish(reason))
    }

    /// Samples the next token from the logits of the last token: (≥ vocab_limit,) f32.
    pub fn accept_logits(&mut self, mut logits: Vec<f32>) -> Result<Event> {
        logits.truncate(self.vocab_limit);
        if self.generated == 0 {
            self.clock.prefill = self.clock.prefill_start.map_or(Duration::ZERO, |s| s.elapsed());
        }
        let raw = self.params.logprobs.map(|n| (logits.clone(), n));
        if let Some(c) = &mut self.constraint {
            c.mask(&mut logits)?;
        }
        let id = self.sampler.sample_with_history(&mut logits, &self.tokens)?;
        let now = Instant::now();
        self.clock.first_token.get_or_insert(now);
        self.clock.last_token = Some(now);
        self.generated += 1;
        self.tokens.push(id);
        if !self.params.ignore_eos && self.eos.contains(&id) {
            return self.finish(FinishReason::Eos);
        }
        if let Some(c) = &mut self.constraint {
            c.accept(id)?;
            if c.is_stopped() {
                // The grammar is complete: nothing but end of sequence could follow, so the
                // sequence ends as if it had been sampled.
                self.queued_finish = Some(FinishReason::Eos);
            }
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

    /// The final event for `reason` (flushing held-back text).
    pub fn finish(&mut self, reason: FinishReason) -> Result<Event> {
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

    /// Marks the sequence ended by an error (no final event follows).
    pub fn fail(&mut self) {
        self.done = true;
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
