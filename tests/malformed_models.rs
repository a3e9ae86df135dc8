//! Whole models that are structurally valid files but semantically wrong: each must fail
//! `load_model` with the specific typed error naming the file and the defect, never a panic, an
//! abort or a huge allocation. The byte-level format defects are in `malformed_files.rs`; here the
//! inputs are copies of the committed fixtures (`tests/fixtures/models/<name>`) mutated in temp dirs:
//! `config.json` edits, safetensors with tensors dropped/reshaped/retyped, broken shard indexes,
//! GGUF files rewritten with candle's `gguf_file::write` after changing metadata or tensors, and
//! broken tokenizers.

mod common;

use std::collections::HashMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use metal_candle::{load_model, DeviceChoice, Error, LoadOptions, LoadedModel, Logits};
use serde_json::{json, Value as Json};
use tempfile::TempDir;

use common::model_dir;

// ---------------------------------------------------------------------------------------------
// Loading with panics turned into test failures that name the case.

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "<non-string panic payload>".into())
}

fn try_load(case: &str, path: &Path, opts: &LoadOptions) -> Result<LoadedModel, Error> {
    match catch_unwind(AssertUnwindSafe(|| load_model(path, opts))) {
        Ok(result) => result,
        Err(p) => panic!("case `{case}`: load_model panicked: {}", panic_message(p.as_ref())),
    }
}

fn cpu() -> LoadOptions {
    LoadOptions {
        device: DeviceChoice::Cpu,
        ..LoadOptions::default()
    }
}

/// The error `load_model` gives for `path`; a successful load fails the test.
fn load_err_with(case: &str, path: &Path, opts: &LoadOptions) -> Error {
    match try_load(case, path, opts) {
        Ok(_) => panic!("case `{case}`: {} loaded without an error", path.display()),
        Err(e) => e,
    }
}

fn assert_mentions(case: &str, err: &Error, needles: &[&str]) {
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "case `{case}`: message {msg:?} does not mention {needle:?}");
    }
}

/// `reject!(case, path, Pattern [if guard], ["needle", ..])`: loading `path` fails with an error
/// matching the pattern whose message contains every needle.
macro_rules! reject {
    ($case:expr, $path:expr, $pat:pat $(if $guard:expr)?, [$($needle:expr),* $(,)?]) => {
        reject!($case, $path, &cpu(), $pat $(if $guard)?, [$($needle),*])
    };
    ($case:expr, $path:expr, $opts:expr, $pat:pat $(if $guard:expr)?, [$($needle:expr),* $(,)?]) => {{
        let case: &str = $case;
        let err = load_err_with(case, AsRef::<Path>::as_ref(&$path), $opts);
        assert!(matches!(&err, $pat $(if $guard)?), "case `{case}`: unexpected error {err:?} ({err})");
        assert_mentions(case, &err, &[$($needle),*]);
    }};
}

// ---------------------------------------------------------------------------------------------
// Building the corpus.

/// A copy of the HF files of fixture `name` (config, tokenizer, safetensors + index) in a temp dir.
fn hf_copy(name: &str) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(model_dir(name)).expect("fixture dir") {
        let path = entry.expect("dir entry").path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
        let wanted = file.ends_with(".json") || (file.starts_with("model") && file.ends_with(".safetensors"));
        if wanted {
            fs::copy(&path, dir.path().join(&file)).expect("copy fixture file");
        }
    }
    dir
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&fs::read_to_string(path).expect("read json")).expect("parse json")
}

fn write_json(path: &Path, value: &Json) {
    fs::write(path, serde_json::to_string_pretty(value).expect("json")).expect("write json");
}

/// A copy of fixture `name` whose `config.json` was changed by `edit`.
fn with_config(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Json>)) -> TempDir {
    let dir = hf_copy(name);
    let path = dir.path().join("config.json");
    let mut config = read_json(&path);
    edit(config.as_object_mut().expect("config is an object"));
    write_json(&path, &config);
    dir
}

/// Rewrites `file` (a single safetensors file) after `edit` changed its tensors.
fn edit_safetensors(file: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(file, &Device::Cpu).expect("load safetensors");
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, file).expect("save safetensors");
}

/// The content of a GGUF file, in an editable form.
struct Gguf {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, QTensor)>,
}

impl Gguf {
    fn read(path: &Path) -> Self {
        let mut file = fs::File::open(path).expect("open gguf");
        let content = Content::read(&mut file).expect("read gguf");
        let mut metadata: Vec<_> = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        let tensors = infos
            .into_iter()
            .map(|(name, _)| {
                let t = content.tensor(&mut file, name, &Device::Cpu).expect("read tensor");
                (name.clone(), t)
            })
            .collect();
        Self { metadata, tensors }
    }

    fn fixture(name: &str, file: &str) -> Self {
        Self::read(&model_dir(name).join(file))
    }

    fn set(&mut self, key: &str, value: GgufValue) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    fn get(&self, key: &str) -> &GgufValue {
        &self.metadata.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no key {key}")).1
    }

    fn remove(&mut self, key: &str) -> &mut Self {
        let before = self.metadata.len();
        self.metadata.retain(|(k, _)| k != key);
        assert_ne!(before, self.metadata.len(), "fixture has no key {key}");
        self
    }

    fn remove_tensor(&mut self, name: &str) -> &mut Self {
        let before = self.tensors.len();
        self.tensors.retain(|(n, _)| n != name);
        assert_ne!(before, self.tensors.len(), "fixture has no tensor {name}");
        self
    }

