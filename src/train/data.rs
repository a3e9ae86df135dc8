//! JSONL training data, one object per line (the formats mlx-lm and HF datasets use):
//! `{"input_ids": [...], "labels"?: [...]}` (pre-tokenized, labels aligned with the ids, `-100`
//! ignored; without labels every id is a label), `{"text": "..."}` and
//! `{"prompt": "...", "completion": "..."}`. A bad line is [`TrainError::BadLine`] naming the
//! file, the 1-based line and the field. Blank lines are skipped. Lines longer than `max_seq_len`
//! tokens are an error (never silently truncated).

use std::path::Path;

use serde_json::{Map, Value};

use super::loss::IGNORE_INDEX;
use super::TrainError;
use crate::error::{Error, Result};
use crate::Tokenizer;

/// One tokenized training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids (len ≥ 1).
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` (HF convention: the loss shifts them); `-100` is ignored.
    pub labels: Vec<i64>,
}

/// One dataset line before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// `{"input_ids", "labels"?}`.
    Tokens(Example),
    /// `{"text"}`.
    Text(String),
    /// `{"prompt", "completion"}`.
    PromptCompletion { prompt: String, completion: String },
}

impl Record {
    /// Tokenizes the record: text with the tokenizer's special tokens (HF `tokenizer(text)`);
    /// prompt + completion as the prompt with special tokens, the completion without, then the
    /// first EOS id; with `mask_prompt` the prompt's labels are `-100`.
    ///
    /// Errors: [`Error::Tokenizer`]; a record that needs a tokenizer when none is given is
    /// [`TrainError::InvalidOption`] `tokenizer`.
    pub fn tokenize(&self, tok: Option<&Tokenizer>, mask_prompt: bool) -> Result<Example> {
        let need = || TrainError::InvalidOption { name: "tokenizer", reason: "text records need a tokenizer".into() };
        match self {
            Record::Tokens(e) => Ok(e.clone()),
            Record::Text(t) => {
                let ids = tok.ok_or_else(need)?.encode(t, true)?;
                let labels = ids.iter().map(|&i| i as i64).collect();
                Ok(Example { input_ids: ids, labels })
            }
            Record::PromptCompletion { prompt, completion } => {
                let tok = tok.ok_or_else(need)?;
                let p = tok.encode(prompt, true)?;
                let mut c = tok.encode(completion, false)?;
                c.extend(tok.eos_token_ids().first().copied());
                let labels = p.iter().map(|&i| if mask_prompt { IGNORE_INDEX } else { i as i64 }).chain(c.iter().map(|&i| i as i64)).collect();
                Ok(Example { input_ids: [p, c].concat(), labels })
            }
        }
    }
}

/// Reads a JSONL dataset. Errors: [`Error::Io`], [`TrainError::BadLine`], and
/// [`TrainError::EmptyData`] for a file without examples.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |field: &'static str, reason: String| TrainError::BadLine { path: path.to_path_buf(), line: i + 1, field, reason };
        let value: Value = serde_json::from_str(line).map_err(|e| bad("(line)", format!("not JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(bad("(line)", "not a JSON object".into()).into());
        };
        out.push(parse_record(&map).map_err(|(field, reason)| bad(field, reason))?);
    }
    if out.is_empty() {
        return Err(TrainError::EmptyData { path: path.to_path_buf() }.into());
    }
    Ok(out)
}

type FieldResult<T> = std::result::Result<T, (&'static str, String)>;

fn parse_record(map: &Map<String, Value>) -> FieldResult<Record> {
    if let Some(ids) = map.get("input_ids") {
        let input_ids: Vec<u32> = int_list(ids, "input_ids")?
            .into_iter()
            .map(|x| u32::try_from(x).map_err(|_| ("input_ids", format!("{x} is not a token id"))))
            .collect::<FieldResult<_>>()?;
        if input_ids.is_empty() {
            return Err(("input_ids", "empty".into()));
        }
        let labels = match map.get("labels") {
            None | Some(Value::Null) => input_ids.iter().map(|&i| i as i64).collect(),
            Some(l) => int_list(l, "labels")?,
        };
        if labels.len() != input_ids.len() {
            return Err(("labels", format!("{} labels for {} input_ids", labels.len(), input_ids.len())));
        }
        if let Some(bad) = labels.iter().find(|&&l| l < 0 && l != IGNORE_INDEX) {
            return Err(("labels", format!("{bad} is neither a token id nor -100")));
        }
        return Ok(Record::Tokens(Example { input_ids, labels }));
    }
    if let Some(t) = map.get("text") {
        return Ok(Record::Text(string(t, "text")?));
    }
    if let Some(p) = map.get("prompt") {
        let completion = map.get("completion").ok_or(("completion", "missing (a prompt needs a completion)".to_string()))?;
        return Ok(Record::PromptCompletion { prompt: string(p, "prompt")?, completion: string(completion, "completion")? });
    }
    if map.contains_key("messages") {
        return Err(("messages", "chat-format lines are not supported yet; use text, prompt/completion or input_ids".into()));
    }
    Err(("input_ids", "missing: a line needs input_ids, text, or prompt and completion".into()))
}

fn string(v: &Value, field: &'static str) -> FieldResult<String> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::String(_) => Err((field, "empty".into())),
        _ => Err((field, "not a string".into())),
    }
}

fn int_list(v: &Value, field: &'static str) -> FieldResult<Vec<i64>> {
    let Value::Array(items) = v else { return Err((field, "not an array".into())) };
    items.iter().map(|x| x.as_i64().ok_or((field, format!("{x} is not an integer")))).collect()
}

/// Checks every example fits `max_seq_len` tokens. Errors: [`TrainError::BadLine`] naming the
/// example's 1-based index among the file's examples.
pub fn check_lengths(path: &Path, examples: &[Example], max_seq_len: usize) -> Result<()> {
    match examples.iter().position(|e| e.input_ids.len() > max_seq_len) {
        Some(i) => Err(TrainError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            field: "input_ids",
            reason: format!("{} tokens, longer than max_seq_len {max_seq_len}", examples[i].input_ids.len()),
        }
        .into()),
        None => Ok(()),
    }
}
