//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition / presence / frequency
//! penalties over a window of recent tokens, logit bias, and a seed.
//!
//! [`SamplingParams`] holds the settings and validates them ([`SamplingParams::validate`]); a
//! [`Sampler`] built from them picks one id from a row of logits. The order of the steps follows HF
//! transformers' logits processors: bias → penalties → temperature → top-k → top-p → min-p → draw.
//! Temperature 0 is greedy: only bias and penalties apply, then argmax. The same seed and settings
//! give the same tokens on every run (a ChaCha-based `StdRng`).
//!
//! ```
//! use metal_candle::sampling::{Sampler, SamplingParams};
//! let params = SamplingParams { temperature: 0.7, top_p: 0.9, seed: 42, ..SamplingParams::default() };
//! let mut sampler = Sampler::from_params(&params)?;
//! let mut logits = vec![0.1, 3.0, -1.0, 2.9];
//! let id = sampler.sample_with_history(&mut logits, &[])?;
//! assert!(id == 1 || id == 3);
//! # Ok::<(), metal_candle::Error>(())
//! ```

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Temperatures above this are rejected as almost certainly a mistake.
pub const MAX_TEMPERATURE: f64 = 100.0;

/// Largest accepted repetition penalty (HF's CTRL-style divisor).
pub const MAX_REPETITION_PENALTY: f32 = 100.0;

/// Largest accepted absolute presence / frequency penalty.
pub const MAX_ADDITIVE_PENALTY: f32 = 100.0;

/// Default number of recent tokens (prompt included) the penalties look at (llama.cpp's
/// `penalty_last_n`).
pub const DEFAULT_PENALTY_WINDOW: usize = 64;

/// Sampling settings. The defaults are greedy decoding with every filter and penalty off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature in [0, [`MAX_TEMPERATURE`]]; 0 is greedy (argmax).
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens; 0 turns it off. Negative is an error.
    pub top_k: i64,
    /// Nucleus sampling: keep the smallest set whose probability reaches `top_p`, in (0, 1].
    pub top_p: f64,
    /// Drop tokens whose probability is below `min_p` × the top probability, in [0, 1].
    pub min_p: f64,
    /// HF / CTRL repetition penalty (> 0; 1 is off): seen logits are divided (if positive) or
    /// multiplied (if negative) by it.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token seen in the window (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in the window (OpenAI semantics).
    pub frequency_penalty: f32,
    /// How many of the most recent tokens (prompt included) the penalties consider.
    pub penalty_window: usize,
    /// `(token id, bias)` pairs added to the logits before anything else; `-inf` bans a token.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_window: DEFAULT_PENALTY_WINDOW,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

fn invalid(name: &'static str, reason: String) -> Error {
    Error::InvalidParameter { name, reason }
}

impl SamplingParams {
    /// Checks every setting; the error names the first parameter out of range. Values are never
    /// clamped silently.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(invalid("temperature", format!("{t} is not in [0, {MAX_TEMPERATURE}]")));
        }
        if self.top_k < 0 {
            return Err(invalid("top_k", format!("{} is negative (0 turns top-k off)", self.top_k)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", format!("{} is not in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(invalid("min_p", format!("{} is not in [0, 1]", self.min_p)));
        }
        let rp = self.repetition_penalty;
        if !(rp > 0.0 && rp <= MAX_REPETITION_PENALTY) {
            return Err(invalid("repetition_penalty", format!("{rp} is not in (0, {MAX_REPETITION_PENALTY}]")));
        }
        for (name, p) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if p.is_nan() || p.abs() > MAX_ADDITIVE_PENALTY {
                return Err(invalid(name, format!("{p} is not in [-{MAX_ADDITIVE_PENALTY}, {MAX_ADDITIVE_PENALTY}]")));
            }
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan() || *b == f32::INFINITY) {
            return Err(invalid("logit_bias", format!("bias {b} for token {id} is not finite or -inf")));
        }
        Ok(())
    }

    /// Checks the logit-bias ids against a vocabulary of `vocab` ids.
    pub fn validate_ids(&self, vocab: usize) -> Result<()> {
        match self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            Some((id, _)) => Err(invalid("logit_bias", format!("token id {id} is outside the vocabulary of {vocab}"))),
            None => Ok(()),
        }
    }

    fn penalties_active(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// Picks the next token from a row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch for the candidates of one draw (kept between calls).
    cands: Vec<(u32, f32)>,
    /// Scratch for the block sums of a whole-row draw.
    block_sums: Vec<f64>,
}

