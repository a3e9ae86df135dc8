//! The context probe's search, over any [`ContextTrial`]: find the largest context a model really
//! handles, in few trials, never above its declared limit or the first-attempt threshold.
//!
//! The search (docs/CONTEXT_PROBE.md):
//! 1. `cap` = min(threshold, declared), lowered to the largest length whose estimated memory fits
//!    `max_memory` (no trial is spent on a length that does not fit).
//! 2. Try `cap`. A pass ends the probe: the limit is the declared one, memory or the threshold.
//! 3. Otherwise try `min` (a fail there: no usable context), then bisect between the largest pass
//!    and the smallest fail until they are [`resolution`] apart (1% of `cap`, at least 256
//!    tokens). That is at most [`max_trials`] = ⌈log2((cap − min) / resolution)⌉ + 2 trials.
//!
//! Trials already in `history` (a probe interrupted earlier) are not run again: the bracket starts
//! from them, so a resumed probe runs only the trials the first one did not finish.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The coarsest resolution: a bracket this narrow (or 1% of the cap, if wider) ends the search.
pub const MIN_RESOLUTION: usize = 256;

/// One test at one length, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Context length (prompt + answer tokens).
    pub length: usize,
    /// Whether the answer contained the passkey, with no error.
    pub passed: bool,
    /// Wall time of the trial.
    pub seconds: f64,
    /// Peak resident set size during the trial (where the platform reports it).
    pub peak_rss: Option<u64>,
    /// The error that failed the trial, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A model under test.
pub trait ContextTrial {
    /// Bytes a run at `length` tokens needs (weights, KV cache, activations). Must not decrease
    /// as `length` grows.
    fn memory_needed(&self, length: usize) -> u64;

    /// Runs one test at `length`. A model that answers wrongly or fails (out of memory, a
    /// non-finite value) is a failed [`Trial`]; `Err` is reserved for faults of the harness,
    /// which stop the probe.
    fn run(&mut self, length: usize) -> Result<Trial>;
}

/// What bounds the search.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbePlan {
    /// The model's declared context.
    pub declared: usize,
    /// The first attempt is at most this long.
    pub threshold: usize,
    /// The shortest length tested (at least 1).
    pub min: usize,
    /// Lengths whose [`ContextTrial::memory_needed`] exceeds this are skipped; `None`: no bound.
    pub max_memory: Option<u64>,
}

/// Why the tested context is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitFactor {
    /// Longer contexts would not fit in memory.
    Memory,
    /// The model failed the test at a longer length.
    Quality,
    /// The model passed at its declared limit.
    Declared,
    /// The model passed at the threshold; longer lengths were not tried.
    Threshold,
}

impl LimitFactor {
    /// `memory`, `quality`, `declared` or `threshold`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitFactor::Memory => "memory",
            LimitFactor::Quality => "quality",
            LimitFactor::Declared => "declared",
            LimitFactor::Threshold => "threshold",
        }
    }
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOutcome {
    /// The largest length that passed; `None` when even `min` failed or did not fit.
    pub tested: Option<usize>,
    /// The smallest length that failed.
    pub first_failure: Option<usize>,
    /// Why the search stopped where it did.
    pub limit_factor: LimitFactor,
    /// The first length tried (after the memory bound).
    pub cap: usize,
    /// Trials run by this call (history not counted).
    pub trials_run: usize,
}

/// The result persisted with a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The context the model declares, in tokens.
    pub declared: usize,
    /// The longest context that passed, in tokens; `None` when none did.
    pub tested: Option<usize>,
    /// The shortest context that failed, in tokens, if any was tried.
    pub first_failure: Option<usize>,
    /// Why the tested context is what it is.
    pub limit_factor: LimitFactor,
    /// tested ÷ declared (0 when nothing passed).
    pub efficiency: f64,
    /// The machine it ran on (free text from the caller).
    pub machine: String,
    /// When it finished (RFC 3339, UTC).
    pub date: String,
}

/// The bisection stops when the bracket is this narrow: 1% of `cap`, at least [`MIN_RESOLUTION`].
pub fn resolution(cap: usize) -> usize {
    MIN_RESOLUTION.max(cap.div_ceil(100))
}

