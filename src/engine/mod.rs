//! The batch-first engine: many sequences served by one model, stepped together.
//!
//! An [`Engine`] owns a model, a [`KvPool`] of [`EngineConfig::max_sequences`] slots and a
//! scheduler on its own thread. [`Engine::submit`] validates a request on the caller's thread
//! (bad parameters and prompts that do not fit the context are errors right away, before
//! anything is queued) and returns a [`RequestHandle`]: an iterator of the same [`Event`]s a
//! [`crate::generation::TokenStream`] yields. Each step of the scheduler mixes one decode row for
//! every running sequence with chunks of the prompts still being read (at most
//! [`EngineConfig::max_step_tokens`] tokens a step), so a long prompt never stalls running
//! streams. A new request continues the free slot whose cached tokens share the longest prefix
//! with its prompt, so a conversation re-sent in full prefills only its new tokens. `n > 1`
//! prefills once and forks. Requests may carry their own adapter variant of the model
//! ([`crate::SharedModel::snapshot`]); rows with different adapters run in the same step.
//!
//! Dropping a handle (or [`CancelHandle::cancel`]) frees its slot within one step. A full queue
//! is [`Error::QueueFull`].
//!
//! ```no_run
//! use metal_candle::engine::{Engine, EngineConfig};
//! use metal_candle::generation::{Event, GenerateParams, Generator};
//! # fn main() -> metal_candle::Result<()> {
//! let loaded = metal_candle::load_model("model.gguf".as_ref(), &Default::default())?;
//! let engine = Engine::new(Generator::from_loaded(&loaded)?, EngineConfig::default())?;
//! let params = GenerateParams { max_tokens: 16, ..GenerateParams::default() };
//! let a = engine.submit("The capital of France is", &params)?;
//! let b = engine.submit("Two plus two is", &params)?; // runs in the same steps as `a`
//! for handle in [a, b] {
//!     let generation = handle.collect_generation()?;
//!     println!("{}", generation.text);
//! }
//! # Ok(()) }
//! ```

pub(crate) mod core;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

pub use self::core::EngineStats;
use self::core::{Admission, EngineCore, Sink};
use crate::error::{Error, Result};
use crate::generation::sequence::{Sequence, SequenceSetup};
use crate::generation::{collect_events, CancelHandle, Event, GenerateParams, Generation, Generator, Prompt};
use crate::model::{KvPool, Model};

/// Limits of an [`Engine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences running at once (KV slots). At least 1.
    pub max_sequences: usize,
    /// Tokens one forward pass may carry (decode rows plus prefill chunks); at least
    /// `max_sequences + 1`, so prompts always make progress.
    pub max_step_tokens: usize,
    /// Requests that may wait for a slot; one more is [`Error::QueueFull`].
    pub max_queue: usize,
    /// Positions per sequence (prompt + generated); `None` is the model's
    /// [`Model::max_positions`]. Never divided among sequences.
    pub context: Option<usize>,
    /// Most forks one request may ask for (`n`).
    pub max_n: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_sequences: 4, max_step_tokens: 512, max_queue: 64, context: None, max_n: 8 }
    }
}

impl EngineConfig {
    /// Checks the limits. Errors: [`Error::InvalidParameter`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, reason: String| Err(Error::InvalidParameter { name, reason });
        if self.max_sequences == 0 {
            return bad("max_sequences", "must be at least 1".into());
        }
        if self.max_step_tokens <= self.max_sequences {
            return bad(
                "max_step_tokens",
                format!("{} must exceed max_sequences ({})", self.max_step_tokens, self.max_sequences),
            );
        }
        if self.context == Some(0) || self.context == Some(1) {
            return bad("context", "must be at least 2".into());
        }
        if self.max_n == 0 {
            return bad("max_n", "must be at least 1".into());
        }
        Ok(())
    }
}

/// One request: a prompt, its settings, and optionally the model variant (adapters) to run it
/// with and the number of continuations.
#[derive(Debug, Clone)]
pub struct Request {
    /// What to continue.
    pub prompt: Prompt,
    /// Sampling and stopping.
    pub params: GenerateParams,
    /// A clone of the engine's model with other adapters attached; `None` is the engine's model.
    pub model: Option<Model>,
    /// Continuations of the one prefilled prompt (OpenAI `n`); fork i samples with seed
    /// `params.sampling.seed + i`.
    pub n: usize,
}