impl Sampler {
    /// A sampler with only a temperature (0 means greedy). Same seed and settings → same tokens.
    ///
    /// Errors: [`Error::InvalidParameter`] naming `temperature`.
    pub fn new(temperature: f64, seed: u64) -> Result<Self> {
        Self::from_params(&SamplingParams { temperature, seed, ..SamplingParams::default() })
    }

    /// A sampler for validated `params`. Errors: [`Error::InvalidParameter`] naming the parameter.
    pub fn from_params(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self { params: params.clone(), rng: StdRng::seed_from_u64(params.seed), cands: Vec::new(), block_sums: Vec::new() })
    }

    /// The settings this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples an id from `logits` (one per vocabulary entry) with no token history, so penalties
    /// have nothing to act on. Non-finite logits never win.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let mut row = logits.to_vec();
        self.sample_with_history(&mut row, &[])
    }

    /// Samples an id from `logits`, which are modified in place (bias, penalties). `history` is the
    /// token sequence so far (prompt and generated); its last `penalty_window` ids are penalised.
    ///
    /// Errors: [`Error::InvalidParameter`] (`logits`) when no logit is finite after masking.
    pub fn sample_with_history(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32> {
        apply_bias(logits, &self.params.logit_bias);
        if self.params.penalties_active() {
            let start = history.len().saturating_sub(self.params.penalty_window);
            apply_penalties(logits, &history[start..], &self.params);
        }
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let p = &self.params;
        if (p.top_k == 0 || p.top_k as usize >= logits.len()) && p.top_p >= 1.0 && p.min_p == 0.0 {
            // Temperature alone (what most API clients send): no candidate list at all.
            let u = self.rng.random::<f64>();
            return match draw_whole_row(logits, (1.0 / p.temperature) as f32, u, &mut self.block_sums) {
                Some(id) => Ok(id),
                None => argmax(logits),
            };
        }
        let candidates = Self::filter(&self.params, &mut self.cands, logits);
        if candidates.is_empty() {
            return argmax(logits);
        }
        Ok(walk(candidates, self.rng.random::<f64>()))
    }

    /// Candidates `(id, unnormalised probability)` left after temperature, top-k, top-p and min-p,
    /// in `cands` (the sampler's scratch, reused from call to call: no allocation per token once it
    /// has grown).
    ///
    /// The weights are `exp((logit − max) / T)` in f32 ([`exp_f32`], within 3e-7 of f64's `exp`),
    /// so the largest is exactly 1. Top-p needs the candidates in descending order only until their
    /// mass reaches `top_p`: the head is selected and sorted in growing slices (64, 256, …) instead
    /// of sorting the whole vocabulary; the kept set and its order are those of a full sort by
    /// (weight descending, id ascending).
    fn filter<'a>(p: &SamplingParams, cands: &'a mut Vec<(u32, f32)>, logits: &[f32]) -> &'a [(u32, f32)] {
        cands.clear();
        cands.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)));
        let k = p.top_k as usize;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cands.truncate(k);
        }
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let inv_t = (1.0 / p.temperature) as f32;
        exp_weights(cands, max, inv_t);
        if p.top_p < 1.0 {
            let keep = nucleus(cands, p.top_p);
            cands.truncate(keep);
        }
        if p.min_p > 0.0 {
            // The largest weight is exp(0) = 1 before top-p/top-k, and stays 1 after them.
            let top = cands.iter().map(|c| c.1).fold(0.0, f32::max);
            let floor = (p.min_p * f64::from(top)) as f32;
            cands.retain(|c| c.1 >= floor);
        }
        cands
    }
}

/// The draw from non-empty `cands`, `u` uniform in [0, 1): the first candidate whose cumulative
/// weight passes `u · total` (the last one if rounding leaves `u · total` past every weight).
fn walk(cands: &[(u32, f32)], u: f64) -> u32 {
    let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
    let mut r = u * total;
    for &(id, w) in cands {
        let w = f64::from(w);
        if r < w {
            return id;
        }
        r -= w;
    }
    cands.last().map_or(0, |c| c.0)
}

/// Logits per block of a whole-row draw.
const BLOCK: usize = 256;
/// Independent f32 sums inside a block (so the sum vectorises).
const LANES: usize = 16;

