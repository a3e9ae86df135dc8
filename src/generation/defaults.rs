//! Chat sampling defaults from the model: `generation_config.json` beside HF weights, the
//! `general.sampling.*` keys of a GGUF file, else conversational defaults like Ollama's.
//!
//! Greedy decoding without a repetition penalty makes small chat models loop (SmolLM2-135M
//! answers "What is the capital of France?" with a repeating paragraph), so a chat needs sampling
//! settings; the model's authors know best, and Ollama's defaults are the fallback most users
//! have met. Plain completions keep [`SamplingParams::default`] (greedy).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::sampling::{SamplingParams, DEFAULT_PENALTY_WINDOW};

/// Ollama's defaults (`api/types.go` `DefaultOptions`): temperature 0.8, top-k 40, top-p 0.9,
/// repeat penalty 1.1 over the last 64 tokens.
pub const CONVERSATIONAL: SamplingParams = SamplingParams {
    temperature: 0.8,
    top_k: 40,
    top_p: 0.9,
    min_p: 0.0,
    repetition_penalty: 1.1,
    presence_penalty: 0.0,
    frequency_penalty: 0.0,
    penalty_window: DEFAULT_PENALTY_WINDOW,
    logit_bias: Vec::new(),
    seed: 0,
};

/// Where [`ChatDefaults::sampling`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultsSource {
    /// The model directory's `generation_config.json`.
    GenerationConfig,
    /// `general.sampling.*` keys in the GGUF metadata.
    GgufMetadata,
    /// The model states none: [`CONVERSATIONAL`].
    Conversational,
}

impl DefaultsSource {
    /// `"generation_config.json"`, `"GGUF metadata"` or `"conversational defaults"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultsSource::GenerationConfig => "generation_config.json",
            DefaultsSource::GgufMetadata => "GGUF metadata",
            DefaultsSource::Conversational => "conversational defaults",
        }
    }
}

/// Sampling settings for chat replies, as the model states them.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatDefaults {
    /// The settings (validated).
    pub sampling: SamplingParams,
    /// Where they came from.
    pub source: DefaultsSource,
}

impl Default for ChatDefaults {
    fn default() -> Self {
        Self { sampling: CONVERSATIONAL, source: DefaultsSource::Conversational }
    }
}

/// The longest chat reply for a context of `context` tokens: a quarter of it, so a reply never
/// crowds the conversation out of the context (the rest holds the system prompt and recent turns).
pub fn chat_reply_cap(context: usize) -> usize {
    (context / 4).max(1)
}

impl ChatDefaults {
    /// From a model directory's `generation_config.json`. HF semantics: the sampling fields count
    /// only with `do_sample: true` (missing ones take transformers' defaults: temperature 1, top-k
    /// 50, top-p 1); `do_sample: false` is greedy with the file's repetition penalty, which HF
    /// applies to the whole sequence. A file without `do_sample` states nothing: conversational.
    ///
    /// Errors: [`Error::Json`] for invalid JSON, [`Error::InvalidConfig`] for a field of the wrong
    /// type or out of range. A missing file is not an error.
    pub fn from_generation_config(path: &Path) -> Result<Self> {
        let Ok(text) = std::fs::read_to_string(path) else { return Ok(Self::default()) };
        let json: Json = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        let field = |key: &str| -> Result<Option<f64>> {
            match json.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| invalid(path, key, format!("expected a number, found {v}"))),
            }
        };
        let do_sample = match json.get("do_sample") {
            None | Some(Json::Null) => return Ok(Self::default()),
            Some(v) => v.as_bool().ok_or_else(|| invalid(path, "do_sample", format!("expected a bool, found {v}")))?,
        };
        let mut s = SamplingParams { penalty_window: usize::MAX, ..SamplingParams::default() };
        if let Some(rp) = field("repetition_penalty")? {
            s.repetition_penalty = rp as f32;
        }
        if do_sample {
            s.temperature = field("temperature")?.unwrap_or(1.0);
            s.top_k = field("top_k")?.map_or(50, |k| k as i64);
            s.top_p = field("top_p")?.unwrap_or(1.0);
            s.min_p = field("min_p")?.unwrap_or(0.0);
        }
        checked(s, DefaultsSource::GenerationConfig, path)
    }

    /// From GGUF metadata: llama.cpp's `general.sampling.{temp,top_k,top_p,min_p,penalty_repeat,
    /// penalty_last_n}` keys (`gguf-py` `Keys.General.SAMPLING_*`); keys the file lacks take
    /// llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no penalty). A file
    /// without any of them states nothing: conversational.
    ///
    /// Errors: [`Error::InvalidConfig`] for a key that is not a number or is out of range.
    pub fn from_gguf(metadata: &std::collections::HashMap<String, Value>, path: &Path) -> Result<Self> {
        let key = |name: &str| -> Result<Option<f64>> {
            let full = format!("general.sampling.{name}");
            match metadata.get(&full) {
                None => Ok(None),
                Some(v) => number(v).map(Some).ok_or_else(|| invalid(path, &full, format!("expected a number, found {:?}", v.value_type()))),
            }
        };
        let names = ["temp", "top_k", "top_p", "min_p", "penalty_repeat", "penalty_last_n"];
        if names.iter().all(|n| !metadata.contains_key(&format!("general.sampling.{n}"))) {
            return Ok(Self::default());
        }
        let s = SamplingParams {
            temperature: key("temp")?.unwrap_or(0.8),
            top_k: key("top_k")?.map_or(40, |k| k as i64),
            top_p: key("top_p")?.unwrap_or(0.95),
            min_p: key("min_p")?.unwrap_or(0.05),
            repetition_penalty: key("penalty_repeat")?.map_or(1.0, |r| r as f32),
            // llama.cpp: -1 means the whole context, 0 turns the penalties off.
            penalty_window: match key("penalty_last_n")? {
                Some(n) if n < 0.0 => usize::MAX,
                Some(n) => n as usize,
                None => DEFAULT_PENALTY_WINDOW,
            },
            ..SamplingParams::default()
        };
        checked(s, DefaultsSource::GgufMetadata, path)
    }
}

