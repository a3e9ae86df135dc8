//! Several models served by name: each a lazily loaded [`Engine`], at most
//! [`RegistryConfig::models_max`] at once, least recently used idle ones unloaded to make room,
//! idle ones unloaded after [`RegistryConfig::ttl`]. LoRA adapters are models too (vLLM's
//! convention): the name `sql` serves its base model with the `sql` adapter attached, in the same
//! engine (and the same batches) as the base and its other adapters.
//!
//! [`ModelRegistry::acquire`] hands out a [`Lease`]: the engine and the model variant to submit
//! with. A model with a lease outstanding (a request running or queued) is never unloaded. Two
//! concurrent first requests for one model share one load. The registry knows nothing of HTTP;
//! `metal-candle serve` puts it behind an OpenAI-compatible API.
//!
//! ```no_run
//! use metal_candle::registry::{ModelRegistry, ModelSource, RegistryConfig};
//! use metal_candle::generation::GenerateParams;
//! # fn main() -> metal_candle::Result<()> {
//! let config = RegistryConfig {
//!     models: vec![ModelSource::new("smol", "SmolLM2-135M-Instruct.Q4_1.gguf")],
//!     ..RegistryConfig::default()
//! };
//! let registry = ModelRegistry::new(config)?;
//! let lease = registry.acquire(Some("smol"))?; // loads the model on first use
//! let handle = lease.submit("The capital of France is".into(), &GenerateParams::default(), 1)?;
//! # let _ = handle; Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::adapter::{AdapterOptions, ApplyAdapter, LoraAdapter};
use crate::embed::EmbeddingModel;
use crate::engine::{Engine, EngineConfig, EngineStats, Request, RequestHandle};
use crate::error::{Error, Result};
use crate::generation::defaults::ChatDefaults;
use crate::generation::{GenerateParams, Generator, Prompt};
use crate::loader::{load_model, LoadOptions};
use crate::model::Model;

/// A model to serve: its name and a GGUF file or HF model directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    /// The id clients ask for.
    pub name: String,
    /// A GGUF file or a directory with `config.json` + safetensors.
    pub path: PathBuf,
}

impl ModelSource {
    /// `name` served from `path`.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), path: path.into() }
    }

    /// Named after the file or directory stem (`qwen.Q4_0.gguf` → `qwen.Q4_0`).
    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self { name: stem(&path), path }
    }
}

/// A LoRA adapter served as a model of its own: `name` runs `base` with the adapter at `scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSource {
    /// The id clients ask for.
    pub name: String,
    /// A PEFT directory or a llama.cpp GGUF adapter.
    pub path: PathBuf,
    /// The adapter's scale (1 is the trained strength).
    pub scale: f64,
    /// The base model's name; `None` is the first model.
    pub base: Option<String>,
}

/// What the registry serves and how. Configuration as data: built once (from the CLI) and
/// never read from the environment.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Models by name, in order; the first is the default.
    pub models: Vec<ModelSource>,
    /// A directory whose GGUF files and model directories are servable by their stems.
    pub models_dir: Option<PathBuf>,
    /// Adapters served as models.
    pub adapters: Vec<AdapterSource>,
    /// Embedding models (sentence-transformers directories) by name, for `/v1/embeddings`.
    /// Loaded on first use and kept (they are small); not counted in `models_max`.
    pub embedding_models: Vec<ModelSource>,
    /// Most models loaded at once (at least 1).
    pub models_max: usize,
    /// Unload a model idle this long; `None` keeps it.
    pub ttl: Option<Duration>,
    /// How a model loads (device, dtype, context).
    pub load: LoadOptions,
    /// The engine each model runs on (sequences, queue, context per sequence).
    pub engine: EngineConfig,
    /// How long a load waits for a busy model to become unloadable before [`Error::ModelsBusy`].
    pub busy_wait: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            models_dir: None,
            adapters: Vec::new(),
            embedding_models: Vec::new(),
            models_max: 1,
            ttl: None,
            load: LoadOptions::default(),
            engine: EngineConfig::default(),
            busy_wait: Duration::from_secs(30),
        }
    }
}