/// The weight of one logit in a whole-row draw: `exp((l − max) · inv_t)`, 0 when not finite.
#[inline(always)]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    if l.is_finite() {
        exp_f32((l - max) * inv_t)
    } else {
        0.0
    }
}

/// `sums` ← Σ weights of each `BLOCK` logits of the row. On x86-64 with AVX2 + FMA the same code
/// compiled for them (8 lanes per instruction instead of SSE2's 4), chosen once per row.
fn block_sums(logits: &[f32], max: f32, inv_t: f32, sums: &mut Vec<f64>) {
    sums.clear();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { block_sums_avx2(logits, max, inv_t, sums) };
        }
    }
    sums.extend(logits.chunks(BLOCK).map(|b| block_sum(b, max, inv_t)));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_sums_avx2(logits: &[f32], max: f32, inv_t: f32, sums: &mut Vec<f64>) {
    sums.extend(logits.chunks(BLOCK).map(|b| block_sum(b, max, inv_t)));
}

/// Σ weights of one block: `LANES` f32 partial sums, added in f64.
#[inline(always)]
fn block_sum(block: &[f32], max: f32, inv_t: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let mut chunks = block.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] += weight(c[j], max, inv_t);
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&l| f64::from(weight(l, max, inv_t))).sum();
    acc.iter().map(|&a| f64::from(a)).sum::<f64>() + rest
}

/// One draw from softmax(logits / T) over the whole row, `u` uniform in [0, 1): the block whose
/// cumulative weight passes `u · total` is found from the block sums, then the token inside it by
/// the same sequential walk as the candidate path. `None` when no logit is finite. The same
/// distribution as [`Sampler::filter`] + the walk (a boundary can move by the rounding of a block
/// sum, ~1e-7 of it).
fn draw_whole_row(logits: &[f32], inv_t: f32, u: f64, sums: &mut Vec<f64>) -> Option<u32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| if l.is_finite() { m.max(l) } else { m });
    if max == f32::NEG_INFINITY {
        return None;
    }
    block_sums(logits, max, inv_t, sums);
    let total: f64 = sums.iter().sum();
    let mut r = u * total;
    for (bi, (&s, block)) in sums.iter().zip(logits.chunks(BLOCK)).enumerate() {
        if s <= 0.0 {
            continue;
        }
        if r < s {
            let mut last = None;
            for (j, &l) in block.iter().enumerate() {
                let w = f64::from(weight(l, max, inv_t));
                if w > 0.0 {
                    last = Some((bi * BLOCK + j) as u32);
                    if r < w {
                        return last;
                    }
                    r -= w;
                }
            }
            return last; // r outlived the block by rounding: its last token
        }
        r -= s;
    }
    // Rounding left r past the total: the last token with a weight.
    logits.iter().rposition(|&l| weight(l, max, inv_t) > 0.0).map(|i| i as u32)
}

/// `(id, logit)` → `(id, exp((logit − max) · inv_t))` in place, through [`exp_f32`].
fn exp_weights(cands: &mut [(u32, f32)], max: f32, inv_t: f32) {
    for c in cands.iter_mut() {
        c.1 = exp_f32((c.1 - max) * inv_t);
    }
}

/// How many of `cands` (weights, any order) nucleus sampling keeps; on return the first that many
/// are the heaviest, sorted by (weight descending, id ascending), as a full sort would leave them.
fn nucleus(cands: &mut [(u32, f32)], top_p: f64) -> usize {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let total: f64 = cands.iter().map(|c| f64::from(c.1)).sum();
    let target = top_p * total;
    let mut head = 64.min(cands.len());
    loop {
        if head < cands.len() {
            cands.select_nth_unstable_by(head - 1, order);
        }
        cands[..head].sort_unstable_by(order);
        let mut acc = 0.0;
        if let Some(i) = cands[..head].iter().position(|c| {
            acc += f64::from(c.1);
            acc >= target
        }) {
            return i + 1;
        }
        if head == cands.len() {
            return head;
        }
        head = (head * 4).min(cands.len());
    }
}

