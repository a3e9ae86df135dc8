//! Every strict adapter error (RELIABILITY.md, Adapters): each is a typed
//! `Error::Adapter { source: AdapterError::… }` whose message names the field or tensor.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use metal_candle::adapter::{AdapterError, AdapterOptions, AdapterRegistry, ApplyAdapter, LoraAdapter};
use metal_candle::{Error, Model};
use serde_json::{json, Value};
use tempfile::TempDir;

fn lora_fixture(base: &str, which: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(base).join(which)
}

fn qwen2() -> Model {
    load_cpu(&model_dir("qwen2")).model
}

/// A writable copy of the qwen2 fixture adapter `which`.
fn copy_of(which: &str) -> TempDir {
    let tmp = TempDir::new().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(lora_fixture("qwen2", which).join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("adapter_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

fn load(dir: &Path, model: &Model) -> Result<LoraAdapter, Error> {
    LoraAdapter::load(dir, model, &AdapterOptions::default())
}

/// The adapter error inside `r`, after checking its message mentions `needle`.
fn adapter_err<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) -> AdapterError {
    let e = r.expect_err("expected an adapter error");
    let msg = e.to_string();
    assert!(msg.contains(needle), "message `{msg}` does not name `{needle}`");
    match e {
        Error::Adapter { source, .. } => source,
        other => panic!("not an adapter error: {other:?}"),
    }
}

const Q0_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const Q0_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn missing_or_invalid_config() {
    let m = qwen2();
    let tmp = copy_of("a");
    std::fs::write(tmp.path().join("adapter_config.json"), "{ not json").unwrap();
    assert!(matches!(adapter_err(load(tmp.path(), &m), "JSON"), AdapterError::InvalidJson { .. }));
    std::fs::remove_file(tmp.path().join("adapter_config.json")).unwrap();
    assert!(matches!(adapter_err(load(tmp.path(), &m), "adapter_config.json"), AdapterError::MissingConfig));
    assert!(matches!(adapter_err(load(&tmp.path().join("nope"), &m), "adapter_config.json"), AdapterError::MissingConfig));
}

#[test]
fn missing_r_alpha_or_targets() {
    let m = qwen2();
    for field in ["r", "lora_alpha", "target_modules"] {
        let tmp = copy_of("a");
        edit_config(tmp.path(), |c| {
            c.remove(field);
        });
        let e = adapter_err(load(tmp.path(), &m), field);
        assert!(matches!(e, AdapterError::MissingField { field: f } if f == field), "{e:?}");
    }
    let tmp = copy_of("a");
    edit_config(tmp.path(), |c| {
        c.insert("target_modules".into(), json!([]));
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "target_modules"), AdapterError::InvalidField { .. }));
    edit_config(tmp.path(), |c| {
        c.insert("lora_alpha".into(), json!("eight"));
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "lora_alpha"), AdapterError::InvalidField { .. }));
}

#[test]
fn rank_out_of_range() {
    let m = qwen2();
    for r in [json!(0), json!(-4), json!(100_000)] {
        let tmp = copy_of("a");
        edit_config(tmp.path(), |c| {
            c.insert("r".into(), r.clone());
        });
        assert!(matches!(adapter_err(load(tmp.path(), &m), "`r`"), AdapterError::RankOutOfRange { .. }), "r = {r}");
    }
    // A configurable maximum: r = 4 is above 2.
    let opts = AdapterOptions { max_rank: 2 };
    let e = adapter_err(LoraAdapter::load(&lora_fixture("qwen2", "a"), &m, &opts), "1..=2");
    assert!(matches!(e, AdapterError::RankOutOfRange { rank: 4, max: 2, .. }));
    let tmp = copy_of("rs");
    edit_config(tmp.path(), |c| {
        c.insert("rank_pattern".into(), json!({"q_proj": 0}));
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "rank_pattern.q_proj"), AdapterError::RankOutOfRange { .. }));
}

