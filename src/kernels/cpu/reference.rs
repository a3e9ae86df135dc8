//! The plain Rust twin of the SIMD dot products: the same decomposition (an exact integer dot
//! per 32-value block, then the block's float scales), one value at a time. The SIMD kernels
//! must equal it up to float summation order; it is also the fallback on CPUs without them.

use super::act::{Q8Act, QK};
use super::blocks::{f16_at, nibble, q6k_value, scale_min_k4, u32_at, CpuQuant};

/// Σ over one 32-value block of `w(j)·xq[j]` with integer weights `w`.
fn idot(xq: &[i8], w: impl Fn(usize) -> i32) -> i32 {
    xq.iter().enumerate().map(|(j, &x)| w(j) * x as i32).sum()
}

/// Weight row `w` (GGML blocks, not F16) · activation row `r` of `act`.
pub fn dot_q8(q: CpuQuant, w: &[u8], act: &Q8Act, r: usize) -> f32 {
    let k = act.k;
    let nb = k / QK;
    let xq = &act.qs[r * k..(r + 1) * k];
    let (xd, xs) = (&act.d[r * nb..(r + 1) * nb], &act.s[r * nb..(r + 1) * nb]);
    let bq = |b: usize| &xq[b * QK..(b + 1) * QK];
    let mut acc = 0f32;
    match q {
        CpuQuant::Q4K | CpuQuant::Q6K => {
            for (sb, blk) in w.chunks_exact(q.block_bytes()).enumerate() {
                for j in 0..8 {
                    let b = 8 * sb + j;
                    acc += match q {
                        CpuQuant::Q4K => q4k_block(blk, j, bq(b), xd[b], xs[b]),
                        _ => q6k_block(blk, j, bq(b), xd[b]),
                    };
                }
            }
        }
        _ => {
            for (b, blk) in w.chunks_exact(q.block_bytes()).enumerate() {
                let (x, d, s) = (bq(b), xd[b], xs[b]);
                acc += match q {
                    CpuQuant::Q4_0 => {
                        let dw = f16_at(blk, 0);
                        dw * (d * idot(x, |j| nibble(&blk[2..], j) as i32) as f32 - 8.0 * s)
                    }
                    CpuQuant::Q4_1 => {
                        let (dw, m) = (f16_at(blk, 0), f16_at(blk, 2));
                        dw * d * idot(x, |j| nibble(&blk[4..], j) as i32) as f32 + m * s
                    }
                    CpuQuant::Q5_0 => {
                        let (dw, qh) = (f16_at(blk, 0), u32_at(blk, 2));
                        let q5 = |j: usize| (nibble(&blk[6..], j) as u32 | (((qh >> j) & 1) << 4)) as i32;
                        dw * (d * idot(x, q5) as f32 - 16.0 * s)
                    }
                    CpuQuant::Q5_1 => {
                        let (dw, m, qh) = (f16_at(blk, 0), f16_at(blk, 2), u32_at(blk, 4));
                        let q5 = |j: usize| (nibble(&blk[8..], j) as u32 | (((qh >> j) & 1) << 4)) as i32;
                        dw * d * idot(x, q5) as f32 + m * s
                    }
                    _ => f16_at(blk, 0) * d * idot(x, |j| blk[2 + j] as i8 as i32) as f32,
                };
            }
        }
    }
    acc
}

/// Sub-block `j` (0..8) of a Q4_K block against its 32 activations.
fn q4k_block(blk: &[u8], j: usize, x: &[i8], xd: f32, xs: f32) -> f32 {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let (sc, mn) = scale_min_k4(j, &blk[4..16]);
    let qs = &blk[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
    let shift = 4 * (j % 2);
    let isum = idot(x, |l| ((qs[l] >> shift) & 15) as i32);
    d * sc as f32 * xd * isum as f32 - dmin * mn as f32 * xs
}

/// Values 32j..32j+32 of a Q6_K block (two 16-value scales) against their activations.
fn q6k_block(blk: &[u8], j: usize, x: &[i8], xd: f32) -> f32 {
    let d = f16_at(blk, 208);
    let mut isum = 0i32;
    for (l, &xv) in x.iter().enumerate() {
        let (q, s) = q6k_value(blk, 32 * j + l);
        isum += (blk[192 + s] as i8) as i32 * (q as i32 - 32) * xv as i32;
    }
    d * xd * isum as f32
}

/// F16 weight row (2 bytes per value) · f32 activations.
pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    x.iter().enumerate().map(|(j, &v)| f16_at(w, 2 * j) * v).sum()
}
