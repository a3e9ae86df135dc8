//! The CPU matmul driver: quantize the activations once, split the output rows of one or several
//! weights into tasks on rayon's pool (one dispatch for a whole group such as q/k/v), and run the
//! dot products four activation rows at a time so each weight block is unpacked once per four
//! tokens during prefill.

use rayon::prelude::*;

use super::act::Q8Act;
use super::blocks::CpuQuant;
use super::packed::GROUP_ROWS;
use super::{reference, CpuWeight};

/// Which dot products run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuBackend {
    /// SIMD kernels for this CPU.
    #[cfg(target_arch = "x86_64")]
    Simd(super::x86::Isa),
    /// The scalar twin (tests, and CPUs without the SIMD kernels).
    Reference,
}

impl CpuBackend {
    /// The SIMD kernels where this CPU has them, else the reference.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = super::x86::detect() {
            return Self::Simd(isa);
        }
        Self::Reference
    }

    /// Whether this is a SIMD backend.
    pub fn is_simd(self) -> bool {
        self != Self::Reference
    }
}

/// Activation rows per dot-product call.
const TILE_ROWS: usize = 4;
/// Activation rows per call on interleaved weights (8 rows × 8 activation rows per tile).
const GROUP_TILE_ROWS: usize = 8;

/// One task: rows `start..end` of weight `wi`.
struct Task {
    wi: usize,
    start: usize,
    end: usize,
}

/// `x (m, k)` f32 row-major times each weight `(n_i, k)`ᵀ → `(m, Σ n_i)`, the weights' outputs
/// side by side in the given order. Callers check that every weight has `k` columns.
pub fn matmul(x: &[f32], k: usize, weights: &[&CpuWeight], backend: CpuBackend) -> Vec<f32> {
    let m = x.len() / k.max(1);
    let total: usize = weights.iter().map(|w| w.n).sum();
    let q8 = weights
        .iter()
        .any(|w| w.quant != CpuQuant::F16)
        .then(|| Q8Act::quantize(x, k));
    let tasks = split(weights, m);
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| run_task(t, x, k, m, weights[t.wi], q8.as_ref(), backend))
        .collect();
    // Each block is (m, rows): copy its rows into y (m, total).
    let offsets: Vec<usize> = weights
        .iter()
        .scan(0, |acc, w| {
            let o = *acc;
            *acc += w.n;
            Some(o)
        })
        .collect();
    let mut y = vec![0f32; m * total];
    for (t, block) in tasks.iter().zip(&blocks) {
        let (col0, rows) = (offsets[t.wi] + t.start, t.end - t.start);
        for (r, part) in block.chunks_exact(rows).enumerate() {
            y[r * total + col0..r * total + col0 + rows].copy_from_slice(part);
        }
    }
    y
}

/// About four tasks per thread, at least 8 output rows each, never across two weights; tasks
/// over interleaved rows start and end on groups of 8.
fn split(weights: &[&CpuWeight], m: usize) -> Vec<Task> {
    let total: usize = weights.iter().map(|w| w.n).sum();
    let threads = rayon::current_num_threads().max(1);
    let target = (total / (threads * 4)).max(8);
    // Prefill tasks are heavier per row: smaller tasks balance better.
    let rows_per_task = if m > 1 { target.div_ceil(2).max(8) } else { target };
    let rows_per_task = rows_per_task.div_ceil(GROUP_ROWS) * GROUP_ROWS;
    let mut tasks = Vec::new();
    for (wi, w) in weights.iter().enumerate() {
        let mut start = 0;
        while start < w.n {
            let mut end = (start + rows_per_task).min(w.n);
            if start < w.packed_rows && end > w.packed_rows {
                end = w.packed_rows; // a task is all packed or all row-major
            }
            tasks.push(Task { wi, start, end });
            start = end;
        }
    }
    tasks
}

