//! The sentence-transformers directory layout → one [`SentenceConfig`], and an encoder's
//! `config.json` → [`EncoderConfig`].
//!
//! Files read (all optional except `config.json`): `modules.json` (which modules run: a `Normalize`
//! module means L2 normalisation), the pooling module's `config.json` (usually `1_Pooling/`),
//! `sentence_bert_config.json` (`max_seq_length`) and `config_sentence_transformers.json`
//! (`prompts`, `default_prompt_name`). Missing files get sentence-transformers' own defaults for a
//! plain transformers directory: mean pooling, no normalisation, the model's position limit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::pooling::Pooling;
use crate::error::{Error, Result};

/// The sentence-transformers pooling module's type name in `modules.json`.
const POOLING_MODULE: &str = "sentence_transformers.models.Pooling";
/// The L2-normalisation module's type name in `modules.json`.
const NORMALIZE_MODULE: &str = "sentence_transformers.models.Normalize";
/// The module that runs the transformer itself.
const TRANSFORMER_MODULE: &str = "sentence_transformers.models.Transformer";
/// Where sentence-transformers puts the pooling config when `modules.json` is absent.
const DEFAULT_POOLING_DIR: &str = "1_Pooling";

/// What the sentence-transformers files say about pooling, normalisation, length and prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceConfig {
    /// How token vectors become one sentence vector (the `1_Pooling/config.json` mode).
    pub pooling: Pooling,
    /// Whether a `Normalize` module follows pooling (L2 normalisation).
    pub normalize: bool,
    /// `sentence_bert_config.json`'s `max_seq_length` (special tokens included), if given.
    pub max_seq_length: Option<usize>,
    /// Named prompts prepended to the input text (`query`, `document`, …).
    pub prompts: BTreeMap<String, String>,
    /// The prompt applied when the caller names none.
    pub default_prompt_name: Option<String>,
    /// Whether the directory has sentence-transformers files at all (`modules.json` or a pooling
    /// config): a decoder is only an embedder when it does.
    pub has_sentence_files: bool,
}

/// Reads the sentence-transformers files of `dir`.
///
/// Errors: invalid JSON, a pooling config with no mode, several modes, or a mode we do not
/// implement ([`Error::InvalidConfig`] naming the field), a module type we do not know.
pub fn load_sentence_config(dir: &Path) -> Result<SentenceConfig> {
    let modules = read_optional_json(&dir.join("modules.json"))?;
    let (pooling_dir, normalize) = match &modules {
        Some(m) => parse_modules(m, &dir.join("modules.json"))?,
        None => (Some(DEFAULT_POOLING_DIR.to_string()), false),
    };
    let pooling_path = pooling_dir.map(|d| dir.join(d).join("config.json"));
    let pooling_json = match &pooling_path {
        Some(p) => read_optional_json(p)?,
        None => None,
    };
    let pooling = match (&pooling_json, &pooling_path) {
        (Some(json), Some(path)) => parse_pooling(json, path)?,
        _ => Pooling::Mean,
    };
    let st_path = dir.join("sentence_bert_config.json");
    let max_seq_length = match read_optional_json(&st_path)? {
        Some(json) => optional_count(&json, "max_seq_length", &st_path)?,
        None => None,
    };
    let prompts_path = dir.join("config_sentence_transformers.json");
    let (prompts, default_prompt_name) = match read_optional_json(&prompts_path)? {
        Some(json) => parse_prompts(&json, &prompts_path)?,
        None => (BTreeMap::new(), None),
    };
    Ok(SentenceConfig {
        pooling,
        normalize,
        max_seq_length,
        prompts,
        default_prompt_name,
        has_sentence_files: modules.is_some() || pooling_json.is_some(),
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), field: field.to_string(), reason: reason.into() }
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// The pooling module's folder and whether a `Normalize` module is present.
fn parse_modules(json: &Value, path: &Path) -> Result<(Option<String>, bool)> {
    let modules = Vec::<Module>::deserialize(json).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    let mut pooling_dir = None;
    let mut normalize = false;
    for m in modules {
        match m.kind.as_str() {
            TRANSFORMER_MODULE => {}
            POOLING_MODULE => pooling_dir = Some(m.path),
            NORMALIZE_MODULE => normalize = true,
            other => {
                return Err(invalid(path, "type", format!("module `{other}` is not supported (supported: Transformer, Pooling, Normalize)")))
            }
        }
    }
    // Only plain folder names: the module path must stay inside the model directory.
    if let Some(dir) = &pooling_dir {
        if dir.split(['/', '\\']).any(|part| part == "..") || Path::new(dir).is_absolute() {
            return Err(invalid(path, "path", format!("`{dir}` is not a folder inside the model directory")));
        }
    }
    Ok((pooling_dir, normalize))
}

/// The one pooling mode set in a sentence-transformers `1_Pooling/config.json`.
fn parse_pooling(json: &Value, path: &Path) -> Result<Pooling> {
    let obj = json.as_object().ok_or_else(|| invalid(path, "pooling", "not a JSON object"))?;
    if obj.get("include_prompt").and_then(Value::as_bool) == Some(false) {
        return Err(invalid(path, "include_prompt", "excluding the prompt from pooling is not supported"));
    }
    let mut modes = Vec::new();
    for (key, value) in obj.iter().filter(|(k, _)| k.starts_with("pooling_mode_")) {
        match value {
            Value::Bool(false) => continue,
            Value::Bool(true) => {}
            _ => return Err(invalid(path, key, "expected true or false")),
        }
        let mode = key.trim_start_matches("pooling_mode_");
        let pooling = Pooling::from_sentence_transformers(mode)
            .ok_or_else(|| invalid(path, key, format!("pooling mode `{mode}` is not supported (supported: {})", Pooling::SUPPORTED)))?;
        modes.push(pooling);
    }
    match modes.as_slice() {
        [one] => Ok(*one),
        [] => Err(invalid(path, "pooling_mode_*", "no pooling mode is set")),
        _ => Err(invalid(path, "pooling_mode_*", "several pooling modes (concatenated outputs) are not supported")),
    }
}

fn optional_count(json: &Value, field: &str, path: &Path) -> Result<Option<usize>> {
    match json.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(path, field, format!("expected a positive integer, got {v}"))),
        },
    }
}