/// Whether a model is in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStatus {
    /// Loaded (an adapter: its base is loaded).
    Loaded,
    /// Loading now.
    Loading,
    /// Not in memory; the next request loads it.
    Unloaded,
}

impl ModelStatus {
    /// `"loaded"`, `"loading"` or `"unloaded"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Loaded => "loaded",
            ModelStatus::Loading => "loading",
            ModelStatus::Unloaded => "unloaded",
        }
    }
}

/// What a servable id does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A decoder for chat and completions (a base model or an adapter on one).
    Generate,
    /// An embedding model.
    Embed,
}

/// One servable id, as [`ModelRegistry::list`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The id.
    pub id: String,
    /// Generation or embeddings.
    pub kind: ModelKind,
    /// For an adapter, the base model's id.
    pub parent: Option<String>,
    /// Whether it (or its base) is in memory.
    pub status: ModelStatus,
    /// Positions per sequence, once known (after the first load).
    pub context_length: Option<usize>,
    /// Where it loads from.
    pub path: PathBuf,
}

/// A loaded model: its engine and what requests need from it.
pub struct Served {
    engine: Engine,
    defaults: ChatDefaults,
}

impl Served {
    /// The engine requests run on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The model's own sampling defaults for chat replies.
    pub fn chat_defaults(&self) -> &ChatDefaults {
        &self.defaults
    }
}

enum State {
    Unloaded,
    Loading,
    Loaded(Arc<Served>),
}

struct BaseEntry {
    path: PathBuf,
    state: State,
    leases: usize,
    last_used: Instant,
    context_length: Option<usize>,
}

struct AdapterEntry {
    path: PathBuf,
    scale: f64,
    base: String,
    /// The adapter's weights, kept across unloads of the base.
    adapter: Option<Arc<LoraAdapter>>,
    /// The base model with the adapter attached, for the base engine whose model has this uid.
    variant: Option<(u64, Model)>,
}

struct EmbedEntry {
    path: PathBuf,
    /// Locked while loading, so concurrent first requests share one load.
    model: Arc<Mutex<Option<Arc<EmbeddingModel>>>>,
}

struct Inner {
    bases: BTreeMap<String, BaseEntry>,
    adapters: BTreeMap<String, AdapterEntry>,
    embedders: BTreeMap<String, EmbedEntry>,
    order: Vec<String>,
}

struct Shared {
    config: RegistryConfig,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// Models and adapters by name. See the [module docs](self). Cheap to clone (shared state).
#[derive(Clone)]
pub struct ModelRegistry {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry").field("models", &self.list()).finish()
    }
}

/// A model held for one request: the engine, the variant (adapters) to submit with, and a claim
/// that keeps the model loaded until the lease is dropped.
pub struct Lease {
    shared: Arc<Shared>,
    base: String,
    served: Arc<Served>,
    variant: Option<Model>,
}

