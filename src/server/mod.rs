//! An OpenAI-compatible HTTP server over a [`ModelRegistry`] (feature `server`).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /v1/models/{id}`, `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`,
//! `GET /health`, `GET /metrics`. The handlers only parse, validate, call the registry and the
//! engine, and format; every crate error becomes an HTTP status and OpenAI's error body in one
//! place ([`ApiError`]). Requests are validated before anything is sent, so a streaming request
//! with a bad parameter or a prompt over the context gets a 400, never an SSE error.
//!
//! ```no_run
//! use metal_candle::registry::{ModelRegistry, ModelSource, RegistryConfig};
//! use metal_candle::server::{Server, ServerConfig};
//! # async fn run() -> metal_candle::Result<()> {
//! let registry = ModelRegistry::new(RegistryConfig {
//!     models: vec![ModelSource::from_path("SmolLM2-135M-Instruct.Q4_1.gguf")],
//!     ..RegistryConfig::default()
//! })?;
//! let server = Server::bind(registry, ServerConfig::default()).await?;
//! println!("listening on http://{}", server.local_addr()?);
//! server.run(metal_candle::server::shutdown_signal()).await
//! # }
//! ```

mod api;
mod complete;
mod error;
mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub use self::error::ApiError;
use self::api::{parse, EmbedItem, UnloadLoraRequest};
use self::complete::{Job, Kind};
use self::metrics::Metrics;
use crate::chat::tools::{call_constraint, ToolCallFormat, ToolChoice};
use crate::error::{Error, Result};
use crate::generation::{Constraint, Prompt};
use crate::registry::{AdapterSource, Lease, ModelInfo, ModelKind, ModelRegistry};

/// How the server listens. Configuration as data: built once (from the CLI).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// The address to bind (`127.0.0.1` keeps it on this machine).
    pub host: String,
    /// The port; 0 picks a free one ([`Server::local_addr`] says which).
    pub port: u16,
    /// When set, every `/v1` request needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Larger request bodies are 413.
    pub max_body_bytes: usize,
    /// After the shutdown signal: how long running requests may finish before they are cancelled.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { host: "127.0.0.1".into(), port: 8080, api_key: None, max_body_bytes: 8 << 20, shutdown_grace: Duration::from_secs(10) }
    }
}

/// What every handler reads.
pub struct AppState {
    registry: ModelRegistry,
    config: ServerConfig,
    metrics: Metrics,
    /// The default model has loaded (`/health` is 200).
    ready: AtomicBool,
    next_id: AtomicU64,
    created: u64,
}

/// One request's log line and metrics, written once when it is dropped: id, endpoint, model,
/// tokens, TTFT, status (499 when the client went away first).
pub struct RequestLog {
    id: u64,
    endpoint: &'static str,
    model: String,
    user: Option<String>,
    start: Instant,
    created: u64,
    ttft: Option<Duration>,
    status: u16,
    tokens: Option<(usize, usize)>,
    state: Option<Arc<AppState>>,
}

impl RequestLog {
    fn new(state: &Arc<AppState>, endpoint: &'static str) -> Self {
        Self {
            id: state.next_id.fetch_add(1, Ordering::Relaxed),
            endpoint,
            model: String::new(),
            user: None,
            start: Instant::now(),
            created: unix_now(),
            ttft: None,
            status: 499,
            tokens: None,
            state: Some(Arc::clone(state)),
        }
    }

    fn response_id(&self, prefix: &str) -> String {
        format!("{prefix}{:x}{:06x}", self.created, self.id)
    }

    /// This log, moved out (the original writes nothing when dropped).
    fn take(&mut self) -> RequestLog {
        RequestLog {
            id: self.id,
            endpoint: self.endpoint,
            model: std::mem::take(&mut self.model),
            user: self.user.take(),
            start: self.start,
            created: self.created,
            ttft: self.ttft,
            status: self.status,
            tokens: self.tokens,
            state: self.state.take(),
        }
    }

