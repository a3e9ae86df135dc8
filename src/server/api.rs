//! The OpenAI request bodies, parsed with the JSON path of any wrong type (the error's `param`),
//! and their translation into the crate's [`GenerateParams`] / [`Prompt`].

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::chat::tools::{random_call_id, ToolChoice};
use crate::chat::{Message, Role, ToolCall};
use crate::generation::{Constraint, GenerateParams, Prompt, MAX_TOP_LOGPROBS};
use crate::sampling::SamplingParams;

/// Most stop strings a request may give (OpenAI allows 4; llama-server more).
pub const MAX_STOP: usize = 16;

/// A body as JSON: malformed JSON or a non-object is 400.
pub fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(None, "the body must be a JSON object".into()));
    }
    Ok(value)
}

/// `value` as `T`: wrong types and missing fields are 400 naming the field's JSON path.
pub fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        ApiError::invalid(param, e.into_inner().to_string())
    })
}

/// A body as `T`. See [`json_body`] and [`typed`].
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    typed(&json_body(body)?)
}

/// A generation request: its endpoint's fields and the shared ones, read from one body (two
/// typed reads rather than `#[serde(flatten)]`, which loses the path of a wrong type).
pub fn parse_request<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Common), ApiError> {
    let v = json_body(body)?;
    Ok((typed(&v)?, typed(&v)?))
}

/// A chat request checked as far as it can be without a model: the handler's first step.
pub struct CheckedChat {
    pub common: Common,
    pub prompt: Prompt,
    pub tools: Option<ToolUse>,
    pub constraint: Option<Constraint>,
    pub logprobs: Option<usize>,
}

/// Reads a `/v1/chat/completions` body and checks every field that needs no model (ranges
/// included), so a bad request is a 400 before any load.
pub fn check_chat(body: &[u8]) -> Result<CheckedChat, ApiError> {
    let (req, common): (ChatRequest, Common) = parse_request(body)?;
    let constraint = req.constraint()?;
    let prompt = req.prompt()?;
    let tools = req.tool_use()?;
    let logprobs = req.logprobs()?;
    common.settings(&SamplingParams::default(), logprobs, 1)?;
    Ok(CheckedChat { common, prompt, tools, constraint, logprobs })
}

/// Reads a `/v1/completions` body and checks every field that needs no model; token ids are
/// checked against the vocabulary once the model is known.
pub fn check_completion(body: &[u8]) -> Result<(CompletionRequest, Common, Option<usize>), ApiError> {
    let (req, common): (CompletionRequest, Common) = parse_request(body)?;
    req.check_supported()?;
    let logprobs = req.logprobs()?;
    req.prompt(usize::MAX)?;
    common.settings(&SamplingParams::default(), logprobs, 1)?;
    Ok((req, common, logprobs))
}

/// Reads a `/v1/embeddings` body: the request, its inputs and whether the answer is base64.
pub fn check_embeddings(body: &[u8]) -> Result<(EmbeddingRequest, Vec<EmbedItem>, bool), ApiError> {
    let req: EmbeddingRequest = parse(body)?;
    let items = req.inputs()?;
    let base64 = req.base64()?;
    Ok((req, items, base64))
}

/// Reads a `/v1/load_lora_adapter` body; the scale (default 1) must be finite.
pub fn check_load_lora(body: &[u8]) -> Result<(LoadLoraRequest, f64), ApiError> {
    let req: LoadLoraRequest = parse(body)?;
    let scale = req.scale.unwrap_or(1.0);
    if !scale.is_finite() {
        return Err(ApiError::invalid(Some("scale".into()), "must be finite".into()));
    }
    Ok((req, scale))
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a usage chunk (with `choices: []`) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields `/v1/chat/completions` and `/v1/completions` share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u64>,
    /// Keep generating past end-of-sequence tokens (llama-server's extension; benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Logged with the request.
    pub user: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
}

