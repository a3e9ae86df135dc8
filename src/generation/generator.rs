//! [`Generator`]: a model, its tokenizer and chat template, ready to stream.

use std::sync::Arc;

use super::stream::StreamSetup;
use super::{Event, GenerateParams, Generation, Prompt, TokenStream};
use crate::chat::{ChatEncoder, ChatTemplate, Message, ToolCallFormat};
use crate::error::{Error, Result};
use crate::loader::LoadedModel;
use crate::model::{KvCache, Model};
use crate::tokenizer::Tokenizer;

/// Generates from one model. Cheap to clone. Each stream takes its own clone of the model when it
/// starts; [`Generator::set_model`] affects only streams started afterwards.
#[derive(Debug, Clone)]
pub struct Generator {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    /// The compiled chat template, or why chat is unavailable.
    template: std::result::Result<Arc<ChatTemplate>, String>,
    encoder: Arc<ChatEncoder>,
    eos: Vec<u32>,
}

impl Generator {
    /// A generator over `model` and `tokenizer`. A missing or broken chat template is not an error
    /// here: plain prompts still work, and chat prompts report why they cannot be rendered.
    pub fn new(model: &Model, tokenizer: &Tokenizer) -> Self {
        let template = match ChatTemplate::from_tokenizer(tokenizer) {
            Ok(t) => Ok(Arc::new(t)),
            Err(Error::ChatTemplate { reason }) => Err(reason),
            Err(e) => Err(e.to_string()),
        };
        let mut eos = tokenizer.eos_token_ids().to_vec();
        for id in &model.config().eos_token_ids {
            if !eos.contains(id) {
                eos.push(*id);
            }
        }
        Self {
            model: model.clone(),
            tokenizer: Arc::new(tokenizer.clone()),
            template,
            encoder: Arc::new(ChatEncoder::new()),
            eos,
        }
    }

    /// A generator for a loaded model. Errors: [`Error::InvalidParameter`] (`tokenizer`) when the
    /// model came without a tokenizer.
    pub fn from_loaded(loaded: &LoadedModel) -> Result<Self> {
        let tok = loaded.tokenizer.as_ref().ok_or_else(|| Error::InvalidParameter {
            name: "tokenizer",
            reason: "the model has no tokenizer (no tokenizer.json beside it, none in the GGUF)".into(),
        })?;
        Ok(Self::new(&loaded.model, tok))
    }

    /// The model new streams will clone.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Replaces the model for streams started from now on (running streams keep theirs).
    pub fn set_model(&mut self, model: Model) {
        self.model = model;
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub(crate) fn tokenizer_arc(&self) -> Arc<Tokenizer> {
        Arc::clone(&self.tokenizer)
    }

    /// End-of-sequence ids: the tokenizer's (tokenizer_config.json, generation_config.json, GGUF)
    /// and the model config's.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The chat template. Errors: [`Error::ChatTemplate`] saying why there is none.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.template.as_deref().map_err(|reason| Error::ChatTemplate { reason: reason.clone() })
    }

