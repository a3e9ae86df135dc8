//! Flags shared by every subcommand that loads a model.

use std::path::{Path, PathBuf};

use clap::Args;
use metal_candle::adapter::{AdapterOptions, ApplyAdapter, LoraAdapter};
use metal_candle::device::parse_dtype;
use metal_candle::kernels::cpu::CPU_KERNELS_ENV;
use metal_candle::kernels::{KernelPolicy, CUSTOM_KERNELS_ENV};
use metal_candle::library::{LibraryConfig, ModelLibrary};
use metal_candle::{load_model, DeviceChoice, Error, LoadOptions, LoadedModel, Result};

#[derive(Args)]
pub struct ModelArgs {
    /// A GGUF file, a directory with config.json + safetensors (+ tokenizer.json), or the name
    /// of a model in the library (`metal-candle models list`).
    #[arg(long)]
    pub model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    pub dtype: Option<String>,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Quantize an HF safetensors model's projections at load (q8_0, q4_k, q4_0, …; a *_k_m name
    /// means its base type): the memory of the quantized model, no file written.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// A LoRA adapter to apply: a PEFT directory (adapter_config.json + adapter_model.safetensors),
    /// a llama.cpp GGUF adapter or a library adapter's name, optionally with a scale (`PATH:0.5`; default 1). Repeatable:
    /// the adapters' deltas are summed.
    #[arg(long = "adapter", value_name = "PATH[:SCALE]", value_parser = parse_adapter)]
    pub adapters: Vec<AdapterArg>,
    /// Scan every weight for NaN/Inf at load and name the first bad tensor (reads the whole
    /// file once; without it a damaged weight is reported when it reaches the logits).
    #[arg(long)]
    pub check_tensors: bool,
    /// Print a model summary (architecture, weight types, size, context) to stderr after loading.
    #[arg(long)]
    pub verbose: bool,
}

/// One `--adapter PATH[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterArg {
    pub path: PathBuf,
    pub scale: f64,
}

/// `PATH[:SCALE]`: a trailing `:number` is the scale; any other colon belongs to the path.
fn parse_adapter(s: &str) -> std::result::Result<AdapterArg, String> {
    if let Some((path, scale)) = s.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f64>() {
            if !scale.is_finite() || path.is_empty() {
                return Err(format!("`{s}`: expected PATH[:SCALE] with a finite scale"));
            }
            return Ok(AdapterArg { path: PathBuf::from(path), scale });
        }
    }
    Ok(AdapterArg { path: PathBuf::from(s), scale: 1.0 })
}

pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    load_with_context(args, None)
}

/// [`load`] with the context (prompt + generated tokens) bounded by `ctx` instead of the default.
pub fn load_with_context(args: &ModelArgs, ctx: Option<usize>) -> Result<LoadedModel> {
    let defaults = LoadOptions::default();
    let opts = LoadOptions {
        device: args.device.parse::<DeviceChoice>()?,
        dtype: args.dtype.as_deref().map(parse_dtype).transpose()?,
        tokenizer: args.tokenizer.clone(),
        kernels: kernel_policy(),
        check_tensors: args.check_tensors,
        quantize: args.quantize.as_deref().map(load_quant_type).transpose()?,
        max_positions: ctx.unwrap_or(defaults.max_positions),
        ..defaults
    };
    let path = library().resolve(&args.model)?;
    let mut loaded = load_model(&path, &opts)?;
    if args.verbose {
        eprintln!("{}", summary(&path, &loaded)?);
    }
    for a in &args.adapters {
        let adapter_path = library().resolve_adapter(&a.path)?;
        let adapter = LoraAdapter::load(&adapter_path, &loaded.model, &AdapterOptions::default())?;
        loaded.model.apply_adapter(&adapter_name(&a.path), &adapter, a.scale)?;
    }
    Ok(loaded)
}