    /// Replaces tensor `name` by an F32 tensor of `shape` (zeros).
    fn replace_tensor(&mut self, name: &str, shape: &[usize]) -> &mut Self {
        let zeros = Tensor::ones(shape, DType::F32, &Device::Cpu).expect("ones");
        let q = QTensor::quantize(&zeros, GgmlDType::F32).expect("quantize");
        let slot = self.tensors.iter_mut().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no tensor {name}"));
        slot.1 = q;
        self
    }

    fn write(&self, path: &Path) {
        let mut file = fs::File::create(path).expect("create gguf");
        let metadata: Vec<(&str, &GgufValue)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut file, &metadata, &tensors).expect("write gguf");
    }

    /// Writes the file to `<tempdir>/model.gguf`.
    fn save(&self) -> (TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.gguf");
        self.write(&path);
        (dir, path)
    }
}

fn gguf_array_len(v: &GgufValue) -> usize {
    match v {
        GgufValue::Array(items) => items.len(),
        other => panic!("not an array: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The corpus is sane: every fixture variant we mutate loads unmodified (after a round trip).

#[test]
fn unmodified_copies_load() {
    for name in ["qwen2", "qwen3", "llama3", "llama2", "mistral"] {
        let dir = hf_copy(name);
        try_load(name, dir.path(), &cpu()).unwrap_or_else(|e| panic!("{name} copy: {e}"));
        let (_dir, path) = Gguf::fixture(name, "model-f32.gguf").save();
        try_load(name, &path, &cpu()).unwrap_or_else(|e| panic!("{name} gguf round trip: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// config.json

#[test]
fn config_json_missing_or_not_json() {
    let dir = hf_copy("qwen2");
    fs::remove_file(dir.path().join("config.json")).expect("rm");
    reject!("config.json missing", dir.path(), Error::Io { path, .. } if path.ends_with("config.json"), ["config.json"]);

    let dir = hf_copy("qwen2");
    fs::write(dir.path().join("config.json"), "{\"hidden_size\": 64,").expect("write");
    reject!("config.json truncated", dir.path(), Error::Json { path, .. } if path.ends_with("config.json"), ["config.json"]);

    let dir = hf_copy("qwen2");
    fs::write(dir.path().join("config.json"), "[1, 2, 3]").expect("write");
    reject!("config.json an array", dir.path(), Error::Json { .. }, ["config.json"]);

    let dir = hf_copy("qwen2");
    fs::write(dir.path().join("config.json"), [0xff, 0xfe, 0x00, 0x7b]).expect("write");
    reject!("config.json not UTF-8", dir.path(), Error::Io { .. }, ["config.json"]);
}

#[test]
fn config_missing_fields() {
    for field in ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size"] {
        let dir = with_config("llama3", |c| {
            c.remove(field);
        });
        let case = format!("config without {field}");
        reject!(&case, dir.path(), Error::MissingConfigField { field: f, .. } if f == field, ["config.json", field]);
        let dir = with_config("qwen2", |c| {
            c.insert(field.into(), Json::Null);
        });
        let case = format!("config with {field}: null");
        reject!(&case, dir.path(), Error::MissingConfigField { field: f, .. } if f == field, ["config.json", field]);
    }
}

/// `config.json` edits that must be rejected as `InvalidConfig { field }`.
#[test]
fn config_invalid_values() {
    let cases: &[(&str, &str, Json, &str)] = &[
        // (fixture, key, value, field named in the error)
        ("llama3", "num_attention_heads", json!(0), "num_attention_heads"),
        ("llama3", "num_key_value_heads", json!(0), "num_key_value_heads"),
        ("llama3", "num_key_value_heads", json!(3), "num_key_value_heads"),
        ("qwen2", "num_key_value_heads", json!(3), "num_key_value_heads"),
        ("llama3", "head_dim", json!(15), "head_dim"),
        ("llama3", "head_dim", json!(0), "head_dim"),
        // Explicit head_dim far beyond any real model: RoPE tables are max_positions × head_dim.
        ("llama3", "head_dim", json!(1u64 << 20), "head_dim"),
        ("llama3", "hidden_size", json!(1_000_000_000_000u64), "hidden_size"),
        ("llama3", "vocab_size", json!(1_000_000_000_000u64), "vocab_size"),
        ("llama3", "intermediate_size", json!(1_000_000_000_000u64), "intermediate_size"),
        ("llama3", "num_hidden_layers", json!(1_000_000_000_000u64), "num_hidden_layers"),
        ("qwen2", "num_hidden_layers", json!(u64::MAX), "num_hidden_layers"),
        ("mistral", "num_hidden_layers", json!(1_000_000_000_000u64), "num_hidden_layers"),
        ("llama3", "num_attention_heads", json!(1_000_000_000u64), "num_attention_heads"),
        ("llama3", "num_hidden_layers", json!(0), "num_hidden_layers"),
        ("llama3", "intermediate_size", json!(0), "intermediate_size"),
        ("llama3", "vocab_size", json!(0), "vocab_size"),
        ("llama3", "max_position_embeddings", json!(0), "max_position_embeddings"),
        ("llama3", "hidden_size", json!(-64), "hidden_size"),
        ("llama3", "vocab_size", json!(-5), "vocab_size"),
        ("llama3", "num_hidden_layers", json!(-1), "num_hidden_layers"),
        ("llama3", "num_attention_heads", json!(-4), "num_attention_heads"),
        ("llama3", "hidden_size", json!(64.5), "hidden_size"),
        ("llama3", "hidden_size", json!("64"), "hidden_size"),
        ("llama3", "rms_norm_eps", json!(-1.0), "rms_norm_eps"),
        ("llama3", "rms_norm_eps", json!("tiny"), "rms_norm_eps"),
        ("llama3", "rope_theta", json!(0.0), "rope_theta"),
        ("llama3", "rope_theta", json!(-10000.0), "rope_theta"),
        ("llama3", "hidden_act", json!("gelu"), "hidden_act"),
        ("qwen2", "hidden_act", json!("relu"), "hidden_act"),
        ("llama3", "eos_token_id", json!(-1), "eos_token_id"),
        ("llama3", "eos_token_id", json!([2, "x"]), "eos_token_id"),
        ("llama3", "bos_token_id", json!(1u64 << 40), "bos_token_id"),
        ("llama3", "tie_word_embeddings", json!("yes"), "tie_word_embeddings"),
        ("llama3", "rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        ("llama3", "rope_scaling", json!({"type": "linear", "factor": 2.0}), "rope_scaling"),
        ("llama3", "rope_scaling", json!({"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (
            "llama3",
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                   "original_max_position_embeddings": 64}),
            "rope_scaling",
        ),
        (
            "llama3",
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": -8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}),
            "rope_scaling",
        ),
        (
            "llama3",
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 0}),
            "rope_scaling",
        ),
        ("mistral", "sliding_window", json!(0), "sliding_window"),
        ("mistral", "sliding_window", json!(-8), "sliding_window"),
        ("qwen2", "layer_types", json!(["full_attention"]), "layer_types"),
        ("qwen2", "layer_types", json!(["full_attention", "full_attention", "full_attention"]), "layer_types"),
        ("qwen2", "layer_types", json!(["full_attention", "chunked_attention"]), "layer_types"),
    ];
    for (fixture, key, value, field) in cases {
        let dir = with_config(fixture, |c| {
            c.insert(key.to_string(), value.clone());
        });
        let case = format!("{fixture} config {key} = {value}");
        reject!(&case, dir.path(), Error::InvalidConfig { field: f, .. } if f == field, ["config.json", field]);
    }
}

#[test]
fn config_semantic_combinations() {
    // Qwen2 window on every layer from 0, but 0 wide (without `layer_types`, which would win).
    let dir = with_config("qwen2", |c| {
        c.remove("layer_types");
        c.insert("use_sliding_window".into(), json!(true));
        c.insert("sliding_window".into(), json!(0));
        c.insert("max_window_layers".into(), json!(0));
    });
    reject!("qwen2 sliding_window 0", dir.path(), Error::InvalidConfig { field, .. } if field == "sliding_window", ["config.json"]);

    // layer_types asks for sliding attention but there is no window.
    let dir = with_config("qwen2", |c| {
        c.insert("layer_types".into(), json!(["sliding_attention", "full_attention"]));
        c.insert("sliding_window".into(), Json::Null);
    });
    reject!("sliding layer without window", dir.path(), Error::MissingConfigField { field, .. } if field == "sliding_window", ["config.json"]);

    // hidden_size not a multiple of the heads: head_dim 21 is odd.
    let dir = with_config("qwen2", |c| {
        c.insert("num_attention_heads".into(), json!(3));
        c.insert("num_key_value_heads".into(), json!(1));
    });
    reject!("hidden 64 / 3 heads", dir.path(), Error::InvalidConfig { field, .. } if field == "head_dim", ["config.json"]);

    // The config's sizes disagree with the weights.
    let dir = with_config("qwen2", |c| {
        c.insert("intermediate_size".into(), json!(96));
    });
    reject!(
        "intermediate_size vs weights",
        dir.path(),
        Error::ShapeMismatch { name, expected, got, .. }
            if name == "model.layers.0.mlp.gate_proj.weight" && expected == &[96, 64] && got == &[128, 64],
        ["model.layers.0.mlp.gate_proj.weight"]
    );
    let dir = with_config("llama3", |c| {
        c.insert("vocab_size".into(), json!(512));
    });
    reject!(
        "vocab_size vs embedding",
        dir.path(),
        Error::ShapeMismatch { name, .. } if name == "model.embed_tokens.weight",
        ["model.embed_tokens.weight", "512"]
    );
    let dir = with_config("llama3", |c| {
        c.insert("num_hidden_layers".into(), json!(3));
    });
    reject!(
        "more layers than weights",
        dir.path(),
        Error::MissingTensor { name, .. } if name.starts_with("model.layers.2."),
        ["model.layers.2."]
    );
}

#[test]
fn config_architecture() {
    for (archs, model_type, named) in [
        (json!(["GPT2LMHeadModel"]), json!("gpt2"), "GPT2LMHeadModel"),
        (json!([]), Json::Null, "<none given>"),
        (Json::Null, Json::Null, "<none given>"),
        (json!(["Gemma2ForCausalLM"]), json!("gemma2"), "Gemma2ForCausalLM"),
    ] {
        let dir = with_config("llama3", |c| {
            c.insert("architectures".into(), archs.clone());
            c.insert("model_type".into(), model_type.clone());
        });
        let case = format!("architecture {archs}");
        reject!(&case, dir.path(), Error::UnsupportedArchitecture { arch, .. } if arch == named, ["config.json", named]);
    }
    let dir = with_config("llama3", |c| {
        c.insert("architectures".into(), json!("LlamaForCausalLM"));
    });
    reject!("architectures not a list", dir.path(), Error::InvalidConfig { field, .. } if field == "architectures", ["config.json"]);
}

// ---------------------------------------------------------------------------------------------
// safetensors weights and shard indexes

#[test]
fn safetensors_tensor_defects() {
    let dir = hf_copy("qwen2");
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        t.remove("model.layers.1.mlp.down_proj.weight");
    });
    reject!(
        "tensor missing",
        dir.path(),
        Error::MissingTensor { name, .. } if name == "model.layers.1.mlp.down_proj.weight",
        ["model.layers.1.mlp.down_proj.weight"]
    );

    let dir = hf_copy("qwen2");
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        t.remove("model.layers.0.self_attn.q_proj.bias");
    });
    reject!(
        "qwen2 q bias missing",
        dir.path(),
        Error::MissingTensor { name, .. } if name == "model.layers.0.self_attn.q_proj.bias",
        ["model.layers.0.self_attn.q_proj.bias"]
    );

    let dir = hf_copy("qwen2");
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        t.insert("model.layers.0.self_attn.k_proj.weight".into(), Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap());
    });
    reject!(
        "tensor wrong shape",
        dir.path(),
        Error::ShapeMismatch { name, expected, got, .. }
            if name == "model.layers.0.self_attn.k_proj.weight" && expected == &[32, 64] && got == &[16, 64],
        ["model.safetensors", "model.layers.0.self_attn.k_proj.weight"]
    );

    let dir = hf_copy("qwen2");
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        t.insert("model.norm.weight".into(), Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap());
    });
    reject!("norm 2-D", dir.path(), Error::ShapeMismatch { name, .. } if name == "model.norm.weight", ["model.norm.weight"]);

    for dtype in [DType::I64, DType::U8, DType::F64, DType::U32] {
        let dir = hf_copy("qwen2");
        edit_safetensors(&dir.path().join("model.safetensors"), |t| {
            let e = t.get("model.embed_tokens.weight").unwrap().to_dtype(dtype).unwrap();
            t.insert("model.embed_tokens.weight".into(), e);
        });
        let case = format!("embedding as {dtype:?}");
        reject!(
            &case,
            dir.path(),
            Error::UnsupportedQuant { name, .. } if name == "model.embed_tokens.weight",
            ["model.safetensors", "model.embed_tokens.weight"]
        );
    }

    // Untied model whose lm_head is missing: an error, not a silent tie to the embeddings.
    let dir = hf_copy("mistral");
    edit_safetensors(&dir.path().join("model.safetensors"), |t| {
        t.remove("lm_head.weight").expect("mistral fixture has lm_head");
    });
    reject!("untied lm_head missing", dir.path(), Error::MissingTensor { name, .. } if name == "lm_head.weight", ["lm_head.weight"]);
}

