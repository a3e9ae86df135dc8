//! `metal_candle::server` over real HTTP on 127.0.0.1: every endpoint, error and limit, on the
//! committed fixtures (a tiny Qwen2 with two PEFT adapters, a tiny Llama 3) and the real SmolLM2
//! GGUF. References: the library's own generator with the adapter applied directly (the same code
//! `metal-candle generate --adapter` runs) for adapters, solo requests for concurrency.
#![cfg(feature = "server")]

mod common;

use std::io::{BufRead, BufReader, Write};
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metal_candle::adapter::{AdapterOptions, ApplyAdapter, LoraAdapter};
use metal_candle::engine::EngineConfig;
use metal_candle::generation::{GenerateParams, Generator};
use metal_candle::registry::{AdapterSource, ModelRegistry, ModelSource, ModelStatus, RegistryConfig};
use metal_candle::server::{Server, ServerConfig};
use metal_candle::{DeviceChoice, LoadOptions};
use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};

fn qwen2() -> PathBuf {
    common::model_dir("qwen2")
}

fn adapter(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/qwen2").join(name)
}

fn cpu() -> LoadOptions {
    LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() }
}

fn registry_config(models: Vec<ModelSource>) -> RegistryConfig {
    RegistryConfig {
        models,
        load: cpu(),
        engine: EngineConfig { max_sequences: 4, ..EngineConfig::default() },
        ..RegistryConfig::default()
    }
}

fn qwen2_with_adapters() -> RegistryConfig {
    let mut c = registry_config(vec![ModelSource::new("qwen2", qwen2())]);
    c.adapters = ["a", "b"]
        .iter()
        .map(|n| AdapterSource { name: n.to_string(), path: adapter(n), scale: 1.0, base: Some("qwen2".into()) })
        .collect();
    c
}

/// A server on a free loopback port, stopped (and joined) on drop.
struct TestServer {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<metal_candle::Result<()>>>,
    http: Client,
}

impl TestServer {
    fn start(registry: RegistryConfig, server: ServerConfig) -> Self {
        let registry = ModelRegistry::new(registry).unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let s = Server::bind(registry, ServerConfig { port: 0, ..server }).await?;
                addr_tx.send(s.local_addr()?).unwrap();
                s.run(async move {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("server bound");
        let s = Self { base: format!("http://{addr}"), stop: Some(stop), thread: Some(thread), http: Client::new() };
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.http.get(s.url("/health")).send().map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
            assert!(Instant::now() < deadline, "the server never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.http.post(self.url(path)).json(body).send().unwrap()
    }

    fn get(&self, path: &str) -> Value {
        self.http.get(self.url(path)).send().unwrap().json().unwrap()
    }

    fn processing(&self) -> u64 {
        self.get("/health")["slots_processing"].as_u64().unwrap()
    }

    /// Waits until no slot is busy; false after `limit`.
    fn idle_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.processing() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("server thread").expect("server run");
            }
        }
    }
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
fn sse(r: Response) -> Vec<String> {
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    BufReader::new(r).lines().map(Result::unwrap).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0});
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    b
}

fn joined_stream(chunks: &[String]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for c in chunks.iter().filter(|c| *c != "[DONE]") {
        let v: Value = serde_json::from_str(c).unwrap();
        for ch in v["choices"].as_array().unwrap() {
            text.push_str(ch["delta"]["content"].as_str().or(ch["text"].as_str()).unwrap_or(""));
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}

fn error_of(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(ct.starts_with("application/json"), "error bodies are JSON, got {ct}");
    let v: Value = r.json().unwrap();
    for field in ["message", "type", "param", "code"] {
        assert!(v["error"].get(field).is_some(), "OpenAI error shape lacks `{field}`: {v}");
    }
    (status, v["error"].clone())
}

#[test]
fn health_models_and_unknown_routes() {
    let s = TestServer::start(qwen2_with_adapters(), ServerConfig::default());
    let h = s.get("/health");
    assert_eq!((h["status"].as_str(), h["slots_idle"].as_u64(), h["slots_processing"].as_u64()), (Some("ok"), Some(4), Some(0)));
    let models = s.get("/v1/models");
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["qwen2", "a", "b"]);
    let a = s.get("/v1/models/a");
    assert_eq!((a["object"].as_str(), a["parent"].as_str(), a["status"].as_str()), (Some("model"), Some("qwen2"), Some("loaded")));
    assert_eq!(a["context_length"], 128);
    let (status, e) = error_of(s.http.get(s.url("/v1/models/nope")).send().unwrap());
    assert_eq!((status, e["code"].as_str()), (404, Some("model_not_found")));
    let (status, _) = error_of(s.http.get(s.url("/v2/anything")).send().unwrap());
    assert_eq!(status, 404);
}

/// `/health` is 503 while the default model loads, and 200 once it has: the fixture's
/// `config.json` is a named pipe, so the load waits until the test writes it.
#[test]
#[cfg(unix)]
fn health_is_503_while_the_first_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("qwen2");
    std::fs::create_dir(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(qwen2().join(f), model.join(f)).unwrap();
    }
    let pipe = model.join("config.json");
    let c = std::ffi::CString::new(pipe.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let config = std::fs::read(qwen2().join("config.json")).unwrap();
    let registry = ModelRegistry::new(registry_config(vec![ModelSource::new("qwen2", model.clone())])).unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let s = Server::bind(registry, ServerConfig { port: 0, ..ServerConfig::default() }).await?;
            addr_tx.send(s.local_addr()?).unwrap();
            s.run(async move {
                let _ = stop_rx.await;
            })
            .await
        })
    });
    let base = format!("http://{}", addr_rx.recv_timeout(Duration::from_secs(30)).unwrap());
    let http = Client::new();
    let status = || http.get(format!("{base}/health")).send().unwrap();
    // The load is stuck on the pipe: every probe in a second is 503 in OpenAI's error shape.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        let (code, e) = error_of(status());
        assert_eq!((code, e["code"].as_str()), (503, Some("unavailable")), "{e}");
        assert!(e["message"].as_str().unwrap().contains("loading"), "{e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let models = http.get(format!("{base}/v1/models")).send().unwrap();
    assert_eq!(models.status().as_u16(), 200, "the model list answers during the load");
    // Feed the pipe (once per open: the loader may read it more than once) until the server is
    // ready.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (done, pipe) = (Arc::clone(&done), pipe.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&pipe) {
                    let _ = f.write_all(&config);
                }
                // Closed: the reader sees EOF; give it time to close before the next open, which
                // would otherwise join the same read.
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if server.is_finished() {
            panic!("the server stopped: {:?}", server.join().unwrap().err());
        }
        if http.get(format!("{base}/health")).send().is_ok_and(|r| r.status().as_u16() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready after the config arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    // Unblock the writer's pending open with a reader of our own.
    let _reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&pipe).unwrap();
    writer.join().unwrap();
    let h: Value = status().json().unwrap();
    assert_eq!(h["status"], "ok");
    let _ = stop.send(());
    server.join().unwrap().unwrap();
}

