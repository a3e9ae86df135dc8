//! CPU quantized matmul: the CPU twins of the Metal qmatmul kernels, the default on x86-64 CPUs.
//!
//! `y (m, n) = x (m, k) · Wᵀ` with W in GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K) or
//! F16, x in f32. Quantized weights take activations quantized to 8 bits once per call
//! (`act::Q8Act`); F16 weights are read as F16 (half the bytes of candle's widened F32 copy)
//! against f32 activations. Several weights reading the same input (q/k/v, gate/up) run as one
//! call ([`cpu_matmul`] with several weights): one activation quantization, one pool dispatch.
//!
//! Layout, as for every kernel here: `x86` (x86-64 only) has the SIMD kernels (AVX2, AVX-512 VNNI),
//! [`reference`](mod@reference) their plain twin, [`matmul`] the threaded driver;
//! `tests/kernels_cpu.rs` checks each kernel against the twin and the twin against
//! dequantize-then-multiply. Without AVX2, FMA
//! and F16C (e.g. on aarch64, where candle has NEON kernels) models keep candle's quantized
//! matmul: see [`cpu_kernels_available`] and [`crate::kernels::KernelPolicy`].

pub(crate) mod act;
pub mod attention;
pub mod attention_grad;
pub mod blocks;
pub mod matmul;
pub(crate) mod packed;
pub mod reference;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use candle_core::quantized::QTensor;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

pub use attention::cpu_attention;
pub use blocks::{dequantize_row, CpuQuant};
pub use matmul::CpuBackend;
#[cfg(target_arch = "x86_64")]
pub use x86::Isa;

use super::qmatmul::{cpu_to_f32, f32_to_cpu};
use crate::error::{Error, Result};

const OP: &str = "cpu_qmatmul";

/// Above this many activation rows, [`CpuWeight::prefers_candle`] routes K-quants to candle.
const CANDLE_PREFILL_ROWS: usize = 8;

/// From this many activation rows, F16 weights are widened to f32 for the call and multiplied by
/// candle's `gemm` (cache-blocked, compute-bound): widening costs one pass over the weight, which
/// prefill amortises over the rows, while decode keeps reading F16 (half the bytes).
const F16_GEMM_ROWS: usize = 8;

/// Bytes of f32 rows widened per gemm call on an F16 weight.
const F16_CHUNK_BYTES: usize = 8 << 20;

/// Environment variable the CLI reads for [`crate::kernels::KernelPolicy::cpu`]: `0` keeps
/// candle's quantized matmul and attention on the CPU (for comparisons).
pub const CPU_KERNELS_ENV: &str = "METAL_CANDLE_CPU_KERNELS";

/// The backend our CPU kernels use on this machine (detected once).
pub fn cpu_backend() -> CpuBackend {
    static B: OnceLock<CpuBackend> = OnceLock::new();
    *B.get_or_init(CpuBackend::detect)
}

/// Whether this CPU has the SIMD kernels (x86-64 with AVX2 + FMA + F16C); models use them when
/// their [`crate::kernels::KernelPolicy::cpu`] is on.
pub fn cpu_kernels_available() -> bool {
    cpu_backend().is_simd()
}

/// A weight `(n, k)` in host memory as the CPU kernels read it. The 32-value block types keep
/// their rows in groups of 8 interleaved (module `packed`), any remaining rows (and every row of the
/// other types) in GGML order.
#[derive(Debug, Clone)]
pub struct CpuWeight {
    packed: Vec<u8>,     // (n / 8 groups, k / 32 blocks, packed block)
    packed_rows: usize,  // n / 8 · 8 for packable types, else 0
    data: Vec<u8>,       // rows packed_rows..n in GGML order: ((n − packed_rows) · row_bytes,)
    /// The source tensor, kept (instead of a copy in `data`) for the types not repacked: its
    /// bytes are read in place, and K-quant prefill uses candle's kernels on it.
    qtensor: Option<Arc<QTensor>>,
    quant: CpuQuant,
    n: usize,
    k: usize,
}