#[test]
fn safetensors_files_and_index() {
    let dir = hf_copy("qwen2");
    fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    reject!("no weights", dir.path(), Error::NotAModel { .. }, ["model.safetensors"]);

    let dir = hf_copy("qwen2");
    let file = dir.path().join("model.safetensors");
    let bytes = fs::read(&file).expect("read");
    fs::write(&file, &bytes[..bytes.len() - 1000]).expect("truncate");
    reject!("truncated safetensors", dir.path(), Error::MalformedSafetensors { path, .. } if path == &file, ["model.safetensors"]);

    let dir = hf_copy("qwen3");
    let shard = dir.path().join("model-00002-of-00003.safetensors");
    let bytes = fs::read(&shard).expect("read");
    fs::write(&shard, &bytes[..bytes.len() / 2]).expect("truncate");
    reject!("truncated shard", dir.path(), Error::MalformedSafetensors { path, .. } if path == &shard, ["model-00002-of-00003.safetensors"]);

    let dir = hf_copy("qwen3");
    fs::remove_file(dir.path().join("model-00003-of-00003.safetensors")).expect("rm");
    reject!(
        "shard missing",
        dir.path(),
        Error::Io { path, .. } if path.ends_with("model-00003-of-00003.safetensors"),
        ["model-00003-of-00003.safetensors"]
    );

    let index = |dir: &TempDir| dir.path().join("model.safetensors.index.json");
    let dir = hf_copy("qwen3");
    fs::write(index(&dir), "{\"weight_map\": {").expect("write");
    reject!("index not JSON", dir.path(), Error::Json { path, .. } if path.ends_with("model.safetensors.index.json"), ["model.safetensors.index.json"]);

    let dir = hf_copy("qwen3");
    write_json(&index(&dir), &json!({"metadata": {}}));
    reject!("index without weight_map", dir.path(), Error::MissingConfigField { field, .. } if field == "weight_map", ["model.safetensors.index.json"]);

    let dir = hf_copy("qwen3");
    write_json(&index(&dir), &json!({"weight_map": ["model-00001-of-00003.safetensors"]}));
    reject!("weight_map a list", dir.path(), Error::MissingConfigField { field, .. } if field == "weight_map", ["model.safetensors.index.json"]);

    for bad in ["../x.safetensors", "/etc/passwd", "sub/model.safetensors", ".hidden.safetensors", "..", ""] {
        let dir = hf_copy("qwen3");
        let mut json = read_json(&index(&dir));
        json["weight_map"]["model.norm.weight"] = json!(bad);
        write_json(&index(&dir), &json);
        let case = format!("weight_map entry {bad:?}");
        reject!(
            &case,
            dir.path(),
            Error::InvalidConfig { field, .. } if field == "weight_map.model.norm.weight",
            ["model.safetensors.index.json", "model.norm.weight"]
        );
    }

    let dir = hf_copy("qwen3");
    let mut json = read_json(&index(&dir));
    json["weight_map"]["model.norm.weight"] = json!(7);
    write_json(&index(&dir), &json);
    reject!("weight_map entry a number", dir.path(), Error::InvalidConfig { field, .. } if field == "weight_map.model.norm.weight", ["model.safetensors.index.json"]);

    // A tensor stored twice (two shards) is ambiguous.
    let dir = hf_copy("qwen3");
    let first = dir.path().join("model-00001-of-00003.safetensors");
    edit_safetensors(&first, |t| {
        t.insert("model.norm.weight".into(), Tensor::ones(64, DType::F32, &Device::Cpu).unwrap());
    });
    reject!("tensor in two shards", dir.path(), Error::NotAModel { .. }, ["model.norm.weight"]);
}

