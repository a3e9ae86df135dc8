//! `metal_candle::quantize`: files equal to llama.cpp's converter where it is deterministic (f32,
//! f16, q8_0: same tensors, bytes and tokenizer keys), logits of every architecture × type within
//! a per-type tolerance of HF, bf16 = f32 rounded, merged adapters = HF's adapted model, the
//! Q4_K_M mix equal to a recorded `llama-quantize` run, in-situ quantization at load, and the
//! typed errors (unsupported type, no fallback, existing output, failed write leaves no file).

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::*;
use metal_candle::config::hf::parse_hf_config;
use metal_candle::loader::gguf::GgufFile;
use metal_candle::quantize::{hf_tensor_types, quantize_model, FileType, MergeAdapter, QuantizeOptions};
use metal_candle::{load_model, DeviceChoice, Error, LoadOptions};

const ARCHS: [&str; 5] = ["qwen2", "qwen3", "llama3", "llama2", "mistral"];

/// (type, max |logit − HF|, min top-1 agreement) on the quantized-matmul path (activations
/// quantized to 8 bit, as llama.cpp does). The fixtures are tiny random models (hidden 64,
/// logit std ≈ 2.5) that amplify weight error; measured maxima over the five architectures are
/// in docs/QUANTIZE.md and each bound is ~1.3× the worst. Rows of 64 make every K type fall back
/// to its 32-block type (Q6_K → Q8_0, Q4_K → Q5_0, Q3_K/Q2_K → Q4_0; see
/// `k_quants_on_256_rows` for the K types themselves). f16 is compared with HF on f16 weights.
const TOLERANCES: [(&str, f32, f64); 12] = [
    ("f16", F32_TOL, 1.0),
    ("bf16", 0.15, 0.95),
    ("q8_0", 0.45, 0.9),
    ("q6_k", 0.45, 0.9),
    ("q5_k_m", 2.5, 0.6),
    ("q5_0", 2.5, 0.6),
    ("q5_1", 2.5, 0.6),
    ("q4_k_m", 2.5, 0.6),
    ("q4_0", 5.0, 0.45),
    ("q4_1", 5.0, 0.45),
    ("q3_k_m", 5.0, 0.45),
    ("q2_k", 5.0, 0.45),
];
/// f32 output against HF (summation order only).
const F32_TOL: f32 = 1e-4;
/// Fraction of positions whose top-1 token must agree with HF.
const MIN_TOP1: f64 = 0.6;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn quantize(model: &Path, ty: &str, out: &Path) -> metal_candle::quantize::QuantizeReport {
    let opts = QuantizeOptions::new(model.to_path_buf(), FileType::parse(ty).unwrap(), out.to_path_buf());
    quantize_model(&opts).unwrap_or_else(|e| panic!("quantizing {} to {ty}: {e}", model.display()))
}

