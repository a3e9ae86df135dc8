//! The generation engine on the tiny fixture models and real tokenizers: streamed text equals the
//! one-shot decode (random token sequences over byte-level BPE and byte-fallback SentencePiece
//! vocabularies), stop strings, EOS, max tokens, context limits, cancellation, logprobs, seeds,
//! vocabulary masking and KV reuse across chat turns.

mod common;

use metal_candle::chat::{ChatSession, Message};
use metal_candle::generation::{Event, FinishReason, GenerateParams, Generation, Generator, Prompt, StreamDecoder};
use metal_candle::sampling::SamplingParams;
use metal_candle::{load_model, DeviceChoice, Error, LoadOptions, Tokenizer};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_file(&common::model_dir(name).join("tokenizer.json")).unwrap()
}

/// Streams `ids` through a [`StreamDecoder`]; returns the deltas and the final flush.
fn stream_decode(tok: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
    let mut d = StreamDecoder::new();
    let deltas = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
    (deltas, d.finish(tok).unwrap())
}

fn assert_stream_equals_decode(tok: &Tokenizer, ids: &[u32]) {
    let (deltas, tail) = stream_decode(tok, ids);
    let joined = deltas.concat() + &tail;
    assert_eq!(joined, tok.decode(ids, true).unwrap(), "ids {ids:?}");
}

/// Random sequences biased towards byte tokens and multi-byte characters.
fn random_sequences(tok: &Tokenizer, seed: u64, n: usize) -> Vec<Vec<u32>> {
    let vocab = tok.vocab_size() as u32;
    let pieces: Vec<Vec<u32>> = ["€", "日本語", "😀👍🏽", "naïve", " 中", "\n\t  ", "ab"]
        .iter()
        .map(|s| tok.encode(s, false).unwrap())
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut ids = Vec::new();
            for _ in 0..rng.random_range(1..24) {
                match rng.random_range(0..3) {
                    0 => ids.push(rng.random_range(0..vocab)),
                    1 => ids.extend(&pieces[rng.random_range(0..pieces.len())]),
                    // A piece cut short: an incomplete character mid-stream.
                    _ => {
                        let p = &pieces[rng.random_range(0..pieces.len())];
                        ids.extend(&p[..rng.random_range(0..=p.len())]);
                    }
                }
            }
            ids
        })
        .collect()
}

#[test]
fn streamed_text_equals_one_shot_decode_byte_level_bpe() {
    let tok = tokenizer("qwen2");
    for ids in random_sequences(&tok, 1, 1500) {
        assert_stream_equals_decode(&tok, &ids);
    }
}

#[test]
fn streamed_text_equals_one_shot_decode_smollm2_bpe() {
    let Some(path) = common::smollm2_path() else { return };
    let loaded = common::load_cpu(&path);
    let tok = loaded.tokenizer.as_ref().unwrap();
    for ids in random_sequences(tok, 2, 1500) {
        assert_stream_equals_decode(tok, &ids);
    }
}

#[test]
fn streamed_text_equals_one_shot_decode_byte_fallback_spm() {
    let tok = tokenizer("llama2");
    assert!(tok.encode("€", false).unwrap().len() >= 3, "the euro sign should need byte-fallback tokens");
    for ids in random_sequences(&tok, 3, 1500) {
        assert_stream_equals_decode(&tok, &ids);
    }
}

#[test]
fn multibyte_characters_arrive_once_and_whole() {
    for name in ["qwen2", "llama2"] {
        let tok = tokenizer(name);
        let text = "Prix: 5€, 日本語 😀!";
        let ids = tok.encode(text, false).unwrap();
        let (deltas, tail) = stream_decode(&tok, &ids);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{name}: {deltas:?}");
        assert!(deltas.iter().any(|d| d.contains('€')), "{name}: {deltas:?}");
        assert_eq!(deltas.concat() + &tail, tok.decode(&ids, true).unwrap());
    }
}

#[test]
fn an_incomplete_tail_is_flushed_as_the_decode_renders_it() {
    let tok = tokenizer("llama2");
    let euro = tok.encode("€", false).unwrap();
    let cut = &euro[euro.len() - 3..euro.len() - 1]; // two of the three bytes
    let (deltas, tail) = stream_decode(&tok, cut);
    assert!(deltas.concat().is_empty());
    assert_eq!(tail, tok.decode(cut, true).unwrap());
    assert!(tail.contains('\u{FFFD}'));
}

fn qwen2() -> Generator {
    Generator::from_loaded(&common::load_cpu(&common::model_dir("qwen2"))).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams { max_tokens, ignore_eos: true, ..GenerateParams::default() }
}

