//! `--adapter PATH[:SCALE]` on the CLI: perplexity with adapters equals PEFT's logits' perplexity;
//! a bad adapter is an `error: adapter …` on stderr.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Tensor, D};
use common::*;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_metal-candle")).args(args).output().expect("the binary runs")
}

fn lora(base: &str, which: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(base).join(which)
}

/// exp(mean −log p(ids[i+1] | ..=i)) from logits (t, vocab).
fn perplexity_of(logits: &Tensor, ids: &[u32]) -> f64 {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap().to_vec2::<f32>().unwrap();
    let nll: f64 = (0..ids.len() - 1).map(|i| -f64::from(logp[i][ids[i + 1] as usize])).sum();
    (nll / (ids.len() - 1) as f64).exp()
}

fn cli_perplexity(model: &Path, ids: &[u32], adapters: &[String]) -> f64 {
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec!["perplexity", "--model", model.to_str().unwrap(), "--token-ids", &ids_arg, "--device", "cpu", "--json"];
    for a in adapters {
        args.extend(["--adapter", a.as_str()]);
    }
    let out = run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    json["perplexity"].as_f64().unwrap()
}

#[test]
fn perplexity_with_adapters_equals_peft() {
    for (base, model) in [("qwen2", model_dir("qwen2")), ("llama3", model_dir("llama3").join("model-f32.gguf"))] {
        let r = reference(&lora(base, "reference.safetensors"));
        let ids = ids_of(&r["input_ids"]);
        let a = lora(base, "a").display().to_string();
        let b = lora(base, "b").display().to_string();
        let cases = [("logits_a", vec![a.clone()]), ("logits_ab", vec![format!("{a}:0.7"), format!("{b}:1.5")])];
        for (key, adapters) in cases {
            let want = perplexity_of(&r[key], &ids);
            let got = cli_perplexity(&model, &ids, &adapters);
            let rel = (got - want).abs() / want;
            eprintln!("{base} {key}: perplexity {got:.4} vs PEFT {want:.4} (rel {rel:.1e})");
            assert!(rel < 1e-3, "{base} {key}: {got} vs {want}");
        }
    }
}

#[test]
fn generate_accepts_adapters_and_bad_ones_are_errors() {
    let dir = model_dir("qwen2");
    let a = format!("{}:0.5", lora("qwen2", "a").display());
    let out = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-tokens", "3", "--adapter", &a]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = lora("llama2", "a").display().to_string(); // another base's shapes
    let out = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--adapter", &bad]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: adapter"), "{stderr}");
}
