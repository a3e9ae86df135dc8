//! CPU attention: `softmax(q·kᵀ·scale + mask)·v` with GQA, read straight from the KV cache
//! (the CPU twin of the Metal flash attention; the plain-op twin is
//! `kernels::attend_reference`).
//!
//! Shapes: q (b, h, t, d) contiguous; k/v (b, n_kv, kv_len, d) whose rows of d are contiguous,
//! any batch/head strides (the cache's narrowed views, so nothing is copied); mask (t, kv_len)
//! additive (−inf hides), broadcast over batch and heads. Output (b, t, h, d) f32, the layout the
//! output projection reads, so the caller needs no transpose copy.
//!
//! Why not candle's ops: for decode each layer would run two `gemm` calls on (n_rep, d) ×
//! (d, kv_len) blocks, a softmax and a copy of V into contiguous memory, each allocating; here one
//! pool dispatch computes every head, keys hidden by the mask are skipped (half of a causal
//! prefill), and nothing but the output is allocated.
//!
//! Two kernels ([`CpuAttnKernel`]): `Rows` (one query row at a time, every visible key; decode and
//! short prompts) and `Tiled` (query tiles × key tiles with an online softmax, for long prompts;
//! `attention/tiled.rs`). Both skip masked keys and treat NaN/±Inf alike.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

mod tiled;

const OP: &str = "cpu_attention";

/// Query rows per task in prefill (a task is one head's rows).
const ROWS_PER_TASK: usize = 16;

/// From this many queries [`cpu_attention`] runs the tiled kernel (below it the row kernel was
/// faster or level: SmolLM2 shapes, 2 threads, both kernels timed at 8..2000 causal queries;
/// 0.8× at 128, 1.8× at 512, 2.4× at 2000).
pub const TILED_MIN_QUERIES: usize = 256;

/// The CPU attention kernels (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAttnKernel {
    /// One query row at a time over every visible key.
    Rows,
    /// Query tiles × key tiles, online softmax.
    Tiled,
}

impl CpuAttnKernel {
    /// The kernel [`cpu_attention`] runs for `t` queries.
    pub fn for_queries(t: usize) -> Self {
        if t >= TILED_MIN_QUERIES {
            Self::Tiled
        } else {
            Self::Rows
        }
    }
}

/// Sizes and strides of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    n_kv: usize,
    t: usize,
    kv_len: usize,
    d: usize,
}

/// A K or V view: element offset of (batch 0, head 0, key 0) and the batch/head strides.
#[derive(Debug, Clone, Copy)]
struct KvView {
    start: usize,
    batch: usize,
    head: usize,
}

impl KvView {
    fn of(l: &Layout, d: usize) -> Option<Self> {
        match l.stride() {
            [sb, sh, st, 1] if *st == d => Some(Self { start: l.start_offset(), batch: *sb, head: *sh }),
            _ => None,
        }
    }

    /// Rows key 0.. of (batch `bi`, head `g`): (kv_len, d).
    fn rows<'a>(&self, data: &'a [f32], bi: usize, g: usize, dims: &Dims) -> &'a [f32] {
        let o = self.start + bi * self.batch + g * self.head;
        &data[o..o + dims.kv_len * dims.d]
    }
}

/// Attention over f32 tensors on the CPU (see the module docs for shapes). Returns (b, h, t, d)
/// as a transposed view of the (b, t, h, d) result. Errors: `UnsupportedKernel` for other
/// devices, dtypes or shapes.
pub fn cpu_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f32) -> Result<Tensor> {
    cpu_attention_with(q, k, v, mask, scale, CpuAttnKernel::for_queries(q.dim(2)?))
}

/// [`cpu_attention`] with the kernel chosen by the caller (tests, benches).
pub fn cpu_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
    kernel: CpuAttnKernel,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, n_kv, kv_len, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || n_kv == 0 || h % n_kv != 0 || d == 0 {
        return Err(unsupported(format!("q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims())));
    }
    if [q, k, v].iter().any(|x| x.dtype() != DType::F32 || !x.device().is_cpu()) {
        return Err(unsupported("q, k and v must be f32 on the CPU".into()));
    }
    let mask = match mask {
        Some(m) if m.dims() != [t, kv_len] => {
            return Err(unsupported(format!("mask {:?}, want ({t}, {kv_len})", m.dims())));
        }
        Some(m) => Some(m.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    // The mask is read in place (a (t, kv_len) copy per layer is what a long prompt can't afford).
    let guard = mask.as_ref().map(Tensor::storage_and_layout);
    let mask = match &guard {
        Some((storage, layout)) => match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(m)), Some((a, b))) => Some(&m[a..b]),
            _ => return Err(unsupported("mask must be a contiguous f32 CPU tensor".into())),
        },
        None => None,
    };
    let op = CpuAttention { mask, scale, kernel };
    let y = q.contiguous()?.apply_op3_no_bwd(k, v, &op)?; // (b, t, h, d)
    Ok(y.transpose(1, 2)?)
}

fn unsupported(reason: String) -> Error {
    Error::UnsupportedKernel { op: OP, reason }
}

struct CpuAttention<'m> {
    mask: Option<&'m [f32]>, // (t, kv_len)
    scale: f32,
    kernel: CpuAttnKernel,
}

