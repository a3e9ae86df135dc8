//! Tiled prefill attention (flash-style, FlashAttention-2's loop order: arXiv 2307.08691,
//! Algorithm 1): a task takes `Q_TILE` query positions of one KV group (all `n_rep` heads of the
//! group, so K/V tiles are shared), walks the key tiles it can see, and keeps a running max and
//! sum per row (online softmax), so no (t × kv_len) score matrix exists.
//!
//! Per key tile: S (rows, K_TILE) = Q·Kᵀ from K transposed once per call into (d, K_TILE) tiles;
//! scale and mask; P = exp(S − running max); O = O·α + P·V with V read in place from the cache.
//! A tile is classified once per call from the mask: `Hidden` (every entry −inf: skipped, V
//! included), `Clean` (every entry 0: no mask read) or `Mixed` (the mask is added; hidden keys
//! get weight 0, and if the tile's V holds a non-finite value, hidden keys are left out of P·V
//! one by one, so a masked NaN never leaks — the semantics of the row kernel).

use rayon::prelude::*;

use super::{Args, Dims};

/// Query positions per task.
const Q_TILE: usize = 16;
/// Keys per tile.
const K_TILE: usize = 64;
/// Rows of the register-blocked micro-kernels.
const ROW_BLOCK: usize = 4;
/// Columns (keys in Q·Kᵀ, head-dim lanes in P·V) of the micro-kernels.
const COL_BLOCK: usize = 32;

const _: () = assert!(K_TILE.is_multiple_of(COL_BLOCK));

/// What the mask does to a (query tile, key tile) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tile {
    Hidden,
    Clean,
    Mixed,
}

/// Per-call data shared by all tasks.
struct Shared {
    n_kt: usize,
    n_rep: usize,
    /// (b·n_kv, n_kt, d, K_TILE): K transposed per tile, zero past kv_len.
    kt: Vec<f32>,
    /// (b·n_kv, n_kt): whether every V value of the tile is finite.
    v_finite: Vec<bool>,
    /// (n_qt, n_kt).
    tiles: Vec<Tile>,
}

/// One task: positions `p0..p1` of KV group `g` in batch `bi`.
struct Task {
    bi: usize,
    g: usize,
    qt: usize,
    p0: usize,
    p1: usize,
}

/// Adds `a·b` to `c`: fused where the CPU has FMA (the caller's target features), plain
/// otherwise (`mul_add` without FMA is a slow libm call).
trait Madd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

#[cfg(target_arch = "x86_64")]
struct Fused;
struct Plain;

#[cfg(target_arch = "x86_64")]
impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Madd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// → (b, t, h, d).
pub(super) fn run(a: &Args) -> Vec<f32> {
    let Dims { b, h, n_kv, t, kv_len, d } = a.dims;
    let n_kt = kv_len.div_ceil(K_TILE);
    let n_qt = t.div_ceil(Q_TILE);
    let (kt, v_finite) = transpose_keys(a, n_kt);
    let tiles: Vec<Tile> = (0..n_qt)
        .into_par_iter()
        .flat_map_iter(|qt| (0..n_kt).map(move |j| classify(a, qt, j)))
        .collect();
    let shared = Shared { n_kt, n_rep: h / n_kv, kt, v_finite, tiles };
    // Largest tasks first (later positions see more keys), so the pool ends evenly.
    let tasks: Vec<Task> = (0..n_qt)
        .rev()
        .flat_map(|qt| {
            (0..b * n_kv).map(move |bg| Task { bi: bg / n_kv, g: bg % n_kv, qt, p0: qt * Q_TILE, p1: ((qt + 1) * Q_TILE).min(t) })
        })
        .collect();
    let parts: Vec<Vec<f32>> = tasks.par_iter().map(|task| run_task(a, &shared, task)).collect();
    let mut out = vec![0f32; b * t * h * d];
    let group = shared.n_rep * d; // a position's heads of one group are adjacent in (b, t, h, d)
    for (task, part) in tasks.iter().zip(&parts) {
        for (p, rows) in (task.p0..task.p1).zip(part.chunks_exact(group)) {
            let o = ((task.bi * t + p) * h + task.g * shared.n_rep) * d;
            out[o..o + group].copy_from_slice(rows);
        }
    }
    out
}

