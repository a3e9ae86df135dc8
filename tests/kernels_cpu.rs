//! CPU quantized matmul (src/kernels/cpu): the SIMD kernels against their scalar twin, the twin
//! against dequantize-then-multiply in f32 and against candle's quantized matmul, grouped calls
//! against single ones, and the typed errors.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use metal_candle::kernels::cpu::{
    cpu_backend, cpu_matmul, cpu_matmul_with, dequantize_row, CpuBackend, CpuQuant, CpuWeight,
};
#[cfg(target_arch = "x86_64")]
use metal_candle::kernels::cpu::Isa;
use metal_candle::Error;

/// Output features: not a multiple of any task or tile size.
const N: usize = 37;
/// Activation rows: decode, a partial tile, and several tiles plus a remainder.
const MS: [usize; 4] = [1, 3, 4, 9];

fn k_for(q: CpuQuant) -> usize {
    if q.block_values() == 256 {
        512
    } else {
        96
    }
}

fn quantized(q: CpuQuant, n: usize, k: usize, seed: u64) -> (QTensor, CpuWeight) {
    let w = values((n, k), seed);
    let qt = QTensor::quantize(&w, q.ggml()).unwrap();
    let cw = CpuWeight::from_qtensor(&qt).unwrap();
    (qt, cw)
}

/// ‖a − b‖∞ / ‖b‖∞.
fn normalized_error(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let s = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-12)
}

/// x · dequant(W)ᵀ in f32, using the shared reference dequantizer.
fn dense_reference(x: &Tensor, w: &CpuWeight) -> Tensor {
    let (n, k) = w.dims();
    let mut dense = vec![0f32; n * k];
    for (row, out) in dense.chunks_exact_mut(k).enumerate() {
        dequantize_row(w.quant(), &w.row(row), out);
    }
    let wt = Tensor::from_vec(dense, (n, k), &Device::Cpu).unwrap();
    x.matmul(&wt.t().unwrap()).unwrap()
}