    /// The request completed with `prompt` and `completion` tokens.
    fn done(&mut self, state: &AppState, prompt: usize, completion: usize) {
        if self.status == 499 {
            self.status = 200;
        }
        state.metrics.tokens(prompt, completion);
        self.tokens = Some((prompt, completion));
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else { return };
        state.metrics.request(self.endpoint, self.status);
        let (p, c) = self.tokens.unwrap_or((0, 0));
        let ttft_ms = self.ttft.map(|d| d.as_secs_f64() * 1e3);
        tracing::info!(
            id = self.id,
            endpoint = self.endpoint,
            model = self.model.as_str(),
            user = self.user.as_deref().unwrap_or("-"),
            prompt_tokens = p,
            completion_tokens = c,
            ttft_ms = ttft_ms.map(|t| format!("{t:.1}")).unwrap_or_else(|| "-".into()).as_str(),
            ms = format!("{:.1}", self.start.elapsed().as_secs_f64() * 1e3).as_str(),
            status = self.status,
            "request"
        );
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A bound listener and the application, ready to [`Server::run`].
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
}

impl Server {
    /// Binds `config.host:config.port`. Errors: [`Error::Io`] when the address is taken or invalid.
    pub async fn bind(registry: ModelRegistry, config: ServerConfig) -> Result<Self> {
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| Error::io(&addr, e))?;
        let state = Arc::new(AppState {
            registry,
            config,
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            created: unix_now(),
        });
        Ok(Self { listener, state })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|e| Error::io("listener", e))
    }

    /// Serves until `shutdown` completes, then stops accepting, lets running requests finish for
    /// [`ServerConfig::shutdown_grace`] and cancels the rest. Loads the default model (and the
    /// adapters on it) first while answering `/health` with 503. Errors: the default model or one
    /// of its adapters fails to load.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server { listener, state } = self;
        let app = router(Arc::clone(&state));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_wait = stop_rx.clone();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|s| *s).await;
        });
        let server = tokio::spawn(async move { serve.await });
        let reaper = tokio::spawn(reap_idle(Arc::clone(&state)));
        let startup = warm_up(Arc::clone(&state)).await;
        if let Err(e) = startup {
            let _ = stop_tx.send(true);
            reaper.abort();
            return Err(e);
        }
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let _ = stop_wait.wait_for(|s| *s).await;
        tracing::info!("shutting down: no new connections; running requests have {:?}", state.config.shutdown_grace);
        let grace = state.config.shutdown_grace;
        if tokio::time::timeout(grace, server).await.is_err() {
            tracing::warn!("requests still running after the grace period are cancelled");
        }
        reaper.abort();
        Ok(())
    }
}

/// Loads the default model and the adapters on it, then marks the server ready.
async fn warm_up(state: Arc<AppState>) -> Result<()> {
    let s = Arc::clone(&state);
    let result = tokio::task::spawn_blocking(move || {
        let default = s.registry.default_model();
        if default.is_empty() {
            return s.registry.embedder(None).map(drop); // an embeddings-only server
        }
        s.registry.preload(None)?;
        for m in s.registry.list() {
            if m.parent.as_deref() == Some(default.as_str()) {
                s.registry.preload(Some(&m.id))?;
            }
        }
        Ok::<_, Error>(())
    })
    .await
    .map_err(|e| Error::InvalidParameter { name: "startup", reason: e.to_string() })?;
    result?;
    state.ready.store(true, Ordering::Release);
    tracing::info!(model = state.registry.default_model().as_str(), "ready");
    Ok(())
}

/// Unloads models idle past the TTL, once a second.
async fn reap_idle(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let s = Arc::clone(&state);
        let _ = tokio::task::spawn_blocking(move || s.registry.unload_idle()).await;
    }
}