#[test]
fn chat_and_completions_answer_in_openai_shapes() {
    let s = TestServer::start(qwen2_with_adapters(), ServerConfig::default());
    let r: Value = s.post("/v1/chat/completions", &chat_body("hello there", json!({}))).json().unwrap();
    assert_eq!((r["object"].as_str(), r["model"].as_str()), (Some("chat.completion"), Some("qwen2")));
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &r["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let finish = choice["finish_reason"].as_str().unwrap().to_string();
    let u = &r["usage"];
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()));
    assert!(u["completion_tokens"].as_u64().unwrap() >= 1);

    // Streaming: the role first, content chunks, the finish chunk, usage with no choices, [DONE].
    let body = chat_body("hello there", json!({"stream": true, "stream_options": {"include_usage": true}}));
    let chunks = sse(s.post("/v1/chat/completions", &body));
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["object"], "chat.completion.chunk");
    let usage: Value = serde_json::from_str(&chunks[chunks.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], r["usage"]);
    let (streamed, streamed_finish) = joined_stream(&chunks);
    assert_eq!((streamed, streamed_finish), (text, Some(finish)), "streamed text joined equals the non-streamed text");

    // Completions: a string and token ids, logprobs in the completions shape.
    let r: Value = s.post("/v1/completions", &json!({"prompt": "a b c", "max_tokens": 5, "temperature": 0, "logprobs": 2})).json().unwrap();
    assert_eq!(r["object"], "text_completion");
    let lp = &r["choices"][0]["logprobs"];
    let n = r["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let r2: Value = s.post("/v1/completions", &json!({"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0})).json().unwrap();
    assert_eq!(r2["usage"]["prompt_tokens"], 3);

    // Chat logprobs: OpenAI's content[] shape; the chosen token's logprob is the best (greedy,
    // without the chat default's repetition penalty: logprobs are the model's, before penalties).
    let body = chat_body("hi", json!({"logprobs": true, "top_logprobs": 3, "repetition_penalty": 1.0}));
    let r: Value = s.post("/v1/chat/completions", &body).json().unwrap();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for c in content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["logprob"], c["logprob"]);
        assert!(c["bytes"].is_array() && c["token"].is_string());
    }

    // n = 2 forks: two choices.
    let r: Value = s.post("/v1/chat/completions", &chat_body("hi", json!({"n": 2, "temperature": 0.9, "seed": 3}))).json().unwrap();
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    assert_eq!(r["choices"][1]["index"], 1);
}

#[test]
fn bad_requests_are_400_naming_the_parameter_streaming_too() {
    let s = TestServer::start(qwen2_with_adapters(), ServerConfig::default());
    let cases: Vec<(Value, Option<&str>)> = vec![
        (chat_body("x", json!({"temperature": -1})), Some("temperature")),
        (chat_body("x", json!({"temperature": "hot"})), Some("temperature")),
        (chat_body("x", json!({"top_p": 0})), Some("top_p")),
        (chat_body("x", json!({"top_p": 1.5})), Some("top_p")),
        (chat_body("x", json!({"max_tokens": 0})), Some("max_tokens")),
        (chat_body("x", json!({"max_tokens": -3})), Some("max_tokens")),
        (chat_body("x", json!({"n": 0})), Some("n")),
        (chat_body("x", json!({"n": 1000})), Some("n")),
        (chat_body("x", json!({"top_logprobs": 50, "logprobs": true})), Some("top_logprobs")),
        (chat_body("x", json!({"logit_bias": {"999999": 1}})), Some("logit_bias")),
        (chat_body("x", json!({"stop": [""]})), Some("stop")),
        (json!({"messages": []}), Some("messages")),
        (json!({"messages": "hi"}), Some("messages")),
        (json!({"messages": [{"content": "hi"}]}), Some("messages[0]")),
        (json!({"messages": [{"role": "wizard", "content": "hi"}]}), Some("messages[0].role")),
        (json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}), Some("tools[0]")),
        (json!({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}), Some("response_format.type")),
    ];
    for (body, param) in cases {
        for stream in [false, true] {
            let mut b = body.clone();
            b["stream"] = json!(stream);
            let (status, e) = error_of(s.post("/v1/chat/completions", &b));
            assert_eq!(status, 400, "{b}: {e}");
            assert_eq!(e["param"].as_str(), param, "{b}: {e}");
            assert_eq!(e["type"], "invalid_request_error");
        }
    }
    let r = s.http.post(s.url("/v1/chat/completions")).header("content-type", "application/json").body("{not json").send().unwrap();
    assert_eq!(error_of(r).0, 400);
    let (status, e) = error_of(s.post("/v1/completions", &json!({"prompt": [1, 100000]})));
    assert_eq!((status, e["param"].as_str()), (400, Some("prompt")));
    let (status, e) = error_of(s.post("/v1/completions", &json!({"prompt": "x", "echo": true})));
    assert_eq!((status, e["param"].as_str()), (400, Some("echo")));
    // Nothing above disturbed the server.
    assert_eq!(s.post("/v1/chat/completions", &chat_body("x", json!({}))).status(), 200);
}

