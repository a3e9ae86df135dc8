//! `metal-candle generate`: stream a completion (or, with `--chat`, a chat reply) to stdout.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::Args;
use metal_candle::chat::Message;
use metal_candle::generation::{Constraint, Event, Finished, GenerateParams, Generator, Prompt, Timings};
use metal_candle::sampling::{SamplingParams, TokenLogprobs};
use metal_candle::{Error, Result, Tokenizer};
use serde_json::json;

use crate::common::{load_with_context, positive, set_threads, ModelArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (with --chat: the user message); `-` reads it from stdin.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    prompt: Option<String>,
    /// Read the prompt from this UTF-8 file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Apply the model's chat template, with the prompt as the user message. Sampling flags not
    /// given take the model's chat defaults (generation_config.json, GGUF general.sampling.*, else
    /// temperature 0.8, top-k 40, top-p 0.9, repetition penalty 1.1).
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    max_tokens: i64,
    /// Context (prompt + generated tokens), at most the model's own (default 4096).
    #[arg(long, allow_negative_numbers = true)]
    ctx: Option<i64>,
    /// CPU threads (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<i64>,
    /// 0 is greedy (the default without --chat).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, allow_negative_numbers = true)]
    top_k: Option<i64>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// Drop tokens below min_p × the top probability.
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f64>,
    /// Divide (multiply if negative) logits of recent tokens by this (1: off).
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
    /// Subtract this from logits of tokens present in the window.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtract this per occurrence in the window.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Recent tokens (prompt included) the penalties look at (default 64).
    #[arg(long, allow_negative_numbers = true)]
    penalty_window: Option<i64>,
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
    /// Log-probabilities of the chosen token and this many alternatives, in the JSON lines.
    #[arg(long, requires = "json", allow_negative_numbers = true)]
    logprobs: Option<i64>,
    /// One JSON object per line: {"token", "text", ...} per token (text: the delta), then
    /// {"finish_reason", "text" (the whole generated text), "tail", timings}.
    #[arg(long)]
    json: bool,
    /// Constrain the output to JSON valid under the JSON Schema in this file.
    #[arg(long, value_name = "FILE", group = "constraint")]
    json_schema: Option<PathBuf>,
    /// Constrain the output to any JSON object.
    #[arg(long, group = "constraint")]
    json_object: bool,
    /// Constrain the output to match this regular expression (Rust regex syntax), whole.
    #[arg(long, value_name = "REGEX", group = "constraint")]
    regex: Option<String>,
    /// Constrain the output to this Lark grammar file (llguidance's dialect).
    #[arg(long, value_name = "FILE.lark", group = "constraint")]
    grammar: Option<PathBuf>,
}

fn parse_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or("expected ID=BIAS")?;
    let id = id.trim().parse::<u32>().map_err(|e| format!("token id {id:?}: {e}"))?;
    let bias = bias.trim().parse::<f32>().map_err(|e| format!("bias {bias:?}: {e}"))?;
    Ok((id, bias))
}

impl GenerateArgs {
    /// The settings, on top of `base` sampling (greedy, or the model's chat defaults). Errors: a
    /// count below 1 or a setting out of range, naming the parameter.
    fn params(&self, base: &SamplingParams) -> Result<GenerateParams> {
        let params = GenerateParams {
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(base.temperature),
                top_k: self.top_k.unwrap_or(base.top_k),
                top_p: self.top_p.unwrap_or(base.top_p),
                min_p: self.min_p.unwrap_or(base.min_p),
                repetition_penalty: self.repetition_penalty.unwrap_or(base.repetition_penalty),
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                penalty_window: self.penalty_window.map(|w| positive("penalty_window", w)).transpose()?.unwrap_or(base.penalty_window),
                logit_bias: self.logit_bias.clone(),
                seed: self.seed,
            },
            max_tokens: positive("max_tokens", self.max_tokens)?,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            eos_token_ids: self.eos_token_id.clone(),
            logprobs: self.logprobs.map(|n| usize::try_from(n).map_err(|_| invalid_logprobs(n))).transpose()?,
            constraint: self.constraint()?,
        };
        params.validate()?;
        Ok(params)
    }

    /// The grammar of `--json-schema` / `--json-object` / `--regex` / `--grammar`, if any.
    fn constraint(&self) -> Result<Option<Constraint>> {
        let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|source| Error::Io { path: p.clone(), source });
        Ok(if let Some(p) = &self.json_schema {
            let schema = serde_json::from_str(&read(p)?).map_err(|source| Error::Json { path: p.clone(), source })?;
            Some(Constraint::JsonSchema(schema))
        } else if self.json_object {
            Some(Constraint::Json)
        } else if let Some(r) = &self.regex {
            Some(Constraint::Regex(r.clone()))
        } else if let Some(p) = &self.grammar {
            Some(Constraint::Lark(read(p)?))
        } else {
            None
        })
    }

    /// The prompt text: `--prompt TEXT`, `--prompt -` (stdin) or `--file F`.
    fn prompt_text(&self) -> Result<String> {
        match (&self.prompt, &self.file) {
            (Some(p), _) if p == "-" => {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).map_err(|source| Error::Io { path: "<stdin>".into(), source })?;
                Ok(text)
            }
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => std::fs::read_to_string(f).map_err(|source| Error::Io { path: f.clone(), source }),
            (None, None) => Err(Error::InvalidParameter { name: "prompt", reason: "give --prompt TEXT, --prompt - or --file F".into() }),
        }
    }

    fn prompt(&self, text: String) -> Prompt {
        if !self.chat {
            return Prompt::Text(text);
        }
        let mut messages: Vec<Message> = self.system.iter().map(Message::system).collect();
        messages.push(Message::user(text));
        Prompt::Chat(messages)
    }
}

