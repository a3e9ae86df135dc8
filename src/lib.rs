#![warn(missing_docs)]
//! metal-candle: fast, correct LLM inference on Apple silicon, built on candle.
//!
//! Load a Qwen2/2.5, Qwen3, LLaMA 2/3.x or Mistral model from a GGUF file or an HF safetensors
//! directory and run it:
//!
//! ```no_run
//! use metal_candle::{load_model, LoadOptions, Logits};
//! # fn main() -> metal_candle::Result<()> {
//! let loaded = load_model("model.gguf".as_ref(), &LoadOptions::default())?;
//! let model = &loaded.model;
//! let mut cache = model.new_cache();
//! let ids = candle_core::Tensor::new(&[[1u32, 2, 3]], model.device())?;
//! let logits = model.forward(&ids, &mut cache, Logits::Last)?; // (1, vocab)
//! # let _ = logits; Ok(()) }
//! ```
//!
//! Layers: [`loader`] (validation, safetensors, GGUF) → [`config`] (one normalised config) →
//! [`model`] (one decoder) → [`model::ops`] (one dispatch function per device op).

pub mod adapter;
mod adapter_error;
pub mod bench;
pub mod chat;
pub mod config;
pub mod device;
pub mod embed;
pub mod engine;
pub mod error;
#[cfg(feature = "hub")]
pub mod hub;
pub mod kernels;
pub mod eval;
pub mod generation;
pub mod loader;
pub mod model;
pub mod quantize;
pub mod registry;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod tokenizer;
pub mod train;
pub mod library;

pub use adapter::{AdapterRegistry, ApplyAdapter, LoraAdapter, SharedModel};
pub use config::{Arch, ModelConfig};
pub use device::DeviceChoice;
pub use error::{Error, Result};
pub use eval::{perplexity, perplexity_second_half, PerplexityReport};
pub use loader::{load_model, LoadOptions, LoadedModel};
pub use model::{KvCache, Logits, Model};
pub use tokenizer::Tokenizer;

/// Compiles the README's code blocks as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Compiles MIGRATION.md's code blocks as doctests.
#[doc = include_str!("../MIGRATION.md")]
#[cfg(doctest)]
pub struct MigrationDoctests;