/// One chat message. `content` is a string, a list of text parts, or null; an assistant message
/// may carry `tool_calls`, a tool message `tool_call_id` (and `name`).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// What the request lets the model do with its `tools`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolUse {
    /// The function definitions, as the template receives them.
    pub tools: Vec<Value>,
    /// `tool_choice`: `auto`, `none` (tools are shown but the reply is never read as calls),
    /// `required` or a named function (the reply is a call, held to it by a grammar).
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): more than one call per reply.
    pub parallel: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Value,
    pub encoding_format: Option<String>,
    pub dimensions: Option<u64>,
    /// Logged with the request.
    pub user: Option<String>,
}

/// Most inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// One embeddings input, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedItem {
    Text(String),
    Ids(Vec<u32>),
}

impl EmbeddingRequest {
    /// The inputs: a string, a list of strings, a list of token ids, or a list of such lists.
    /// Errors: no inputs, an empty id list, a mixed list, too many inputs.
    pub fn inputs(&self) -> Result<Vec<EmbedItem>, ApiError> {
        let bad = |reason: String| ApiError::invalid(Some("input".into()), reason);
        let ids = |v: &Value| -> Result<Vec<u32>, ApiError> {
            v.as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(format!("`{x}` is not a token id"))))
                .collect()
        };
        let items = match &self.input {
            Value::String(s) => vec![EmbedItem::Text(s.clone())],
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => vec![EmbedItem::Ids(ids(&self.input)?)],
            Value::Array(a) if a.iter().all(Value::is_string) => a.iter().map(|s| EmbedItem::Text(s.as_str().unwrap_or_default().to_string())).collect(),
            Value::Array(a) if a.iter().all(Value::is_array) => a.iter().map(|v| ids(v).map(EmbedItem::Ids)).collect::<Result<_, _>>()?,
            Value::Array(_) => return Err(bad("a list of strings or of token-id lists, not a mix".into())),
            _ => return Err(bad("must be a string, a list of strings, token ids or lists of token ids".into())),
        };
        if items.is_empty() || items.len() > MAX_EMBED_INPUTS {
            return Err(bad(format!("{} inputs: 1..={MAX_EMBED_INPUTS}", items.len())));
        }
        // An empty string is embedded (its special tokens), as sentence-transformers does; an
        // empty id list has nothing to run.
        if let Some(i) = items.iter().position(|it| matches!(it, EmbedItem::Ids(v) if v.is_empty())) {
            return Err(bad(format!("input {i} is an empty token list")));
        }
        Ok(items)
    }

    /// Whether vectors go out as base64 (little-endian f32) rather than floats.
    pub fn base64(&self) -> Result<bool, ApiError> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(false),
            Some("base64") => Ok(true),
            Some(other) => Err(ApiError::invalid(Some("encoding_format".into()), format!("`{other}`: float or base64"))),
        }
    }
}

/// `POST /v1/load_lora_adapter`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadLoraRequest {
    pub lora_name: String,
    pub lora_path: String,
    pub base_model: Option<String>,
    pub scale: Option<f64>,
}

/// `POST /v1/unload_lora_adapter`.
#[derive(Debug, Clone, Deserialize)]
pub struct UnloadLoraRequest {
    pub lora_name: String,
}

