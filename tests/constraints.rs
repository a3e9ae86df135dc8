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

/// Two functions with bounded arguments (enums), so even a random-weight model finishes a call.
fn weather_tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city"], "additionalProperties": false}}}),
        json!({"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": false}}}),
    ]
}

/// `weather_tools`' parameter schemas, checked by hand on a parsed call.
fn validate_weather_call(call: &metal_candle::chat::ToolCall) -> Result<(), String> {
    let args = call.function.arguments.as_object().ok_or("arguments: not an object")?;
    match call.function.name.as_str() {
        "get_weather" => {
            let city = args.get("city").and_then(Value::as_str).ok_or("city missing")?;
            if !["Paris", "Rome"].contains(&city) {
                return Err(format!("city {city}"));
            }
            if let Some(d) = args.get("days") {
                if !d.as_i64().is_some_and(|d| (1..=7).contains(&d)) {
                    return Err(format!("days {d}"));
                }
            }
            if args.keys().any(|k| k != "city" && k != "days") {
                return Err(format!("extra keys {args:?}"));
            }
        }
        "get_time" => {
            if args.len() != 1 || !args.get("tz").and_then(Value::as_str).is_some_and(|t| t == "UTC" || t == "CET") {
                return Err(format!("tz {args:?}"));
            }
        }
        other => return Err(format!("unknown function {other}")),
    }
    Ok(())
}

/// `tool_choice` `required` and a named function, in each model family's call syntax, on a
/// random-weight fixture (only the grammar makes a call): the reply parses, with that family's
/// own parser, as exactly one call of an allowed function whose arguments follow its schema.
#[test]
fn forced_tool_calls_parse_in_every_format_and_follow_the_schema() {
    use metal_candle::chat::tools::{call_constraint, random_call_id, ToolChoice};
    use metal_candle::chat::ToolCallFormat;
    // The fixture with 1024 positions: its 400-token vocabulary spells a call in ~80 tokens.
    let dir = tempfile::tempdir().unwrap();
    let src = common::model_dir("qwen2");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(1024);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let g = Generator::from_loaded(&common::load_cpu(dir.path())).unwrap();
    let tools = weather_tools();
    let prompt = Prompt::Chat(vec![Message::user("What is the weather in Paris?")]);
    for format in [ToolCallFormat::Hermes, ToolCallFormat::Llama3Json, ToolCallFormat::MistralToolCalls, ToolCallFormat::Generic] {
        for choice in [ToolChoice::Required, ToolChoice::Function("get_time".into())] {
            for seed in 0..3 {
                let c = call_constraint(format, &tools, &choice, false).unwrap().unwrap();
                let out = g.generate(prompt.clone(), &params(c, seed, 400)).unwrap();
                let what = format!("{format:?} {choice:?} seed {seed}: {:?}", out.text);
                assert_ne!(out.finished.reason, FinishReason::Length, "{what}");
                let parsed = format.parse(&out.text, &mut random_call_id);
                assert_eq!(parsed.tool_calls.len(), 1, "{what}");
                let call = &parsed.tool_calls[0];
                validate_weather_call(call).unwrap_or_else(|e| panic!("{what}: {e}"));
                if let ToolChoice::Function(name) = &choice {
                    assert_eq!(&call.function.name, name, "{what}");
                }
            }
        }
    }
}

