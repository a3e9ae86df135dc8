//! One generation request from submitted handles to an OpenAI response: collected into one JSON
//! body, or written as server-sent events (the one SSE writer). Both shapes (`chat.completion`
//! and `text_completion`) come from the same events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::{json, Value};

use super::error::ApiError;
use crate::chat::tools::random_call_id;
use crate::chat::tools::ToolCallStream;
use crate::chat::{ToolCall, ToolCallFormat};
use super::{AppState, RequestLog};
use crate::generation::{AsyncTokenStream, Event, FinishReason};
use crate::registry::Lease;
use crate::sampling::TokenLogprobs;
use crate::tokenizer::Tokenizer;

/// Seconds between `: keepalive` comments while a stream has nothing to send (a long prefill);
/// writing them is also how a vanished client is noticed.
pub const KEEPALIVE: Duration = Duration::from_secs(2);

/// Which endpoint's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl-",
            Kind::Text => "cmpl-",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }
}

/// A submitted request: what the response needs besides the events.
pub struct Job {
    pub kind: Kind,
    /// The id the client asked for (or the default model's).
    pub model: String,
    pub lease: Lease,
    pub handles: Vec<AsyncTokenStream>,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Read the replies as tool calls in this syntax (chat with `tools`); `.1`: several per reply.
    pub tool_calls: Option<(ToolCallFormat, bool)>,
    pub log: RequestLog,
}

/// A finished reply split into text and calls (OpenAI's `tool_calls[]`, arguments as JSON text).
/// The same rules as a stream's end ([`ToolCallStream::finish`]) with nothing sent before.
fn split_calls(text: &str, tools: Option<(ToolCallFormat, bool)>, complete: bool) -> (String, Vec<Value>) {
    let Some((format, parallel)) = tools else { return (text.to_string(), Vec::new()) };
    let (content, calls) = ToolCallStream::new(format, parallel).finish(text, complete, &mut random_call_id);
    (content, calls.iter().map(openai_call).collect())
}

/// A call as OpenAI sends it (arguments as JSON text).
fn openai_call(c: &ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.arguments_json()}})
}


/// `finish_reason` as OpenAI spells it.
fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Eos | FinishReason::Cancelled => "stop",
    }
}

/// A choice being accumulated.
#[derive(Default)]
struct Choice {
    text: String,
    /// Characters in `text` (completions' `text_offset`), kept as it grows.
    chars: usize,
    logprobs: Vec<Value>,
    /// Completions' shape: per token piece, logprob, alternatives, offset.
    text_lp: TextLogprobs,
    finish: Option<&'static str>,
    /// Holds content back while it may be a tool call (chat with `tools`, streaming).
    tool_stream: Option<ToolCallStream>,
}

#[derive(Default)]
struct TextLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

fn piece(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id).unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// OpenAI's chat `logprobs.content[]` entry.
fn chat_logprob(tok: &Tokenizer, id: u32, lp: &TokenLogprobs) -> Value {
    let (token, bytes) = piece(tok, id);
    let top: Vec<Value> = lp
        .top
        .iter()
        .map(|&(alt, l)| {
            let (t, b) = piece(tok, alt);
            json!({"token": t, "logprob": l, "bytes": b})
        })
        .collect();
    json!({"token": token, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top})
}

impl Choice {
    /// Takes one token event's text and log-probabilities.
    fn token(&mut self, tok: &Tokenizer, kind: Kind, id: u32, text: &str, lp: Option<&TokenLogprobs>) -> Option<Value> {
        let offset = self.chars;
        self.text.push_str(text);
        self.chars += text.chars().count();
        let lp = lp?;
        Some(match kind {
            Kind::Chat => {
                let v = chat_logprob(tok, id, lp);
                self.logprobs.push(v.clone());
                v
            }
            Kind::Text => {
                let (token, _) = piece(tok, id);
                let top: serde_json::Map<String, Value> = lp.top.iter().map(|&(alt, l)| (piece(tok, alt).0, json!(l))).collect();
                self.text_lp.tokens.push(token.clone());
                self.text_lp.token_logprobs.push(lp.logprob);
                self.text_lp.top.push(Value::Object(top.clone()));
                self.text_lp.offsets.push(offset);
                json!({"tokens": [token], "token_logprobs": [lp.logprob], "top_logprobs": [top], "text_offset": [offset]})
            }
        })
    }

    fn logprobs_value(&self, kind: Kind) -> Value {
        match kind {
            Kind::Chat => json!({"content": self.logprobs}),
            Kind::Text => json!({
                "tokens": self.text_lp.tokens,
                "token_logprobs": self.text_lp.token_logprobs,
                "top_logprobs": self.text_lp.top,
                "text_offset": self.text_lp.offsets,
            }),
        }
    }
}

/// Usage of a finished request: the prompt once (forks share it), completions summed.
#[derive(Default, Clone, Copy)]
struct Usage {
    prompt: usize,
    completion: usize,
}

