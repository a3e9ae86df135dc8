//! llama-bench-style measurement: prefill and decode tokens/s, TTFT, peak RSS, and decode
//! bandwidth against a memory roofline. Used by `metal-candle bench`.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{KvCache, KvPool, Logits, Model, RowLogits, StepBatch};
use crate::sampling::argmax;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prompt tokens prefilled in one forward.
    pub prompt_tokens: usize,
    /// Tokens decoded one at a time after the prompt.
    pub gen_tokens: usize,
    /// Measured repetitions (after one warm-up).
    pub repetitions: usize,
    /// Tokens already in the KV cache when the timed prompt starts (llama-bench `-d`): prefilled
    /// once, untimed, and kept across repetitions. With a depth the prompt may be empty (decode
    /// at depth only).
    pub depth: usize,
}

/// Median, min and max of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// The median (the mean of the middle two for an even count; NaN for none).
    pub median: f64,
    /// The smallest value (NaN for none).
    pub min: f64,
    /// The largest value (NaN for none).
    pub max: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Self {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Prefill speed, prompt tokens per second.
    pub prefill_tps: Stat,
    /// Decode speed, generated tokens per second.
    pub decode_tps: Stat,
    /// Time to first token: prefill plus picking the first token, in milliseconds.
    pub ttft_ms: Stat,
    /// Projection weight bytes one decode step reads.
    pub weight_bytes: usize,
    /// Achieved decode bandwidth: weight_bytes × median decode tokens/s, in GB/s.
    pub decode_gbps: f64,
}

/// Runs the benchmark on `model` with deterministic token ids.
pub fn run_bench(model: &Model, cfg: &BenchConfig) -> Result<BenchReport> {
    if (cfg.prompt_tokens == 0 && cfg.depth == 0) || cfg.gen_tokens == 0 || cfg.repetitions == 0 {
        return Err(Error::InvalidParameter {
            name: "bench",
            reason: "prompt tokens (or a depth), generated tokens and repetitions must all be at least 1".into(),
        });
    }
    let total = cfg.depth + cfg.prompt_tokens + cfg.gen_tokens;
    if total > model.max_positions() {
        return Err(Error::ContextOverflow {
            prompt_tokens: total,
            context: model.max_positions(),
        });
    }
    let all = bench_prompt(cfg.depth + cfg.prompt_tokens, model.config().vocab_size);
    let (context, prompt) = all.split_at(cfg.depth);
    // Warm-up: page in the weights, let allocators settle and size the KV cache for the prompt.
    // Like llama-bench, the repetitions then reuse that cache (cleared, not reallocated).
    let mut cache = model.new_cache();
    let mut last = fill_depth(model, &mut cache, context)?;
    one_run(model, &mut cache, prompt, last, 2)?;
    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.repetitions {
        if !cache.truncate(cfg.depth) {
            // A sliding-window ring that wrapped cannot rewind.
            cache = model.new_cache();
            last = fill_depth(model, &mut cache, context)?;
        }
        let r = one_run(model, &mut cache, prompt, last, cfg.gen_tokens)?;
        if !prompt.is_empty() {
            prefill.push(cfg.prompt_tokens as f64 / r.prefill.as_secs_f64());
        }
        decode.push(cfg.gen_tokens as f64 / r.decode.as_secs_f64());
        ttft.push(r.ttft.as_secs_f64() * 1e3);
    }
    let decode_tps = Stat::of(&decode);
    let weight_bytes = model.projection_bytes();
    Ok(BenchReport {
        prefill_tps: Stat::of(&prefill),
        decode_tps,
        ttft_ms: Stat::of(&ttft),
        weight_bytes,
        decode_gbps: weight_bytes as f64 * decode_tps.median / 1e9,
    })
}

struct RunTimes {
    prefill: Duration,
    ttft: Duration,
    decode: Duration,
}

/// Prefills `context` (untimed) and returns the greedy next token, or token 0 for no context.
fn fill_depth(model: &Model, cache: &mut KvCache, context: &[u32]) -> Result<u32> {
    if context.is_empty() {
        return Ok(0);
    }
    let x = Tensor::new(context, model.device())?.unsqueeze(0)?; // (1, depth)
    let logits = model.forward(&x, cache, Logits::Last)?;
    argmax(&logits.squeeze(0)?.to_vec1::<f32>()?)
}

/// Times the prefill of `prompt` (skipped when empty: decode starts from `last`) and
/// `gen_tokens` greedy decode steps.
fn one_run(model: &Model, cache: &mut KvCache, prompt: &[u32], last: u32, gen_tokens: usize) -> Result<RunTimes> {
    let device = model.device();
    let start = Instant::now();
    let (mut next, mut prefill) = (last, Duration::ZERO);
    if !prompt.is_empty() {
        let x = Tensor::new(prompt, device)?.unsqueeze(0)?; // (1, p)
        let logits = model.forward(&x, cache, Logits::Last)?;
        device.synchronize()?;
        prefill = start.elapsed();
        next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?)?;
    }
    let ttft = start.elapsed();
    let decode_start = Instant::now();
    for _ in 0..gen_tokens {
        let x = Tensor::new(&[[next]], device)?; // (1, 1)
        let logits = model.forward(&x, cache, Logits::Last)?;
        next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?)?;
    }
    device.synchronize()?;
    Ok(RunTimes {
        prefill,
        ttft,
        decode: decode_start.elapsed(),
    })
}

