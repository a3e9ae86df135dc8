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
//! Parsing never fails: text that does not hold a well-formed call is returned as content, as it
//! was written (a model that starts a call and stops half-way has answered in text).

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
            Self::Llama3Json => "{",
            Self::MistralToolCalls => "[TOOL_CALLS]",
        }
    }

    /// Splits a complete reply into content and calls. `new_id` names each call in order.
    pub fn parse(self, text: &str, new_id: &mut dyn FnMut() -> String) -> ParsedReply {
        let parsed = match self {
            Self::Hermes => parse_hermes(text, new_id),
            Self::Llama3Json => parse_llama3(text, new_id),
            Self::MistralToolCalls => parse_mistral(text, new_id),
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

/// A streamed reply that may hold tool calls: [`push`](Self::push) returns the text that can go
/// out as content now — everything that cannot be the start of a call — and
/// [`finish`](Self::finish) parses the whole reply once it has ended.
#[derive(Debug, Clone)]
pub struct ToolCallStream {
    format: ToolCallFormat,
    parallel: bool,
    text: String,
    sent: usize,
}

impl ToolCallStream {
    /// A stream for replies in `format`; `parallel`: keep every call (else only the first).
    pub fn new(format: ToolCallFormat, parallel: bool) -> Self {
        Self { format, parallel, text: String::new(), sent: 0 }
    }

    /// Takes the next piece of the reply; returns the content safe to send now.
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
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
}
