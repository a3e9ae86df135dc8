//! Memory: the embedding table kept in the file's type (rows equal the dequantized full table),
//! and the load-time RSS bound (Linux `/proc/self/status`; skipped elsewhere).
//!
//! Each RSS measurement runs in a child process (this test binary again, running only
//! `child_measure`), so other tests' allocations do not move it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use metal_candle::kernels::cpu::CpuWeight;
use metal_candle::model::embedding::EmbeddingWeight;
use metal_candle::{load_model, DeviceChoice, LoadOptions, Logits};

/// The child's marker: the path of the model it loads.
const CHILD_ENV: &str = "METAL_CANDLE_MEMORY_CHILD";

/// Fixed allowance for what a loaded model holds besides weights and KV: the tokenizer (vocab
/// and merges as hash maps), the RoPE tables, the rayon pool's stacks and the allocator's
/// slack. Measured (2026-12-03): ~5 MB on the fixtures; on SmolLM2 (49 152 tokens) ~25 MB
/// after load and ~40 MB at the peak while loading (the tokenizer being built): SmolLM2 peaked
/// at +138 MB against a 142 MB bound with 32 MiB, so 48 MiB leaves room for another CPU or
/// allocator without hiding a second copy of any weight (the smallest is SmolLM2's 98 MB).
const RUNTIME_ALLOWANCE: u64 = 48 << 20;

/// Tokens the child runs after loading: enough for a prefill and a decode step.
const PROMPT: usize = 8;

fn random_table(vocab: usize, hidden: usize) -> Tensor {
    Tensor::randn(0f32, 1.0, (vocab, hidden), &Device::Cpu).unwrap()
}

/// Rows looked up one by one and as a batch equal the rows of the whole table dequantized.
fn assert_rows_equal(table: &EmbeddingWeight, full: &Tensor, what: &str) {
    let ids: Vec<u32> = vec![0, 5, 5, 63, 1, 62, 17];
    let got = table.lookup(&ids, DType::F32, &Device::Cpu).unwrap();
    let want = full.index_select(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "{what}: looked-up rows differ from the dequantized table by {diff}");
    let one = table.lookup(&[62], DType::F32, &Device::Cpu).unwrap();
    let want = full.narrow(0, 62, 1).unwrap();
    let diff = (one - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "{what}: a single row differs");
    let vocab = table.dims().0 as u32;
    assert!(table.lookup(&[vocab], DType::F32, &Device::Cpu).is_err(), "{what}: id past the table is an error");
}

#[test]
fn quantized_embedding_rows_equal_the_dequantized_table() {
    let (vocab, hidden) = (64, 512);
    let f = random_table(vocab, hidden);
    let types = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::F32,
    ];
    for t in types {
        let q = QTensor::quantize(&f, t).unwrap();
        let full = q.dequantize(&Device::Cpu).unwrap();
        let table = EmbeddingWeight::Quantized(Arc::new(q));
        assert_eq!(table.dims(), (vocab, hidden));
        assert_rows_equal(&table, &full, &format!("{t:?} QTensor"));
    }
}

#[test]
fn tied_cpu_kernel_weight_serves_the_same_rows() {
    // Rows of a repacked (interleaved) weight read back in GGML order, and a tail of rows
    // that is not a multiple of the 8-row groups (64 − 1 = 63 rows → 56 packed + 7 plain).
    for t in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::F16] {
        for vocab in [64, 65] {
            let f = random_table(vocab, 512);
            let q = QTensor::quantize(&f, t).unwrap();
            let full = q.dequantize(&Device::Cpu).unwrap();
            let table = EmbeddingWeight::Cpu(Arc::new(CpuWeight::from_qtensor(&q).unwrap()));
            assert_rows_equal(&table, &full, &format!("{t:?} CpuWeight, {vocab} rows"));
        }
    }
}

#[test]
fn dense_table_casts_to_the_model_dtype() {
    let f = random_table(64, 32);
    let table = EmbeddingWeight::Dense(f.clone());
    assert_rows_equal(&table, &f, "dense");
    let half = table.lookup(&[3, 4], DType::F16, &Device::Cpu).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    assert_eq!(half.dims(), &[2, 32]);
    assert_eq!(table.lookup(&[], DType::F32, &Device::Cpu).unwrap().dims(), &[0, 32]);
}

