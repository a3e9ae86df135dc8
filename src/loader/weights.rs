//! The interface between file formats and the decoder: weights by their HF name.

use std::path::Path;

use candle_core::Tensor;

use crate::error::Result;
use crate::model::embedding::EmbeddingWeight;
use crate::model::linear::LinearWeight;

/// A source of weights addressed by HF names (`model.layers.0.self_attn.q_proj.weight`). Each
/// format maps those names to its own in one table.
pub trait WeightSource {
    /// The file or directory the weights come from (for error messages).
    fn path(&self) -> &Path;

    /// Whether a tensor with this HF name exists.
    fn contains(&self, name: &str) -> bool;

    /// A dense tensor of exactly `shape`, in the model dtype (norm weights, biases, embeddings).
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// A projection weight of shape `(out, in)`, quantized if the file stores it quantized.
    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<LinearWeight>;

    /// The token embedding table `(vocab, hidden)`. `tied_head` is the lm_head already read from
    /// this same tensor when the embeddings are tied: a source returns a view of it where a
    /// lookup then gives the values [`WeightSource::tensor`] would (no second copy). The
    /// default: that view for a dense head, else a dense tensor.
    fn embedding(&self, name: &str, vocab: usize, hidden: usize, tied_head: Option<&LinearWeight>) -> Result<EmbeddingWeight> {
        if let Some(LinearWeight::Dense(t)) = tied_head {
            return Ok(EmbeddingWeight::Dense(t.clone()));
        }
        Ok(EmbeddingWeight::Dense(self.tensor(name, &[vocab, hidden])?))
    }
}