/// K of every (batch, group) as (n_kt, d, K_TILE) tiles, and whether each tile's V is finite.
fn transpose_keys(a: &Args, n_kt: usize) -> (Vec<f32>, Vec<bool>) {
    let Dims { b, n_kv, kv_len, d, .. } = a.dims;
    let mut kt = vec![0f32; b * n_kv * n_kt * d * K_TILE];
    let v_finite: Vec<bool> = kt
        .par_chunks_mut(d * K_TILE)
        .enumerate()
        .map(|(idx, dst)| {
            let (bg, j) = (idx / n_kt, idx % n_kt);
            let (c0, n) = (j * K_TILE, K_TILE.min(kv_len - j * K_TILE));
            let keys = &a.kv.rows(a.k, bg / n_kv, bg % n_kv, &a.dims)[c0 * d..(c0 + n) * d];
            for (c, kr) in keys.chunks_exact(d).enumerate() {
                for (x, &v) in kr.iter().enumerate() {
                    dst[x * K_TILE + c] = v;
                }
            }
            let vals = &a.vv.rows(a.v, bg / n_kv, bg % n_kv, &a.dims)[c0 * d..(c0 + n) * d];
            vals.iter().all(|v| v.is_finite())
        })
        .collect();
    (kt, v_finite)
}

/// The class of query tile `qt` × key tile `j`.
fn classify(a: &Args, qt: usize, j: usize) -> Tile {
    let Dims { t, kv_len, .. } = a.dims;
    let Some(mask) = a.mask else { return Tile::Clean };
    let keys = j * K_TILE..((j + 1) * K_TILE).min(kv_len);
    let (mut hidden, mut clean) = (true, true);
    for i in qt * Q_TILE..((qt + 1) * Q_TILE).min(t) {
        let row = &mask[i * kv_len + keys.start..i * kv_len + keys.end];
        hidden &= row.iter().all(|&m| m == f32::NEG_INFINITY);
        clean &= row.iter().all(|&m| m == 0.0);
        if !hidden && !clean {
            return Tile::Mixed;
        }
    }
    if hidden {
        Tile::Hidden
    } else if clean {
        Tile::Clean
    } else {
        Tile::Mixed
    }
}

fn run_task(a: &Args, s: &Shared, task: &Task) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX-512F and FMA (checked above); the code only indexes slices.
            return unsafe { run_task_avx512(a, s, task) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above, for AVX2 and FMA.
            return unsafe { run_task_avx2(a, s, task) };
        }
    }
    task_rows::<Plain>(a, s, task)
}

/// The same loops compiled for AVX-512 (one 16-lane register per half column block).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_task_avx512(a: &Args, s: &Shared, task: &Task) -> Vec<f32> {
    task_rows::<Fused>(a, s, task)
}

/// The same loops compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_task_avx2(a: &Args, s: &Shared, task: &Task) -> Vec<f32> {
    task_rows::<Fused>(a, s, task)
}

/// Running softmax state of one row.
#[derive(Debug, Clone, Copy)]
struct RowState {
    max: f32,
    sum: f32,
    seen: bool,
}

