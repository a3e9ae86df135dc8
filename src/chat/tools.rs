//! Tool calls: the OpenAI / transformers shape of a call, and parsers for the syntax each model
//! family writes its calls in (chosen from the chat template).
//!
//! A model's reply is plain text; a template that supports tools teaches the model to answer a
//! call in one of these shapes:
//!
//! - [`ToolCallFormat::Hermes`] (Qwen2.5, Qwen3 and other Hermes-style templates):
//!   `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one block per call, possibly after
//!   some text.
//! - [`ToolCallFormat::Llama3Json`] (Llama 3.1 / 3.2): the whole reply is one JSON object
//!   `{"name": …, "parameters": {…}}` (or `"arguments"`), optionally after `<|python_tag|>`;
//!   several calls are separated by `;`.
//! - [`ToolCallFormat::MistralToolCalls`] (Mistral / Mistral NeMo): `[TOOL_CALLS]` followed by a
//!   JSON array of `{"name", "arguments"[, "id"]}` (the marker is a special token, so a decoded
//!   reply may hold only the array).
//!
//! - [`ToolCallFormat::Generic`], for templates that know nothing of tools (SmolLM2's, many
//!   fine-tunes'): the tools are described in the system message ([`generic_messages`]) and the
//!   reply is one JSON object, `{"tool_calls": [{"name", "arguments"}, …]}` or
//!   `{"response": "text"}`, held to that shape by a grammar ([`call_constraint`]).
//!
//! Parsing never fails: text that does not hold a well-formed call is returned as content, as it
//! was written (a model that starts a call and stops half-way has answered in text).
//!
//! `tool_choice` `required` and a named function are enforced with a grammar too: the reply is
//! then always one well-formed call (or several, with `parallel`) whose arguments match the
//! function's parameter schema ([`call_constraint`]).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{Message, Role};
use crate::error::{Error, Result};
use crate::generation::Constraint;

/// A call the model asks for, in the shape chat templates and the OpenAI API use:
/// `{"id", "type": "function", "function": {"name", "arguments"}}`. `arguments` is a JSON value
/// (an object for well-behaved models); the OpenAI wire format carries it as a JSON string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id; a tool message answers it with `tool_call_id`.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// Which function, with which arguments.
    pub function: FunctionCall,
}

/// The function part of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name, as declared in `tools`.
    pub name: String,
    /// Its arguments (a JSON object, as the model wrote it).
    pub arguments: Value,
}

fn function_kind() -> String {
    "function".into()
}

impl ToolCall {
    /// A call of `name` with `arguments` and the given id.
    pub fn new(id: impl Into<String>, name: impl Into<String>, arguments: Value) -> Self {
        Self { id: id.into(), kind: function_kind(), function: FunctionCall { name: name.into(), arguments } }
    }

    /// `arguments` as the OpenAI API sends it: a JSON string.
    pub fn arguments_json(&self) -> String {
        match &self.function.arguments {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        }
    }
}

/// The syntax a model family writes tool calls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>{json}</tool_call>` blocks (Qwen, Hermes).
    Hermes,
    /// A bare JSON object `{"name", "parameters"}`, optionally after `<|python_tag|>` (Llama 3.x).
    Llama3Json,
    /// `[TOOL_CALLS][{...}, ...]` (Mistral).
    MistralToolCalls,
    /// One JSON object, `{"tool_calls": [...]}` or `{"response": "text"}`, for templates without
    /// tool support; the tools go in the system message ([`generic_messages`]) and the reply is
    /// constrained to the shape ([`call_constraint`]).
    Generic,
}

impl ToolCallFormat {
    /// The format a chat template teaches, recognised from its source; `None` for templates
    /// without tool support (SmolLM2's and many fine-tunes').
    pub fn detect(template_source: &str) -> Option<Self> {
        if template_source.contains("<tool_call>") {
            Some(Self::Hermes)
        } else if template_source.contains("[TOOL_CALLS]") {
            Some(Self::MistralToolCalls)
        } else if template_source.contains("<|python_tag|>") || template_source.contains("\"parameters\": dictionary of argument") {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// The text that begins a call in this format (a stream holds content back once it appears).
    pub fn start_marker(self) -> &'static str {
        match self {
            Self::Hermes => "<tool_call>",
            Self::Llama3Json | Self::Generic => "{",
            Self::MistralToolCalls => "[TOOL_CALLS]",
        }
    }

    /// Splits a complete reply into content and calls. `new_id` names each call in order.
    pub fn parse(self, text: &str, new_id: &mut dyn FnMut() -> String) -> ParsedReply {
        let parsed = match self {
            Self::Hermes => parse_hermes(text, new_id),
            Self::Llama3Json => parse_llama3(text, new_id),
            Self::MistralToolCalls => parse_mistral(text, new_id),
            Self::Generic => parse_generic(text, new_id),
        };
        parsed.unwrap_or_else(|| ParsedReply { content: text.to_string(), tool_calls: Vec::new() })
    }
}

/// A reply split into its text and its tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedReply {
    /// The text outside the calls (trimmed when there are calls).
    pub content: String,
    /// The calls, in the order written.
    pub tool_calls: Vec<ToolCall>,
}

