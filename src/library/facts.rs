//! What a model file says about itself, read from headers only: a GGUF's metadata and tensor
//! table, or an HF directory's `config.json`, safetensors headers and tokenizer files. No weight
//! is read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::gguf::config_from_gguf;
use crate::config::hf::load_hf_config;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;

/// A safetensors header larger than this is not read (real ones are a few MB at most).
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// The facts `models show` prints and the context probe's memory estimate uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    /// `gguf` or `safetensors`.
    pub format: String,
    /// The normalised architecture (`Llama`, `Qwen2`, `Qwen3`, `Mistral`).
    pub architecture: String,
    /// Weight elements summed over every tensor.
    pub parameters: u64,
    /// Tensor count per storage type (`Q4_1`, `F32`, `BF16`, …).
    pub quant_mix: BTreeMap<String, usize>,
    /// Bytes on disk (a directory: every file in it).
    pub size_bytes: u64,
    /// The context the model declares (`max_position_embeddings`, GGUF `context_length`).
    pub declared_context: usize,
    /// Whether a chat template ships with the model.
    pub chat_template: bool,
    /// Where the tokenizer comes from: `gguf`, `tokenizer.json` or `none`.
    pub tokenizer: String,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
}

impl ModelFacts {
    /// Reads the facts of a GGUF file or HF model directory.
    ///
    /// Errors: [`Error::NotAModel`] for anything else; the loader's typed errors for malformed
    /// headers.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            hf_facts(path)
        } else if path.is_file() {
            gguf_facts(path)
        } else {
            Err(Error::NotAModel { path: path.to_path_buf(), reason: "no such file or directory".into() })
        }
    }

    fn from_config(cfg: &ModelConfig, format: &str, tensors: Tensors, size_bytes: u64) -> Self {
        Self {
            format: format.into(),
            architecture: format!("{:?}", cfg.arch),
            parameters: tensors.parameters,
            quant_mix: tensors.types,
            size_bytes,
            declared_context: cfg.max_position_embeddings,
            chat_template: false,
            tokenizer: "none".into(),
            num_layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
        }
    }
}

#[derive(Default)]
struct Tensors {
    parameters: u64,
    types: BTreeMap<String, usize>,
}

impl Tensors {
    fn add(&mut self, dtype: String, elements: u64) {
        self.parameters += elements;
        *self.types.entry(dtype).or_default() += 1;
    }
}

fn gguf_facts(path: &Path) -> Result<ModelFacts> {
    let file = GgufFile::open(path)?;
    let content = file.content();
    // rope_freqs only changes RoPE scaling, which no fact here depends on.
    let cfg = config_from_gguf(content, path, None)?;
    let mut tensors = Tensors::default();
    for info in content.tensor_infos.values() {
        tensors.add(format!("{:?}", info.ggml_dtype), info.shape.elem_count() as u64);
    }
    let size = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    let mut facts = ModelFacts::from_config(&cfg, "gguf", tensors, size);
    facts.chat_template = content.metadata.contains_key("tokenizer.chat_template");
    if content.metadata.contains_key("tokenizer.ggml.model") {
        facts.tokenizer = "gguf".into();
    }
    Ok(facts)
}

fn hf_facts(dir: &Path) -> Result<ModelFacts> {
    let cfg = load_hf_config(&dir.join("config.json"))?;
    let mut size = 0;
    let files = dir_files(dir)?;
    for path in &files {
        size += std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    }
    let mut tensors = Tensors::default();
    for path in weight_files(dir, &files)? {
        read_safetensors_header(&path, &mut tensors)?;
    }
    let mut facts = ModelFacts::from_config(&cfg, "safetensors", tensors, size);
    facts.chat_template = hf_has_template(dir)?;
    if dir.join("tokenizer.json").is_file() {
        facts.tokenizer = "tokenizer.json".into();
    }
    Ok(facts)
}

/// The regular files directly inside `dir`, sorted.
pub(crate) fn dir_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The shards `model.safetensors.index.json` names, else `model.safetensors`, else every
/// `*.safetensors` file (the loader's order of preference).
fn weight_files(dir: &Path, files: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json { path: index.clone(), source: e })?;
        let shards: std::collections::BTreeSet<&str> =
            json.get("weight_map").and_then(|m| m.as_object()).into_iter().flatten().filter_map(|(_, f)| f.as_str()).collect();
        return Ok(shards.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Ok(files.iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).cloned().collect())
}

/// A template in `tokenizer_config.json` (`chat_template`) or in `chat_template.jinja`.
fn hf_has_template(dir: &Path) -> Result<bool> {
    if dir.join("chat_template.jinja").is_file() || dir.join("chat_template.json").is_file() {
        return Ok(true);
    }
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(false) };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json { path, source: e })?;
    Ok(json.get("chat_template").is_some_and(|t| !t.is_null()))
}

#[derive(Deserialize)]
struct HeaderTensor {
    dtype: String,
    shape: Vec<u64>,
}

/// Adds the tensors of one safetensors file: an 8-byte little-endian header length, then JSON.
fn read_safetensors_header(path: &Path, tensors: &mut Tensors) -> Result<()> {
    let bad = |reason: String| Error::NotAModel { path: path.to_path_buf(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_SAFETENSORS_HEADER {
        return Err(bad(format!("safetensors header of {len} bytes (at most {MAX_SAFETENSORS_HEADER})")));
    }
    let mut header = Vec::new();
    file.take(len).read_to_end(&mut header).map_err(|e| Error::io(path, e))?;
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
    for (name, value) in map {
        if name == "__metadata__" {
            continue;
        }
        let t: HeaderTensor = serde_json::from_value(value).map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
        tensors.add(t.dtype, t.shape.iter().product());
    }
    Ok(())
}
