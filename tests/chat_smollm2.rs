//! A 12-question chat with the real SmolLM2-135M-Instruct GGUF at a 512-token context, as
//! `stream_chat --ctx 512` runs it: the model's chat defaults (sampling, a reply cap of a quarter
//! of the context), and the conversation outgrows the context several times. Every question gets a
//! non-empty answer, the oldest turns are dropped with a notice instead of an error, the system
//! prompt stays, and the saved history keeps every message. Prints SKIPPED without the GGUF.

mod common;

use metal_candle::chat::{ChatSession, Role};
use metal_candle::generation::defaults::chat_reply_cap;
use metal_candle::generation::{Event, GenerateParams, Generator};
use metal_candle::{load_model, DeviceChoice, LoadOptions};

const QUESTIONS: [&str; 12] = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Write one sentence about the ocean.",
    "What is 12 plus 30?",
    "Which planet is closest to the sun?",
    "Give me a synonym for happy.",
    "What language is spoken in Brazil?",
    "Explain what a noun is in one sentence.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet cat.",
    "Summarise our conversation in one sentence.",
];

#[test]
fn twelve_questions_at_ctx_512_all_answered() {
    let Some(path) = common::smollm2_path() else { return };
    let opts = LoadOptions { device: DeviceChoice::Cpu, max_positions: 512, ..LoadOptions::default() };
    let loaded = load_model(&path, &opts).unwrap();
    let context = loaded.model.max_positions();
    assert_eq!(context, 512);
    let mut chat = ChatSession::new(Generator::from_loaded(&loaded).unwrap()).unwrap();
    chat.set_system(Some("You are a helpful assistant."));
    let params = GenerateParams {
        sampling: loaded.chat_defaults.sampling.clone(),
        max_tokens: chat_reply_cap(context),
        ..GenerateParams::default()
    };
    let mut trims = 0;
    for (i, question) in QUESTIONS.iter().enumerate() {
        let mut stream = chat.send(question, &params).unwrap_or_else(|e| panic!("question {i}: {e}"));
        if let Some(notice) = stream.trimmed() {
            assert!(notice.to_string().starts_with("[context full: dropped the oldest"), "{notice}");
            trims += 1;
        }
        let (mut answer, mut prompt_tokens) = (String::new(), 0);
        for event in &mut stream {
            match event.unwrap_or_else(|e| panic!("question {i}: {e}")) {
                Event::Token { text, .. } => answer.push_str(&text),
                Event::Finished(done) => {
                    answer.push_str(&done.text);
                    prompt_tokens = done.timings.prompt_tokens;
                }
            }
        }
        drop(stream);
        println!("Q{i} ({prompt_tokens} prompt tokens): {question}\nA: {answer}\n");
        assert!(answer.chars().any(char::is_alphanumeric), "question {i} got no answer: {answer:?}");
        assert!(prompt_tokens + 1 < context, "question {i}: {prompt_tokens} prompt tokens");
    }
    assert!(trims >= 1, "12 turns at 512 tokens must outgrow the context");
    let messages = &chat.history().messages;
    assert_eq!(messages.len(), 1 + 2 * QUESTIONS.len(), "the history keeps every message");
    assert_eq!(messages[0].role, Role::System);
    assert!(messages[1..].iter().step_by(2).all(|m| m.role == Role::User));
}
