//! `registry.json`: what the library knows about each model, read strictly and written atomically.
//!
//! A write goes to a temporary file in the same directory, is flushed to disk, then renamed over
//! `registry.json` (rename is atomic on POSIX file systems), so a crash mid-write leaves either the
//! old registry or the new one, never half of each. A leftover temporary file is ignored. A file
//! that does not parse is [`Error::CorruptRegistry`] with its line and column; it is never replaced
//! by an empty registry.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::facts::ModelFacts;
use super::probe::{ProbeResult, Trial};
use crate::error::{Error, Result};

/// The schema version this code writes (and the newest it reads).
pub const REGISTRY_VERSION: u32 = 1;

/// The whole `registry.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// [`REGISTRY_VERSION`] when written.
    pub version: u32,
    /// The models, in the order they were added.
    pub models: Vec<Entry>,
    /// The LoRA adapters, in the order they were added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<super::adapters::AdapterEntry>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { version: REGISTRY_VERSION, models: Vec::new(), adapters: Vec::new() }
    }
}

/// One model of the library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The stable id (`--model NAME`).
    pub name: String,
    /// The GGUF file or HF model directory.
    pub path: PathBuf,
    /// Whether `path` is a copy inside the library's models folder (removed with the entry).
    pub copied: bool,
    /// When it was added (RFC 3339, UTC).
    pub added: String,
    /// When it was last resolved by name (RFC 3339, UTC).
    #[serde(default)]
    pub last_used: Option<String>,
    /// What the file says about itself, read when added.
    pub facts: ModelFacts,
    /// Context probe trials and the last result.
    #[serde(default)]
    pub probe: ProbeRecord,
    /// Whether it is a model of the Hugging Face Hub cache (named by its repo id; never
    /// deleted by the library).
    #[serde(default)]
    pub hf_cache: bool,
}

impl Entry {
    /// The largest context the last finished probe passed.
    pub fn tested_context(&self) -> Option<usize> {
        self.probe.result.as_ref().and_then(|r| r.tested)
    }
}

/// Every probe trial run on a model (each persisted as it finished) and the last result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// In the order they ran.
    #[serde(default)]
    pub trials: Vec<Trial>,
    /// `None` until a probe finishes.
    #[serde(default)]
    pub result: Option<ProbeResult>,
}

/// Reads `path`; a missing file is an empty registry.
///
/// Errors: [`Error::CorruptRegistry`] (with line and column) for a file that is not a registry,
/// including a newer schema version; [`Error::Io`] when it cannot be read.
pub fn read_registry(path: &Path) -> Result<Registry> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Registry::default()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let registry: Registry = serde_json::from_str(&text).map_err(|e| Error::CorruptRegistry {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        reason: e.to_string(),
    })?;
    if registry.version > REGISTRY_VERSION {
        return Err(Error::CorruptRegistry {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            reason: format!("schema version {} is newer than this metal-candle reads ({REGISTRY_VERSION})", registry.version),
        });
    }
    Ok(registry)
}

/// Writes `registry` to `path` atomically: a temporary file beside it, synced, then renamed.
pub fn write_registry(path: &Path, registry: &Registry) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut text = serde_json::to_string_pretty(registry).map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
    text.push('\n');
    let tmp = temp_path(path);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    // The rename itself is durable once the directory is synced (not possible on every platform).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `registry.json.tmp-<pid>`: unique per process, so two writers never share a temporary file.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}