#[test]
fn unsupported_peft_features() {
    let m = qwen2();
    let cases = [
        ("use_dora", json!(true)),
        ("modules_to_save", json!(["lm_head"])),
        ("bias", json!("all")),
        ("bias", json!("lora_only")),
        ("lora_bias", json!(true)),
        ("layer_replication", json!([[0, 1]])),
        ("trainable_token_indices", json!([1, 2])),
        ("peft_type", json!("IA3")),
        ("layers_pattern", json!("h")),
    ];
    for (field, value) in cases {
        let tmp = copy_of("a");
        edit_config(tmp.path(), |c| {
            c.insert(field.into(), value.clone());
        });
        let e = adapter_err(load(tmp.path(), &m), field);
        assert!(matches!(e, AdapterError::Unsupported { field: f, .. } if f == field), "{field}: {e:?}");
    }
}

#[test]
fn targets_the_base_does_not_have() {
    let m = qwen2();
    let tmp = copy_of("a");
    edit_config(tmp.path(), |c| {
        c.insert("target_modules".into(), json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn"]));
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "c_attn"), AdapterError::UnknownTarget { .. }));
    edit_config(tmp.path(), |c| {
        c.insert("target_modules".into(), json!(["q_proj", "lm_head"]));
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "lm_head"), AdapterError::UnsupportedTarget { .. }));
    edit_config(tmp.path(), |c| {
        c.insert("target_modules".into(), json!(".*\\.fc[12]"));
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "fc[12]"), AdapterError::UnknownTarget { .. }));
    edit_config(tmp.path(), |c| {
        c.insert("target_modules".into(), json!("(unclosed"));
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "target_modules"), AdapterError::InvalidRegex { .. }));
}

#[test]
fn target_without_tensors_and_half_pairs() {
    let m = qwen2();
    let tmp = copy_of("a");
    edit_tensors(tmp.path(), |t| {
        t.remove(Q0_A);
        t.remove(Q0_B);
    });
    let e = adapter_err(load(tmp.path(), &m), "model.layers.0.self_attn.q_proj");
    assert!(matches!(e, AdapterError::TargetWithoutTensors { .. }), "{e:?}");
    let tmp = copy_of("a");
    edit_tensors(tmp.path(), |t| {
        t.remove(Q0_B);
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "q_proj"), AdapterError::MissingLoraB { .. }));
    let tmp = copy_of("a");
    edit_tensors(tmp.path(), |t| {
        t.remove(Q0_A);
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), "q_proj"), AdapterError::MissingLoraA { .. }));
}

#[test]
fn extra_keys() {
    let m = qwen2();
    let extra = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", // "b" targets layer 1 only
    ];
    for name in extra {
        let tmp = copy_of("b");
        edit_tensors(tmp.path(), |t| {
            t.insert(name.into(), Tensor::zeros((2, 64), DType::F32, &Device::Cpu).unwrap());
        });
        let e = adapter_err(load(tmp.path(), &m), name);
        assert!(matches!(e, AdapterError::UnexpectedTensor { .. }), "{name}: {e:?}");
    }
}

#[test]
fn shapes_that_do_not_match_rank_or_base() {
    let m = qwen2();
    let tmp = copy_of("a");
    edit_tensors(tmp.path(), |t| {
        t.insert(Q0_A.into(), Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap());
    });
    let e = adapter_err(load(tmp.path(), &m), Q0_A);
    assert!(matches!(e, AdapterError::ShapeMismatch { ref expected, .. } if expected == &[4, 64]), "{e:?}");
    // Base-model mismatch: llama2's adapter (4 KV heads) on qwen2 (2 KV heads of 16).
    let e = adapter_err(load(&lora_fixture("llama2", "a"), &m), "k_proj.lora_B");
    assert!(matches!(e, AdapterError::ShapeMismatch { ref expected, ref got, .. } if expected == &[32, 4] && got == &[64, 4]), "{e:?}");
    let tmp = copy_of("a");
    edit_tensors(tmp.path(), |t| {
        t.insert(Q0_A.into(), Tensor::zeros((4, 64), DType::I64, &Device::Cpu).unwrap());
    });
    assert!(matches!(adapter_err(load(tmp.path(), &m), Q0_A), AdapterError::UnsupportedDtype { .. }));
}