/// One line about a loaded model, like llama.cpp's load log: architecture, shape, weight types (a
/// GGUF's tensor count per type), projection bytes, context.
fn summary(path: &Path, loaded: &LoadedModel) -> Result<String> {
    let (model, cfg) = (&loaded.model, loaded.model.config());
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    if path.is_file() {
        let file = metal_candle::loader::gguf::GgufFile::open(path)?;
        for info in file.content().tensor_infos.values() {
            *types.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        }
    } else {
        types.insert(format!("{:?} (safetensors)", model.dtype()), 1);
    }
    let types: Vec<String> = types.iter().map(|(t, n)| format!("{t}×{n}")).collect();
    Ok(format!(
        "model: {:?}, {} layers, hidden {}, {} heads ({} kv), vocab {}; weights {}; {:.1} MB of projections; context {} (model max {}); {:?} on {:?}",
        cfg.arch,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
        types.join(" "),
        model.projection_bytes() as f64 / 1e6,
        model.max_positions(),
        cfg.max_position_embeddings,
        model.dtype(),
        model.device().location(),
    ))
}

/// Sets the CPU thread count before the first computation (candle and rayon size their pools from
/// `RAYON_NUM_THREADS` once). Errors: 0 threads.
pub fn set_threads(threads: Option<i64>) -> Result<()> {
    let Some(n) = threads else { return Ok(()) };
    let n = positive("threads", n)?;
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    Ok(())
}

/// A count given on the command line: negative values reach this range check (clap accepts them
/// so the error names the parameter instead of "unexpected argument").
pub fn positive(name: &'static str, value: i64) -> Result<usize> {
    usize::try_from(value).ok().filter(|&v| v >= 1).ok_or_else(|| Error::InvalidParameter {
        name,
        reason: format!("{value} is not a positive count (must be at least 1)"),
    })
}

/// `--quantize TYPE`: the tensor type of a file type name (`q4_k_m` → Q4_K).
pub fn load_quant_type(s: &str) -> Result<candle_core::quantized::GgmlDType> {
    Ok(metal_candle::quantize::FileType::parse(s)?.default_type())
}

/// The name an adapter is applied under: its path as given (unique per `--adapter`).
fn adapter_name(path: &Path) -> String {
    path.display().to_string()
}

pub fn no_tokenizer() -> Error {
    Error::InvalidParameter {
        name: "tokenizer",
        reason: "the model has no tokenizer; pass --tokenizer PATH".into(),
    }
}

/// The model library at `$METAL_CANDLE_HOME`, else the platform cache dir: `~/Library/Caches/
/// metal-candle` on macOS, `$XDG_CACHE_HOME/metal-candle` or `~/.cache/metal-candle` elsewhere.
pub fn library() -> ModelLibrary {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = var("METAL_CANDLE_HOME").unwrap_or_else(|| {
        let user = var("HOME").unwrap_or_else(|| PathBuf::from("."));
        let cache = if cfg!(target_os = "macos") { user.join("Library/Caches") } else { var("XDG_CACHE_HOME").unwrap_or_else(|| user.join(".cache")) };
        cache.join("metal-candle")
    });
    // The Hub cache as huggingface_hub finds it: $HF_HUB_CACHE, else $HF_HOME/hub, else
    // $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
    let hf_cache = var("HF_HUB_CACHE").or_else(|| var("HF_HOME").map(|h| h.join("hub"))).or_else(|| {
        let user = var("HOME")?;
        Some(var("XDG_CACHE_HOME").unwrap_or_else(|| user.join(".cache")).join("huggingface").join("hub"))
    });
    ModelLibrary::open(&LibraryConfig { home, hf_cache })
}

/// The kernel switches of the environment (`METAL_CANDLE_CPU_KERNELS=0`,
/// `METAL_CANDLE_CUSTOM_KERNELS=1`): the binary reads them, the library never does.
pub fn kernel_policy() -> KernelPolicy {
    let var = |name: &str| std::env::var(name).ok();
    KernelPolicy::from_switches(var(CPU_KERNELS_ENV).as_deref(), var(CUSTOM_KERNELS_ENV).as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_flag_parses_path_and_optional_scale() {
        let p = |s: &str| parse_adapter(s).unwrap();
        assert_eq!(p("dir/a"), AdapterArg { path: "dir/a".into(), scale: 1.0 });
        assert_eq!(p("dir/a:0.5"), AdapterArg { path: "dir/a".into(), scale: 0.5 });
        assert_eq!(p("C:/x/a.gguf:-1"), AdapterArg { path: "C:/x/a.gguf".into(), scale: -1.0 });
        assert_eq!(p("odd:name"), AdapterArg { path: "odd:name".into(), scale: 1.0 });
        assert!(parse_adapter("a:inf").is_err());
        assert!(parse_adapter(":2").is_err());
    }
}
