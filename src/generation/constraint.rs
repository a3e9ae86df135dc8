//! Constrained decoding: a grammar (JSON, a JSON Schema, a regular expression or a Lark grammar)
//! masks the logits of every step so that the output always matches it. The grammar engine is
//! [llguidance](https://github.com/guidance-ai/llguidance), the one llama.cpp, vLLM and mistral.rs
//! use; this module gives it the model's vocabulary (as bytes) and keeps one matcher per
//! sequence, so rows of one batch follow different grammars.

use std::sync::{mpsc, Arc, Mutex, PoisonError};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "value")]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    Json,
    /// JSON valid under this JSON Schema (`{"type": "json_schema", ...}`).
    JsonSchema(Value),
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Text of this Lark-style grammar (llguidance's dialect; it may embed `%json` and regexes).
    Lark(String),
}

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::Json => TopLevelGrammar::from_json_schema(one_line(serde_json::json!({"type": "object"}))),
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(one_line(schema.clone())),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// JSON is written on one line with `json.dumps`' separators (`", "`, `": "`), unless the schema
/// brings its own llguidance options (`"x-guidance"`): free whitespace lets a sampled model pad
/// an object with newlines until it runs out of tokens.
fn one_line(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    schema
}

fn invalid(reason: impl std::fmt::Display) -> Error {
    Error::InvalidParameter { name: "constraint", reason: reason.to_string() }
}

/// The grammar engine's view of one tokenizer: every id's bytes in a trie (special tokens marked
/// as llguidance expects, so a grammar never produces them by accident). Built once per
/// (tokenizer, vocabulary size, EOS) and shared by every sequence.
#[derive(Clone)]
pub(crate) struct ConstraintFactory(Arc<ParserFactory>, u32);

impl std::fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConstraintFactory")
    }
}

/// The factory a tokenizer built last, by (vocabulary, EOS id).
#[derive(Debug, Clone, Default)]
pub(crate) struct FactoryCache(Arc<Mutex<Option<(usize, u32, ConstraintFactory)>>>);

impl FactoryCache {
    /// The factory for `tok` with `vocab` ids and end-of-sequence `eos`, built on first use.
    pub fn get(&self, tok: &Tokenizer, vocab: usize, eos: u32) -> Result<ConstraintFactory> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((v, e, f)) = slot.as_ref() {
            if *v == vocab && *e == eos {
                return Ok(f.clone());
            }
        }
        let f = ConstraintFactory::new(tok, vocab, eos)?;
        *slot = Some((vocab, eos, f.clone()));
        Ok(f)
    }
}

impl ConstraintFactory {
    fn new(tok: &Tokenizer, vocab: usize, eos: u32) -> Result<Self> {
        let specials = tok.inner().get_added_tokens_decoder();
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| match specials.get(&id) {
                Some(t) if t.special => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], t.content.as_bytes()].concat(),
                _ => tok.token_bytes(id).unwrap_or_default(),
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(invalid)?;
        factory.quiet();
        Ok(Self(Arc::new(factory), eos))
    }

    /// A matcher for `c`, whose first mask starts computing at once (while the prompt is
    /// prefilled). Errors: [`Error::InvalidParameter`] `constraint` for a grammar or schema
    /// llguidance rejects, with its reason.
    pub fn matcher(&self, c: &Constraint) -> Result<ConstraintState> {
        let parser = self.0.create_parser(c.grammar());
        let matcher = Matcher::new(parser);
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        ConstraintState::spawn(matcher, self.1)
    }
}

/// A mask, or why the grammar engine could not compute it.
type MaskReply = std::result::Result<SimpleVob, String>;

/// One sequence's position in its grammar.
///
/// A worker thread of its own computes the next mask as soon as a token is accepted: the mask of
/// step t+1 is computed while the model runs the forward of step t+1, off the critical path
/// (llguidance takes ≈0.15 ms for 49k ids, ≈0.45 ms for 152k: a noticeable part of a GPU decode
/// step), and the rows of a batch compute theirs in parallel. Accepting a token runs on the
/// caller's thread (microseconds; it tells at once whether the grammar is complete), under a lock
/// the worker never holds then: it only computes after an accept asked it to, and the caller
/// accepts only once that mask has arrived. The worker ends when the state is dropped.
pub(crate) struct ConstraintState {
    matcher: Arc<Mutex<Matcher>>,
    /// One message per mask wanted.
    compute: mpsc::Sender<()>,
    masks: mpsc::Receiver<MaskReply>,
    /// This step's mask, once received (masking the same step again reuses it).
    current: Option<SimpleVob>,
    stopped: bool,
    /// The one id allowed once the grammar stopped.
    eos: u32,
    /// Why the grammar engine failed; every later call reports it.
    broken: Option<String>,
}

fn worker_gone() -> Error {
    Error::Constraint { reason: "the grammar worker thread ended unexpectedly".into() }
}

