//! Differentiable attention for training on the CPU: `softmax(q·kᵀ·scale + mask)·v` as one
//! autograd node with its own backward, instead of the chain of plain ops candle would
//! differentiate one by one ([`crate::kernels::attend_reference`], the twin).
//!
//! The plain chain keeps the scores, the scaled scores, the masked scores, their shifted copy,
//! its exponential and the probabilities alive for the backward, each (b, h, t, T) f32, and walks
//! every one of them again there. This op keeps only q, k and v: its backward recomputes the
//! probabilities P (two batched matmuls and one fused pass) and then takes, with
//! dP = dY·Vᵀ and dS = P ⊙ (dP − rowsum(P ⊙ dP)):
//! dV = Pᵀ·dY, dQ = scale·dS·K, dK = scale·dSᵀ·Q, GQA heads summed into their key/value head.
//!
//! Shapes as the twin: q (b, h, t, d), k/v (b, n_kv, T, d), mask (t, T) additive (−inf hides),
//! broadcast over batch and heads; output (b, h, t, d).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::attention::{AttnDims, AttnParams};

/// `softmax(q·kᵀ·scale + mask)·v` with a backward for q, k and v: the fused op on the CPU with
/// f32 inputs, the plain-op twin [`crate::kernels::attend_reference`] elsewhere.
///
/// Errors: shapes that do not fit, as [`AttnDims::of`] (h not a multiple of n_kv, d or T
/// differing, a mask not (t, T)).
pub fn attend_trainable(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let cpu_f32 = [q, k, v].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !cpu_f32 {
        return crate::kernels::attend_reference(q, k, v, mask, scale);
    }
    // Shapes checked as the attention kernels check them; query 0 sits at key 0 (training rows
    // start at position 0), so t may exceed T as in the twin.
    let params = AttnParams { scale: scale as f32, mask: mask.cloned(), q_offset: Some(0), ..AttnParams::new(q.dim(3)?) };
    let dims = AttnDims::of(q, k, v, &params)?;
    let mask = match mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = TrainableAttention { dims, mask, scale: params.scale };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The autograd node of [`attend_trainable`].
struct TrainableAttention {
    dims: AttnDims,
    /// (t, T) additive mask, row-major.
    mask: Option<Vec<f32>>,
    scale: f32,
}

impl TrainableAttention {
    /// P (b, n_kv, n_rep·t, T): the query heads of one key/value head stacked, as the twin
    /// groups them.
    fn probs(&self, q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        let AttnDims { b, h, n_kv, t, kv_len, d, .. } = self.dims;
        let rows = h / n_kv * t;
        let s = q.reshape((b, n_kv, rows, d))?.matmul(&k.t()?)?; // (b, n_kv, rows, T)
        let mut s = s.flatten_all()?.to_vec1::<f32>()?;
        s.par_chunks_mut(kv_len.max(1)).enumerate().for_each(|(r, row)| {
            let mask = self.mask.as_ref().map(|m| &m[(r % t) * kv_len..][..kv_len]);
            softmax_row(row, self.scale, mask);
        });
        Tensor::from_vec(s, (b, n_kv, rows, kv_len), q.device())
    }
}

/// row ← softmax(row·scale + mask) in place, in the twin's order of operations (scale, then the
/// mask, then max-shift, exp, sum, divide).
fn softmax_row(row: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    match mask {
        Some(m) => row.iter_mut().zip(m).for_each(|(x, &a)| *x = *x * scale + a),
        None => row.iter_mut().for_each(|x| *x *= scale),
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, |m, x| if x.is_nan() || x > m { x } else { m });
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    row.iter_mut().for_each(|x| *x /= sum);
}

/// The contiguous f32 data of a CPU tensor argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
        _ => candle_core::bail!("trainable attention: contiguous f32 inputs only"),
    }
}

