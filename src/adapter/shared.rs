//! A model shared between threads: generations take snapshots, other threads swap adapters.

use std::sync::{PoisonError, RwLock};

use super::apply::{ActiveAdapter, ApplyAdapter};
use super::lora::LoraAdapter;
use crate::error::Result;
use crate::Model;

/// A [`Model`] behind a lock, for hot-swapping adapters while generations run.
///
/// A generation calls [`SharedModel::snapshot`] once and runs on that clone: it keeps the adapter
/// set it started with whatever happens here afterwards. Changes go through
/// [`SharedModel::update`], which edits a clone and publishes it in one step, so a reader sees
/// the model entirely before or entirely after a change (replacing an adapter under the same name
/// is atomic). No base weight is copied: clones share every tensor.
#[derive(Debug)]
pub struct SharedModel {
    inner: RwLock<Model>,
}

impl SharedModel {
    /// Shares `model`.
    pub fn new(model: Model) -> Self {
        Self { inner: RwLock::new(model) }
    }

    /// A clone of the current model (cheap: tensors are reference-counted).
    pub fn snapshot(&self) -> Model {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Runs `f` on a clone of the model and publishes the clone if `f` succeeds; on error the
    /// shared model is unchanged. Writers are serialised; readers are blocked only while the
    /// clone is swapped in.
    pub fn update<T>(&self, f: impl FnOnce(&mut Model) -> Result<T>) -> Result<T> {
        let mut guard = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = guard.clone();
        let out = f(&mut next)?;
        *guard = next;
        Ok(out)
    }

    /// [`ApplyAdapter::apply_adapter`] on the shared model.
    pub fn apply_adapter(&self, name: &str, adapter: &LoraAdapter, scale: f64) -> Result<()> {
        self.update(|m| m.apply_adapter(name, adapter, scale))
    }

    /// [`ApplyAdapter::remove_adapter`] on the shared model.
    pub fn remove_adapter(&self, name: &str) -> Result<()> {
        self.update(|m| m.remove_adapter(name))
    }

    /// [`ApplyAdapter::set_adapter_scale`] on the shared model.
    pub fn set_adapter_scale(&self, name: &str, scale: f64) -> Result<()> {
        self.update(|m| m.set_adapter_scale(name, scale))
    }

    /// [`ApplyAdapter::active_adapters`] of the current model.
    pub fn active_adapters(&self) -> Vec<ActiveAdapter> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).active_adapters()
    }
}
