//! Non-finite numbers are never silent (issue 18). Damaged copies of the `llama2` fixture (one
//! NaN or +Inf in one weight of each projection kind, the norms, lm_head and the embeddings; in
//! safetensors and in the F32 / F16 / Q8_0 GGUFs, where a Q8_0 weight is damaged through its
//! block's f16 scale) must give `Error::NonFinite { what: "logits", position }` at the first row
//! HF transformers makes non-finite (tests/fixtures/models/llama2/non_finite_reference.json, by
//! scripts/fixtures/make_non_finite_fixtures.py), through the library's perplexity and
//! generator and the CLI, on our CPU kernels and on candle's path (`METAL_CANDLE_CPU_KERNELS=0`).
//! `LoadOptions::check_tensors` names the damaged tensor at load.
#![cfg(feature = "cli")]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use metal_candle::generation::{GenerateParams, Generator};
use metal_candle::loader::gguf::gguf_name;
use metal_candle::{load_model, perplexity, DeviceChoice, Error, LoadOptions};
use serde_json::Value;
use tempfile::TempDir;

use common::model_dir;

/// The model files of `llama2` a damaged copy is made from.
const FORMATS: [&str; 4] = ["model.safetensors", "model-f32.gguf", "model-f16.gguf", "model-q8_0.gguf"];

struct Case {
    tensor: String,
    index: Vec<usize>,
    value: f32,
    hf_bad_rows: Vec<usize>,
}

