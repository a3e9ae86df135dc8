//! [`TokenStream`]: the engine's scheduler driven for one sequence on the caller's thread.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use super::sequence::{Sequence, SequenceSetup};
use super::{CancelHandle, Event, GenerateParams};
use crate::engine::core::{queue_sink, Admission, EngineCore};
use crate::error::{Error, Result};
use crate::model::{KvCache, Model};
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

/// An `Iterator` of [`Event`]s: one [`Event::Token`] per sampled token, then one
/// [`Event::Finished`], then `None`. An error ends the stream (it is returned once, then `None`).
///
/// The stream owns its clone of the model and its KV cache; each `next()` runs one step of the
/// same scheduler an [`crate::engine::Engine`] runs (with this one sequence and no token budget,
/// so the prompt is prefilled in one pass). [`TokenStream::cancel_handle`] stops it from another
/// thread before the next token.
pub struct TokenStream {
    core: EngineCore,
    events: Arc<Mutex<VecDeque<Result<Event>>>>,
    cancel: CancelHandle,
    prompt_len: usize,
    done: bool,
}

impl TokenStream {
    /// Validates the setup and prepares the stream; nothing runs until the first `next()`.
    pub(crate) fn new(setup: StreamSetup) -> Result<Self> {
        let StreamSetup { model, tokenizer, prompt, mut cache, params, eos } = setup;
        let cached_len = cache.seq_len();
        if cached_len >= prompt.len() && !prompt.is_empty() {
            return Err(Error::InvalidParameter {
                name: "cache",
                reason: format!("holds {cached_len} tokens; at least one of the {} prompt tokens must be new", prompt.len()),
            });
        }
        let seq = Sequence::new(SequenceSetup {
            tokenizer,
            prompt,
            params,
            eos,
            model_vocab: model.config().vocab_size,
            context: model.max_positions(),
        })?;
        let held = seq.tokens()[..cached_len].to_vec();
        cache.pool_for_rows(1)?;
        let mut core = crate::engine::single_core(model, cache.into_pool(), held);
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let cancel = seq.cancel_handle();
        let prompt_len = seq.prompt_len();
        core.enqueue(Admission { seq, sink: queue_sink(Arc::clone(&events)), variant: None, forks: Vec::new() });
        Ok(Self { core, events, cancel, prompt_len, done: false })
    }

    /// A handle that stops this stream before its next token.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Prompt and generated ids so far.
    pub fn tokens(&self) -> &[u32] {
        self.core.tokens_of(0)
    }

    /// Number of prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The KV cache and the ids whose keys/values it holds (a prefix of [`TokenStream::tokens`]),
    /// for reuse by a later generation that shares that prefix.
    pub fn into_cache(self) -> (KvCache, Vec<u32>) {
        let (pool, mut held) = self.core.into_pool();
        let tokens = if held.is_empty() { Vec::new() } else { held.swap_remove(0) };
        (KvCache::from_slot(pool, 0), tokens)
    }

    fn pop(&self) -> Option<Result<Event>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner).pop_front()
    }
}

impl Iterator for TokenStream {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let event = loop {
            if let Some(e) = self.pop() {
                break e;
            }
            if self.core.is_idle() {
                break Err(Error::InvalidParameter { name: "stream", reason: "ended without a final event".into() });
            }
            self.core.step();
        };
        if matches!(event, Err(_) | Ok(Event::Finished(_))) {
            self.done = true;
        }
        Some(event)
    }
}
