//! `/metrics`: counters and histograms in the Prometheus text format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::engine::EngineStats;

/// Upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Upper bounds (seconds) of the per-output-token latency histogram.
const TOKEN_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.len() != bounds.len() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str, bounds: &[f64]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.count, self.sum, self.count);
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// (endpoint, status) → requests.
    requests: BTreeMap<(&'static str, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    ttft: Histogram,
    per_token: Histogram,
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

impl Metrics {
    /// One finished request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *self.lock().requests.entry((endpoint, status)).or_default() += 1;
    }

    /// Tokens read and written by one request.
    pub fn tokens(&self, prompt: usize, completion: usize) {
        let mut c = self.lock();
        c.prompt_tokens += prompt as u64;
        c.completion_tokens += completion as u64;
    }

    /// Time to the first token of one request.
    pub fn ttft(&self, d: Duration) {
        self.lock().ttft.observe(&TTFT_BUCKETS, d.as_secs_f64());
    }

    /// Time between two output tokens.
    pub fn token_gap(&self, d: Duration) {
        self.lock().per_token.observe(&TOKEN_BUCKETS, d.as_secs_f64());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The text exposition, with the engines' gauges.
    pub fn render(&self, engines: EngineStats, loaded_models: usize) -> String {
        let c = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# HELP metal_candle_requests_total HTTP requests by endpoint and status.\n# TYPE metal_candle_requests_total counter");
        for ((endpoint, status), n) in &c.requests {
            let _ = writeln!(out, "metal_candle_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(&mut out, "metal_candle_prompt_tokens_total", "Prompt tokens read.", c.prompt_tokens);
        counter(&mut out, "metal_candle_completion_tokens_total", "Tokens generated.", c.completion_tokens);
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut out, "metal_candle_queue_depth", "Requests waiting for a sequence slot.", engines.waiting);
        gauge(&mut out, "metal_candle_running_sequences", "Sequences holding a slot.", engines.running);
        gauge(&mut out, "metal_candle_slots", "Sequence slots of the loaded models.", engines.slots);
        gauge(&mut out, "metal_candle_loaded_models", "Models in memory.", loaded_models);
        c.ttft.write(&mut out, "metal_candle_time_to_first_token_seconds", "Time from request to first token.", &TTFT_BUCKETS);
        c.per_token.write(&mut out, "metal_candle_time_per_output_token_seconds", "Time between output tokens.", &TOKEN_BUCKETS);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.ttft(Duration::from_millis(30));
        m.ttft(Duration::from_secs(100));
        m.request("chat", 200);
        let text = m.render(EngineStats::default(), 1);
        assert!(text.contains("metal_candle_time_to_first_token_seconds_bucket{le=\"0.025\"} 0"), "{text}");
        assert!(text.contains("metal_candle_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("metal_candle_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("metal_candle_requests_total{endpoint=\"chat\",status=\"200\"} 1"));
        assert!(text.contains("metal_candle_loaded_models 1"));
    }
}
