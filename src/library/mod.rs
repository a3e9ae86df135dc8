//! The local model library: one data directory holding a `models/` folder (models copied in) and
//! `registry.json` (every model known by name, with its facts and context-probe trials).
//!
//! Names are stable ids: `metal-candle … --model smollm2` resolves through
//! [`ModelLibrary::resolve`]. Models added by path stay where they are; removing one never deletes
//! a file outside the library's own `models/` folder. Configuration is data: the caller picks
//! [`LibraryConfig::home`] (the CLI maps `$METAL_CANDLE_HOME` onto it).
//!
//! Models in the Hugging Face Hub cache ([`LibraryConfig::hf_cache`]) are listed too, by repo
//! id (`ORG/NAME`, or `ORG/NAME:STEM` for a GGUF file), without being copied; the first time one
//! is used by name (or probed) it is recorded in the registry like a model added by path
//! ([`Entry::hf_cache`]).
//!
//! ```no_run
//! use metal_candle::library::{AddOptions, LibraryConfig, ModelLibrary, SortKey};
//! # fn main() -> metal_candle::Result<()> {
//! let library = ModelLibrary::open(&LibraryConfig { home: "/tmp/mc-home".into(), hf_cache: None });
//! library.add("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), &AddOptions { name: Some("smollm2".into()), copy: false })?;
//! for entry in library.list(SortKey::Name)? {
//!     println!("{} {} ctx {}", entry.name, entry.facts.architecture, entry.facts.declared_context);
//! }
//! # Ok(()) }
//! ```

pub mod adapters;
pub mod facts;
pub mod hf_cache;
pub mod passkey;
pub mod probe;
pub mod store;

use std::path::{Path, PathBuf};

pub use adapters::{AdapterEntry, AdapterFacts};
pub use facts::ModelFacts;
pub use probe::{ContextTrial, LimitFactor, ProbePlan, ProbeResult, SearchOutcome, Trial};
pub use store::{Entry, ProbeRecord, Registry};

use crate::error::{Error, Result};

/// Where the library lives.
#[derive(Debug, Clone, PartialEq)]
pub struct LibraryConfig {
    /// The data directory (`registry.json`, `models/`).
    pub home: PathBuf,
    /// A Hugging Face Hub cache to list models from (`$HF_HUB_CACHE`, default
    /// `~/.cache/huggingface/hub` for the CLI); `None`: only the library's own models.
    pub hf_cache: Option<PathBuf>,
}

/// How [`ModelLibrary::list`] orders entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// By name, ascending.
    Name,
    /// Largest on disk first.
    Size,
    /// Longest declared context first.
    Ctx,
    /// Longest tested context first; untested last.
    Tested,
}

impl std::str::FromStr for SortKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "name" => Ok(SortKey::Name),
            "size" => Ok(SortKey::Size),
            "ctx" => Ok(SortKey::Ctx),
            "tested" => Ok(SortKey::Tested),
            _ => Err(Error::InvalidParameter { name: "sort", reason: format!("`{s}`: expected name, size, ctx or tested") }),
        }
    }
}

/// How [`ModelLibrary::add`] takes a model in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AddOptions {
    /// The id; default: the file or directory name without `.gguf`.
    pub name: Option<String>,
    /// Copy it into the library's `models/` folder (else it is referenced where it is).
    pub copy: bool,
}

/// What [`ModelLibrary::remove`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Removed {
    /// The name that was removed (a model's or an adapter's).
    pub name: String,
    /// Where it was.
    pub path: PathBuf,
    /// The copy inside the library that was deleted with it (`None`: the model was referenced
    /// by path, and its files were left alone).
    pub deleted: Option<PathBuf>,
}

/// The library in one data directory. Each operation reads `registry.json` afresh and writes it
/// back atomically, so several processes see each other's changes (the last writer of one
/// entry wins).
#[derive(Debug, Clone)]
pub struct ModelLibrary {
    home: PathBuf,
    hf_cache: Option<PathBuf>,
}

impl ModelLibrary {
    /// The library at `config.home`. Nothing is created until the first change.
    pub fn open(config: &LibraryConfig) -> Self {
        Self { home: config.home.clone(), hf_cache: config.hf_cache.clone() }
    }

