//! LoRA adapters in the library: PEFT directories and llama.cpp GGUF adapters, each known by name
//! with the facts its headers give (rank, alpha, targets, the base it was trained on) and,
//! optionally, the library model it belongs to.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterError, PeftConfig, DEFAULT_MAX_RANK};
use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;

/// One adapter of the library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterEntry {
    /// The stable id (`--adapter NAME`).
    pub name: String,
    /// The PEFT directory or GGUF adapter file.
    pub path: PathBuf,
    /// Whether `path` is a copy inside the library's models folder.
    pub copied: bool,
    /// When it was added (RFC 3339, UTC).
    pub added: String,
    /// What its headers say.
    pub facts: AdapterFacts,
    /// The library model it is for (`models add --base NAME`); `None`: matched by
    /// [`AdapterFacts::base_model`].
    #[serde(default)]
    pub base: Option<String>,
}

/// An adapter's header facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterFacts {
    /// `peft` or `gguf`.
    pub format: String,
    /// The default rank (PEFT `r`; a GGUF adapter's first A matrix).
    pub rank: usize,
    /// `lora_alpha` / `adapter.lora.alpha`.
    pub alpha: f64,
    /// Scaling alpha/√r (PEFT `use_rslora`).
    pub rslora: bool,
    /// The targeted modules (`q_proj`, …; GGUF names such as `attn_q` for GGUF adapters).
    pub targets: Vec<String>,
    /// What the adapter says it was trained on: PEFT `base_model_name_or_path`, a GGUF's
    /// `general.base_model.0.name` (or `.repo_url`), else its architecture.
    pub base_model: Option<String>,
    /// Bytes on disk.
    pub size_bytes: u64,
}

/// Whether `path` is an adapter (a directory with `adapter_config.json`, or a GGUF whose
/// `general.type` is `adapter`) rather than a model.
pub fn is_adapter(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("adapter_config.json").is_file();
    }
    path.is_file() && GgufFile::open(path).is_ok_and(|f| f.content().metadata.get("general.type").and_then(|v| v.to_string().ok()).is_some_and(|t| t == "adapter"))
}

fn bad(path: &Path, source: AdapterError) -> Error {
    Error::Adapter { path: path.to_path_buf(), source }
}

impl AdapterFacts {
    /// Reads a PEFT directory's `adapter_config.json` (checked as the loader checks it) and
    /// weight sizes, or a GGUF adapter's metadata and tensor table. No weight is read.
    ///
    /// Errors: [`Error::Adapter`] for a malformed adapter; [`Error::NotAModel`] for a path that
    /// is neither.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            peft_facts(path)
        } else if path.is_file() {
            gguf_facts(path)
        } else {
            Err(Error::NotAModel { path: path.to_path_buf(), reason: "no such file or directory".into() })
        }
    }
}

fn peft_facts(dir: &Path) -> Result<AdapterFacts> {
    let file = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let cfg = PeftConfig::parse(&text, DEFAULT_MAX_RANK).map_err(|e| bad(dir, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json { path: file.clone(), source: e })?;
    let targets = match json.get("target_modules") {
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(|t| t.as_str()).map(str::to_string).collect(),
        Some(serde_json::Value::String(re)) => vec![re.clone()],
        _ => Vec::new(),
    };
    let mut size = 0;
    for path in super::facts::dir_files(dir)? {
        size += std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
    }
    let base_model = json.get("base_model_name_or_path").and_then(|b| b.as_str()).filter(|b| !b.is_empty()).map(str::to_string);
    Ok(AdapterFacts { format: "peft".into(), rank: cfg.r, alpha: cfg.lora_alpha, rslora: cfg.use_rslora, targets, base_model, size_bytes: size })
}

fn gguf_facts(path: &Path) -> Result<AdapterFacts> {
    let file = GgufFile::open(path)?;
    let content = file.content();
    let string = |key: &str| content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
    if string("general.type").as_deref() != Some("adapter") {
        return Err(Error::NotAModel { path: path.to_path_buf(), reason: "a GGUF model, not an adapter (`general.type` is not `adapter`)".into() });
    }
    let alpha = match content.metadata.get("adapter.lora.alpha") {
        Some(candle_core::quantized::gguf_file::Value::F32(a)) if a.is_finite() => f64::from(*a),
        Some(candle_core::quantized::gguf_file::Value::F64(a)) if a.is_finite() => *a,
        _ => return Err(bad(path, AdapterError::GgufKey { key: "adapter.lora.alpha", expected: "a finite float" })),
    };
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut targets: Vec<String> = Vec::new();
    let mut rank = 0;
    for name in names {
        let Some(stem) = name.strip_suffix(".weight.lora_a") else { continue };
        if rank == 0 {
            rank = content.tensor_infos[name].shape.dims().first().copied().unwrap_or(0);
        }
        let module = stem.split('.').skip(2).collect::<Vec<_>>().join(".");
        if !module.is_empty() && !targets.contains(&module) {
            targets.push(module);
        }
    }
    let base_model = string("general.base_model.0.name").or_else(|| string("general.base_model.0.repo_url")).or_else(|| string("general.architecture"));
    let size_bytes = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    Ok(AdapterFacts { format: "gguf".into(), rank, alpha, rslora: false, targets, base_model, size_bytes })
}

impl AdapterEntry {
    /// Whether this adapter belongs to the library model `name` at `path`: its `base` is
    /// `name`, or (no `base` set) what it says it was trained on names that model — the same
    /// name, or a path or repo id whose last part is the model's name or its file or directory
    /// name.
    pub fn is_for(&self, name: &str, path: &Path) -> bool {
        if let Some(base) = &self.base {
            return base == name;
        }
        let Some(trained_on) = &self.facts.base_model else { return false };
        let last = trained_on.trim_end_matches('/').rsplit(['/', '\\']).next().unwrap_or(trained_on);
        let stem = super::default_name(path);
        let dir = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = path.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned());
        trained_on == name || last == name || last == stem || last == dir || (path.is_file() && parent.as_deref() == Some(last)) || name.rsplit_once('/').is_some_and(|(_, n)| n == last)
    }
}