/// The most trials a probe from `min` to `cap` runs: ⌈log2((cap − min) / resolution)⌉ + 2.
pub fn max_trials(cap: usize, min: usize) -> usize {
    let steps = cap.saturating_sub(min).div_ceil(resolution(cap)).max(1);
    steps.next_power_of_two().trailing_zeros() as usize + 2
}

/// The largest length in `[min, cap]` whose memory fits, found by bisection over the (monotone)
/// estimate; `None` when not even `min` fits.
pub fn memory_cap(memory_needed: &dyn Fn(usize) -> u64, min: usize, cap: usize, max_memory: Option<u64>) -> Option<usize> {
    let Some(limit) = max_memory else { return Some(cap) };
    if memory_needed(min) > limit {
        return None;
    }
    let (mut lo, mut hi) = (min, cap);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if memory_needed(mid) <= limit {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// Runs the search (module docs). `record` is called with each new trial as it finishes, before
/// the next one starts (the caller persists it).
///
/// Errors: [`Error::InvalidParameter`] for a plan with `min` of 0 or above the cap; whatever
/// `model.run` or `record` return.
pub fn search<T: ContextTrial + ?Sized>(
    model: &mut T,
    plan: &ProbePlan,
    history: &[Trial],
    record: &mut dyn FnMut(&Trial) -> Result<()>,
) -> Result<SearchOutcome> {
    let top = plan.threshold.min(plan.declared);
    if plan.min == 0 || plan.min > top {
        return Err(Error::InvalidParameter {
            name: "min",
            reason: format!("{} must be in 1..={top} (the smaller of threshold and declared context)", plan.min),
        });
    }
    let Some(cap) = memory_cap(&|l| model.memory_needed(l), plan.min, top, plan.max_memory) else {
        return Ok(SearchOutcome { tested: None, first_failure: None, limit_factor: LimitFactor::Memory, cap: 0, trials_run: 0 });
    };
    let mut runner = Runner { model, history: history.to_vec(), record, run: 0 };
    let done = |runner: &Runner<'_, T>, tested, first_failure, limit_factor| SearchOutcome {
        tested,
        first_failure,
        limit_factor,
        cap,
        trials_run: runner.run,
    };
    if runner.outcome(cap)? {
        let factor = if cap < top {
            LimitFactor::Memory
        } else if cap == plan.declared {
            LimitFactor::Declared
        } else {
            LimitFactor::Threshold
        };
        return Ok(done(&runner, Some(cap), None, factor));
    }
    let mut hi = runner.smallest_fail(plan.min, cap).unwrap_or(cap);
    let mut lo = match runner.largest_pass(plan.min, hi) {
        Some(lo) => lo,
        None if runner.outcome(plan.min)? => plan.min,
        None => return Ok(done(&runner, None, Some(plan.min), LimitFactor::Quality)),
    };
    let res = resolution(cap);
    while hi - lo > res {
        let mid = lo + (hi - lo).div_ceil(2);
        if runner.outcome(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(done(&runner, Some(lo), Some(hi), LimitFactor::Quality))
}

struct Runner<'a, T: ?Sized> {
    model: &'a mut T,
    history: Vec<Trial>,
    record: &'a mut dyn FnMut(&Trial) -> Result<()>,
    run: usize,
}

impl<T: ContextTrial + ?Sized> Runner<'_, T> {
    /// Whether `length` passes: from the latest trial at that length, else a new trial.
    fn outcome(&mut self, length: usize) -> Result<bool> {
        if let Some(t) = self.history.iter().rev().find(|t| t.length == length) {
            return Ok(t.passed);
        }
        let trial = self.model.run(length)?;
        (self.record)(&trial)?;
        self.run += 1;
        let passed = trial.passed;
        self.history.push(trial);
        Ok(passed)
    }

    /// The smallest failed length in `[lo, hi]` among trials already run.
    fn smallest_fail(&self, lo: usize, hi: usize) -> Option<usize> {
        self.history.iter().filter(|t| !t.passed && (lo..=hi).contains(&t.length)).map(|t| t.length).min()
    }

    /// The largest passed length in `[lo, hi)` among trials already run.
    fn largest_pass(&self, lo: usize, hi: usize) -> Option<usize> {
        self.history.iter().filter(|t| t.passed && (lo..hi).contains(&t.length)).map(|t| t.length).max()
    }
}