#[test]
fn not_a_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    reject!("empty directory", dir.path(), Error::Io { path, .. } if path.ends_with("config.json"), ["config.json"]);

    let missing = dir.path().join("does-not-exist");
    reject!("path does not exist", missing, Error::NotAModel { .. }, ["does-not-exist"]);

    let text = dir.path().join("notes.txt");
    fs::write(&text, "this is not a model\n".repeat(10)).expect("write");
    reject!("text file as model", text, Error::MalformedGguf { .. }, ["notes.txt"]);

    let empty = dir.path().join("empty.gguf");
    fs::write(&empty, b"").expect("write");
    reject!("empty file", empty, Error::MalformedGguf { .. }, ["empty.gguf"]);

    let st = model_dir("qwen2").join("model.safetensors");
    reject!("safetensors file as model", st, Error::MalformedGguf { .. }, ["model.safetensors"]);

    let json = model_dir("qwen2").join("config.json");
    reject!("config.json as model", json, Error::MalformedGguf { .. }, ["config.json"]);
}

// ---------------------------------------------------------------------------------------------
// GGUF semantics

#[test]
fn gguf_architecture_and_metadata() {
    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.set("general.architecture", GgufValue::String("gpt2".into()));
    let (_d, path) = g.save();
    reject!("gguf arch gpt2", path, Error::UnsupportedArchitecture { arch, .. } if arch == "gpt2", ["model.gguf", "gpt2"]);

    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.remove("general.architecture");
    let (_d, path) = g.save();
    reject!("gguf without arch", path, Error::MissingConfigField { field, .. } if field == "general.architecture", ["model.gguf"]);

    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.set("general.architecture", GgufValue::U32(1));
    let (_d, path) = g.save();
    reject!("gguf arch not a string", path, Error::InvalidConfig { field, .. } if field == "general.architecture", ["model.gguf"]);

    // A llama file relabelled qwen3: its keys are under `llama.`, so `qwen3.*` are missing.
    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.set("general.architecture", GgufValue::String("qwen3".into()));
    let (_d, path) = g.save();
    reject!("gguf relabelled qwen3", path, Error::MissingConfigField { field, .. } if field.starts_with("qwen3."), ["model.gguf", "qwen3."]);

    for key in ["llama.block_count", "llama.embedding_length", "llama.attention.head_count", "llama.feed_forward_length"] {
        let mut g = Gguf::fixture("llama3", "model-f32.gguf");
        g.remove(key);
        let (_d, path) = g.save();
        let case = format!("gguf without {key}");
        reject!(&case, path, Error::MissingConfigField { field, .. } if field == key, ["model.gguf", key]);
    }

    let invalid: Vec<(&str, GgufValue, &str)> = vec![
        ("llama.block_count", GgufValue::String("2".into()), "llama.block_count"),
        ("llama.block_count", GgufValue::I32(-2), "llama.block_count"),
        ("llama.block_count", GgufValue::F32(2.0), "llama.block_count"),
        ("llama.block_count", GgufValue::U64(u64::MAX), "llama.block_count"),
        ("llama.block_count", GgufValue::U64(1_000_000_000_000), "llama.block_count"),
        ("llama.embedding_length", GgufValue::U64(1_000_000_000_000), "hidden_size"),
        ("llama.attention.head_count", GgufValue::U32(0), "llama.attention.head_count"),
        (
            "llama.attention.head_count",
            GgufValue::Array(vec![GgufValue::U32(4), GgufValue::U32(4)]),
            "llama.attention.head_count",
        ),
        ("llama.attention.head_count_kv", GgufValue::U32(3), "num_key_value_heads"),
        ("llama.attention.head_count_kv", GgufValue::U32(0), "num_key_value_heads"),
        ("llama.attention.key_length", GgufValue::U32(15), "head_dim"),
        ("llama.attention.key_length", GgufValue::U32(1 << 20), "head_dim"),
        ("llama.attention.layer_norm_rms_epsilon", GgufValue::String("1e-5".into()), "llama.attention.layer_norm_rms_epsilon"),
        ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(f32::NAN), "rms_norm_eps"),
        ("llama.rope.freq_base", GgufValue::F32(0.0), "rope_theta"),
        ("llama.rope.freq_base", GgufValue::F32(f32::INFINITY), "rope_theta"),
        ("llama.rope.dimension_count", GgufValue::U32(8), "llama.rope.dimension_count"),
        ("llama.context_length", GgufValue::U32(0), "max_position_embeddings"),
        ("llama.attention.sliding_window", GgufValue::U32(0), "sliding_window"),
        ("llama.vocab_size", GgufValue::I64(-400), "llama.vocab_size"),
        ("tokenizer.ggml.bos_token_id", GgufValue::U64(1 << 40), "tokenizer.ggml.bos_token_id"),
        ("tokenizer.ggml.eos_token_id", GgufValue::String("</s>".into()), "tokenizer.ggml.eos_token_id"),
    ];
    for (key, value, field) in invalid {
        let mut g = Gguf::fixture("llama3", "model-f32.gguf");
        let case = format!("gguf {key} = {value:?}");
        g.set(key, value);
        let (_d, path) = g.save();
        reject!(&case, path, Error::InvalidConfig { field: f, .. } if f == field, ["model.gguf", field]);
    }
}