/// Completes on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The routes, with the body limit and the API-key check.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), auth));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(|req: Request| async move { ApiError::no_route(req.uri().path()) })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) != Some(key.as_str()) {
            state.metrics.request(endpoint_label(req.uri().path()), 401);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// The `endpoint` label of `/metrics` for a path.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/v1/embeddings" => "embeddings",
        "/v1/load_lora_adapter" => "load_lora_adapter",
        "/v1/unload_lora_adapter" => "unload_lora_adapter",
        "/metrics" => "metrics",
        p if p.starts_with("/v1/models") => "models",
        _ => "other",
    }
}

/// Reads and checks a request body for the endpoint at `path` as the server does before it
/// touches a model: malformed JSON, wrong types (named by their JSON path), out-of-range
/// parameters and unsupported fields are the same 400 [`ApiError`]s the server answers, and an
/// unknown path is its 404. For fuzzing and for checking requests offline; a body that passes may
/// still be refused once the model is known (token ids over its vocabulary, a prompt over its
/// context, a model that does not exist). The body-size limit is not applied here.
pub fn check_request(path: &str, body: &[u8]) -> std::result::Result<(), ApiError> {
    match path {
        "/v1/chat/completions" => api::check_chat(body).map(drop),
        "/v1/completions" => api::check_completion(body).map(drop),
        "/v1/embeddings" => api::check_embeddings(body).map(drop),
        "/v1/load_lora_adapter" => api::check_load_lora(body).map(drop),
        "/v1/unload_lora_adapter" => parse::<UnloadLoraRequest>(body).map(drop),
        _ => Err(ApiError::no_route(path)),
    }
}

fn body_bytes(body: std::result::Result<Bytes, BytesRejection>, limit: usize) -> std::result::Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(None, r.body_text())
        }
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> std::result::Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::from(Error::StepFailed { reason: e.to_string() })),
    }
}

/// A tool-choice error of the library as a 400 naming the request field.
fn tool_error(e: Error) -> ApiError {
    let param = match &e {
        Error::InvalidParameter { name, .. } => *name,
        _ => "tools",
    };
    ApiError::from(e).about(param)
}

fn respond(log: &mut RequestLog, result: std::result::Result<Response, ApiError>) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => {
            log.status = e.status.as_u16();
            e.into_response()
        }
    }
}

async fn chat(State(state): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let mut log = RequestLog::new(&state, "chat");
    let result = body_bytes(body, state.config.max_body_bytes).and_then(|b| api::check_chat(&b));
    let api::CheckedChat { common, prompt, tools, constraint, logprobs } = match result {
        Ok(x) => x,
        Err(e) => return respond(&mut log, Err(e)),
    };
    let r = generate(Arc::clone(&state), Kind::Chat, common, move |_| Ok(prompt), (tools, constraint), logprobs, &mut log).await;
    respond(&mut log, r)
}

async fn completions(State(state): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let mut log = RequestLog::new(&state, "completions");
    let result = body_bytes(body, state.config.max_body_bytes).and_then(|b| api::check_completion(&b));
    let (req, common, logprobs) = match result {
        Ok(x) => x,
        Err(e) => return respond(&mut log, Err(e)),
    };
    let r = generate(
        Arc::clone(&state),
        Kind::Text,
        common,
        move |lease| req.prompt(lease.generator().model().config().vocab_size),
        (None, None),
        logprobs,
        &mut log,
    )
    .await;
    respond(&mut log, r)
}

