//! `metal-candle train-lora` on the qwen2 fixture: a run writes a PEFT directory that
//! `--adapter` loads, `--json` prints a line per step and per validation, a run resumed from a
//! checkpoint (or after Ctrl-C) ends with the same adapter bytes as an uninterrupted one, and bad
//! input is an `error: …` naming the problem.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use metal_candle::adapter::{AdapterOptions, LoraAdapter};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_metal-candle"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn text_data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    let lines = [
        r#"{"text": "The quick brown fox jumps over the lazy dog."}"#,
        r#"{"prompt": "Q: two plus two?", "completion": " A: four."}"#,
        r#"{"text": "Hello world, hello again."}"#,
        r#"{"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}]}"#,
        r#"{"input_ids": [102, 209, 199, 389, 305], "labels": [-100, -100, 199, 389, 305]}"#,
    ];
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// The required flags and `extra`.
fn train_raw(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train-lora", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--threads", "2"];
    args.extend_from_slice(extra);
    run(&args)
}

/// A small run's settings (rank 4, accumulation 2, warmup + cosine, clipping) and `extra`.
fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let settings = [
        "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "2", "--seed", "3",
        "--lr-schedule", "cosine", "--warmup", "1", "--max-grad-norm", "1.0",
    ];
    train_raw(model, data, out, &[&settings[..], extra].concat())
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn train_lora_writes_an_adapter_and_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let out = tmp.path().join("out");
    let model = model_dir("qwen2");
    let stdout = ok(&train(&model, &data, &out, &["--steps", "4", "--json", "--valid", data.to_str().unwrap(), "--eval-every", "2", "--mask-prompt", "--dropout", "0.1"]));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 4);
    assert_eq!(steps[3]["step"], 4);
    assert!(steps.iter().all(|s| s["tokens_per_s"].as_f64().unwrap() > 0.0 && s["lr"].as_f64().is_some()));
    assert_eq!(steps[0]["lr"].as_f64().unwrap(), 0.0, "warmup 1: the first step's rate is 0");
    let vals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("val_loss").is_some()).collect();
    assert_eq!(vals.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 4]);
    assert_eq!(lines.last().unwrap()["done"], true);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_dropout"].as_f64()), (Some(4), Some(0.1)));
    let base = load_cpu(&model).model;
    assert_eq!(LoraAdapter::load(&out, &base, &AdapterOptions::default()).unwrap().modules().len(), 4);
    // The output is an adapter for the other subcommands.
    let ids = "102,209,199,389,305";
    ok(&run(&["perplexity", "--model", model.to_str().unwrap(), "--token-ids", ids, "--adapter", out.to_str().unwrap(), "--device", "cpu"]));
}

#[test]
fn a_resumed_run_ends_with_the_same_bytes_as_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = model_dir("qwen2");
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let common = ["--steps", "5", "--dropout", "0.1"];
    ok(&train(&model, &data, &a, &common));
    ok(&train(&model, &data, &b, &[&common[..], &["--save-every", "2"]].concat()));
    // Only the latest checkpoint is kept.
    assert!(b.join("checkpoint-4").is_dir() && !b.join("checkpoint-2").exists());
    let ckpt = b.join("checkpoint-4");
    ok(&train(&model, &data, &c, &[&common[..], &["--resume", ckpt.to_str().unwrap()]].concat()));
    assert_eq!(adapter_bytes(&c), adapter_bytes(&a));
    assert_eq!(adapter_bytes(&b), adapter_bytes(&a));
    // Resuming with other options is refused, naming the option.
    let e = train(&model, &data, &c, &["--steps", "5", "--resume", ckpt.to_str().unwrap()]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("dropout"), "{}", String::from_utf8_lossy(&e.stderr));
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = model_dir("qwen2");
    let out = tmp.path().join("out");
    let mut child = bin()
        .args(["train-lora", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--steps", "100000", "--json", "--threads", "2", "--batch-size", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("\"loss\""), "{line}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let ckpt = metal_candle::train::find_checkpoint(&out).unwrap();
    let base = load_cpu(&model).model;
    LoraAdapter::load(&ckpt, &base, &AdapterOptions::default()).unwrap();
    let saved: u64 = ckpt.file_name().unwrap().to_str().unwrap().trim_start_matches("checkpoint-").parse().unwrap();
    // The same command with --resume continues at the next step.
    let mut child = bin()
        .args(["train-lora", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--steps", "100000", "--json", "--threads", "2", "--batch-size", "1", "--resume", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let first: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(first["step"].as_u64(), Some(saved + 1), "{line}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
}

#[test]
fn bad_input_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = model_dir("qwen2");
    let out = tmp.path().join("out");
    let err = |extra: &[&str], data: &Path| {
        let o = train_raw(&model, data, &out, extra);
        assert!(!o.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(err(&["--rank", "0"], &data).contains("rank"));
    assert!(err(&["--targets", "q_proj,w_proj"], &data).contains("w_proj"));
    assert!(err(&["--optimizer", "lion"], &data).contains("optimizer"));
    assert!(err(&["--lr-schedule", "step"], &data).contains("lr_schedule"));
    assert!(err(&["--max-seq-len", "4"], &data).contains("longer than max_seq_len 4"));
    assert!(err(&["--dropout", "1.5"], &data).contains("dropout"));
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert!(err(&[], &empty).contains("no examples"));
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": 5}\n").unwrap();
    let e = err(&[], &bad);
    assert!(e.contains("bad.jsonl:2") && e.contains("`text`"), "{e}");
}

/// SGD at lr 1e30 from the fixture's init adapter (B ≠ 0) overflows on the second step: the run stops with an error naming the step
/// and the checkpoint of step 1 is still there and loadable.
#[test]
fn a_non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = model_dir("qwen2");
    let out = tmp.path().join("out");
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/qwen2/init");
    let args = ["--init", init.to_str().unwrap(), "--optimizer", "sgd", "--lr", "1e30", "--steps", "5", "--save-every", "1"];
    let o = train_raw(&model, &data, &out, &args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("non-finite"), "{stderr}");
    let ckpt = metal_candle::train::find_checkpoint(&out).unwrap();
    assert!(stderr.contains(&ckpt.display().to_string()), "{stderr}");
}