impl CpuWeight {
    /// Takes rows of raw GGML blocks (repacking them where the layout applies). Errors: `k` not
    /// whole blocks (K-quants: 256, others: 32; F16: a multiple of 32 too), or `data` not `n`
    /// rows.
    pub fn new(data: Vec<u8>, quant: CpuQuant, n: usize, k: usize) -> Result<Self> {
        check_size(data.len(), quant, n, k)?;
        if !packed::packable(quant) {
            return Ok(Self { packed: Vec::new(), packed_rows: 0, data, qtensor: None, quant, n, k });
        }
        Self::from_bytes(&data, quant, n, k)
    }

    /// Like [`CpuWeight::new`], from borrowed bytes (e.g. a file's memory map): repacked types
    /// are packed straight from them, the others copied. The bytes are not referenced afterwards.
    pub fn from_bytes(data: &[u8], quant: CpuQuant, n: usize, k: usize) -> Result<Self> {
        check_size(data.len(), quant, n, k)?;
        if !packed::packable(quant) {
            return Ok(Self { packed: Vec::new(), packed_rows: 0, data: data.to_vec(), qtensor: None, quant, n, k });
        }
        let (packed, tail) = packed::pack_matrix(quant, data, n, k);
        let packed_rows = n / packed::GROUP_ROWS * packed::GROUP_ROWS;
        Ok(Self { packed, packed_rows, data: tail, qtensor: None, quant, n, k })
    }