    /// The data directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `home/registry.json`.
    pub fn registry_path(&self) -> PathBuf {
        self.home.join("registry.json")
    }

    /// `home/models`: where copies go.
    pub fn models_dir(&self) -> PathBuf {
        self.home.join("models")
    }

    /// The registry as it is on disk. Errors: [`Error::CorruptRegistry`].
    pub fn registry(&self) -> Result<Registry> {
        store::read_registry(&self.registry_path())
    }

    fn update<R>(&self, change: impl FnOnce(&mut Registry) -> Result<R>) -> Result<R> {
        let mut registry = self.registry()?;
        let out = change(&mut registry)?;
        store::write_registry(&self.registry_path(), &registry)?;
        Ok(out)
    }

    /// The models of the Hub cache not yet in the registry, as entries (`hf_cache: true`).
    fn cached(&self, registry: &Registry) -> Vec<Entry> {
        let Some(cache) = &self.hf_cache else {
            return Vec::new();
        };
        let known: Vec<PathBuf> = registry.models.iter().map(|e| canonical(&e.path)).collect();
        hf_cache::scan(cache)
            .0
            .into_iter()
            .filter(|m| !known.contains(&canonical(&m.path)) && !registry.models.iter().any(|e| e.name == m.name))
            .map(|m| Entry { name: m.name, path: m.path, copied: false, added: String::new(), last_used: None, facts: m.facts, probe: ProbeRecord::default(), hf_cache: true })
            .collect()
    }

    /// What the Hub cache holds that is not listed, and why (see [`hf_cache::scan`]).
    pub fn hf_cache_skipped(&self) -> Vec<hf_cache::Skipped> {
        self.hf_cache.as_deref().map(|c| hf_cache::scan(c).1).unwrap_or_default()
    }

    /// `name` from one scan of the Hub cache, else `ModelNotFound` offering the registry's names
    /// and the cache's.
    fn find_cached(&self, registry: &Registry, name: &str) -> Result<Entry> {
        let mut cached = self.cached(registry);
        match cached.iter().position(|e| e.name == name) {
            Some(i) => Ok(cached.swap_remove(i)),
            None => {
                let mut available = names(registry);
                available.extend(cached.into_iter().map(|e| e.name));
                Err(Error::ModelNotFound { name: name.to_string(), available })
            }
        }
    }

