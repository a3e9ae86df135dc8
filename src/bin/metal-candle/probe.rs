//! `metal-candle probe-context`: the largest context a model really handles on this machine
//! (docs/CONTEXT_PROBE.md). The search is `library::probe::search`; this file picks the model,
//! the memory bound and prints.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use metal_candle::device::{default_dtype, parse_dtype, select_device};
use metal_candle::generation::Generator;
use metal_candle::library::passkey::{memory_estimate, PasskeyTrial};
use metal_candle::library::probe::{max_trials, memory_cap, search};
use metal_candle::library::{default_name, probe_result, AddOptions, ContextTrial, Entry, ModelFacts, ProbePlan, SortKey, Trial};
use metal_candle::{DeviceChoice, Error, Result};
use serde_json::json;

use crate::common::{library, load_with_context, no_tokenizer, positive, set_threads, ModelArgs};

/// Memory left free below the available RAM: this fraction of it, at least [`MIN_MARGIN`].
const MARGIN_FRACTION: f64 = 0.10;
const MIN_MARGIN: u64 = 512 << 20;

#[derive(Args)]
pub struct ProbeArgs {
    /// A library name, GGUF file or model directory (a path not in the library is added to it
    /// by reference, so its trials persist).
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    model: Option<PathBuf>,
    /// Probe every model in the library, in `--sort` order.
    #[arg(long)]
    all: bool,
    /// With --all: name, size, ctx or tested.
    #[arg(long, default_value = "name")]
    sort: SortKey,
    /// The first attempt is at most this many tokens (keeps a big model from taking the machine
    /// down).
    #[arg(long, default_value_t = 102_400, allow_negative_numbers = true)]
    threshold: i64,
    /// The shortest length tested.
    #[arg(long, default_value_t = 512, allow_negative_numbers = true)]
    min: i64,
    /// Skip lengths whose estimated memory exceeds this many bytes (default: available RAM
    /// minus 10%, at least 512 MiB).
    #[arg(long)]
    max_memory: Option<u64>,
    /// Print, as the last line, {"model", "declared", "tested", "first_failure", "limit_factor",
    /// "efficiency", "trials": [...]}.
    #[arg(long)]
    json: bool,
    /// Seeds the hidden numbers (one per length).
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// f32, f16 or bf16 (default: f32 on CPU, f16 on GPUs).
    #[arg(long)]
    dtype: Option<String>,
    /// auto, cpu, metal or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long, allow_negative_numbers = true)]
    threads: Option<i64>,
}

pub fn run(args: ProbeArgs) -> Result<()> {
    set_threads(args.threads)?;
    if let Some(m) = &args.model {
        return probe_one(&args, &entry_for(m)?);
    }
    // --all: a model that cannot be probed (too short for --min, unloadable) is reported and
    // skipped; the command fails at the end if any was.
    let mut failed = Vec::new();
    for entry in library().list(args.sort)? {
        if let Err(e) = probe_one(&args, &entry) {
            eprintln!("error: {}: {e}", entry.name);
            failed.push(entry.name);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidParameter { name: "all", reason: format!("not probed: {}", failed.join(", ")) })
    }
}

/// The library entry a `--model` names; a path not in the library is added by reference.
fn entry_for(model: &Path) -> Result<Entry> {
    let lib = library();
    if !model.exists() {
        return lib.get(&model.to_string_lossy());
    }
    if let Some(entry) = lib.find_path(model)? {
        return Ok(entry);
    }
    let entry = lib.add(model, &AddOptions { name: Some(default_name(model)), copy: false })?;
    eprintln!("added {} to the library as `{}`", model.display(), entry.name);
    Ok(entry)
}