/// `{"name": string, <args_key>: value}` with args defaulting to `{}`; `None` when malformed.
fn call_from(v: &Value, new_id: &mut dyn FnMut() -> String) -> Option<ToolCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?;
    if name.is_empty() {
        return None;
    }
    let args = o.get("arguments").or_else(|| o.get("parameters")).cloned().unwrap_or_else(|| Value::Object(Default::default()));
    // Some models write the arguments as a JSON string; keep the object when it is one.
    let args = match args {
        Value::String(s) => serde_json::from_str::<Value>(&s).ok().filter(Value::is_object).unwrap_or(Value::String(s)),
        v => v,
    };
    let id = o.get("id").and_then(Value::as_str).filter(|s| !s.is_empty()).map_or_else(&mut *new_id, str::to_string);
    Some(ToolCall::new(id, name, args))
}

fn parse_hermes(text: &str, new_id: &mut dyn FnMut() -> String) -> Option<ParsedReply> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let body = &rest[start + OPEN.len()..];
        let (json, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""), // the reply ended (EOS) right after the call
        };
        let v: Value = serde_json::from_str(json.trim()).ok()?;
        calls.push(call_from(&v, new_id)?);
        rest = after;
    }
    if calls.is_empty() {
        return None;
    }
    content.push_str(rest);
    Some(ParsedReply { content: content.trim().to_string(), tool_calls: calls })
}

fn parse_llama3(text: &str, new_id: &mut dyn FnMut() -> String) -> Option<ParsedReply> {
    let body = text.trim();
    let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
    if !body.starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    // One object, or several separated by `;`: read objects one after another.
    let mut stream = serde_json::Deserializer::from_str(body).into_iter::<Value>();
    loop {
        match stream.next() {
            None => break,
            Some(Ok(v)) => calls.push(call_from(&v, new_id)?),
            Some(Err(_)) => {
                // A `;` separator between objects: skip it and go on.
                let at = stream.byte_offset();
                let tail = body[at..].trim_start();
                let tail = tail.strip_prefix(';')?.trim_start();
                if tail.is_empty() {
                    break;
                }
                let rest = parse_llama3(tail, new_id)?;
                calls.extend(rest.tool_calls);
                break;
            }
        }
    }
    (!calls.is_empty()).then(|| ParsedReply { content: String::new(), tool_calls: calls })
}

fn parse_mistral(text: &str, new_id: &mut dyn FnMut() -> String) -> Option<ParsedReply> {
    let (content, body) = match text.find("[TOOL_CALLS]") {
        Some(at) => (text[..at].trim(), text[at + "[TOOL_CALLS]".len()..].trim()),
        None => ("", text.trim()),
    };
    if !body.starts_with('[') {
        return None;
    }
    let v: Value = serde_json::from_str(body).ok()?;
    let calls = v.as_array()?.iter().map(|c| call_from(c, new_id)).collect::<Option<Vec<_>>>()?;
    (!calls.is_empty()).then(|| ParsedReply { content: content.to_string(), tool_calls: calls })
}

/// `{"tool_calls": [call, …]}`, `{"tool_call": call}` or `{"response": "text"}` (the
/// [`ToolCallFormat::Generic`] shapes); a response becomes the content.
fn parse_generic(text: &str, new_id: &mut dyn FnMut() -> String) -> Option<ParsedReply> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let o = v.as_object()?;
    if let Some(calls) = o.get("tool_calls") {
        let calls = calls.as_array()?.iter().map(|c| call_from(c, new_id)).collect::<Option<Vec<_>>>()?;
        return (!calls.is_empty()).then(|| ParsedReply { content: String::new(), tool_calls: calls });
    }
    if let Some(call) = o.get("tool_call") {
        return Some(ParsedReply { content: String::new(), tool_calls: vec![call_from(call, new_id)?] });
    }
    let response = o.get("response")?.as_str()?;
    Some(ParsedReply { content: response.to_string(), tool_calls: Vec::new() })
}