impl Usage {
    fn value(self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion})
    }
}

/// Per-request timing for `/metrics` and the log line.
struct Clock {
    start: Instant,
    last: Option<Instant>,
}

impl Clock {
    fn tick(&mut self, state: &AppState, log: &mut RequestLog) {
        if let Some((_, completion)) = &mut log.tokens {
            *completion += 1;
        }
        let now = Instant::now();
        match self.last {
            None => {
                let ttft = now - self.start;
                state.metrics.ttft(ttft);
                log.ttft = Some(ttft);
            }
            Some(prev) => state.metrics.token_gap(now - prev),
        }
        self.last = Some(now);
    }
}

/// Every choice's events, tagged with the choice index, as they come.
type Tagged = SelectAll<BoxStream<'static, (usize, crate::Result<Event>)>>;

fn tagged(handles: Vec<AsyncTokenStream>) -> Tagged {
    let mut all = SelectAll::new();
    for (i, s) in handles.into_iter().enumerate() {
        all.push(s.map(move |e| (i, e)).boxed());
    }
    all
}

/// Runs `job` to the end and answers with one JSON body. A client that goes away drops this
/// future, which drops the streams and cancels the sequences.
pub async fn collect(state: Arc<AppState>, mut job: Job) -> Result<Response, ApiError> {
    let r = collect_into(&state, &mut job).await;
    match r {
        Ok(body) => {
            drop(job);
            Ok(axum::Json(body).into_response())
        }
        Err(e) => {
            job.log.status = e.status.as_u16();
            Err(e)
        }
    }
}

async fn collect_into(state: &AppState, job: &mut Job) -> Result<Value, ApiError> {
    let n = job.handles.len();
    let tok = job.lease.generator().tokenizer().clone();
    let mut events = tagged(std::mem::take(&mut job.handles));
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    let mut usage = Usage::default();
    let mut clock = Clock { start: job.log.start, last: None };
    while let Some((i, event)) = events.next().await {
        let c = &mut choices[i];
        match event.map_err(|e| ApiError::from(e).in_model(&job.model))? {
            Event::Token { id, text, logprobs } => {
                clock.tick(state, &mut job.log);
                c.token(&tok, job.kind, id, &text, logprobs.as_ref());
            }
            Event::Finished(f) => {
                c.text.push_str(&f.text);
                c.finish = Some(finish_reason(f.reason));
                usage.prompt = f.timings.prompt_tokens;
                usage.completion += f.timings.generated_tokens;
            }
        }
    }
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = if job.logprobs { c.logprobs_value(job.kind) } else { Value::Null };
            let finish = c.finish.unwrap_or("stop");
            match job.kind {
                // A reply cut by the token limit is text, never a half call (a generic reply's
                // response so far).
                Kind::Chat if job.tool_calls.is_some() => {
                    let (content, calls) = split_calls(&c.text, job.tool_calls, finish == "stop");
                    if calls.is_empty() {
                        json!({"index": i, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": finish})
                    } else {
                        let content = if content.is_empty() { Value::Null } else { Value::String(content) };
                        json!({"index": i, "message": {"role": "assistant", "content": content, "tool_calls": calls}, "logprobs": logprobs, "finish_reason": "tool_calls"})
                    }
                }
                Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs, "finish_reason": finish}),
                Kind::Text => json!({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": finish}),
            }
        })
        .collect();
    let body = json!({
        "id": job.log.response_id(job.kind.id_prefix()),
        "object": job.kind.object(false),
        "created": job.log.created,
        "model": job.model,
        "choices": choices,
        "usage": usage.value(),
    });
    job.log.done(state, usage.prompt, usage.completion);
    Ok(body)
}

/// What the SSE writer carries from event to event.
struct Streaming {
    state: Arc<AppState>,
    job: Job,
    tok: Tokenizer,
    events: Tagged,
    choices: Vec<Choice>,
    usage: Usage,
    clock: Clock,
    out: VecDeque<SseEvent>,
    id: String,
    finished: bool,
    failed: bool,
}

impl Streaming {
    fn chunk(&self, choices: Value) -> SseEvent {
        let v = json!({
            "id": self.id,
            "object": self.job.kind.object(true),
            "created": self.job.log.created,
            "model": self.job.model,
            "choices": choices,
        });
        SseEvent::default().data(v.to_string())
    }

