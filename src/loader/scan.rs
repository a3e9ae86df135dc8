//! `LoadOptions::check_tensors`: every tensor of a model file scanned for NaN and ±Inf, as
//! llama.cpp's `--check-tensors` does (`ggml_validate_row_data`). Dense tensors are checked value
//! by value; quantized blocks through their float scales and mins (their integer quants cannot
//! be non-finite). One pass over the raw bytes, in file order, so the first bad tensor is named.

use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// How a tensor's bytes hold floats: `Dense(bytes per value)` or GGML blocks of `values` values,
/// `bytes` bytes each, with f16 scales at the byte offsets `f16s` (and an f32 scale at `f32s`).
#[derive(Debug, Clone, Copy)]
enum Layout {
    F32,
    F16,
    Bf16,
    Blocks { values: usize, bytes: usize, f16s: &'static [usize], f32s: &'static [usize] },
}

impl Layout {
    /// The layout of a GGML type (ggml-common.h `block_*` structs).
    fn of_ggml(t: GgmlDType) -> Self {
        let b = |values, bytes, f16s, f32s| Self::Blocks { values, bytes, f16s, f32s };
        match t {
            GgmlDType::F32 => Self::F32,
            GgmlDType::F16 => Self::F16,
            GgmlDType::BF16 => Self::Bf16,
            GgmlDType::Q4_0 => b(32, 18, &[0], &[]),
            GgmlDType::Q4_1 => b(32, 20, &[0, 2], &[]),
            GgmlDType::Q5_0 => b(32, 22, &[0], &[]),
            GgmlDType::Q5_1 => b(32, 24, &[0, 2], &[]),
            GgmlDType::Q8_0 => b(32, 34, &[0], &[]),
            GgmlDType::Q8_1 => b(32, 36, &[0, 2], &[]),
            GgmlDType::Q2K => b(256, 84, &[80, 82], &[]),
            GgmlDType::Q3K => b(256, 110, &[108], &[]),
            GgmlDType::Q4K => b(256, 144, &[0, 2], &[]),
            GgmlDType::Q5K => b(256, 176, &[0, 2], &[]),
            GgmlDType::Q6K => b(256, 210, &[208], &[]),
            GgmlDType::Q8K => b(256, 292, &[], &[0]),
        }
    }

    /// The layout of a safetensors dtype; `None` for integer and other types (nothing to check).
    fn of_safetensors(dtype: &str) -> Option<Self> {
        match dtype {
            "F32" => Some(Self::F32),
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::Bf16),
            _ => None,
        }
    }
}

/// The element index of the first non-finite value in `bytes` (for blocks: the first value of
/// the first block whose scale or min is non-finite).
fn first_bad(layout: Layout, bytes: &[u8]) -> Option<usize> {
    // An f16/bf16 is NaN or ±Inf exactly when its exponent bits are all ones.
    let f16_bad = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]) & 0x7C00 == 0x7C00;
    let bf16_bad = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]) & 0x7F80 == 0x7F80;
    let f32_bad = |c: &[u8]| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite();
    match layout {
        Layout::F32 => bytes.chunks_exact(4).position(f32_bad),
        Layout::F16 => bytes.chunks_exact(2).position(f16_bad),
        Layout::Bf16 => bytes.chunks_exact(2).position(bf16_bad),
        Layout::Blocks { values, bytes: size, f16s, f32s } => bytes
            .chunks_exact(size)
            .position(|blk| {
                f16s.iter().any(|&o| f16_bad(&blk[o..o + 2])) || f32s.iter().any(|&o| f32_bad(&blk[o..o + 4]))
            })
            .map(|b| b * values),
    }
}

/// Every tensor `(name, GGML type, bytes)` of a GGUF file, in file order. Errors:
/// [`Error::NonFiniteTensor`] for the first with a NaN or ±Inf.
pub(crate) fn check_gguf<'a>(path: &Path, tensors: impl Iterator<Item = (&'a str, GgmlDType, &'a [u8])>) -> Result<()> {
    for (name, dtype, bytes) in tensors {
        if let Some(index) = first_bad(Layout::of_ggml(dtype), bytes) {
            return Err(Error::NonFiniteTensor { path: path.to_path_buf(), name: name.to_string(), index });
        }
    }
    Ok(())
}

/// Every tensor `(name, safetensors dtype, bytes)` of a safetensors file, in file order.
/// Errors: [`Error::NonFiniteTensor`] for the first with a NaN or ±Inf.
pub(crate) fn check_safetensors<'a>(path: &Path, tensors: impl Iterator<Item = (&'a str, &'a str, &'a [u8])>) -> Result<()> {
    for (name, dtype, bytes) in tensors {
        if let Some(index) = Layout::of_safetensors(dtype).and_then(|l| first_bad(l, bytes)) {
            return Err(Error::NonFiniteTensor { path: path.to_path_buf(), name: name.to_string(), index });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Each GGML type's scale offsets, checked against candle's quantizer: a block with its
    /// scale (and min) forced to NaN must dequantize to non-finite values, and the scan finds it.
    #[test]
    fn scale_offsets_match_the_block_layouts() {
        let w = Tensor::randn(0f32, 1.0, (2, 512), &Device::Cpu).unwrap();
        for t in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0, GgmlDType::Q2K, GgmlDType::Q3K, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w, t).unwrap();
            let mut bytes = q.data().unwrap().into_owned();
            let layout = Layout::of_ggml(t);
            assert_eq!(first_bad(layout, &bytes), None, "{t:?} clean");
            let Layout::Blocks { values, bytes: size, f16s, .. } = layout else { panic!("{t:?}") };
            assert_eq!(bytes.len(), 2 * 512 / values * size, "{t:?} block size");
            let blk = 3; // a block in the middle of row 0
            for &o in f16s {
                bytes[blk * size + o..blk * size + o + 2].copy_from_slice(&0x7E00u16.to_le_bytes());
            }
            assert_eq!(first_bad(layout, &bytes), Some(blk * values), "{t:?}");
            let damaged = QTensor::new(
                candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, t).unwrap(),
                (2, 512),
            )
            .unwrap();
            let v = damaged.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v[blk * values..(blk + 1) * values].iter().any(|x| !x.is_finite()), "{t:?}: NaN scale at the wrong offset");
            assert!(v[..blk * values].iter().all(|x| x.is_finite()), "{t:?}");
        }
    }

    #[test]
    fn dense_values_are_found_by_index() {
        let mut f32s: Vec<u8> = [1.0f32, -2.0, f32::MAX, f32::INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_bad(Layout::F32, &f32s), Some(3));
        f32s.truncate(12);
        assert_eq!(first_bad(Layout::F32, &f32s), None);
        let f16s: Vec<u8> = [0x3C00u16, 0x7BFF, 0xFC00].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_bad(Layout::F16, &f16s), Some(2)); // 0x7BFF is 65504, finite
        let bf16s: Vec<u8> = [0x3F80u16, 0x7F7F, 0x7FC0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_bad(Layout::Bf16, &bf16s), Some(2));
    }
}
