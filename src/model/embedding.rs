//! The token embedding table, kept in the file's type. A quantized table stays quantized and the
//! rows a step needs are dequantized on lookup (what llama.cpp's `ggml_get_rows` does), so a Q8_0
//! table costs its Q8_0 bytes instead of a widened f32 copy; with tied embeddings the table is
//! the lm_head's own weight, held once.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::linear::LinearWeight;
use crate::error::{Error, Result};
use crate::kernels::cpu::CpuWeight;

/// A `(vocab, hidden)` embedding table.
#[derive(Debug, Clone)]
pub enum EmbeddingWeight {
    /// Dense, in the model dtype, on the model's device.
    Dense(Tensor),
    /// GGML blocks (any GGUF type) in host memory; rows dequantized on lookup.
    Quantized(Arc<QTensor>),
    /// The tied lm_head's CPU-kernel weight; rows are read back in GGML order and dequantized.
    Cpu(Arc<CpuWeight>),
}

impl EmbeddingWeight {
    /// The table a tied lm_head `head` already holds, when its rows can be read on the host:
    /// dense, a CPU `QTensor` or a CPU-kernel weight (not a GPU-resident quantized weight).
    pub fn shared_with(head: &LinearWeight) -> Option<Self> {
        match head {
            LinearWeight::Dense(t) => Some(Self::Dense(t.clone())),
            LinearWeight::Quantized(q) if q.device().is_cpu() => Some(Self::Quantized(q.clone())),
            LinearWeight::Cpu(w) => Some(Self::Cpu(w.clone())),
            LinearWeight::Quantized(_) | LinearWeight::Kernel(_) => None,
        }
    }

    /// `(vocab, hidden)`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
            Self::Cpu(w) => return w.dims(),
        };
        match dims {
            [vocab, hidden] => (*vocab, *hidden),
            _ => (0, 0),
        }
    }

    /// Bytes the table holds (shared with a tied lm_head where it is one).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Cpu(w) => w.bytes(),
        }
    }

    /// Rows `ids` of the table: (ids.len(), hidden), in `dtype` on `device`. Each row equals that
    /// row of the whole table dequantized (blocks never straddle rows).
    ///
    /// Errors: [`Error::InvalidParameter`] (`ids`) for an id ≥ vocab.
    pub fn lookup(&self, ids: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
        let (vocab, hidden) = self.dims();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidParameter {
                name: "ids",
                reason: format!("token id {bad} is outside the embedding table of {vocab} rows"),
            });
        }
        if ids.is_empty() {
            return Ok(Tensor::zeros((0, hidden), dtype, device)?);
        }
        match self {
            Self::Dense(t) => Ok(t.embedding(&Tensor::new(ids, t.device())?)?.to_dtype(dtype)?.to_device(device)?),
            Self::Quantized(q) => {
                let data = q.data()?;
                let rb = row_bytes(q.dtype(), hidden);
                let bytes = gather(ids, rb, |id| data.get(id * rb..(id + 1) * rb).map(Cow::Borrowed))?;
                dequantize_rows(q.dtype(), &bytes, ids.len(), hidden, dtype, device)
            }
            Self::Cpu(w) => {
                let bytes = gather(ids, w.row_bytes(), |id| Some(w.row(id)))?;
                dequantize_rows(w.quant().ggml(), &bytes, ids.len(), hidden, dtype, device)
            }
        }
    }
}

/// Bytes of one row of `hidden` values of type `t`.
fn row_bytes(t: GgmlDType, hidden: usize) -> usize {
    hidden / t.block_size() * t.type_size()
}

/// The GGML bytes of rows `ids`, one after another (`rb` bytes each).
fn gather<'a>(ids: &[u32], rb: usize, row: impl Fn(usize) -> Option<Cow<'a, [u8]>>) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(ids.len() * rb);
    for &id in ids {
        let r = row(id as usize).filter(|r| r.len() == rb).ok_or_else(|| {
            candle_core::Error::Msg(format!("embedding: row {id} is not {rb} bytes"))
        })?;
        bytes.extend_from_slice(&r);
    }
    Ok(bytes)
}

/// `n` rows of GGML blocks dequantized by candle on the host, then cast and moved:
/// (n, hidden) in `dtype` on `device`.
fn dequantize_rows(t: GgmlDType, bytes: &[u8], n: usize, hidden: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let q = qtensor_from_ggml(t, bytes, vec![n, hidden], &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
}