/// `eˣ` in f32 for x ≤ 0 (the sampler's weights), plain arithmetic the compiler vectorises:
/// x = n·ln2 + r with |r| ≤ ln2/2 (Cody–Waite split of ln2), a degree-7 Taylor polynomial for eʳ,
/// times 2ⁿ built in the exponent bits. Relative error below 3e-7 (tested against f64 `exp`);
/// exactly 1 at 0; 0 below −87 (where f32 would go subnormal) and for NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln2 = LN2_HI − LN2_LO; LN2_HI has 9 significant bits, so n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = 2.121_944_4e-4;
    // Rounds to the nearest integer for |v| < 2²², without a libm call.
    const ROUND: f32 = 12_582_912.0;
    // Straight-line code with selects (no early return), so loops over it vectorise.
    let keep = x >= -87.0; // false for NaN too
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) + n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n is an integer in [-126, 0] here: the exponent bits of 2ⁿ.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if keep {
        poly * scale
    } else {
        0.0
    }
}

fn apply_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(id, b) in bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
}

/// Repetition penalty as HF's `RepetitionPenaltyLogitsProcessor` (once per distinct token), then
/// OpenAI's presence and frequency penalties.
fn apply_penalties(logits: &mut [f32], window: &[u32], p: &SamplingParams) {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for &id in window {
        *counts.entry(id).or_default() += 1;
    }
    for (&id, &n) in &counts {
        let Some(l) = logits.get_mut(id as usize) else { continue };
        if p.repetition_penalty != 1.0 {
            *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
        }
        *l -= p.presence_penalty + p.frequency_penalty * n as f32;
    }
}

/// Index of the largest logit, NaNs ignored.
///
/// Errors: [`Error::InvalidParameter`] (`logits`) when the row is empty or all NaN.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .ok_or_else(|| invalid("logits", "no finite logits to sample from".into()))
}

/// Log-probability of the chosen token and the `top_n` most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// log p(chosen) under the model's distribution.
    pub logprob: f32,
    /// `(id, log p)` of the `top_n` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax statistics of a logits row: the model's own distribution, before bias, penalties,
