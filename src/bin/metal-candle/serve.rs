//! `metal-candle serve`: the OpenAI-compatible server (feature `server`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use metal_candle::device::{default_dtype, parse_dtype, select_device};
use metal_candle::library::passkey::memory_estimate;
use metal_candle::library::probe::memory_cap;
use metal_candle::library::{ModelFacts, ModelLibrary};
use metal_candle::engine::EngineConfig;
use metal_candle::registry::{AdapterSource, ModelRegistry, ModelSource, RegistryConfig};
use metal_candle::server::{shutdown_signal, Server, ServerConfig};
use metal_candle::{DeviceChoice, Error, LoadOptions, Result};

use crate::common::{kernel_policy, load_quant_type, positive};

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: `[NAME=]PATH` (a GGUF file or HF model directory; NAME defaults to the
    /// file or directory stem) or the name of a library model (`metal-candle models list`).
    /// Repeatable; the first is the default model.
    #[arg(long = "model", value_name = "[NAME=]PATH", value_parser = parse_model)]
    models: Vec<ModelSource>,
    /// An embedding model for /v1/embeddings: `[NAME=]DIR` (a sentence-transformers directory).
    /// Repeatable.
    #[arg(long = "embedding-model", value_name = "[NAME=]DIR", value_parser = parse_model)]
    embedding_models: Vec<ModelSource>,
    /// Serve every GGUF file and model directory in DIR by its stem.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// A LoRA adapter served as a model: `NAME=PATH[:SCALE][@BASE]` (BASE defaults to the first
    /// model). Repeatable.
    #[arg(long = "lora", value_name = "NAME=PATH[:SCALE][@BASE]", value_parser = parse_lora)]
    loras: Vec<AdapterSource>,
    /// Address to listen on (keep 127.0.0.1 unless other machines must reach it).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences each model runs at once.
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    parallel: i64,
    /// Positions per sequence (prompt + reply); never divided by --parallel. Default: 4096 or
    /// the model's own limit if smaller. `auto`: the smallest, over the --model models, of the
    /// declared limit, the tested one (`metal-candle probe-context`) and what memory allows for
    /// --parallel sequences.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_ctx)]
    ctx: Option<CtxArg>,
    /// Requests that may wait per model; one more is 429.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    max_queue: i64,
    /// Models loaded at once; the least recently used idle one is unloaded to make room.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    models_max: i64,
    /// Unload a model idle this many seconds.
    #[arg(long, allow_negative_numbers = true)]
    ttl: Option<i64>,
    /// Require `Authorization: Bearer KEY` on /v1 endpoints.
    #[arg(long)]
    api_key: Option<String>,
    /// Largest forks count (`n`) one request may ask for.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    max_n: i64,
    /// Tokens one engine step may carry (decode rows plus prompt chunks).
    #[arg(long, default_value_t = 512, allow_negative_numbers = true)]
    max_step_tokens: i64,
    /// f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// Quantize HF safetensors models' projections at load (q8_0, q4_k, q4_0, …).
    #[arg(long, value_name = "TYPE")]
    quantize: Option<String>,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Scan every weight of each model for NaN/Inf when it loads and refuse a damaged one, naming
    /// the first bad tensor (reads each file once; without it a damaged weight is reported when it
    /// reaches the logits, as a 500 `non_finite_output` for that request).
    #[arg(long)]
    check_tensors: bool,
    /// Seconds a request waits for a busy model to become unloadable (to load another under
    /// --models-max) before a 503 `models_busy`.
    #[arg(long, default_value_t = 30)]
    busy_wait: u64,
    /// Seconds running requests may finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// With `--ctx auto`: the memory, in bytes, the weights and the --parallel KV caches may use
    /// (default: available RAM minus 10%, at least 512 MiB).
    #[arg(long)]
    max_memory: Option<u64>,
}

/// `--ctx`: a number of positions or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtxArg {
    Fixed(i64),
    Auto,
}

fn parse_ctx(s: &str) -> std::result::Result<CtxArg, String> {
    match s {
        "auto" => Ok(CtxArg::Auto),
        _ => s.parse().map(CtxArg::Fixed).map_err(|_| format!("`{s}`: expected a number of positions or `auto`")),
    }
}

/// Where `--ctx auto` landed for one model, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AutoCtx {
    ctx: usize,
    declared: usize,
    tested: Option<usize>,
    /// `None`: the available memory is not known here.
    memory: Option<usize>,
}

