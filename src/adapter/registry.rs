//! Named adapters loaded once, with byte accounting and a byte budget (LRU eviction of adapters
//! no model uses).

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::lora::{adapter_error, AdapterOptions, LoraAdapter};
use super::AdapterError;
use crate::error::Result;
use crate::Model;

/// What [`AdapterRegistry::list`] reports per adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    /// The registry name.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Bytes of its factors.
    pub bytes: usize,
    /// Held by a model, a model snapshot or a caller (not evictable).
    pub in_use: bool,
}

#[derive(Debug)]
struct Entry {
    adapter: Arc<LoraAdapter>,
    last_used: u64,
}

impl Entry {
    /// Someone besides the registry holds the adapter or its factors.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.adapter) > 1 || self.adapter.attached()
    }
}

/// Adapters by name, each loaded from disk once. Inserting past `budget_bytes` evicts the least
/// recently used adapters that are not in use (not attached to any model or snapshot, not held by
/// a caller); if that is not enough the insert fails with [`AdapterError::OverBudget`].
#[derive(Debug)]
pub struct AdapterRegistry {
    budget_bytes: usize,
    root: Option<PathBuf>,
    options: AdapterOptions,
    entries: HashMap<String, Entry>,
    clock: u64,
}

impl AdapterRegistry {
    /// An empty registry holding at most `budget_bytes` of adapter factors.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            root: None,
            options: AdapterOptions::default(),
            entries: HashMap::new(),
            clock: 0,
        }
    }

    /// Resolves names given to [`AdapterRegistry::load_named`] inside `root`.
    pub fn with_root(mut self, root: PathBuf) -> Self {
        self.root = Some(root);
        self
    }

    /// Options for every load.
    pub fn with_options(mut self, options: AdapterOptions) -> Self {
        self.options = options;
        self
    }

    /// The adapter `name`, loading it from `path` for `model` unless already resident.
    pub fn load(&mut self, name: &str, path: &Path, model: &Model) -> Result<Arc<LoraAdapter>> {
        if let Ok(a) = self.get(name) {
            return Ok(a);
        }
        let adapter = LoraAdapter::load(path, model, &self.options)?;
        self.insert(name, adapter)
    }

    /// The adapter `name` from `<root>/<name>` (see [`AdapterRegistry::with_root`]). The name must
    /// be a relative path without `..`: [`AdapterError::PathEscapes`] otherwise.
    pub fn load_named(&mut self, name: &str, model: &Model) -> Result<Arc<LoraAdapter>> {
        let root = self.root.clone().unwrap_or_default();
        let path = resolve_inside(&root, name)?;
        self.load(name, &path, model)
    }

    /// Registers `adapter` as `name` (replacing an entry of that name), evicting unused adapters
    /// as needed. Errors: [`AdapterError::OverBudget`].
    pub fn insert(&mut self, name: &str, adapter: LoraAdapter) -> Result<Arc<LoraAdapter>> {
        let bytes = adapter.bytes();
        self.entries.remove(name);
        self.make_room(bytes).map_err(|in_use| {
            let source = AdapterError::OverBudget { name: name.to_string(), bytes, budget: self.budget_bytes, in_use };
            adapter_error(adapter.path(), source)
        })?;
        let adapter = Arc::new(adapter);
        self.clock += 1;
        self.entries.insert(name.to_string(), Entry { adapter: adapter.clone(), last_used: self.clock });
        Ok(adapter)
    }

    /// Evicts least recently used, unused adapters until `bytes` more fit. On failure returns the
    /// bytes held by adapters in use.
    fn make_room(&mut self, bytes: usize) -> std::result::Result<(), usize> {
        while self.total_bytes() + bytes > self.budget_bytes {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| !e.in_use())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            match victim {
                Some(n) => {
                    self.entries.remove(&n);
                }
                None => return Err(self.total_bytes()),
            }
        }
        Ok(())
    }

    /// The resident adapter `name`, marked as recently used. Errors: [`AdapterError::NotRegistered`].
    pub fn get(&mut self, name: &str) -> Result<Arc<LoraAdapter>> {
        self.clock += 1;
        let clock = self.clock;
        let e = self.entries.get_mut(name).ok_or_else(|| {
            adapter_error(Path::new(name), AdapterError::NotRegistered { name: name.to_string() })
        })?;
        e.last_used = clock;
        Ok(e.adapter.clone())
    }

    /// Drops `name` from the registry (models that use it keep their references).
    pub fn remove(&mut self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.entries.remove(name).map(|e| e.adapter)
    }

    /// Every resident adapter, sorted by name.
    pub fn list(&self) -> Vec<RegistryEntry> {
        let mut out: Vec<RegistryEntry> = self
            .entries
            .iter()
            .map(|(name, e)| RegistryEntry {
                name: name.clone(),
                path: e.adapter.path().to_path_buf(),
                bytes: e.adapter.bytes(),
                in_use: e.in_use(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Bytes of all resident adapters.
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.adapter.bytes()).sum()
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }
}

/// `root/name`, refusing absolute names and `..` components.
pub fn resolve_inside(root: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(adapter_error(root, AdapterError::PathEscapes { path: name.to_string() }));
    }
    Ok(root.join(rel))
}
