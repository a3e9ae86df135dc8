//! The linear layer: the one place weights are multiplied, and where adapters will attach.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Tensor};

use crate::error::Result;

/// A weight matrix `(out_features, in_features)`, dense or GGML-quantized.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Dense weight in the model dtype, `(out, in)`.
    Dense(Tensor),
    /// Quantized weight; candle's quantized matmul takes f32 activations.
    Quantized(Arc<QTensor>),
}

impl LinearWeight {
    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
        };
        match dims {
            [out, inp] => (*out, *inp),
            _ => (0, 0),
        }
    }
}

/// `y = x · Wᵀ (+ b)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>, // (out,)
}

impl Linear {
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// x: (..., in) → (..., out), in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&in_features, lead)) = dims.split_last() else {
            return Err(candle_core::Error::Msg("linear: input has no dims".into()).into());
        };
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_features))?; // (rows, in)
        let y = match &self.weight {
            LinearWeight::Dense(w) => x2.matmul(&w.t()?)?,
            LinearWeight::Quantized(q) => {
                let dtype = x2.dtype();
                x2.to_dtype(DType::F32)?
                    .apply_op1_no_bwd(q.as_ref())?
                    .to_dtype(dtype)?
            }
        }; // (rows, out)
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(y.dim(1)?);
        Ok(y.reshape(out_dims)?)
    }
}