/// What the child measured, in bytes.
#[derive(Debug)]
struct Measured {
    /// VmRSS before loading.
    before: u64,
    /// VmRSS after loading.
    loaded: u64,
    /// VmHWM after loading: the peak while loading.
    load_peak: u64,
    /// VmRSS after a PROMPT-token prefill and one decode step.
    ran: u64,
    /// KV cache bytes allocated by then.
    kv: u64,
}

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs in the child only: loads `$METAL_CANDLE_MEMORY_CHILD`, prints one `MEMORY` line.
#[test]
fn child_measure() {
    let Some(path) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else { return };
    let rss = || status_kb("VmRSS:").unwrap_or(0) * 1024;
    let before = rss();
    let opts = LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() };
    let loaded = load_model(&path, &opts).unwrap();
    let (after_load, load_peak) = (rss(), status_kb("VmHWM:").unwrap_or(0) * 1024);
    let model = &loaded.model;
    let mut cache = model.new_cache();
    let ids: Vec<u32> = (0..PROMPT as u32).map(|i| 1 + i % 7).collect();
    let x = Tensor::new(ids.as_slice(), model.device()).unwrap().unsqueeze(0).unwrap();
    model.forward(&x, &mut cache, Logits::Last).unwrap();
    let x = Tensor::new(&[[2u32]], model.device()).unwrap();
    model.forward(&x, &mut cache, Logits::Last).unwrap();
    let ran = rss();
    println!(
        "MEMORY {before} {after_load} {load_peak} {ran} {kv}",
        kv = cache.allocated_bytes()
    );
}

/// Spawns this binary's `child_measure` on `path`. `None` where there is no /proc.
fn measure(path: &Path) -> Option<Measured> {
    status_kb("VmRSS:")?;
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", "child_measure", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child on {} failed:\n{stdout}\n{}", path.display(), String::from_utf8_lossy(&out.stderr));
    // libtest may print `test child_measure ... ` on the same line first.
    let line = stdout.lines().find_map(|l| l.split_once("MEMORY ").map(|(_, v)| v)).unwrap_or_else(|| panic!("no MEMORY line:\n{stdout}"));
    let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
    Some(Measured { before: v[0], loaded: v[1], load_peak: v[2], ran: v[3], kv: v[4] })
}

/// RSS after load (and its peak while loading) ≤ file + 10% + allowance; after running a prompt
/// ≤ file + KV + 10% + allowance. Growth is counted from the child's RSS before loading.
fn assert_bound(path: &Path) {
    let Some(m) = measure(path) else {
        eprintln!("SKIPPED: no /proc/self/status");
        return;
    };
    let file = std::fs::metadata(path).unwrap().len();
    let mb = |b: u64| b as f64 / 1e6;
    let bound = |kv: u64| (file + kv) + (file + kv) / 10 + RUNTIME_ALLOWANCE;
    eprintln!(
        "{}: file {:.1} MB; RSS +{:.1} MB after load (peak +{:.1}), +{:.1} MB after {PROMPT} tokens (KV {:.1} MB); bound {:.1} / {:.1} MB",
        path.display(),
        mb(file),
        mb(m.loaded - m.before),
        mb(m.load_peak.saturating_sub(m.before)),
        mb(m.ran - m.before),
        mb(m.kv),
        mb(bound(0)),
        mb(bound(m.kv)),
    );
    assert!(m.loaded - m.before <= bound(0), "{}: RSS after load {m:?} over {}", path.display(), bound(0));
    assert!(m.load_peak.saturating_sub(m.before) <= bound(0), "{}: peak while loading {m:?} over {}", path.display(), bound(0));
    assert!(m.ran.saturating_sub(m.before) <= bound(m.kv), "{}: RSS after a prompt {m:?} over {}", path.display(), bound(m.kv));
}

#[test]
fn load_time_rss_is_within_file_size_plus_kv_on_the_fixtures() {
    for (dir, file) in [
        ("qwen2", "model-q8_0.gguf"),
        ("qwen2", "model-q4_0.gguf"),
        ("qwen2", "model-f16.gguf"),
        ("llama3", "model-q4_0.gguf"),
        ("mistral", "model-q8_0.gguf"),
        ("llama-256", "model-q4_1.gguf"),
        ("llama-256", "model-q4_k.gguf"),
        ("llama-256", "model-q6_k.gguf"),
    ] {
        assert_bound(&common::model_dir(dir).join(file));
    }
}

#[test]
fn load_time_rss_is_within_file_size_plus_kv_on_smollm2() {
    let Some(path) = common::smollm2_path() else { return };
    assert_bound(&path);
}