impl ConstraintState {
    fn spawn(matcher: Matcher, eos: u32) -> Result<Self> {
        let matcher = Arc::new(Mutex::new(matcher));
        let (compute, wanted) = mpsc::channel::<()>();
        let (outbox, masks) = mpsc::channel::<MaskReply>();
        let shared = Arc::clone(&matcher);
        std::thread::Builder::new()
            .name("metal-candle-grammar".into())
            .spawn(move || {
                // Ends when the state is dropped (the sender closes) or its masks are no longer
                // read.
                while wanted.recv().is_ok() {
                    let mask = shared.lock().unwrap_or_else(PoisonError::into_inner).compute_mask_or_eos().map_err(|e| e.to_string());
                    if outbox.send(mask).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Constraint { reason: format!("cannot start the grammar worker thread: {e}") })?;
        compute.send(()).map_err(|_| worker_gone())?;
        Ok(Self { matcher, compute, masks, current: None, stopped: false, eos, broken: None })
    }

    fn failed(&self) -> Result<()> {
        match &self.broken {
            Some(reason) => Err(Error::Constraint { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// This step's mask: the one already received, else the worker's next reply.
    fn current_mask(&mut self) -> Result<&SimpleVob> {
        if self.current.is_none() {
            match self.masks.recv().map_err(|_| worker_gone())? {
                Ok(m) => self.current = Some(m),
                Err(reason) => {
                    self.broken = Some(reason.clone());
                    return Err(Error::Constraint { reason });
                }
            }
        }
        self.current.as_ref().ok_or_else(worker_gone)
    }

    /// Sets every logit the grammar forbids next to −∞ (the end-of-sequence id stays allowed
    /// once the grammar accepts; once it is complete, only end of sequence is). Waits for the
    /// worker's mask if it is not ready yet; masking the same step again reuses it.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        self.failed()?;
        if self.stopped {
            for (i, l) in logits.iter_mut().enumerate() {
                if i != self.eos as usize {
                    *l = f32::NEG_INFINITY;
                }
            }
            return Ok(());
        }
        let mask = self.current_mask()?;
        let n = logits.len();
        mask.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        // Ids beyond the mask (a model vocabulary larger than the tokenizer's) are never allowed.
        for l in logits.iter_mut().skip(mask.len()) {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Advances past `token` (never an end-of-sequence id); the worker starts on the next mask.
    /// A token this step's mask forbids is an error that leaves the step as it was.
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.failed()?;
        if self.stopped {
            return Err(Error::Constraint { reason: format!("token {token} after the grammar completed") });
        }
        let mask = self.current_mask()?;
        if (token as usize) >= mask.len() || !mask.is_allowed(token) {
            return Err(Error::Constraint { reason: format!("token {token} is not allowed by the grammar here") });
        }
        self.current = None;
        let mut matcher = self.matcher.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = matcher.consume_token(token) {
            let reason = e.to_string();
            self.broken = Some(reason.clone());
            return Err(Error::Constraint { reason });
        }
        self.stopped = matcher.is_stopped();
        drop(matcher);
        if !self.stopped {
            self.compute.send(()).map_err(|_| worker_gone())?;
        }
        Ok(())
    }

    /// The grammar is complete and admits nothing more.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
}

/// A [`Constraint`] applied by hand, for callers with their own decoding loop (the generator and
/// the engine use the same code through [`crate::generation::GenerateParams::constraint`]): mask
/// the logits, sample, accept the sampled id, until [`is_stopped`](Self::is_stopped) or an
/// end-of-sequence id is sampled. The next mask is computed on a worker thread from the moment
/// an id is accepted, so run the next forward pass right after [`accept`](Self::accept): the
/// grammar's work then overlaps it.
pub struct ConstraintMatcher(ConstraintState);

impl std::fmt::Debug for ConstraintMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConstraintMatcher")
    }
}

impl ConstraintMatcher {
    /// A matcher for `constraint` over the first `vocab` ids of `tokenizer` (a model's vocabulary
    /// may be larger than its tokenizer's: ids past the tokenizer's are never allowed), with
    /// end-of-sequence id `eos`. The vocabulary trie is built once per tokenizer and shared.
    ///
    /// Errors: [`Error::InvalidParameter`] `constraint` for a grammar or schema llguidance
    /// rejects.
    pub fn new(tokenizer: &Tokenizer, vocab: usize, eos: u32, constraint: &Constraint) -> Result<Self> {
        Ok(Self(tokenizer.constraint_factory(vocab, eos)?.matcher(constraint)?))
    }

    /// Sets every logit the grammar forbids next to −∞ (end of sequence stays allowed once the
    /// grammar accepts). Errors: [`Error::Constraint`] when the grammar engine fails.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        self.0.mask(logits)
    }

    /// Advances past `token` (not an end-of-sequence id). Errors: [`Error::Constraint`] for a
    /// token the grammar does not allow here (the step stays as it was: mask and accept again).
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.0.accept(token)
    }

    /// The grammar is complete and admits nothing more.
    pub fn is_stopped(&self) -> bool {
        self.0.is_stopped()
    }
}
