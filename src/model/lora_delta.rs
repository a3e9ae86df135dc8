//! The unmerged LoRA delta `factor · (x·Aᵀ)·Bᵀ`, with a plain-loop CPU path.
//!
//! candle's CPU matmul costs about 50 µs per call at these sizes whatever the arithmetic (gemm's
//! thread dispatch), so a decode step with one rank-16 adapter on all seven projections of a
//! 24-layer model would pay ~17 ms in dispatch alone. For f32 on the CPU the delta is computed
//! with dot products instead, for every row count: each row's delta is then the same bits however
//! many rows share the step (a prefill chunk, a mixed batch, a decode token), which a strong
//! adapter needs — the 8-bit activation quantization of a quantized base turns a last-bit
//! difference into a different token. Past [`SMALL_ROWS`] rows they run in parallel.
//! [`lora_delta_reference`] is the plain-op twin the tests compare against, and the path for
//! every other device and dtype.

use candle_core::{DType, Storage, Tensor};

use crate::error::Result;

/// Largest row count (tokens) computed on the calling thread; more rows run on rayon's pool.
pub const SMALL_ROWS: usize = 4;

/// `factor · (x2·Aᵀ)·Bᵀ`: x2 (rows, in), a (r, in), b (out, r) → (rows, out), in x2's dtype.
pub fn lora_delta(x2: &Tensor, a: &Tensor, b: &Tensor, factor: f64) -> Result<Tensor> {
    let x2 = &x2.contiguous()?;
    if let Some(t) = small_cpu(x2, a, b, factor)? {
        return Ok(t);
    }
    lora_delta_reference(x2, a, b, factor)
}

/// The plain-op twin of [`lora_delta`]: two matmuls and a scale on the (rows, r) intermediate.
pub fn lora_delta_reference(x2: &Tensor, a: &Tensor, b: &Tensor, factor: f64) -> Result<Tensor> {
    let h = x2.matmul(&a.t()?)?; // (rows, r)
    Ok((h * factor)?.matmul(&b.t()?)?) // (rows, out)
}

/// The dot-product path, or `None` where it does not apply (device, dtype, rows, layout).
fn small_cpu(x2: &Tensor, a: &Tensor, b: &Tensor, factor: f64) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let (rows, inp) = x2.dims2()?;
    let (r, out) = (a.dim(0)?, b.dim(0)?);
    if !(f32_cpu(x2) && f32_cpu(a) && f32_cpu(b)) {
        return Ok(None);
    }
    let delta = with_slice(x2, |xs| {
        with_slice(a, |as_| with_slice(b, |bs| compute(xs, as_, bs, (rows, inp, r, out), factor as f32)))
    });
    match delta.flatten().flatten() {
        Some(v) => Ok(Some(Tensor::from_vec(v, (rows, out), x2.device())?)),
        None => Ok(None),
    }
}

/// Row-major `x` (rows, in), `a` (r, in), `b` (out, r) → `factor·(x·Aᵀ)·Bᵀ` (rows, out). Every
/// row is computed alone, in the same order, whatever `rows` is.
fn compute(x: &[f32], a: &[f32], b: &[f32], (rows, inp, r, out): (usize, usize, usize, usize), factor: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let mut y = vec![0f32; rows * out];
    // `h` (r,): the row's x·Aᵀ, one buffer per thread.
    let row = |h: &mut Vec<f32>, (xr, yr): (&[f32], &mut [f32])| {
        for (hj, aj) in h.iter_mut().zip(a.chunks_exact(inp)) {
            *hj = dot(xr, aj) * factor;
        }
        for (yo, bo) in yr.iter_mut().zip(b.chunks_exact(r)) {
            *yo = dot(h, bo);
        }
    };
    if rows <= SMALL_ROWS {
        let mut h = vec![0f32; r];
        x.chunks_exact(inp).zip(y.chunks_exact_mut(out)).for_each(|pair| row(&mut h, pair));
    } else {
        x.par_chunks_exact(inp).zip(y.par_chunks_exact_mut(out)).for_each_init(|| vec![0f32; r], row);
    }
    y
}

/// Dot product with eight independent accumulators (vectorizable).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Runs `f` on the contiguous f32 CPU data of `t`, or returns `None`.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return None };
    let (start, end) = layout.contiguous_offsets()?;
    let data = cpu.as_slice::<f32>().ok()?.get(start..end)?;
    Some(f(data))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn small_path_equals_the_reference() {
        let d = Device::Cpu;
        for (rows, inp, r, out) in [(1, 64, 4, 32), (3, 37, 5, 19), (4, 130, 16, 7)] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &d).unwrap();
            let a = Tensor::randn(0f32, 1.0, (r, inp), &d).unwrap();
            let b = Tensor::randn(0f32, 1.0, (out, r), &d).unwrap();
            let fast = small_cpu(&x, &a, &b, 0.37).unwrap().expect("small path taken");
            let slow = lora_delta_reference(&x, &a, &b, 0.37).unwrap();
            let d = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "({rows}, {inp}, {r}, {out}): {d}");
        }
        // A transposed (non-contiguous) input falls back to the reference path.
        let xt = Tensor::randn(0f32, 1.0, (64, 2), &d).unwrap().t().unwrap();
        let a = Tensor::randn(0f32, 1.0, (4, 64), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, (8, 4), &d).unwrap();
        assert!(small_cpu(&xt, &a, &b, 1.0).unwrap().is_none());
    }

    #[test]
    fn a_row_is_the_same_bits_whatever_rows_share_the_call() {
        let d = Device::Cpu;
        let (inp, r, out) = (96, 8, 40);
        let x = Tensor::randn(0f32, 1.0, (13, inp), &d).unwrap();
        let a = Tensor::randn(0f32, 1.0, (r, inp), &d).unwrap();
        let b = Tensor::randn(0f32, 1.0, (out, r), &d).unwrap();
        let all = lora_delta(&x, &a, &b, 0.5).unwrap().to_vec2::<f32>().unwrap();
        for (rows, start) in [(1, 0), (1, 12), (3, 5), (4, 9), (5, 2), (13, 0)] {
            let part = lora_delta(&x.narrow(0, start, rows).unwrap(), &a, &b, 0.5).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(part[..], all[start..start + rows], "rows {start}..{}", start + rows);
        }
        let slow = lora_delta_reference(&x, &a, &b, 0.5).unwrap().to_vec2::<f32>().unwrap();
        let worst = all.iter().flatten().zip(slow.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{worst}");
    }
}