/// A request's generation settings: sampling over the model's defaults, limits, forks.
#[derive(Debug, Clone)]
pub struct Settings {
    pub params: GenerateParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

impl Common {
    /// The settings over `defaults` (the model's chat sampling); `logprobs` as asked;
    /// `max_tokens` defaults to `context` (generation also ends at the context's end).
    pub fn settings(&self, defaults: &SamplingParams, logprobs: Option<usize>, context: usize) -> Result<Settings, ApiError> {
        let mut s = defaults.clone();
        set(&mut s.temperature, self.temperature);
        set(&mut s.top_p, self.top_p);
        set(&mut s.top_k, self.top_k);
        set(&mut s.min_p, self.min_p);
        set(&mut s.presence_penalty, self.presence_penalty);
        set(&mut s.frequency_penalty, self.frequency_penalty);
        set(&mut s.repetition_penalty, self.repetition_penalty);
        s.seed = match self.seed {
            Some(seed) => seed as u64,
            None => rand::random(),
        };
        if let Some(bias) = &self.logit_bias {
            s.logit_bias = bias
                .iter()
                .map(|(k, &v)| match k.trim().parse::<u32>() {
                    Ok(id) if (-100.0..=100.0).contains(&v) => Ok((id, v)),
                    Ok(_) => Err(ApiError::invalid(Some("logit_bias".into()), format!("bias {v} for token {k} is not in [-100, 100]"))),
                    Err(_) => Err(ApiError::invalid(Some("logit_bias".into()), format!("`{k}` is not a token id"))),
                })
                .collect::<Result<_, _>>()?;
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) | (None, Some(m)) => m,
            (None, None) => context as u64,
        };
        if max_tokens == 0 {
            let name = if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
            return Err(ApiError::invalid(Some(name.into()), "must be at least 1".into()));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(Some("stop".into()), format!("{} stop strings, at most {MAX_STOP}", stop.len())));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 {
            return Err(ApiError::invalid(Some("n".into()), "must be at least 1".into()));
        }
        let params = GenerateParams {
            sampling: s,
            max_tokens: usize::try_from(max_tokens).unwrap_or(usize::MAX),
            stop,
            logprobs,
            ignore_eos: self.ignore_eos,
            ..GenerateParams::default()
        };
        params.validate().map_err(ApiError::from)?;
        Ok(Settings {
            params,
            n: usize::try_from(n).unwrap_or(usize::MAX),
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

impl ChatRequest {
    /// The conversation. Errors: an empty list, an unknown role, content that is not text.
    pub fn prompt(&self) -> Result<Prompt, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(Some("messages".into()), "must hold at least one message".into()));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(ApiError::invalid(
                        Some(format!("messages[{i}].role")),
                        format!("`{other}` is not one of system, developer, user, assistant, tool"),
                    ))
                }
            };
            let content = text_content(&m.content, i)?;
            let message = match (role, &m.tool_calls) {
                (Role::Assistant, Some(calls)) if !calls.is_empty() => {
                    let calls = calls.iter().enumerate().map(|(j, c)| tool_call(c, i, j)).collect::<Result<Vec<_>, _>>()?;
                    Message::assistant_calls(content, calls)
                }
                (Role::Tool, _) => Message::tool_result(m.tool_call_id.clone().unwrap_or_default(), m.name.clone(), content),
                _ => Message::new(role, content),
            };
            out.push(message);
        }
        match self.tool_use()? {
            Some(t) => Ok(Prompt::ChatWithTools { messages: out, tools: t.tools }),
            None => Ok(Prompt::Chat(out)),
        }
    }

    /// `tools`, `tool_choice` and `parallel_tool_calls`, checked; `None` without tools.
    /// Errors: a tool that is not `{"type": "function", "function": {"name": string, ...}}`; a
    /// `tool_choice` that is not `auto`, `none`, `required` or a function among the tools.
    pub fn tool_use(&self) -> Result<Option<ToolUse>, ApiError> {
        let tools = self.tools.clone().unwrap_or_default();
        for (i, t) in tools.iter().enumerate() {
            let name = t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            if t.get("type").and_then(Value::as_str) != Some("function") || name.is_none_or(str::is_empty) {
                return Err(ApiError::invalid(
                    Some(format!("tools[{i}]")),
                    "a tool must be {\"type\": \"function\", \"function\": {\"name\": string, \"description\", \"parameters\"}}".into(),
                ));
            }
        }
        let bad_choice = || {
            ApiError::invalid(
                Some("tool_choice".into()),
                "must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
            )
        };
        let choice = match &self.tool_choice {
            None => ToolChoice::Auto,
            Some(Value::String(c)) => match c.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                _ => return Err(bad_choice()),
            },
            Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
                let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).filter(|n| !n.is_empty());
                let name = name.ok_or_else(|| ApiError::invalid(Some("tool_choice.function.name".into()), "must be a non-empty string".into()))?;
                let known = tools.iter().any(|t| t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) == Some(name));
                if !known {
                    return Err(ApiError::invalid(Some("tool_choice.function.name".into()), format!("`{name}` is not one of the request's tools")));
                }
                ToolChoice::Function(name.to_string())
            }
            Some(_) => return Err(bad_choice()),
        };
        if tools.is_empty() {
            if matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) {
                return Err(ApiError::invalid(Some("tool_choice".into()), "a required tool call needs `tools`".into()));
            }
            return Ok(None);
        }
        Ok(Some(ToolUse { tools, choice, parallel: self.parallel_tool_calls.unwrap_or(true) }))
    }

    /// `top_logprobs` when `logprobs` is on. Errors: `top_logprobs` without `logprobs`, or
    /// above [`MAX_TOP_LOGPROBS`].
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if top > MAX_TOP_LOGPROBS as u64 {
            return Err(ApiError::invalid(Some("top_logprobs".into()), format!("{top}: at most {MAX_TOP_LOGPROBS}")));
        }
        if !self.logprobs && self.top_logprobs.is_some_and(|t| t > 0) {
            return Err(ApiError::invalid(Some("top_logprobs".into()), "needs `logprobs: true`".into()));
        }
        Ok(self.logprobs.then_some(top as usize))
    }

    /// `response_format`: `{"type": "text"}` (or none), `{"type": "json_object"}`, or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` as a
    /// [`Constraint`]. Errors: another type, or a `json_schema` without an object `schema`.
    pub fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        let Some(f) = &self.response_format else { return Ok(None) };
        let bad = |param: &str, reason: &str| ApiError::invalid(Some(param.into()), reason.into());
        match f.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Constraint::Json)),
            Some("json_schema") => {
                let spec = f.get("json_schema").ok_or_else(|| bad("response_format.json_schema", "missing"))?;
                match spec.get("schema") {
                    Some(schema @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(schema.clone()))),
                    Some(Value::Bool(true)) | None => Ok(Some(Constraint::Json)),
                    _ => Err(bad("response_format.json_schema.schema", "must be a JSON Schema object")),
                }
            }
            _ => Err(bad("response_format.type", "must be \"text\", \"json_object\" or \"json_schema\"")),
        }
    }
}

