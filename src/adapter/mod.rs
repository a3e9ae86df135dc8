//! LoRA adapters: PEFT directories and llama.cpp GGUF adapters, applied to any model by name,
//! several at once, hot-swapped without touching base weights.
//!
//! ```no_run
//! use metal_candle::adapter::{AdapterOptions, ApplyAdapter, LoraAdapter, SharedModel};
//! use metal_candle::{load_model, LoadOptions};
//! # fn main() -> metal_candle::Result<()> {
//! let mut model = load_model("model-dir".as_ref(), &LoadOptions::default())?.model;
//! let sql = LoraAdapter::load("adapters/sql".as_ref(), &model, &AdapterOptions::default())?;
//! model.apply_adapter("sql", &sql, 1.0)?; // forward now adds the adapter's deltas
//! let shared = SharedModel::new(model);
//! let snapshot = shared.snapshot(); // a generation runs on this: it keeps "sql"
//! shared.remove_adapter("sql")?; // later snapshots compute the base model
//! # let _ = snapshot; Ok(()) }
//! ```
//!
//! Where the state lives: each projection ([`crate::model::linear::Linear`]) holds an
//! `Arc<[ActiveLora]>`; applying replaces those `Arc`s, so a model clone (what a generation runs
//! on) keeps the adapters it was cloned with. Deltas are computed unmerged,
//! `y = x·Wᵀ + Σ scale·(alpha/r)·(x·Aᵀ)·Bᵀ`, on dense and quantized bases alike (a quantized base
//! is never re-quantized). [`ApplyAdapter::merge_adapter`] optionally folds an adapter into a
//! dense base.
//!
//! Strictness: PEFT only warns about much of what is an error here ([`AdapterError`]): unsupported
//! features (DoRA, `modules_to_save`, bias), targets the base lacks, missing or extra tensors,
//! shapes that do not match the rank or the base model, pickle-only weights.

mod apply;
pub mod config;
/// The unmerged LoRA delta (it lives with the linear layer that computes it: [`crate::model::lora_delta`]).
pub use crate::model::lora_delta as delta;
mod gguf;
mod lora;
mod peft;
mod registry;
mod shared;

pub use apply::{ActiveAdapter, ApplyAdapter};
pub use config::{PeftConfig, TargetModules, DEFAULT_MAX_RANK};
pub use crate::adapter_error::AdapterError;
pub use lora::{permute_rows, AdapterModule, AdapterOptions, LoraAdapter};
pub use registry::{resolve_inside, AdapterRegistry, RegistryEntry};
pub use shared::SharedModel;

/// `" <path>"` for [`crate::Error::Adapter`] messages, or nothing for operations on a loaded model.
pub(crate) fn path_label(path: &std::path::Path) -> String {
    if path.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" {}", path.display())
    }
}