#[test]
fn a_prompt_over_the_context_is_refused_with_both_counts() {
    let mut config = qwen2_with_adapters();
    config.engine.context = Some(32);
    let s = TestServer::start(config, ServerConfig::default());
    let long = "a ".repeat(100);
    for stream in [false, true] {
        let (status, e) = error_of(s.post("/v1/chat/completions", &chat_body(&long, json!({"stream": stream}))));
        assert_eq!((status, e["code"].as_str()), (400, Some("context_length_exceeded")), "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("32") && msg.contains("n_prompt_tokens"), "{msg}");
        let (status, e) = error_of(s.post("/v1/completions", &json!({"prompt": long, "stream": stream})));
        assert_eq!((status, e["code"].as_str()), (400, Some("context_length_exceeded")));
    }
    assert_eq!(s.get("/v1/models/qwen2")["context_length"], 32, "--ctx is per sequence, never divided");
}

#[test]
fn unknown_models_are_404_listing_the_ids() {
    let s = TestServer::start(qwen2_with_adapters(), ServerConfig::default());
    let (status, e) = error_of(s.post("/v1/chat/completions", &chat_body("x", json!({"model": "gpt-4", "stream": true}))));
    assert_eq!((status, e["code"].as_str(), e["param"].as_str()), (404, Some("model_not_found"), Some("model")));
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("gpt-4") && msg.contains("qwen2") && msg.contains("a, b"), "{msg}");
}

#[test]
fn api_key_body_limit_and_metrics() {
    let server = ServerConfig { api_key: Some("sekrit".into()), max_body_bytes: 4096, ..ServerConfig::default() };
    let s = TestServer::start(qwen2_with_adapters(), server);
    let body = chat_body("x", json!({}));
    let (status, e) = error_of(s.post("/v1/chat/completions", &body));
    assert_eq!((status, e["type"].as_str()), (401, Some("authentication_error")));
    let wrong = s.http.post(s.url("/v1/chat/completions")).bearer_auth("nope").json(&body).send().unwrap();
    assert_eq!(error_of(wrong).0, 401);
    assert_eq!(s.http.get(s.url("/v1/models")).send().unwrap().status(), 401);
    let ok = s.http.post(s.url("/v1/chat/completions")).bearer_auth("sekrit").json(&body).send().unwrap();
    assert_eq!(ok.status(), 200);
    let big = chat_body(&"x".repeat(10_000), json!({}));
    let r = s.http.post(s.url("/v1/chat/completions")).bearer_auth("sekrit").json(&big).send().unwrap();
    let (status, e) = error_of(r);
    assert_eq!((status, e["code"].as_str()), (413, Some("request_too_large")));
    assert!(s.idle_within(Duration::from_secs(5))); // the engine's gauges update after its step
    let metrics = s.http.get(s.url("/metrics")).bearer_auth("sekrit").send().unwrap().text().unwrap();
    for line in [
        "metal_candle_requests_total{endpoint=\"chat\",status=\"200\"} 1",
        "metal_candle_requests_total{endpoint=\"chat\",status=\"401\"} 2",
        "metal_candle_requests_total{endpoint=\"chat\",status=\"413\"} 1",
        "metal_candle_loaded_models 1",
        "metal_candle_running_sequences 0",
        "metal_candle_time_to_first_token_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
}

/// The reference: the library's generator on the base model with the adapter applied directly
/// (what `metal-candle generate --adapter DIR` runs).
fn solo_with_adapter(name: Option<&str>, prompt: &str, max_tokens: usize) -> String {
    let mut loaded = common::load_cpu(&qwen2());
    if let Some(n) = name {
        let a = LoraAdapter::load(&adapter(n), &loaded.model, &AdapterOptions::default()).unwrap();
        loaded.model.apply_adapter(n, &a, 1.0).unwrap();
    }
    let g = Generator::from_loaded(&loaded).unwrap();
    g.generate(prompt, &GenerateParams { max_tokens, ..GenerateParams::default() }).unwrap().text
}

#[test]
fn adapters_are_models_batched_together_and_loadable_at_run_time() {
    let s = Arc::new(TestServer::start(qwen2_with_adapters(), ServerConfig::default()));
    let prompt = "one two three four";
    let expected: Vec<String> = [Some("a"), Some("b"), None].iter().map(|n| solo_with_adapter(*n, prompt, 16)).collect();
    assert_ne!(expected[0], expected[2], "adapter a must change the output for this test to mean anything");
    assert_ne!(expected[1], expected[2]);
    // All three at once, several times over: rows of different adapters share steps.
    let threads: Vec<_> = (0..9)
        .map(|i| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let model = ["a", "b", "qwen2"][i % 3];
                let r: Value = s.post("/v1/completions", &json!({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0})).json().unwrap();
                assert_eq!(r["model"], model);
                (i % 3, r["choices"][0]["text"].as_str().unwrap().to_string())
            })
        })
        .collect();
    for t in threads {
        let (k, text) = t.join().unwrap();
        assert_eq!(text, expected[k], "model #{k} in a mixed batch equals its solo run");
    }

    // Load at run time: the same weights under a new name answer like `a`; a bad path is a 400
    // and reports no success; unloading makes the name 404.
    let r = s.post("/v1/load_lora_adapter", &json!({"lora_name": "a2", "lora_path": adapter("a"), "base_model": "qwen2"}));
    assert_eq!(r.status(), 200);
    let r: Value = s.post("/v1/completions", &json!({"model": "a2", "prompt": prompt, "max_tokens": 16, "temperature": 0})).json().unwrap();
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), expected[0]);
    assert_eq!(s.get("/v1/models/a2")["parent"], "qwen2");
    let (status, e) = error_of(s.post("/v1/load_lora_adapter", &json!({"lora_name": "bad", "lora_path": "/no/such/adapter"})));
    assert_eq!((status, e["param"].as_str()), (400, Some("lora_path")));
    assert_eq!(error_of(s.http.get(s.url("/v1/models/bad")).send().unwrap()).0, 404);
    let (status, e) = error_of(s.post("/v1/load_lora_adapter", &json!({"lora_name": "c", "lora_path": adapter("a"), "base_model": "nope"})));
    assert_eq!((status, e["param"].as_str()), (404, Some("base_model")));
    assert_eq!(s.post("/v1/unload_lora_adapter", &json!({"lora_name": "a2"})).status(), 200);
    let (status, _) = error_of(s.post("/v1/completions", &json!({"model": "a2", "prompt": prompt})));
    assert_eq!(status, 404);
    let (status, e) = error_of(s.post("/v1/unload_lora_adapter", &json!({"lora_name": "a2"})));
    assert_eq!((status, e["param"].as_str()), (404, Some("lora_name")));
}