/// Deterministic pseudo-random values in [-1, 1) with an occasional ×8 outlier (xorshift).
fn values<S: Into<candle_core::Shape>>(shape: S, seed: u64) -> Tensor {
    let shape = shape.into();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if s.is_multiple_of(29) { 8.0 * u } else { u }
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn input(m: usize, k: usize) -> Tensor {
    values((m, k), (m * 1000 + k) as u64)
}

#[test]
fn reference_dequantizer_matches_candle() {
    for q in CpuQuant::ALL {
        let k = k_for(q);
        let (qt, cw) = quantized(q, N, k, 1);
        let candle = qt.dequantize(&Device::Cpu).unwrap();
        let ours = dense_reference(&Tensor::eye(k, DType::F32, &Device::Cpu).unwrap(), &cw).t().unwrap();
        let err = normalized_error(&ours, &candle);
        assert!(err == 0.0, "{q:?}: dequantized weights differ from candle's by {err}");
    }
}

/// The interleaved 8-row layout gives back every row's GGML bytes exactly (37 rows: 4 groups of
/// 8 and 5 rows kept in GGML order).
#[test]
fn interleaved_layout_round_trips() {
    for q in CpuQuant::ALL {
        let k = k_for(q);
        let (qt, w) = quantized(q, N, k, 11);
        let data = qt.data().unwrap();
        let rb = w.row_bytes();
        for i in 0..N {
            assert_eq!(&*w.row(i), &data[i * rb..(i + 1) * rb], "{q:?} row {i}");
        }
        let expect_packed = if q == CpuQuant::F16 || q == CpuQuant::Q6K { 0 } else { 32 };
        assert_eq!(w.packed_rows(), expect_packed, "{q:?}");
    }
}

#[test]
fn simd_kernels_equal_the_reference_twin() {
    let backend = cpu_backend();
    if !backend.is_simd() {
        eprintln!("skipped: this CPU has no SIMD kernels (backend {backend:?})");
        return;
    }
    // Every ISA this CPU can run: the AVX2 kernels too on an AVX-512 VNNI machine.
    let backends = match backend {
        #[cfg(target_arch = "x86_64")]
        CpuBackend::Simd(Isa::Avx512Vnni) => vec![backend, CpuBackend::Simd(Isa::Avx2)],
        _ => vec![backend],
    };
    for backend in backends {
        for q in CpuQuant::ALL {
            let k = k_for(q);
            let (_, w) = quantized(q, N, k, 2);
            for m in MS {
                let x = input(m, k);
                let simd = cpu_matmul_with(&x, &[&w], backend).unwrap();
                let twin = cpu_matmul_with(&x, &[&w], CpuBackend::Reference).unwrap();
                let err = normalized_error(&simd, &twin);
                // Same integer block dots; only the f32 summation order differs.
                assert!(err < 1e-5, "{backend:?} {q:?} m={m}: SIMD vs twin error {err}");
            }
        }
    }
}

#[test]
fn reference_twin_is_close_to_dequantize_then_multiply() {
    for q in CpuQuant::ALL {
        let k = k_for(q);
        let (_, w) = quantized(q, N, k, 3);
        let x = input(3, k);
        let twin = cpu_matmul_with(&x, &[&w], CpuBackend::Reference).unwrap();
        let err = normalized_error(&twin, &dense_reference(&x, &w));
        // Quantized weights see 8-bit activations (one 1/254 step per block of 32); F16 weights
        // see the f32 activations.
        let tol = if q == CpuQuant::F16 { 1e-5 } else { 2e-2 };
        assert!(err < tol, "{q:?}: twin vs f32 error {err} (tolerance {tol})");
    }
}

#[test]
fn reference_twin_is_close_to_candles_quantized_matmul() {
    for q in CpuQuant::ALL {
        let k = k_for(q);
        // candle's Q4_1/Q5_1 dot products panic on an odd block count: k = 128, not 96.
        let k = k.max(128);
        let (qt, w) = quantized(q, N, k, 4);
        let x = input(5, k);
        let candle = QMatMul::from_qtensor(qt).unwrap().forward(&x).unwrap();
        let twin = cpu_matmul_with(&x, &[&w], CpuBackend::Reference).unwrap();
        let err = normalized_error(&twin, &candle);
        assert!(err < 2e-2, "{q:?}: twin vs candle error {err}");
    }
}

#[test]
fn grouped_weights_equal_separate_calls() {
    let k = 512;
    let (_, a) = quantized(CpuQuant::Q4K, 40, k, 5);
    let (_, b) = quantized(CpuQuant::Q6K, 8, k, 6);
    let (_, c) = quantized(CpuQuant::F16, 24, k, 7);
    for m in [1, 6] {
        let x = values((2, m, k), 10 + m as u64); // (b, t, k)
        let group = cpu_matmul(&x, &[&a, &b, &c]).unwrap();
        assert_eq!(group.dims(), &[2, m, 72]);
        let parts = [cpu_matmul(&x, &[&a]).unwrap(), cpu_matmul(&x, &[&b]).unwrap(), cpu_matmul(&x, &[&c]).unwrap()];
        let separate = Tensor::cat(&parts, 2).unwrap();
        assert_eq!(normalized_error(&group, &separate), 0.0);
    }
}

#[test]
fn half_precision_activations_round_trip() {
    let (_, w) = quantized(CpuQuant::Q8_0, N, 96, 8);
    let x = input(2, 96);
    let y32 = cpu_matmul(&x, &[&w]).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let y = cpu_matmul(&x.to_dtype(dtype).unwrap(), &[&w]).unwrap();
        assert_eq!(y.dtype(), dtype);
        let err = normalized_error(&y.to_dtype(DType::F32).unwrap(), &y32);
        assert!(err < 2e-2, "{dtype:?}: {err}");
    }
}

#[test]
fn bad_shapes_are_typed_errors() {
    let (_, w) = quantized(CpuQuant::Q4_0, N, 96, 9);
    let wrong_k = cpu_matmul(&input(1, 64), &[&w]);
    assert!(matches!(wrong_k, Err(Error::UnsupportedKernel { .. })), "{wrong_k:?}");
    let none = cpu_matmul(&input(1, 96), &[]);
    assert!(matches!(none, Err(Error::UnsupportedKernel { .. })), "{none:?}");
    let short = CpuWeight::new(vec![0; 17], CpuQuant::Q4_0, 1, 32);
    assert!(matches!(short, Err(Error::UnsupportedKernel { .. })), "{short:?}");
    let partial_block = CpuWeight::new(vec![0; 18 * 2], CpuQuant::Q4_0, 1, 48);
    assert!(matches!(partial_block, Err(Error::UnsupportedKernel { .. })), "{partial_block:?}");
    let k_quant_rows = CpuWeight::new(vec![0; 144], CpuQuant::Q4K, 2, 128);
    assert!(matches!(k_quant_rows, Err(Error::UnsupportedKernel { .. })), "{k_quant_rows:?}");
}

/// F16 prefill widens a few MiB of rows per gemm call: a weight larger than one chunk (1100
/// rows of 2048) still equals x · Wᵀ on the dequantized weight.
#[test]
fn f16_prefill_in_chunks_equals_dense() {
    let (n, k) = (1100, 2048);
    let (_, w) = quantized(CpuQuant::F16, n, k, 12);
    let x = input(9, k);
    let ours = cpu_matmul(&x, &[&w]).unwrap();
    let err = normalized_error(&ours, &dense_reference(&x, &w));
    assert!(err < 1e-5, "F16 chunked prefill error {err}");
}