fn invalid(path: &Path, field: &str, reason: String) -> Error {
    Error::InvalidConfig { path: path.to_path_buf(), field: field.to_string(), reason }
}

/// Model-stated settings must pass the same validation as a caller's; the error names the file.
fn checked(sampling: SamplingParams, source: DefaultsSource, path: &Path) -> Result<ChatDefaults> {
    match sampling.validate() {
        Ok(()) => Ok(ChatDefaults { sampling, source }),
        Err(Error::InvalidParameter { name, reason }) => Err(invalid(path, name, reason)),
        Err(e) => Err(e),
    }
}

/// Any numeric GGUF value as f64 (writers differ: top_k is u32 in some files, i32 in others).
fn number(v: &Value) -> Option<f64> {
    Some(match *v {
        Value::U8(n) => f64::from(n),
        Value::I8(n) => f64::from(n),
        Value::U16(n) => f64::from(n),
        Value::I16(n) => f64::from(n),
        Value::U32(n) => f64::from(n),
        Value::I32(n) => f64::from(n),
        Value::U64(n) => n as f64,
        Value::I64(n) => n as f64,
        Value::F32(n) => f64::from(n),
        Value::F64(n) => n,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from_json(text: &str) -> Result<ChatDefaults> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation_config.json");
        std::fs::write(&path, text).unwrap();
        ChatDefaults::from_generation_config(&path)
    }

    #[test]
    fn generation_config_sampling_fields_count_only_with_do_sample() {
        // Qwen2.5-0.5B-Instruct's generation_config.json.
        let qwen = r#"{"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
            "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}"#;
        let d = from_json(qwen).unwrap();
        assert_eq!(d.source, DefaultsSource::GenerationConfig);
        let s = &d.sampling;
        assert_eq!((s.temperature, s.top_k, s.top_p, s.repetition_penalty), (0.7, 20, 0.8, 1.1));
        assert_eq!(s.penalty_window, usize::MAX, "HF penalises the whole sequence");
        // SmolLM2's states only token ids: conversational defaults.
        let smol = from_json(r#"{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}"#).unwrap();
        assert_eq!(smol, ChatDefaults::default());
        let greedy = from_json(r#"{"do_sample": false, "temperature": 0.6, "repetition_penalty": 1.2}"#).unwrap();
        assert_eq!((greedy.sampling.temperature, greedy.sampling.repetition_penalty), (0.0, 1.2));
        let hf_defaults = from_json(r#"{"do_sample": true}"#).unwrap().sampling;
        assert_eq!((hf_defaults.temperature, hf_defaults.top_k, hf_defaults.top_p), (1.0, 50, 1.0));
    }

    #[test]
    fn generation_config_errors_name_the_field() {
        let field = |text: &str| match from_json(text) {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(r#"{"do_sample": "yes"}"#), "do_sample");
        assert_eq!(field(r#"{"do_sample": true, "top_p": "high"}"#), "top_p");
        assert_eq!(field(r#"{"do_sample": true, "top_p": 1.5}"#), "top_p");
        assert!(matches!(from_json("{"), Err(Error::Json { .. })));
        let missing = ChatDefaults::from_generation_config(Path::new("/nonexistent/generation_config.json"));
        assert_eq!(missing.unwrap(), ChatDefaults::default());
    }

    #[test]
    fn gguf_sampling_keys_with_llama_cpp_fallbacks() {
        let path = Path::new("m.gguf");
        let md: HashMap<String, Value> = [
            ("general.sampling.temp".to_string(), Value::F32(0.6)),
            ("general.sampling.top_k".to_string(), Value::I32(20)),
            ("general.sampling.penalty_last_n".to_string(), Value::I32(-1)),
        ]
        .into();
        let d = ChatDefaults::from_gguf(&md, path).unwrap();
        assert_eq!(d.source, DefaultsSource::GgufMetadata);
        let s = &d.sampling;
        assert_eq!((s.temperature as f32, s.top_k, s.top_p, s.min_p), (0.6, 20, 0.95, 0.05));
        assert_eq!((s.repetition_penalty, s.penalty_window), (1.0, usize::MAX));
        assert_eq!(ChatDefaults::from_gguf(&HashMap::new(), path).unwrap(), ChatDefaults::default());
        let bad: HashMap<String, Value> = [("general.sampling.temp".to_string(), Value::String("hot".into()))].into();
        assert!(matches!(ChatDefaults::from_gguf(&bad, path), Err(Error::InvalidConfig { field, .. }) if field == "general.sampling.temp"));
        let negative: HashMap<String, Value> = [("general.sampling.temp".to_string(), Value::F32(-1.0))].into();
        assert!(matches!(ChatDefaults::from_gguf(&negative, path), Err(Error::InvalidConfig { field, .. }) if field == "temperature"));
    }

    #[test]
    fn conversational_defaults_are_valid_and_reply_cap_follows_the_context() {
        CONVERSATIONAL.validate().unwrap();
        assert_eq!((chat_reply_cap(512), chat_reply_cap(4096), chat_reply_cap(2)), (128, 1024, 1));
    }
}
