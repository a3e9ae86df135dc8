//! Models already downloaded into the Hugging Face Hub cache (`huggingface-cli download`,
//! `hf_hub_download`, transformers), listed by the library without copying them, as
//! `mlx_lm.server` does.
//!
//! The cache layout is `<cache>/models--ORG--NAME/snapshots/<commit>/…` (files are symlinks into
//! `blobs/`), with `refs/main` naming the commit of the default branch. Each repository gives:
//! - `ORG/NAME` for the snapshot directory when it is an HF model directory (`config.json` and
//!   safetensors weights);
//! - `ORG/NAME:STEM` for every `STEM.gguf` file in it (a GGUF repository usually holds several
//!   quantizations).
//!
//! A repository whose files do not read as a model (a tokenizer-only repo, an adapter, an
//! interrupted download) is skipped; [`scan`]'s second result says why.

use std::path::{Path, PathBuf};

use super::facts::ModelFacts;

/// One model found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedModel {
    /// `ORG/NAME` or `ORG/NAME:STEM`.
    pub name: String,
    /// The snapshot directory or the GGUF file in it.
    pub path: PathBuf,
    /// Read from headers, as for library entries.
    pub facts: ModelFacts,
}

/// A repository (or file) of the cache that is not a model, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The repository folder or file.
    pub path: PathBuf,
    /// Why it was not listed.
    pub reason: String,
}

/// Every model in the Hub cache at `cache` (a missing folder is an empty cache), ordered by
/// name, and what was skipped.
pub fn scan(cache: &Path) -> (Vec<CachedModel>, Vec<Skipped>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let Ok(dir) = std::fs::read_dir(cache) else {
        return (found, skipped);
    };
    let mut repos: Vec<(String, PathBuf)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let folder = e.file_name().to_string_lossy().into_owned();
            let id = folder.strip_prefix("models--")?.replacen("--", "/", 1);
            Some((id, e.path()))
        })
        .collect();
    repos.sort();
    for (id, repo) in repos {
        let Some(snapshot) = snapshot(&repo) else {
            skipped.push(Skipped { path: repo, reason: "no snapshot".into() });
            continue;
        };
        let before = (found.len(), skipped.len());
        let mut ggufs = gguf_files(&snapshot);
        ggufs.sort();
        let is_dir_model = snapshot.join("config.json").is_file() && ggufs.is_empty();
        if is_dir_model {
            match ModelFacts::read(&snapshot) {
                Ok(facts) => found.push(CachedModel { name: id.clone(), path: snapshot.clone(), facts }),
                Err(e) => skipped.push(Skipped { path: repo.clone(), reason: e.to_string() }),
            }
        }
        for file in ggufs {
            let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            match ModelFacts::read(&file) {
                Ok(facts) => found.push(CachedModel { name: format!("{id}:{stem}"), path: file, facts }),
                Err(e) => skipped.push(Skipped { path: file, reason: e.to_string() }),
            }
        }
        if (found.len(), skipped.len()) == before {
            skipped.push(Skipped { path: repo, reason: "neither an HF model directory nor GGUF files".into() });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    (found, skipped)
}

/// Whether `name` has the shape of a cache name (`ORG/NAME` or `ORG/NAME:STEM`), so it is looked
/// up in the cache rather than taken for a path.
pub fn is_cache_name(name: &str) -> bool {
    let (repo, stem) = match name.split_once(':') {
        Some((r, s)) => (r, Some(s)),
        None => (name, None),
    };
    let part = |s: &str| !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let mut parts = repo.split('/');
    let ok_repo = matches!((parts.next(), parts.next(), parts.next()), (Some(o), Some(n), None) if part(o) && part(n));
    ok_repo && stem.is_none_or(part)
}

/// `refs/main`'s snapshot, else the most recently modified one.
fn snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(commit.trim());
        if !commit.trim().is_empty() && !commit.contains(['/', '\\']) && dir.is_dir() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The `*.gguf` files directly in the snapshot (adapters included: they fail to read as models
/// and are skipped).
fn gguf_files(snapshot: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(snapshot) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")))
        .collect()
}