/// Text joined from the events, the ids, and the final event.
fn run_stream(g: &Generator, prompt: impl Into<Prompt>, params: &GenerateParams) -> Generation {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    for event in g.stream(prompt, params).unwrap() {
        match event.unwrap() {
            Event::Token { id, text: t, .. } => {
                text.push_str(&t);
                tokens.push(id);
            }
            Event::Finished(finished) => {
                text.push_str(&finished.text);
                return Generation { text, tokens, finished };
            }
        }
    }
    panic!("no final event");
}

#[test]
fn stream_generate_and_decode_agree() {
    let g = qwen2();
    let params = greedy(24);
    let streamed = run_stream(&g, "Hello", &params);
    let whole = g.generate("Hello", &params).unwrap();
    assert_eq!(streamed.tokens, whole.tokens);
    assert_eq!(streamed.text, whole.text);
    assert_eq!(whole.text, g.tokenizer().decode(&whole.tokens, true).unwrap());
    assert_eq!(whole.finished.reason, FinishReason::Length);
    let t = whole.finished.timings;
    assert_eq!((t.generated_tokens, t.prompt_tokens), (24, g.tokenizer().encode("Hello", true).unwrap().len()));
    assert!(t.ttft > std::time::Duration::ZERO && t.decode_tokens_per_s > 0.0 && t.prefill_tokens_per_s > 0.0);
    // Token ids and text prompts are interchangeable.
    let ids = g.tokenizer().encode("Hello", true).unwrap();
    assert_eq!(g.generate(ids, &params).unwrap().tokens, whole.tokens);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let g = qwen2();
    let sampled = |seed| {
        let sampling = SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.95, min_p: 0.01, repetition_penalty: 1.1, presence_penalty: 0.1, frequency_penalty: 0.1, seed, ..SamplingParams::default() };
        g.generate("Once upon", &GenerateParams { sampling, ..greedy(20) }).unwrap().tokens
    };
    assert_eq!(sampled(5), sampled(5));
    assert_ne!(sampled(5), sampled(6));
}

#[test]
fn eos_ids_end_generation_unless_ignored() {
    let g = qwen2();
    let first = g.generate("Hello", &greedy(1)).unwrap().tokens[0];
    let params = GenerateParams { eos_token_ids: vec![first], max_tokens: 5, ..GenerateParams::default() };
    let out = g.generate("Hello", &params).unwrap();
    assert_eq!((out.finished.reason, out.tokens.len(), out.finished.timings.generated_tokens), (FinishReason::Eos, 0, 1));
    let ignored = g.generate("Hello", &GenerateParams { ignore_eos: true, ..params }).unwrap();
    assert_eq!((ignored.finished.reason, ignored.tokens[0]), (FinishReason::Length, first));
}

#[test]
fn stop_strings_spanning_tokens_are_never_emitted() {
    let g = qwen2();
    let free = g.generate("Hello", &greedy(40)).unwrap();
    let chars: Vec<(usize, char)> = free.text.char_indices().collect();
    assert!(chars.len() > 12, "need some text: {:?}", free.text);
    // A stop string from the middle of the text, spanning several tokens.
    let (start, end) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 5].0);
    let stop = free.text[start..end].to_string();
    let first = free.text.find(&stop).unwrap();
    let params = GenerateParams { stop: vec![stop.clone(), "never-appears".into()], ..greedy(40) };
    let out = run_stream(&g, "Hello", &params);
    assert_eq!(out.finished.reason, FinishReason::Stop);
    assert_eq!(out.text, free.text[..first], "stop {stop:?}");
    assert!(!out.text.contains(&stop));
}

#[test]
fn context_limits() {
    let opts = LoadOptions { device: DeviceChoice::Cpu, max_positions: 16, ..LoadOptions::default() };
    let g = Generator::from_loaded(&load_model(&common::model_dir("qwen2"), &opts).unwrap()).unwrap();
    match g.stream(vec![1u32; 16], &greedy(4)) {
        Err(Error::ContextOverflow { prompt_tokens: 16, context: 16 }) => {}
        other => panic!("expected ContextOverflow, got {:?}", other.err()),
    }
    // context − 1 leaves room for exactly one token.
    let out = g.generate(vec![1u32; 15], &greedy(4)).unwrap();
    assert_eq!((out.tokens.len(), out.finished.reason), (1, FinishReason::Length));
}