#[test]
fn concurrent_requests_past_the_slots_queue_and_equal_their_solo_runs() {
    let mut config = qwen2_with_adapters();
    config.engine.max_sequences = 2;
    let s = Arc::new(TestServer::start(config, ServerConfig::default()));
    let prompts: Vec<String> = (0..6).map(|i| format!("prompt number {i} says")).collect();
    let solo: Vec<String> = prompts
        .iter()
        .map(|p| {
            let r: Value = s.post("/v1/chat/completions", &chat_body(p, json!({"max_tokens": 20}))).json().unwrap();
            r["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        })
        .collect();
    let threads: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || joined_stream(&sse(s.post("/v1/chat/completions", &chat_body(&p, json!({"max_tokens": 20, "stream": true}))))).0)
        })
        .collect();
    for (t, want) in threads.into_iter().zip(&solo) {
        assert_eq!(&t.join().unwrap(), want);
    }
}

#[test]
fn models_load_just_in_time_least_recently_used_first_and_idle_ones_expire() {
    let mut config = registry_config(vec![ModelSource::new("qwen2", qwen2()), ModelSource::new("llama3", common::model_dir("llama3"))]);
    config.models_max = 1;
    config.ttl = Some(Duration::from_secs(2));
    let registry = ModelRegistry::new(config).unwrap();
    // Two concurrent first requests share one load.
    let (l1, l2) = std::thread::scope(|sc| {
        let a = sc.spawn(|| registry.acquire(Some("llama3")).unwrap());
        let b = sc.spawn(|| registry.acquire(Some("llama3")).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(std::ptr::eq(l1.served(), l2.served()), "one load shared by both");
    let status = |id: &str| registry.list().into_iter().find(|m| m.id == id).unwrap().status;
    assert_eq!(status("llama3"), ModelStatus::Loaded);
    // A busy model is never unloaded: with llama3 leased, loading qwen2 has no room.
    let mut busy = registry_config(vec![ModelSource::new("qwen2", qwen2()), ModelSource::new("llama3", common::model_dir("llama3"))]);
    busy.busy_wait = Duration::from_millis(200);
    drop((l1, l2));
    let lease = registry.acquire(Some("qwen2")).unwrap();
    assert_eq!((status("qwen2"), status("llama3")), (ModelStatus::Loaded, ModelStatus::Unloaded), "LRU unload made room");
    drop(lease);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(registry.unload_idle(), 1);
    assert_eq!(status("qwen2"), ModelStatus::Unloaded);

    let busy = ModelRegistry::new(RegistryConfig { models_max: 1, ..busy }).unwrap();
    let held = busy.acquire(Some("qwen2")).unwrap();
    let t0 = Instant::now();
    assert!(matches!(busy.acquire(Some("llama3")), Err(metal_candle::Error::ModelsBusy { limit: 1 })));
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert_eq!(busy.list()[0].status, ModelStatus::Loaded);
    drop(held);
    assert!(busy.acquire(Some("llama3")).is_ok(), "once idle, it makes room");
}

#[test]
fn shutdown_signal_stops_the_binary_with_status_0() {
    let exe = env!("CARGO_BIN_EXE_metal-candle");
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--device", "cpu", "--port", "0", "--model"])
        .arg(qwen2())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the server logs its address").unwrap();
        if let Some(a) = line.split("listening on http://").nth(1) {
            break a.trim().to_string();
        }
    };
    let http = Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("http://{addr}/health")).send().map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let r: Value = http.post(format!("http://{addr}/v1/completions")).json(&json!({"prompt": "a", "max_tokens": 2})).send().unwrap().json().unwrap();
    assert_eq!(r["model"], "qwen2");
    // A streaming client that goes away after the first chunk: its log line says 499 and what
    // the request had read and written by then.
    let body = json!({"prompt": "a b c", "max_tokens": 100, "ignore_eos": true, "stream": true});
    let mut r = BufReader::new(http.post(format!("http://{addr}/v1/completions")).json(&body).send().unwrap());
    let mut first = String::new();
    r.read_line(&mut first).unwrap();
    drop(r);
    let line = loop {
        let line = lines.next().expect("a log line for the dropped request").unwrap();
        if line.contains("status=499") {
            break line;
        }
    };
    let field = |name: &str| -> usize { line.split(&format!("{name}=")).nth(1).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} in {line}")) };
    assert!(field("prompt_tokens") >= 3, "{line}");
    assert!(field("completion_tokens") < 100, "{line}");
    std::thread::spawn(move || for _ in lines {}); // keep draining the log
    #[cfg(unix)]
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// SmolLM2's end-of-sequence ids banned, so a generation runs for its whole `max_tokens`.
fn endless(max_tokens: usize, stream: bool) -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": stream, "logit_bias": {"0": -100, "1": -100, "2": -100}})
}

#[test]
fn smollm2_disconnects_free_slots_and_a_full_queue_is_429() {
    let Some(gguf) = common::smollm2_path() else { return };
    let mut config = registry_config(vec![ModelSource::new("smol", gguf)]);
    config.engine = EngineConfig { max_sequences: 1, max_queue: 1, ..EngineConfig::default() };
    let s = TestServer::start(config, ServerConfig::default());

    // A streaming client reads one chunk and goes away: its slot frees within a few steps.
    let r = s.post("/v1/completions", &endless(400, true));
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    assert_eq!(s.processing(), 1);
    drop(reader);
    assert!(s.idle_within(Duration::from_secs(5)), "the disconnected stream's slot is freed");

    // A non-streaming client that times out is cancelled too.
    let quick = Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    assert!(quick.post(s.url("/v1/completions")).json(&endless(400, false)).send().is_err());
    assert!(s.idle_within(Duration::from_secs(5)), "the timed-out request's slot is freed");

    // One running, one queued: the third is 429 with Retry-After, and nothing is disturbed.
    let running = s.post("/v1/completions", &endless(300, true));
    let s = Arc::new(s);
    let queued = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0})).status())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.http.get(s.url("/metrics")).send().unwrap().text().unwrap().contains("metal_candle_queue_depth 1") {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut got_429 = false;
    for _ in 0..100 {
        let r = s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4}));
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            let (_, e) = error_of(r);
            assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("queue_full"), None));
            got_429 = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(got_429, "a third request against 1 slot + 1 queue place is refused");
    drop(running);
    assert_eq!(queued.join().unwrap(), 200, "the queued request is served once the slot frees");
    assert!(s.idle_within(Duration::from_secs(5)));
}