/// Aggregate throughput of `parallel` sequences stepped together (llama-batched-bench's S_PP and
/// S_TG).
#[derive(Debug, Clone)]
pub struct BatchedReport {
    /// Sequences run together.
    pub parallel: usize,
    /// Prompt tokens of all sequences per second of their one batched prefill.
    pub prefill_tps: Stat,
    /// Generated tokens of all sequences per second of batched decode steps.
    pub decode_tps: Stat,
}

/// Runs `parallel` sequences with different prompts of `cfg.prompt_tokens` tokens through
/// [`Model::forward_batch`] (the engine's step): one prefill step with every prompt, then
/// `cfg.gen_tokens` decode steps of `parallel` rows, greedy. Like llama-batched-bench, the
/// slots are reused (cleared) across repetitions after one warm-up.
pub fn run_batched_bench(model: &Model, cfg: &BenchConfig, parallel: usize) -> Result<BatchedReport> {
    if cfg.prompt_tokens == 0 || cfg.gen_tokens == 0 || cfg.repetitions == 0 || parallel == 0 {
        return Err(Error::InvalidParameter {
            name: "bench",
            reason: "prompt tokens, generated tokens, repetitions and parallel must all be at least 1".into(),
        });
    }
    let total = cfg.prompt_tokens + cfg.gen_tokens;
    if total > model.max_positions() {
        return Err(Error::ContextOverflow { prompt_tokens: total, context: model.max_positions() });
    }
    let vocab = model.config().vocab_size;
    let all = bench_prompt(cfg.prompt_tokens * parallel, vocab);
    let prompts: Vec<&[u32]> = all.chunks(cfg.prompt_tokens).collect();
    let mut pool = model.new_pool(parallel, total);
    batched_run(model, &mut pool, &prompts, 2)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..cfg.repetitions {
        let r = batched_run(model, &mut pool, &prompts, cfg.gen_tokens)?;
        prefill.push((cfg.prompt_tokens * parallel) as f64 / r.prefill.as_secs_f64());
        decode.push((cfg.gen_tokens * parallel) as f64 / r.decode.as_secs_f64());
    }
    Ok(BatchedReport { parallel, prefill_tps: Stat::of(&prefill), decode_tps: Stat::of(&decode) })
}

fn batched_run(model: &Model, pool: &mut KvPool, prompts: &[&[u32]], gen_tokens: usize) -> Result<RunTimes> {
    for slot in 0..prompts.len() {
        if !pool.truncate(slot, 0) {
            pool.reset(slot); // a sliding-window ring that wrapped cannot rewind
        }
    }
    let start = Instant::now();
    let mut batch = StepBatch::new();
    for (slot, p) in prompts.iter().enumerate() {
        batch.push(slot, 0, p, 0, RowLogits::Last)?;
    }
    let mut next = argmax_rows(&model.forward_batch(&batch, pool)?)?;
    model.device().synchronize()?;
    let prefill = start.elapsed();
    let decode_start = Instant::now();
    for _ in 0..gen_tokens {
        let mut batch = StepBatch::new();
        for (slot, id) in next.iter().enumerate() {
            batch.push(slot, pool.seq_len(slot), &[*id], 0, RowLogits::Last)?;
        }
        next = argmax_rows(&model.forward_batch(&batch, pool)?)?;
    }
    model.device().synchronize()?;
    Ok(RunTimes { prefill, ttft: prefill, decode: decode_start.elapsed() })
}

fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    logits.to_vec2::<f32>()?.iter().map(|r| argmax(r)).collect()
}

/// A fixed pseudo-random prompt (a linear congruential sequence) so runs are comparable.
pub fn bench_prompt(n: usize, vocab: usize) -> Vec<u32> {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab.max(1) as u64) as u32
        })
        .collect()
}

/// Peak resident set size of this process in bytes: Linux `VmHWM` (`/proc/self/status`), else
/// `getrusage`'s `ru_maxrss` on other Unix systems (bytes on macOS, KiB elsewhere); `None` on
/// other platforms.
pub fn peak_rss_bytes() -> Option<u64> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        return Some(kb * 1024);
    }
    max_rss_rusage()
}

#[cfg(unix)]
fn max_rss_rusage() -> Option<u64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: getrusage returned 0, so it wrote the struct (and zeroed() initialised it anyway).
    let max = u64::try_from(unsafe { usage.assume_init() }.ru_maxrss).ok()?;
    Some(if cfg!(target_os = "macos") { max } else { max * 1024 })
}

#[cfg(not(unix))]
fn max_rss_rusage() -> Option<u64> {
    None
}

/// Read bandwidth in GB/s measured by summing a `mib`-MiB f32 tensor on `device` (best of three).
pub fn measure_bandwidth(device: &Device, mib: usize) -> Result<f64> {
    let n = mib * 1024 * 1024 / 4;
    let t = Tensor::ones(n, DType::F32, device)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        let s = t.sum_all()?;
        device.synchronize()?;
        let _ = s.to_scalar::<f32>()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok((n * 4) as f64 / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_prompt() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        let p = bench_prompt(100, 50);
        assert_eq!(p, bench_prompt(100, 50));
        assert!(p.iter().all(|&t| t < 50));
        assert!(p.iter().collect::<std::collections::HashSet<_>>().len() > 20);
    }
}