#[test]
fn gguf_tensors_disagree_with_metadata() {
    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.remove_tensor("token_embd.weight");
    let (_d, path) = g.save();
    reject!("gguf without token_embd", path, Error::MissingTensor { name, .. } if name == "token_embd.weight", ["model.gguf", "token_embd.weight"]);

    // qwen2 files state no vocab_size: the config reads it from the embedding rows.
    let mut g = Gguf::fixture("qwen2", "model-q8_0.gguf");
    g.remove_tensor("token_embd.weight");
    let (_d, path) = g.save();
    reject!("qwen2 gguf without token_embd", path, Error::MissingTensor { name, .. } if name == "token_embd.weight", ["token_embd.weight"]);

    let mut g = Gguf::fixture("llama3", "model-q8_0.gguf");
    g.remove_tensor("blk.1.ffn_down.weight");
    let (_d, path) = g.save();
    reject!("gguf without blk.1.ffn_down", path, Error::MissingTensor { name, .. } if name == "blk.1.ffn_down.weight", ["blk.1.ffn_down.weight"]);

    let mut g = Gguf::fixture("qwen2", "model-f32.gguf");
    g.remove_tensor("blk.1.attn_q.bias");
    let (_d, path) = g.save();
    reject!("gguf bias only in layer 0", path, Error::MissingTensor { name, .. } if name == "blk.1.attn_q.bias", ["blk.1.attn_q.bias"]);

    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.set("llama.embedding_length", GgufValue::U32(32));
    let (_d, path) = g.save();
    reject!(
        "gguf embedding_length 32",
        path,
        Error::ShapeMismatch { name, expected, got, .. } if name == "token_embd.weight" && expected == &[400, 32] && got == &[400, 64],
        ["model.gguf", "token_embd.weight"]
    );

    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.set("llama.vocab_size", GgufValue::U32(300));
    let (_d, path) = g.save();
    reject!("gguf vocab_size 300", path, Error::ShapeMismatch { name, .. } if name == "token_embd.weight", ["token_embd.weight"]);

    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.set("llama.block_count", GgufValue::U32(3));
    let (_d, path) = g.save();
    reject!("gguf block_count 3", path, Error::MissingTensor { name, .. } if name.starts_with("blk.2."), ["blk.2."]);

    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    g.replace_tensor("blk.0.attn_k.weight", &[32, 64]);
    let (_d, path) = g.save();
    reject!(
        "gguf attn_k reshaped",
        path,
        Error::ShapeMismatch { name, expected, got, .. } if name == "blk.0.attn_k.weight" && expected == &[16, 64] && got == &[32, 64],
        ["blk.0.attn_k.weight"]
    );

    let mut g = Gguf::fixture("qwen3", "model-f32.gguf");
    g.replace_tensor("blk.1.attn_k_norm.weight", &[16]);
    let (_d, path) = g.save();
    reject!("gguf k_norm reshaped", path, Error::ShapeMismatch { name, .. } if name == "blk.1.attn_k_norm.weight", ["blk.1.attn_k_norm.weight"]);

    // llama.cpp bakes Llama 3 scaling into head_dim/2 frequency factors.
    for (shape, case) in [(vec![9], "rope_freqs 9 entries"), (vec![4], "rope_freqs 4 entries"), (vec![2, 8], "rope_freqs 2-D")] {
        let mut g = Gguf::fixture("llama3", "model-f32.gguf");
        g.replace_tensor("rope_freqs.weight", &shape);
        let (_d, path) = g.save();
        reject!(case, path, Error::InvalidConfig { field, .. } if field == "rope_freqs.weight", ["model.gguf", "rope_freqs.weight"]);
    }
    let mut g = Gguf::fixture("llama3", "model-f32.gguf");
    let zeros = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
    let slot = g.tensors.iter_mut().find(|(n, _)| n == "rope_freqs.weight").unwrap();
    slot.1 = QTensor::quantize(&zeros, GgmlDType::F32).unwrap();
    let (_d, path) = g.save();
    reject!("rope_freqs zeros", path, Error::InvalidConfig { field, .. } if field == "rope_freqs.weight", ["rope_freqs"]);
}