/// What the model may do with the tools it is shown (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// Answer in text or call tools, as the model decides.
    #[default]
    Auto,
    /// Never call: the reply is text (and is not read as calls).
    None,
    /// Call at least one tool (one, unless parallel calls are allowed).
    Required,
    /// Call this function.
    Function(String),
}

/// The prefix a generic text reply starts with (the grammar writes JSON on one line, with
/// `json.dumps`' separators), after which the response string streams.
const GENERIC_RESPONSE_PREFIX: &str = "{\"response\": \"";

/// The grammar that makes a reply take the form `choice` asks for, in `format`; `None` when the
/// model answers freely (`auto` or `none` with a template that has its own tool syntax).
///
/// - `required` / a named function: the reply is exactly one call (or, with `parallel`, one or
///   more) in the format's syntax, its `name` one of the functions (or the named one) and its
///   arguments valid under that function's `parameters` schema (`{"type": "object"}` if absent).
/// - [`ToolCallFormat::Generic`] with `auto`: the reply is `{"tool_calls": [...]}` or
///   `{"response": "..."}`; with `none`: `{"response": "..."}` (read back as content by
///   [`ToolCallFormat::parse`], so a generic reply is always parsed, whatever the choice).
///
/// Errors: [`Error::InvalidParameter`] `tool_choice` for a function that is not in `tools`, or
/// `required` with no tools; `tools` for a function without a name.
pub fn call_constraint(format: ToolCallFormat, tools: &[Value], choice: &ToolChoice, parallel: bool) -> Result<Option<Constraint>> {
    let text = json!({"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"], "additionalProperties": false});
    let forced = match (choice, format) {
        // A generic model answers in its JSON shape even when it may not call.
        (ToolChoice::None, ToolCallFormat::Generic) => return Ok(Some(Constraint::JsonSchema(text))),
        (ToolChoice::None, _) | (ToolChoice::Auto, ToolCallFormat::Hermes | ToolCallFormat::Llama3Json | ToolCallFormat::MistralToolCalls) => return Ok(None),
        (ToolChoice::Auto, ToolCallFormat::Generic) => false,
        (ToolChoice::Required | ToolChoice::Function(_), _) => true,
    };
    let mut functions = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let f = t.get("function").unwrap_or(t);
        let name = f.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()).ok_or_else(|| Error::InvalidParameter {
            name: "tools",
            reason: format!("tools[{i}] has no function name"),
        })?;
        if let ToolChoice::Function(wanted) = choice {
            if wanted != name {
                continue;
            }
        }
        let params = match f.get("parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => json!({"type": "object"}),
        };
        functions.push((name.to_string(), params));
    }
    if functions.is_empty() {
        let reason = match choice {
            ToolChoice::Function(name) => format!("function `{name}` is not one of the request's tools"),
            _ => "needs at least one tool".into(),
        };
        return Err(Error::InvalidParameter { name: "tool_choice", reason });
    }
    let args_key = if format == ToolCallFormat::Llama3Json { "parameters" } else { "arguments" };
    let call = |(name, params): &(String, Value)| {
        json!({
            "type": "object",
            "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": false,
        })
    };
    let one_call = match functions.len() {
        1 => call(&functions[0]),
        _ => json!({"anyOf": functions.iter().map(call).collect::<Vec<_>>()}),
    };
    let schema = |s: Value| {
        let mut s = s;
        if let Some(o) = s.as_object_mut() {
            o.insert("x-guidance".into(), json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        s.to_string()
    };
    let grammar = match format {
        ToolCallFormat::Generic => {
            let calls = match parallel {
                true => json!({"type": "object", "properties": {"tool_calls": {"type": "array", "items": one_call, "minItems": 1}}, "required": ["tool_calls"], "additionalProperties": false}),
                false => json!({"type": "object", "properties": {"tool_calls": {"type": "array", "items": one_call, "minItems": 1, "maxItems": 1}}, "required": ["tool_calls"], "additionalProperties": false}),
            };
            let top = if forced { calls } else { json!({"anyOf": [calls, text]}) };
            return Ok(Some(Constraint::JsonSchema(top)));
        }
        ToolCallFormat::Hermes => {
            let more = if parallel { " (\"\\n\" block)*" } else { "" };
            format!("start: block{more}\nblock: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {}\n", schema(one_call))
        }
        ToolCallFormat::Llama3Json => {
            let more = if parallel { " (\"; \" call)*" } else { "" };
            format!("start: call{more}\ncall: %json {}\n", schema(one_call))
        }
        ToolCallFormat::MistralToolCalls => {
            let more = if parallel { " (\", \" call)*" } else { "" };
            format!("start: \"[\" call{more} \"]\"\ncall: %json {}\n", schema(one_call))
        }
    };
    Ok(Some(Constraint::Lark(grammar)))
}

/// The conversation as a template without tool support can render it
/// ([`ToolCallFormat::Generic`]): with `tools`, a system message (the conversation's own, with
/// the instructions appended, or a new one) lists them and asks for the JSON reply shapes;
/// assistant calls in the history become that JSON as the message's text, and tool results
/// become user messages `{"tool_response": {"name", "content"}}` (many such templates know only
/// the system, user and assistant roles).
pub fn generic_messages(messages: &[Message], tools: &[Value]) -> Vec<Message> {
    let mut names: std::collections::HashMap<&str, &str> = Default::default();
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        match m.role {
            Role::Assistant if !m.tool_calls.is_empty() => {
                for c in &m.tool_calls {
                    names.insert(c.id.as_str(), c.function.name.as_str());
                }
                let calls: Vec<Value> = m.tool_calls.iter().map(|c| json!({"name": c.function.name, "arguments": c.function.arguments})).collect();
                out.push(Message::assistant(json!({"tool_calls": calls}).to_string()));
            }
            Role::Tool => {
                let id = m.tool_call_id.as_deref().unwrap_or_default();
                let name = m.name.as_deref().or_else(|| names.get(id).copied()).unwrap_or_default();
                let mut response = Map::new();
                if !name.is_empty() {
                    response.insert("name".into(), name.into());
                }
                response.insert("content".into(), m.content.clone().into());
                out.push(Message::user(json!({"tool_response": response}).to_string()));
            }
            _ => out.push(Message::new(m.role, m.content.clone())),
        }
    }
    if tools.is_empty() {
        return out;
    }
    let listed: Vec<String> = tools.iter().map(|t| t.get("function").unwrap_or(t).to_string()).collect();
    let instructions = format!(
        "You have access to these tools (JSON Schema of their parameters given):\n{}\n\n\
         Reply with only one JSON object. To answer the user directly: {{\"response\": <your answer>}}. \
         Only when a tool is needed: {{\"tool_calls\": [{{\"name\": <tool name>, \"arguments\": <arguments object>}}]}}. \
         Tool results come back as {{\"tool_response\": ...}} messages.",
        listed.join("\n")
    );
    match out.first_mut() {
        Some(first) if first.role == Role::System => first.content = format!("{}\n\n{instructions}", first.content),
        _ => out.insert(0, Message::system(instructions)),
    }
    out
}

