//! `metal-candle generate`'s input and output edges: the prompt from stdin or a file, negative
//! counts reaching the range check, timings on stderr, the final `--json` object holding the whole
//! text, `--logprobs` needing `--json`, top logprobs with their token text, `--verbose`.
#![cfg(feature = "cli")]

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::model_dir;

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn model() -> String {
    model_dir("qwen2").to_str().unwrap().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn prompt_from_stdin_and_file_equals_the_flag() {
    let m = model();
    let base = ["generate", "--model", &m, "--max-tokens", "4"];
    let flag = run(&[&base[..], &["--prompt", "Hello there"]].concat(), "");
    assert!(flag.status.success(), "{}", stderr(&flag));
    let stdin = run(&[&base[..], &["--prompt", "-"]].concat(), "Hello there");
    assert_eq!(stdin.stdout, flag.stdout);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, "Hello there").unwrap();
    let from_file = run(&[&base[..], &["--file", file.to_str().unwrap()]].concat(), "");
    assert_eq!(from_file.stdout, flag.stdout);
    // Timings go to stderr, so stdout holds only the text.
    assert!(stderr(&flag).contains("tok/s") && !String::from_utf8_lossy(&flag.stdout).contains("tok/s"));
    let missing = run(&[&base[..], &["--file", "/nonexistent/prompt.txt"]].concat(), "");
    assert!(!missing.status.success() && stderr(&missing).starts_with("error: ") && stderr(&missing).contains("/nonexistent/prompt.txt"));
}

#[test]
fn negative_counts_reach_the_range_check() {
    let m = model();
    for (flag, name) in [("--max-tokens", "max_tokens"), ("--ctx", "ctx"), ("--threads", "threads"), ("--logprobs", "logprobs")] {
        let out = run(&["generate", "--model", &m, "--prompt", "x", "--json", flag, "-5"], "");
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.starts_with("error: ") && err.contains(name), "{flag}: {err}");
    }
}

#[test]
fn json_final_object_holds_the_whole_text_and_top_logprobs_their_text() {
    let m = model();
    let out = run(&["generate", "--model", &m, "--prompt", "Hello", "--max-tokens", "5", "--json", "--logprobs", "2"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (last, tokens) = lines.split_last().unwrap();
    let deltas: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    let tail = last["tail"].as_str().unwrap();
    assert_eq!(last["text"].as_str().unwrap(), format!("{deltas}{tail}"));
    assert!(last["finish_reason"].is_string());
    for t in tokens {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(top.iter().all(|alt| alt["text"].is_string() && alt["token"].is_u64()));
    }
    let refused = run(&["generate", "--model", &m, "--prompt", "Hello", "--logprobs", "2"], "");
    assert!(!refused.status.success() && stderr(&refused).contains("--json"), "{}", stderr(&refused));
}

#[test]
fn verbose_prints_a_model_summary() {
    let m = model();
    let out = run(&["generate", "--model", &m, "--prompt", "Hi", "--max-tokens", "1", "--verbose", "--ctx", "64"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("model: Qwen2") && err.contains("context 64"), "{err}");
}
