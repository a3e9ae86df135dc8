//! The one decoder and its parts.
//!
//! `decoder` holds the transformer (embeddings → layers → norm → lm_head) parameterised by
//! [`crate::config::ModelConfig`]; `attention` the attention block; `linear` the projection every
//! weight goes through; `embedding` the token table (kept in the file's type); `rope`, `kv_cache` and `ops` the helpers they share.

pub mod attention;
pub mod batch;
pub mod decoder;
pub mod embedding;
pub(crate) mod finite;
pub mod kv_cache;
pub mod linear;
pub mod lora_delta;
pub mod ops;
pub mod rope;

pub use decoder::{Logits, Model};
pub use batch::{BatchRow, RowLogits, StepBatch};
pub use kv_cache::{KvCache, KvPool};
