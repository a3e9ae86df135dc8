//! Memory over many requests, alone in its test binary (other tests in the same process would
//! move the RSS it measures).

mod common;

use common::{engine_idle_soon as idle_soon, load_cpu, model_dir};
use metal_candle::engine::{Engine, EngineConfig};
use metal_candle::generation::{GenerateParams, Generator};

fn greedy(n: usize) -> GenerateParams {
    GenerateParams { max_tokens: n, ignore_eos: true, ..GenerateParams::default() }
}

/// Linux: resident memory in bytes.
fn rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn a_thousand_short_requests_leave_the_pool_and_memory_where_they_started() {
    let g = Generator::from_loaded(&load_cpu(&model_dir("qwen2"))).unwrap();
    let engine = Engine::new(g, EngineConfig { max_sequences: 4, ..EngineConfig::default() }).unwrap();
    let run = |n: usize| {
        for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
            let hs: Vec<_> = chunk.iter().map(|&i| engine.submit(vec![1 + (i % 50) as u32, 2, 3], &greedy(2)).unwrap()).collect();
            for h in hs {
                assert_eq!(h.collect_generation().unwrap().tokens.len(), 2);
            }
        }
    };
    run(100);
    let before = rss();
    run(1000);
    let after = rss();
    assert!(idle_soon(&engine), "every slot is free again");
    if let (Some(b), Some(a)) = (before, after) {
        eprintln!("RSS after 100 requests {:.1} MB, after 1100 {:.1} MB", b as f64 / 1e6, a as f64 / 1e6);
        assert!(a <= b + (b / 10).max(4 << 20), "RSS grew from {b} to {a}");
    } else {
        eprintln!("RSS not measured (no /proc)");
    }
}

