//! `metal-candle serve`: the OpenAI-compatible server (feature `server`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use metal_candle::device::parse_dtype;
use metal_candle::engine::EngineConfig;
use metal_candle::registry::{AdapterSource, ModelRegistry, ModelSource, RegistryConfig};
use metal_candle::server::{shutdown_signal, Server, ServerConfig};
use metal_candle::{DeviceChoice, Error, LoadOptions, Result};

use crate::common::{kernel_policy, load_quant_type, positive};

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: `[NAME=]PATH` (a GGUF file or HF model directory; NAME defaults to the
    /// file or directory stem). Repeatable; the first is the default model.
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
    /// the model's own limit if smaller.
    #[arg(long, allow_negative_numbers = true)]
    ctx: Option<i64>,
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
}

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

fn config(args: ServeArgs) -> Result<(RegistryConfig, ServerConfig)> {
    let ctx = args.ctx.map(|c| positive("ctx", c)).transpose()?;
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
    let parallel = positive("parallel", args.parallel)?;
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
}