impl Request {
    /// One continuation of `prompt` with `params` on the engine's model.
    pub fn new(prompt: impl Into<Prompt>, params: &GenerateParams) -> Self {
        Self { prompt: prompt.into(), params: params.clone(), model: None, n: 1 }
    }
}

enum Command {
    Submit(Admission),
}

/// A model served to many callers at once. See the [module docs](self).
pub struct Engine {
    generator: Generator,
    config: EngineConfig,
    context: usize,
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    waiting: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
}

impl Engine {
    /// Starts the scheduler thread for `generator`'s model. Errors: an invalid `config`.
    pub fn new(generator: Generator, config: EngineConfig) -> Result<Self> {
        config.validate()?;
        let model = generator.model().clone();
        let context = config.context.unwrap_or(model.max_positions()).min(model.max_positions());
        let pool = model.new_pool(config.max_sequences, context);
        let waiting = Arc::new(AtomicUsize::new(0));
        let core = EngineCore::new(model, pool, Vec::new(), config.max_step_tokens).with_waiting_count(Arc::clone(&waiting));
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(EngineStats { slots: config.max_sequences, ..EngineStats::default() }));
        let thread = std::thread::Builder::new()
            .name("metal-candle-engine".into())
            .spawn({
                let stats = Arc::clone(&stats);
                move || run(core, rx, &stats)
            })
            .map_err(|e| Error::io("engine thread", e))?;
        Ok(Self {
            generator,
            config,
            context,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            waiting,
            stats,
        })
    }

    /// The generator (model, tokenizer, chat template) requests are encoded with.
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The limits the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Positions per sequence (prompt + generated).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Running and waiting sequences, as of the last step.
    pub fn stats(&self) -> EngineStats {
        let mut s = *self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        s.waiting = self.waiting.load(Ordering::Relaxed);
        s
    }

    /// Queues one generation of `prompt`. See [`Engine::submit_request`].
    pub fn submit(&self, prompt: impl Into<Prompt>, params: &GenerateParams) -> Result<RequestHandle> {
        let mut handles = self.submit_request(Request::new(prompt, params))?;
        handles.pop().ok_or(Error::EngineStopped)
    }

    /// Queues `request`, returning one handle per continuation (`n`). Validation happens here:
    /// invalid parameters ([`Error::InvalidParameter`]), a prompt that does not fit the context
    /// ([`Error::ContextOverflow`]), a variant of another model ([`Error::InvalidBatch`]), a full
    /// queue ([`Error::QueueFull`]), a stopped engine ([`Error::EngineStopped`]).
    pub fn submit_request(&self, request: Request) -> Result<Vec<RequestHandle>> {
        self.submit_with(request, channel)
    }

    /// [`Engine::submit_request`] with async streams fed by the scheduler directly (feature
    /// `async`): no thread waits per request, so a server holds thousands of open streams
    /// cheaply. Dropping a stream cancels its sequence.
    #[cfg(feature = "async")]
    pub fn submit_async(&self, request: Request) -> Result<Vec<crate::generation::AsyncTokenStream>> {
        self.submit_with(request, |seq| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let sink: Sink = Box::new(move |event| tx.send(event).is_ok());
            (crate::generation::AsyncTokenStream::from_channel(rx, seq.cancel_handle(), seq.tokens().len()), sink)
        })
    }

    fn submit_with<H>(&self, request: Request, channel: impl Fn(&Sequence) -> (H, Sink)) -> Result<Vec<H>> {
        let Request { prompt, params, model, n } = request;
        if n == 0 || n > self.config.max_n {
            return Err(Error::InvalidParameter { name: "n", reason: format!("{n}: must be 1..={}", self.config.max_n) });
        }
        if n > self.config.max_sequences {
            return Err(Error::InvalidParameter {
                name: "n",
                reason: format!("{n} continuations need {n} slots; the engine has {}", self.config.max_sequences),
            });
        }
        if let Some(m) = &model {
            if m.uid() != self.generator.model().uid() {
                return Err(Error::InvalidBatch { reason: "the request's model is not a variant of the engine's".into() });
            }
        }
        params.validate()?;
        let ids = self.generator.encode(&prompt)?;
        let mut seq = self.sequence(ids, &params)?;
        seq.start_clock();
        let (primary_handle, sink) = channel(&seq);
        let mut handles = vec![primary_handle];
        let mut forks = Vec::with_capacity(n - 1);
        for i in 1..n {
            let f = seq.fork(params.sampling.seed.wrapping_add(i as u64))?;
            let (h, s) = channel(&f);
            handles.push(h);
            forks.push((f, s));
        }
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = tx.as_ref().ok_or(Error::EngineStopped)?;
        let queued = self.waiting.fetch_add(1, Ordering::Relaxed);
        if queued >= self.config.max_queue {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::QueueFull { limit: self.config.max_queue });
        }
        if tx.send(Command::Submit(Admission { seq, sink, variant: model, forks })).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::EngineStopped);
        }
        Ok(handles)
    }

    fn sequence(&self, prompt: Vec<u32>, params: &GenerateParams) -> Result<Sequence> {
        let g = &self.generator;
        let mut eos = g.eos_token_ids().to_vec();
        eos.extend(params.eos_token_ids.iter().filter(|id| !g.eos_token_ids().contains(id)));
        Sequence::new(SequenceSetup {
            tokenizer: g.tokenizer_arc(),
            prompt,
            params: params.clone(),
            eos,
            model_vocab: g.model().config().vocab_size,
            context: self.context,
        })
    }

    /// Stops accepting requests, cancels the running ones (each gets its final event) and joins
    /// the scheduler thread. Called by `Drop`.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("config", &self.config).field("stats", &self.stats()).finish()
    }
}

