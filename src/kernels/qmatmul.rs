//! Quantized matmul with a fused multi-adapter LoRA epilogue.
//!
//! `y (m, n) = x (m, k) · Wᵀ + Σ_rows s[id]·B[id]·(A[id]·x)`: W is GGML-quantized (Q4_0, Q8_0,
//! Q4_K, Q6_K), x is F32/F16/BF16 (no cast to F32 first, unlike candle's Metal qmatmul), and each
//! row of x may use a different resident adapter or none (`ids[row] == NO_ADAPTER`).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};

use super::abi::{self, Launch, QMatmulArgs};
use super::names::{kernel_name, ElemType, Family, Variant};
use super::quant::{dequantize_row, QuantType, SUPPORTED_QUANTS};
use crate::error::{Error, Result};

const OP: &str = "qmatmul";

/// Adapter id meaning "no adapter for this row" (any id ≥ the number of adapters works too).
pub const NO_ADAPTER: u32 = u32::MAX;

/// A quantized weight `(n, k)` as the kernels read it: the raw GGML blocks as a u8 tensor on the
/// compute device, plus (optionally) candle's `QTensor` for the built-in path.
#[derive(Debug, Clone)]
pub struct QWeight {
    bytes: Tensor, // (n · row_bytes,) u8
    quant: QuantType,
    n: usize,
    k: usize,
    qtensor: Option<Arc<QTensor>>,
}

impl QWeight {
    /// Copies the blocks of a 2-D `QTensor` (n, k) once onto its device. Errors: a quant type
    /// the kernels do not take, a shape that is not 2-D or not whole blocks.
    pub fn from_qtensor(q: Arc<QTensor>) -> Result<Self> {
        let quant = QuantType::from_ggml(q.dtype()).ok_or_else(|| {
            unsupported(format!(
                "weight type {:?} (supported: {SUPPORTED_QUANTS})",
                q.dtype()
            ))
        })?;
        let (n, k) = q.shape().dims2()?;
        let data = q.data()?;
        let bytes = Tensor::from_slice(&data, data.len(), &q.device())?;
        let mut w = Self::from_bytes(bytes, quant, n, k)?;
        w.qtensor = Some(q);
        Ok(w)
    }

    /// Wraps raw blocks: `bytes` is a u8 tensor of `n · k / block_values · block_bytes` elements.
    pub fn from_bytes(bytes: Tensor, quant: QuantType, n: usize, k: usize) -> Result<Self> {
        if !k.is_multiple_of(quant.block_values()) || n == 0 {
            return Err(unsupported(format!(
                "shape ({n}, {k}) is not whole {quant:?} blocks"
            )));
        }
        let want = n * k / quant.block_values() * quant.block_bytes();
        if bytes.dtype() != DType::U8 || bytes.elem_count() != want {
            return Err(unsupported(format!(
                "expected {want} u8 bytes, got {} {:?}",
                bytes.elem_count(),
                bytes.dtype()
            )));
        }
        Ok(Self {
            bytes: bytes.flatten_all()?,
            quant,
            n,
            k,
            qtensor: None,
        })
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The quantization.
    pub fn quant(&self) -> QuantType {
        self.quant
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.k / self.quant.block_values() * self.quant.block_bytes()
    }

    /// The raw blocks (u8, on the compute device).
    pub fn bytes(&self) -> &Tensor {
        &self.bytes
    }
}

/// The resident adapters of one layer's projection and each row's choice.
#[derive(Debug, Clone)]
pub struct LoraBatch {
    /// (n_adapters, r, k), the activations' dtype.
    pub a: Tensor,
    /// (n_adapters, n, r), the activations' dtype.
    pub b: Tensor,
    /// (n_adapters,) f32: alpha / r (or alpha / √r) per adapter.
    pub scales: Tensor,
    /// (rows,) u32: adapter per row of x, `NO_ADAPTER` for none.
    pub ids: Tensor,
}

impl LoraBatch {
    fn rank_and_count(&self) -> Result<(usize, usize)> {
        let (na, r, _) = self.a.dims3()?;
        Ok((r, na))
    }
}

/// Which implementation [`qmatmul`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QMatmulBackend {
    /// Our Metal kernels (feature `metal`, Metal device).
    Custom,
    /// candle's quantized matmul (f32 activations inside) plus plain-op LoRA.
    Candle,
    /// The plain Rust twin.
    Reference,
}