#[test]
fn invalid_parameters_are_named() {
    let g = qwen2();
    let cases: Vec<(&str, GenerateParams)> = vec![
        ("max_tokens", GenerateParams { max_tokens: 0, ..greedy(1) }),
        ("stop", GenerateParams { stop: vec![String::new()], ..greedy(1) }),
        ("temperature", GenerateParams { sampling: SamplingParams { temperature: -1.0, ..Default::default() }, ..greedy(1) }),
        ("top_p", GenerateParams { sampling: SamplingParams { top_p: 0.0, ..Default::default() }, ..greedy(1) }),
        ("top_k", GenerateParams { sampling: SamplingParams { top_k: -3, ..Default::default() }, ..greedy(1) }),
        ("logit_bias", GenerateParams { sampling: SamplingParams { logit_bias: vec![(400, 1.0)], ..Default::default() }, ..greedy(1) }),
        ("logprobs", GenerateParams { logprobs: Some(1000), ..greedy(1) }),
    ];
    for (name, params) in cases {
        match g.stream("Hi", &params) {
            Err(Error::InvalidParameter { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{name}: expected InvalidParameter, got {:?}", other.err()),
        }
    }
    assert!(matches!(g.stream(vec![999u32], &greedy(1)), Err(Error::InvalidParameter { name: "prompt", .. })));
    assert!(matches!(g.stream(Vec::<u32>::new(), &greedy(1)), Err(Error::InvalidParameter { name: "prompt", .. })));
}

#[test]
fn cancellation_stops_before_the_next_token() {
    let g = qwen2();
    let mut stream = g.stream("Hello", &greedy(50)).unwrap();
    let cancel = stream.cancel_handle();
    for _ in 0..2 {
        assert!(matches!(stream.next(), Some(Ok(Event::Token { .. }))));
    }
    cancel.cancel();
    match stream.next() {
        Some(Ok(Event::Finished(f))) => assert_eq!((f.reason, f.timings.generated_tokens), (FinishReason::Cancelled, 2)),
        other => panic!("{other:?}"),
    }
    assert!(stream.next().is_none());
}

#[test]
fn logprobs_report_the_chosen_token_and_alternatives() {
    let g = qwen2();
    let params = GenerateParams { logprobs: Some(3), ..greedy(4) };
    for event in g.stream("Hello", &params).unwrap() {
        if let Event::Token { id, logprobs, .. } = event.unwrap() {
            let lp = logprobs.unwrap();
            assert_eq!(lp.top.len(), 3);
            assert_eq!(lp.top[0].0, id, "greedy picks the most likely token");
            assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
}

#[test]
fn ids_past_the_tokenizer_vocabulary_are_never_sampled() {
    // Mistral's fixture has 512 embedding rows; qwen2's tokenizer knows 400 ids.
    let opts = LoadOptions {
        device: DeviceChoice::Cpu,
        tokenizer: Some(common::model_dir("qwen2").join("tokenizer.json")),
        ..LoadOptions::default()
    };
    let Ok(loaded) = load_model(&common::model_dir("mistral"), &opts) else {
        eprintln!("SKIPPED: the loader refuses a tokenizer smaller than the embedding");
        return;
    };
    let g = Generator::from_loaded(&loaded).unwrap();
    let sampling = SamplingParams { temperature: 5.0, seed: 1, ..SamplingParams::default() };
    let out = g.generate("Hello", &GenerateParams { sampling, ..greedy(64) }).unwrap();
    assert!(out.tokens.iter().all(|&id| id < 400), "{:?}", out.tokens);
}

#[test]
fn chat_sessions_reuse_the_kv_cache_and_match_a_fresh_prefill() {
    let g = qwen2();
    let mut chat = ChatSession::new(g.clone()).unwrap();
    chat.set_system(Some("Be brief."));
    let params = GenerateParams { max_tokens: 6, ..GenerateParams::default() };
    let first = chat.reply("Hi there", &params).unwrap();
    assert_eq!(first.finished.timings.cached_tokens, 0);
    let second = chat.reply("Tell me more", &params).unwrap();
    let t = second.finished.timings;
    assert!(t.cached_tokens > 0 && t.cached_tokens < t.prompt_tokens, "{t:?}");
    // The same conversation prefilled from scratch gives the same reply.
    let history = chat.history().messages.clone();
    assert_eq!(history.len(), 5);
    assert_eq!(history[4], Message::assistant(second.text.clone()));
    let fresh = g.generate(Prompt::Chat(history[..4].to_vec()), &params).unwrap();
    assert_eq!(fresh.tokens, second.tokens);
    assert_eq!(fresh.finished.timings.prompt_tokens, t.prompt_tokens);
    // /reset keeps the system message only and forgets the cache.
    chat.reset();
    assert_eq!(chat.history().messages, vec![Message::system("Be brief.")]);
    assert_eq!(chat.reply("Hi there", &params).unwrap().finished.timings.cached_tokens, 0);
}

#[test]
fn a_dropped_chat_stream_keeps_the_partial_reply() {
    let mut chat = ChatSession::new(qwen2()).unwrap();
    let mut stream = chat.send("Hi", &greedy(30)).unwrap();
    let first = match stream.next() {
        Some(Ok(Event::Token { text, .. })) => text,
        other => panic!("{other:?}"),
    };
    drop(stream);
    let history = &chat.history().messages;
    assert_eq!(history.len(), 2);
    assert!(history[1].content.starts_with(&first));
}