impl CustomOp3 for CpuAttention<'_> {
    fn name(&self) -> &'static str {
        "metal-candle-cpu-attention"
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
        let (b, h, t, d) = ql.shape().dims4()?;
        let (_, n_kv, kv_len, _) = kl.shape().dims4()?;
        let dims = Dims { b, h, n_kv, t, kv_len, d };
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("cpu attention: q, k, v must be f32")
        };
        let Some((qa, qb)) = ql.contiguous_offsets() else {
            candle_core::bail!("cpu attention: q is not contiguous")
        };
        let (Some(kv), Some(vv)) = (KvView::of(kl, d), KvView::of(vl, d)) else {
            candle_core::bail!("cpu attention: k/v rows are not contiguous")
        };
        let args = Args { dims, q: &q[qa..qb], k, v, kv, vv, mask: self.mask, scale: self.scale };
        let out = match self.kernel {
            CpuAttnKernel::Rows => run(&args),
            CpuAttnKernel::Tiled => tiled::run(&args),
        };
        Ok((CpuStorage::F32(out), Shape::from((b, t, h, d))))
    }
}

struct Args<'a> {
    dims: Dims,
    q: &'a [f32], // (b, h, t, d)
    k: &'a [f32],
    v: &'a [f32],
    kv: KvView,
    vv: KvView,
    mask: Option<&'a [f32]>, // (t, kv_len)
    scale: f32,
}

/// One task: query rows `r0..r1` of head `hi` in batch `bi`.
struct Task {
    bi: usize,
    hi: usize,
    r0: usize,
    r1: usize,
}

/// → (b, t, h, d).
fn run(a: &Args) -> Vec<f32> {
    let Dims { b, h, t, d, .. } = a.dims;
    let tasks: Vec<Task> = (0..b * h)
        .flat_map(|bh| {
            (0..t).step_by(ROWS_PER_TASK).map(move |r0| Task {
                bi: bh / h,
                hi: bh % h,
                r0,
                r1: (r0 + ROWS_PER_TASK).min(t),
            })
        })
        .collect();
    let parts: Vec<Vec<f32>> = tasks.par_iter().map(|task| run_task(a, task)).collect();
    let mut out = vec![0f32; b * t * h * d];
    for (task, part) in tasks.iter().zip(&parts) {
        for (i, row) in (task.r0..task.r1).zip(part.chunks_exact(d)) {
            let o = ((task.bi * t + i) * h + task.hi) * d;
            out[o..o + d].copy_from_slice(row);
        }
    }
    out
}

fn run_task(a: &Args, task: &Task) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above); the function only reads in-bounds slices.
        return unsafe { run_task_avx2(a, task) };
    }
    rows(a, task)
}

/// The same loops compiled for AVX2 (the 8-lane accumulators vectorize to one register).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_task_avx2(a: &Args, task: &Task) -> Vec<f32> {
    rows(a, task)
}

/// (rows, d) outputs of one task: scores for every visible key, softmax, weighted sum of V.
#[inline(always)]
fn rows(a: &Args, task: &Task) -> Vec<f32> {
    let Dims { h, n_kv, t, kv_len, d, .. } = a.dims;
    let g = task.hi / (h / n_kv);
    let keys = a.kv.rows(a.k, task.bi, g, &a.dims);
    let vals = a.vv.rows(a.v, task.bi, g, &a.dims);
    let mut out = vec![0f32; (task.r1 - task.r0) * d];
    let mut scores = vec![0f32; kv_len];
    for (i, o) in (task.r0..task.r1).zip(out.chunks_exact_mut(d)) {
        let qr = &a.q[((task.bi * h + task.hi) * t + i) * d..][..d];
        let mask = a.mask.map(|m| &m[i * kv_len..(i + 1) * kv_len]);
        let hidden = |j: usize| mask.is_some_and(|m| m[j] == f32::NEG_INFINITY);
        let (mut max, mut visible) = (f32::NEG_INFINITY, false);
        for (j, (s, kr)) in scores.iter_mut().zip(keys.chunks_exact(d)).enumerate() {
            if hidden(j) {
                continue;
            }
            *s = dot(qr, kr) * a.scale + mask.map_or(0.0, |m| m[j]);
            max = nan_max(max, *s);
            visible = true;
        }
        if !visible {
            continue; // no visible key: zeros, like the Metal kernel
        }
        let mut sum = 0f32;
        for (j, (s, vr)) in scores.iter().zip(vals.chunks_exact(d)).enumerate() {
            // Skipped because masked, never because of its value: a NaN or −Inf score of a
            // visible key weighs in as the reference's softmax(…)·v does (NaN, or 0·v).
            if hidden(j) {
                continue;
            }
            let w = (s - max).exp();
            sum += w;
            axpy(o, w, vr);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    }
    out
}

/// The larger of `a` and `b`, NaN if either is (IEEE `maximum`; `f32::max` drops a NaN, which
/// would let a NaN score go unnoticed).
#[inline(always)]
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || a >= b {
        a
    } else {
        b
    }
}

/// Σ a·b with 8 independent partial sums (vectorizable without reassociating one sum).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// o += w·v.
#[inline(always)]
fn axpy(o: &mut [f32], w: f32, v: &[f32]) {
    for (x, y) in o.iter_mut().zip(v) {
        *x += w * y;
    }
}
