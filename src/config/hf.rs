//! `config.json` (HF transformers) → [`ModelConfig`].
//!
//! Accepts both the Hub's keys (`rope_theta`, `rope_scaling`) and transformers 5's
//! `rope_parameters`; `eos_token_id` as a number or a list.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{check_limit, Arch, ModelConfig, RopeScaling, MAX_LAYERS, SUPPORTED_ARCHS};
use crate::error::{Error, Result};

/// The raw fields we read; everything optional so missing ones get a named error.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    hidden_act: Option<String>,
}

/// Reads and normalises `config.json` at `path`.
pub fn load_hf_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_hf_config(&text, path)
}

/// Normalises the text of a `config.json`; `path` only names the file in errors.
pub fn parse_hf_config(text: &str, path: &Path) -> Result<ModelConfig> {
    let json: Value = serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let raw = RawConfig::deserialize(&json).map_err(|source| {
        bad_field(&json, path).unwrap_or_else(|| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    })?;
    let missing = |field: &str| Error::MissingConfigField {
        path: path.to_path_buf(),
        field: field.to_string(),
    };
    let invalid = |field: &str, reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    let arch = detect_arch(&raw, path)?;
    if let Some(act) = &raw.hidden_act {
        if act != "silu" {
            return Err(invalid("hidden_act", format!("`{act}` is not supported (only silu)")));
        }
    }
    let hidden_size = raw.hidden_size.ok_or_else(|| missing("hidden_size"))?;
    let num_attention_heads = raw.num_attention_heads.ok_or_else(|| missing("num_attention_heads"))?;
    if num_attention_heads == 0 {
        return Err(invalid("num_attention_heads", "must be positive".into()));
    }
    let num_hidden_layers = raw.num_hidden_layers.ok_or_else(|| missing("num_hidden_layers"))?;
    check_limit("num_hidden_layers", num_hidden_layers, MAX_LAYERS, path)?;
    let head_dim = raw.head_dim.unwrap_or(hidden_size / num_attention_heads);
    let (rope_theta, rope_scaling) = parse_rope(&raw, path)?;
    let layer_windows = layer_windows(&raw, arch, num_hidden_layers, path)?;
    let attention_bias = raw.attention_bias.unwrap_or(false);
    let config = ModelConfig {
        arch,
        vocab_size: raw.vocab_size.ok_or_else(|| missing("vocab_size"))?,
        hidden_size,
        intermediate_size: raw.intermediate_size.ok_or_else(|| missing("intermediate_size"))?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
        head_dim,
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        rope_interleaved: false,
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        // HF Qwen2Attention hard-codes bias on q/k/v and none on o_proj.
        qkv_bias: arch == Arch::Qwen2 || attention_bias,
        o_bias: arch != Arch::Qwen2 && attention_bias,
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        qk_norm: arch == Arch::Qwen3,
        layer_windows,
        bos_token_id: token_ids(raw.bos_token_id.as_ref(), "bos_token_id", path)?.first().copied(),
        eos_token_ids: token_ids(raw.eos_token_id.as_ref(), "eos_token_id", path)?,
    };
    config.validate(path)?;
    Ok(config)
}

/// serde_json's type errors give a line and column but not the key: deserialize the fields one at
/// a time (all are optional) to name the one with the wrong type or a negative/fractional count.
fn bad_field(json: &Value, path: &Path) -> Option<Error> {
    json.as_object()?.iter().find_map(|(key, value)| {
        let alone = Value::Object(std::iter::once((key.clone(), value.clone())).collect());
        RawConfig::deserialize(&alone).err().map(|e| Error::InvalidConfig {
            path: path.to_path_buf(),
            field: key.clone(),
            reason: e.to_string(),
        })
    })
}

fn detect_arch(raw: &RawConfig, path: &Path) -> Result<Arch> {
    let names: Vec<&str> = raw
        .architectures
        .iter()
        .flatten()
        .map(String::as_str)
        .chain(raw.model_type.as_deref())
        .collect();
    for name in &names {
        let arch = match *name {
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Arch::Qwen3,
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            _ => continue,
        };
        return Ok(arch);
    }
    Err(Error::UnsupportedArchitecture {
        path: path.to_path_buf(),
        arch: names.first().map_or_else(|| "<none given>".to_string(), |s| s.to_string()),
        supported: SUPPORTED_ARCHS,
    })
}

/// `rope_theta` + `rope_scaling` (Hub) or `rope_parameters` (transformers 5).
fn parse_rope(raw: &RawConfig, path: &Path) -> Result<(f64, Option<RopeScaling>)> {
    let params = raw.rope_parameters.as_ref().filter(|v| !v.is_null());
    let theta = raw
        .rope_theta
        .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
        .unwrap_or(10_000.0);
    let scaling = match raw.rope_scaling.as_ref().filter(|v| !v.is_null()).or(params) {
        None => None,
        Some(s) => parse_rope_scaling(s, path)?,
    };
    Ok((theta, scaling))
}

fn parse_rope_scaling(s: &Value, path: &Path) -> Result<Option<RopeScaling>> {
    let invalid = |reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        field: "rope_scaling".into(),
        reason,
    };
    let kind = match s.get("rope_type").or_else(|| s.get("type")) {
        Some(kind) => kind
            .as_str()
            .ok_or_else(|| invalid(format!("rope type `{kind}` is not a string")))?,
        // transformers 5's `rope_parameters` may hold only `rope_theta`; anything more (a scaling
        // factor) without a type is ambiguous (transformers rejects it too).
        None if s.as_object().is_some_and(|o| o.keys().all(|k| k == "rope_theta")) => "default",
        None => return Err(invalid("scaling parameters without `rope_type`".into())),
    };
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |key: &str| {
                s.get(key)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| invalid(format!("llama3 scaling needs a numeric `{key}`")))
            };
            let original = s
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| invalid("llama3 scaling needs `original_max_position_embeddings`".into()))?;
            Ok(Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: usize::try_from(original)
                    .map_err(|_| invalid("original_max_position_embeddings is too large".into()))?,
            }))
        }
        other => Err(invalid(format!(
            "rope type `{other}` is not supported (supported: default, llama3)"
        ))),
    }
}

