//! Constrained decoding (`GenerateParams::constraint`, llguidance): the output matches its
//! grammar — checked here by an independent parser/validator (serde_json + the schema's rules
//! written out, the `regex` crate), never by the grammar engine itself — on the real SmolLM2 and
//! on the fixtures, alone and in mixed engine batches; bad grammars are typed errors before any
//! token.

mod common;

use metal_candle::chat::Message;
use metal_candle::engine::{Engine, EngineConfig};
use metal_candle::generation::{Constraint, FinishReason, GenerateParams, Generator, Prompt};
use metal_candle::sampling::SamplingParams;
use metal_candle::Error;
use serde_json::{json, Value};

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    })
}

/// `person_schema`'s rules, checked by hand on the parsed value.
fn validate_person(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    for k in o.keys() {
        if !["name", "age", "city", "tags"].contains(&k.as_str()) {
            return Err(format!("unexpected key {k}"));
        }
    }
    let name = o.get("name").and_then(Value::as_str).ok_or("name: not a string")?;
    if name.is_empty() || name.chars().count() > 40 {
        return Err(format!("name: length {}", name.chars().count()));
    }
    let age = o.get("age").and_then(Value::as_i64).ok_or("age: not an integer")?;
    if !(0..=150).contains(&age) {
        return Err(format!("age {age} out of range"));
    }
    let city = o.get("city").and_then(Value::as_str).ok_or("city: not a string")?;
    if !["Paris", "Rome", "Berlin"].contains(&city) {
        return Err(format!("city {city}"));
    }
    if let Some(tags) = o.get("tags") {
        let tags = tags.as_array().ok_or("tags: not an array")?;
        if tags.len() > 3 || !tags.iter().all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 24)) {
            return Err(format!("tags {tags:?}"));
        }
    }
    Ok(())
}

fn params(constraint: Constraint, seed: u64, max_tokens: usize) -> GenerateParams {
    GenerateParams {
        sampling: SamplingParams { temperature: 0.9, seed, ..SamplingParams::default() },
        max_tokens,
        constraint: Some(constraint),
        ..GenerateParams::default()
    }
}

/// The issue's proof: SmolLM2's output under a JSON Schema parses and validates for 20 seeds,
/// sampled at temperature 0.9 (so the grammar, not the model, keeps it valid).
#[test]
fn smollm2_json_schema_output_validates_for_20_seeds() {
    let Some(path) = common::smollm2_path() else { return };
    let g = Generator::from_loaded(&common::load_cpu(&path)).unwrap();
    let prompt = Prompt::Chat(vec![Message::user("Describe a fictional person.")]);
    for seed in 0..20 {
        let out = g.generate(prompt.clone(), &params(Constraint::JsonSchema(person_schema()), seed, 160)).unwrap();
        assert_ne!(out.finished.reason, FinishReason::Length, "seed {seed}: the object did not close within 160 tokens: {}", out.text);
        let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", out.text));
        validate_person(&v).unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", out.text));
    }
    // `Json`: any JSON object. Free strings may run to the token limit (then the text is cut, as
    // OpenAI's `finish_reason: "length"` says); every reply that ended by itself parses.
    let mut ended = 0;
    for seed in 0..5 {
        let out = g.generate(prompt.clone(), &params(Constraint::Json, seed, 120)).unwrap();
        if out.finished.reason != FinishReason::Length {
            ended += 1;
            assert!(serde_json::from_str::<Value>(&out.text).unwrap_or_else(|e| panic!("{e}: {}", out.text)).is_object(), "{}", out.text);
        }
    }
    assert!(ended > 0, "no free-JSON reply ended within 120 tokens");
}

/// Regexes and a Lark grammar on the fixture models (random weights: only the grammar makes the
/// output well-formed), through the generator and through one engine batch whose rows follow
/// different grammars (and one row none), each equal to its solo run.
#[test]
fn regex_and_lark_rows_in_one_batch_match_their_grammars() {
    let g = Generator::from_loaded(&common::load_cpu(&common::model_dir("qwen2"))).unwrap();
    let cases = [
        (Constraint::Regex(r"[0-9]{3}-[a-z]{2,4}".into()), r"^[0-9]{3}-[a-z]{2,4}$"),
        (Constraint::Regex(r"(yes|no)\.".into()), r"^(yes|no)\.$"),
        (Constraint::Lark("start: \"(\" num (\",\" num)* \")\"\nnum: /[1-9][0-9]?/".into()), r"^\([1-9][0-9]?(,[1-9][0-9]?)*\)$"),
    ];
    let prompt: Vec<u32> = (1..9).collect();
    let solo: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, (c, re))| {
            let out = g.generate(prompt.clone(), &params(c.clone(), i as u64, 30)).unwrap();
            assert!(regex::Regex::new(re).unwrap().is_match(&out.text), "{c:?}: {:?}", out.text);
            out.text
        })
        .collect();
    let free = g.generate(prompt.clone(), &GenerateParams { max_tokens: 12, ..GenerateParams::default() }).unwrap().text;
    let engine = Engine::new(g, EngineConfig { max_sequences: 4, ..EngineConfig::default() }).unwrap();
    let mut handles: Vec<_> = cases.iter().enumerate().map(|(i, (c, _))| engine.submit(prompt.clone(), &params(c.clone(), i as u64, 30)).unwrap()).collect();
    handles.push(engine.submit(prompt.clone(), &GenerateParams { max_tokens: 12, ..GenerateParams::default() }).unwrap());
    let texts: Vec<String> = handles.into_iter().map(|h| h.collect_generation().unwrap().text).collect();
    assert_eq!(texts[..3], solo[..], "constrained rows in a batch equal their solo runs");
    assert_eq!(texts[3], free, "the unconstrained row is untouched");
}

#[test]
fn bad_grammars_are_typed_errors_before_any_token() {
    let g = Generator::from_loaded(&common::load_cpu(&common::model_dir("qwen2"))).unwrap();
    for c in [
        Constraint::Regex("([a-".into()),
        Constraint::Lark("start: undefined_rule".into()),
        Constraint::JsonSchema(json!({"type": "no-such-type"})),
        Constraint::JsonSchema(json!({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]})),
    ] {
        let err = g.stream(vec![1u32, 2, 3], &params(c.clone(), 0, 5)).err().map(|e| e.to_string()).or_else(|| {
            // Errors surface when the stream is created or at its first step; never a token.
            let mut s = g.stream(vec![1u32, 2, 3], &params(c.clone(), 0, 5)).unwrap();
            s.next().and_then(|e| e.err()).map(|e| e.to_string())
        });
        let err = err.unwrap_or_else(|| panic!("{c:?} was accepted"));
        assert!(err.contains("invalid parameter `constraint`"), "{c:?}: {err}");
    }
    let engine = Engine::new(g, EngineConfig::default()).unwrap();
    let Err(err) = engine.submit(vec![1u32, 2], &params(Constraint::Regex("(".into()), 0, 5)) else { panic!("accepted") };
    assert!(matches!(err, Error::InvalidParameter { name: "constraint", .. }), "{err}");
}