/// The shared path of both generation endpoints: lease the model (loading it if needed), build
/// the settings over its defaults, submit (tokenizing and checking the context), then collect or
/// stream.
async fn generate(
    state: Arc<AppState>,
    kind: Kind,
    common: api::Common,
    prompt: impl FnOnce(&Lease) -> std::result::Result<Prompt, ApiError> + Send + 'static,
    (tools, constraint): (Option<api::ToolUse>, Option<Constraint>),
    logprobs: Option<usize>,
    log: &mut RequestLog,
) -> std::result::Result<Response, ApiError> {
    let model = common.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| state.registry.default_model());
    log.model = model.clone();
    log.user = common.user.clone();
    let registry = state.registry.clone();
    let name = model.clone();
    let lease = blocking(move || registry.acquire(Some(&name))).await?;
    // Chat replies take the model's own sampling defaults (as `generate --chat` does); plain
    // completions take OpenAI's (temperature 1, nothing else), as `generate` with a temperature.
    let defaults = match kind {
        Kind::Chat => lease.served().chat_defaults().sampling.clone(),
        Kind::Text => crate::sampling::SamplingParams { temperature: 1.0, ..Default::default() },
    };
    let mut settings = common.settings(&defaults, logprobs, lease.engine().context())?;
    settings.params.constraint = constraint;
    // Replies are read as calls in the syntax the model's template teaches (or the generic JSON
    // one); `required`, a named function and the generic format hold the reply to it by grammar.
    let mut tools_constrained = false;
    let tool_calls = match tools {
        None => None,
        Some(t) => {
            let format = lease.generator().tool_call_format().map_err(ApiError::from)?;
            if let Some(c) = call_constraint(format, &t.tools, &t.choice, t.parallel).map_err(tool_error)? {
                if settings.params.constraint.is_some() {
                    let why = match format {
                        ToolCallFormat::Generic => format!("the chat template of `{model}` has no tool-call syntax, so its tool calls are constrained JSON"),
                        _ => "a required tool call is held to its own grammar".to_string(),
                    };
                    return Err(ApiError::invalid(Some("response_format".into()), format!("cannot be combined with these `tools`: {why}")));
                }
                settings.params.constraint = Some(c);
                tools_constrained = true;
            }
            // A generic model's reply is always its JSON shape, read back even under `none`.
            (t.choice != ToolChoice::None || format == ToolCallFormat::Generic).then_some((format, t.parallel))
        }
    };
    let prompt = prompt(&lease)?;
    let (lease, handles) = {
        let params = settings.params.clone();
        let n = settings.n;
        match tokio::task::spawn_blocking(move || {
            let r = lease.submit_async(prompt, &params, n);
            (lease, r)
        })
        .await
        {
            Ok((lease, r)) => {
                let prompt_param = if kind == Kind::Chat { "messages" } else { "prompt" };
                let handles = r.map_err(|e| match e {
                    Error::ContextOverflow { .. } => ApiError::from(e).about(prompt_param),
                    // The grammar compiles when the sequence is created: before any token.
                    Error::InvalidParameter { name: "constraint", .. } if tools_constrained => ApiError::from(e).about("tools"),
                    Error::InvalidParameter { name: "constraint", .. } => ApiError::from(e).about("response_format"),
                    e => ApiError::from(e),
                })?;
                (lease, handles)
            }
            Err(e) => return Err(ApiError::from(Error::StepFailed { reason: e.to_string() })),
        }
    };
    // Counted from here on, so a request whose client goes away logs what it read and wrote.
    log.tokens = Some((handles.first().and_then(|h| h.prompt_tokens()).unwrap_or(0), 0));
    let job_log = log.take();
    let job = Job { kind, model, lease, handles, include_usage: settings.include_usage, logprobs: logprobs.is_some(), tool_calls, log: job_log };
    if settings.stream {
        complete::stream(state, job)
    } else {
        complete::collect(state, job).await
    }
}