/// The backend for a device and weight: custom kernels on Metal, candle where it has a
/// `QTensor`, the reference otherwise.
pub fn qmatmul_backend(device: &Device, w: &QWeight) -> QMatmulBackend {
    if cfg!(feature = "metal") && device.is_metal() {
        QMatmulBackend::Custom
    } else if w.qtensor.is_some() {
        QMatmulBackend::Candle
    } else {
        QMatmulBackend::Reference
    }
}

/// `x (..., k)` F32/F16/BF16 → `(..., n)` in x's dtype, plus the LoRA epilogue when given
/// (`lora.ids` has one entry per row of x). Errors: `UnsupportedKernel` for a dtype, shape or
/// adapter stack the op does not take.
pub fn qmatmul(x: &Tensor, w: &QWeight, lora: Option<&LoraBatch>) -> Result<Tensor> {
    let (x2, out_dims) = rows_of(x, w)?;
    validate_lora(lora, x2.dim(0)?, w, x.dtype())?;
    let y = match qmatmul_backend(x.device(), w) {
        QMatmulBackend::Custom => x2.apply_op1_no_bwd(&QMatMulOp {
            weight: w.clone(),
            lora: lora.cloned(),
        })?,
        QMatmulBackend::Candle => candle_path(&x2, w, lora)?,
        QMatmulBackend::Reference => return qmatmul_reference(x, w, lora),
    };
    Ok(y.reshape(out_dims)?)
}

/// The reference twin of [`qmatmul`]: dequantize and accumulate in f32 on the CPU, result on x's
/// device in x's dtype.
pub fn qmatmul_reference(x: &Tensor, w: &QWeight, lora: Option<&LoraBatch>) -> Result<Tensor> {
    let (x2, out_dims) = rows_of(x, w)?;
    validate_lora(lora, x2.dim(0)?, w, x.dtype())?;
    let cpu = Device::Cpu;
    let op = QMatMulOp {
        weight: QWeight {
            bytes: w.bytes.to_device(&cpu)?,
            qtensor: None,
            ..w.clone()
        },
        lora: match lora {
            Some(l) => Some(LoraBatch {
                a: l.a.to_device(&cpu)?,
                b: l.b.to_device(&cpu)?,
                scales: l.scales.to_device(&cpu)?,
                ids: l.ids.to_device(&cpu)?,
            }),
            None => None,
        },
    };
    let y = x2.to_device(&cpu)?.apply_op1_no_bwd(&op)?;
    Ok(y.to_device(x.device())?.reshape(out_dims)?)
}

fn unsupported(reason: String) -> Error {
    Error::UnsupportedKernel { op: OP, reason }
}

/// x (..., k) → contiguous (m, k) and the output dims (..., n).
fn rows_of(x: &Tensor, w: &QWeight) -> Result<(Tensor, Vec<usize>)> {
    if ElemType::from_float_dtype(x.dtype()).is_none() {
        return Err(unsupported(format!(
            "activation dtype {:?} (supported: F32, F16, BF16)",
            x.dtype()
        )));
    }
    let dims = x.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        return Err(unsupported("activation is a scalar".into()));
    };
    if k != w.k {
        return Err(unsupported(format!(
            "activation has {k} features, weight takes {}",
            w.k
        )));
    }
    let m: usize = lead.iter().product();
    let mut out = lead.to_vec();
    out.push(w.n);
    Ok((x.reshape((m, k))?.contiguous()?, out))
}

fn validate_lora(lora: Option<&LoraBatch>, m: usize, w: &QWeight, dtype: DType) -> Result<()> {
    let Some(l) = lora else { return Ok(()) };
    let (na, r, k) = l.a.dims3()?;
    let shapes_ok = k == w.k
        && l.b.dims() == [na, w.n, r]
        && l.scales.dims() == [na]
        && l.ids.dims() == [m]
        && r > 0
        && na > 0;
    if !shapes_ok {
        return Err(unsupported(format!(
            "LoRA shapes A {:?}, B {:?}, scales {:?}, ids {:?} do not fit x ({m}, {}) and W ({}, {})",
            l.a.dims(), l.b.dims(), l.scales.dims(), l.ids.dims(), w.k, w.n, w.k
        )));
    }
    if l.a.dtype() != dtype
        || l.b.dtype() != dtype
        || l.scales.dtype() != DType::F32
        || l.ids.dtype() != DType::U32
    {
        return Err(unsupported(format!(
            "LoRA dtypes A {:?}, B {:?}, scales {:?}, ids {:?} (want {dtype:?}, {dtype:?}, F32, U32)",
            l.a.dtype(), l.b.dtype(), l.scales.dtype(), l.ids.dtype()
        )));
    }
    Ok(())
}

