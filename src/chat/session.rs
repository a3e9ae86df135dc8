//! Multi-turn chat that keeps its KV cache between turns and drops the oldest turns from the
//! prompt when the conversation outgrows the context ([`super::overflow`]).

use super::overflow::{fit_turns, TrimNotice};
use super::{ChatHistory, Message, Role};
use crate::error::Result;
use crate::generation::{Event, GenerateParams, Generation, Generator, TokenStream};
use crate::model::{KvCache, Model};

/// A conversation with one model. Each turn renders the whole history with the chat template,
/// keeps the cached keys/values of the longest common prefix with the previous turn's tokens and
/// prefills only the rest (a sliding-window cache that has wrapped is prefilled again).
///
/// Context overflow: when the prompt would leave fewer than `min(max_tokens, context / 2)` tokens
/// for the reply, the oldest turns are left out of the prompt (the system prompt stays; see
/// [`super::overflow::fit_turns`]) and [`ChatStream::trimmed`] says how many. They stay in
/// [`ChatSession::history`], so a saved conversation is complete; later turns start from the same
/// place, so the cache is reused again until the next trim.
#[derive(Debug)]
pub struct ChatSession {
    generator: Generator,
    history: ChatHistory,
    /// The cache and the ids it holds.
    cache: Option<(KvCache, Vec<u32>)>,
    /// Non-system messages at the start of the history that are no longer in the prompt.
    dropped: usize,
}

impl ChatSession {
    /// A session with an empty history. Errors: [`crate::Error::ChatTemplate`] when the model has
    /// no usable chat template.
    pub fn new(generator: Generator) -> Result<Self> {
        generator.chat_template()?;
        Ok(Self { generator, history: ChatHistory::default(), cache: None, dropped: 0 })
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

    /// Switches to another model, tokenizer and chat template, keeping the history: the next turn
    /// renders the whole conversation with the new template and prefills it from scratch (the old
    /// cache is dropped with the old generator). The old generator is dropped here, so its
    /// weights are freed once no stream holds them.
    ///
    /// Errors: [`crate::Error::ChatTemplate`] when the new model has no usable chat template; the
    /// session is then unchanged.
    pub fn set_generator(&mut self, generator: Generator) -> Result<()> {
        generator.chat_template()?;
        self.generator = generator;
        self.cache = None;
        self.dropped = 0;
        Ok(())
    }

    /// The conversation so far.
    pub fn history(&self) -> &ChatHistory {
        &self.history
    }

    /// Replaces the conversation (e.g. one loaded from a file): the next turn renders all of it,
    /// trimming the oldest turns only if it outgrows the context. The cache is dropped.
    pub fn set_history(&mut self, history: ChatHistory) {
        self.history = history;
        self.cache = None;
        self.dropped = 0;
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
        self.dropped = 0;
    }

    /// Adds a user message and starts the reply. The reply joins the history when the stream
    /// finishes or is dropped (with the text produced so far).
    ///
    /// Errors: as [`Generator::stream`]; on error the user message is not kept.
    pub fn send(&mut self, user: &str, params: &GenerateParams) -> Result<ChatStream<'_>> {
        self.history.messages.push(Message::user(user));
        match self.start(params) {
            Ok((stream, trimmed)) => Ok(ChatStream { session: self, inner: Some(stream), reply: String::new(), trimmed }),
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

    fn start(&mut self, params: &GenerateParams) -> Result<(TokenStream, Option<TrimNotice>)> {
        params.validate()?;
        let (ids, trimmed) = self.fit_prompt(params.max_tokens)?;
        let (mut cache, cached) = self.cache.take().unwrap_or_else(|| (self.generator.model().new_cache(), Vec::new()));
        let common = ids.iter().zip(&cached).take_while(|(a, b)| a == b).count().min(ids.len().saturating_sub(1));
        if !cache.truncate(common) {
            cache.reset();
        }
        Ok((self.generator.stream_with_cache(ids, cache, params)?, trimmed))
    }

    /// The prompt ids of the messages still in the window, trimmed to leave room for the reply.
    fn fit_prompt(&mut self, max_tokens: usize) -> Result<(Vec<u32>, Option<TrimNotice>)> {
        let context = self.generator.model().max_positions();
        let budget = context.saturating_sub(max_tokens.min(context / 2));
        let messages = &self.history.messages;
        let system = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
        let mut window = messages[..system].to_vec();
        window.extend_from_slice(&messages[system + self.dropped..]);
        let generator = &self.generator;
        let fitted = fit_turns(&window, budget, |m| generator.encode_chat(m, true))?;
        if fitted.dropped_turns == 0 {
            return Ok((fitted.ids, None));
        }
        self.dropped += fitted.dropped_messages;
        let notice = TrimNotice { turns: fitted.dropped_turns, messages: fitted.dropped_messages, context };
        Ok((fitted.ids, Some(notice)))
    }
}

/// The reply to one [`ChatSession::send`]: the same events as [`TokenStream`]. When it finishes
/// or is dropped, the reply is added to the history and the cache returns to the session.
pub struct ChatStream<'a> {
    session: &'a mut ChatSession,
    inner: Option<TokenStream>,
    reply: String,
    trimmed: Option<TrimNotice>,
}

impl ChatStream<'_> {
    /// Whether this reply's prompt left the oldest turns out to fit the context, and how many.
    /// Its `Display` is the one-line notice to show.
    pub fn trimmed(&self) -> Option<TrimNotice> {
        self.trimmed
    }

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