/// Which layers use sliding-window attention, following HF: `layer_types` when given; Mistral
/// applies `sliding_window` to every layer; Qwen2 only with `use_sliding_window`, from
/// `max_window_layers` on.
fn layer_windows(raw: &RawConfig, arch: Arch, n_layers: usize, path: &Path) -> Result<Vec<Option<usize>>> {
    let window = raw.sliding_window;
    if let Some(types) = &raw.layer_types {
        if types.len() != n_layers {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                field: "layer_types".into(),
                reason: format!("{} entries for {n_layers} layers", types.len()),
            });
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => window.map(Some).ok_or_else(|| Error::MissingConfigField {
                    path: path.to_path_buf(),
                    field: "sliding_window".into(),
                }),
                other => Err(Error::InvalidConfig {
                    path: path.to_path_buf(),
                    field: "layer_types".into(),
                    reason: format!("unknown layer type `{other}`"),
                }),
            })
            .collect();
    }
    let windows = match arch {
        Arch::Mistral => vec![window; n_layers],
        Arch::Qwen2 | Arch::Qwen3 if raw.use_sliding_window.unwrap_or(false) => {
            let first = raw.max_window_layers.unwrap_or(n_layers);
            (0..n_layers).map(|i| if i >= first { window } else { None }).collect()
        }
        _ => vec![None; n_layers],
    };
    Ok(windows)
}

