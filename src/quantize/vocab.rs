//! `tokenizer.json` + `tokenizer_config.json` → `tokenizer.ggml.*` metadata and the chat template,
//! as llama.cpp's `convert_hf_to_gguf.py` writes them (so that one GGUF file is enough).
//!
//! Two families, the ones [`crate::tokenizer::gguf`] rebuilds: byte-level BPE (`gpt2`: Qwen2/3,
//! Llama 3, SmolLM, GPT-2) with `tokenizer.ggml.pre` recognised from the pre-tokenizer, and
//! SentencePiece BPE with byte fallback (`llama`: Llama 2, Mistral), whose merge order is given by
//! scores as sentencepiece numbers its pieces (`-rank`; bytes 0, control tokens -1000).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// llama.cpp `llama_token_type` values.
const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;
/// The score sentencepiece (and llama.cpp's converter) gives control tokens.
const CONTROL_SCORE: f32 = -1000.0;

/// Split regexes of the pre-tokenizers llama.cpp names (`tokenizer.ggml.pre`); matched on a
/// distinctive part of the `Split` pattern in `tokenizer.json`.
const LLAMA3_DIGITS: &str = "\\p{N}{1,3}";
const QWEN2_DIGITS: &str = "\\p{N}|";

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// The `tokenizer.*` metadata for the model directory `dir`; `config` is its `config.json`
/// (fallback for BOS/EOS ids). Errors: [`Error::UnsupportedTokenizer`] for tokenizers neither
/// family describes, [`Error::Io`]/[`Error::Json`] for unreadable files.
pub fn tokenizer_metadata(dir: &Path, config: &Json) -> Result<Vec<(String, Value)>> {
    let tok_path = dir.join("tokenizer.json");
    let tok = read_json(&tok_path)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let tcfg = if cfg_path.exists() { read_json(&cfg_path)? } else { Json::Null };
    let bad = |reason: &str| Error::UnsupportedTokenizer { path: tok_path.clone(), reason: reason.to_string() };
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad("only BPE tokenizers (byte-level or SentencePiece with byte fallback) are supported"));
    }
    let vocab = Vocab::read(&tok).ok_or_else(|| bad("model.vocab or added_tokens is malformed"))?;
    let spm = model["byte_fallback"].as_bool().unwrap_or(false);
    let mut md: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| md.push((k.to_string(), v));
    if spm {
        put("tokenizer.ggml.model", Value::String("llama".into()));
        put("tokenizer.ggml.pre", Value::String("default".into()));
        let (tokens, scores, types) = vocab.spm_arrays();
        put("tokenizer.ggml.tokens", Value::Array(tokens));
        put("tokenizer.ggml.scores", Value::Array(scores));
        put("tokenizer.ggml.token_type", Value::Array(types));
    } else {
        let pre = pre_tokenizer_name(&tok, &vocab).ok_or_else(|| bad("the pre-tokenizer matches none llama.cpp names (qwen2, llama-bpe, smollm, gpt-2)"))?;
        put("tokenizer.ggml.model", Value::String("gpt2".into()));
        put("tokenizer.ggml.pre", Value::String(pre.into()));
        let (tokens, types) = vocab.bpe_arrays();
        put("tokenizer.ggml.tokens", Value::Array(tokens));
        put("tokenizer.ggml.token_type", Value::Array(types));
        let merges = merges(&model["merges"]).ok_or_else(|| bad("model.merges is malformed"))?;
        put("tokenizer.ggml.merges", Value::Array(merges));
    }
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
    ] {
        let id = special_text(&tcfg[field]).and_then(|t| vocab.ids.get(t).copied());
        let id = id.or_else(|| config[field.replace("token", "token_id")].as_u64().and_then(|v| u32::try_from(v).ok()));
        if let Some(id) = id {
            put(key, Value::U32(id));
        }
    }
    put("tokenizer.ggml.add_bos_token", Value::Bool(adds_bos(&tok, &tcfg)));
    put("tokenizer.ggml.add_eos_token", Value::Bool(tcfg["add_eos_token"].as_bool().unwrap_or(false)));
    put("tokenizer.ggml.add_sep_token", Value::Bool(false));
    // transformers 5 writes the template to its own file; older versions into tokenizer_config.
    let jinja = dir.join("chat_template.jinja");
    let template = if jinja.exists() {
        Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
    } else {
        chat_template(&tcfg)
    };
    if let Some(template) = template {
        put("tokenizer.chat_template", Value::String(template));
    }
    Ok(md)
}