impl Lease {
    /// The base model's name.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The loaded model.
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.served.engine
    }

    /// The generator (tokenizer, chat template) prompts are encoded with.
    pub fn generator(&self) -> &Generator {
        self.served.engine.generator()
    }

    /// Submits `prompt` with this lease's adapters; `n` continuations. Errors: as
    /// [`Engine::submit_request`].
    pub fn submit(&self, prompt: Prompt, params: &GenerateParams, n: usize) -> Result<Vec<RequestHandle>> {
        self.served.engine.submit_request(self.request(prompt, params, n))
    }

    /// `prompt` as a request with this lease's adapters.
    fn request(&self, prompt: Prompt, params: &GenerateParams, n: usize) -> Request {
        Request { prompt, params: params.clone(), model: self.variant.clone(), n }
    }

    /// [`Lease::submit`] with async streams fed by the scheduler (feature `async`). See
    /// [`Engine::submit_async`].
    #[cfg(feature = "async")]
    pub fn submit_async(&self, prompt: Prompt, params: &GenerateParams, n: usize) -> Result<Vec<crate::generation::AsyncTokenStream>> {
        self.served.engine.submit_async(self.request(prompt, params, n))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if let Some(e) = inner.bases.get_mut(&self.base) {
            e.leases = e.leases.saturating_sub(1);
            e.last_used = Instant::now();
        }
        drop(inner);
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ModelRegistry {
    /// A registry over `config`'s models, the models in `models_dir` and the adapters; nothing is
    /// loaded yet. Errors: [`Error::InvalidParameter`] for no models, `models_max` of 0, a
    /// duplicate or invalid name, an adapter whose base does not exist; [`Error::Io`] for an
    /// unreadable `models_dir`.
    pub fn new(config: RegistryConfig) -> Result<Self> {
        config.engine.validate()?;
        if config.models_max == 0 {
            return Err(invalid("models_max", "must be at least 1".into()));
        }
        let mut sources = config.models.clone();
        if let Some(dir) = &config.models_dir {
            sources.extend(scan_models_dir(dir)?);
        }
        let mut inner = Inner { bases: BTreeMap::new(), adapters: BTreeMap::new(), embedders: BTreeMap::new(), order: Vec::new() };
        for s in sources {
            check_name(&s.name)?;
            if inner.bases.contains_key(&s.name) {
                return Err(invalid("model", format!("two models are named `{}`", s.name)));
            }
            inner.order.push(s.name.clone());
            let entry = BaseEntry { path: s.path, state: State::Unloaded, leases: 0, last_used: Instant::now(), context_length: None };
            inner.bases.insert(s.name, entry);
        }
        for s in &config.embedding_models {
            check_name(&s.name)?;
            if inner.bases.contains_key(&s.name) || inner.embedders.contains_key(&s.name) {
                return Err(invalid("model", format!("two models are named `{}`", s.name)));
            }
            inner.embedders.insert(s.name.clone(), EmbedEntry { path: s.path.clone(), model: Arc::new(Mutex::new(None)) });
        }
        if inner.order.is_empty() && inner.embedders.is_empty() {
            return Err(invalid("model", "no models to serve".into()));
        }
        for a in &config.adapters {
            inner.add_adapter(a)?;
        }
        Ok(Self { shared: Arc::new(Shared { config, inner: Mutex::new(inner), changed: Condvar::new() }) })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &RegistryConfig {
        &self.shared.config
    }

    /// The default model's id (the first).
    pub fn default_model(&self) -> String {
        self.shared.lock().order.first().cloned().unwrap_or_default()
    }

    /// Every servable id: models in order, then adapters.
    pub fn list(&self) -> Vec<ModelInfo> {
        let inner = self.shared.lock();
        let base_info = |id: &str, e: &BaseEntry, parent: Option<String>, path: &Path| ModelInfo {
            id: id.to_string(),
            kind: ModelKind::Generate,
            parent,
            status: match e.state {
                State::Loaded(_) => ModelStatus::Loaded,
                State::Loading => ModelStatus::Loading,
                State::Unloaded => ModelStatus::Unloaded,
            },
            context_length: e.context_length,
            path: path.to_path_buf(),
        };
        let mut out = Vec::new();
        for id in &inner.order {
            if let Some(e) = inner.bases.get(id) {
                out.push(base_info(id, e, None, &e.path));
            }
        }
        for (id, a) in &inner.adapters {
            if let Some(e) = inner.bases.get(&a.base) {
                out.push(base_info(id, e, Some(a.base.clone()), &a.path));
            }
        }
        for (id, e) in &inner.embedders {
            let loaded = e.model.lock().unwrap_or_else(PoisonError::into_inner).clone();
            out.push(ModelInfo {
                id: id.clone(),
                kind: ModelKind::Embed,
                parent: None,
                status: if loaded.is_some() { ModelStatus::Loaded } else { ModelStatus::Unloaded },
                context_length: loaded.map(|m| m.max_seq_length()),
                path: e.path.clone(),
            });
        }
        out
    }

    /// The embedding model `name` (`None`: the first), loaded on first use (concurrent first
    /// callers share one load). Errors: [`Error::ModelNotFound`]; [`Error::InvalidParameter`]
    /// (`model`) when `name` is a chat model; the model's load errors.
    pub fn embedder(&self, name: Option<&str>) -> Result<Arc<EmbeddingModel>> {
        let (slot, path) = {
            let inner = self.shared.lock();
            let name = match name {
                Some(n) => n.to_string(),
                None => inner.embedders.keys().next().cloned().unwrap_or_default(),
            };
            match inner.embedders.get(&name) {
                Some(e) => (Arc::clone(&e.model), e.path.clone()),
                None if inner.bases.contains_key(&name) || inner.adapters.contains_key(&name) => {
                    return Err(invalid("model", format!("`{name}` is a chat/completions model, not an embedding model")))
                }
                None => return Err(Error::ModelNotFound { name, available: inner.embedders.keys().cloned().collect() }),
            }
        };
        let mut model = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = &*model {
            return Ok(Arc::clone(m));
        }
        let loaded = Arc::new(EmbeddingModel::load(&path, &self.shared.config.load)?);
        tracing::info!(path = %path.display(), "embedding model loaded");
        *model = Some(Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Every servable id.
    pub fn ids(&self) -> Vec<String> {
        self.list().into_iter().map(|m| m.id).collect()
    }

    /// The engines' counts, summed over loaded models, and how many are loaded.
    pub fn stats(&self) -> (EngineStats, usize) {
        let inner = self.shared.lock();
        let mut total = EngineStats::default();
        let mut loaded = 0;
        for e in inner.bases.values() {
            if let State::Loaded(s) = &e.state {
                let st = s.engine.stats();
                total.running += st.running;
                total.waiting += st.waiting;
                total.slots += st.slots;
                loaded += 1;
            }
        }
        (total, loaded)
    }

    /// The model (or adapter) `name` held for one request, loading it first if needed; `None`
    /// is the default model. Errors: [`Error::ModelNotFound`]; [`Error::ModelsBusy`] when making
    /// room would unload a busy model; the model's or adapter's load errors.
    pub fn acquire(&self, name: Option<&str>) -> Result<Lease> {
        let name = name.map_or_else(|| self.default_model(), str::to_string);
        let (base, adapter) = {
            let inner = self.shared.lock();
            if inner.bases.contains_key(&name) {
                (name.clone(), None)
            } else if let Some(a) = inner.adapters.get(&name) {
                (a.base.clone(), Some(name.clone()))
            } else if inner.embedders.contains_key(&name) {
                return Err(invalid("model", format!("`{name}` is an embedding model: use /v1/embeddings")));
            } else {
                return Err(Error::ModelNotFound { name, available: inner.ids() });
            }
        };
        let served = self.claim_base(&base)?;
        let mut lease = Lease { shared: Arc::clone(&self.shared), base, served, variant: None };
        if let Some(adapter) = adapter {
            lease.variant = Some(self.variant(&adapter, &lease)?);
        }
        Ok(lease)
    }

    /// Loads `name` now (if it is not loaded) without holding it.
    pub fn preload(&self, name: Option<&str>) -> Result<()> {
        self.acquire(name).map(drop)
    }

    /// Adds (or replaces) the adapter `name` on `base` (`None`: the default model), loading the
    /// base if needed and the adapter's weights now, so a path that does not load is an error
    /// here. Requests already running keep the adapter they started with. Errors: the adapter's
    /// load errors; [`Error::ModelNotFound`] for the base; [`Error::InvalidParameter`] when
    /// `name` is a model's.
    pub fn load_adapter(&self, source: AdapterSource) -> Result<()> {
        check_name(&source.name)?;
        let base = source.base.clone().unwrap_or_else(|| self.default_model());
        let lease = self.acquire(Some(&base))?;
        if lease.variant.is_some() {
            return Err(invalid("base_model", format!("`{base}` is an adapter, not a base model")));
        }
        let adapter = Arc::new(LoraAdapter::load(&source.path, lease.generator().model(), &AdapterOptions::default())?);
        let variant = attach(lease.generator().model(), &source.name, &adapter, source.scale)?;
        let mut inner = self.shared.lock();
        if inner.bases.contains_key(&source.name) || inner.embedders.contains_key(&source.name) {
            return Err(invalid("lora_name", format!("`{}` is a model's name", source.name)));
        }
        let uid = lease.generator().model().uid();
        inner.adapters.insert(
            source.name,
            AdapterEntry {
                path: source.path,
                scale: source.scale,
                base: lease.base.clone(),
                adapter: Some(adapter),
                variant: Some((uid, variant)),
            },
        );
        Ok(())
    }

    /// Stops serving the adapter `name`; requests already running keep it. Errors:
    /// [`Error::ModelNotFound`].
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        let mut inner = self.shared.lock();
        match inner.adapters.remove(name) {
            Some(_) => Ok(()),
            None => {
                let available = inner.adapters.keys().cloned().collect();
                Err(Error::ModelNotFound { name: name.to_string(), available })
            }
        }
    }

    /// Unloads every model idle (no leases) for at least the TTL; returns how many. Call it
    /// periodically; without a TTL it does nothing.
    pub fn unload_idle(&self) -> usize {
        let Some(ttl) = self.shared.config.ttl else { return 0 };
        let mut dropped = Vec::new();
        {
            let mut inner = self.shared.lock();
            for e in inner.bases.values_mut() {
                if e.leases == 0 && matches!(e.state, State::Loaded(_)) && e.last_used.elapsed() >= ttl {
                    if let State::Loaded(s) = std::mem::replace(&mut e.state, State::Unloaded) {
                        dropped.push(s);
                    }
                }
            }
        }
        let n = dropped.len();
        drop(dropped); // engines join their threads outside the lock
        if n > 0 {
            self.shared.changed.notify_all();
        }
        n
    }

    /// Claims a lease on base `name`, loading it (once, shared by concurrent callers) if needed.
    fn claim_base(&self, name: &str) -> Result<Arc<Served>> {
        let deadline = Instant::now() + self.shared.config.busy_wait;
        let mut inner = self.shared.lock();
        loop {
            let e = inner.bases.get_mut(name).ok_or_else(|| Error::ModelNotFound { name: name.to_string(), available: Vec::new() })?;
            match &e.state {
                State::Loaded(s) => {
                    let s = Arc::clone(s);
                    e.leases += 1;
                    e.last_used = Instant::now();
                    return Ok(s);
                }
                State::Loading => inner = self.wait(inner, deadline)?,
                State::Unloaded => {
                    match inner.make_room(self.shared.config.models_max) {
                        Room::Free(evicted) => {
                            if let Some(e) = inner.bases.get_mut(name) {
                                e.state = State::Loading;
                            }
                            drop(inner);
                            drop(evicted);
                            return self.load_base(name);
                        }
                        Room::Busy => inner = self.wait(inner, deadline)?,
                    }
                }
            }
        }
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Inner>, deadline: Instant) -> Result<MutexGuard<'a, Inner>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::ModelsBusy { limit: self.shared.config.models_max });
        }
        let (g, _) = self.shared.changed.wait_timeout(guard, left).unwrap_or_else(PoisonError::into_inner);
        Ok(g)
    }

    /// Loads base `name` (its state is `Loading`, set by the caller) and records the outcome.
    fn load_base(&self, name: &str) -> Result<Arc<Served>> {
        let path = self.shared.lock().bases.get(name).map(|e| e.path.clone()).unwrap_or_default();
        let result = self.build(&path);
        let mut inner = self.shared.lock();
        let outcome = match (result, inner.bases.get_mut(name)) {
            (Ok(served), Some(e)) => {
                let served = Arc::new(served);
                e.context_length = Some(served.engine.context());
                e.state = State::Loaded(Arc::clone(&served));
                e.leases += 1;
                e.last_used = Instant::now();
                tracing::info!(model = name, path = %path.display(), "model loaded");
                Ok(served)
            }
            (Err(err), e) => {
                if let Some(e) = e {
                    e.state = State::Unloaded;
                }
                tracing::warn!(model = name, error = %err, "model failed to load");
                Err(err)
            }
            (Ok(_), None) => Err(Error::ModelNotFound { name: name.to_string(), available: inner.ids() }),
        };
        drop(inner);
        self.shared.changed.notify_all();
        outcome
    }

    fn build(&self, path: &Path) -> Result<Served> {
        let cfg = &self.shared.config;
        let loaded = load_model(path, &cfg.load)?;
        let defaults = loaded.chat_defaults.clone();
        let engine = Engine::new(Generator::from_loaded(&loaded)?, cfg.engine.clone())?;
        Ok(Served { engine, defaults })
    }

    /// The base model of `lease` with adapter `name` attached, made once per loaded base.
    fn variant(&self, name: &str, lease: &Lease) -> Result<Model> {
        let base_model = lease.generator().model();
        let uid = base_model.uid();
        let (path, scale, adapter) = {
            let inner = self.shared.lock();
            let a = inner.adapters.get(name).ok_or_else(|| Error::ModelNotFound { name: name.to_string(), available: inner.ids() })?;
            if let Some((u, m)) = &a.variant {
                if *u == uid {
                    return Ok(m.clone());
                }
            }
            (a.path.clone(), a.scale, a.adapter.clone())
        };
        let adapter = match adapter {
            Some(a) => a,
            None => Arc::new(LoraAdapter::load(&path, base_model, &AdapterOptions::default())?),
        };
        let variant = attach(base_model, name, &adapter, scale)?;
        let mut inner = self.shared.lock();
        if let Some(a) = inner.adapters.get_mut(name) {
            a.adapter = Some(adapter);
            a.variant = Some((uid, variant.clone()));
        }
        Ok(variant)
    }
}

enum Room {
    /// There is room; the models unloaded to make it (dropped by the caller outside the lock).
    Free(Vec<Arc<Served>>),
    /// Every loaded model is busy.
    Busy,
}

impl Inner {
    fn ids(&self) -> Vec<String> {
        self.order.iter().cloned().chain(self.adapters.keys().cloned()).chain(self.embedders.keys().cloned()).collect()
    }

    /// Unloads least recently used idle models until one more fits under `max`.
    fn make_room(&mut self, max: usize) -> Room {
        let mut evicted = Vec::new();
        loop {
            let resident = self.bases.values().filter(|e| !matches!(e.state, State::Unloaded)).count();
            if resident < max {
                return Room::Free(evicted);
            }
            let victim = self
                .bases
                .iter()
                .filter(|(_, e)| e.leases == 0 && matches!(e.state, State::Loaded(_)))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else { return Room::Busy };
            if let Some(e) = self.bases.get_mut(&victim) {
                if let State::Loaded(s) = std::mem::replace(&mut e.state, State::Unloaded) {
                    tracing::info!(model = victim.as_str(), "model unloaded to make room");
                    evicted.push(s);
                }
            }
        }
    }

    fn add_adapter(&mut self, a: &AdapterSource) -> Result<()> {
        check_name(&a.name)?;
        let base = a.base.clone().or_else(|| self.order.first().cloned()).unwrap_or_default();
        if !self.bases.contains_key(&base) {
            return Err(Error::ModelNotFound { name: base, available: self.order.clone() });
        }
        if self.bases.contains_key(&a.name) || self.adapters.contains_key(&a.name) || self.embedders.contains_key(&a.name) {
            return Err(invalid("lora", format!("two models or adapters are named `{}`", a.name)));
        }
        if !a.scale.is_finite() {
            return Err(invalid("lora", format!("adapter `{}`: the scale must be finite", a.name)));
        }
        let entry = AdapterEntry { path: a.path.clone(), scale: a.scale, base, adapter: None, variant: None };
        self.adapters.insert(a.name.clone(), entry);
        Ok(())
    }
}

fn attach(base: &Model, name: &str, adapter: &LoraAdapter, scale: f64) -> Result<Model> {
    let mut variant = base.clone();
    variant.apply_adapter(name, adapter, scale)?;
    Ok(variant)
}

/// GGUF files (adapters excluded by their `general.type`) and model directories directly inside
/// `dir`, named by their stems, sorted.
fn scan_models_dir(dir: &Path) -> Result<Vec<ModelSource>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let is_gguf = path.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")) && path.is_file();
        let is_dir_model = path.is_dir() && path.join("config.json").is_file() && !path.join("adapter_config.json").exists();
        if (is_gguf && !is_gguf_adapter(&path)) || is_dir_model {
            out.push(ModelSource::from_path(path));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Whether a GGUF file says it is a LoRA adapter (`general.type = "adapter"`).
fn is_gguf_adapter(path: &Path) -> bool {
    let Ok(file) = crate::loader::gguf::GgufFile::open(path) else { return false };
    matches!(
        file.content().metadata.get("general.type"),
        Some(candle_core::quantized::gguf_file::Value::String(s)) if s == "adapter"
    )
}

fn stem(path: &Path) -> String {
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    match name.strip_suffix(".gguf").or_else(|| name.strip_suffix(".GGUF")) {
        Some(s) => s.to_string(),
        None => name,
    }
}

/// Names are ids in URLs and JSON: not empty, no control characters, no `/`.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_control() || c == '/') || name.len() > 256 {
        return Err(invalid("model", format!("`{}` is not a valid model name (empty, `/` or control characters)", name.escape_debug())));
    }
    Ok(())
}