    /// `name` in the registry, else adopted from the Hub cache (recorded in the registry).
    fn find_or_adopt<'a>(&self, registry: &'a mut Registry, name: &str) -> Result<&'a mut Entry> {
        if !registry.models.iter().any(|e| e.name == name) {
            let mut entry = self.find_cached(registry, name)?;
            entry.added = now();
            registry.models.push(entry);
        }
        find_mut(registry, name)
    }

    /// Every entry, the Hub cache's included, ordered by `sort` (ties by name).
    pub fn list(&self, sort: SortKey) -> Result<Vec<Entry>> {
        let registry = self.registry()?;
        let mut models = self.cached(&registry);
        models.extend(registry.models);
        models.sort_by(|a, b| a.name.cmp(&b.name));
        match sort {
            SortKey::Name => {}
            SortKey::Size => models.sort_by_key(|e| std::cmp::Reverse(e.facts.size_bytes)),
            SortKey::Ctx => models.sort_by_key(|e| std::cmp::Reverse(e.facts.declared_context)),
            SortKey::Tested => models.sort_by_key(|e| std::cmp::Reverse(e.tested_context())),
        }
        Ok(models)
    }

    /// The entry called `name` (in the registry, else in the Hub cache). Errors:
    /// [`Error::ModelNotFound`] listing the names there are.
    pub fn get(&self, name: &str) -> Result<Entry> {
        let registry = self.registry()?;
        match find(&registry, name) {
            Ok(entry) => Ok(entry.clone()),
            Err(_) => self.find_cached(&registry, name),
        }
    }

    /// The entry whose path is `path` (compared after resolving symlinks and `..`), if any.
    pub fn find_path(&self, path: &Path) -> Result<Option<Entry>> {
        let want = canonical(path);
        Ok(self.registry()?.models.into_iter().find(|e| canonical(&e.path) == want))
    }

    /// What a `--model` argument names: an existing file or directory as it is, else a library
    /// entry's path (and its `last_used` is updated).
    ///
    /// Errors: [`Error::NotAModel`] for a missing path that cannot be a name (`a/b.gguf`; the
    /// registry is not read); [`Error::ModelNotFound`] for a name the library lacks.
    pub fn resolve(&self, name_or_path: &Path) -> Result<PathBuf> {
        if name_or_path.exists() {
            return Ok(name_or_path.to_path_buf());
        }
        let name = name_or_path.to_string_lossy().into_owned();
        if check_name(&name).is_err() && !hf_cache::is_cache_name(&name) {
            return Err(Error::NotAModel { path: name_or_path.to_path_buf(), reason: "no such file or directory".into() });
        }
        self.update(|registry| {
            let entry = self.find_or_adopt(registry, &name)?;
            entry.last_used = Some(now());
            Ok(entry.path.clone())
        })
    }

    /// Records that the model at `path` was just used (its `last_used`), if the library holds it;
    /// returns its name. Nothing is written for a path the library does not know.
    pub fn mark_used(&self, path: &Path) -> Result<Option<String>> {
        if self.find_path(path)?.is_none() {
            return Ok(None);
        }
        let want = canonical(path);
        self.update(|registry| {
            let entry = registry.models.iter_mut().find(|e| canonical(&e.path) == want);
            Ok(entry.map(|e| {
                e.last_used = Some(now());
                e.name.clone()
            }))
        })
    }

    /// The most recently used entry (by name resolution), else the latest added.
    pub fn most_recent(&self) -> Result<Option<Entry>> {
        let models = self.registry()?.models;
        let used = models.iter().filter(|e| e.last_used.is_some()).max_by(|a, b| a.last_used.cmp(&b.last_used));
        Ok(used.or(models.last()).cloned())
    }

    /// Adds a GGUF file or HF model directory (its facts read from headers; no weights loaded).
    ///
    /// Errors: [`Error::LibraryName`] for a name taken or not a valid id; the loader's errors for
    /// a path that is not a model; [`Error::Io`] while copying.
    pub fn add(&self, path: &Path, opts: &AddOptions) -> Result<Entry> {
        let name = opts.name.clone().unwrap_or_else(|| default_name(path));
        check_name(&name)?;
        let facts = ModelFacts::read(path)?;
        self.store(path, &name, opts.copy, |registry, stored| {
            let entry = Entry { name: name.clone(), path: stored, copied: opts.copy, added: now(), last_used: None, facts, probe: ProbeRecord::default(), hf_cache: false };
            registry.models.push(entry.clone());
            entry
        })
    }

    /// Copies `path` in (or takes its absolute path) and records it with `record`, unless `name`
    /// is taken by a model or an adapter, before the copy or by the time the registry is written;
    /// a copy made for a record that fails is deleted.
    fn store<R>(&self, path: &Path, name: &str, copy: bool, record: impl FnOnce(&mut Registry, PathBuf) -> R) -> Result<R> {
        if let Some(existing) = taken_by(&self.registry()?, name) {
            return Err(taken(name, &existing));
        }
        let stored = if copy { self.copy_in(path, name)? } else { absolute(path)? };
        let added = self.update(|registry| match taken_by(registry, name) {
            Some(existing) => Err(taken(name, &existing)),
            None => Ok(record(registry, stored)),
        });
        if added.is_err() && copy {
            let _ = remove_path(&self.models_dir().join(name));
        }
        added
    }

    /// Adds a LoRA adapter (a PEFT directory or a GGUF adapter; facts from headers), for the
    /// library model `base` if given (else matched by what the adapter says it was trained on).
    ///
    /// Errors: [`Error::LibraryName`] for a name taken (by a model or an adapter) or invalid;
    /// [`Error::ModelNotFound`] for a `base` the library lacks; [`Error::Adapter`] for a
    /// malformed adapter.
    pub fn add_adapter(&self, path: &Path, opts: &AddOptions, base: Option<&str>) -> Result<AdapterEntry> {
        let name = opts.name.clone().unwrap_or_else(|| default_name(path));
        check_name(&name)?;
        let facts = AdapterFacts::read(path)?;
        if let Some(b) = base {
            self.get(b)?;
        }
        self.store(path, &name, opts.copy, |registry, stored| {
            let entry = AdapterEntry { name: name.clone(), path: stored, copied: opts.copy, added: now(), facts, base: base.map(str::to_string) };
            registry.adapters.push(entry.clone());
            entry
        })
    }

    /// Every adapter, by name.
    pub fn adapters(&self) -> Result<Vec<AdapterEntry>> {
        let mut adapters = self.registry()?.adapters;
        adapters.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(adapters)
    }

    /// The adapter called `name`, if any.
    pub fn get_adapter(&self, name: &str) -> Result<Option<AdapterEntry>> {
        Ok(self.registry()?.adapters.into_iter().find(|a| a.name == name))
    }

    /// The adapters known for the model `entry` (see [`AdapterEntry::is_for`]).
    pub fn adapters_for(&self, entry: &Entry) -> Result<Vec<AdapterEntry>> {
        Ok(self.adapters()?.into_iter().filter(|a| a.is_for(&entry.name, &entry.path)).collect())
    }

    /// What an `--adapter` argument names: an existing path as it is, else a library adapter's
    /// path. Errors: [`Error::NotAModel`] for neither.
    pub fn resolve_adapter(&self, name_or_path: &Path) -> Result<PathBuf> {
        if name_or_path.exists() {
            return Ok(name_or_path.to_path_buf());
        }
        let name = name_or_path.to_string_lossy();
        match self.get_adapter(&name)? {
            Some(a) => Ok(a.path),
            None => Err(Error::NotAModel { path: name_or_path.to_path_buf(), reason: "no such file or directory, and no adapter of that name in the library".into() }),
        }
    }

    /// Copies `path` to `models/<name>/`, through a temporary folder renamed when complete.
    fn copy_in(&self, path: &Path, name: &str) -> Result<PathBuf> {
        let dest_dir = self.models_dir().join(name);
        if dest_dir.exists() {
            return Err(taken(name, &dest_dir));
        }
        let tmp = self.models_dir().join(format!(".{name}.partial-{}", std::process::id()));
        let copied = copy_model(path, &tmp);
        if let Err(e) = copied.and_then(|()| std::fs::rename(&tmp, &dest_dir).map_err(|e| Error::io(&dest_dir, e))) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(if path.is_dir() { dest_dir } else { dest_dir.join(path.file_name().unwrap_or_default()) })
    }

    /// Removes `name` from the registry; a copy inside `models/` is deleted with it, a model
    /// referenced by path is left where it is. Confirmation is the caller's job.
    ///
    /// Errors: [`Error::ModelNotFound`]; [`Error::LibraryName`] for a model of the Hub cache
    /// (listed, never deleted by the library) that was never used.
    pub fn remove(&self, name: &str) -> Result<Removed> {
        if let Some(adapter) = self.get_adapter(name)? {
            return self.remove_adapter(adapter);
        }
        let listed = self.get(name)?;
        if listed.hf_cache && !self.registry()?.models.iter().any(|e| e.name == name) {
            return Err(Error::LibraryName {
                name: name.to_string(),
                reason: format!("it is in the Hugging Face Hub cache ({}), not in the library; `huggingface-cli delete-cache` removes it", listed.path.display()),
            });
        }
        let entry = self.update(|registry| {
            let entry = find(registry, name)?.clone();
            registry.models.retain(|e| e.name != name);
            Ok(entry)
        })?;
        let deleted = self.delete_copy(entry.copied, &entry.path)?;
        Ok(Removed { name: entry.name, path: entry.path, deleted })
    }

    /// Removes an adapter like a model: its copy inside `models/` goes with it, a path stays.
    fn remove_adapter(&self, adapter: AdapterEntry) -> Result<Removed> {
        self.update(|registry| {
            registry.adapters.retain(|a| a.name != adapter.name);
            Ok(())
        })?;
        let deleted = self.delete_copy(adapter.copied, &adapter.path)?;
        Ok(Removed { name: adapter.name, path: adapter.path, deleted })
    }

    /// Deletes the library's copy at `path` (if `copied`, and only inside `models/`); returns
    /// what was deleted.
    fn delete_copy(&self, copied: bool, path: &Path) -> Result<Option<PathBuf>> {
        match self.owned_path(copied, path) {
            Some(dir) => remove_path(&dir).map(|()| Some(dir)),
            None => Ok(None),
        }
    }

    /// The folder of a copied entry, only if it really lies inside `models/`.
    fn owned_path(&self, copied: bool, path: &Path) -> Option<PathBuf> {
        if !copied {
            return None;
        }
        let models = std::fs::canonicalize(self.models_dir()).ok()?;
        let path = std::fs::canonicalize(path).ok()?;
        let rel = path.strip_prefix(&models).ok()?;
        let first = rel.components().next()?;
        Some(models.join(first))
    }

    /// Re-reads an entry's facts from its file.
    pub fn refresh(&self, name: &str) -> Result<Entry> {
        let path = self.get(name)?.path;
        let facts = ModelFacts::read(&path)?;
        self.update(|registry| {
            let entry = find_mut(registry, name)?;
            entry.facts = facts;
            Ok(entry.clone())
        })
    }

    /// Appends one probe trial to `name`'s record (persisted before this returns).
    pub fn record_trial(&self, name: &str, trial: &Trial) -> Result<()> {
        self.update(|registry| {
            self.find_or_adopt(registry, name)?.probe.trials.push(trial.clone());
            Ok(())
        })
    }

    /// Stores a finished probe's result.
    pub fn record_result(&self, name: &str, result: &ProbeResult) -> Result<()> {
        self.update(|registry| {
            self.find_or_adopt(registry, name)?.probe.result = Some(result.clone());
            Ok(())
        })
    }
}

