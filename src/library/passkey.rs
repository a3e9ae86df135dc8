//! The real context trial: passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention",
//! appendix: filler sentences with a number hidden among them and the question at the end).
//!
//! A prompt of `length − ANSWER_TOKENS` tokens hides a random five-digit number in the first tenth
//! of the filler; the model continues "The pass key is" greedily for [`ANSWER_TOKENS`] tokens and
//! passes when its answer contains the number. The prompt is plain text, not a chat turn, so base
//! and instruct models are tested alike. This measures retrieval over the context, not reasoning.

use std::time::Instant;

use rand::{Rng, SeedableRng};

use super::facts::ModelFacts;
use super::probe::{ContextTrial, Trial};
use crate::error::{Error, Result};
use crate::generation::{GenerateParams, Generator, Prompt};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Tokens the answer may take; a trial at length L uses a prompt of L − this.
pub const ANSWER_TOKENS: usize = 12;

/// Runtime overhead outside weights, KV cache and activations (allocator, tables, tokenizer).
const RUNTIME_BYTES: u64 = 64 << 20;

const INTRO: &str = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the pass key.\n";
const FILLER: &str = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = "\nWhat is the pass key? The pass key is";

/// Estimated bytes to run `facts`' model at `length` tokens with KV and dense weights in
/// `dtype_bytes`: weights as stored on disk, the KV cache at `length` (K and V, every layer), the
/// f32 activations of a prefill of `length` tokens (residual, norms, q/k/v, MLP) and one row of
/// logits.
pub fn memory_estimate(facts: &ModelFacts, length: usize, dtype_bytes: u64) -> u64 {
    let len = length as u64;
    let kv_per_token = 2 * facts.num_layers as u64 * (facts.num_key_value_heads * facts.head_dim) as u64 * dtype_bytes;
    let qkv = ((facts.num_attention_heads + 2 * facts.num_key_value_heads) * facts.head_dim) as u64;
    let act_per_token = (4 * facts.hidden_size as u64 + 3 * facts.intermediate_size as u64 + qkv) * 4;
    facts.size_bytes + len * (kv_per_token + act_per_token) + facts.vocab_size as u64 * 4 + RUNTIME_BYTES
}

/// A passkey prompt of exactly `prompt_tokens` ids and the key hidden in it.
///
/// Errors: [`Error::InvalidParameter`] (`min`) when `prompt_tokens` cannot hold the intro, the key
/// line and the question.
pub fn passkey_prompt(tok: &Tokenizer, prompt_tokens: usize, seed: u64) -> Result<(Vec<u32>, u32)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let key: u32 = rng.random_range(10_000..100_000);
    let intro = tok.encode(INTRO, true)?;
    let filler = tok.encode(FILLER, false)?;
    let key_line = tok.encode(&format!(" The pass key is {key}. Remember it. {key} is the pass key."), false)?;
    let question = tok.encode(QUESTION, false)?;
    let fixed = intro.len() + key_line.len() + question.len();
    if prompt_tokens < fixed + filler.len() || filler.is_empty() {
        return Err(Error::InvalidParameter {
            name: "min",
            reason: format!("a passkey prompt needs at least {} tokens; asked for {prompt_tokens}", fixed + filler.len() + ANSWER_TOKENS),
        });
    }
    let budget = prompt_tokens - fixed;
    // The key goes at a sentence boundary within the first tenth of the filler.
    let units_before = rng.random_range(0..=(budget / 10) / filler.len());
    let mut ids = intro;
    let mut filled = 0;
    let mut push_filler = |ids: &mut Vec<u32>, n: usize| {
        for _ in 0..n {
            ids.push(filler[filled % filler.len()]);
            filled += 1;
        }
    };
    push_filler(&mut ids, units_before * filler.len());
    ids.extend(&key_line);
    push_filler(&mut ids, budget - units_before * filler.len());
    ids.extend(&question);
    Ok((ids, key))
}

/// [`ContextTrial`] on a loaded model: a passkey prompt per length, answered greedily. The model
/// must be loaded with a context of at least the longest length tried.
pub struct PasskeyTrial {
    generator: Generator,
    facts: ModelFacts,
    seed: u64,
}

impl PasskeyTrial {
    /// Trials on `generator`'s model, whose file `facts` describe; `seed` picks the keys (one per
    /// length, so a rerun asks the same question).
    pub fn new(generator: Generator, facts: ModelFacts, seed: u64) -> Self {
        Self { generator, facts, seed }
    }

    fn answer(&self, length: usize) -> Result<bool> {
        let prompt_tokens = length.saturating_sub(ANSWER_TOKENS);
        let (ids, key) = passkey_prompt(self.generator.tokenizer(), prompt_tokens, self.seed ^ length as u64)?;
        let params = GenerateParams {
            sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
            max_tokens: ANSWER_TOKENS,
            ..GenerateParams::default()
        };
        let generation = self.generator.generate(Prompt::Tokens(ids), &params)?;
        Ok(generation.text.contains(&key.to_string()))
    }
}

impl ContextTrial for PasskeyTrial {
    fn memory_needed(&self, length: usize) -> u64 {
        memory_estimate(&self.facts, length, self.generator.model().dtype().size_in_bytes() as u64)
    }

    fn run(&mut self, length: usize) -> Result<Trial> {
        if length < ANSWER_TOKENS {
            return Err(Error::InvalidParameter { name: "min", reason: format!("{length} leaves no room for an answer") });
        }
        reset_peak_rss();
        let start = Instant::now();
        let (passed, error) = match self.answer(length) {
            Ok(passed) => (passed, None),
            Err(e @ Error::InvalidParameter { .. }) => return Err(e),
            Err(e) => (false, Some(e.to_string())),
        };
        Ok(Trial { length, passed, seconds: start.elapsed().as_secs_f64(), peak_rss: crate::bench::peak_rss_bytes(), error })
    }
}

/// Linux: writing 5 to `/proc/self/clear_refs` resets the peak RSS (`VmHWM`) to the current RSS
/// (proc(5)), so each trial reports its own peak. Elsewhere, and if refused, peaks accumulate.
fn reset_peak_rss() {
    #[cfg(target_os = "linux")]
    {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
}