fn reference() -> (Vec<u32>, Vec<Case>) {
    let text = fs::read_to_string(model_dir("llama2").join("non_finite_reference.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let ids = json["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            tensor: c["tensor"].as_str().unwrap().to_string(),
            index: c["index"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect(),
            value: if c["value"] == "nan" { f32::NAN } else { f32::INFINITY },
            hf_bad_rows: c["bad_rows"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect(),
        })
        .collect();
    (ids, cases)
}

/// Flat element index of `index` in a tensor of `shape`.
fn flat(index: &[usize], shape: &[usize]) -> usize {
    index.iter().zip(shape).fold(0, |acc, (i, n)| acc * n + i)
}

/// A copy of the llama2 model (`format`: one of [`FORMATS`]) in a temp dir with `case`'s value
/// written into its tensor. Returns the dir and the path to load.
fn damaged(format: &str, case: &Case) -> (TempDir, PathBuf) {
    let src = model_dir("llama2");
    let dir = TempDir::new().unwrap();
    let file = dir.path().join(format);
    fs::copy(src.join(format), &file).unwrap();
    let mut bytes = fs::read(&file).unwrap();
    if format.ends_with(".gguf") {
        damage_gguf(&mut bytes, case);
        fs::write(&file, bytes).unwrap();
        return (dir, file);
    }
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    damage_safetensors(&mut bytes, case);
    fs::write(&file, bytes).unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

fn damage_safetensors(bytes: &mut [u8], case: &Case) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[&case.tensor];
    assert_eq!(t["dtype"], "F32", "{}", case.tensor);
    let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let at = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + 4 * flat(&case.index, &shape);
    bytes[at..at + 4].copy_from_slice(&case.value.to_le_bytes());
}

/// Writes the value at the element (F32, F16) or into the scale of the element's block (Q8_0).
fn damage_gguf(bytes: &mut [u8], case: &Case) {
    let content = Content::read(&mut std::io::Cursor::new(&bytes[..])).unwrap();
    let name = gguf_name(&case.tensor).unwrap();
    let info = &content.tensor_infos[&name];
    // GGUF dims are stored innermost first; candle gives them outermost first, like HF.
    let e = flat(&case.index, info.shape.dims());
    let base = (content.tensor_data_offset + info.offset) as usize;
    let half = half::f16::from_f32(case.value).to_le_bytes();
    match info.ggml_dtype {
        GgmlDType::F32 => bytes[base + 4 * e..base + 4 * e + 4].copy_from_slice(&case.value.to_le_bytes()),
        GgmlDType::F16 => bytes[base + 2 * e..base + 2 * e + 2].copy_from_slice(&half),
        GgmlDType::Q8_0 => {
            let at = base + (e / 32) * 34; // block_q8_0 { f16 d; i8 qs[32] }
            bytes[at..at + 2].copy_from_slice(&half);
        }
        other => panic!("{name}: unexpected type {other:?}"),
    }
}

/// The undamaged model of `format`: the directory for safetensors, else the file.
fn clean(format: &str) -> PathBuf {
    let dir = model_dir("llama2");
    if format.ends_with(".gguf") { dir.join(format) } else { dir }
}

fn cpu(check_tensors: bool) -> LoadOptions {
    LoadOptions { device: DeviceChoice::Cpu, check_tensors, ..LoadOptions::default() }
}

/// Where metal-candle must report the case: HF's first non-finite row, except for a damaged
/// embedding row. HF adds its causal mask (NaN + min = NaN), so a NaN key at a later position
/// reaches every earlier row; our CPU attention skips masked keys (issue 18: "skipped because it
/// is masked"), like llama.cpp's flash attention, so the first bad row is where the token first
/// occurs. candle's path (attention from plain ops, additive mask) leaks like HF.
fn expected_position(case: &Case, ids: &[u32], ours: bool) -> usize {
    if ours && case.tensor == "model.embed_tokens.weight" {
        return ids.iter().position(|&t| t as usize == case.index[0]).unwrap();
    }
    case.hf_bad_rows[0]
}

fn assert_non_finite_at(r: metal_candle::Result<impl std::fmt::Debug>, position: usize, what: &str) {
    match r {
        Err(Error::NonFinite { what: "logits", position: p }) => assert_eq!(p, position, "{what}"),
        other => panic!("{what}: expected NonFinite logits at {position}, got {other:?}"),
    }
}

#[test]
fn hf_makes_every_row_non_finite_for_damaged_weights() {
    // The reference itself: a test that the fixture is what the script says (not our output).
    let (ids, cases) = reference();
    assert!(cases.len() >= 14);
    for c in &cases {
        assert_eq!(c.hf_bad_rows, (0..ids.len()).collect::<Vec<_>>(), "{}", c.tensor);
    }
}

/// Our path (the default: CPU kernels for F16 / Q8_0, our CPU attention), library perplexity.
#[test]
fn perplexity_reports_the_first_non_finite_row_on_every_format() {
    let (ids, cases) = reference();
    for format in FORMATS {
        let clean = load_model(&clean(format), &cpu(false)).unwrap().model;
        assert!(perplexity(&clean, &ids, ids.len()).unwrap().perplexity.is_finite(), "{format}");
        for case in &cases {
            let what = format!("{format}: {}{:?} = {}", case.tensor, case.index, case.value);
            let (_dir, path) = damaged(format, case);
            let model = load_model(&path, &cpu(false)).unwrap_or_else(|e| panic!("{what}: {e}")).model;
            assert_non_finite_at(perplexity(&model, &ids, ids.len()), expected_position(case, &ids, true), &what);
            // Dequantized (dense candle matmuls, the reference numerics): the same verdict.
            let dense = LoadOptions { dequantize_weights: true, ..cpu(false) };
            let model = load_model(&path, &dense).unwrap().model;
            assert_non_finite_at(perplexity(&model, &ids, ids.len()), expected_position(case, &ids, true), &what);
        }
    }
}

#[test]
fn generator_reports_non_finite_logits() {
    let (_, cases) = reference();
    for format in ["model.safetensors", "model-q8_0.gguf"] {
        for case in cases.iter().filter(|c| c.tensor.contains("q_proj") || c.tensor == "model.norm.weight") {
            let (_dir, path) = damaged(format, case);
            let loaded = load_model(&path, &cpu(false)).unwrap();
            let g = Generator::from_loaded(&loaded).unwrap();
            let params = GenerateParams { max_tokens: 4, ignore_eos: true, ..GenerateParams::default() };
            // The position is the sequence position of the token whose logits are bad: the last
            // prompt token, whose logits pick the first generated one.
            let last = g.encode(&"Hello".into()).unwrap().len() - 1;
            assert_non_finite_at(g.generate("Hello", &params), last, &format!("{format}: {}", case.tensor));
        }
    }
}

fn cli(args: &[&str], candle_path: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metal-candle"));
    cmd.args(args);
    if candle_path {
        cmd.env("METAL_CANDLE_CPU_KERNELS", "0");
    } else {
        cmd.env_remove("METAL_CANDLE_CPU_KERNELS");
    }
    cmd.output().unwrap()
}

/// Both CPU paths through the binary: perplexity fails with `error: non-finite logits … at
/// position P` (exit ≠ 0, no perplexity printed) at the same position as the library.
#[test]
fn cli_perplexity_fails_on_both_cpu_paths() {
    let (ids, cases) = reference();
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    for format in FORMATS {
        for case in &cases {
            let (_dir, path) = damaged(format, case);
            let p = path.to_str().unwrap();
            for candle_path in [false, true] {
                let what = format!("{format} {} candle_path={candle_path}", case.tensor);
                let out = cli(&["perplexity", "--model", p, "--token-ids", &ids_arg, "--device", "cpu", "--json"], candle_path);
                let stderr = String::from_utf8_lossy(&out.stderr);
                let want = format!("at position {}", expected_position(case, &ids, !candle_path));
                assert!(!out.status.success(), "{what}: exit 0, stdout {}", String::from_utf8_lossy(&out.stdout));
                assert!(stderr.contains("error: non-finite logits") && stderr.contains(&want), "{what}: {stderr}");
                assert!(!String::from_utf8_lossy(&out.stdout).contains("perplexity:"), "{what}");
            }
        }
    }
}

#[test]
fn cli_generate_fails_on_both_cpu_paths() {
    let (_, cases) = reference();
    let case = cases.iter().find(|c| c.tensor == "model.layers.1.self_attn.q_proj.weight").unwrap();
    for format in ["model.safetensors", "model-f16.gguf", "model-q8_0.gguf"] {
        let (_dir, path) = damaged(format, case);
        for candle_path in [false, true] {
            let out = cli(&["generate", "--model", path.to_str().unwrap(), "--prompt", "Hello", "--max-tokens", "3", "--device", "cpu"], candle_path);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{format} candle_path={candle_path}: exit 0");
            assert!(stderr.contains("error: non-finite logits"), "{format} candle_path={candle_path}: {stderr}");
        }
    }
}

/// `check_tensors` names the damaged tensor (its name in the file) at load; off, the load succeeds.
#[test]
fn check_tensors_names_the_first_bad_tensor() {
    let (_, cases) = reference();
    for format in FORMATS {
        assert!(load_model(&clean(format), &cpu(true)).is_ok(), "{format}: clean file");
        for case in &cases {
            let (_dir, path) = damaged(format, case);
            let file_name = if format.ends_with(".gguf") { gguf_name(&case.tensor).unwrap() } else { case.tensor.clone() };
            match load_model(&path, &cpu(true)) {
                Err(Error::NonFiniteTensor { name, path: p, .. }) => {
                    assert_eq!(name, file_name, "{format}");
                    assert!(p.ends_with(format), "{}", p.display());
                }
                Err(e) => panic!("{format} {}: {e}", case.tensor),
                Ok(_) => panic!("{format} {}: loaded with check_tensors", case.tensor),
            }
            assert!(load_model(&path, &cpu(false)).is_ok(), "{format} {}: off by default", case.tensor);
        }
    }
    let (_dir, path) = damaged("model-q8_0.gguf", &cases[0]);
    let out = cli(&["perplexity", "--model", path.to_str().unwrap(), "--token-ids", "1,2,3", "--device", "cpu", "--check-tensors"], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("blk.1.attn_q.weight") && stderr.contains("non-finite"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Adapters: absurd numbers in adapter_config.json and non-finite adapter weights.

fn peft_copy(name: &str) -> (TempDir, PathBuf) {
    let src = lora_dir(name);
    let dir = TempDir::new().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let p = dir.path().to_path_buf();
    (dir, p)
}

fn lora_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/llama2").join(name)
}

fn edit_config(dir: &Path, field: &str, value: Value) {
    let p = dir.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    cfg[field] = value;
    fs::write(&p, cfg.to_string()).unwrap();
}

#[test]
fn absurd_adapter_numbers_and_weights_are_errors() {
    use metal_candle::adapter::{AdapterError, AdapterOptions, LoraAdapter};
    let model = load_model(&model_dir("llama2"), &cpu(false)).unwrap().model;
    let adapter = first_peft_adapter();
    let opts = AdapterOptions::default();
    let (_d, clean) = peft_copy(&adapter);
    assert!(LoraAdapter::load(&clean, &model, &opts).is_ok());
    for (field, value) in [
        ("lora_alpha", serde_json::json!(1e308)),
        ("lora_alpha", serde_json::json!(-9.2e18)),
        ("lora_dropout", serde_json::json!(1.0)),
        ("lora_dropout", serde_json::json!(-0.5)),
        ("alpha_pattern", serde_json::json!({"q_proj": 1e300})),
    ] {
        let (_d, dir) = peft_copy(&adapter);
        edit_config(&dir, field, value.clone());
        match LoraAdapter::load(&dir, &model, &opts) {
            Err(Error::Adapter { source: AdapterError::InvalidField { field: f, .. }, .. }) => {
                assert!(f.starts_with(field), "{field} = {value}: names `{f}`")
            }
            other => panic!("{field} = {value}: {other:?}"),
        }
    }
    // One NaN in a lora_B weight: named at load, always (no option needed).
    let (_d, dir) = peft_copy(&adapter);
    let st = dir.join("adapter_model.safetensors");
    let mut bytes = fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, t) = header.as_object().unwrap().iter().find(|(k, _)| k.ends_with("lora_B.weight")).unwrap();
    assert_eq!(t["dtype"], "F32");
    let at = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + 4;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    fs::write(&st, bytes).unwrap();
    match LoraAdapter::load(&dir, &model, &opts) {
        Err(Error::NonFiniteTensor { name: got, index: 1, .. }) => assert_eq!(&got, name),
        other => panic!("NaN in {name}: {other:?}"),
    }
}

/// The first PEFT adapter directory of the llama2 LoRA fixtures.
fn first_peft_adapter() -> String {
    let mut names: Vec<String> = fs::read_dir(lora_dir(""))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("adapter_config.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().next().expect("a PEFT adapter fixture for llama2")
}

/// The engine fails only the sequence whose logits are non-finite: a NaN embedding row poisons
/// the request whose prompt holds that token; a request in the same steps without it completes
/// exactly as on the clean model.
#[test]
fn the_engine_fails_only_the_poisoned_sequence() {
    use metal_candle::engine::{Engine, EngineConfig};
    use metal_candle::generation::{GenerateParams, Generator};
    let (_, cases) = reference();
    let case = cases.iter().find(|c| c.tensor == "model.embed_tokens.weight").unwrap();
    let bad_token = case.index[0] as u32;
    let (_dir, path) = damaged("model.safetensors", case);
    let g = Generator::from_loaded(&load_model(&path, &cpu(false)).unwrap()).unwrap();
    let clean_g = Generator::from_loaded(&load_model(&clean("model.safetensors"), &cpu(false)).unwrap()).unwrap();
    let params = GenerateParams { max_tokens: 6, ignore_eos: true, ..GenerateParams::default() };
    let good: Vec<u32> = (1..9).map(|i| if i == bad_token { i + 1 } else { i }).collect();
    let poisoned = vec![good[0], bad_token, good[1]];
    let want = clean_g.generate(good.clone(), &params).unwrap().tokens;
    let engine = Engine::new(g, EngineConfig::default()).unwrap();
    let (a, b) = (engine.submit(poisoned, &params).unwrap(), engine.submit(good, &params).unwrap());
    let err = a.collect_generation().unwrap_err();
    assert!(matches!(err, Error::NonFinite { what: "logits", position: 2 }), "{err}");
    assert_eq!(b.collect_generation().unwrap().tokens, want);
}