fn invalid(name: &'static str, reason: String) -> Error {
    Error::InvalidParameter { name, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_drop_the_gguf_extension_only() {
        assert_eq!(stem(Path::new("/m/qwen.Q4_0.gguf")), "qwen.Q4_0");
        assert_eq!(stem(Path::new("/m/Qwen2.5-0.5B")), "Qwen2.5-0.5B");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("sql").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a\nb").is_err());
    }

    #[test]
    fn unknown_names_list_the_available_ids() {
        let config = RegistryConfig {
            models: vec![ModelSource::new("a", "/nonexistent/a.gguf")],
            adapters: vec![AdapterSource { name: "sql".into(), path: "/nonexistent/sql".into(), scale: 1.0, base: None }],
            ..RegistryConfig::default()
        };
        let r = ModelRegistry::new(config).unwrap();
        match r.acquire(Some("b")) {
            Err(Error::ModelNotFound { name, available }) => {
                assert_eq!(name, "b");
                assert_eq!(available, vec!["a".to_string(), "sql".to_string()]);
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("unknown model served"),
        }
        // A model that fails to load is an error and stays unloaded (no half state).
        assert!(r.acquire(Some("a")).is_err());
        assert_eq!(r.list()[0].status, ModelStatus::Unloaded);
    }

    #[test]
    fn an_adapter_needs_an_existing_base() {
        let config = RegistryConfig {
            models: vec![ModelSource::new("a", "/x.gguf")],
            adapters: vec![AdapterSource { name: "sql".into(), path: "/y".into(), scale: 1.0, base: Some("zz".into()) }],
            ..RegistryConfig::default()
        };
        assert!(matches!(ModelRegistry::new(config), Err(Error::ModelNotFound { .. })));
    }
}