impl CustomOp3 for TrainableAttention {
    fn name(&self) -> &'static str {
        "trainable-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let AttnDims { b, h, n_kv, t, kv_len, d, .. } = self.dims;
        let dev = candle_core::Device::Cpu;
        let q = Tensor::from_slice(slice(qs, ql)?, (b, h, t, d), &dev)?;
        let k = Tensor::from_slice(slice(ks, kl)?, (b, n_kv, kv_len, d), &dev)?;
        let v = Tensor::from_slice(slice(vs, vl)?, (b, n_kv, kv_len, d), &dev)?;
        let y = self.probs(&q, &k)?.matmul(&v)?; // (b, n_kv, n_rep·t, d) = (b, h, t, d) in memory
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let AttnDims { b, h, n_kv, t, kv_len, d, .. } = self.dims;
        let rows = h / n_kv * t;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let p = self.probs(&q, &k)?; // (b, n_kv, rows, T)
        let dyg = dy.to_dtype(DType::F32)?.contiguous()?.reshape((b, n_kv, rows, d))?;
        let dv = p.t()?.matmul(&dyg)?; // (b, n_kv, T, d)
        let dp = dyg.matmul(&v.t()?)?; // (b, n_kv, rows, T)
        // dS·scale = scale · P ⊙ (dP − Σ_j P ⊙ dP), row by row.
        let pv = p.flatten_all()?.to_vec1::<f32>()?;
        let mut ds = dp.flatten_all()?.to_vec1::<f32>()?;
        ds.par_chunks_mut(kv_len.max(1)).zip(pv.par_chunks(kv_len.max(1))).for_each(|(g, p)| {
            let dot: f32 = g.iter().zip(p).map(|(a, b)| a * b).sum();
            g.iter_mut().zip(p).for_each(|(g, &p)| *g = self.scale * p * (*g - dot));
        });
        let ds = Tensor::from_vec(ds, (b, n_kv, rows, kv_len), q.device())?;
        let dq = ds.matmul(&k)?.reshape((b, h, t, d))?; // (b, n_kv, rows, d)
        let dk = ds.t()?.matmul(&q.reshape((b, n_kv, rows, d))?)?; // (b, n_kv, T, d)
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..n)
            .map(|i| {
                let x = ((i as u64 + 1).wrapping_mul(6_364_136_223_846_793_005).wrapping_add(seed) >> 33) as f32;
                (x / (1u64 << 31) as f32 - 0.5) * 3.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
    }

    fn causal(t: usize, kv_len: usize) -> Tensor {
        let m: Vec<f32> = (0..t * kv_len)
            .map(|i| if i % kv_len > i / kv_len + (kv_len - t) { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        Tensor::from_vec(m, (t, kv_len), &Device::Cpu).expect("mask")
    }

    fn worst(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.flatten_all().expect("a").to_vec1::<f32>().expect("a"), b.flatten_all().expect("b").to_vec1::<f32>().expect("b"));
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    /// Output and the gradients of q, k and v equal those candle derives through the plain-op
    /// twin: GQA, causal / arbitrary / no mask, several lengths.
    #[test]
    fn equals_the_plain_op_twin_and_its_gradients() -> Result<()> {
        for (b, h, n_kv, t, kv_len, d, mask) in [
            (1, 4, 2, 5, 5, 8, "causal"),
            (2, 6, 2, 17, 17, 16, "causal"),
            (1, 3, 3, 9, 12, 8, "causal"),
            (1, 2, 1, 7, 7, 4, "none"),
            (1, 4, 1, 6, 6, 8, "random"),
        ] {
            let q = Var::from_tensor(&randn((b, h, t, d), 1))?;
            let k = Var::from_tensor(&randn((b, n_kv, kv_len, d), 2))?;
            let v = Var::from_tensor(&randn((b, n_kv, kv_len, d), 3))?;
            let m = match mask {
                "causal" => Some(causal(t, kv_len)),
                "random" => Some((randn((1, 1, t, kv_len), 4).reshape((t, kv_len))? * 2.0)?),
                _ => None,
            };
            let scale = 1.0 / (d as f64).sqrt();
            let w = randn((b, h, t, d), 5); // a loss that weighs every output differently
            let fused = attend_trainable(q.as_tensor(), k.as_tensor(), v.as_tensor(), m.as_ref(), scale)?;
            let plain = crate::kernels::attend_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), m.as_ref(), scale)?;
            assert!(worst(&fused, &plain) < 1e-5, "output at {t}x{kv_len}");
            let gf = (&fused * &w)?.sum_all()?.backward()?;
            let gp = (&plain * &w)?.sum_all()?.backward()?;
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, p) = (gf.get(x.as_tensor()).expect("fused grad"), gp.get(x.as_tensor()).expect("plain grad"));
                let e = worst(a, p);
                assert!(e < 2e-5, "d{name} differs by {e} at b{b} h{h}/{n_kv} {t}x{kv_len} mask {mask}");
            }
        }
        Ok(())
    }
}
