//! Multi-turn chat that keeps its KV cache between turns.

use super::{ChatHistory, Message, Role};
use crate::error::Result;
use crate::generation::{Event, GenerateParams, Generation, Generator, TokenStream};
use crate::model::{KvCache, Model};

/// A conversation with one model. Each turn renders the whole history with the chat template,
/// keeps the cached keys/values of the longest common prefix with the previous turn's tokens and
/// prefills only the rest (a sliding-window cache that has wrapped is prefilled again).
#[derive(Debug)]
pub struct ChatSession {
    generator: Generator,
    history: ChatHistory,
    /// The cache and the ids it holds.
    cache: Option<(KvCache, Vec<u32>)>,
}

impl ChatSession {
    /// A session with an empty history. Errors: [`crate::Error::ChatTemplate`] when the model has
    /// no usable chat template.
    pub fn new(generator: Generator) -> Result<Self> {
        generator.chat_template()?;
        Ok(Self { generator, history: ChatHistory::default(), cache: None })
    }

    /// The generator (model, tokenizer, template).
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// Replaces the model (e.g. after changing adapters); the cache is dropped because its keys
    /// and values came from the old one.
    pub fn set_model(&mut self, model: Model) {
        self.generator.set_model(model);
        self.cache = None;
    }

    /// The conversation so far.
    pub fn history(&self) -> &ChatHistory {
        &self.history
    }

    /// Sets (or with `None` removes) the system message at the start of the conversation.
    pub fn set_system(&mut self, system: Option<&str>) {
        let messages = &mut self.history.messages;
        if messages.first().is_some_and(|m| m.role == Role::System) {
            messages.remove(0);
        }
        if let Some(text) = system {
            messages.insert(0, Message::system(text));
        }
    }

    /// Forgets the conversation (the system message stays) and the cache.
    pub fn reset(&mut self) {
        self.history.messages.retain(|m| m.role == Role::System);
        self.cache = None;
    }

    /// Adds a user message and starts the reply. The reply joins the history when the stream
    /// finishes or is dropped (with the text produced so far).
    ///
    /// Errors: as [`Generator::stream`]; on error the user message is not kept.
    pub fn send(&mut self, user: &str, params: &GenerateParams) -> Result<ChatStream<'_>> {
        self.history.messages.push(Message::user(user));
        match self.start(params) {
            Ok(stream) => Ok(ChatStream { session: self, inner: Some(stream), reply: String::new() }),
            Err(e) => {
                self.history.messages.pop();
                Err(e)
            }
        }
    }

    /// [`ChatSession::send`] run to the end.
    pub fn reply(&mut self, user: &str, params: &GenerateParams) -> Result<Generation> {
        let stream = self.send(user, params)?;
        crate::generation::collect_events(stream)
    }

    fn start(&mut self, params: &GenerateParams) -> Result<TokenStream> {
        params.validate()?;
        let ids = self.generator.encode_chat(&self.history.messages, true)?;
        let (mut cache, cached) = self.cache.take().unwrap_or_else(|| (self.generator.model().new_cache(), Vec::new()));
        let common = ids.iter().zip(&cached).take_while(|(a, b)| a == b).count().min(ids.len().saturating_sub(1));
        if !cache.truncate(common) {
            cache.reset();
        }
        self.generator.stream_with_cache(ids, cache, params)
    }
}

/// The reply to one [`ChatSession::send`]: the same events as [`TokenStream`]. When it finishes
/// or is dropped, the reply is added to the history and the cache returns to the session.
pub struct ChatStream<'a> {
    session: &'a mut ChatSession,
    inner: Option<TokenStream>,
    reply: String,
}

impl ChatStream<'_> {
    /// A handle that stops the reply before its next token.
    pub fn cancel_handle(&self) -> Option<crate::generation::CancelHandle> {
        self.inner.as_ref().map(TokenStream::cancel_handle)
    }

    fn complete(&mut self, keep_cache: bool) {
        let Some(stream) = self.inner.take() else { return };
        if keep_cache {
            self.session.cache = Some(stream.into_cache());
        }
        let reply = std::mem::take(&mut self.reply);
        self.session.history.messages.push(Message::assistant(reply));
    }
}

impl Iterator for ChatStream<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        let event = self.inner.as_mut()?.next()?;
        match &event {
            Ok(Event::Token { text, .. }) => self.reply.push_str(text),
            Ok(Event::Finished(done)) => {
                self.reply.push_str(&done.text);
                self.complete(true);
            }
            // The cache may hold a half-written step: drop it.
            Err(_) => self.complete(false),
        }
        Some(event)
    }
}

impl Drop for ChatStream<'_> {
    fn drop(&mut self) {
        self.complete(true);
    }
}