/// temperature or filters. Non-finite logits get log p = -inf.
pub fn logprobs(logits: &[f32], chosen: u32, top_n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().filter(|x| x.is_finite()).map(|&l| f64::from(l - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| if l.is_finite() { (f64::from(l) - lse) as f32 } else { f32::NEG_INFINITY };
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = top_n.min(idx.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_logit);
    }
    idx.truncate(n);
    idx.sort_unstable_by(by_logit);
    TokenLogprobs {
        logprob: logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: idx.into_iter().map(|i| (i, lp(logits[i as usize]))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { temperature: 1.0, seed: 7, ..SamplingParams::default() };
        f(&mut p);
        p
    }

    /// Distinct ids drawn in `n` samples.
    fn drawn(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::from_params(p).unwrap();
        let mut ids: Vec<u32> = (0..n).map(|_| s.sample(logits).unwrap()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    #[test]
    fn exp_f32_equals_f64_exp() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NAN), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4; // 0 … −87
            let want = f64::from(x).exp();
            let rel = (f64::from(exp_f32(x)) - want).abs() / want;
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }

    /// The plain twin of `Sampler::filter`: f64 weights, a full sort for top-p (the code before the
    /// f32 weights and the partial sort).
    fn filter_reference(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f64)> {
        let mut cands: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)).collect();
        let k = p.top_k as usize;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cands.truncate(k);
        }
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> =
            cands.iter().map(|&(i, l)| (i, (f64::from(l - max) / p.temperature).exp())).collect();
        if p.top_p < 1.0 {
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let total: f64 = probs.iter().map(|c| c.1).sum();
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|c| {
                    acc += c.1;
                    acc >= p.top_p * total
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let top = probs.iter().map(|c| c.1).fold(0.0, f64::max);
            probs.retain(|c| c.1 >= p.min_p * top);
        }
        probs
    }

    /// The filter keeps the same candidates as its f64 full-sort twin, in the same order where the
    /// twin sorts (top-p), with weights within 3e-7: on a flat row, a peaked one and one with ties,
    /// -inf and NaN, for top-p values whose nucleus needs one, several and all of the head slices.
    #[test]
    fn filter_equals_its_f64_full_sort_twin() {
        let vocab = 5000;
        let flat: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 / 500.0).collect();
        let peaked: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - (i % 13) as f32).collect();
        let mut ties: Vec<f32> = (0..vocab).map(|i| (i % 7) as f32).collect();
        ties[3] = f32::NEG_INFINITY;
        ties[10] = f32::NAN;
        for row in [&flat, &peaked, &ties] {
            for (top_k, top_p, min_p, t) in [(0, 1.0, 0.0, 1.0), (0, 0.3, 0.0, 0.7), (0, 0.9, 0.0, 1.3), (0, 0.999, 0.0, 1.0), (40, 0.9, 0.05, 0.8), (0, 1.0, 0.1, 2.0)] {
                let p = params(|p| {
                    p.top_k = top_k;
                    p.top_p = top_p;
                    p.min_p = min_p;
                    p.temperature = t;
                });
                let want = filter_reference(&p, row);
                let mut buf = Vec::new();
                let got = Sampler::filter(&p, &mut buf, row).to_vec();
                assert_eq!(got.len(), want.len(), "{top_k} {top_p} {min_p} {t}");
                let (mut g, mut w) = (got.clone(), want.clone());
                if top_p == 1.0 {
                    g.sort_by_key(|c| c.0);
                    w.sort_by_key(|c| c.0);
                }
                for (a, b) in g.iter().zip(&w) {
                    assert_eq!(a.0, b.0, "{top_k} {top_p} {min_p} {t}");
                    assert!((f64::from(a.1) - b.1).abs() <= 3e-7 * b.1, "{} vs {}", a.1, b.1);
                }
            }
        }
    }

    /// The whole-row draw (temperature alone) picks what the candidate path's sequential walk
    /// picks for the same uniform number, over 2000 of them on three rows.
    #[test]
    fn whole_row_draw_equals_the_candidate_walk() {
        let vocab = 5000;
        let flat: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 / 500.0).collect();
        let peaked: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 / 50.0 - (i % 13) as f32).collect();
        let mut holes = flat.clone();
        for i in (0..vocab).step_by(3) {
            holes[i] = f32::NEG_INFINITY;
        }
        holes[7] = f32::NAN;
        for row in [&flat, &peaked, &holes] {
            let p = params(|p| p.temperature = 0.8);
            let mut buf = Vec::new();
            let cands = Sampler::filter(&p, &mut buf, row).to_vec();
            let mut sums = Vec::new();
            for i in 0..2000 {
                let u = (i as f64 + 0.37) / 2000.0;
                assert_eq!(draw_whole_row(row, 1.0 / 0.8, u, &mut sums), Some(walk(&cands, u)), "u = {u}");
            }
        }
        let mut sums = Vec::new();
        assert_eq!(draw_whole_row(&[f32::NAN, f32::NEG_INFINITY], 1.0, 0.5, &mut sums), None);
    }

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        assert_eq!(Sampler::new(0.0, 1).unwrap().sample(&logits).unwrap(), 1);
        let run = |seed| {
            let mut s = Sampler::new(1.0, seed).unwrap();
            (0..20).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert!(run(7).contains(&3), "temperature 1 should sometimes pick the runner-up");
        assert!(argmax(&[]).is_err());
        assert!(argmax(&[f32::NAN]).is_err());
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NEG_INFINITY]).unwrap(), 1);
    }

    #[test]
    fn every_invalid_value_names_its_parameter() {
        let cases: Vec<(&str, SamplingParams)> = vec![
            ("temperature", params(|p| p.temperature = -0.5)),
            ("temperature", params(|p| p.temperature = f64::NAN)),
            ("temperature", params(|p| p.temperature = 1e9)),
            ("top_k", params(|p| p.top_k = -1)),
            ("top_p", params(|p| p.top_p = 0.0)),
            ("top_p", params(|p| p.top_p = 1.5)),
            ("top_p", params(|p| p.top_p = f64::NAN)),
            ("min_p", params(|p| p.min_p = -0.1)),
            ("min_p", params(|p| p.min_p = 2.0)),
            ("repetition_penalty", params(|p| p.repetition_penalty = 0.0)),
            ("repetition_penalty", params(|p| p.repetition_penalty = f32::NAN)),
            ("presence_penalty", params(|p| p.presence_penalty = f32::INFINITY)),
            ("frequency_penalty", params(|p| p.frequency_penalty = f32::NAN)),
            ("logit_bias", params(|p| p.logit_bias = vec![(1, f32::NAN)])),
            ("logit_bias", params(|p| p.logit_bias = vec![(1, f32::INFINITY)])),
        ];
        for (name, p) in cases {
            match Sampler::from_params(&p) {
                Err(Error::InvalidParameter { name: got, .. }) => assert_eq!(got, name, "{p:?}"),
                other => panic!("{name}: expected an error, got {other:?}"),
            }
        }
        let ok = params(|p| p.logit_bias = vec![(3, f32::NEG_INFINITY)]);
        assert!(ok.validate().is_ok());
        assert!(matches!(ok.validate_ids(3), Err(Error::InvalidParameter { name: "logit_bias", .. })));
        assert!(ok.validate_ids(4).is_ok());
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let logits = [1.0, 1.1, 0.9, 1.05, 0.5];
        assert_eq!(drawn(&params(|p| p.top_k = 1), &logits, 50), vec![1]);
        assert_eq!(drawn(&params(|p| p.top_k = 2), &logits, 200), vec![1, 3]);
        assert_eq!(drawn(&params(|p| p.top_k = 0), &logits, 400).len(), 5);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities ≈ 0.5, 0.3, 0.2 (logits are their logs).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        assert_eq!(drawn(&params(|p| p.top_p = 0.5), &logits, 100), vec![0]);
        assert_eq!(drawn(&params(|p| p.top_p = 0.75), &logits, 200), vec![0, 1]);
        assert_eq!(drawn(&params(|p| p.top_p = 1.0), &logits, 400), vec![0, 1, 2]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        // 0.2 / 0.5 = 0.4 < 0.5 ≤ 0.6 = 0.3 / 0.5
        assert_eq!(drawn(&params(|p| p.min_p = 0.5), &logits, 200), vec![0, 1]);
        assert_eq!(drawn(&params(|p| p.min_p = 1.0), &logits, 100), vec![0]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [2.0, 1.0];
        let count0 = |t: f64| {
            let mut s = Sampler::new(t, 3).unwrap();
            (0..2000).filter(|_| s.sample(&logits).unwrap() == 0).count()
        };
        let (cold, warm, hot) = (count0(0.25), count0(1.0), count0(20.0));
        assert!(cold > 1950 && (1350..1600).contains(&warm) && (900..1150).contains(&hot), "{cold} {warm} {hot}");
    }

    #[test]
    fn penalties_act_on_the_window_only() {
        let greedy = |f: fn(&mut SamplingParams), history: &[u32]| {
            let mut p = SamplingParams::default();
            f(&mut p);
            let mut s = Sampler::from_params(&p).unwrap();
            s.sample_with_history(&mut [2.0, 1.8, -1.0], history).unwrap()
        };
        assert_eq!(greedy(|_| {}, &[0, 0]), 0);
        // 2.0 / 1.5 = 1.33 < 1.8
        assert_eq!(greedy(|p| p.repetition_penalty = 1.5, &[0]), 1);
        // Negative logits are multiplied: token 2 stays last.
        assert_eq!(greedy(|p| p.repetition_penalty = 1.5, &[2]), 0);
        assert_eq!(greedy(|p| p.presence_penalty = 0.3, &[0]), 1);
        assert_eq!(greedy(|p| p.presence_penalty = 0.1, &[0, 0, 0]), 0);
        assert_eq!(greedy(|p| p.frequency_penalty = 0.1, &[0, 0, 0]), 1);
        // Token 0 is outside a window of 2.
        assert_eq!(greedy(|p| { p.presence_penalty = 0.3; p.penalty_window = 2 }, &[0, 2, 2]), 0);
    }

    #[test]
    fn logit_bias_and_bans() {
        let mut s = Sampler::from_params(&SamplingParams { logit_bias: vec![(1, 5.0)], ..SamplingParams::default() }).unwrap();
        assert_eq!(s.sample(&[2.0, 0.0, 1.0]).unwrap(), 1);
        let ban = params(|p| p.logit_bias = vec![(0, f32::NEG_INFINITY)]);
        assert_eq!(drawn(&ban, &[5.0, 0.0, 0.0], 100), vec![1, 2]);
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let lp = logprobs(&[0.0, 1.0f32.ln(), 3.0f32.ln(), f32::NEG_INFINITY], 2, 2);
        // softmax of [1, 1, 3, 0] / 5
        assert!((lp.logprob - (0.6f32).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 0]);
        assert!((lp.top[1].1 - (0.2f32).ln()).abs() < 1e-6);
        assert_eq!(logprobs(&[1.0, 2.0], 0, 10).top.len(), 2);
    }
}