    /// Copies a 2-D `QTensor` of a type the kernels take. Errors: another type or shape.
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let quant = CpuQuant::from_ggml(q.dtype())
            .ok_or_else(|| unsupported(format!("weight type {:?}", q.dtype())))?;
        let (n, k) = q.shape().dims2()?;
        Self::from_bytes(&q.data()?, quant, n, k)
    }

    /// Takes a 2-D CPU `QTensor`: repacked types are copied into the interleaved layout, the
    /// others (K-quants, F16) are read in place. Errors: another type or shape.
    pub fn from_arc(q: Arc<QTensor>) -> Result<Self> {
        let quant = CpuQuant::from_ggml(q.dtype())
            .ok_or_else(|| unsupported(format!("weight type {:?}", q.dtype())))?;
        let borrowed = matches!(q.data()?, std::borrow::Cow::Borrowed(_));
        if packed::packable(quant) || !borrowed {
            return Self::from_qtensor(&q);
        }
        let (n, k) = q.shape().dims2()?;
        // The bytes are read from the tensor, in place.
        check_size(q.data()?.len(), quant, n, k)?;
        Ok(Self { packed: Vec::new(), packed_rows: 0, data: Vec::new(), qtensor: Some(q), quant, n, k })
    }

    /// Whether x with `rows` rows should go through candle's kernels instead: K-quant prefill,
    /// where candle 0.11 has AVX-512 VNNI kernels on a repacked copy and ours (row-major, no
    /// interleaved layout for K-quants yet) are slower.
    pub fn prefers_candle(&self, rows: usize) -> Option<&Arc<QTensor>> {
        let k_quant = matches!(self.quant, CpuQuant::Q4K | CpuQuant::Q6K);
        self.qtensor.as_ref().filter(|_| k_quant && rows > CANDLE_PREFILL_ROWS)
    }

    /// Whether [`CpuWeight::from_qtensor`] takes this type and shape.
    pub fn supports(q: &QTensor) -> bool {
        Self::supports_type(q.dtype(), q.shape().dims())
    }

    /// Whether the kernels take a weight of GGML type `t` and shape `dims` (two non-zero dims,
    /// rows of whole blocks).
    pub fn supports_type(t: candle_core::quantized::GgmlDType, dims: &[usize]) -> bool {
        let Some(quant) = CpuQuant::from_ggml(t) else { return false };
        matches!(dims, [n, k] if *n > 0 && *k > 0 && k.is_multiple_of(quant.block_values().max(act::QK)))
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight type.
    pub fn quant(&self) -> CpuQuant {
        self.quant
    }

    /// Bytes of one row in GGML order.
    pub fn row_bytes(&self) -> usize {
        self.k / self.quant.block_values() * self.quant.block_bytes()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.data.len() + self.qtensor.as_ref().map_or(0, |q| q.storage_size_in_bytes())
    }

    /// Rows held in the interleaved layout (the first ones; a multiple of 8).
    pub fn packed_rows(&self) -> usize {
        self.packed_rows
    }

    /// Row `i` (< n) in GGML order (rebuilt from the interleaved layout where it is packed).
    pub fn row(&self, i: usize) -> std::borrow::Cow<'_, [u8]> {
        if i < self.packed_rows {
            std::borrow::Cow::Owned(packed::unpack_row(self.quant, &self.packed, self.k, i))
        } else {
            let rb = self.row_bytes();
            let j = i - self.packed_rows;
            match self.rows_in_place() {
                Some(all) => std::borrow::Cow::Borrowed(&all[j * rb..(j + 1) * rb]),
                None => std::borrow::Cow::Borrowed(&self.data[j * rb..(j + 1) * rb]),
            }
        }
    }

    /// The source tensor's bytes when they are read in place (CPU storage borrows).
    fn rows_in_place(&self) -> Option<&[u8]> {
        match self.qtensor.as_ref().map(|q| q.data()) {
            Some(Ok(std::borrow::Cow::Borrowed(b))) => Some(b),
            _ => None,
        }
    }

    /// Rows `start..end` widened to f32 `(end − start, k)` (F16 only; rows in parallel).
    /// Errors: another type.
    fn widened_f16(&self, start: usize, end: usize) -> Result<Tensor> {
        if self.quant != CpuQuant::F16 {
            return Err(unsupported(format!("widening a {:?} weight", self.quant)));
        }
        let k = self.k;
        let mut out = vec![0f32; (end - start) * k];
        let backend = cpu_backend();
        out.par_chunks_mut(k).enumerate().for_each(|(i, dst)| {
            let row = self.row(start + i);
            match backend {
                // SAFETY: a SIMD backend means the CPU has F16C; a row has 2·k bytes.
                #[cfg(target_arch = "x86_64")]
                CpuBackend::Simd(_) => unsafe { x86::widen_f16(&row, dst) },
                CpuBackend::Reference => dequantize_row(CpuQuant::F16, &row, dst),
            }
        });
        Ok(Tensor::from_vec(out, (end - start, k), &candle_core::Device::Cpu)?)
    }

    /// `x2 (m, k) · Wᵀ` for an F16 weight through candle's gemm, widening at most
    /// [`F16_CHUNK_BYTES`] of rows at a time (a small buffer the allocator reuses, instead of
    /// fresh pages for the whole widened matrix on every call): (m, n).
    fn f16_gemm(&self, x2: &Tensor) -> Result<Tensor> {
        let rows = (F16_CHUNK_BYTES / (4 * self.k)).max(1);
        let parts = (0..self.n)
            .step_by(rows)
            .map(|s| Ok(x2.matmul(&self.widened_f16(s, (s + rows).min(self.n))?.t()?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(&parts, 1)? })
    }

    /// Group `g` of 8 interleaved rows: one packed unit per GGML block (only the SIMD kernels
    /// read the interleaved bytes directly).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        let size = (self.k / self.quant.block_values()) * packed::unit_bytes(self.quant);
        &self.packed[g * size..(g + 1) * size]
    }
}