/// The issue's proof on the real SmolLM2 (whose template knows no tools: the generic format):
/// a `required` call parses and follows the parameter schema for 5 seeds, sampled at 0.9; with
/// `auto` every reply that ends by itself is a call or a response, never raw JSON.
#[test]
fn smollm2_generic_tool_calls_follow_the_schema() {
    use metal_candle::chat::tools::{call_constraint, random_call_id, ToolChoice};
    use metal_candle::chat::ToolCallFormat;
    let Some(path) = common::smollm2_path() else { return };
    let g = Generator::from_loaded(&common::load_cpu(&path)).unwrap();
    assert_eq!(g.tool_call_format().unwrap(), ToolCallFormat::Generic);
    let tools = weather_tools();
    let prompt = Prompt::ChatWithTools { messages: vec![Message::user("What's the weather like in Rome this week?")], tools: tools.clone() };
    for seed in 0..5 {
        let c = call_constraint(ToolCallFormat::Generic, &tools, &ToolChoice::Required, true).unwrap().unwrap();
        let out = g.generate(prompt.clone(), &params(c, seed, 120)).unwrap();
        assert_ne!(out.finished.reason, FinishReason::Length, "seed {seed}: {}", out.text);
        let parsed = ToolCallFormat::Generic.parse(&out.text, &mut random_call_id);
        assert!(!parsed.tool_calls.is_empty(), "seed {seed}: {}", out.text);
        for call in &parsed.tool_calls {
            validate_weather_call(call).unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", out.text));
        }
    }
    for seed in 0..3 {
        let c = call_constraint(ToolCallFormat::Generic, &tools, &ToolChoice::Auto, false).unwrap().unwrap();
        let out = g.generate(prompt.clone(), &params(c, seed, 200)).unwrap();
        if out.finished.reason != FinishReason::Length {
            let parsed = ToolCallFormat::Generic.parse(&out.text, &mut random_call_id);
            assert!(parsed.tool_calls.len() == 1 || parsed.content != out.text, "seed {seed}: {}", out.text);
        }
    }
}

/// `ConstraintMatcher` by hand (its next mask is computed on a worker thread after each accept):
/// masking a step twice gives the same mask, a forbidden id is a typed error and leaves the
/// matcher usable, the output matches the regex (checked with the `regex` crate), once complete
/// only end of sequence is allowed and another id is an error; many matchers dropped mid-grammar
/// end their workers without hanging.
#[test]
fn constraint_matcher_by_hand_keeps_its_step_order() {
    use metal_candle::generation::ConstraintMatcher;
    let loaded = common::load_cpu(&common::model_dir("qwen2"));
    let tok = loaded.tokenizer.unwrap();
    let vocab = tok.vocab_size();
    let eos = vocab as u32 - 1;
    let c = Constraint::Regex("(ab|cd)[0-9]".into());
    let mut m = ConstraintMatcher::new(&tok, vocab, eos, &c).unwrap();
    let allowed = |m: &mut ConstraintMatcher| {
        let mut row = vec![0.0f32; vocab];
        m.mask(&mut row).unwrap();
        row.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, _)| i as u32).collect::<Vec<u32>>()
    };
    let mut text = Vec::new();
    for step in 0..16 {
        let first = allowed(&mut m);
        assert_eq!(allowed(&mut m), first, "step {step}: the same step masks the same way");
        assert!(!first.is_empty(), "step {step}: nothing allowed");
        if m.is_stopped() {
            assert_eq!(first, vec![eos], "a complete grammar allows only end of sequence");
            break;
        }
        if let Some(bad) = (0..vocab as u32).find(|id| !first.contains(id)) {
            let err = m.accept(bad).unwrap_err();
            assert!(matches!(err, Error::Constraint { .. }), "{err}");
            assert_eq!(allowed(&mut m), first, "a rejected id leaves the step as it was");
        }
        let id = *first.iter().find(|&&id| id != eos).unwrap_or_else(|| panic!("step {step}: only eos before completion"));
        m.accept(id).unwrap();
        text.push(id);
    }
    assert!(m.is_stopped(), "the grammar completes within 16 tokens: {:?}", tok.decode(&text, false));
    let out = tok.decode(&text, false).unwrap();
    assert!(regex::Regex::new(r"^(ab|cd)[0-9]$").unwrap().is_match(&out), "{out:?}");
    assert!(matches!(m.accept(text[0]), Err(Error::Constraint { .. })), "an id after completion is an error");
    for _ in 0..64 {
        let mut m = ConstraintMatcher::new(&tok, vocab, eos, &Constraint::Json).unwrap();
        let mut row = vec![0.0f32; vocab];
        m.mask(&mut row).unwrap();
        let id = row.iter().position(|l| l.is_finite()).unwrap() as u32;
        m.accept(id).unwrap();
    }
}