fn invalid_logprobs(n: i64) -> Error {
    Error::InvalidParameter { name: "logprobs", reason: format!("{n} is negative") }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    args.params(&SamplingParams::default())?; // before the (slow) load
    let text = args.prompt_text()?;
    set_threads(args.threads)?;
    let ctx = args.ctx.map(|c| positive("ctx", c)).transpose()?;
    let loaded = load_with_context(&args.model, ctx)?;
    let base = if args.chat { loaded.chat_defaults.sampling.clone() } else { SamplingParams::default() };
    let params = args.params(&base)?;
    let generator = Generator::from_loaded(&loaded)?;
    let stream = generator.stream(args.prompt(text), &params)?;
    let mut out = std::io::stdout().lock();
    let mut whole = String::new();
    for event in stream {
        let line = match event? {
            Event::Token { id, text, logprobs } if args.json => {
                whole.push_str(&text);
                token_json(generator.tokenizer(), id, &text, logprobs.as_ref())?
            }
            Event::Token { text, .. } => text,
            Event::Finished(done) if args.json => {
                whole.push_str(&done.text);
                finished_json(&done, &whole)
            }
            Event::Finished(done) => {
                eprintln!("{}", timings_line(&done.timings));
                done.text + "\n"
            }
        };
        write_out(&mut out, &line, args.json)?;
    }
    Ok(())
}

/// llama-cli's closing statistics, on stderr so stdout holds only the text.
fn timings_line(t: &Timings) -> String {
    format!(
        "[prompt: {} tokens ({} cached) in {:.1} ms, {:.1} tok/s; generated: {} tokens, {:.1} tok/s; TTFT {:.1} ms]",
        t.prompt_tokens,
        t.cached_tokens,
        t.prefill.as_secs_f64() * 1e3,
        t.prefill_tokens_per_s,
        t.generated_tokens,
        t.decode_tokens_per_s,
        t.ttft.as_secs_f64() * 1e3
    )
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

fn token_json(tok: &Tokenizer, id: u32, text: &str, logprobs: Option<&TokenLogprobs>) -> Result<String> {
    let mut obj = json!({ "token": id, "text": text });
    if let Some(lp) = logprobs {
        obj["logprob"] = json!(lp.logprob);
        let top: Result<Vec<_>> = lp
            .top
            .iter()
            .map(|(id, lp)| Ok(json!({ "token": id, "text": tok.decode(&[*id], false)?, "logprob": lp })))
            .collect();
        obj["top_logprobs"] = top?.into();
    }
    Ok(obj.to_string())
}

fn finished_json(done: &Finished, whole: &str) -> String {
    let t = &done.timings;
    json!({
        "finish_reason": done.reason.as_str(),
        "text": whole,
        "tail": done.text,
        "prompt_tokens": t.prompt_tokens,
        "cached_tokens": t.cached_tokens,
        "generated_tokens": t.generated_tokens,
        "ttft_ms": t.ttft.as_secs_f64() * 1e3,
        "prefill_ms": t.prefill.as_secs_f64() * 1e3,
        "decode_ms": t.decode.as_secs_f64() * 1e3,
        "prefill_tokens_per_s": t.prefill_tokens_per_s,
        "decode_tokens_per_s": t.decode_tokens_per_s,
    })
    .to_string()
}