#[test]
fn models_dir_serves_gguf_files_and_model_directories_by_stem_but_not_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::copy(fixtures.join("models/llama-256/model-q4_0.gguf"), dir.path().join("tiny.Q4_0.gguf")).unwrap();
    std::fs::copy(fixtures.join("lora/qwen2/a.gguf"), dir.path().join("adapter-a.gguf")).unwrap();
    let model_dir = dir.path().join("qwen2-dir");
    std::fs::create_dir(&model_dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(qwen2().join(f), model_dir.join(f)).unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not a model").unwrap();
    let config = RegistryConfig { models_dir: Some(dir.path().to_path_buf()), load: cpu(), ..RegistryConfig::default() };
    let registry = ModelRegistry::new(config).unwrap();
    assert_eq!(registry.ids(), ["qwen2-dir", "tiny.Q4_0"]);
    let lease = registry.acquire(Some("qwen2-dir")).unwrap();
    assert_eq!(lease.base_name(), "qwen2-dir");
}

#[test]
fn embeddings_equal_sentence_transformers_and_kinds_are_not_mixed() {
    let bert = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embed/bert");
    let mut config = qwen2_with_adapters();
    config.embedding_models = vec![ModelSource::new("bert", &bert)];
    let s = TestServer::start(config, ServerConfig::default());
    // The reference: sentence-transformers' vectors for the fixture corpus (scripts/fixtures).
    let info: Value = serde_json::from_str(&std::fs::read_to_string(bert.join("reference.json")).unwrap()).unwrap();
    let want = candle_core::safetensors::load(bert.join("reference.safetensors"), &candle_core::Device::Cpu).unwrap()["embeddings"]
        .to_vec2::<f32>()
        .unwrap();
    let texts = info["texts"].clone();
    let r: Value = s.post("/v1/embeddings", &json!({"model": "bert", "input": texts})).json().unwrap();
    assert!(r["error"].is_null(), "{r}");
    assert_eq!((r["object"].as_str(), r["model"].as_str()), (Some("list"), Some("bert")));
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), want.len());
    for (i, (d, w)) in data.iter().zip(&want).enumerate() {
        assert_eq!(d["index"], i);
        let got: Vec<f32> = d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let worst = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "vector {i} differs by {worst:e}");
        assert_eq!(d["truncated"], info["truncated"][i], "input {i}: the truncation flag");
    }
    let tokens: u64 = info["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).sum();
    assert_eq!(r["usage"]["prompt_tokens"], tokens);
    // base64: little-endian f32, the same numbers.
    let r: Value = s.post("/v1/embeddings", &json!({"input": texts[0], "encoding_format": "base64"})).json().unwrap();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(r["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let got: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let worst = got.iter().zip(&want[0]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{worst:e}");
    // Kinds are not mixed, inputs are checked: 400 naming the field.
    for (path, body, param) in [
        ("/v1/embeddings", json!({"model": "qwen2", "input": "x"}), "model"),
        ("/v1/chat/completions", json!({"model": "bert", "messages": [{"role": "user", "content": "x"}]}), "model"),
        ("/v1/embeddings", json!({"input": []}), "input"),
        ("/v1/embeddings", json!({"input": [[]]}), "input"),
        ("/v1/embeddings", json!({"input": [1, "a"]}), "input"),
        ("/v1/embeddings", json!({"input": [[1, 999999]]}), "input"),
        ("/v1/embeddings", json!({"input": "x", "dimensions": 7}), "dimensions"),
        ("/v1/embeddings", json!({"input": "x", "encoding_format": "int8"}), "encoding_format"),
    ] {
        let (status, e) = error_of(s.post(path, &body));
        assert_eq!((status, e["param"].as_str()), (400, Some(param)), "{body}: {e}");
    }
    let m = s.get("/v1/models/bert");
    assert_eq!((m["kind"].as_str(), m["status"].as_str()), (Some("embedding"), Some("loaded")));
}

/// A copy of the llama2 fixture (untied embeddings) whose embedding row of token `bad` holds one
/// NaN.
fn llama2_with_nan_embedding(bad: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(common::model_dir("llama2").join(f), dir.path().join(f)).unwrap();
    }
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header["model.embed_tokens.weight"];
    assert_eq!(t["dtype"], "F32");
    let hidden = t["shape"][1].as_u64().unwrap() as usize;
    let at = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + 4 * (bad * hidden + 3);
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    dir
}