/// An OpenAI tool call of an assistant message: `{"id", "type": "function", "function": {"name",
/// "arguments": JSON string}}`; the arguments reach the template as the JSON value they encode.
fn tool_call(c: &Value, i: usize, j: usize) -> Result<ToolCall, ApiError> {
    let param = |f: &str| Some(format!("messages[{i}].tool_calls[{j}]{f}"));
    let f = c.get("function").ok_or_else(|| ApiError::invalid(param(".function"), "missing".into()))?;
    let name = f.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| ApiError::invalid(param(".function.name"), "must be a non-empty string".into()))?;
    let arguments = match f.get("arguments") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| ApiError::invalid(param(".function.arguments"), format!("not valid JSON: {e}")))?,
        Some(v) => v.clone(),
    };
    let id = c.get("id").and_then(Value::as_str).map_or_else(random_call_id, str::to_string);
    Ok(ToolCall::new(id, name, arguments))
}

/// A message's text: a string, null (empty), or a list of `{"type": "text", "text": ...}` parts.
fn text_content(content: &Value, i: usize) -> Result<String, ApiError> {
    let param = || Some(format!("messages[{i}].content"));
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some(kind), _) if kind != "text" => {
                        return Err(ApiError::invalid(param(), format!("content parts of type `{kind}` are not supported (text only)")))
                    }
                    _ => return Err(ApiError::invalid(param(), "a content part must be {\"type\": \"text\", \"text\": string}".into())),
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(param(), "must be a string, a list of text parts or null".into())),
    }
}

impl CompletionRequest {
    /// The prompt: a string, a list of one string, or token ids (a list, or a list of one list).
    /// Ids are checked against `vocab`.
    pub fn prompt(&self, vocab: usize) -> Result<Prompt, ApiError> {
        let bad = |reason: &str| ApiError::invalid(Some("prompt".into()), reason.to_string());
        let prompt = match &self.prompt {
            Value::String(s) => Prompt::Text(s.clone()),
            Value::Array(items) if items.len() == 1 && items[0].is_string() => Prompt::Text(items[0].as_str().unwrap_or_default().to_string()),
            Value::Array(items) if items.len() == 1 && items[0].is_array() => Prompt::Tokens(token_ids(&items[0], vocab)?),
            Value::Array(items) if items.iter().all(Value::is_number) => Prompt::Tokens(token_ids(&self.prompt, vocab)?),
            Value::Array(_) => return Err(bad("one prompt per request: a string, a list of one string, or token ids")),
            _ => return Err(bad("must be a string or a list of token ids")),
        };
        match &prompt {
            Prompt::Tokens(ids) if ids.is_empty() => Err(bad("must not be empty")),
            _ => Ok(prompt),
        }
    }