/// `x (..., k)` on the CPU (F32/F16/BF16) times every weight → `(..., Σ n_i)` in x's dtype, the
/// outputs side by side in order. Errors: no weights, a weight whose k differs from x's, or x
/// not on the CPU.
pub fn cpu_matmul(x: &Tensor, weights: &[&CpuWeight]) -> Result<Tensor> {
    cpu_matmul_with(x, weights, cpu_backend())
}

/// [`cpu_matmul`] with an explicit backend (the tests compare SIMD with the reference).
pub fn cpu_matmul_with(x: &Tensor, weights: &[&CpuWeight], backend: CpuBackend) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        return Err(unsupported("activation is a scalar".into()));
    };
    if weights.is_empty() {
        return Err(unsupported("no weights".into()));
    }
    if let Some(w) = weights.iter().find(|w| w.k != k) {
        return Err(unsupported(format!("activation has {k} features, a weight takes {}", w.k)));
    }
    if !x.device().is_cpu() {
        return Err(unsupported(format!("activation on {:?}, not the CPU", x.device())));
    }
    let m: usize = lead.iter().product();
    let total: usize = weights.iter().map(|w| w.n).sum();
    let mut out = lead.to_vec();
    out.push(total);
    if m >= F16_GEMM_ROWS && weights.iter().any(|w| w.quant == CpuQuant::F16) {
        // F16 weights through gemm, the rest as one group, outputs in the given order: a
        // weight's result does not depend on what it is grouped with.
        let x2 = x.reshape((m, k))?.to_dtype(DType::F32)?;
        let rest: Vec<&CpuWeight> = weights.iter().copied().filter(|w| w.quant != CpuQuant::F16).collect();
        let mut rest_y = if rest.is_empty() { None } else { Some((cpu_matmul_with(&x2, &rest, backend)?, 0)) };
        let mut parts = Vec::with_capacity(weights.len());
        for w in weights {
            if w.quant == CpuQuant::F16 {
                parts.push(w.f16_gemm(&x2)?); // (m, n_i)
            } else if let Some((y, start)) = rest_y.as_mut() {
                parts.push(y.narrow(1, *start, w.n)?);
                *start += w.n;
            }
        }
        let y = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 1)? };
        return Ok(y.to_dtype(x.dtype())?.reshape(out)?);
    }
    let y = x.reshape((m, k))?.contiguous()?.apply_op1_no_bwd(&CpuQMatMulRef {
        weights,
        backend,
    })?;
    Ok(y.reshape(out)?)
}

/// `len` bytes are exactly `n` rows of `k` values of `quant`, and `k` is whole blocks.
fn check_size(len: usize, quant: CpuQuant, n: usize, k: usize) -> Result<()> {
    let bv = quant.block_values().max(act::QK);
    if k == 0 || n == 0 || !k.is_multiple_of(bv) {
        return Err(unsupported(format!("shape ({n}, {k}) is not whole {quant:?} blocks")));
    }
    let want = n * (k / quant.block_values()) * quant.block_bytes();
    if len != want {
        return Err(unsupported(format!("{quant:?} ({n}, {k}) needs {want} bytes, got {len}")));
    }
    Ok(())
}

fn unsupported(reason: String) -> Error {
    Error::UnsupportedKernel { op: OP, reason }
}

/// The candle op (CPU only; borrowed weights, nothing copied per call).
struct CpuQMatMulRef<'a> {
    weights: &'a [&'a CpuWeight],
    backend: CpuBackend,
}

impl CustomOp1 for CpuQMatMulRef<'_> {
    fn name(&self) -> &'static str {
        "metal-candle-cpu-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let total: usize = self.weights.iter().map(|w| w.n).sum();
        let y = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => matmul::matmul(&v[a..b], k, self.weights, self.backend),
            _ => matmul::matmul(&cpu_to_f32(s, l)?, k, self.weights, self.backend),
        };
        let y = if s.dtype() == DType::F32 { CpuStorage::F32(y) } else { f32_to_cpu(y, s.dtype())? };
        Ok((y, Shape::from((m, total))))
    }
}