/// candle's quantized matmul for W·x, then each used adapter's rows through plain ops.
fn candle_path(x: &Tensor, w: &QWeight, lora: Option<&LoraBatch>) -> Result<Tensor> {
    let Some(q) = &w.qtensor else {
        return Err(unsupported("no QTensor for candle's path".into()));
    };
    let dtype = x.dtype();
    let mut y = x.to_dtype(DType::F32)?.apply_op1_no_bwd(q.as_ref())?; // (m, n) f32
    if let Some(l) = lora {
        let ids = l.ids.to_vec1::<u32>()?;
        let scales = l.scales.to_vec1::<f32>()?;
        let xf = x.to_dtype(DType::F32)?;
        for (adapter, &s) in scales.iter().enumerate() {
            let rows: Vec<u32> = (0..ids.len() as u32)
                .filter(|&i| ids[i as usize] as usize == adapter)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::new(rows.as_slice(), x.device())?;
            let xa = xf.index_select(&idx, 0)?; // (rows, k)
            let a = l.a.get(adapter)?.to_dtype(DType::F32)?; // (r, k)
            let b = l.b.get(adapter)?.to_dtype(DType::F32)?; // (n, r)
            let delta = (xa.matmul(&a.t()?)?.matmul(&b.t()?)? * s as f64)?; // (rows, n)
            y = y.index_add(&idx, &delta, 0)?;
        }
    }
    Ok(y.to_dtype(dtype)?)
}

/// Mat-vec for up to `QMV_MAX_ROWS` rows, mat-mat above.
pub fn qmatmul_variant(m: usize) -> Variant {
    if m <= abi::QMV_MAX_ROWS {
        Variant::Mv
    } else {
        Variant::Mm
    }
}

/// The dispatches of one qmatmul: the LoRA shrink (when adapters are given) then the matmul.
#[derive(Debug, Clone, PartialEq)]
pub struct QMatmulPlan {
    /// The kernel arguments both dispatches share.
    pub args: QMatmulArgs,
    /// The LoRA shrink (x · Aᵀ per row), when adapters are given.
    pub shrink: Option<Launch>,
    /// The quantized matmul (with the LoRA expand as its epilogue).
    pub main: Launch,
}

/// Plans a qmatmul of x (m, k) by W (n, k) with `variant` (`Mv` or `Mm`) and, with `lora =
/// Some((rank, n_adapters))`, the LoRA epilogue.
pub fn qmatmul_plan(
    (m, n, k): (usize, usize, usize),
    quant: QuantType,
    act: ElemType,
    lora: Option<(usize, usize)>,
    variant: Variant,
) -> Result<QMatmulPlan> {
    let (rank, n_adapters) = lora.unwrap_or((0, 0));
    let args = QMatmulArgs {
        m: abi::to_u32(OP, "m", m)?,
        n: abi::to_u32(OP, "n", n)?,
        k: abi::to_u32(OP, "k", k)?,
        row_bytes: abi::to_u32(
            OP,
            "row bytes",
            k / quant.block_values() * quant.block_bytes(),
        )?,
        lora_rank: abi::to_u32(OP, "rank", rank)?,
        n_adapters: abi::to_u32(OP, "adapters", n_adapters)?,
    };
    let constants = vec![(abi::FC_HAS_LORA, lora.is_some())];
    let main = match variant {
        Variant::Mv => Launch {
            kernel: kernel_name(Family::Qmatmul, Variant::Mv, quant.elem(), act, None),
            grid: [
                n.div_ceil(abi::QMV_SIMDGROUPS * abi::QMV_ROWS_PER_SIMDGROUP),
                m,
                1,
            ],
            threadgroup: [abi::QMV_SIMDGROUPS * abi::SIMD_WIDTH, 1, 1],
            tg_mem_bytes: None,
            constants,
        },
        Variant::Mm => Launch {
            kernel: kernel_name(Family::Qmatmul, Variant::Mm, quant.elem(), act, None),
            grid: [n.div_ceil(abi::QMM_BN), m.div_ceil(abi::QMM_BM), 1],
            threadgroup: [abi::QMM_SIMDGROUPS * abi::SIMD_WIDTH, 1, 1],
            tg_mem_bytes: Some((abi::QMM_BM * abi::QMM_BK + abi::QMM_BK * abi::QMM_BN) * 4),
            constants,
        },
        other => return Err(unsupported(format!("{other:?} is not a matmul variant"))),
    };
    let shrink = lora.map(|_| Launch {
        kernel: kernel_name(Family::Qmatmul, Variant::Shrink, act, act, None),
        grid: [rank.div_ceil(abi::LORA_SHRINK_SIMDGROUPS), m, 1],
        threadgroup: [abi::LORA_SHRINK_SIMDGROUPS * abi::SIMD_WIDTH, 1, 1],
        tg_mem_bytes: None,
        constants: vec![],
    });
    Ok(QMatmulPlan { args, shrink, main })
}