fn load(path: &Path, dequantize: bool) -> metal_candle::LoadedModel {
    let opts = LoadOptions { device: DeviceChoice::Cpu, dequantize_weights: dequantize, ..LoadOptions::default() };
    load_model(path, &opts).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// (max |Δlogit| vs the reference key, top-1 agreement fraction).
fn logit_error(model: &metal_candle::Model, reference_file: &Path, key: &str) -> (f32, f64) {
    let r = reference(reference_file);
    let ids = ids_of(&r["input_ids"]);
    let want = rows(&r[key], ids.len());
    let got = rows(&full_logits(model, &ids), ids.len());
    let agree = argmax_rows(&got).iter().zip(argmax_rows(&want)).filter(|(a, b)| **a == *b).count();
    (max_abs_diff(&got, &want), agree as f64 / ids.len() as f64)
}

/// Every tensor (name, type, shape, bytes) and every metadata value of `want` is in `got`, except
/// the naming keys.
fn assert_same_gguf(got: &Path, want: &Path) {
    let (g, w) = (GgufFile::open(got).unwrap(), GgufFile::open(want).unwrap());
    let (gc, wc) = (g.content(), w.content());
    let mut names: Vec<_> = wc.tensor_infos.keys().collect();
    names.sort();
    let mut got_names: Vec<_> = gc.tensor_infos.keys().collect();
    got_names.sort();
    assert_eq!(got_names, names, "{}: tensor names", got.display());
    for name in names {
        let (a, b) = (g.qtensor(name, &Device::Cpu).unwrap(), w.qtensor(name, &Device::Cpu).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{}: {name} type", got.display());
        assert_eq!(a.shape(), b.shape(), "{}: {name} shape", got.display());
        assert!(a.data().unwrap() == b.data().unwrap(), "{}: {name} bytes differ", got.display());
    }
    for (key, value) in &wc.metadata {
        if matches!(key.as_str(), "general.name" | "general.size_label" | "general.quantization_version") {
            continue;
        }
        let mine = gc.metadata.get(key).unwrap_or_else(|| panic!("{}: key {key} missing", got.display()));
        assert_eq!(format!("{mine:?}"), format!("{value:?}"), "{}: key {key}", got.display());
    }
}

/// llama.cpp's `convert_hf_to_gguf.py --outtype f32/f16/q8_0` made the fixtures' GGUFs: ours are
/// the same tensors bit for bit (Q/K permutation, rope_freqs, tied output, biases, q/k norms) and
/// carry the same keys (tokenizer, chat template, hyperparameters).
#[test]
fn f32_f16_q8_0_equal_llama_cpp_converter() {
    let dir = tmp();
    for arch in ARCHS {
        for ty in ["f32", "f16", "q8_0"] {
            let out = dir.path().join(format!("{arch}-{ty}.gguf"));
            quantize(&model_dir(arch), ty, &out);
            assert_same_gguf(&out, &model_dir(arch).join(format!("model-{ty}.gguf")));
        }
    }
}

/// `pure` q4_0 equals the fixtures' Q4_0 files (gguf-py's reference Q4_0 blocks, every 2-D
/// tensor Q4_0, like `llama-quantize --pure`) bit for bit.
#[test]
fn pure_q4_0_equals_reference_blocks() {
    let dir = tmp();
    for arch in ARCHS {
        let out = dir.path().join(format!("{arch}-q4_0.gguf"));
        let mut opts = QuantizeOptions::new(model_dir(arch), FileType::Q4_0, out.clone());
        opts.pure = true;
        quantize_model(&opts).unwrap();
        assert_same_gguf(&out, &model_dir(arch).join("model-q4_0.gguf"));
    }
}

/// bf16 is the f32 weights rounded to bf16 (exact after widening).
#[test]
fn bf16_is_f32_rounded() {
    let dir = tmp();
    let (f32_out, bf16_out) = (dir.path().join("f32.gguf"), dir.path().join("bf16.gguf"));
    quantize(&model_dir("llama3"), "f32", &f32_out);
    quantize(&model_dir("llama3"), "bf16", &bf16_out);
    let (a, b) = (GgufFile::open(&f32_out).unwrap(), GgufFile::open(&bf16_out).unwrap());
    let mut n = 0;
    for (name, info) in &b.content().tensor_infos {
        if info.ggml_dtype != GgmlDType::BF16 {
            continue;
        }
        let want = a.qtensor(name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let want = want.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let got = b.qtensor(name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{name}");
        n += 1;
    }
    assert!(n >= 14, "only {n} bf16 tensors");
}

/// Every architecture to every type, loaded back: logits within the type's tolerance of HF and
/// the tokenizer giving HF's ids for the reference text. f16 is compared with HF run on the
/// f16-rounded weights (exact after widening).
#[test]
fn round_trip_logits_every_arch_and_type() {
    let dir = tmp();
    let mut failures = Vec::new();
    for arch in ARCHS {
        let refs = model_dir(arch).join("reference.safetensors");
        for (ty, tol, min_top1) in TOLERANCES {
            let out = dir.path().join(format!("{arch}-{ty}.gguf"));
            quantize(&model_dir(arch), ty, &out);
            let (d, top1) = if ty == "f16" {
                logit_error(&load(&out, true).model, &model_dir(arch).join("reference-f16.safetensors"), "logits")
            } else {
                logit_error(&load(&out, false).model, &refs, "logits")
            };
            eprintln!("{arch} {ty}: max |Δlogit| {d:.3} (tol {tol}), top-1 {top1:.2} (min {min_top1})");
            if d > tol || top1 < min_top1 {
                failures.push(format!("{arch} {ty}: max |Δlogit| {d} (tol {tol}), top-1 {top1:.2}"));
            }
            let text = std::fs::read_to_string(model_dir(arch).join("reference_text.txt")).unwrap();
            let want_ids = ids_of(&reference(&refs)["text_input_ids"]);
            let loaded = load(&out, false);
            let ids = loaded.tokenizer.as_ref().expect("embedded tokenizer").encode(&text, true).unwrap();
            assert_eq!(ids, want_ids, "{arch} {ty}: embedded tokenizer");
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The f32 output equals HF (the dequantized path is exact for every architecture).
#[test]
fn f32_output_equals_hf() {
    let dir = tmp();
    for arch in ARCHS {
        let out = dir.path().join(format!("{arch}.gguf"));
        quantize(&model_dir(arch), "f32", &out);
        let (d, _) = logit_error(&load(&out, true).model, &model_dir(arch).join("reference.safetensors"), "logits");
        assert!(d <= F32_TOL, "{arch}: f32 logits differ from HF by {d}");
    }
}

/// Rows of 256 (llama-256, from its bf16 GGUF: the GGUF input path): K types without fallback.
#[test]
fn k_quants_on_256_rows() {
    let dir = tmp();
    let src = model_dir("llama-256").join("model-bf16.gguf");
    let refs = model_dir("llama-256").join("reference-bf16.safetensors");
    for (ty, want, tol) in [("q6_k", "Q6K", 1.0), ("q5_k_m", "Q5K", 1.8), ("q4_k_m", "Q4K", 3.4), ("q3_k_m", "Q3K", 6.5)] {
        let out = dir.path().join(format!("{ty}.gguf"));
        let report = quantize(&src, ty, &out);
        assert!(report.tensors.iter().any(|t| t.dtype == want), "{ty}: no {want} tensor");
        assert!(report.tensors.iter().all(|t| !t.fallback), "{ty}: unexpected fallback");
        let (d, top1) = logit_error(&load(&out, false).model, &refs, "logits");
        eprintln!("llama-256 {ty}: max |Δlogit| {d:.3} (tol {tol}), top-1 {top1:.2}");
        assert!(d <= tol && top1 >= MIN_TOP1, "{ty}: {d} / {top1}");
    }
}

/// A merged adapter equals HF's adapted model (PEFT, f32 output: exact; two adapters with scales;
/// a GGUF adapter on a GGUF `llama` base, whose q/k rows are permuted) and, quantized, stays
/// within the type's tolerance of it.
#[test]
fn merged_adapters_equal_hf_adapted_model() {
    let dir = tmp();
    let lora = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora");
    let cases: [MergeCase; 5] = [
        ("qwen2", model_dir("qwen2"), vec![adapter(&lora, "qwen2/a", 1.0)], "logits_a", "f32", F32_TOL),
        ("llama2", model_dir("llama2"), vec![adapter(&lora, "llama2/a", 0.7), adapter(&lora, "llama2/b", 1.5)], "logits_ab", "f32", F32_TOL),
        ("llama3", model_dir("llama3").join("model-f32.gguf"), vec![adapter(&lora, "llama3/a.gguf", 1.0)], "logits_a", "f32", F32_TOL),
        ("llama3", model_dir("llama3"), vec![adapter(&lora, "llama3/a", 1.0)], "logits_a", "q8_0", 0.85),
        ("qwen3", model_dir("qwen3"), vec![adapter(&lora, "qwen3/a", 1.0)], "logits_a", "q4_k_m", 4.4),
    ];
    for (base, model, adapters, key, ty, tol) in cases {
        let out = dir.path().join(format!("{base}-{ty}-{key}.gguf"));
        let mut opts = QuantizeOptions::new(model.clone(), FileType::parse(ty).unwrap(), out.clone());
        opts.merge_adapters = adapters.clone();
        quantize_model(&opts).unwrap_or_else(|e| panic!("{base}: {e}"));
        let refs = lora.join(base).join("reference.safetensors");
        let merged = load(&out, ty == "f32").model;
        let (d, top1) = logit_error(&merged, &refs, key);
        eprintln!("{base} {} merged {key} {ty}: max |Δlogit| vs HF {d:.2e} (tol {tol}), top-1 {top1:.2}", model.display());
        assert!(d <= tol, "{base} {ty}: merged logits differ from HF's adapted model by {d}");
        if ty != "f32" {
            // The same adapters served unmerged on the quantized base, as `--adapter` does.
            let plain = dir.path().join(format!("{base}-{ty}-plain.gguf"));
            quantize(&model, ty, &plain);
            let mut served = load(&plain, false).model;
            for (i, a) in adapters.iter().enumerate() {
                let lora = metal_candle::LoraAdapter::load(&a.path, &served, &Default::default()).unwrap();
                metal_candle::ApplyAdapter::apply_adapter(&mut served, &format!("a{i}"), &lora, a.scale).unwrap();
            }
            let ids = ids_of(&reference(&refs)["input_ids"]);
            let du = max_abs_diff(&full_logits(&merged, &ids), &full_logits(&served, &ids));
            let (dh, _) = logit_error(&served, &refs, key);
            eprintln!("  merged vs unmerged-served {du:.3}; unmerged-served vs HF {dh:.3}");
            assert!(du <= tol, "{base} {ty}: merged differs from serving the adapter unmerged by {du}");
        }
    }
}

/// (base, model path, adapters, reference logits key, output type, tolerance).
type MergeCase = (&'static str, PathBuf, Vec<MergeAdapter>, &'static str, &'static str, f32);

fn adapter(lora: &Path, rel: &str, scale: f64) -> MergeAdapter {
    MergeAdapter { path: lora.join(rel), scale }
}

/// Qwen2.5-0.5B and Llama-3.2-1B shapes (scripts/bench/make_models.py): our Q4_K_M types equal
/// those `llama-quantize` wrote (recorded by scripts/test_quantize_llama_cpp.sh into
/// tests/fixtures/quantize/).
#[test]
fn q4_k_m_mix_equals_llama_quantize() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quantize");
    for shape in ["qwen2.5-0.5b", "llama3.2-1b"] {
        let config = fixtures.join(format!("{shape}.config.json"));
        let cfg = parse_hf_config(&std::fs::read_to_string(&config).unwrap(), &config).unwrap();
        let recorded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join(format!("{shape}.q4_k_m.types.json"))).unwrap()).unwrap();
        let want = recorded["types"].as_object().unwrap();
        let ours = hf_tensor_types(&cfg, FileType::Q4KM, None).unwrap();
        assert_eq!(ours.len(), want.len(), "{shape}: tensor count");
        for t in &ours {
            let w = want.get(&t.name).and_then(|v| v.as_str()).unwrap_or_else(|| panic!("{shape}: {} not in llama.cpp's file", t.name));
            assert_eq!(ggml_name(&t.dtype), w, "{shape}: {}", t.name);
        }
    }
}

/// candle's `GgmlDType` debug name → ggml's type name (`Q4K` → `Q4_K`).
fn ggml_name(candle: &str) -> String {
    match candle {
        "Q2K" | "Q3K" | "Q4K" | "Q5K" | "Q6K" | "Q8K" => format!("{}_K", &candle[..2]),
        other => other.to_string(),
    }
}

/// Typed errors: an unsupported type, rows no fallback fits, an existing output without
/// `force`, an importance matrix.
#[test]
fn bad_input_is_a_typed_error() {
    assert!(matches!(FileType::parse("iq2_xxs"), Err(Error::UnsupportedQuantType { .. })));
    // hidden 40: Q8_0's 32-value blocks do not divide the rows and there is nothing smaller.
    let text = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 40,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4}"#;
    let cfg = parse_hf_config(text, Path::new("config.json")).unwrap();
    let err = hf_tensor_types(&cfg, FileType::Q8_0, None).unwrap_err();
    assert!(matches!(err, Error::NoQuantFallback { cols: 40, .. }), "{err}");
    let keep = regex::Regex::new("attn_|ffn_gate|ffn_up|token_embd|output").unwrap();
    let ok = hf_tensor_types(&cfg, FileType::Q8_0, Some(&keep)).unwrap();
    assert!(ok.iter().any(|t| t.dtype == "Q8_0") && ok.iter().any(|t| t.dtype == "F32"));

    let dir = tmp();
    let out = dir.path().join("exists.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let mut opts = QuantizeOptions::new(model_dir("qwen2"), FileType::Q8_0, out.clone());
    assert!(matches!(quantize_model(&opts), Err(Error::OutputExists { .. })));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    opts.imatrix = Some(dir.path().join("imatrix.dat"));
    opts.force = true;
    assert!(matches!(quantize_model(&opts), Err(Error::ImatrixUnsupported { .. })));
    opts.imatrix = None;
    quantize_model(&opts).unwrap();
    assert!(GgufFile::open(&out).is_ok());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left");
}

/// A write that fails half-way (the file-size limit, as a full disk would) is
/// `Error::QuantizeWrite` and leaves neither the output nor the temporary file.
#[cfg(all(unix, feature = "cli"))]
#[test]
fn failed_write_leaves_no_file() {
    let dir = tmp();
    let out = dir.path().join("out.gguf");
    // 64 KiB limit (`ulimit -f` counts 1 KiB blocks here); the q8_0 file is ~100 KB. SIGXFSZ is
    // ignored so the write fails with EFBIG instead of killing the process.
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec '{}' quantize --model '{}' --type q8_0 --out '{}'",
        env!("CARGO_BIN_EXE_metal-candle"),
        model_dir("llama2").display(),
        out.display()
    );
    let res = std::process::Command::new("sh").arg("-c").arg(script).output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "the write should fail: {stderr}");
    assert!(stderr.contains("writing the quantized model failed"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "files left: {stderr}");
}

/// `LoadOptions::quantize`: an HF model quantized at load gives logits within the type's
/// tolerance of HF, with projections of the quantized size.
#[test]
fn in_situ_quantization_at_load() {
    for arch in ARCHS {
        let dense = load_model(&model_dir(arch), &LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() }).unwrap();
        for (q, tol, min_top1) in [(GgmlDType::Q8_0, 0.45, 0.85), (GgmlDType::Q4_0, 5.0, 0.45), (GgmlDType::Q4K, 2.1, 0.6)] {
            let opts = LoadOptions { device: DeviceChoice::Cpu, quantize: Some(q), ..LoadOptions::default() };
            let loaded = load_model(&model_dir(arch), &opts).unwrap();
            let (d, top1) = logit_error(&loaded.model, &model_dir(arch).join("reference.safetensors"), "logits");
            let (qb, db) = (loaded.model.projection_bytes(), dense.model.projection_bytes());
            eprintln!("{arch} in-situ {q:?}: max |Δlogit| {d:.3} (tol {tol}), top-1 {top1:.2}; projections {qb} B vs {db} B dense");
            assert!(d <= tol && top1 >= min_top1, "{arch} {q:?}: {d} / {top1}");
            assert!(qb * 3 < db, "{arch} {q:?}: projections {qb} B, dense {db} B");
        }
    }
}