/// `outcome` of a probe as the result to persist; `machine` is free text from the caller.
pub fn probe_result(declared: usize, outcome: &SearchOutcome, machine: &str) -> ProbeResult {
    ProbeResult {
        declared,
        tested: outcome.tested,
        first_failure: outcome.first_failure,
        limit_factor: outcome.limit_factor,
        efficiency: outcome.tested.map_or(0.0, |t| t as f64 / declared.max(1) as f64),
        machine: machine.to_string(),
        date: now(),
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn names(registry: &Registry) -> Vec<String> {
    registry.models.iter().map(|e| e.name.clone()).collect()
}

/// The path of the model or adapter called `name`, if there is one.
fn taken_by(registry: &Registry, name: &str) -> Option<PathBuf> {
    let model = registry.models.iter().find(|e| e.name == name).map(|e| e.path.clone());
    model.or_else(|| registry.adapters.iter().find(|a| a.name == name).map(|a| a.path.clone()))
}

fn find<'a>(registry: &'a Registry, name: &str) -> Result<&'a Entry> {
    registry.models.iter().find(|e| e.name == name).ok_or_else(|| Error::ModelNotFound { name: name.to_string(), available: names(registry) })
}

fn find_mut<'a>(registry: &'a mut Registry, name: &str) -> Result<&'a mut Entry> {
    let available = names(registry);
    registry.models.iter_mut().find(|e| e.name == name).ok_or(Error::ModelNotFound { name: name.to_string(), available })
}

