//! JSONL training data, one object per line (the formats mlx-lm and HF datasets use):
//! `{"input_ids": [...], "labels"?: [...]}` (pre-tokenized, labels aligned with the ids, `-100`
//! ignored; without labels every id is a label), `{"text": "..."}` and
//! `{"prompt": "...", "completion": "..."}` and `{"messages": [{"role", "content"}, ...]}` (rendered
//! with the model's chat template). A bad line is [`TrainError::BadLine`] naming the
//! file, the 1-based line and the field. Blank lines are skipped. Lines longer than `max_seq_len`
//! tokens are an error (never silently truncated).

use std::path::Path;

use serde_json::{Map, Value};

use super::loss::IGNORE_INDEX;
use super::TrainError;
use crate::chat::{ChatTemplate, Message};
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
    PromptCompletion { /** The prompt (carries no loss with `mask_prompt`). */ prompt: String, /** The completion. */ completion: String },
    /// `{"messages"}`: a conversation rendered with the model's chat template.
    Messages(Vec<Message>),
}

impl Record {
    /// Tokenizes the record: text with the tokenizer's special tokens (HF `tokenizer(text)`);
    /// prompt + completion as the prompt with special tokens, the completion without, then the
    /// first EOS id; with `mask_prompt` the prompt's labels are `-100`.
    ///
    /// Errors: [`Error::Tokenizer`]; a record that needs a tokenizer when none is given is
    /// [`TrainError::InvalidOption`] `tokenizer`.
    pub fn tokenize(&self, tok: Option<&Tokenizer>, mask_prompt: bool) -> Result<Example> {
        self.tokenize_with(tok, None, mask_prompt)
    }

    /// [`Record::tokenize`], with `template` for `{"messages"}` records: the conversation is
    /// rendered whole (`apply_chat_template(messages, tokenize=True)`: the template writes the
    /// special tokens, none are added); with `mask_prompt` only the tokens of assistant turns
    /// carry labels. An assistant turn's span runs from the end of the conversation before it
    /// rendered with the generation prompt to the end of the conversation through it rendered
    /// without, so it includes the turn's end-of-turn tokens (what the model must learn to emit)
    /// and excludes the assistant header (mlx-lm's `mask_prompt` does the same).
    ///
    /// Errors: as [`Record::tokenize`]; a messages record without `template` is
    /// [`TrainError::InvalidOption`] `chat_template`; [`Error::ChatTemplate`] from rendering;
    /// [`TrainError::InvalidOption`] `messages` when a rendered prefix does not tokenize to a
    /// prefix of the whole conversation (the spans cannot be found).
    pub fn tokenize_with(&self, tok: Option<&Tokenizer>, template: Option<&ChatTemplate>, mask_prompt: bool) -> Result<Example> {
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
            Record::Messages(messages) => {
                let tok = tok.ok_or_else(need)?;
                let template = template.ok_or_else(|| TrainError::InvalidOption {
                    name: "chat_template",
                    reason: "messages records need the model's chat template".into(),
                })?;
                tokenize_messages(tok, template, messages, mask_prompt)
            }
        }
    }
}

fn tokenize_messages(tok: &Tokenizer, template: &ChatTemplate, messages: &[Message], mask_prompt: bool) -> Result<Example> {
    let ids = tok.encode(&template.render(messages, false)?, false)?;
    if !mask_prompt {
        let labels = ids.iter().map(|&i| i as i64).collect();
        return Ok(Example { input_ids: ids, labels });
    }
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    let prefix_len = |n: usize, gen: bool| -> Result<usize> {
        let part = tok.encode(&template.render(&messages[..n], gen)?, false)?;
        if !ids.starts_with(&part) {
            return Err(TrainError::InvalidOption {
                name: "messages",
                reason: format!("the conversation through message {n} does not tokenize to a prefix of the whole; cannot mask the prompt"),
            }
            .into());
        }
        Ok(part.len())
    };
    for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == crate::chat::Role::Assistant) {
        let (start, end) = (prefix_len(i, true)?, prefix_len(i + 1, false)?);
        for (l, &id) in labels[start..end].iter_mut().zip(&ids[start..end]) {
            *l = id as i64;
        }
    }
    Ok(Example { input_ids: ids, labels })
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
    if let Some(m) = map.get("messages") {
        return Ok(Record::Messages(messages(m)?));
    }
    Err(("input_ids", "missing: a line needs input_ids, text, or prompt and completion".into()))
}

fn messages(v: &Value) -> FieldResult<Vec<Message>> {
    let Value::Array(items) = v else { return Err(("messages", "not an array".into())) };
    if items.is_empty() {
        return Err(("messages", "empty".into()));
    }
    let list: Vec<Message> = items
        .iter()
        .enumerate()
        .map(|(i, m)| serde_json::from_value(m.clone()).map_err(|e| ("messages", format!("message {i}: {e}"))))
        .collect::<FieldResult<_>>()?;
    if !list.iter().any(|m| m.role == crate::chat::Role::Assistant) {
        return Err(("messages", "no assistant message (nothing to learn)".into()));
    }
    Ok(list)
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

/// Reads and tokenizes a JSONL dataset ([`read_jsonl`], [`Record::tokenize_with`]) and checks
/// every example fits `max_seq_len` tokens ([`check_lengths`]).
pub fn load_examples(path: &Path, tok: Option<&Tokenizer>, template: Option<&ChatTemplate>, mask_prompt: bool, max_seq_len: usize) -> Result<Vec<Example>> {
    let out = read_jsonl(path)?.iter().map(|r| r.tokenize_with(tok, template, mask_prompt)).collect::<Result<Vec<_>>>()?;
    check_lengths(path, &out, max_seq_len)?;
    Ok(out)
}