/// The custom op: Metal kernels in `metal_fwd`, the reference twin in `cpu_fwd`.
#[derive(Debug, Clone)]
pub struct QMatMulOp {
    pub(crate) weight: QWeight,
    pub(crate) lora: Option<LoraBatch>,
}

/// Adapters as host f32 arrays for the reference.
pub(crate) struct LoraHost {
    pub a: Vec<f32>,      // (na, r, k)
    pub b: Vec<f32>,      // (na, n, r)
    pub scales: Vec<f32>, // (na,)
    pub ids: Vec<u32>,    // (m,)
    pub rank: usize,
}

impl LoraHost {
    pub(crate) fn from_batch(l: &LoraBatch) -> Result<Self> {
        let (rank, _) = l.rank_and_count()?;
        let f = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        Ok(Self {
            a: f(&l.a)?,
            b: f(&l.b)?,
            scales: f(&l.scales)?,
            ids: l.ids.to_vec1::<u32>()?,
            rank,
        })
    }
}

/// y (m, n) = x (m, k) · Wᵀ (+ LoRA), all in f32: the reference computation.
pub(crate) fn qmatmul_host(
    x: &[f32],
    m: usize,
    w: &[u8],
    quant: QuantType,
    n: usize,
    lora: Option<&LoraHost>,
) -> Vec<f32> {
    let k = x.len() / m.max(1);
    let row_bytes = k / quant.block_values() * quant.block_bytes();
    let mut y = vec![0f32; m * n];
    let mut wrow = vec![0f32; k];
    for col in 0..n {
        dequantize_row(quant, &w[col * row_bytes..(col + 1) * row_bytes], &mut wrow);
        for row in 0..m {
            let xr = &x[row * k..(row + 1) * k];
            y[row * n + col] = wrow.iter().zip(xr).map(|(a, b)| a * b).sum();
        }
    }
    if let Some(l) = lora {
        let na = l.scales.len();
        for row in 0..m {
            let id = l.ids[row] as usize;
            if id >= na {
                continue;
            }
            let xr = &x[row * k..(row + 1) * k];
            let t: Vec<f32> = (0..l.rank)
                .map(|j| {
                    l.a[(id * l.rank + j) * k..(id * l.rank + j + 1) * k]
                        .iter()
                        .zip(xr)
                        .map(|(a, b)| a * b)
                        .sum()
                })
                .collect();
            for col in 0..n {
                let brow = &l.b[(id * n + col) * l.rank..(id * n + col + 1) * l.rank];
                let d: f32 = brow.iter().zip(&t).map(|(a, b)| a * b).sum();
                y[row * n + col] += l.scales[id] * d;
            }
        }
    }
    y
}

/// f32 values of a contiguous CPU float storage.
pub(crate) fn cpu_to_f32(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("metal-candle kernels: input is not contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!(
            "metal-candle kernels: unsupported dtype {:?}",
            other.dtype()
        ),
    })
}

/// f32 values into a CPU storage of `dtype`.
pub(crate) fn f32_to_cpu(v: Vec<f32>, dtype: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        other => candle_core::bail!("metal-candle kernels: unsupported dtype {other:?}"),
    })
}

impl CustomOp1 for QMatMulOp {
    fn name(&self) -> &'static str {
        "metal-candle-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _) = l.shape().dims2()?;
        let x = cpu_to_f32(s, l)?;
        let lora = match &self.lora {
            Some(b) => Some(LoraHost::from_batch(b).map_err(candle_core::Error::wrap)?),
            None => None,
        };
        let (storage, _) = self.weight.bytes.storage_and_layout();
        let Storage::Cpu(CpuStorage::U8(w)) = &*storage else {
            candle_core::bail!("qmatmul: weight bytes are not a CPU u8 tensor")
        };
        let y = qmatmul_host(&x, m, w, self.weight.quant, self.weight.n, lora.as_ref());
        Ok((f32_to_cpu(y, s.dtype())?, Shape::from((m, self.weight.n))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        super::metal::qmatmul_fwd(self, s, l)
    }
}