#[test]
fn gguf_truncated() {
    let bytes = fs::read(model_dir("llama3").join("model-q8_0.gguf")).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    for (len, case) in [(bytes.len() / 2, "cut in tensor data"), (bytes.len() - 1, "one byte short"), (40, "cut in metadata")] {
        let path = dir.path().join(format!("cut-{len}.gguf"));
        fs::write(&path, &bytes[..len]).expect("write");
        reject!(case, path, Error::MalformedGguf { .. }, [format!("cut-{len}.gguf").as_str()]);
    }
}

#[test]
fn gguf_tokenizer_metadata() {
    let mut g = Gguf::fixture("qwen2", "model-f32.gguf");
    g.remove("tokenizer.ggml.model");
    let (_d, path) = g.save();
    reject!("gguf without tokenizer model", path, Error::GgufTokenizer { .. }, ["model.gguf", "tokenizer.ggml.model"]);

    let mut g = Gguf::fixture("qwen2", "model-f32.gguf");
    g.remove("tokenizer.ggml.tokens");
    let (_d, path) = g.save();
    reject!("gguf without tokens", path, Error::GgufTokenizer { .. }, ["model.gguf", "tokenizer.ggml.tokens"]);

    let mut g = Gguf::fixture("llama2", "model-f32.gguf");
    g.set("tokenizer.ggml.model", GgufValue::String("bert".into()));
    let (_d, path) = g.save();
    reject!("gguf tokenizer bert", path, Error::GgufTokenizer { .. }, ["model.gguf", "bert"]);

    let mut g = Gguf::fixture("qwen2", "model-f32.gguf");
    g.set("tokenizer.ggml.model", GgufValue::U32(2));
    let (_d, path) = g.save();
    reject!("gguf tokenizer model not a string", path, Error::GgufTokenizer { .. }, ["tokenizer.ggml.model"]);

    // More tokens than embedding rows: ids past the table would be generated.
    let mut g = Gguf::fixture("qwen2", "model-f32.gguf");
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"] {
        let GgufValue::Array(mut items) = g.get(key).clone() else { panic!("{key} is not an array") };
        let extra = match items.last() {
            Some(GgufValue::String(_)) => GgufValue::String("<extra_token>".into()),
            Some(other) => other.clone(),
            None => panic!("{key} is empty"),
        };
        items.push(extra);
        g.set(key, GgufValue::Array(items));
    }
    assert_eq!(gguf_array_len(g.get("tokenizer.ggml.tokens")), 401);
    let (_d, path) = g.save();
    reject!("gguf tokenizer larger than embedding", path, Error::InvalidConfig { field, .. } if field == "vocab_size", ["model.gguf", "401", "400"]);
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json beside the weights, and the --tokenizer override

