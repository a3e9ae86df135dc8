//! Baseline for `metal-candle bench`: candle-transformers' own quantized models
//! (`quantized_qwen2` for `general.architecture = qwen2`, `quantized_llama` for `llama`) on the same
//! GGUF file, with the same measurement: the same prompt (`metal_candle::bench::bench_prompt`), one
//! warm-up, then R repetitions of a P-token prefill in one forward plus N greedy single-token decode
//! steps; median and min–max tokens/s.
//!
//! `cargo run --release --example candle_baseline -- --model FILE [-p 512] [-n 128] [-r 3]
//! [--threads N] [--json]` — `--json` prints a last line `{"prefill_tps":..,"decode_tps":..,...}`
//! like `metal-candle bench --json`. Used by `scripts/bench/compare.sh`.

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use metal_candle::bench::bench_prompt;
use metal_candle::sampling::argmax;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

enum Model {
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
}

impl Model {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Self::Qwen2(m) => m.forward(x, pos),
            Self::Llama(m) => m.forward(x, pos),
        }
    }

    fn clear(&mut self) {
        match self {
            Self::Qwen2(m) => m.clear_kv_cache(),
            Self::Llama(m) => m.clear_kv_cache(),
        }
    }
}

struct Args {
    model: String,
    prompt_tokens: usize,
    gen_tokens: usize,
    repetitions: usize,
    threads: Option<usize>,
    json: bool,
}

fn parse_args() -> BoxResult<Args> {
    let usage = "usage: candle_baseline --model FILE [-p N] [-n N] [-r N] [--threads N] [--json]";
    let mut args = Args {
        model: String::new(),
        prompt_tokens: 512,
        gen_tokens: 128,
        repetitions: 3,
        threads: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value; {usage}"))
        };
        match a.as_str() {
            "-m" | "--model" => args.model = value()?,
            "-p" | "--prompt-tokens" => args.prompt_tokens = value()?.parse()?,
            "-n" | "--gen-tokens" => args.gen_tokens = value()?.parse()?,
            "-r" | "--repetitions" => args.repetitions = value()?.parse()?,
            "--threads" => args.threads = Some(value()?.parse()?),
            "--json" => args.json = true,
            _ => return Err(format!("unknown argument {a}; {usage}").into()),
        }
    }
    if args.model.is_empty()
        || args.prompt_tokens == 0
        || args.gen_tokens == 0
        || args.repetitions == 0
    {
        return Err(usage.into());
    }
    Ok(args)
}

/// (prefill seconds, decode seconds) of one run from an empty cache.
fn one_run(model: &mut Model, prompt: &[u32], gen_tokens: usize) -> BoxResult<(f64, f64)> {
    model.clear();
    let start = Instant::now();
    let x = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?; // (1, p)
    let logits = model.forward(&x, 0)?;
    let prefill = start.elapsed().as_secs_f64();
    let mut next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?)?;
    let decode_start = Instant::now();
    for i in 0..gen_tokens {
        let x = Tensor::new(&[[next]], &Device::Cpu)?; // (1, 1)
        let logits = model.forward(&x, prompt.len() + i)?;
        next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?)?;
    }
    Ok((prefill, decode_start.elapsed().as_secs_f64()))
}

/// (median, min, max).
fn stat(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn main() -> BoxResult<()> {
    let args = parse_args()?;
    if let Some(n) = args.threads {
        // Before any candle computation: candle sizes its thread use from it.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let mut file = std::fs::File::open(&args.model)?;
    let content = gguf_file::Content::read(&mut file)?;
    let arch = content
        .metadata
        .get("general.architecture")
        .ok_or("no general.architecture")?
        .to_string()?
        .clone();
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or("no token_embd.weight")?
        .shape
        .dims()[0];
    let mut model = match arch.as_str() {
        "qwen2" => Model::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?),
        "llama" => Model::Llama(quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?),
        other => {
            return Err(format!(
                "architecture {other}: only qwen2 and llama have a candle-transformers baseline"
            )
            .into())
        }
    };
    let prompt = bench_prompt(args.prompt_tokens, vocab);
    one_run(&mut model, &prompt[..prompt.len().min(16)], 2)?; // warm-up
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..args.repetitions {
        let (p, d) = one_run(&mut model, &prompt, args.gen_tokens)?;
        prefill.push(args.prompt_tokens as f64 / p);
        decode.push(args.gen_tokens as f64 / d);
    }
    let (p, d) = (stat(&prefill), stat(&decode));
    println!(
        "model: {} (candle-transformers quantized_{arch})",
        args.model
    );
    println!(
        "prefill  {:>5} tokens: {:.2} ({:.2}–{:.2}) tok/s",
        args.prompt_tokens, p.0, p.1, p.2
    );
    println!(
        "decode   {:>5} tokens: {:.2} ({:.2}–{:.2}) tok/s",
        args.gen_tokens, d.0, d.1, d.2
    );
    if args.json {
        let json = serde_json::json!({
            "prefill_tps": p.0, "prefill_tps_min": p.1, "prefill_tps_max": p.2,
            "decode_tps": d.0, "decode_tps_min": d.1, "decode_tps_max": d.2,
            "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            "repetitions": args.repetitions,
        });
        println!("{json}");
    }
    Ok(())
}