fn parse_prompts(json: &Value, path: &Path) -> Result<(BTreeMap<String, String>, Option<String>)> {
    let prompts = match json.get("prompts") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => BTreeMap::<String, String>::deserialize(v).map_err(|source| Error::Json { path: path.to_path_buf(), source })?,
    };
    let default = match json.get("default_prompt_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if prompts.contains_key(name) => Some(name.clone()),
        Some(v) => return Err(invalid(path, "default_prompt_name", format!("{v} is not one of the prompts"))),
    };
    Ok((prompts, default))
}

/// The encoder families implemented here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderArch {
    /// HF `BertModel` (MiniLM, E5, BGE, GTE): absolute positions, token types.
    Bert,
    /// HF `MPNetModel`: positions after the padding id, a relative position bias shared by all
    /// layers, no token types.
    MPNet,
}

/// The feed-forward activation of an encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact erf form (PyTorch `nn.GELU()`).
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
}

/// Everything an encoder needs from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Which encoder to run (BERT or MPNet).
    pub arch: EncoderArch,
    /// Number of tokens in the word embedding table.
    pub vocab_size: usize,
    /// Width of the hidden states (the embedding dimension before pooling).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Rows of the position embedding table (the longest input, in tokens).
    pub max_position_embeddings: usize,
    /// BERT only (0 for MPNet).
    pub type_vocab_size: usize,
    /// The epsilon added inside every LayerNorm.
    pub layer_norm_eps: f64,
    /// The padding token id (MPNet counts positions after it).
    pub pad_token_id: usize,
    /// MPNet only (0 for BERT).
    pub relative_attention_num_buckets: usize,
    /// The feed-forward activation (from `hidden_act`).
    pub activation: Activation,
}

/// Upper bound on layers, heads and widths read from a config (a typo must not allocate terabytes).
const MAX_DIM: usize = 1 << 20;

/// The architectures [`EncoderConfig::from_json`] recognises, for error messages.
pub const SUPPORTED_ENCODERS: &str = "BertModel (bert), MPNetModel (mpnet)";