/// A streamed reply that may hold tool calls: [`push`](Self::push) returns the text that can go
/// out as content now — everything that cannot be the start of a call — and
/// [`finish`](Self::finish) parses the whole reply once it has ended.
#[derive(Debug, Clone)]
pub struct ToolCallStream {
    format: ToolCallFormat,
    parallel: bool,
    text: String,
    sent: usize,
    /// [`ToolCallFormat::Generic`]: bytes of the decoded response string sent so far.
    sent_response: usize,
}

impl ToolCallStream {
    /// A stream for replies in `format`; `parallel`: keep every call (else only the first).
    pub fn new(format: ToolCallFormat, parallel: bool) -> Self {
        Self { format, parallel, text: String::new(), sent: 0, sent_response: 0 }
    }

    /// Takes the next piece of the reply; returns the content safe to send now.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.format == ToolCallFormat::Generic {
            // Only the response string of `{"response": "..."}` is content, as it is decoded.
            let Some((response, _)) = generic_response(&self.text) else { return String::new() };
            let out = response.get(self.sent_response..).unwrap_or_default().to_string();
            self.sent_response = self.sent_response.max(response.len());
            return out;
        }
        let safe = self.safe_len().max(self.sent);
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        out
    }

    /// The reply ended with `tail` (text flushed at the end). `complete`: it ended by itself
    /// (EOS or a stop string), not by the token limit — a cut reply is text, not a half call.
    /// Returns the content not sent yet and the calls.
    pub fn finish(&mut self, tail: &str, complete: bool, new_id: &mut dyn FnMut() -> String) -> (String, Vec<ToolCall>) {
        self.text.push_str(tail);
        if self.format == ToolCallFormat::Generic {
            return self.finish_generic(complete, new_id);
        }
        let parsed = if complete { self.format.parse(&self.text, new_id) } else { ParsedReply { content: self.text.clone(), tool_calls: Vec::new() } };
        let unsent = if parsed.tool_calls.is_empty() {
            self.text[self.sent.min(self.text.len())..].to_string()
        } else {
            // The content beside the calls, less what already went out before the first call.
            let sent = self.text[..self.sent].trim();
            parsed.content.strip_prefix(sent).map_or_else(String::new, |rest| rest.trim_start().to_string())
        };
        self.sent = self.text.len();
        let mut calls = parsed.tool_calls;
        if !self.parallel {
            calls.truncate(1);
        }
        (unsent, calls)
    }

    fn finish_generic(&mut self, complete: bool, new_id: &mut dyn FnMut() -> String) -> (String, Vec<ToolCall>) {
        let parsed = if complete { parse_generic(&self.text, new_id) } else { None };
        let (content, mut calls) = match parsed {
            Some(p) => (p.content, p.tool_calls),
            // Cut short or not the JSON asked for: the response so far, else the text as written.
            None => (generic_response(&self.text).map_or_else(|| self.text.clone(), |(r, _)| r), Vec::new()),
        };
        let unsent = content.get(self.sent_response..).unwrap_or_default().to_string();
        self.sent = self.text.len();
        self.sent_response = content.len();
        if !self.parallel {
            calls.truncate(1);
        }
        (unsent, calls)
    }

    /// How much of the text so far cannot be the start of a call.
    fn safe_len(&self) -> usize {
        let text = self.text.as_str();
        match self.format {
            ToolCallFormat::Hermes => {
                let marker = self.format.start_marker();
                if let Some(at) = text.find(marker) {
                    return at;
                }
                // A tail that could grow into the marker is held back.
                let hold = (1..marker.len())
                    .rev()
                    .find(|&n| text.len() >= n && text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
                    .unwrap_or(0);
                text.len() - hold
            }
            // Streamed by `push` from the decoded response.
            ToolCallFormat::Generic => 0,
            // The call is the whole reply: nothing goes out while the reply starts like one.
            ToolCallFormat::Llama3Json | ToolCallFormat::MistralToolCalls => {
                let t = text.trim_start();
                let leads = ["{", "[", "<|python_tag|>", "[TOOL_CALLS]"];
                if leads.iter().any(|l| t.starts_with(l) || l.starts_with(t)) {
                    0
                } else {
                    text.len()
                }
            }
        }
    }
}