impl AutoCtx {
    /// The smallest of the three limits.
    fn choose(declared: usize, tested: Option<usize>, memory: Option<usize>) -> Self {
        let ctx = [Some(declared), tested, memory].into_iter().flatten().min().unwrap_or(declared);
        Self { ctx, declared, tested, memory }
    }

    fn factor(&self) -> &'static str {
        if self.memory == Some(self.ctx) && self.ctx < self.declared.min(self.tested.unwrap_or(usize::MAX)) {
            "memory"
        } else if self.tested == Some(self.ctx) && self.ctx < self.declared {
            "tested"
        } else {
            "declared"
        }
    }
}

/// `--ctx auto` for one model at `path` running `parallel` sequences with KV in `dtype_bytes`.
/// The memory bound counts the weights, `parallel` KV caches and the activations of a prefill of
/// all of them at once (an overestimate: prompts are prefilled in steps).
fn auto_ctx(library: &ModelLibrary, path: &std::path::Path, parallel: usize, dtype_bytes: u64, max_memory: Option<u64>) -> Result<AutoCtx> {
    let facts = ModelFacts::read(path)?;
    let declared = facts.declared_context.max(1);
    let tested = library.find_path(path)?.and_then(|e| e.tested_context());
    let memory = match max_memory {
        None => None,
        Some(limit) => {
            let need = |len: usize| memory_estimate(&facts, len.saturating_mul(parallel), dtype_bytes);
            let min = MIN_AUTO_CTX.min(declared);
            let fits = memory_cap(&need, min, declared, Some(limit)).ok_or_else(|| Error::InvalidParameter {
                name: "ctx",
                reason: format!("{}: not even {min} positions for {parallel} sequences fit in {:.1} GB; lower --parallel or pass --ctx N", path.display(), limit as f64 / 1e9),
            })?;
            Some(fits)
        }
    };
    Ok(AutoCtx::choose(declared, tested, memory))
}

/// The smallest context `--ctx auto` picks.
const MIN_AUTO_CTX: usize = 256;

/// `[NAME=]PATH`.
fn parse_model(s: &str) -> std::result::Result<ModelSource, String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(ModelSource::new(name, path)),
        Some(_) => Err(format!("`{s}`: expected [NAME=]PATH")),
        None => Ok(ModelSource::from_path(s)),
    }
}

/// `NAME=PATH[:SCALE][@BASE]`: a trailing `@name` is the base, a trailing `:number` the scale.
fn parse_lora(s: &str) -> std::result::Result<AdapterSource, String> {
    let bad = || format!("`{s}`: expected NAME=PATH[:SCALE][@BASE]");
    let (name, rest) = s.split_once('=').filter(|(n, r)| !n.is_empty() && !r.is_empty()).ok_or_else(bad)?;
    let (rest, base) = match rest.rsplit_once('@') {
        Some((r, b)) if !b.is_empty() && !b.contains('/') => (r, Some(b.to_string())),
        _ => (rest, None),
    };
    let (path, scale) = match rest.rsplit_once(':').and_then(|(p, sc)| Some((p, sc.parse::<f64>().ok()?))) {
        Some(split) => split,
        None => (rest, 1.0),
    };
    if path.is_empty() || !scale.is_finite() {
        return Err(bad());
    }
    Ok(AdapterSource { name: name.to_string(), path: PathBuf::from(path), scale, base })
}

