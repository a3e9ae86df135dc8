//! [`ApplyAdapter`] for [`Model`]: adapters attach to the linear layers by replacing each site's
//! `Arc<[ActiveLora]>`; base weights are never copied.

use std::path::PathBuf;
use std::sync::Arc;

use super::lora::LoraAdapter;
use super::AdapterError;
use crate::error::{Error, Result};
use crate::model::linear::{ActiveLora, Projection};
use crate::Model;

/// An adapter active on a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveAdapter {
    /// The name it was applied under.
    pub name: String,
    /// Its user scale (multiplies the adapter's own `alpha / r`).
    pub scale: f64,
    /// Folded into the base weights ([`ApplyAdapter::merge_adapter`]).
    pub merged: bool,
}

/// Attaching LoRA adapters to a model, by name. Several may be active at once: their scaled deltas
/// are summed. `forward` never takes an adapter argument; a clone of the model (a generation's
/// snapshot) keeps the adapters it was cloned with. Every method is atomic: on error the model is
/// unchanged.
pub trait ApplyAdapter {
    /// Activates `adapter` under `name` with `scale` (1.0 = as trained), unmerged: each adapted
    /// projection adds `scale·(alpha/r)·(x·Aᵀ)·Bᵀ` to its base output. An adapter already active
    /// under `name` is replaced in the same step.
    ///
    /// Errors: a non-finite scale; [`AdapterError::PreparedForOtherModel`] or
    /// [`AdapterError::ShapeMismatch`] if the adapter was loaded for another model.
    fn apply_adapter(&mut self, name: &str, adapter: &LoraAdapter, scale: f64) -> Result<()>;

    /// Detaches the adapter `name` (merged or not); the model computes exactly as before it was
    /// applied. Errors: [`AdapterError::NotActive`].
    fn remove_adapter(&mut self, name: &str) -> Result<()>;

    /// Changes the scale of the active adapter `name`. Errors: [`AdapterError::NotActive`], a
    /// non-finite scale.
    fn set_adapter_scale(&mut self, name: &str, scale: f64) -> Result<()>;

    /// The active adapters, each once, in the order first met walking the layers' projections
    /// (the application order among adapters that share a projection).
    fn active_adapters(&self) -> Vec<ActiveAdapter>;

    /// Folds the active adapter `name` into dense base weights (no per-token cost). The merged
    /// weight is `W + scale·(alpha/r)·B·A`, accumulated in f32 and rounded once to the model dtype,
    /// kept beside the untouched base weight. Errors: [`AdapterError::NotActive`],
    /// [`AdapterError::MergeQuantized`] on a quantized projection.
    fn merge_adapter(&mut self, name: &str) -> Result<()>;

    /// Computes the adapter `name` unmerged again; once nothing is merged into a projection its
    /// base weight is used again, bit for bit. Errors: [`AdapterError::NotActive`].
    fn unmerge_adapter(&mut self, name: &str) -> Result<()>;
}

fn op_error(source: AdapterError) -> Error {
    Error::Adapter { path: PathBuf::new(), source }
}

fn check_scale(scale: f64) -> Result<()> {
    if scale.is_finite() {
        return Ok(());
    }
    Err(Error::InvalidParameter {
        name: "scale",
        reason: format!("adapter scale must be finite, got {scale}"),
    })
}

impl Model {
    /// Rewrites the adapter list of every site with `f(layer, projection, current)`; `None` keeps a
    /// site as it is. Works on a clone that replaces `self` only if every site succeeded.
    fn edit_sites<F>(&mut self, mut f: F) -> Result<()>
    where
        F: FnMut(usize, Projection, &[ActiveLora]) -> Option<Vec<ActiveLora>>,
    {
        let mut next = self.clone();
        for (i, layer) in next.layers_mut().iter_mut().enumerate() {
            for p in Projection::ALL {
                let site = layer.projection_mut(p);
                if let Some(list) = f(i, p, site.adapters()) {
                    site.set_adapters(list)?;
                }
            }
        }
        *self = next;
        Ok(())
    }

    /// Applies `f` to every entry named `name`; [`AdapterError::NotActive`] if there is none.
    fn edit_named(&mut self, name: &str, f: impl Fn(&mut ActiveLora)) -> Result<()> {
        if !self.active_adapters().iter().any(|a| a.name == name) {
            return Err(op_error(AdapterError::NotActive { name: name.to_string() }));
        }
        self.edit_sites(|_, _, list| {
            list.iter().any(|a| &*a.name == name).then(|| {
                list.iter()
                    .cloned()
                    .map(|mut a| {
                        if &*a.name == name {
                            f(&mut a);
                        }
                        a
                    })
                    .collect()
            })
        })
    }
}

impl ApplyAdapter for Model {
    fn apply_adapter(&mut self, name: &str, adapter: &LoraAdapter, scale: f64) -> Result<()> {
        check_scale(scale)?;
        adapter.check_prepared_for(self)?;
        let name: Arc<str> = Arc::from(name);
        let mut modules = adapter.modules().iter().peekable();
        self.edit_sites(|layer, proj, list| {
            let module = modules.next_if(|m| (m.layer, m.proj) == (layer, proj));
            let had = list.iter().any(|a| a.name == name);
            if module.is_none() && !had {
                return None;
            }
            let mut next: Vec<ActiveLora> = list.iter().filter(|a| a.name != name).cloned().collect();
            if let Some(m) = module {
                next.push(ActiveLora {
                    name: name.clone(),
                    weights: m.weights.clone(),
                    scale,
                    merged: false,
                });
            }
            Some(next)
        })
    }

    fn remove_adapter(&mut self, name: &str) -> Result<()> {
        if !self.active_adapters().iter().any(|a| a.name == name) {
            return Err(op_error(AdapterError::NotActive { name: name.to_string() }));
        }
        self.edit_sites(|_, _, list| {
            list.iter()
                .any(|a| &*a.name == name)
                .then(|| list.iter().filter(|a| &*a.name != name).cloned().collect())
        })
    }

    fn set_adapter_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        check_scale(scale)?;
        self.edit_named(name, |a| a.scale = scale)
    }

    fn active_adapters(&self) -> Vec<ActiveAdapter> {
        let mut out: Vec<ActiveAdapter> = Vec::new();
        for layer in self.layers() {
            for p in Projection::ALL {
                for a in layer.projection(p).adapters().iter() {
                    if !out.iter().any(|o| o.name == *a.name) {
                        out.push(ActiveAdapter { name: a.name.to_string(), scale: a.scale, merged: a.merged });
                    }
                }
            }
        }
        out
    }

    fn merge_adapter(&mut self, name: &str) -> Result<()> {
        self.edit_named(name, |a| a.merged = true)
    }

    fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        self.edit_named(name, |a| a.merged = false)
    }
}
