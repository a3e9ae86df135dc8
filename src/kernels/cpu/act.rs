//! Activations quantized to 8 bits once per matmul (and shared by every projection that reads the
//! same input): blocks of 32 values `x ≈ d·q`, q ∈ [−127, 127], as ggml's Q8_0/Q8_1.

use rayon::prelude::*;

/// Values per activation block.
pub const QK: usize = 32;

/// `m` rows of `k` values as 8-bit blocks. Row r, block b: `qs[r·k + 32b ..][..32]`, scale
/// `d[r·k/32 + b]`, and `s[..] = d·Σq` (for the weight types with an offset or a min).
#[derive(Debug, Default, Clone)]
pub struct Q8Act {
    /// 8-bit quants, (m, k) row-major.
    pub qs: Vec<i8>,  // (m, k)
    /// One scale per 32-value block, (m, k/32).
    pub d: Vec<f32>,  // (m, k/32)
    /// Each block's scale times the sum of its quants, (m, k/32).
    pub s: Vec<f32>,  // (m, k/32)
    /// Row length.
    pub k: usize,
}

impl Q8Act {
    /// Quantizes `x` (m, k) row-major; `k` must be a multiple of 32. Rows are quantized in
    /// parallel when there are several.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        let nb = k / QK;
        let m = x.len() / k.max(1);
        let mut out = Self {
            qs: vec![0; m * k],
            d: vec![0.0; m * nb],
            s: vec![0.0; m * nb],
            k,
        };
        if m > 1 {
            out.qs
                .par_chunks_mut(k)
                .zip(out.d.par_chunks_mut(nb))
                .zip(out.s.par_chunks_mut(nb))
                .zip(x.par_chunks(k))
                .for_each(|(((q, d), s), x)| quantize_row(x, q, d, s));
        } else {
            quantize_row(x, &mut out.qs, &mut out.d, &mut out.s);
        }
        out
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.qs.len() / self.k.max(1)
    }
}

const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23

/// One row: per block of 32, `d = max|x| / 127`, `q = round(x / d)`.
///
/// A block holding NaN or ±Inf gets `d = s = NaN`, so every dot product with it is NaN, as
/// the f32 product is (NaN·w and Inf·0 are NaN). Without this, `max` would skip a NaN and the
/// cast to i8 would turn it into 0: a silently finite, wrong result (ggml's and candle's Q8
/// quantizers do that).
fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (((x, q), d), s) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(d.iter_mut())
        .zip(s.iter_mut())
    {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        // 0 for finite values, NaN otherwise (0·Inf is NaN).
        let poison = x.iter().fold(0f32, |a, v| a + v * 0.0);
        let scale = amax / 127.0 + poison;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in q.iter_mut().zip(x) {
            // Round half to even by adding and removing 1.5·2²³ (exact for |v·inv| ≤ 127; unlike
            // `round_ties_even`, this vectorizes instead of calling `rintf` per value).
            let r = ((v * inv + ROUND) - ROUND) as i32;
            *q = r as i8;
            sum += r;
        }
        *d = scale;
        *s = scale * sum as f32;
    }
}