/// The task's output rows (position-major: row `p·n_rep + j` is position `p0 + p`, head
/// `g·n_rep + j`), (rows, d).
#[inline(always)]
fn task_rows<F: Madd>(a: &Args, sh: &Shared, task: &Task) -> Vec<f32> {
    let Dims { h, t, kv_len, d, .. } = a.dims;
    let n_rep = sh.n_rep;
    let rows = (task.p1 - task.p0) * n_rep;
    let padded = rows.next_multiple_of(ROW_BLOCK);
    let mut q = vec![0f32; padded * d]; // (padded, d); padding rows stay 0 and are dropped
    for (r, dst) in q.chunks_exact_mut(d).take(rows).enumerate() {
        let (p, hi) = (task.p0 + r / n_rep, task.g * n_rep + r % n_rep);
        dst.copy_from_slice(&a.q[((task.bi * h + hi) * t + p) * d..][..d]);
    }
    let mut o = vec![0f32; padded * d];
    let mut sc = vec![0f32; padded * K_TILE]; // scores, then weights, of one key tile
    let mut state = vec![RowState { max: f32::NEG_INFINITY, sum: 0.0, seen: false }; rows];
    let vals = a.vv.rows(a.v, task.bi, task.g, &a.dims);
    let bg = task.bi * a.dims.n_kv + task.g;
    let tile_len = d * K_TILE;
    for j in 0..sh.n_kt {
        let class = sh.tiles[task.qt * sh.n_kt + j];
        if class == Tile::Hidden {
            continue;
        }
        let (c0, n) = (j * K_TILE, K_TILE.min(kv_len - j * K_TILE));
        let kt = &sh.kt[(bg * sh.n_kt + j) * tile_len..][..tile_len];
        scores::<F>(&q, kt, &mut sc, d);
        for (r, (srow, st)) in sc.chunks_exact_mut(K_TILE).zip(state.iter_mut()).enumerate() {
            let p = task.p0 + r / n_rep;
            let mask = (class == Tile::Mixed).then(|| a.mask.map(|m| &m[p * kv_len + c0..][..n])).flatten();
            let alpha = softmax_tile::<F>(srow, mask, n, a.scale, st);
            if alpha != 1.0 {
                o[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
            }
        }
        let v = &vals[c0 * d..(c0 + n) * d];
        if class == Tile::Mixed && !sh.v_finite[bg * sh.n_kt + j] {
            weighted_values_masked(a, task, &sc, v, &mut o, (c0, rows));
        } else {
            weighted_values::<F>(&sc, v, &mut o, n, d);
        }
    }
    o.truncate(rows * d);
    for (orow, st) in o.chunks_exact_mut(d).zip(&state) {
        // No visible key: zeros, like the row kernel and the Metal kernels.
        let inv = if st.seen { 1.0 / st.sum } else { 0.0 };
        orow.iter_mut().for_each(|x| *x = if st.seen { *x * inv } else { 0.0 });
    }
    o
}

/// s (padded, K_TILE) = q (padded, d) · kt (d, K_TILE), register-blocked ROW_BLOCK × COL_BLOCK.
#[inline(always)]
fn scores<F: Madd>(q: &[f32], kt: &[f32], s: &mut [f32], d: usize) {
    for (qb, sb) in q.chunks_exact(ROW_BLOCK * d).zip(s.chunks_exact_mut(ROW_BLOCK * K_TILE)) {
        for cb in (0..K_TILE).step_by(COL_BLOCK) {
            let mut acc = [[0f32; COL_BLOCK]; ROW_BLOCK];
            for (x, krow) in kt.chunks_exact(K_TILE).enumerate() {
                let krow = &krow[cb..cb + COL_BLOCK];
                for (rr, acc) in acc.iter_mut().enumerate() {
                    let qv = qb[rr * d + x];
                    for (a, &k) in acc.iter_mut().zip(krow) {
                        *a = F::madd(qv, k, *a);
                    }
                }
            }
            for (rr, acc) in acc.iter().enumerate() {
                sb[rr * K_TILE + cb..][..COL_BLOCK].copy_from_slice(acc);
            }
        }
    }
}

/// One row of a tile: scale and mask the scores, update the running max and sum, turn the
/// scores into weights exp(s − max). Returns α, the factor for the row's output so far.
#[inline(always)]
fn softmax_tile<F: Madd>(s: &mut [f32], mask: Option<&[f32]>, n: usize, scale: f32, st: &mut RowState) -> f32 {
    let (vis, pad) = s.split_at_mut(n);
    match mask {
        None => {
            vis.iter_mut().for_each(|x| *x *= scale);
            st.seen |= n > 0;
        }
        Some(m) => {
            for (x, &mv) in vis.iter_mut().zip(m) {
                *x = if mv == f32::NEG_INFINITY { f32::NEG_INFINITY } else { *x * scale + mv };
            }
            st.seen |= m.iter().any(|&mv| mv != f32::NEG_INFINITY);
        }
    }
    pad.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    // `max` ignores NaN; a NaN score still makes its weight, the sum and the row NaN, as the
    // reference's softmax does.
    let mut lane_max = [f32::NEG_INFINITY; 16];
    for chunk in s.chunks_exact(16) {
        for (m, &x) in lane_max.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    let tile_max = lane_max.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let max = st.max.max(tile_max);
    let alpha = if max == st.max { 1.0 } else { exp::<F>(st.max - max) };
    // Every score so far is −inf (or hidden): weights exp(−inf) = 0, not exp(−inf + inf).
    let base = if max == f32::NEG_INFINITY { 0.0 } else { max };
    let mut lanes = [0f32; 16];
    for chunk in s.chunks_exact_mut(16) {
        for (x, l) in chunk.iter_mut().zip(lanes.iter_mut()) {
            *x = exp::<F>(*x - base);
            *l += *x;
        }
    }
    st.sum = st.sum * alpha + lanes.iter().sum::<f32>();
    st.max = max;
    alpha
}

/// o (padded, d) += p (padded, K_TILE)[:, ..n] · v (n, d).
#[inline(always)]
fn weighted_values<F: Madd>(p: &[f32], v: &[f32], o: &mut [f32], n: usize, d: usize) {
    for (pb, ob) in p.chunks_exact(ROW_BLOCK * K_TILE).zip(o.chunks_exact_mut(ROW_BLOCK * d)) {
        let mut x0 = 0;
        while x0 + COL_BLOCK <= d {
            let mut acc = [[0f32; COL_BLOCK]; ROW_BLOCK];
            for (rr, acc) in acc.iter_mut().enumerate() {
                acc.copy_from_slice(&ob[rr * d + x0..][..COL_BLOCK]);
            }
            for (c, vrow) in v.chunks_exact(d).take(n).enumerate() {
                let vs = &vrow[x0..x0 + COL_BLOCK];
                for (rr, acc) in acc.iter_mut().enumerate() {
                    let w = pb[rr * K_TILE + c];
                    for (a, &x) in acc.iter_mut().zip(vs) {
                        *a = F::madd(w, x, *a);
                    }
                }
            }
            for (rr, acc) in acc.iter().enumerate() {
                ob[rr * d + x0..][..COL_BLOCK].copy_from_slice(acc);
            }
            x0 += COL_BLOCK;
        }
        if x0 < d {
            for (c, vrow) in v.chunks_exact(d).take(n).enumerate() {
                for rr in 0..ROW_BLOCK {
                    let w = pb[rr * K_TILE + c];
                    for (a, &x) in ob[rr * d + x0..(rr + 1) * d].iter_mut().zip(&vrow[x0..]) {
                        *a = F::madd(w, x, *a);
                    }
                }
            }
        }
    }
}

/// P·V for a mixed tile whose V holds a non-finite value: hidden keys are left out (0·NaN would
/// be NaN), visible ones count whatever their weight.
fn weighted_values_masked(a: &Args, task: &Task, p: &[f32], v: &[f32], o: &mut [f32], (c0, rows): (usize, usize)) {
    let Dims { kv_len, d, .. } = a.dims;
    let n_rep = a.dims.h / a.dims.n_kv;
    for r in 0..rows {
        let pos = task.p0 + r / n_rep;
        let mask = a.mask.map(|m| &m[pos * kv_len + c0..]);
        for (c, vrow) in v.chunks_exact(d).enumerate() {
            if mask.is_some_and(|m| m[c] == f32::NEG_INFINITY) {
                continue;
            }
            let w = p[r * K_TILE + c];
            for (x, &y) in o[r * d..(r + 1) * d].iter_mut().zip(vrow) {
                *x += w * y;
            }
        }
    }
}

/// eˣ for x ≤ 0 (and NaN) to about 2 ulp, in lane-wise operations the compiler vectorizes:
/// x = n·ln2 + r with |r| ≤ ln2/2 (Cody–Waite split of ln2), a degree-6 Taylor polynomial for
/// eʳ, and 2ⁿ built in the exponent bits. Below `EXP_MIN` (where f32 eˣ is subnormal or 0) it
/// returns exactly 0, so e⁻ⁱⁿᶠ = 0 and a NaN stays NaN.
#[inline(always)]
fn exp<F: Madd>(x: f32) -> f32 {
    const EXP_MIN: f32 = -87.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
    let xc = if x < EXP_MIN { EXP_MIN } else { x };
    let shifted = F::madd(xc, LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = F::madd(n, -LN2_LO, F::madd(n, -LN2_HI, xc));
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = F::madd(p, r, c);
    }
    let e = (shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32).wrapping_add(127);
    let scale = f32::from_bits((e << 23) as u32);
    if x < EXP_MIN {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_std_and_exact_at_the_edges() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (ours, std) = (exp::<Plain>(x), x.exp());
            worst = worst.max((ours - std).abs() / std);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp::<Plain>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<Plain>(-1e30), 0.0);
        assert_eq!(exp::<Plain>(0.0), 1.0);
        assert!(exp::<Plain>(f32::NAN).is_nan());
    }
}