/// Output rows `t.start..t.end` for all m activation rows: (m, rows).
fn run_task(
    t: &Task,
    x: &[f32],
    k: usize,
    m: usize,
    w: &CpuWeight,
    q8: Option<&Q8Act>,
    backend: CpuBackend,
) -> Vec<f32> {
    let rows = t.end - t.start;
    let mut out = vec![0f32; rows * m];
    if t.start < w.packed_rows {
        if let Some(act) = q8 {
            packed_rows(t, m, w, act, backend, &mut out);
            return out;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if m == 1 && w.quant == CpuQuant::F16 && backend.is_simd() {
        f16_decode(t, x, w, backend, &mut out);
        return out;
    }
    let mut o = [0f32; TILE_ROWS];
    for i in 0..rows {
        let row = w.row(t.start + i);
        for r0 in (0..m).step_by(TILE_ROWS) {
            let o = &mut o[..TILE_ROWS.min(m - r0)];
            match (w.quant, q8) {
                (CpuQuant::F16, _) | (_, None) => {
                    let mut xs: [&[f32]; TILE_ROWS] = [&[]; TILE_ROWS];
                    for (j, xr) in xs.iter_mut().take(o.len()).enumerate() {
                        *xr = &x[(r0 + j) * k..(r0 + j + 1) * k];
                    }
                    dot_f16(&row, &xs[..o.len()], o, backend);
                }
                (q, Some(act)) => dot_q8(q, &row, act, r0, o, backend),
            }
            for (r, v) in o.iter().enumerate() {
                out[(r0 + r) * rows + i] = *v;
            }
        }
    }
    out
}

/// One activation row against F16 rows `t.start..t.end`, four weight rows at a time (SIMD
/// backends only).
#[cfg(target_arch = "x86_64")]
fn f16_decode(t: &Task, x: &[f32], w: &CpuWeight, backend: CpuBackend, out: &mut [f32]) {
    let mut i = 0;
    while i + 4 <= out.len() {
        let rows: [std::borrow::Cow<'_, [u8]>; 4] = std::array::from_fn(|j| w.row(t.start + i + j));
        let mut o = [0f32; 4];
        // SAFETY: only called with a SIMD backend (AVX2 + FMA + F16C); every row has 2·k bytes.
        unsafe { super::x86::dot_f16_x4(std::array::from_fn(|j| &*rows[j]), x, &mut o) };
        out[i..i + 4].copy_from_slice(&o);
        i += 4;
    }
    for (j, o) in out.iter_mut().enumerate().skip(i) {
        dot_f16(&w.row(t.start + j), &[x], std::slice::from_mut(o), backend);
    }
}

/// Interleaved rows `t.start..t.end` (whole groups of 8): (m, rows) into `out`.
fn packed_rows(t: &Task, m: usize, w: &CpuWeight, act: &Q8Act, backend: CpuBackend, out: &mut [f32]) {
    for g in t.start / GROUP_ROWS..t.end / GROUP_ROWS {
        let (col, rows) = (g * GROUP_ROWS - t.start, t.end - t.start);
        for r0 in (0..m).step_by(GROUP_TILE_ROWS) {
            let nr = GROUP_TILE_ROWS.min(m - r0);
            let mut res = [[0f32; GROUP_ROWS]; GROUP_TILE_ROWS];
            match backend {
                // SAFETY: `isa` came from `detect`; `group` is k/32 packed blocks of a packable
                // type (CpuWeight::new built it) and rows r0..r0+nr exist in `act`.
                #[cfg(target_arch = "x86_64")]
                CpuBackend::Simd(isa) => unsafe {
                    super::x86::dot_group(isa, w.quant, w.group(g), act, r0, &mut res[..nr])
                },
                CpuBackend::Reference => {
                    for (i, rowres) in (0..GROUP_ROWS).map(|i| w.row(g * GROUP_ROWS + i)).enumerate() {
                        for (r, v) in res.iter_mut().take(nr).enumerate() {
                            v[i] = reference::dot_q8(w.quant, &rowres, act, r0 + r);
                        }
                    }
                }
            }
            for (r, v) in res.iter().take(nr).enumerate() {
                out[(r0 + r) * rows + col..(r0 + r) * rows + col + GROUP_ROWS].copy_from_slice(v);
            }
        }
    }
}

fn dot_q8(q: CpuQuant, row: &[u8], act: &Q8Act, r0: usize, out: &mut [f32], backend: CpuBackend) {
    match backend {
        // SAFETY: `isa` came from `detect` on this CPU; `row` is one whole weight row of
        // `act.k` values (CpuWeight::new checked the sizes) and rows r0..r0+out.len() exist.
        #[cfg(target_arch = "x86_64")]
        CpuBackend::Simd(isa) => unsafe { super::x86::dot_q8(isa, q, row, act, r0, out) },
        CpuBackend::Reference => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = reference::dot_q8(q, row, act, r0 + i);
            }
        }
    }
}

fn dot_f16(row: &[u8], xs: &[&[f32]], out: &mut [f32], backend: CpuBackend) {
    match backend {
        // SAFETY: as above; every x row has row.len() / 2 values.
        #[cfg(target_arch = "x86_64")]
        CpuBackend::Simd(_) => unsafe { super::x86::dot_f16(row, xs, out) },
        CpuBackend::Reference => {
            for (o, x) in out.iter_mut().zip(xs) {
                *o = reference::dot_f16(row, x);
            }
        }
    }
}
