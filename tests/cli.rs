//! The `metal-candle` binary as a user runs it: perplexity equals HF's, generation streams text,
//! and errors are `error: …` on stderr with a non-zero exit.
#![cfg(feature = "cli")]

mod common;

use std::process::{Command, Output};

use common::*;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_metal-candle"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn last_json_line(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line `{line}` is not JSON: {e}"))
}

#[test]
fn perplexity_equals_hf_for_every_architecture_and_format() {
    for name in ["qwen2", "qwen3", "llama3", "llama2", "mistral"] {
        let dir = model_dir(name);
        let r = reference(&dir.join("reference.safetensors"));
        let ids = ids_of(&r["input_ids"]);
        let hf_ppl = r["perplexity"].to_vec1::<f32>().unwrap()[0] as f64;
        let hf_nll = r["nll"].to_vec1::<f32>().unwrap();
        let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let mut paths = vec![dir.clone()];
        if name != "mistral" {
            // llama.cpp's GGUF of a Mistral model has no sliding window; HF applies it.
            paths.push(dir.join("model-f32.gguf"));
        }
        for path in paths {
            let out = run(&["perplexity", "--model", path.to_str().unwrap(), "--token-ids", &ids_arg, "--device", "cpu", "--json"]);
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.starts_with("perplexity: "), "{stdout}");
            let json = last_json_line(&out);
            let ppl = json["perplexity"].as_f64().unwrap();
            let rel = (ppl - hf_ppl).abs() / hf_ppl;
            eprintln!("{}: perplexity {ppl:.4} vs HF {hf_ppl:.4} (rel {rel:.1e})", path.display());
            assert!(rel < 1e-3, "{}: perplexity {ppl} vs HF {hf_ppl}", path.display());
            assert_eq!(json["tokens"].as_u64(), Some(ids.len() as u64));
            let nll: Vec<f64> = json["nll"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(nll.len(), hf_nll.len());
            for (i, (a, b)) in nll.iter().zip(&hf_nll).enumerate() {
                assert!((a - *b as f64).abs() < 1e-4, "{}: nll[{i}] {a} vs HF {b}", path.display());
            }
        }
    }
}

#[test]
fn perplexity_of_a_text_file_uses_the_model_tokenizer() {
    let dir = model_dir("llama3");
    let text = dir.join("reference_text.txt");
    let out = run(&["perplexity", "--model", dir.join("model-f32.gguf").to_str().unwrap(), "--text-file", text.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = reference(&dir.join("reference.safetensors"));
    assert_eq!(last_json_line(&out)["tokens"].as_u64(), Some(ids_of(&r["text_input_ids"]).len() as u64));
}

#[test]
fn generate_streams_a_completion() {
    let dir = model_dir("qwen2");
    let out = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0.8", "--seed", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0.8", "--seed", "3"]);
    assert_eq!(out.stdout, again.stdout, "same seed, same output");
}

#[test]
fn errors_are_reported_on_stderr_with_a_nonzero_exit() {
    let missing = run(&["perplexity", "--model", "/nonexistent/model.gguf", "--token-ids", "1,2"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.starts_with("error: ") && err.contains("/nonexistent/model.gguf"), "{err}");

    let dir = model_dir("qwen2");
    let bad_temp = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "x", "--temperature", "-1"]);
    assert!(!bad_temp.status.success());
    assert!(String::from_utf8_lossy(&bad_temp.stderr).contains("temperature"));

    let out_of_vocab = run(&["perplexity", "--model", dir.to_str().unwrap(), "--token-ids", "1,999999"]);
    assert!(!out_of_vocab.status.success());
    assert!(String::from_utf8_lossy(&out_of_vocab.stderr).contains("999999"));

    let zero = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "x", "--max-tokens", "0"]);
    assert!(String::from_utf8_lossy(&zero.stderr).contains("max_tokens"));
}

#[test]
fn smollm2_completes_the_capital_of_france() {
    let Some(path) = smollm2_path() else { return };
    let out = run(&["generate", "--model", path.to_str().unwrap(), "--prompt", "The capital of France is", "--max-tokens", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(" Paris"), "got {text:?}");
}

#[test]
fn bench_reports_throughput_as_json() {
    let dir = model_dir("llama3");
    let gguf = dir.join("model-q8_0.gguf");
    let out = run(&["bench", "--model", gguf.to_str().unwrap(), "-p", "8", "-n", "4", "-r", "2", "--bandwidth", "50", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = last_json_line(&out);
    for key in ["prefill_tps", "decode_tps", "ttft_ms", "decode_gbps", "roofline_pct"] {
        assert!(json[key].as_f64().is_some_and(|v| v > 0.0), "{key} missing or not positive: {json}");
    }
    assert_eq!(json["weight_bytes"].as_u64().map(|b| b > 0), Some(true));
    let too_long = run(&["bench", "--model", gguf.to_str().unwrap(), "-p", "1000", "-n", "4"]);
    assert!(String::from_utf8_lossy(&too_long.stderr).contains("context"), "prompt past the context is an error");
}
