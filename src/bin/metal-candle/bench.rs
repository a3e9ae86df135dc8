//! `metal-candle bench`: llama-bench-style prefill/decode throughput.

use clap::Args;
use metal_candle::bench::{measure_bandwidth, peak_rss_bytes, run_batched_bench, run_bench, BenchConfig, Stat};
use metal_candle::{Error, Result};

use crate::common::{load, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens (prefill).
    #[arg(short = 'p', long = "prompt-tokens", default_value_t = 512)]
    prompt_tokens: usize,
    /// Generated tokens (decode).
    #[arg(short = 'n', long = "gen-tokens", default_value_t = 128)]
    gen_tokens: usize,
    /// Tokens already in the KV cache before the timed prompt (llama-bench `-d`): prefilled once,
    /// untimed; `-p 0` then measures decode at that depth only.
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// CPU threads (sets RAYON_NUM_THREADS before the first computation).
    #[arg(long)]
    threads: Option<usize>,
    /// Measured repetitions after one warm-up.
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// Memory bandwidth in GB/s for the roofline. When not given, a quick probe (summing a 512 MiB
    /// tensor) measures it; that reads low (a lower bound), so pass the figure of
    /// scripts/bench/bandwidth.c for a fair roofline.
    #[arg(long)]
    bandwidth: Option<f64>,
    /// Concurrent sequences, comma-separated (`1,4,8`): aggregate prefill/decode tokens/s of that
    /// many sequences stepped together, one line (and with --json one JSON line) per level, like
    /// llama-batched-bench's S_PP / S_TG.
    #[arg(long, value_delimiter = ',')]
    parallel: Vec<usize>,
    /// Print a last line of JSON (prefill_tps, decode_tps, ...).
    #[arg(long)]
    json: bool,
}

fn fmt(s: &Stat) -> String {
    format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max)
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(n) = args.threads {
        // Before any candle computation: candle and gemm size their pools from it once.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let loaded = load(&args.model)?;
    let model = &loaded.model;
    let cfg = BenchConfig {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        repetitions: args.repetitions,
        depth: args.depth,
    };
    if !args.parallel.is_empty() {
        if cfg.depth > 0 {
            return Err(Error::InvalidParameter { name: "depth", reason: "not supported with --parallel".into() });
        }
        return run_parallel(model, &cfg, &args.parallel, args.json);
    }
    let report = run_bench(model, &cfg)?;
    // Before the bandwidth probe allocates its buffer.
    let rss = peak_rss_bytes();
    let bandwidth = match args.bandwidth {
        Some(b) => b,
        None => measure_bandwidth(model.device(), 512)?,
    };
    let roofline_tps = bandwidth * 1e9 / report.weight_bytes.max(1) as f64;
    println!("model: {}", args.model.model.display());
    if cfg.depth > 0 {
        println!("depth    {:>5} tokens in the cache before each run (untimed)", cfg.depth);
    }
    println!("prefill  {:>5} tokens: {} tok/s", cfg.prompt_tokens, fmt(&report.prefill_tps));
    println!("decode   {:>5} tokens: {} tok/s", cfg.gen_tokens, fmt(&report.decode_tps));
    println!("TTFT: {} ms", fmt(&report.ttft_ms));
    println!(
        "decode bandwidth: {:.1} GB/s = {:.0}% of {bandwidth:.1} GB/s (roofline {roofline_tps:.1} tok/s for {:.1} MB of weights)",
        report.decode_gbps,
        100.0 * report.decode_gbps / bandwidth,
        report.weight_bytes as f64 / 1e6
    );
    if let Some(rss) = rss {
        println!("peak RSS: {:.1} MB", rss as f64 / 1e6);
    }
    if args.json {
        let json = serde_json::json!({
            "prefill_tps": report.prefill_tps.median,
            "prefill_tps_min": report.prefill_tps.min,
            "prefill_tps_max": report.prefill_tps.max,
            "decode_tps": report.decode_tps.median,
            "decode_tps_min": report.decode_tps.min,
            "decode_tps_max": report.decode_tps.max,
            "ttft_ms": report.ttft_ms.median,
            "prompt_tokens": cfg.prompt_tokens,
            "gen_tokens": cfg.gen_tokens,
            "repetitions": cfg.repetitions,
            "depth": cfg.depth,
            "weight_bytes": report.weight_bytes,
            "decode_gbps": report.decode_gbps,
            "bandwidth_gbps": bandwidth,
            "roofline_pct": 100.0 * report.decode_gbps / bandwidth,
            "peak_rss_bytes": rss,
        });
        println!("{json}");
    }
    Ok(())
}

fn run_parallel(model: &metal_candle::Model, cfg: &BenchConfig, levels: &[usize], json: bool) -> Result<()> {
    for &parallel in levels {
        let r = run_batched_bench(model, cfg, parallel)?;
        println!(
            "parallel {parallel:>3}: prefill {} tok/s, decode {} tok/s (aggregate, {} + {} tokens each)",
            fmt(&r.prefill_tps),
            fmt(&r.decode_tps),
            cfg.prompt_tokens,
            cfg.gen_tokens
        );
        if json {
            let line = serde_json::json!({
                "parallel": parallel,
                "prefill_tps": r.prefill_tps.median,
                "decode_tps": r.decode_tps.median,
                "prefill_tps_min": r.prefill_tps.min,
                "prefill_tps_max": r.prefill_tps.max,
                "decode_tps_min": r.decode_tps.min,
                "decode_tps_max": r.decode_tps.max,
                "prompt_tokens": cfg.prompt_tokens,
                "gen_tokens": cfg.gen_tokens,
                "peak_rss_bytes": peak_rss_bytes(),
            });
            println!("{line}");
        }
    }
    Ok(())
}