fn config(mut args: ServeArgs) -> Result<(RegistryConfig, ServerConfig)> {
    let parallel = positive("parallel", args.parallel)?;
    // Library names resolve to their paths (an existing path is used as it is).
    let library = crate::common::library();
    for m in &mut args.models {
        m.path = library.resolve(&m.path)?;
    }
    let ctx = match args.ctx {
        None => None,
        Some(CtxArg::Fixed(c)) => Some(positive("ctx", c)?),
        Some(CtxArg::Auto) => {
            let dtype_bytes = match args.dtype.as_deref() {
                Some(d) => parse_dtype(d)?.size_in_bytes() as u64,
                None => default_dtype(&select_device(args.device.parse::<DeviceChoice>()?)?).size_in_bytes() as u64,
            };
            let max_memory = args.max_memory.or_else(|| crate::probe::default_max_memory().ok());
            let mut chosen: Option<usize> = None;
            for m in &args.models {
                let a = auto_ctx(&library, &m.path, parallel, dtype_bytes, max_memory)?;
                let tested = a.tested.map_or_else(|| "untested".to_string(), |t| format!("tested {t}"));
                let memory = a.memory.map_or_else(|| "memory unknown".to_string(), |m| format!("memory allows {m} for {parallel} sequences"));
                eprintln!("--ctx auto: {} for {} (limited by {}: declared {}, {tested}, {memory})", a.ctx, m.name, a.factor(), a.declared);
                chosen = Some(chosen.map_or(a.ctx, |c| c.min(a.ctx)));
            }
            let ctx = chosen.ok_or_else(|| Error::InvalidParameter { name: "ctx", reason: "`auto` needs at least one --model".into() })?;
            eprintln!("--ctx auto: serving with {ctx} positions per sequence");
            Some(ctx)
        }
    };
    let defaults = LoadOptions::default();
    let load = LoadOptions {
        device: args.device.parse::<DeviceChoice>()?,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        quantize: args.quantize.as_deref().map(load_quant_type).transpose()?,
        kernels: kernel_policy(),
        max_positions: ctx.unwrap_or(defaults.max_positions),
        check_tensors: args.check_tensors,
        ..defaults
    };
    let engine = EngineConfig {
        max_sequences: parallel,
        max_step_tokens: positive("max_step_tokens", args.max_step_tokens)?,
        max_queue: positive("max_queue", args.max_queue)?,
        context: ctx,
        max_n: positive("max_n", args.max_n)?,
    };
    if args.models.is_empty() && args.models_dir.is_none() && args.embedding_models.is_empty() {
        return Err(Error::InvalidParameter { name: "model", reason: "give --model PATH, --models-dir DIR or --embedding-model DIR".into() });
    }
    let registry = RegistryConfig {
        models: args.models,
        models_dir: args.models_dir,
        adapters: args.loras,
        embedding_models: args.embedding_models,
        models_max: positive("models_max", args.models_max)?,
        ttl: args.ttl.map(|t| positive("ttl", t).map(|t| Duration::from_secs(t as u64))).transpose()?,
        load,
        engine,
        busy_wait: Duration::from_secs(args.busy_wait),
    };
    let server = ServerConfig {
        host: args.host,
        port: args.port,
        api_key: args.api_key,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        ..ServerConfig::default()
    };
    Ok((registry, server))
}

pub fn run(args: ServeArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init();
    let (registry_config, server_config) = config(args)?;
    let registry = ModelRegistry::new(registry_config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| Error::Io { path: "tokio runtime".into(), source: e })?;
    runtime.block_on(async move {
        let server = Server::bind(registry, server_config).await?;
        tracing::info!("listening on http://{}", server.local_addr()?);
        server.run(shutdown_signal()).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_lora_flags_parse() {
        assert_eq!(parse_model("a.gguf").unwrap(), ModelSource::new("a", "a.gguf"));
        assert_eq!(parse_model("q=dir/q.gguf").unwrap(), ModelSource::new("q", "dir/q.gguf"));
        assert!(parse_model("=x").is_err());
        let l = parse_lora("sql=ad/sql:0.5@base").unwrap();
        assert_eq!((l.name.as_str(), l.path.clone(), l.scale, l.base.as_deref()), ("sql", "ad/sql".into(), 0.5, Some("base")));
        let l = parse_lora("sql=ad/sql").unwrap();
        assert_eq!((l.scale, l.base), (1.0, None));
        assert!(parse_lora("sql").is_err());
        assert!(parse_lora("sql=:inf").is_err());
    }

    #[test]
    fn ctx_auto_takes_the_smallest_limit_and_names_it() {
        assert_eq!(parse_ctx("auto").unwrap(), CtxArg::Auto);
        assert_eq!(parse_ctx("-5").unwrap(), CtxArg::Fixed(-5));
        assert!(parse_ctx("lots").is_err());
        let a = AutoCtx::choose(8192, Some(2048), Some(100_000));
        assert_eq!((a.ctx, a.factor()), (2048, "tested"));
        let a = AutoCtx::choose(8192, None, Some(3000));
        assert_eq!((a.ctx, a.factor()), (3000, "memory"));
        let a = AutoCtx::choose(8192, None, None);
        assert_eq!((a.ctx, a.factor()), (8192, "declared"));
        let a = AutoCtx::choose(4096, Some(4096), Some(9000));
        assert_eq!((a.ctx, a.factor()), (4096, "declared"));
    }
}
