//! Non-finite detection: NaN and ±Inf are reported, never returned as if they were numbers.
//!
//! A damaged weight (one NaN in a projection, a scale that overflowed) poisons every value
//! computed from it; the kernels propagate it (IEEE semantics, like the reference), and the
//! model checks its logits here before they leave it, so perplexity, sampling and the server see
//! a typed [`Error::NonFinite`] instead of `null` or a silently wrong distribution.

use candle_core::{DType, Storage, Tensor};

use crate::error::{Error, Result};

/// Lanes of the scan's independent partial sums (vectorizes without reassociating one sum).
const LANES: usize = 8;

/// Checks logits `(rows, vocab)` (or `(b, t, vocab)`, rows counted batch-major) in one pass.
/// Errors: [`Error::NonFinite`] `{ what: "logits", position }` for the first row holding NaN or
/// ±Inf.
pub(crate) fn check_logits(logits: &Tensor) -> Result<()> {
    match first_bad_row(logits)? {
        Some(position) => Err(Error::NonFinite { what: "logits", position }),
        None => Ok(()),
    }
}

/// The first row (last dimension = a row) of `t` holding NaN or ±Inf. On the CPU an f32 tensor
/// is scanned in place; elsewhere `0·x` (0 for finite values, NaN otherwise) is summed per row
/// on the device and only one value per row is copied back.
pub(crate) fn first_bad_row(t: &Tensor) -> Result<Option<usize>> {
    let cols = t.dims().last().copied().unwrap_or(1).max(1);
    if t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            let v = cpu.as_slice::<f32>()?;
            return Ok(v[a..b].chunks(cols).position(|row| !all_finite(row)));
        }
    }
    let rows = t.elem_count() / cols;
    let t = t.reshape((rows, cols))?.to_dtype(DType::F32)?;
    let flags = (t * 0.0)?.sum(1)?.to_vec1::<f32>()?; // (rows,): 0 or NaN
    Ok(flags.iter().position(|f| !f.is_finite()))
}

/// `y` (rows, out) with every row NaN whose input row of `x` (rows, in) holds NaN or ±Inf: what
/// the f32 product `x·Wᵀ` gives (NaN·w and Inf·0 are NaN), for quantized matmuls that quantize
/// `x` to 8 bits and would turn a NaN into 0 (candle's, like ggml's). (rows, in) + (rows, out)
/// elementwise work, next to the (rows, in, out) matmul.
pub(crate) fn propagate_rows(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let flags = (x * 0.0)?.sum_keepdim(1)?.to_dtype(y.dtype())?; // (rows, 1): 0 or NaN
    Ok(y.broadcast_add(&flags)?)
}

/// The index of the first NaN or ±Inf of `t` (any dtype convertible to f32, any device).
pub(crate) fn first_bad_value(t: &Tensor) -> Result<Option<usize>> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(v.iter().position(|x| !x.is_finite()))
}

/// Whether every value is finite: `0·x` is 0 for finite x and NaN for NaN and ±Inf, so the sum
/// is 0 exactly when all are finite (one branch-free pass).
pub(crate) fn all_finite(v: &[f32]) -> bool {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(0f32, |a, &x| a + x * 0.0);
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l] * 0.0;
        }
    }
    (acc.iter().sum::<f32>() + tail) == 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_first_bad_row_is_named() {
        let dev = Device::Cpu;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = vec![0.5f32; 3 * 37];
            v[2 * 37 + 36] = bad;
            v[2 * 37 + 1] = bad;
            let t = Tensor::from_vec(v, (3, 37), &dev).unwrap();
            assert!(matches!(check_logits(&t), Err(Error::NonFinite { what: "logits", position: 2 })));
            // Off the in-place path (not contiguous, other dtype): the same verdict.
            let tt = t.t().unwrap().contiguous().unwrap().t().unwrap();
            assert_eq!(first_bad_row(&tt).unwrap(), Some(2));
            assert_eq!(first_bad_row(&t.to_dtype(DType::F16).unwrap()).unwrap(), Some(2));
            let b = t.reshape((1, 3, 37)).unwrap();
            assert_eq!(first_bad_row(&b).unwrap(), Some(2));
            assert_eq!(first_bad_value(&t).unwrap(), Some(2 * 37 + 1));
        }
    }

    #[test]
    fn finite_logits_pass_even_when_huge() {
        let t = Tensor::from_vec(vec![f32::MAX, -f32::MAX, 0.0, f32::MIN_POSITIVE], (2, 2), &Device::Cpu).unwrap();
        assert!(check_logits(&t).is_ok());
        assert_eq!(first_bad_value(&t).unwrap(), None);
    }
}