impl EncoderConfig {
    /// The encoder family named by `architectures` / `model_type`, or `None` (a decoder, or
    /// something else).
    pub fn detect(json: &Value) -> Option<EncoderArch> {
        let archs = json.get("architectures").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str);
        let model_type = json.get("model_type").and_then(Value::as_str);
        archs.chain(model_type).find_map(|name| match name {
            "BertModel" | "BertForMaskedLM" | "BertForPreTraining" | "bert" => Some(EncoderArch::Bert),
            "MPNetModel" | "MPNetForMaskedLM" | "mpnet" => Some(EncoderArch::MPNet),
            _ => None,
        })
    }

    /// Parses an encoder `config.json` (already read as `json`; `path` names it in errors).
    ///
    /// Errors: missing or non-positive sizes, heads not dividing the width, an activation or
    /// position embedding type we do not implement.
    pub fn from_json(json: &Value, arch: EncoderArch, path: &Path) -> Result<Self> {
        let count = |field: &str, default: Option<usize>| -> Result<usize> {
            match optional_count(json, field, path)?.or(default) {
                Some(n) if n <= MAX_DIM => Ok(n),
                Some(n) => Err(invalid(path, field, format!("{n} is larger than {MAX_DIM}"))),
                None => Err(Error::MissingConfigField { path: path.to_path_buf(), field: field.to_string() }),
            }
        };
        let hidden_size = count("hidden_size", None)?;
        let num_attention_heads = count("num_attention_heads", None)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(invalid(path, "num_attention_heads", format!("{num_attention_heads} does not divide hidden_size {hidden_size}")));
        }
        let is_bert = arch == EncoderArch::Bert;
        if let Some(kind) = json.get("position_embedding_type").and_then(Value::as_str) {
            if kind != "absolute" {
                return Err(invalid(path, "position_embedding_type", format!("`{kind}` is not supported (only absolute)")));
            }
        }
        Ok(Self {
            arch,
            vocab_size: count("vocab_size", None)?,
            hidden_size,
            num_hidden_layers: count("num_hidden_layers", None)?,
            num_attention_heads,
            intermediate_size: count("intermediate_size", None)?,
            max_position_embeddings: count("max_position_embeddings", None)?,
            type_vocab_size: if is_bert { count("type_vocab_size", Some(2))? } else { 0 },
            layer_norm_eps: json.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-12),
            pad_token_id: json.get("pad_token_id").and_then(Value::as_u64).map_or(if is_bert { 0 } else { 1 }, |v| v as usize),
            relative_attention_num_buckets: if is_bert { 0 } else { count("relative_attention_num_buckets", Some(32))? },
            activation: parse_activation(json, path)?,
        })
    }

    /// The longest input (special tokens included) the position table allows. MPNet's positions
    /// start after the padding id (HF `create_position_ids_from_input_ids`).
    pub fn max_positions(&self) -> usize {
        match self.arch {
            EncoderArch::Bert => self.max_position_embeddings,
            EncoderArch::MPNet => self.max_position_embeddings.saturating_sub(self.pad_token_id + 1),
        }
    }
}

fn parse_activation(json: &Value, path: &Path) -> Result<Activation> {
    match json.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu") {
        "gelu" => Ok(Activation::GeluErf),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        other => Err(invalid(path, "hidden_act", format!("`{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh)"))),
    }
}

/// `config.json` of `dir`, read as JSON.
pub fn read_model_config(dir: &Path) -> Result<(Value, PathBuf)> {
    let path = dir.join("config.json");
    let value = read_optional_json(&path)?.ok_or_else(|| Error::NotAModel {
        path: dir.to_path_buf(),
        reason: "no config.json (an embedding model is a sentence-transformers or HF model directory)".into(),
    })?;
    Ok((value, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pooling_config_needs_exactly_one_known_mode() {
        let p = Path::new("1_Pooling/config.json");
        let ok = json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false});
        assert_eq!(parse_pooling(&ok, p).unwrap(), Pooling::Cls);
        let none = json!({"pooling_mode_mean_tokens": false});
        assert!(matches!(parse_pooling(&none, p), Err(Error::InvalidConfig { .. })));
        let two = json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true});
        assert!(matches!(parse_pooling(&two, p), Err(Error::InvalidConfig { .. })));
        let unknown = json!({"pooling_mode_attention": true});
        let err = parse_pooling(&unknown, p).unwrap_err().to_string();
        assert!(err.contains("pooling_mode_attention") && err.contains("not supported"), "{err}");
        let weighted = json!({"pooling_mode_weightedmean_tokens": true});
        assert!(matches!(parse_pooling(&weighted, p), Err(Error::InvalidConfig { .. })));
    }

    #[test]
    fn modules_paths_stay_inside_the_directory() {
        let p = Path::new("modules.json");
        let bad = json!([{"type": POOLING_MODULE, "path": "../elsewhere"}]);
        assert!(matches!(parse_modules(&bad, p), Err(Error::InvalidConfig { .. })));
        let unknown = json!([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]);
        assert!(matches!(parse_modules(&unknown, p), Err(Error::InvalidConfig { .. })));
        let ok = json!([{"type": TRANSFORMER_MODULE, "path": ""}, {"type": POOLING_MODULE, "path": "1_Pooling"}, {"type": NORMALIZE_MODULE}]);
        assert_eq!(parse_modules(&ok, p).unwrap(), (Some("1_Pooling".into()), true));
    }

    #[test]
    fn default_prompt_must_be_a_named_prompt() {
        let p = Path::new("config_sentence_transformers.json");
        let ok = json!({"prompts": {"query": "q: "}, "default_prompt_name": "query"});
        assert_eq!(parse_prompts(&ok, p).unwrap().1.as_deref(), Some("query"));
        let bad = json!({"prompts": {"query": "q: "}, "default_prompt_name": "passage"});
        assert!(matches!(parse_prompts(&bad, p), Err(Error::InvalidConfig { .. })));
    }
}