/// The decoded text of a generic reply's `"response"` string so far (`true` once it is closed),
/// or `None` while the reply is not (yet) `{"response": "...`. A piece that ends inside an
/// escape is left for the next call.
fn generic_response(text: &str) -> Option<(String, bool)> {
    let body = text.trim_start().strip_prefix(GENERIC_RESPONSE_PREFIX)?;
    let bytes = body.as_bytes();
    let (mut i, mut end, mut closed) = (0, 0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                closed = true;
                break;
            }
            b'\\' => {
                let len = if bytes.get(i + 1) == Some(&b'u') { 6 } else { 2 };
                if i + len > bytes.len() {
                    break;
                }
                i += len;
            }
            _ => i += 1,
        }
        end = i;
    }
    // A high surrogate escape waiting for its pair does not decode yet: back off to before it.
    let mut slice = &body[..end];
    loop {
        match serde_json::from_str::<String>(&format!("\"{slice}\"")) {
            Ok(s) => return Some((s, closed)),
            Err(_) if slice.len() >= 6 && slice.is_char_boundary(slice.len() - 6) => slice = &slice[..slice.len() - 6],
            Err(_) => return Some((String::new(), false)),
        }
    }
}

/// Ids for calls the model did not name: nine alphanumerics (the length Mistral's templates
/// require of ids in the history), random per call.
pub fn random_call_id() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..9).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id{n}")
        }
    }

    fn parse(f: ToolCallFormat, text: &str) -> ParsedReply {
        f.parse(text, &mut ids())
    }

    #[test]
    fn hermes_blocks_with_text_around_and_several_calls() {
        // Qwen2.5's documented output shape.
        let r = parse(ToolCallFormat::Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>");
        assert_eq!(r, ParsedReply { content: String::new(), tool_calls: vec![ToolCall::new("id1", "get_weather", json!({"city": "Zürich"}))] });
        let r = parse(
            ToolCallFormat::Hermes,
            "Let me check both.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>",
        );
        assert_eq!(r.content, "Let me check both.");
        assert_eq!(r.tool_calls.iter().map(|c| c.function.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r.tool_calls[1].function.arguments, json!({"x": 1}), "string arguments holding an object are read");
        assert_eq!(r.tool_calls[1].arguments_json(), "{\"x\":1}");
        // Unclosed at the end of the reply (EOS right after the JSON): still a call.
        assert_eq!(parse(ToolCallFormat::Hermes, "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"k\": [1, 2]}}").tool_calls.len(), 1);
    }

    #[test]
    fn malformed_calls_are_content() {
        for text in [
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"k\": \n</tool_call>", // cut JSON
            "<tool_call>\n{\"arguments\": {}}\n</tool_call>",                       // no name
            "<tool_call>\n[1, 2]\n</tool_call>",                                    // not an object
            "<tool_call>\n{\"name\": \"\", \"arguments\": {}}\n</tool_call>",       // empty name
            "plain answer",
        ] {
            assert_eq!(parse(ToolCallFormat::Hermes, text), ParsedReply { content: text.into(), tool_calls: vec![] }, "{text}");
        }
        for text in ["{\"name\": \"a\", \"parameters\": {\"x\": 1}", "The answer is {\"name\": 1}", "{\"x\": 1}", "{} trailing"] {
            assert_eq!(parse(ToolCallFormat::Llama3Json, text).tool_calls, vec![], "{text}");
            assert_eq!(parse(ToolCallFormat::Llama3Json, text).content, text);
        }
        for text in ["[TOOL_CALLS][{\"name\": \"a\"", "[TOOL_CALLS] {\"name\": \"a\"}", "[1]", "[]"] {
            assert_eq!(parse(ToolCallFormat::MistralToolCalls, text).tool_calls, vec![], "{text}");
        }
    }

    #[test]
    fn llama3_json_with_and_without_python_tag_and_several_calls() {
        // Llama 3.1's documented JSON tool-calling reply.
        let r = parse(ToolCallFormat::Llama3Json, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}}");
        assert_eq!(r.tool_calls, vec![ToolCall::new("id1", "get_weather", json!({"city": "Zürich", "unit": "celsius"}))]);
        let r = parse(ToolCallFormat::Llama3Json, "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"arguments\": {\"y\": true}}");
        assert_eq!(r.tool_calls.iter().map(|c| (c.id.as_str(), c.function.name.as_str())).collect::<Vec<_>>(), [("id1", "a"), ("id2", "b")]);
    }

    #[test]
    fn mistral_array_with_and_without_the_marker() {
        let text = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"abc123XYZ\"}]";
        let r = parse(ToolCallFormat::MistralToolCalls, text);
        assert_eq!(r.tool_calls, vec![ToolCall::new("abc123XYZ", "get_weather", json!({"city": "Paris"}))], "the model's own id is kept");
        let r = parse(ToolCallFormat::MistralToolCalls, "[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {}}]");
        assert_eq!(r.tool_calls.len(), 2);
    }

    #[test]
    fn formats_are_detected_from_the_real_templates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        assert_eq!(ToolCallFormat::detect(&read("qwen2.5.jinja")), Some(ToolCallFormat::Hermes));
        assert_eq!(ToolCallFormat::detect(&read("qwen3.jinja")), Some(ToolCallFormat::Hermes));
        assert_eq!(ToolCallFormat::detect(&read("llama3.1.jinja")), Some(ToolCallFormat::Llama3Json));
        assert_eq!(ToolCallFormat::detect(&read("llama3.2.jinja")), Some(ToolCallFormat::Llama3Json));
        assert_eq!(ToolCallFormat::detect(&read("mistral-nemo.jinja")), Some(ToolCallFormat::MistralToolCalls));
        assert_eq!(ToolCallFormat::detect(&read("smollm2.jinja")), None);
    }

    /// Feeds `pieces` one by one (as tokens arrive); returns everything sent as content and the calls.
    fn stream(format: ToolCallFormat, pieces: &[&str], complete: bool) -> (String, Vec<ToolCall>) {
        let mut s = ToolCallStream::new(format, true);
        let mut sent: String = pieces.iter().map(|p| s.push(p)).collect();
        let (rest, calls) = s.finish("", complete, &mut ids());
        sent.push_str(&rest);
        (sent, calls)
    }

    #[test]
    fn streams_never_leak_call_syntax_as_content() {
        // Qwen: text, then a call split across tokens at awkward places.
        let pieces = ["Checking", " now.\n", "<tool", "_call>\n{\"name\": \"get_", "weather\", \"arguments\": {\"city\": \"Z", "ürich\"}}\n</tool_call>"];
        let (sent, calls) = stream(ToolCallFormat::Hermes, &pieces, true);
        assert_eq!(sent, "Checking now.\n", "only the text before the call");
        assert_eq!(calls, vec![ToolCall::new("id1", "get_weather", json!({"city": "Zürich"}))]);
        // A `<` that is not a call is sent once it cannot be one any more.
        let mut s = ToolCallStream::new(ToolCallFormat::Hermes, true);
        assert_eq!(s.push("a <to"), "a ");
        assert_eq!(s.push("p> b"), "<top> b");
        // Llama 3: a reply that starts like JSON is held until the end; prose goes out at once.
        let (sent, calls) = stream(ToolCallFormat::Llama3Json, &["{\"name\": \"f\", ", "\"parameters\": {}}"], true);
        assert_eq!((sent.as_str(), calls.len()), ("", 1));
        let mut s = ToolCallStream::new(ToolCallFormat::Llama3Json, true);
        assert_eq!(s.push("Paris"), "Paris");
        // Held text that turns out not to be a call is sent at the end, whole.
        assert_eq!(stream(ToolCallFormat::Llama3Json, &["{not", " json"], true), ("{not json".into(), vec![]));
        // Cut by the token limit: text, even if it parses.
        assert_eq!(stream(ToolCallFormat::MistralToolCalls, &["[{\"name\": \"f\", \"arguments\": {}}]"], false).1, vec![]);
        // Not parallel: the first call only.
        let mut s = ToolCallStream::new(ToolCallFormat::MistralToolCalls, false);
        s.push("[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {}}]");
        assert_eq!(s.finish("", true, &mut ids()).1.len(), 1);
    }

    #[test]
    fn call_ids_are_nine_alphanumerics_and_serialise_in_the_template_shape() {
        let id = random_call_id();
        assert!(id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        assert_ne!(random_call_id(), random_call_id());
        let c = ToolCall::new("x", "f", json!({"a": 1}));
        assert_eq!(serde_json::to_value(&c).unwrap(), json!({"id": "x", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}));
        let back: ToolCall = serde_json::from_value(json!({"id": "x", "function": {"name": "f", "arguments": {"a": 1}}})).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn generic_replies_are_calls_or_a_response() {
        let r = parse(ToolCallFormat::Generic, "{\"tool_calls\": [{\"name\": \"f\", \"arguments\": {\"x\": 1}}, {\"name\": \"g\", \"arguments\": {}}]}");
        assert_eq!(r.tool_calls, vec![ToolCall::new("id1", "f", json!({"x": 1})), ToolCall::new("id2", "g", json!({}))]);
        assert_eq!(r.content, "");
        let r = parse(ToolCallFormat::Generic, "{\"response\": \"Hi \\\"there\\\"\"}");
        assert_eq!(r, ParsedReply { content: "Hi \"there\"".into(), tool_calls: vec![] });
        assert_eq!(parse(ToolCallFormat::Generic, "{\"tool_call\": {\"name\": \"f\", \"arguments\": {}}}").tool_calls.len(), 1);
        for text in ["{\"tool_calls\": []}", "{\"tool_calls\": [{\"arguments\": {}}]}", "{\"response\": 3}", "{\"other\": 1}", "plain", "{\"response\": \"cut"] {
            assert_eq!(parse(ToolCallFormat::Generic, text), ParsedReply { content: text.into(), tool_calls: vec![] }, "{text}");
        }
    }

    #[test]
    fn generic_streams_the_decoded_response_and_never_the_json() {
        // Split inside the prefix, inside an escape and inside a \u escape.
        let pieces = ["{\"resp", "onse\": \"Hel", "lo \\", "\"you\\", "\" \\u00e", "9 \\ud83d", "\\ude00!\"}"];
        let (sent, calls) = stream(ToolCallFormat::Generic, &pieces, true);
        assert_eq!(sent, "Hello \"you\" é 😀!");
        assert!(calls.is_empty());
        let mut s = ToolCallStream::new(ToolCallFormat::Generic, true);
        assert_eq!(s.push("{\"response\": \"Hel"), "Hel", "content streams as it comes");
        let (sent, calls) = stream(ToolCallFormat::Generic, &["{\"tool_calls\": [{\"name\": \"f\", ", "\"arguments\": {}}]}"], true);
        assert_eq!((sent.as_str(), calls.len()), ("", 1));
        // Cut by the token limit: the response so far; a reply that is not the JSON: as written.
        assert_eq!(stream(ToolCallFormat::Generic, &["{\"response\": \"Hel", "lo"], false).0, "Hello");
        assert_eq!(stream(ToolCallFormat::Generic, &["Just text"], true).0, "Just text");
        let mut s = ToolCallStream::new(ToolCallFormat::Generic, false);
        s.push("{\"tool_calls\": [{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {}}]}");
        assert_eq!(s.finish("", true, &mut ids()).1.len(), 1, "not parallel: the first call");
    }

    #[test]
    fn generic_messages_describe_the_tools_and_rewrite_calls_and_results() {
        let tool = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}});
        let history = vec![
            Message::system("Be brief."),
            Message::user("Weather?"),
            Message::assistant_calls("", vec![ToolCall::new("c1", "get_weather", json!({"city": "Paris"}))]),
            Message::tool_result("c1", None, "21 C"),
        ];
        let out = generic_messages(&history, std::slice::from_ref(&tool));
        assert_eq!(out.len(), 4);
        assert!(out[0].content.starts_with("Be brief.\n\n") && out[0].content.contains("{\"name\":\"get_weather\""), "{}", out[0].content);
        assert!(out[0].content.contains("{\"response\": <your answer>}"));
        assert_eq!(out[2], Message::assistant("{\"tool_calls\":[{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}]}"));
        assert_eq!(out[3], Message::user("{\"tool_response\":{\"name\":\"get_weather\",\"content\":\"21 C\"}}"), "the name comes from the call");
        // Without a system message one is added; without tools nothing is described.
        assert_eq!(generic_messages(&history[1..2], &[tool])[0].role, Role::System);
        assert_eq!(generic_messages(&history[1..2], &[]), vec![Message::user("Weather?")]);
    }

    #[test]
    fn call_constraints_by_choice_and_format() {
        let tools = [json!({"type": "function", "function": {"name": "a"}}), json!({"type": "function", "function": {"name": "b", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}})];
        use ToolCallFormat::*;
        for f in [Hermes, Llama3Json, MistralToolCalls] {
            assert_eq!(call_constraint(f, &tools, &ToolChoice::Auto, true).unwrap(), None, "{f:?}: auto is free");
            assert!(matches!(call_constraint(f, &tools, &ToolChoice::Required, true).unwrap(), Some(Constraint::Lark(_))));
        }
        let Some(Constraint::JsonSchema(none)) = call_constraint(Generic, &tools, &ToolChoice::None, true).unwrap() else { panic!() };
        assert_eq!(none["required"], json!(["response"]), "none: a response only");
        let Some(Constraint::JsonSchema(auto)) = call_constraint(Generic, &tools, &ToolChoice::Auto, false).unwrap() else { panic!() };
        assert_eq!(auto["anyOf"][1]["required"], json!(["response"]), "{auto}");
        assert_eq!(auto["anyOf"][0]["properties"]["tool_calls"]["maxItems"], 1, "not parallel: one call");
        let Some(Constraint::Lark(g)) = call_constraint(Llama3Json, &tools, &ToolChoice::Function("b".into()), false).unwrap() else { panic!() };
        assert!(g.contains("\"parameters\"") && g.contains("\"const\":\"b\"") && !g.contains("\"const\":\"a\""), "{g}");
        let e = call_constraint(Hermes, &tools, &ToolChoice::Function("c".into()), true).unwrap_err();
        assert!(matches!(&e, Error::InvalidParameter { name: "tool_choice", reason } if reason.contains("`c`")), "{e}");
        assert!(matches!(call_constraint(Hermes, &[], &ToolChoice::Required, true), Err(Error::InvalidParameter { name: "tool_choice", .. })));
        let nameless = [json!({"type": "function", "function": {}})];
        assert!(matches!(call_constraint(Hermes, &nameless, &ToolChoice::Required, true), Err(Error::InvalidParameter { name: "tools", .. })));
    }
}
