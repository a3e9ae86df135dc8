//! The generation engine: prompt → tokens → streamed text.
//!
//! A [`Generator`] wraps a loaded [`crate::Model`] and its [`crate::Tokenizer`]. Its input is text,
//! token ids or chat messages ([`Prompt`]); its output is a [`TokenStream`], an `Iterator` of
//! [`Event`]s: one [`Event::Token`] per sampled token with the text it releases (empty while bytes
//! or a possible stop string are held back) and optional log-probabilities, then one
//! [`Event::Finished`] with the [`FinishReason`] and [`Timings`]. [`Generator::generate`] runs a
//! stream to the end and returns the whole text. With feature `async`,
//! [`Generator::stream_async`] gives the same events as a `futures_core::Stream` whose model
//! forward runs on a blocking thread.
//!
//! A stream clones the model when it starts and uses only that clone, so a model swapped in later
//! (e.g. with another adapter set) does not affect a generation already running.
//!
//! ```no_run
//! use metal_candle::generation::{Event, GenerateParams, Generator};
//! # fn main() -> metal_candle::Result<()> {
//! let loaded = metal_candle::load_model("model.gguf".as_ref(), &Default::default())?;
//! let generator = Generator::from_loaded(&loaded)?;
//! let params = GenerateParams { max_tokens: 32, ..GenerateParams::default() };
//! for event in generator.stream("The capital of France is", &params)? {
//!     match event? {
//!         Event::Token { text, .. } => print!("{text}"),
//!         Event::Finished(done) => println!("\n[{:?}, {:.1} tok/s]", done.reason, done.timings.decode_tokens_per_s),
//!     }
//! }
//! # Ok(()) }
//! ```

#[cfg(feature = "async")]
mod async_stream;
pub(crate) mod constraint;
pub mod defaults;
pub mod detokenizer;
mod generator;
pub(crate) mod sequence;
pub mod stop;
mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::error::{Error, Result};
pub use crate::sampling::{SamplingParams, TokenLogprobs};

#[cfg(feature = "async")]
pub use async_stream::AsyncTokenStream;
pub use constraint::{Constraint, ConstraintMatcher};
pub use detokenizer::StreamDecoder;
pub(crate) use generator::collect_events;
pub use generator::Generator;
pub use stop::{StopMatcher, StopOutcome};
pub use stream::TokenStream;

/// Most alternatives [`GenerateParams::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Settings of one generation. Defaults: greedy, 256 tokens, no stop strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateParams {
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Most tokens to generate (≥ 1). Generation also ends at the context length.
    pub max_tokens: usize,
    /// Generation ends before any of these strings; they are never emitted. Not empty.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// End-of-sequence ids in addition to the model's (tokenizer, config, generation_config.json).
    pub eos_token_ids: Vec<u32>,
    /// Report log-probabilities: `Some(n)` gives the chosen token's and the `n` best
    /// (n ≤ [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// The output must match this grammar (JSON, a JSON Schema, a regex, a Lark grammar): each
    /// step's logits are masked to the tokens it allows. A grammar that does not compile is an
    /// [`Error::InvalidParameter`] `constraint` when the generation is created.
    pub constraint: Option<Constraint>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            eos_token_ids: Vec::new(),
            logprobs: None,
            constraint: None,
        }
    }
}

impl GenerateParams {
    /// Checks every setting; the error names the parameter ([`Error::InvalidParameter`]).
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.max_tokens == 0 {
            return Err(Error::InvalidParameter { name: "max_tokens", reason: "must be at least 1".into() });
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidParameter { name: "stop", reason: "stop strings must not be empty".into() });
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::InvalidParameter {
                name: "logprobs",
                reason: format!("{n} alternatives asked, at most {MAX_TOP_LOGPROBS}"),
            });
        }
        Ok(())
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (BOS) added.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
    /// A conversation, rendered with the model's chat template (generation prompt added) and
    /// tokenized with special-token parsing off inside message contents.
    Chat(Vec<Message>),
    /// A conversation with functions the model may call (`tools` in the OpenAI / transformers
    /// shape), rendered like transformers' `apply_chat_template(messages, tools=tools)`; the
    /// reply's calls are read back with [`crate::chat::ToolCallFormat::parse`].
    ChatWithTools {
        /// The conversation, tool calls and tool results included.
        messages: Vec<Message>,
        /// `{"type": "function", "function": {"name", "description", "parameters"}}` each.
        tools: Vec<serde_json::Value>,
    },
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_string())
    }
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Prompt::Text(text)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::Tokens(ids)
    }
}

impl From<Vec<Message>> for Prompt {
    fn from(messages: Vec<Message>) -> Self {
        Prompt::Chat(messages)
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop string appeared.
    Stop,
    /// `max_tokens` were generated, or the context is full.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
    /// [`CancelHandle::cancel`] was called (or the async stream was dropped).
    Cancelled,
}

impl FinishReason {
    /// `"stop"`, `"length"`, `"eos"` or `"cancelled"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Counts and speeds of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys/values were reused from a cache (not prefilled again).
    pub cached_tokens: usize,
    /// Tokens sampled (the end-of-sequence token included).
    pub generated_tokens: usize,
    /// Time from the start of the stream to the first sampled token.
    pub ttft: Duration,
    /// Time spent in the prefill forward pass.
    pub prefill: Duration,
    /// Time from the first sampled token to the last.
    pub decode: Duration,
    /// Prefilled tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Tokens per second after the first (the first comes out of the prefill).
    pub decode_tokens_per_s: f64,
}

/// The end of a stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Text that was held back until the end (a possible stop-string prefix that was not one, or an
    /// incomplete character rendered as U+FFFD). Usually empty; part of the generated text.
    pub text: String,
    /// Counts and speeds.
    pub timings: Timings,
}

/// One item of a [`TokenStream`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token (never an end-of-sequence token unless `ignore_eos`).
    Token {
        /// The token id.
        id: u32,
        /// Text this token releases; may be empty while bytes or a stop-string prefix are held.
        text: String,
        /// Log-probabilities, when asked for.
        logprobs: Option<TokenLogprobs>,
    },
    /// The last event.
    Finished(Finished),
}

/// The result of [`Generator::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// All generated text (the concatenation of every event's text).
    pub text: String,
    /// Generated token ids (no end-of-sequence token unless `ignore_eos`).
    pub tokens: Vec<u32>,
    /// Why it ended, and timings.
    pub finished: Finished,
}

/// Stops a running stream before its next token. Cloneable and shareable across threads.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// Asks the stream to finish with [`FinishReason::Cancelled`] before sampling another token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelHandle::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