#[test]
fn tokenizer_files() {
    let dir = hf_copy("qwen2");
    fs::write(dir.path().join("tokenizer.json"), "{\"model\": ").expect("write");
    reject!("tokenizer.json not JSON", dir.path(), Error::Tokenizer { path, .. } if path.ends_with("tokenizer.json"), ["tokenizer.json"]);

    let dir = hf_copy("qwen2");
    fs::write(dir.path().join("tokenizer.json"), "{\"hello\": [1, 2, 3]}").expect("write");
    reject!("tokenizer.json not a tokenizer", dir.path(), Error::Tokenizer { .. }, ["tokenizer.json"]);

    let dir = hf_copy("qwen2");
    fs::write(dir.path().join("tokenizer.json"), [0u8; 64]).expect("write");
    reject!("tokenizer.json binary", dir.path(), Error::Tokenizer { .. }, ["tokenizer.json"]);

    let dir = hf_copy("qwen2");
    fs::write(dir.path().join("tokenizer_config.json"), "{").expect("write");
    reject!("tokenizer_config.json not JSON", dir.path(), Error::Json { path, .. } if path.ends_with("tokenizer_config.json"), ["tokenizer_config.json"]);

    // More tokens than embedding rows.
    let dir = hf_copy("qwen2");
    let path = dir.path().join("tokenizer.json");
    let mut tok = read_json(&path);
    tok["added_tokens"].as_array_mut().expect("added_tokens").push(json!({
        "id": 450, "content": "<|way_out|>", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    }));
    write_json(&path, &tok);
    reject!("tokenizer.json larger than embedding", dir.path(), Error::InvalidConfig { field, .. } if field == "vocab_size", ["vocab_size", "400"]);

    // Same token count, but a vocabulary entry renumbered past the embedding table (ids need not
    // be contiguous in a BPE `model.vocab`).
    let dir = hf_copy("qwen2");
    let path = dir.path().join("tokenizer.json");
    let mut tok = read_json(&path);
    let vocab = tok["model"]["vocab"].as_object_mut().expect("model.vocab");
    let last = vocab.values_mut().find(|id| id.as_u64() == Some(396)).expect("a token with id 396");
    *last = json!(450);
    write_json(&path, &tok);
    reject!("tokenizer.json vocab id 450", dir.path(), Error::InvalidConfig { field, .. } if field == "vocab_size", ["vocab_size", "451", "400"]);

    let dir = hf_copy("qwen2");
    let opts = LoadOptions {
        tokenizer: Some(dir.path().join("no-such-tokenizer.json")),
        ..cpu()
    };
    reject!("--tokenizer missing (dir)", dir.path(), &opts, Error::Tokenizer { .. }, ["no-such-tokenizer.json"]);
    reject!("--tokenizer missing (gguf)", model_dir("qwen2").join("model-q8_0.gguf"), &opts, Error::Tokenizer { .. }, ["no-such-tokenizer.json"]);

    let bad = dir.path().join("config.json");
    let opts = LoadOptions {
        tokenizer: Some(bad),
        ..cpu()
    };
    reject!("--tokenizer is a config.json", model_dir("qwen2").join("model-q8_0.gguf"), &opts, Error::Tokenizer { .. }, ["config.json"]);

    // A tokenizer from another model with a larger vocabulary (llama2: 512 > qwen2: 400).
    let opts = LoadOptions {
        tokenizer: Some(model_dir("llama2").join("tokenizer.json")),
        ..cpu()
    };
    reject!("--tokenizer larger vocabulary", dir.path(), &opts, Error::InvalidConfig { field, .. } if field == "vocab_size", ["vocab_size"]);
}

