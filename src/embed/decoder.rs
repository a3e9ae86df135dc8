//! A decoder used as an embedder (Qwen3-Embedding style): the final hidden states of the existing
//! decoder ([`Model::forward_hidden`]), pooled at the last token, which is an EOS appended to
//! every input.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::hf::load_hf_config;
use crate::error::Result;
use crate::loader::safetensors::SafetensorsWeights;
use crate::loader::weights::WeightSource;
use crate::model::linear::LinearWeight;
use crate::model::Model;

/// Qwen3-Embedding checkpoints are saved from the bare `Qwen3Model`: no `model.` prefix and no
/// `lm_head`. This view serves the decoder's HF names from such files; the embedder never calls
/// the lm_head, so a missing one is served the (same-shaped) embedding table.
struct BareModelWeights<'a> {
    inner: &'a dyn WeightSource,
    strip_prefix: bool,
}

impl BareModelWeights<'_> {
    fn name(&self, name: &str) -> String {
        let name = if name == "lm_head.weight" && !self.inner.contains(name) { "model.embed_tokens.weight" } else { name };
        match (self.strip_prefix, name.strip_prefix("model.")) {
            (true, Some(rest)) => rest.to_string(),
            _ => name.to_string(),
        }
    }
}

impl WeightSource for BareModelWeights<'_> {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.name(name))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.inner.tensor(&self.name(name), shape)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<LinearWeight> {
        self.inner.linear(&self.name(name), out_features, in_features)
    }
}

/// The decoder of an embedding model and the id appended to every input.
#[derive(Debug, Clone)]
pub struct DecoderEmbedder {
    model: Model,
    /// Appended to each input unless the tokenizer's post-processor already ends sequences with
    /// a special token; also the padding id (right padding is invisible to causal attention).
    eos: u32,
}

impl DecoderEmbedder {
    /// Loads the decoder of the directory `dir` (safetensors), for inputs of at most
    /// `max_positions` tokens. The appended id is the config's first `eos_token_id` (Qwen3-Embedding:
    /// `<|endoftext|>`), else `fallback_eos` (the tokenizer's).
    ///
    /// Errors: those of [`Model::load`]; no EOS id anywhere is [`crate::Error::MissingConfigField`].
    pub fn load(dir: &Path, max_positions: usize, dtype: DType, device: &Device, fallback_eos: Option<u32>) -> Result<Self> {
        let config = load_hf_config(&dir.join("config.json"))?;
        let files = SafetensorsWeights::open(dir, dtype, device)?;
        let strip_prefix = !files.contains("model.embed_tokens.weight") && files.contains("embed_tokens.weight");
        let weights = BareModelWeights { inner: &files, strip_prefix };
        let eos = config.eos_token_ids.first().copied().or(fallback_eos).ok_or_else(|| crate::Error::MissingConfigField {
            path: dir.join("config.json"),
            field: "eos_token_id".into(),
        })?;
        let model = Model::load(config, &weights, max_positions, dtype, device)?;
        Ok(Self { model, eos })
    }

    /// The decoder itself.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The EOS id appended to every input before last-token pooling.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// ids (b, t) u32, right-padded → final hidden states (b, t, hidden) f32. Causal attention
    /// makes each row's first `lengths[i]` states independent of the padding after them.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut cache = self.model.new_cache();
        self.model.forward_hidden(ids, &mut cache)
    }

    /// The longest input the decoder instance accepts.
    pub fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    /// The width of its hidden states (the embedding dimension).
    pub fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }
}