#[test]
fn pickle_only_missing_or_malformed_weights() {
    let m = qwen2();
    let tmp = copy_of("a");
    std::fs::remove_file(tmp.path().join("adapter_model.safetensors")).unwrap();
    assert!(matches!(adapter_err(load(tmp.path(), &m), "adapter_model.safetensors"), AdapterError::MissingWeights));
    std::fs::write(tmp.path().join("adapter_model.bin"), b"\x80\x04pickle").unwrap();
    assert!(matches!(adapter_err(load(tmp.path(), &m), "pickle"), AdapterError::PickleOnly));
    std::fs::write(tmp.path().join("adapter_model.safetensors"), 1000u64.to_le_bytes()).unwrap();
    assert!(matches!(adapter_err(load(tmp.path(), &m), "malformed"), AdapterError::MalformedSafetensors { .. }));
}

#[test]
fn paths_escaping_the_adapter_directory() {
    let m = qwen2();
    let root = lora_fixture("qwen2", "");
    let mut reg = AdapterRegistry::new(1 << 30).with_root(root.clone());
    for name in ["../qwen3/a", "/etc", "a/../../x", ""] {
        let e = adapter_err(reg.load_named(name, &m), "escapes");
        assert!(matches!(e, AdapterError::PathEscapes { .. }), "{name}: {e:?}");
    }
    assert!(reg.load_named("a", &m).is_ok());
    assert!(matches!(adapter_err(reg.get("zzz"), "zzz"), AdapterError::NotRegistered { .. }));
}

#[test]
fn registry_over_budget() {
    let m = qwen2();
    let mut reg = AdapterRegistry::new(1000);
    let e = adapter_err(reg.load("a", &lora_fixture("qwen2", "a"), &m), "budget");
    assert!(matches!(e, AdapterError::OverBudget { budget: 1000, .. }));
}

#[test]
fn gguf_adapter_errors() {
    let m = qwen2();
    // A model file is not an adapter.
    let e = adapter_err(load(&model_dir("qwen2").join("model-f32.gguf"), &m), "general.type");
    assert!(matches!(e, AdapterError::GgufKey { key: "general.type", .. }));
    // llama3's adapter on a qwen2 base.
    let e = adapter_err(load(&lora_fixture("llama3", "a.gguf"), &m), "llama");
    assert!(matches!(e, AdapterError::ArchitectureMismatch { .. }));
    let tmp = TempDir::new().unwrap();
    let bytes = std::fs::read(lora_fixture("qwen2", "a.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(adapter_err(load(&cut, &m), "malformed"), AdapterError::MalformedGguf { .. }));
}

#[test]
fn operations_on_a_model() {
    let mut m = qwen2();
    let a = load(&lora_fixture("qwen2", "a"), &m).unwrap();
    assert!(matches!(adapter_err(m.remove_adapter("a"), "`a`"), AdapterError::NotActive { .. }));
    assert!(matches!(adapter_err(m.set_adapter_scale("a", 1.0), "`a`"), AdapterError::NotActive { .. }));
    assert!(matches!(adapter_err(m.merge_adapter("a"), "`a`"), AdapterError::NotActive { .. }));
    assert!(matches!(m.apply_adapter("a", &a, f64::NAN), Err(Error::InvalidParameter { name: "scale", .. })));
    assert!(m.active_adapters().is_empty(), "a failed apply leaves the model unchanged");
    // Loaded for the HF-layout llama3 base, applied to the llama-arch GGUF base (permuted q/k).
    let st = load_cpu(&model_dir("llama3")).model;
    let mut gg = load_cpu(&model_dir("llama3").join("model-f32.gguf")).model;
    let for_st = load(&lora_fixture("llama3", "a"), &st).unwrap();
    let e = adapter_err(gg.apply_adapter("a", &for_st, 1.0), "layout");
    assert!(matches!(e, AdapterError::PreparedForOtherModel { .. }));
    // Merging into a quantized base.
    let mut q = load_cpu(&model_dir("qwen2").join("model-q8_0.gguf")).model;
    let aq = load(&lora_fixture("qwen2", "a"), &q).unwrap();
    q.apply_adapter("a", &aq, 1.0).unwrap();
    assert!(matches!(adapter_err(q.merge_adapter("a"), "quantized"), AdapterError::MergeQuantized { .. }));
    assert!(!q.active_adapters()[0].merged, "a failed merge leaves the model unchanged");
}