/// The scheduler loop: block while idle, otherwise step; on shutdown cancel what runs and drain.
fn run(mut core: EngineCore, rx: mpsc::Receiver<Command>, stats: &Mutex<EngineStats>) {
    let mut open = true;
    loop {
        if open && core.is_idle() {
            match rx.recv() {
                Ok(Command::Submit(a)) => core.enqueue(a),
                Err(_) => open = false,
            }
        }
        while open {
            match rx.try_recv() {
                Ok(Command::Submit(a)) => core.enqueue(a),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        if !open {
            core.cancel_all();
        }
        if core.is_idle() && !open {
            break;
        }
        core.step();
        *stats.lock().unwrap_or_else(PoisonError::into_inner) = core.stats();
    }
}

/// A sink sending into a channel, and the handle reading it.
fn channel(seq: &Sequence) -> (RequestHandle, Sink) {
    let (tx, rx) = mpsc::channel();
    let sink: Sink = Box::new(move |event| tx.send(event).is_ok());
    (RequestHandle { rx, cancel: seq.cancel_handle(), done: false }, sink)
}

/// The events of one submitted sequence: the same [`Event`]s as a
/// [`crate::generation::TokenStream`], then `None`. Iterating blocks until the engine produces
/// the next event. Dropping the handle cancels the sequence and frees its slot.
pub struct RequestHandle {
    rx: mpsc::Receiver<Result<Event>>,
    cancel: CancelHandle,
    done: bool,
}

impl RequestHandle {
    /// A handle that stops the sequence before its next token.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Runs to the end and returns the whole text.
    pub fn collect_generation(self) -> Result<Generation> {
        collect_events(self)
    }

    /// The same events as an async `Stream` (feature `async`): a blocking tokio thread waits for
    /// them. Dropping the stream cancels the sequence. Errors: [`Error::InvalidParameter`]
    /// (`runtime`) outside a tokio runtime.
    #[cfg(feature = "async")]
    pub fn into_async(self) -> Result<crate::generation::AsyncTokenStream> {
        let cancel = self.cancel.clone();
        crate::generation::AsyncTokenStream::spawn_events(self, cancel)
    }

    /// The next event if one is ready, without blocking: `Ok(None)` when none is yet.
    pub fn try_next(&mut self) -> Option<Result<Event>> {
        if self.done {
            return None;
        }
        match self.rx.try_recv() {
            Ok(e) => Some(self.note(e)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.done = true;
                Some(Err(Error::EngineStopped))
            }
        }
    }

    fn note(&mut self, event: Result<Event>) -> Result<Event> {
        if matches!(event, Err(_) | Ok(Event::Finished(_))) {
            self.done = true;
        }
        event
    }
}

impl Iterator for RequestHandle {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(e) => Some(self.note(e)),
            Err(_) => {
                self.done = true;
                Some(Err(Error::EngineStopped))
            }
        }
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            self.cancel.cancel();
        }
    }
}

/// The pool and its held tokens for a one-sequence driver (see `generation::stream`).
pub(crate) fn single_core(model: Model, pool: KvPool, held: Vec<u32>) -> EngineCore {
    EngineCore::new(model, pool, vec![held], usize::MAX)
}