    /// `logprobs` (the number of alternatives), checked.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            Some(n) if n > MAX_TOP_LOGPROBS as u64 => {
                Err(ApiError::invalid(Some("logprobs".into()), format!("{n}: at most {MAX_TOP_LOGPROBS}")))
            }
            other => Ok(other.map(|n| n as usize)),
        }
    }

    /// `echo`, `suffix` and `best_of > 1` are refused, never silently ignored.
    pub fn check_supported(&self) -> Result<(), ApiError> {
        if self.echo {
            return Err(ApiError::invalid(Some("echo".into()), "echo is not supported".into()));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(Some("suffix".into()), "suffix (fill-in-the-middle) is not supported".into()));
        }
        if self.best_of.is_some_and(|b| b > 1) {
            return Err(ApiError::invalid(Some("best_of".into()), "best_of > 1 is not supported".into()));
        }
        Ok(())
    }
}

fn token_ids(v: &Value, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    items
        .iter()
        .map(|x| match x.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::invalid(Some("prompt".into()), format!("token id {id} is outside the vocabulary of {vocab}"))),
            None => Err(ApiError::invalid(Some("prompt".into()), format!("`{x}` is not a token id"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_their_path() {
        let e = parse_request::<ChatRequest>(br#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse::<ChatRequest>(br#"{"messages":[{"content":"hi"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0]"));
        assert!(e.message.contains("role"), "{}", e.message);
        let e = parse::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(parse::<ChatRequest>(br#"{"messages":[],"unknown_field":1}"#).is_ok());
    }

    #[test]
    fn settings_check_ranges() {
        let d = SamplingParams::default();
        let c = |json: &str| parse::<Common>(json.as_bytes()).unwrap();
        assert_eq!(c(r#"{"temperature":-1}"#).settings(&d, None, 10).unwrap_err().param.as_deref(), Some("temperature"));
        assert_eq!(c(r#"{"top_p":0}"#).settings(&d, None, 10).unwrap_err().param.as_deref(), Some("top_p"));
        assert_eq!(c(r#"{"max_tokens":0}"#).settings(&d, None, 10).unwrap_err().param.as_deref(), Some("max_tokens"));
        assert_eq!(c(r#"{"n":0}"#).settings(&d, None, 10).unwrap_err().param.as_deref(), Some("n"));
        assert_eq!(c(r#"{"logit_bias":{"x":1}}"#).settings(&d, None, 10).unwrap_err().param.as_deref(), Some("logit_bias"));
        let s = c(r#"{"max_completion_tokens":3,"max_tokens":9,"stop":"x","seed":5}"#).settings(&d, None, 10).unwrap();
        assert_eq!((s.params.max_tokens, s.params.stop.clone(), s.params.sampling.seed), (3, vec!["x".to_string()], 5));
        assert_eq!(c("{}").settings(&d, None, 10).unwrap().params.max_tokens, 10);
    }

    #[test]
    fn prompts_and_contents() {
        let r = parse::<CompletionRequest>(br#"{"prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.prompt(10).unwrap(), Prompt::Tokens(vec![1, 2, 3]));
        assert_eq!(r.prompt(3).unwrap_err().param.as_deref(), Some("prompt"));
        let r = parse::<CompletionRequest>(br#"{"prompt":["a","b"]}"#).unwrap();
        assert!(r.prompt(10).is_err());
        let r = parse::<ChatRequest>(br#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(r.prompt().unwrap(), Prompt::Chat(vec![Message::user("ab")]));
        let r = parse::<ChatRequest>(br#"{"messages":[{"role":"wizard","content":"a"}]}"#).unwrap();
        assert_eq!(r.prompt().unwrap_err().param.as_deref(), Some("messages[0].role"));
        let r = parse::<ChatRequest>(br#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#).unwrap();
        assert_eq!(r.prompt().unwrap_err().param.as_deref(), Some("messages[0].content"));
    }
}