/// `"<s>"` or `{"content": "<s>", ...}` (older tokenizer_config files).
fn special_text(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// The chat template: a string, or the `default` of a list of named templates.
fn chat_template(tcfg: &Json) -> Option<String> {
    match &tcfg["chat_template"] {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Whether encoding prepends BOS: `add_bos_token`, else a post-processor whose single-sequence
/// template starts with a special token (Llama 3's `<|begin_of_text|>`).
fn adds_bos(tok: &Json, tcfg: &Json) -> bool {
    if let Some(b) = tcfg["add_bos_token"].as_bool() {
        return b;
    }
    let post = &tok["post_processor"];
    let template = |p: &Json| p["type"].as_str() == Some("TemplateProcessing") && p["single"][0]["SpecialToken"].is_object();
    template(post) || post["processors"].as_array().is_some_and(|ps| ps.iter().any(template))
}

/// llama.cpp's name for a byte-level BPE pre-tokenizer (llama.cpp recognises it by hashing
/// the tokens of a test text; the split regex identifies the same groups).
fn pre_tokenizer_name(tok: &Json, vocab: &Vocab) -> Option<&'static str> {
    let pre = &tok["pre_tokenizer"];
    let steps: Vec<&Json> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = steps.iter().filter_map(|s| s["type"].as_str()).collect();
    match kinds.as_slice() {
        // A plain byte-level vocabulary without a single merged digit token (`Ġ1`, `00`) was
        // trained with digits split one by one (transformers drops the `Digits` step when it
        // rebuilds SmolLM's tokenizer from a GGUF): llama.cpp's `smollm` splitting, whose
        // whitespace handling before digits differs from `gpt-2`'s.
        ["ByteLevel"] if !vocab.has_merged_digits() => Some("smollm"),
        ["ByteLevel"] => Some("gpt-2"),
        ["Digits", "ByteLevel"] if steps[0]["individual_digits"].as_bool() == Some(true) => Some("smollm"),
        ["Split", "ByteLevel"] => {
            let regex = steps[0]["pattern"]["Regex"].as_str()?;
            if regex.contains(LLAMA3_DIGITS) {
                Some("llama-bpe")
            } else if regex.contains(QWEN2_DIGITS) {
                Some("qwen2")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Merges as `"a b"` strings (tokenizer.json has them as strings or as pairs).
fn merges(v: &Json) -> Option<Vec<Value>> {
    v.as_array()?
        .iter()
        .map(|m| match m {
            Json::String(s) => Some(Value::String(s.clone())),
            Json::Array(pair) => Some(Value::String(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?))),
            _ => None,
        })
        .collect()
}

/// Token texts by id (model vocabulary plus added tokens), with the special ones marked.
struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    special: HashSet<u32>,
    added: HashSet<u32>,
}

impl Vocab {
    fn read(tok: &Json) -> Option<Self> {
        let mut ids: HashMap<String, u32> = HashMap::new();
        for (text, id) in tok["model"]["vocab"].as_object()? {
            ids.insert(text.clone(), u32::try_from(id.as_u64()?).ok()?);
        }
        let mut special = HashSet::new();
        let mut added = HashSet::new();
        for t in tok["added_tokens"].as_array().into_iter().flatten() {
            let id = u32::try_from(t["id"].as_u64()?).ok()?;
            ids.insert(t["content"].as_str()?.to_string(), id);
            added.insert(id);
            if t["special"].as_bool().unwrap_or(false) {
                special.insert(id);
            }
        }
        let n = ids.values().max().map_or(0, |m| *m as usize + 1);
        // Ids nothing names (holes) get llama.cpp's padding token text.
        let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
        for (text, id) in &ids {
            if let Some(slot) = tokens.get_mut(*id as usize) {
                slot.clone_from(text);
            }
        }
        Some(Self { tokens, ids, special, added })
    }

    /// Whether any token joins a digit with another digit or a space (`Ġ1`, `00`, `Ġ20`).
    fn has_merged_digits(&self) -> bool {
        self.tokens.iter().any(|t| {
            let body = t.strip_prefix('Ġ').unwrap_or(t);
            let digits = !body.is_empty() && body.chars().all(|c| c.is_ascii_digit());
            digits && (body.len() > 1 || body.len() < t.len())
        })
    }

    fn token_type(&self, id: u32, text: &str, spm: bool) -> i32 {
        if self.special.contains(&id) {
            TYPE_CONTROL
        } else if self.added.contains(&id) {
            TYPE_USER_DEFINED
        } else if spm && is_byte_token(text) {
            TYPE_BYTE
        } else {
            TYPE_NORMAL
        }
    }

    fn bpe_arrays(&self) -> (Vec<Value>, Vec<Value>) {
        let tokens = self.tokens.iter().map(|t| Value::String(t.clone())).collect();
        let types = (0u32..).zip(&self.tokens).map(|(id, t)| Value::I32(self.token_type(id, t, false))).collect();
        (tokens, types)
    }

    fn spm_arrays(&self) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
        let mut rank = 0f32;
        let mut scores = Vec::with_capacity(self.tokens.len());
        let mut types = Vec::with_capacity(self.tokens.len());
        for (id, t) in (0u32..).zip(&self.tokens) {
            let ty = self.token_type(id, t, true);
            let score = match ty {
                TYPE_CONTROL | TYPE_USER_DEFINED => CONTROL_SCORE,
                TYPE_BYTE => 0.0,
                _ => {
                    let s = -rank;
                    rank += 1.0;
                    s
                }
            };
            scores.push(Value::F32(score));
            types.push(Value::I32(ty));
        }
        let tokens = self.tokens.iter().map(|t| Value::String(t.clone())).collect();
        (tokens, scores, types)
    }
}

/// `<0x0A>`: a byte-fallback token.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}