/// Non-finite logits (a damaged weight) fail only the request that produced them, with an
/// error object naming the model — a 500 when not streaming, an error event after the tokens
/// already streamed when streaming — while a request batched beside it completes exactly as on
/// the clean model. The damage: the embedding of a token the first request generates at step 3,
/// so its logits turn NaN one step later, mid-stream.
#[test]
fn non_finite_logits_fail_only_their_request_with_an_error_naming_the_model() {
    let g = Generator::from_loaded(&common::load_cpu(&common::model_dir("llama2"))).unwrap();
    let run = |prompt: &[u32], n: usize| g.generate(prompt.to_vec(), &GenerateParams { max_tokens: n, ignore_eos: true, ..GenerateParams::default() }).unwrap();
    let (poisoned, bad) = (1u32..60)
        .map(|first| vec![first, 2, 3])
        .find_map(|p| {
            let t = run(&p, 8).tokens;
            // The token of step 3 must be new there (not in the prompt or steps 0–2).
            (!p.contains(&t[3]) && !t[..3].contains(&t[3])).then_some((p, t[3]))
        })
        .expect("a prompt whose 4th generated token is new");
    let streamed_before = run(&poisoned, 4).text;
    let (good, want) = (1u32..60)
        .map(|first| vec![first, 5, 6, 7])
        .find_map(|p| {
            let r = run(&p, 110);
            (!p.contains(&bad) && !r.tokens.contains(&bad)).then_some((p, r.text))
        })
        .expect("a prompt that never reads or writes the damaged token");
    let dir = llama2_with_nan_embedding(bad as usize);
    let s = Arc::new(TestServer::start(registry_config(vec![ModelSource::new("damaged", dir.path().to_path_buf())]), ServerConfig::default()));
    // Long enough (110 tokens) to be running when the poisoned requests arrive.
    let clean = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            let r: Value = s.post("/v1/completions", &json!({"model": "damaged", "prompt": good, "max_tokens": 110, "temperature": 0, "ignore_eos": true})).json().unwrap();
            r["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{r}")).to_string()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.processing() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let request = json!({"model": "damaged", "prompt": poisoned, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let (status, e) = error_of(s.post("/v1/completions", &request));
    assert_eq!((status, e["code"].as_str(), e["type"].as_str()), (500, Some("non_finite_output"), Some("server_error")), "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("model `damaged`") && message.contains("non-finite logits"), "{message}");

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let chunks = sse(s.post("/v1/completions", &streamed));
    let events: Vec<Value> = chunks.iter().filter(|c| *c != "[DONE]").map(|c| serde_json::from_str::<Value>(c).unwrap()).collect();
    let at = events.iter().position(|v| v.get("error").is_some()).unwrap_or_else(|| panic!("an error event: {chunks:?}"));
    assert_eq!(events[at]["error"]["code"], "non_finite_output");
    assert!(events[at]["error"]["message"].as_str().unwrap().contains("model `damaged`"));
    assert!(events[at + 1..].iter().all(|v| v.get("error").is_none() && v["choices"].as_array().is_none_or(|c| c.is_empty())), "nothing after the error: {chunks:?}");
    let text: String = events[..at].iter().flat_map(|v| v["choices"].as_array().cloned().unwrap_or_default()).map(|c| c["text"].as_str().unwrap_or("").to_string()).collect();
    // The four good tokens' text streams first (less an incomplete UTF-8 tail held back).
    assert!(!text.is_empty() && streamed_before.starts_with(&text), "streamed {text:?} before the error, solo run {streamed_before:?}");

    assert_eq!(clean.join().unwrap(), want, "the request beside it equals the clean model's run");
    assert!(s.idle_within(Duration::from_secs(5)), "the failed sequences freed their slots");
}

/// A copy of the qwen2 fixture whose chat template is Qwen2.5's real one (tools, Hermes calls),
/// with 1024 positions (the tool preamble alone is ~600 tokens).
fn qwen2_with_tool_template() -> tempfile::TempDir {
    let template = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/qwen2.5.jinja")).unwrap();
    qwen2_long(Some(&template))
}

/// A copy of the qwen2 fixture with 1024 positions and, if given, another chat template.
fn qwen2_long(template: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(qwen2().join(f), dir.path().join(f)).unwrap();
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(qwen2().join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(1024);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(qwen2().join("tokenizer_config.json")).unwrap()).unwrap();
    if let Some(t) = template {
        cfg["chat_template"] = json!(t);
    }
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

/// `tools` and a tool-call history reach the template as the library renders them (the prompt
/// token counts equal `Prompt::ChatWithTools` through the generator: the template rendering
/// itself equals transformers, tests/chat_templates.rs); `tool_choice` none/auto are accepted,
/// the forced choices (which need a grammar) and malformed tools or calls are 400s naming the
/// field, and a model whose template has no tool syntax refuses tools with a 400.
#[test]
fn tools_and_tool_call_histories_are_rendered_and_checked() {
    use metal_candle::chat::{Message, ToolCall};
    use metal_candle::generation::Prompt;
    let dir = qwen2_with_tool_template();
    let s = TestServer::start(
        registry_config(vec![ModelSource::new("tooly", dir.path().to_path_buf()), ModelSource::new("plain", qwen2())]),
        ServerConfig::default(),
    );
    let tool = json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let history = json!([
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "{\"temp_c\": 21}"}
    ]);
    let g = Generator::from_loaded(&common::load_cpu(dir.path())).unwrap();
    let messages = vec![
        Message::user("Weather in Zürich?"),
        Message::assistant_calls("", vec![ToolCall::new("call12345", "get_weather", json!({"city": "Zürich"}))]),
        Message::tool_result("call12345", None, "{\"temp_c\": 21}"),
    ];
    let want = g.encode(&Prompt::ChatWithTools { messages: messages.clone(), tools: vec![tool.clone()] }).unwrap().len();
    let without_tools = g.encode(&Prompt::Chat(messages)).unwrap().len();
    assert!(want > without_tools + 20, "the tools are in the prompt");
    for choice in [json!("auto"), json!("none")] {
        let r = s.post("/v1/chat/completions", &json!({"model": "tooly", "messages": history, "tools": [tool], "tool_choice": choice, "max_tokens": 6, "temperature": 0}));
        let status = r.status().as_u16();
        let v: Value = r.json().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["prompt_tokens"], want, "{choice}");
        assert!(v["choices"][0]["message"]["content"].is_string(), "a random model's reply is text: {v}");
    }
    let streamed = sse(s.post("/v1/chat/completions", &json!({"model": "tooly", "messages": history, "tools": [tool], "max_tokens": 6, "temperature": 0, "stream": true})));
    assert_eq!(streamed.last().map(String::as_str), Some("[DONE]"));
    for (body, param) in [
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}), "tool_choice.function.name"),
        (json!({"tools": [tool], "tool_choice": {"type": "function", "function": {}}}), "tool_choice.function.name"),
        (json!({"tools": [tool], "tool_choice": "required", "response_format": {"type": "json_object"}}), "response_format"),
        (json!({"tools": [tool], "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": [{"type": "function", "function": {"description": "no name"}}]}), "tools[0]"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0]"),
    ] {
        let mut b = json!({"model": "tooly", "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let (status, e) = error_of(s.post("/v1/chat/completions", &b));
        assert_eq!((status, e["param"].as_str()), (400, Some(param)), "{b}: {e}");
    }
    let mut bad_args = history.clone();
    bad_args[1]["tool_calls"][0]["function"]["arguments"] = json!("{\"city\": ");
    let (status, e) = error_of(s.post("/v1/chat/completions", &json!({"model": "tooly", "messages": bad_args, "tools": [tool]})));
    assert_eq!((status, e["param"].as_str()), (400, Some("messages[1].tool_calls[0].function.arguments")), "{e}");
    // A template without tool syntax gets the generic JSON format (its own test below); a
    // response_format cannot ride on it.
    let (status, e) = error_of(s.post("/v1/chat/completions", &json!({"model": "plain", "messages": [{"role": "user", "content": "hi"}], "tools": [tool], "response_format": {"type": "json_object"}})));
    assert_eq!((status, e["param"].as_str()), (400, Some("response_format")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("plain"), "{e}");
}

/// `tool_choice` `required` / a named function through HTTP, on the Hermes template ("tooly")
/// and on a template without tool syntax ("plain": the generic JSON format), streamed and not:
/// `finish_reason` is `tool_calls`, the one call (`parallel_tool_calls: false`) names an allowed
/// function and its `arguments` string parses and follows the schema (checked by hand); the
/// stream sends id and name first, then the arguments, and no content.
#[test]
fn forced_tool_choice_returns_a_call_that_follows_the_schema() {
    let (dir, plain) = (qwen2_with_tool_template(), qwen2_long(None));
    let s = TestServer::start(
        registry_config(vec![ModelSource::new("tooly", dir.path().to_path_buf()), ModelSource::new("plain", plain.path().to_path_buf())]),
        ServerConfig::default(),
    );
    let weather = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": false}}});
    let time = json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": false}}});
    let check = |name: &str, args: &str, only: Option<&str>| {
        let a: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args}"));
        let a = a.as_object().unwrap();
        match name {
            "get_weather" => assert!(a.len() == 1 && ["Paris", "Rome"].contains(&a["city"].as_str().unwrap()), "{args}"),
            "get_time" => assert!(a.len() == 1 && ["UTC", "CET"].contains(&a["tz"].as_str().unwrap()), "{args}"),
            _ => panic!("unknown function {name}"),
        }
        if let Some(only) = only {
            assert_eq!(name, only);
        }
    };
    for model in ["tooly", "plain"] {
        for (choice, only) in [(json!("required"), None), (json!({"type": "function", "function": {"name": "get_time"}}), Some("get_time"))] {
            for seed in 0..2 {
                let body = json!({"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather, time],
                    "tool_choice": choice, "parallel_tool_calls": false, "max_tokens": 120, "temperature": 1.0, "seed": seed});
                let r: Value = s.post("/v1/chat/completions", &body).json().unwrap();
                let c = &r["choices"][0];
                assert_eq!(c["finish_reason"], "tool_calls", "{model} {choice}: {r}");
                let calls = c["message"]["tool_calls"].as_array().unwrap();
                assert_eq!(calls.len(), 1, "{r}");
                assert_eq!(calls[0]["type"], "function");
                check(calls[0]["function"]["name"].as_str().unwrap(), calls[0]["function"]["arguments"].as_str().unwrap(), only);
                let mut streamed = body.clone();
                streamed["stream"] = json!(true);
                let events = sse(s.post("/v1/chat/completions", &streamed));
                let chunks: Vec<Value> = events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
                let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
                assert!(deltas.iter().all(|d| d["content"].as_str().is_none_or(str::is_empty)), "no content: {events:?}");
                let frags: Vec<&Value> = deltas.iter().filter_map(|d| d["tool_calls"].as_array()).flatten().collect();
                assert!(frags[0]["id"].is_string() && frags[0]["function"]["name"].is_string(), "{events:?}");
                let args: String = frags.iter().filter_map(|f| f["function"]["arguments"].as_str()).collect();
                check(frags[0]["function"]["name"].as_str().unwrap(), &args, only);
                assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
            }
        }
    }
    // The generic format under `none` and `auto`: a response comes back as content, never as the
    // JSON it was written in.
    for choice in ["none", "auto"] {
        for seed in 0..3 {
            let body = json!({"model": "plain", "messages": [{"role": "user", "content": "Hi"}], "tools": [weather],
                "tool_choice": choice, "max_tokens": 60, "temperature": 1.0, "seed": seed});
            let r: Value = s.post("/v1/chat/completions", &body).json().unwrap();
            let m = &r["choices"][0]["message"];
            if choice == "none" {
                assert!(m["tool_calls"].is_null(), "{r}");
            }
            if m["tool_calls"].is_null() {
                let text = m["content"].as_str().unwrap_or_else(|| panic!("{r}"));
                assert!(!text.starts_with("{\"response\""), "{r}");
            }
        }
    }
}

/// `response_format` json_schema / json_object through HTTP on a random-weight fixture (only the
/// grammar makes its output JSON): every reply that ends by itself parses and follows the schema
/// (checked by hand), streamed or not; a schema that does not compile is a 400 naming
/// `response_format` before any token; an unknown type is a 400 too.
#[test]
fn response_format_json_schema_output_parses_and_bad_schemas_are_400() {
    let s = TestServer::start(registry_config(vec![ModelSource::new("qwen2", qwen2())]), ServerConfig::default());
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": false});
    let rf = json!({"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": true}});
    let check = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = v.as_object().unwrap();
        assert!(o.len() == 2 && o["ok"].is_boolean() && o["n"].as_u64().is_some_and(|n| n <= 9), "{text}");
    };
    for seed in 0..4 {
        let body = chat_body("give me json", json!({"response_format": rf, "max_tokens": 40, "temperature": 1.0, "seed": seed}));
        let r: Value = s.post("/v1/chat/completions", &body).json().unwrap();
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
        check(r["choices"][0]["message"]["content"].as_str().unwrap());
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (text, finish) = joined_stream(&sse(s.post("/v1/chat/completions", &streamed)));
        assert_eq!(finish.as_deref(), Some("stop"));
        check(&text);
    }
    let r: Value = s.post("/v1/chat/completions", &chat_body("x", json!({"response_format": {"type": "json_object"}, "max_tokens": 60}))).json().unwrap();
    if r["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(r["choices"][0]["message"]["content"].as_str().unwrap()).unwrap().is_object(), "{r}");
    }
    for (rf, param) in [
        (json!({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "no-such-type"}}}), "response_format"),
        (json!({"type": "json_schema", "json_schema": {"name": "t", "schema": 3}}), "response_format.json_schema.schema"),
        (json!({"type": "yaml"}), "response_format.type"),
    ] {
        for stream in [false, true] {
            let (status, e) = error_of(s.post("/v1/chat/completions", &chat_body("x", json!({"response_format": rf, "stream": stream}))));
            assert_eq!((status, e["param"].as_str()), (400, Some(param)), "{rf}: {e}");
        }
    }
}