async fn embeddings(State(state): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let mut log = RequestLog::new(&state, "embeddings");
    let result = async {
        let (req, items, base64) = api::check_embeddings(&body_bytes(body, state.config.max_body_bytes)?)?;
        log.model = req.model.clone().unwrap_or_default();
        log.user = req.user.clone();
        let registry = state.registry.clone();
        let name = req.model.clone().filter(|m| !m.is_empty());
        let model = blocking(move || registry.embedder(name.as_deref())).await?;
        if let Some(d) = req.dimensions.filter(|&d| d as usize != model.dim()) {
            return Err(ApiError::invalid(Some("dimensions".into()), format!("{d}: this model's vectors have {} dimensions", model.dim())));
        }
        let out = blocking(move || {
            let inputs: Vec<crate::embed::EmbedInput> = items
                .iter()
                .map(|i| match i {
                    EmbedItem::Text(t) => crate::embed::EmbedInput::Text(t),
                    EmbedItem::Ids(ids) => crate::embed::EmbedInput::Ids(ids),
                })
                .collect();
            model.embed(&inputs, None)
        })
        .await
        .map_err(|e| e.about("input"))?;
        let data: Vec<Value> = out
            .vectors
            .iter()
            .zip(&out.truncated)
            .enumerate()
            .map(|(i, (v, &truncated))| {
                let embedding = if base64 {
                    use base64::Engine as _;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding, "truncated": truncated})
            })
            .collect();
        let tokens = out.prompt_tokens();
        let model_id = req.model.clone().unwrap_or_else(|| state.registry.list().into_iter().find(|m| m.kind == ModelKind::Embed).map(|m| m.id).unwrap_or_default());
        log.done(&state, tokens, 0);
        Ok(Json(json!({"object": "list", "data": data, "model": model_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})).into_response())
    }
    .await;
    respond(&mut log, result)
}

fn model_object(state: &AppState, m: &ModelInfo) -> Value {
    json!({
        "id": m.id,
        "kind": match m.kind { ModelKind::Generate => "generate", ModelKind::Embed => "embedding" },
        "object": "model",
        "created": state.created,
        "owned_by": "metal-candle",
        "status": m.status.as_str(),
        "context_length": m.context_length,
        "parent": m.parent,
    })
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = state.registry.list().iter().map(|m| model_object(&state, m)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let list = state.registry.list();
    match list.iter().find(|m| m.id == id) {
        Some(m) => Json(model_object(&state, m)).into_response(),
        None => ApiError::from(Error::ModelNotFound { name: id, available: list.into_iter().map(|m| m.id).collect() }).into_response(),
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return ApiError::unavailable("loading model".into()).into_response();
    }
    let (stats, _) = state.registry.stats();
    Json(json!({"status": "ok", "slots_idle": stats.slots.saturating_sub(stats.running), "slots_processing": stats.running})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (stats, loaded) = state.registry.stats();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(stats, loaded)).into_response()
}

async fn load_lora(State(state): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let mut log = RequestLog::new(&state, "load_lora_adapter");
    let result = async {
        let (req, scale) = api::check_load_lora(&body_bytes(body, state.config.max_body_bytes)?)?;
        let source = AdapterSource { name: req.lora_name.clone(), path: req.lora_path.into(), scale, base: req.base_model };
        let registry = state.registry.clone();
        log.model = req.lora_name.clone();
        match tokio::task::spawn_blocking(move || registry.load_adapter(source)).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ Error::ModelNotFound { .. })) => return Err(ApiError::from(e).about("base_model")),
            // Whatever stops the adapter loading is the request's fault: a path that does not
            // exist or does not hold an adapter for this base.
            Ok(Err(e)) => return Err(ApiError { param: Some("lora_path".into()), ..ApiError::invalid(None, e.to_string()) }),
            Err(e) => return Err(ApiError::from(Error::StepFailed { reason: e.to_string() })),
        }
        let info = state.registry.list().into_iter().find(|m| m.id == req.lora_name);
        log.status = 200;
        Ok(Json(info.map_or(Value::Null, |m| model_object(&state, &m))).into_response())
    }
    .await;
    respond(&mut log, result)
}

async fn unload_lora(State(state): State<Arc<AppState>>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let mut log = RequestLog::new(&state, "unload_lora_adapter");
    let result = async {
        let req: UnloadLoraRequest = parse(&body_bytes(body, state.config.max_body_bytes)?)?;
        log.model = req.lora_name.clone();
        state.registry.unload_adapter(&req.lora_name).map_err(|e| ApiError::from(e).about("lora_name"))?;
        log.status = 200;
        Ok(Json(json!({"id": req.lora_name, "object": "model", "status": "unloaded"})).into_response())
    }
    .await;
    respond(&mut log, result)
}