fn probe_one(args: &ProbeArgs, entry: &Entry) -> Result<()> {
    let lib = library();
    let facts = entry.facts.clone();
    let plan = ProbePlan {
        declared: facts.declared_context,
        threshold: positive("threshold", args.threshold)?,
        min: positive("min", args.min)?,
        max_memory: Some(args.max_memory.map_or_else(default_max_memory, Ok)?),
    };
    let mut model = LazyTrial::new(args, entry, &plan)?;
    let cap = memory_cap(&|l| model.memory_needed(l), plan.min, plan.threshold.min(plan.declared), plan.max_memory);
    model.bound = cap.map_or(0, |c| max_trials(c, plan.min));
    eprintln!(
        "probe {}: declared {}, first attempt {}, at most {} trials",
        entry.name,
        plan.declared,
        cap.map_or_else(|| "none (memory)".into(), |c| c.to_string()),
        model.bound,
    );
    let history = entry.probe.trials.clone();
    let mut record = |t: &Trial| {
        lib.record_trial(&entry.name, t)?;
        progress_done(t);
        Ok(())
    };
    let outcome = search(&mut model, &plan, &history, &mut record)?;
    let result = probe_result(plan.declared, &outcome, &machine());
    lib.record_result(&entry.name, &result)?;
    let tested = result.tested.map_or_else(|| "none".into(), |t| t.to_string());
    let failure = result.first_failure.map_or_else(|| "none".into(), |t| t.to_string());
    eprintln!(
        "{}: declared {}, tested {tested}, first failure {failure}, limited by {}, efficiency {:.3} ({} new trials)",
        entry.name,
        result.declared,
        result.limit_factor.as_str(),
        result.efficiency,
        outcome.trials_run
    );
    if args.json {
        let trials = lib.get(&entry.name)?.probe.trials;
        let line = json!({
            "model": entry.name,
            "declared": result.declared,
            "tested": result.tested,
            "first_failure": result.first_failure,
            "limit_factor": result.limit_factor.as_str(),
            "efficiency": result.efficiency,
            "trials": trials.iter().map(|t| json!({"length": t.length, "passed": t.passed, "seconds": t.seconds, "peak_rss": t.peak_rss})).collect::<Vec<_>>(),
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").map_err(|e| Error::Io { path: "<stdout>".into(), source: e })?;
    }
    Ok(())
}

/// The passkey trial, with the model loaded at the first trial that needs it (a probe whose
/// trials are all in the registry loads nothing).
struct LazyTrial {
    model_args: ModelArgs,
    ctx: usize,
    facts: ModelFacts,
    dtype_bytes: u64,
    seed: u64,
    trial: Option<PasskeyTrial>,
    /// Trials started by this process, and the most the search runs.
    started: usize,
    bound: usize,
}

impl LazyTrial {
    fn new(args: &ProbeArgs, entry: &Entry, plan: &ProbePlan) -> Result<Self> {
        let device = select_device(args.device.parse::<DeviceChoice>()?)?;
        let dtype = match &args.dtype {
            Some(d) => parse_dtype(d)?,
            None => default_dtype(&device),
        };
        let model_args = ModelArgs {
            model: entry.path.clone(),
            tokenizer: None,
            dtype: args.dtype.clone(),
            device: args.device.clone(),
            adapters: Vec::new(),
            check_tensors: false,
            verbose: false,
            quantize: None,
        };
        let ctx = plan.threshold.min(plan.declared);
        Ok(Self { model_args, ctx, facts: entry.facts.clone(), dtype_bytes: dtype.size_in_bytes() as u64, seed: args.seed, trial: None, started: 0, bound: 0 })
    }
}

impl ContextTrial for LazyTrial {
    fn memory_needed(&self, length: usize) -> u64 {
        memory_estimate(&self.facts, length, self.dtype_bytes)
    }

    fn run(&mut self, length: usize) -> Result<Trial> {
        let trial = match &mut self.trial {
            Some(t) => t,
            None => {
                let loaded = load_with_context(&self.model_args, Some(self.ctx))?;
                let tok = loaded.tokenizer.as_ref().ok_or_else(no_tokenizer)?;
                let generator = Generator::new(&loaded.model, tok);
                self.trial.insert(PasskeyTrial::new(generator, self.facts.clone(), self.seed))
            }
        };
        self.started += 1;
        let _bar = Progress::start(format!("trial {} (at most {}) at {length} tokens", self.started, self.bound));
        trial.run(length)
    }
}

/// The current trial on stderr: on a terminal an indicatif spinner with the trial, its length
/// and the elapsed time (cleared when the trial ends), else one line when it starts.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn start(label: String) -> Self {
        if !std::io::stderr().is_terminal() {
            let _ = writeln!(std::io::stderr(), "  {label} …");
            return Self(None);
        }
        let style = indicatif::ProgressStyle::with_template("  {spinner} {msg} … {elapsed}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        let bar = indicatif::ProgressBar::new_spinner().with_style(style).with_message(label);
        bar.enable_steady_tick(std::time::Duration::from_millis(250));
        Self(Some(bar))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

fn progress_done(t: &Trial) {
    let rss = t.peak_rss.map_or_else(String::new, |r| format!(", peak RSS {:.0} MB", r as f64 / 1e6));
    let error = t.error.as_deref().map_or_else(String::new, |e| format!(" ({e})"));
    eprintln!("  {:>7} tokens: {} in {:.1} s{rss}{error}", t.length, if t.passed { "pass" } else { "FAIL" }, t.seconds);
}

/// Available RAM (Linux `MemAvailable`) minus a margin; elsewhere no bound is known and the
/// caller must pass `--max-memory`.
pub(crate) fn default_max_memory() -> Result<u64> {
    let available = meminfo("MemAvailable:").ok_or_else(|| Error::InvalidParameter {
        name: "max_memory",
        reason: "available memory is unknown on this platform; pass --max-memory BYTES".into(),
    })?;
    let margin = ((available as f64 * MARGIN_FRACTION) as u64).max(MIN_MARGIN);
    Ok(available.saturating_sub(margin))
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `x86_64-linux, 16 threads, 64 GB RAM`.
fn machine() -> String {
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    let ram = meminfo("MemTotal:").map_or_else(String::new, |b| format!(", {:.0} GB RAM", b as f64 / 1e9));
    format!("{}-{}, {threads} threads{ram}", std::env::consts::ARCH, std::env::consts::OS)
}