    /// Token ids of a prompt: text gets the tokenizer's special tokens (BOS); chat messages are
    /// rendered with the generation prompt and tokenized with special-token parsing off inside
    /// contents; ids are returned as they are.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true),
            Prompt::Tokens(ids) => Ok(ids.clone()),
            Prompt::Chat(messages) => self.encode_chat(messages, true),
            Prompt::ChatWithTools { messages, tools } => self.encode_chat_with_tools(messages, tools, true),
        }
    }

    /// Renders and tokenizes a conversation. Errors: [`Error::ChatTemplate`].
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let rendered = self.chat_template()?.render(messages, add_generation_prompt)?;
        self.encode_rendered(&rendered, messages)
    }

    /// Renders a conversation with the functions `tools` and tokenizes it, as the template
    /// teaches tools, or — for a template without tool support — with the tools described in the
    /// system message and calls and results as JSON text ([`crate::chat::tools::generic_messages`];
    /// the reply then follows [`crate::chat::tools::call_constraint`]). Errors:
    /// [`Error::ChatTemplate`].
    pub fn encode_chat_with_tools(&self, messages: &[Message], tools: &[serde_json::Value], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let template = self.chat_template()?;
        if template.tool_call_format().is_some() {
            let rendered = template.render_with_tools(messages, tools, add_generation_prompt)?;
            return self.encode_rendered(&rendered, messages);
        }
        let messages = crate::chat::tools::generic_messages(messages, tools);
        let rendered = template.render(&messages, add_generation_prompt)?;
        self.encode_rendered(&rendered, &messages)
    }

    /// The syntax replies with tool calls are read in: the template's own, else
    /// [`ToolCallFormat::Generic`]. Errors: [`Error::ChatTemplate`] without a template.
    pub fn tool_call_format(&self) -> Result<ToolCallFormat> {
        Ok(self.chat_template()?.tool_call_format().unwrap_or(ToolCallFormat::Generic))
    }

    fn encode_rendered(&self, rendered: &str, messages: &[Message]) -> Result<Vec<u32>> {
        // The caller's text, in the order the template writes it: each message's content, then
        // the strings inside its calls' arguments (templates render them as JSON, where text
        // without quotes or backslashes appears as it is).
        let mut contents: Vec<&str> = Vec::new();
        for m in messages {
            contents.push(&m.content);
            for c in &m.tool_calls {
                json_strings(&c.function.arguments, &mut contents);
            }
        }
        self.encoder.encode(&self.tokenizer, rendered, &contents)
    }

    /// Starts generating from `prompt`. Nothing runs until the stream is iterated.
    ///
    /// Errors: invalid `params` ([`Error::InvalidParameter`] naming the parameter), a prompt at or
    /// over the context ([`Error::ContextOverflow`]), a chat prompt without a template.
    pub fn stream(&self, prompt: impl Into<Prompt>, params: &GenerateParams) -> Result<TokenStream> {
        params.validate()?;
        let ids = self.encode(&prompt.into())?;
        self.stream_with_cache(ids, self.model.new_cache(), params)
    }

    /// Starts generating from `ids` with a `cache` that already holds the keys/values of
    /// `ids[..cache.seq_len()]` (the caller guarantees they were computed by this model for these
    /// ids); only the rest is prefilled.
    pub fn stream_with_cache(&self, ids: Vec<u32>, cache: KvCache, params: &GenerateParams) -> Result<TokenStream> {
        let mut eos = self.eos.clone();
        eos.extend(params.eos_token_ids.iter().filter(|id| !self.eos.contains(id)));
        TokenStream::new(StreamSetup {
            model: self.model.clone(),
            tokenizer: Arc::clone(&self.tokenizer),
            prompt: ids,
            cache,
            params: params.clone(),
            eos,
        })
    }

    /// Generates to the end and returns the whole text.
    pub fn generate(&self, prompt: impl Into<Prompt>, params: &GenerateParams) -> Result<Generation> {
        collect_events(self.stream(prompt, params)?)
    }

    /// [`Generator::stream`] as an async `Stream`; the model runs on tokio's blocking pool.
    /// Dropping the stream cancels the generation before its next token.
    ///
    /// Errors: as [`Generator::stream`]; [`Error::InvalidParameter`] (`runtime`) outside a tokio
    /// runtime.
    #[cfg(feature = "async")]
    pub fn stream_async(&self, prompt: impl Into<Prompt>, params: &GenerateParams) -> Result<super::AsyncTokenStream> {
        super::AsyncTokenStream::spawn(self.stream(prompt, params)?)
    }
}

/// Runs a stream of events to its end, gathering text and ids.
pub(crate) fn collect_events(events: impl Iterator<Item = Result<Event>>) -> Result<Generation> {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    for event in events {
        match event? {
            Event::Token { id, text: t, .. } => {
                text.push_str(&t);
                tokens.push(id);
            }
            Event::Finished(finished) => {
                text.push_str(&finished.text);
                return Ok(Generation { text, tokens, finished });
            }
        }
    }
    Err(Error::InvalidParameter { name: "stream", reason: "ended without a final event".into() })
}

/// The string values inside `v`, in order.
fn json_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}
