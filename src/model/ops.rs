//! One dispatch function per op. candle has fused kernels for these on CPU, Metal and CUDA; each
//! has a `*_reference` twin built from plain tensor ops that the tests compare against.
//!
//! candle's fused ops have no backward pass. When an input is part of an autograd graph
//! ([`needs_grad`]: LoRA training, [`crate::train`]) the dispatchers take the plain-op twin, which
//! candle differentiates; inference never builds a graph, so it keeps the fused kernels.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// Whether any of `ts` is part of an autograd graph (a `Var` or computed from one): the forward
/// must then use ops candle can differentiate.
pub fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * weight` (HF `LlamaRMSNorm`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.is_contiguous() && !needs_grad(&[x, weight]) {
        Ok(candle_nn::ops::rms_norm(x, weight, eps as f32)?)
    } else {
        rms_norm_reference(x, weight, eps)
    }
}

/// Plain-op twin of [`rms_norm`], accumulating in f32.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// RoPE on `x` (b, h, t, hd) with `cos`/`sin` (t, hd/2): half-split rotation (HF `rotate_half`)
/// or, with `interleaved`, adjacent pairs (llama.cpp's layout for `llama` GGUFs).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    if needs_grad(&[x, cos, sin]) {
        return rope_reference(&x.contiguous()?, cos, sin, interleaved);
    }
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    if interleaved {
        Ok(candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?)
    } else {
        Ok(candle_nn::rotary_emb::rope(&x, &cos, &sin)?)
    }
}

/// Plain-op twin of [`rope`].
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    if interleaved {
        Ok(candle_nn::rotary_emb::rope_i_slow(x, cos, sin)?)
    } else {
        Ok(candle_nn::rotary_emb::rope_slow(x, cos, sin)?)
    }
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if needs_grad(&[x]) {
        return softmax_reference(x);
    }
    Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
}

/// Plain-op twin of [`softmax_last_dim`], computed in f32.
pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    // Softmax is shift-invariant: the max only keeps exp() in range and carries no gradient.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?.to_dtype(dtype)?)
}

/// SiLU(gate) · up (the SwiGLU MLP's activation).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(gate)? * up)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_ops_match_their_reference_twins() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let a = rms_norm(&x, &w, 1e-6).unwrap();
        let b = rms_norm_reference(&x, &w, 1e-6).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-5);

        let cos = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        for interleaved in [false, true] {
            let a = rope(&x, &cos, &sin, interleaved).unwrap();
            let b = rope_reference(&x, &cos, &sin, interleaved).unwrap();
            assert!(max_abs_diff(&a, &b) < 1e-5);
        }
        let a = softmax_last_dim(&x).unwrap();
        let b = softmax_reference(&x).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-6);
    }
}