    fn choice(&self, i: usize, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        match self.job.kind {
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"index": i, "delta": delta, "logprobs": logprobs.map(|v| json!({"content": [v]})), "finish_reason": finish})
            }
            Kind::Text => json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        }
    }

    fn on_event(&mut self, i: usize, event: crate::Result<Event>) {
        match event {
            Ok(Event::Token { id, text, logprobs }) => {
                self.clock.tick(&self.state, &mut self.job.log);
                let lp = self.choices[i].token(&self.tok, self.job.kind, id, &text, logprobs.as_ref());
                if let Some((format, parallel)) = self.job.tool_calls {
                    // Content goes out only while it cannot be the start of a call.
                    let piece = self.choices[i].tool_stream.get_or_insert_with(|| ToolCallStream::new(format, parallel)).push(&text);
                    if !piece.is_empty() || lp.is_some() {
                        let v = self.choice(i, &piece, lp, None);
                        self.out.push_back(self.chunk(json!([v])));
                    }
                } else if !text.is_empty() || lp.is_some() {
                    let c = self.choice(i, &text, lp, None);
                    self.out.push_back(self.chunk(json!([c])));
                }
            }
            Ok(Event::Finished(f)) if self.job.tool_calls.is_some() => {
                let mut reason = finish_reason(f.reason);
                self.usage.prompt = f.timings.prompt_tokens;
                self.usage.completion += f.timings.generated_tokens;
                let Some((format, parallel)) = self.job.tool_calls else { return };
                let stream = self.choices[i].tool_stream.get_or_insert_with(|| ToolCallStream::new(format, parallel));
                // A reply cut by the token limit is text, never a half call.
                let (unsent, calls) = stream.finish(&f.text, reason == "stop", &mut random_call_id);
                let calls: Vec<Value> = calls.iter().map(openai_call).collect();
                if !unsent.is_empty() {
                    let v = self.choice(i, &unsent, None, None);
                    self.out.push_back(self.chunk(json!([v])));
                }
                for (k, call) in calls.iter().enumerate() {
                    // OpenAI's fragments: index, id, type and name first, then the arguments.
                    let head = json!({"index": k, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}});
                    let args = json!({"index": k, "function": {"arguments": call["function"]["arguments"]}});
                    for frag in [head, args] {
                        let v = json!({"index": i, "delta": {"tool_calls": [frag]}, "logprobs": null, "finish_reason": null});
                        self.out.push_back(self.chunk(json!([v])));
                    }
                }
                if !calls.is_empty() {
                    reason = "tool_calls";
                }
                self.choices[i].finish = Some(reason);
                let v = self.choice(i, "", None, Some(reason));
                self.out.push_back(self.chunk(json!([v])));
            }
            Ok(Event::Finished(f)) => {
                let reason = finish_reason(f.reason);
                self.choices[i].finish = Some(reason);
                self.usage.prompt = f.timings.prompt_tokens;
                self.usage.completion += f.timings.generated_tokens;
                if !f.text.is_empty() {
                    let c = self.choice(i, &f.text, None, None);
                    self.out.push_back(self.chunk(json!([c])));
                }
                let c = self.choice(i, "", None, Some(reason));
                self.out.push_back(self.chunk(json!([c])));
            }
            Err(e) => {
                // Headers are sent: the error travels as an event, then the stream ends.
                let e = ApiError::from(e).in_model(&self.job.model);
                self.job.log.status = e.status.as_u16();
                self.failed = true;
                self.out.push_back(SseEvent::default().data(e.body().to_string()));
                self.end();
            }
        }
    }

    fn end(&mut self) {
        if self.job.include_usage && !self.failed {
            let v = json!({
                "id": self.id,
                "object": self.job.kind.object(true),
                "created": self.job.log.created,
                "model": self.job.model,
                "choices": [],
                "usage": self.usage.value(),
            });
            self.out.push_back(SseEvent::default().data(v.to_string()));
        }
        self.out.push_back(SseEvent::default().data("[DONE]"));
        if !self.failed {
            self.job.log.done(&self.state, self.usage.prompt, self.usage.completion);
        }
        self.events = SelectAll::new(); // drops the other choices' streams (cancelling them)
        self.finished = true;
    }
}

/// Streams `job` as server-sent events: a `delta.role` chunk per choice (chat), content chunks
/// of whole characters, a `finish_reason` chunk per choice, a usage chunk (`choices: []`) when
/// asked, then `data: [DONE]`. A client that goes away drops the stream: its sequences are
/// cancelled and their slots freed at the next engine step.
pub fn stream(state: Arc<AppState>, mut job: Job) -> Result<Response, ApiError> {
    let n = job.handles.len();
    let events = tagged(std::mem::take(&mut job.handles));
    let tok = job.lease.generator().tokenizer().clone();
    let id = job.log.response_id(job.kind.id_prefix());
    let start = job.log.start;
    let mut s = Streaming {
        state,
        job,
        tok,
        events,
        choices: (0..n).map(|_| Choice::default()).collect(),
        usage: Usage::default(),
        clock: Clock { start, last: None },
        out: VecDeque::new(),
        id,
        finished: false,
        failed: false,
    };
    if s.job.kind == Kind::Chat {
        for i in 0..n {
            let v = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            let c = s.chunk(json!([v]));
            s.out.push_back(c);
        }
    }
    let body = stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.finished {
                return None;
            }
            match s.events.next().await {
                Some((i, e)) => s.on_event(i, e),
                None => s.end(),
            }
        }
    });
    Ok(Sse::new(body).keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive")).into_response())
}