// ---------------------------------------------------------------------------------------------
// forward on a loaded model: bad ids and context overflow are errors, and leave the cache usable

fn forward_case(
    case: &str,
    model: &metal_candle::Model,
    cache: &mut metal_candle::KvCache,
    ids: &Tensor,
) -> metal_candle::Result<Tensor> {
    match catch_unwind(AssertUnwindSafe(|| model.forward(ids, cache, Logits::Last))) {
        Ok(r) => r,
        Err(p) => panic!("case `{case}`: forward panicked: {}", panic_message(p.as_ref())),
    }
}

#[test]
fn forward_rejects_bad_ids_and_overflow() {
    let sources = [
        ("qwen2 dir", model_dir("qwen2")),
        ("mistral dir", model_dir("mistral")),
        ("llama3 q8_0", model_dir("llama3").join("model-q8_0.gguf")),
    ];
    for (name, path) in sources {
        let opts = LoadOptions {
            max_positions: 16,
            ..cpu()
        };
        let model = try_load(name, &path, &opts).unwrap_or_else(|e| panic!("{name}: {e}")).model;
        let vocab = model.config().vocab_size as u32;
        let dev = model.device().clone();
        let mut cache = model.new_cache();
        let ok = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
        forward_case(name, &model, &mut cache, &ok).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cache.seq_len(), 3);

        let cases: Vec<(String, Tensor)> = vec![
            (format!("{name}: id = vocab"), Tensor::new(&[[1u32, vocab]], &dev).unwrap()),
            (format!("{name}: id = u32::MAX"), Tensor::new(&[[u32::MAX]], &dev).unwrap()),
            (format!("{name}: i64 ids"), Tensor::new(&[[1i64, 2]], &dev).unwrap()),
            (format!("{name}: f32 ids"), Tensor::new(&[[1f32]], &dev).unwrap()),
            (format!("{name}: no tokens"), Tensor::zeros((1, 0), DType::U32, &dev).unwrap()),
            (format!("{name}: no batch"), Tensor::zeros((0, 2), DType::U32, &dev).unwrap()),
        ];
        for (case, ids) in &cases {
            let err = forward_case(case, &model, &mut cache, ids).err().unwrap_or_else(|| panic!("case `{case}`: accepted"));
            assert!(matches!(err, Error::InvalidParameter { name: "ids", .. }), "case `{case}`: {err:?}");
            assert_eq!(cache.seq_len(), 3, "case `{case}`: the cache changed");
        }
        let one_d = Tensor::new(&[1u32, 2], &dev).unwrap();
        let err = forward_case("1-D ids", &model, &mut cache, &one_d).expect_err("1-D ids accepted");
        assert!(matches!(err, Error::Candle(_)), "1-D ids: {err:?}");

        // 3 cached + 14 = 17 > 16.
        let long = Tensor::from_vec(vec![1u32; 14], (1, 14), &dev).unwrap();
        let case = format!("{name}: context overflow");
        let err = forward_case(&case, &model, &mut cache, &long).expect_err("overflow accepted");
        assert!(
            matches!(err, Error::ContextOverflow { prompt_tokens: 17, context: 16 }),
            "case `{case}`: {err:?}"
        );
        assert_eq!(cache.seq_len(), 3, "case `{case}`: the cache changed");
        // Exactly up to the limit still works, then one more token overflows.
        let fill = Tensor::from_vec(vec![1u32; 13], (1, 13), &dev).unwrap();
        forward_case(&case, &model, &mut cache, &fill).unwrap_or_else(|e| panic!("{case}: filling to the limit: {e}"));
        assert_eq!(cache.seq_len(), 16);
        let one = Tensor::new(&[[1u32]], &dev).unwrap();
        let err = forward_case(&case, &model, &mut cache, &one).expect_err("overflow by one accepted");
        assert!(matches!(err, Error::ContextOverflow { prompt_tokens: 17, context: 16 }), "case `{case}`: {err:?}");

        // The model's own limit bounds the caller's max_positions (fixtures: 128).
        let huge = LoadOptions {
            max_positions: usize::MAX,
            ..cpu()
        };
        let model = try_load(name, &path, &huge).unwrap_or_else(|e| panic!("{name}: {e}")).model;
        assert_eq!(model.max_positions(), 128, "{name}");
        let mut cache = model.new_cache();
        let past = Tensor::from_vec(vec![1u32; 129], (1, 129), &dev).unwrap();
        let err = forward_case(&case, &model, &mut cache, &past).expect_err("past max_position_embeddings accepted");
        assert!(matches!(err, Error::ContextOverflow { prompt_tokens: 129, context: 128 }), "{name}: {err:?}");
    }
}
