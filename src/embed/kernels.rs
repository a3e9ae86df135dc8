//! CPU kernels of the encoder's packed path: attention over the sequences of a packed batch (no
//! padding, no (b · heads · t · t) score tensor) and the exact-erf GELU without a scalar libm
//! call per element. Each has a plain twin: attention the padded candle ops of
//! [`super::encoder`], GELU candle's `gelu_erf` (tests below and in `tests/embeddings.rs`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::cpu::attention::dot;

/// One sequence of a packed batch: its first row and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Index of the sequence's first row in the packed batch.
    pub start: usize,
    /// Its number of rows (tokens).
    pub len: usize,
}

/// An additive score bias shared by every sequence: `bias[(h · t + i) · t + j]` for query i and
/// key j of head h, for sequences of at most `t` tokens (MPNet's relative position bias).
#[derive(Debug, Clone, Copy)]
pub struct ScoreBias<'a> {
    /// (heads, t, t) row-major.
    pub bias: &'a [f32],
    /// The longest sequence it covers.
    pub t: usize,
}

/// Bidirectional attention of each sequence over its own rows. `q`, `k`, `v`: (rows, heads · hd)
/// row-major f32 → (rows, heads · hd). Every key of a span is visible to every query of it.
/// NaN/±Inf propagate as in softmax: a non-finite score makes its query row NaN.
pub fn packed_attention(q: &[f32], k: &[f32], v: &[f32], spans: &[Span], heads: usize, scale: f32, bias: Option<ScoreBias<'_>>) -> Vec<f32> {
    let width = q.len() / spans.iter().map(|s| s.len).sum::<usize>().max(1);
    let hd = width / heads.max(1);
    let tasks: Vec<(Span, usize)> = spans.iter().flat_map(|&s| (0..heads).map(move |h| (s, h))).collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(span, h)| {
            let at = |row: usize| -> std::ops::Range<usize> {
                let o = (span.start + row) * width + h * hd;
                o..o + hd
            };
            let mut out = vec![0f32; span.len * hd];
            let mut scores = vec![0f32; span.len];
            for i in 0..span.len {
                let qi = &q[at(i)];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let mut d = dot(qi, &k[at(j)]) * scale;
                    if let Some(b) = bias {
                        d += b.bias[(h * b.t + i) * b.t + j];
                    }
                    *s = d;
                    max = if d.is_nan() || max.is_nan() { f32::NAN } else { max.max(d) };
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let row = &mut out[i * hd..(i + 1) * hd];
                for (j, &p) in scores.iter().enumerate() {
                    let vj = &v[at(j)];
                    let p = p / sum;
                    for (o, &x) in row.iter_mut().zip(vj) {
                        *o += p * x;
                    }
                }
            }
            out
        })
        .collect();
    let rows = q.len() / width.max(1);
    let mut out = vec![0f32; rows * width];
    for ((span, h), part) in tasks.iter().zip(parts) {
        for i in 0..span.len {
            let o = (span.start + i) * width + h * hd;
            out[o..o + hd].copy_from_slice(&part[i * hd..(i + 1) * hd]);
        }
    }
    out
}

/// erf(x) by Abramowitz & Stegun 7.1.28 (|error| ≤ 3e-7): 1 − 1/(1 + a₁x + … + a₆x⁶)¹⁶ for
/// x ≥ 0, odd. A polynomial, four squarings and a division: no branch, no libm call.
#[inline]
fn erf(x: f32) -> f32 {
    const A: [f32; 6] = [0.070_523_08, 0.042_282_01, 0.009_270_527, 0.000_152_014_3, 0.000_276_567_2, 0.000_043_063_8];
    let t = x.abs();
    let p = 1.0 + t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * (A[4] + t * A[5])))));
    let p2 = p * p;
    let p4 = p2 * p2;
    let p8 = p4 * p4;
    let y = 1.0 - 1.0 / (p8 * p8);
    y.copysign(x)
}

/// GELU with the exact erf form, `x/2 · (1 + erf(x/√2))`, in place.
pub fn gelu_erf_slice(xs: &mut [f32]) {
    xs.par_chunks_mut(16 * 1024).for_each(|c| {
        for x in c {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
}

/// [`gelu_erf_slice`] as a candle op on a contiguous f32 CPU tensor (others: candle's
/// `gelu_erf`, the twin).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        Ok(x.apply_op1_no_bwd(&GeluErf)?)
    } else {
        Ok(x.gelu_erf()?)
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-poly"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu-erf-poly: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf-poly: contiguous input only");
        };
        let mut out = data[start..end].to_vec();
        gelu_erf_slice(&mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gelu_matches_candles_erf_form() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).chain([30.0, -30.0, 1e-8, -1e-8, 0.0]).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let want = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        let got = gelu_erf(&t).unwrap().to_vec1::<f32>().unwrap();
        for ((x, w), g) in xs.iter().zip(&want).zip(&got) {
            assert!((w - g).abs() <= 4e-7 * x.abs().max(1.0), "x={x}: {g} vs {w}");
        }
        let odd = gelu_erf(&Tensor::new(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY], &Device::Cpu).unwrap()).unwrap();
        let odd = odd.to_vec1::<f32>().unwrap();
        assert!(odd[0].is_nan());
        assert_eq!(odd[1], f32::INFINITY);
        assert!(odd[2].is_nan() || odd[2] == 0.0, "{}", odd[2]); // torch gives nan (−inf · 0)
    }

    /// Against the padded candle ops (matmul, additive mask, softmax, matmul) per sequence.
    #[test]
    fn attention_matches_padded_ops() {
        let dev = Device::Cpu;
        let (heads, hd) = (3usize, 12usize);
        let lens = [5usize, 1, 9, 16];
        let rows: usize = lens.iter().sum();
        let q = Tensor::randn(0f32, 1.0, (rows, heads * hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (rows, heads * hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (rows, heads * hd), &dev).unwrap();
        let tmax = 16;
        let bias = Tensor::randn(0f32, 1.0, (heads, tmax, tmax), &dev).unwrap();
        let mut spans = Vec::new();
        let mut start = 0;
        for &len in &lens {
            spans.push(Span { start, len });
            start += len;
        }
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        for with_bias in [false, true] {
            let b = flat(&bias);
            let got = packed_attention(&flat(&q), &flat(&k), &flat(&v), &spans, heads, scale, with_bias.then_some(ScoreBias { bias: &b, t: tmax }));
            for s in &spans {
                let part = |t: &Tensor| t.narrow(0, s.start, s.len).unwrap().reshape((s.len, heads, hd)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
                let (qs, ks, vs) = (part(&q), part(&k), part(&v));
                let mut scores = (qs.matmul(&ks.t().unwrap()).unwrap() * scale as f64).unwrap();
                if with_bias {
                    let bb = bias.narrow(1, 0, s.len).unwrap().narrow(2, 0, s.len).unwrap();
                    scores = (scores + bb).unwrap();
                }
                let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
                let want = flat(&p.matmul(&vs).unwrap().transpose(0, 1).unwrap().contiguous().unwrap());
                let got = &got[s.start * heads * hd..(s.start + s.len) * heads * hd];
                let worst = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-5, "span {s:?} bias {with_bias}: {worst}");
            }
        }
    }
}
