//! `metal-candle generate`: stream a completion (or, with `--chat`, a chat reply) to stdout.

use std::io::Write;

use clap::Args;
use metal_candle::chat::Message;
use metal_candle::generation::{Event, Finished, GenerateParams, Generator, Prompt};
use metal_candle::sampling::{SamplingParams, TokenLogprobs, DEFAULT_PENALTY_WINDOW};
use metal_candle::{Error, Result};
use serde_json::json;

use crate::common::{load, ModelArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (with --chat: the user message).
    #[arg(long)]
    prompt: String,
    /// Apply the model's chat template, with --prompt as the user message.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: i64,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    /// Drop tokens below min_p × the top probability.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f64,
    /// Divide (multiply if negative) logits of recent tokens by this (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Subtract this from logits of tokens present in the window.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtract this per occurrence in the window.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Recent tokens (prompt included) the penalties look at.
    #[arg(long, default_value_t = DEFAULT_PENALTY_WINDOW)]
    penalty_window: usize,
    /// ID=BIAS added to a token's logit (repeatable; -inf bans).
    #[arg(long, value_parser = parse_bias, allow_negative_numbers = true)]
    logit_bias: Vec<(u32, f32)>,
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// End before this string (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Another end-of-sequence token id (repeatable).
    #[arg(long)]
    eos_token_id: Vec<u32>,
    /// With --json: log-probabilities of the chosen token and this many alternatives.
    #[arg(long)]
    logprobs: Option<usize>,
    /// One JSON object per line: {"token", "text", ...} per token, then {"finish_reason", "text", timings}.
    #[arg(long)]
    json: bool,
}

fn parse_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or("expected ID=BIAS")?;
    let id = id.trim().parse::<u32>().map_err(|e| format!("token id {id:?}: {e}"))?;
    let bias = bias.trim().parse::<f32>().map_err(|e| format!("bias {bias:?}: {e}"))?;
    Ok((id, bias))
}

impl GenerateArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                penalty_window: self.penalty_window,
                logit_bias: self.logit_bias.clone(),
                seed: self.seed,
            },
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            eos_token_ids: self.eos_token_id.clone(),
            logprobs: self.logprobs,
        }
    }

    fn prompt(&self) -> Prompt {
        if !self.chat {
            return Prompt::Text(self.prompt.clone());
        }
        let mut messages: Vec<Message> = self.system.iter().map(Message::system).collect();
        messages.push(Message::user(&self.prompt));
        Prompt::Chat(messages)
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let params = args.params();
    params.validate()?; // before the (slow) load
    let loaded = load(&args.model)?;
    let generator = Generator::from_loaded(&loaded)?;
    let stream = generator.stream(args.prompt(), &params)?;
    let mut out = std::io::stdout().lock();
    for event in stream {
        let line = match event? {
            Event::Token { id, text, logprobs } if args.json => token_json(id, &text, logprobs.as_ref()),
            Event::Token { text, .. } => text,
            Event::Finished(done) if args.json => finished_json(&done),
            Event::Finished(done) => done.text + "\n",
        };
        write_out(&mut out, &line, args.json)?;
    }
    Ok(())
}

fn write_out(out: &mut impl Write, text: &str, json: bool) -> Result<()> {
    let io = |e| Error::Io { path: "<stdout>".into(), source: e };
    if json {
        writeln!(out, "{text}").map_err(io)?;
    } else {
        write!(out, "{text}").map_err(io)?;
    }
    out.flush().map_err(io)
}

fn token_json(id: u32, text: &str, logprobs: Option<&TokenLogprobs>) -> String {
    let mut obj = json!({ "token": id, "text": text });
    if let Some(lp) = logprobs {
        obj["logprob"] = json!(lp.logprob);
        obj["top_logprobs"] = lp.top.iter().map(|(id, lp)| json!({ "token": id, "logprob": lp })).collect();
    }
    obj.to_string()
}

fn finished_json(done: &Finished) -> String {
    let t = &done.timings;
    json!({
        "finish_reason": done.reason.as_str(),
        "text": done.text,
        "prompt_tokens": t.prompt_tokens,
        "generated_tokens": t.generated_tokens,
        "ttft_ms": t.ttft.as_secs_f64() * 1e3,
        "prefill_tokens_per_s": t.prefill_tokens_per_s,
        "decode_tokens_per_s": t.decode_tokens_per_s,
    })
    .to_string()
}
