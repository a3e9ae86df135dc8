//! Pooling token states into one vector per input, and L2 normalisation, as
//! sentence-transformers' `Pooling` and `Normalize` modules compute them.
//!
//! Every batch is right-padded, so a row's tokens are its first `lengths[i]` positions.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// How token states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the input's tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// The first token (`pooling_mode_cls_token`).
    Cls,
    /// Per-dimension maximum over the tokens (`pooling_mode_max_tokens`).
    Max,
    /// Sum over the tokens divided by √length (`pooling_mode_mean_sqrt_len_tokens`).
    MeanSqrtLen,
    /// The last token (`pooling_mode_lasttoken`), for decoder embedders.
    LastToken,
}

impl Pooling {
    /// The modes listed in errors.
    pub const SUPPORTED: &'static str = "cls_token, mean_tokens, max_tokens, mean_sqrt_len_tokens, lasttoken";

    /// The mode named by a sentence-transformers `pooling_mode_<name>` key.
    pub fn from_sentence_transformers(name: &str) -> Option<Self> {
        match name {
            "mean_tokens" => Some(Self::Mean),
            "cls_token" => Some(Self::Cls),
            "max_tokens" => Some(Self::Max),
            "mean_sqrt_len_tokens" => Some(Self::MeanSqrtLen),
            "lasttoken" => Some(Self::LastToken),
            _ => None,
        }
    }

    /// hidden: (b, t, h) right-padded, `lengths[i]` ≥ 1 real tokens in row i → (b, h) in f32.
    pub fn pool(self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let hidden = hidden.to_dtype(DType::F32)?;
        let (b, t, h) = hidden.dims3()?;
        match self {
            Self::Cls => Ok(hidden.narrow(1, 0, 1)?.reshape((b, h))?),
            Self::LastToken => {
                let rows = lengths
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| hidden.get(i)?.get(n.saturating_sub(1)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::stack(&rows, 0)?)
            }
            Self::Max => {
                // sentence-transformers sets padded positions to -1e9 before the max.
                let mask = token_mask(lengths, t, hidden.device())?; // (b, t, 1)
                let fill = ((mask.ones_like()? - &mask)? * -1e9)?;
                Ok(hidden.broadcast_mul(&mask)?.broadcast_add(&fill)?.max(1)?)
            }
            Self::Mean | Self::MeanSqrtLen => {
                let mask = token_mask(lengths, t, hidden.device())?; // (b, t, 1)
                let sum = hidden.broadcast_mul(&mask)?.sum(1)?; // (b, h)
                let counts: Vec<f32> = lengths.iter().map(|&n| (n.max(1)) as f32).collect();
                let counts = Tensor::from_vec(counts, (b, 1), hidden.device())?;
                let div = if self == Self::Mean { counts } else { counts.sqrt()? };
                Ok(sum.broadcast_div(&div)?)
            }
        }
    }
}

/// (b, t, 1) f32: 1 at each row's first `lengths[i]` positions, 0 after.
fn token_mask(lengths: &[usize], t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = lengths.iter().flat_map(|&n| (0..t).map(move |j| if j < n { 1.0 } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (lengths.len(), t, 1), device)?)
}

/// Rows of `x` (b, h) divided by their L2 norm, as `torch.nn.functional.normalize` (norms below
/// 1e-12 are clamped, so a zero row stays zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two rows of three tokens with two dims; row 1 has one padded position holding 100s.
    fn hidden() -> Tensor {
        let v = [1f32, 2., 3., 4., 5., 6., -1., 0., 2., 8., 100., 100.];
        Tensor::from_slice(&v, (2, 3, 2), &Device::Cpu).unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn pooling_modes_ignore_padding() {
        let lens = [3, 2];
        assert_eq!(rows(&Pooling::Mean.pool(&hidden(), &lens).unwrap()), [[3., 4.], [0.5, 4.]]);
        assert_eq!(rows(&Pooling::Cls.pool(&hidden(), &lens).unwrap()), [[1., 2.], [-1., 0.]]);
        assert_eq!(rows(&Pooling::LastToken.pool(&hidden(), &lens).unwrap()), [[5., 6.], [2., 8.]]);
        assert_eq!(rows(&Pooling::Max.pool(&hidden(), &lens).unwrap()), [[5., 6.], [2., 8.]]);
        let s = rows(&Pooling::MeanSqrtLen.pool(&hidden(), &lens).unwrap());
        let r3 = 3f32.sqrt();
        let r2 = 2f32.sqrt();
        for (got, want) in s.concat().iter().zip([9. / r3, 12. / r3, 1. / r2, 8. / r2]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn l2_normalize_keeps_zero_rows() {
        let x = Tensor::from_slice(&[3f32, 4., 0., 0.], (2, 2), &Device::Cpu).unwrap();
        assert_eq!(rows(&l2_normalize(&x).unwrap()), [[0.6, 0.8], [0., 0.]]);
    }
}