fn taken(name: &str, path: &Path) -> Error {
    Error::LibraryName { name: name.to_string(), reason: format!("already in the library ({})", path.display()) }
}

/// The file or directory name, without `.gguf` (`qwen.Q4_0.gguf` → `qwen.Q4_0`).
pub fn default_name(path: &Path) -> String {
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    match name.strip_suffix(".gguf").or_else(|| name.strip_suffix(".GGUF")) {
        Some(s) => s.to_string(),
        None => name,
    }
}

/// Names are ids on command lines and in file names: letters, digits, `.`, `_`, `-`, not
/// starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let ok = !name.is_empty() && name.len() <= 128 && name.chars().all(ok_char) && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::LibraryName {
            name: name.to_string(),
            reason: "use letters, digits, `.`, `_` and `-` (at most 128, not starting with `.` or `-`)".into(),
        })
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| Error::io(path, e))
}

/// Copies a GGUF file into `dest/` or an HF directory's regular files into `dest/`.
fn copy_model(path: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let files = if path.is_dir() { facts::dir_files(path)? } else { vec![path.to_path_buf()] };
    for file in files {
        let target = dest.join(file.file_name().unwrap_or_default());
        std::fs::copy(&file, &target).map_err(|e| Error::io(&file, e))?;
    }
    Ok(())
}

fn remove_path(path: &Path) -> Result<()> {
    let removed = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    removed.map_err(|e| Error::io(path, e))
}