fn token_ids(v: Option<&Value>, field: &'static str, path: &Path) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::InvalidConfig {
                path: path.to_path_buf(),
                field: field.to_string(),
                reason: format!("`{v}` is not a token id"),
            })
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_HUB: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "max_position_embeddings": 128, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": [2, 3, 4]
    }"#;

    fn parse(text: &str) -> Result<ModelConfig> {
        parse_hf_config(text, Path::new("config.json"))
    }

    #[test]
    fn hub_and_transformers5_rope_keys_agree() {
        let hub = parse(LLAMA3_HUB).unwrap();
        let t5 = LLAMA3_HUB
            .replace(r#""rope_theta": 500000.0,"#, "")
            .replace(r#""rope_scaling": {"rope_type""#, r#""rope_parameters": {"rope_theta": 500000.0, "rope_type""#);
        let t5 = parse(&t5).unwrap();
        assert_eq!(hub, t5);
        assert_eq!(hub.rope_theta, 500000.0);
        assert!(matches!(hub.rope_scaling, Some(RopeScaling::Llama3 { original_max_position_embeddings: 16, .. })));
        assert_eq!(hub.eos_token_ids, vec![2, 3, 4]);
        assert_eq!(hub.head_dim, 16);
        assert_eq!(hub.n_rep(), 4);
    }

    #[test]
    fn mistral_window_applies_to_every_layer_and_qwen2_only_when_enabled() {
        let mistral = LLAMA3_HUB
            .replace("LlamaForCausalLM", "MistralForCausalLM")
            .replace(r#""tie_word_embeddings": true"#, r#""sliding_window": 8"#);
        assert_eq!(parse(&mistral).unwrap().layer_windows, vec![Some(8), Some(8)]);
        let qwen = LLAMA3_HUB
            .replace("LlamaForCausalLM", "Qwen2ForCausalLM")
            .replace(r#""tie_word_embeddings": true"#, r#""sliding_window": 8, "use_sliding_window": false"#);
        let qwen = parse(&qwen).unwrap();
        assert_eq!(qwen.layer_windows, vec![None, None]);
        assert!(qwen.qkv_bias && !qwen.o_bias);
    }

    #[test]
    fn defects_are_named() {
        let no_hidden = LLAMA3_HUB.replace(r#""hidden_size": 64,"#, "");
        assert!(matches!(parse(&no_hidden), Err(Error::MissingConfigField { field, .. }) if field == "hidden_size"));
        let bad_gqa = LLAMA3_HUB.replace(r#""num_key_value_heads": 1"#, r#""num_key_value_heads": 3"#);
        assert!(matches!(parse(&bad_gqa), Err(Error::InvalidConfig { field, .. }) if field == "num_key_value_heads"));
        let untyped = LLAMA3_HUB.replace(r#""rope_type": "llama3","#, "");
        assert!(matches!(parse(&untyped), Err(Error::InvalidConfig { field, .. }) if field == "rope_scaling"));
        let yarn = LLAMA3_HUB.replace(r#""rope_type": "llama3""#, r#""rope_type": "yarn""#);
        assert!(matches!(parse(&yarn), Err(Error::InvalidConfig { field, .. }) if field == "rope_scaling"));
        let gpt2 = LLAMA3_HUB.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        assert!(matches!(parse(&gpt2), Err(Error::UnsupportedArchitecture { .. })));
        assert!(matches!(parse("{"), Err(Error::Json { .. })));
        let zero_heads = LLAMA3_HUB.replace(r#""num_attention_heads": 4"#, r#""num_attention_heads": 0"#);
        assert!(matches!(parse(&zero_heads), Err(Error::InvalidConfig { .. })));
        let neg = LLAMA3_HUB.replace(r#""vocab_size": 128"#, r#""vocab_size": -5"#);
        assert!(matches!(parse(&neg), Err(Error::InvalidConfig { field, .. }) if field == "vocab_size"));
    }

    /// Finite but absurd numbers (issue 18): each an error naming its field.
    #[test]
    fn absurd_numbers_are_named() {
        for eps in ["0", "-1e-6", "1", "2.5", "1e308"] {
            let text = LLAMA3_HUB.replace(r#""rms_norm_eps": 1e-5"#, &format!(r#""rms_norm_eps": {eps}"#));
            assert!(matches!(parse(&text), Err(Error::InvalidConfig { field, .. }) if field == "rms_norm_eps"), "eps {eps}");
        }
        for theta in ["0.5", "-10000", "1"] {
            let text = LLAMA3_HUB.replace("500000.0", theta);
            assert!(matches!(parse(&text), Err(Error::InvalidConfig { field, .. }) if field == "rope_theta"), "theta {theta}");
        }
        let mut cfg = parse(LLAMA3_HUB).unwrap();
        for theta in [f64::NAN, f64::INFINITY] {
            cfg.rope_theta = theta;
            assert!(matches!(cfg.validate(Path::new("x")), Err(Error::InvalidConfig { field, .. }) if field == "rope_theta"));
        }
        cfg.rope_theta = 1e4;
        cfg.rms_norm_eps = f64::NAN;
        assert!(matches!(cfg.validate(Path::new("x")), Err(Error::InvalidConfig { field, .. }) if field == "rms_norm_eps"));
    }
}
