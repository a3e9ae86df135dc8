//! qmatmul kernels (metal/qmatmul.metal) through the MSL host emulation, compared with the Rust
//! reference twin; the twin compared with candle (dequantize + matmul); the ABI mirrored.

#[path = "msl_harness/mod.rs"]
mod msl_harness;

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use metal_candle::kernels::abi;
use metal_candle::kernels::names::Variant;
use metal_candle::kernels::qmatmul::{qmatmul_plan, QMatmulBackend};
use metal_candle::kernels::{
    qmatmul, qmatmul_reference, ElemType, LoraBatch, QWeight, QuantType, NO_ADAPTER,
};
use msl_harness::{buf_of, f32_of, harness, launch, normalized_error, Buf, Family, Launch};

const QUANTS: [QuantType; 4] = [
    QuantType::Q4_0,
    QuantType::Q8_0,
    QuantType::Q4K,
    QuantType::Q6K,
];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// Rows of x for the mat-vec (decode) and mat-mat (prefill) runs: not multiples of any tile.
const M_DECODE: usize = 3;
const M_PREFILL: usize = 41;
/// Output features: not a multiple of 8 (mat-vec rows per threadgroup) or 32 (mat-mat tile).
const N: usize = 37;
const N_ADAPTERS: usize = 3;
const RANK: usize = 5;

/// Normalised-error tolerance per activation dtype (output rounding dominates).
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

fn k_for(q: QuantType) -> usize {
    // K-quants need whole 256-value super-blocks; the others take 3 blocks of 32 (not a BK multiple
    // of 64).
    if q.block_values() == 256 {
        512
    } else {
        96
    }
}

fn weight(q: QuantType, n: usize, k: usize) -> QWeight {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    QWeight::from_qtensor(Arc::new(QTensor::quantize(&w, q.ggml()).unwrap())).unwrap()
}

fn lora(m: usize, n: usize, k: usize, dtype: DType) -> LoraBatch {
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..m).map(|i| [0, NO_ADAPTER, 2, 1, 0, 2][i % 6]).collect();
    LoraBatch {
        a: (Tensor::randn(0f32, 1.0, (N_ADAPTERS, RANK, k), &dev).unwrap() * 0.2)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        b: (Tensor::randn(0f32, 1.0, (N_ADAPTERS, n, RANK), &dev).unwrap() * 0.2)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        scales: Tensor::new(&[0.5f32, 1.0, 2.0], &dev).unwrap(),
        ids: Tensor::new(ids.as_slice(), &dev).unwrap(),
    }
}

/// Runs the planned kernels in the emulator: y (m, n) as f32.
fn emulate(x: &Tensor, w: &QWeight, lora: Option<&LoraBatch>, variant: Variant) -> Vec<f32> {
    let (m, k) = x.dims2().unwrap();
    let (n, _) = w.dims();
    let act = ElemType::from_float_dtype(x.dtype()).unwrap();
    let plan = qmatmul_plan(
        (m, n, k),
        w.quant(),
        act,
        lora.map(|_| (RANK, N_ADAPTERS)),
        variant,
    )
    .unwrap();
    let mut args = Buf::from_pod(&[plan.args]);
    let (mut wb, mut xb) = (buf_of(w.bytes()), buf_of(x));
    let mut y = Buf::zeros(m * n * x.dtype().size_in_bytes());
    let mut t = Buf::zeros(4 * m * RANK);
    let (mut bb, mut sc, mut ids) = match lora {
        Some(l) => (buf_of(&l.b), buf_of(&l.scales), buf_of(&l.ids)),
        None => (Buf::zeros(4), Buf::zeros(4), Buf::zeros(4)),
    };
    if let (Some(l), Some(shrink)) = (lora, &plan.shrink) {
        let mut ab = buf_of(&l.a);
        let bufs: &mut [&mut Buf] = &mut [&mut xb, &mut ab, &mut ids, &mut t, &mut args];
        harness()
            .run(
                Family::Qmatmul,
                &shrink.kernel.to_string(),
                bufs,
                &launch(shrink),
            )
            .unwrap();
    }
    let bufs: &mut [&mut Buf] = &mut [
        &mut wb, &mut xb, &mut y, &mut args, &mut bb, &mut t, &mut sc, &mut ids,
    ];
    harness()
        .run(
            Family::Qmatmul,
            &plan.main.kernel.to_string(),
            bufs,
            &launch(&plan.main),
        )
        .unwrap();
    f32_of(&y, x.dtype())
}

fn check(q: QuantType, dtype: DType, variant: Variant, with_lora: bool) {
    let k = k_for(q);
    let m = if variant == Variant::Mv {
        M_DECODE
    } else {
        M_PREFILL
    };
    let w = weight(q, N, k);
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let l = with_lora.then(|| lora(m, N, k, dtype));
    let got = emulate(&x, &w, l.as_ref(), variant);
    let want = qmatmul_reference(&x, &w, l.as_ref()).unwrap();
    let want = want
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = normalized_error(&got, &want);
    assert!(
        e < tolerance(dtype),
        "{q:?} {dtype:?} {variant:?} lora={with_lora}: normalised error {e}"
    );
}

#[test]
fn matvec_every_quant_and_dtype_with_and_without_lora() {
    for q in QUANTS {
        for dtype in DTYPES {
            for with_lora in [false, true] {
                check(q, dtype, Variant::Mv, with_lora);
            }
        }
    }
}

#[test]
fn matmat_every_quant_and_dtype_with_and_without_lora() {
    for q in QUANTS {
        for dtype in DTYPES {
            for with_lora in [false, true] {
                check(q, dtype, Variant::Mm, with_lora);
            }
        }
    }
}

#[test]
fn lora_epilogue_changes_only_rows_with_an_adapter() {
    let (q, k, m) = (QuantType::Q8_0, 64, 6);
    let w = weight(q, N, k);
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    let l = lora(m, N, k, DType::F32);
    let base = emulate(&x, &w, None, Variant::Mv);
    let with = emulate(&x, &w, Some(&l), Variant::Mv);
    let ids = l.ids.to_vec1::<u32>().unwrap();
    for row in 0..m {
        let same = base[row * N..(row + 1) * N] == with[row * N..(row + 1) * N];
        assert_eq!(
            same,
            ids[row] == NO_ADAPTER,
            "row {row} (adapter {})",
            ids[row]
        );
    }
}

/// The reference twin against candle: dequantize + matmul, plus each row's adapter with plain ops.
#[test]
fn reference_matches_candle_dequantize_matmul() {
    let dev = Device::Cpu;
    for q in QUANTS {
        let (k, m) = (k_for(q), 7);
        let wf = Tensor::randn(0f32, 1.0, (N, k), &dev).unwrap();
        let qt = QTensor::quantize(&wf, q.ggml()).unwrap();
        let deq = qt.dequantize(&dev).unwrap(); // (n, k)
        let w = QWeight::from_qtensor(Arc::new(qt)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let l = lora(m, N, k, DType::F32);
        let mut want = x.matmul(&deq.t().unwrap()).unwrap(); // (m, n)
        let ids = l.ids.to_vec1::<u32>().unwrap();
        let scales = l.scales.to_vec1::<f32>().unwrap();
        let mut rows = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let base = want.get(i).unwrap();
            rows.push(if (id as usize) < N_ADAPTERS {
                let xa = x.get(i).unwrap().unsqueeze(0).unwrap(); // (1, k)
                let t = xa
                    .matmul(&l.a.get(id as usize).unwrap().t().unwrap())
                    .unwrap(); // (1, r)
                let d = t
                    .matmul(&l.b.get(id as usize).unwrap().t().unwrap())
                    .unwrap()
                    .squeeze(0)
                    .unwrap();
                (base + (d * scales[id as usize] as f64).unwrap()).unwrap()
            } else {
                base
            });
        }
        want = Tensor::stack(&rows, 0).unwrap();
        let got = qmatmul_reference(&x, &w, Some(&l)).unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e = normalized_error(&f(&got), &f(&want));
        assert!(e < 1e-5, "{q:?}: reference vs candle {e}");
    }
}

#[test]
fn dispatch_on_cpu_uses_candle_and_agrees_with_reference() {
    let dev = Device::Cpu;
    let (q, k) = (QuantType::Q4_0, 64);
    let w = weight(q, N, k);
    let x = Tensor::randn(0f32, 1.0, (2, 4, k), &dev).unwrap(); // (b, t, k)
    let l = lora(8, N, k, DType::F32);
    assert_eq!(
        metal_candle::kernels::qmatmul::qmatmul_backend(&dev, &w),
        QMatmulBackend::Candle
    );
    let got = qmatmul(&x, &w, Some(&l)).unwrap();
    assert_eq!(got.dims(), &[2, 4, N]);
    let want = qmatmul_reference(&x, &w, Some(&l)).unwrap();
    let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // candle quantizes activations to 8 bits on the CPU.
    assert!(normalized_error(&f(&got), &f(&want)) < 2e-2);
}

#[test]
fn unsupported_cases_are_typed_errors() {
    let dev = Device::Cpu;
    let w = weight(QuantType::Q8_0, N, 64);
    let x = Tensor::zeros((2, 32), DType::F32, &dev).unwrap();
    let e = qmatmul(&x, &w, None).unwrap_err();
    assert!(
        matches!(e, metal_candle::Error::UnsupportedKernel { .. }),
        "{e}"
    );
    let q41 = QTensor::quantize(
        &Tensor::zeros((4, 64), DType::F32, &dev).unwrap(),
        candle_core::quantized::GgmlDType::Q4_1,
    )
    .unwrap();
    let e = QWeight::from_qtensor(Arc::new(q41)).unwrap_err();
    assert!(
        matches!(e, metal_candle::Error::UnsupportedKernel { .. }),
        "{e}"
    );
    let x = Tensor::zeros((3, 64), DType::F32, &dev).unwrap();
    let mut l = lora(3, N, 64, DType::F32);
    l.ids = Tensor::new(&[0u32, 1], &dev).unwrap(); // 2 ids for 3 rows
    let e = qmatmul(&x, &w, Some(&l)).unwrap_err();
    assert!(
        matches!(e, metal_candle::Error::UnsupportedKernel { .. }),
        "{e}"
    );
}

#[test]
fn header_constants_match_rust_mirrors() {
    for (name, value) in abi::MIRRORED_DEFINES {
        let line = abi::HEADER_SRC
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name) && l.starts_with("#define"))
            .unwrap_or_else(|| panic!("{name} not in header"));
        let v: usize = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(v, *value, "{name}");
    }
    assert!(abi::HEADER_SRC.contains("sizeof(QMatmulArgs) == 24"));
    assert!(abi::HEADER_SRC.contains("sizeof(AttnArgs) == 64"));
}

#[test]
fn every_planned_kernel_name_exists_in_the_emulator() {
    for q in QUANTS {
        for dtype in DTYPES {
            let act = ElemType::from_float_dtype(dtype).unwrap();
            for variant in [Variant::Mv, Variant::Mm] {
                let plan = qmatmul_plan((1, 8, 256), q, act, Some((4, 2)), variant).unwrap();
                for l in [Some(&plan.main), plan.shrink.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    let name = l.kernel.to_string();
                    // An unknown name fails before running; a zero-size grid then does nothing.
                    let r = harness().run(
                        Family::Qmatmul,
                        &name,
                        &mut [],
                        &Launch {
                            grid: [0, 0, 0],
                            threadgroup: [32, 1, 1],
                            ..Default::default()
                        },
                    );
                    assert!(r.is_ok(), "{name}: {r:?}");
                }
            }
        }
    }
}

// ---- NaN and ±Inf (issue 18): the kernels give their twin's verdict, element by element ----

/// Byte offset of the f16 super-scale `d` in one block, and the block's size.
fn d_offset(q: QuantType) -> (usize, usize) {
    match q {
        QuantType::Q4_0 => (0, 18),
        QuantType::Q8_0 => (0, 34),
        QuantType::Q4K => (0, 144),
        QuantType::Q6K => (208, 210),
    }
}

/// `w` with the f16 scale of block `blk` of row `row` set to `value`.
fn with_bad_scale(q: QuantType, w: &QWeight, k: usize, row: usize, blk: usize, value: f32) -> QWeight {
    let (off, size) = d_offset(q);
    let mut bytes = w.bytes().flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let at = (row * (k / q.block_values()) + blk) * size + off;
    bytes[at..at + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes());
    let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, q.ggml()).unwrap();
    let (n, _) = w.dims();
    QWeight::from_qtensor(Arc::new(QTensor::new(storage, (n, k)).unwrap())).unwrap()
}

/// (finite, NaN) flags of each element.
fn verdict(v: &[f32]) -> Vec<(bool, bool)> {
    v.iter().map(|x| (x.is_finite(), x.is_nan())).collect()
}

/// A NaN/±Inf activation makes its row non-finite, a NaN/±Inf block scale its column, through
/// the mat-vec and mat-mat kernels with and without the LoRA epilogue, exactly as the twin
/// (x · dequant(W)ᵀ in f32) does; finite elements stay within the usual tolerance.
#[test]
fn non_finite_activations_and_scales_propagate_like_the_twin() {
    for q in QUANTS {
        let k = k_for(q);
        let w = weight(q, N, k);
        for variant in [Variant::Mv, Variant::Mm] {
            let m = if variant == Variant::Mv { M_DECODE } else { M_PREFILL };
            for dtype in [DType::F32, DType::F16] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut xs = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let bad_row = m - 1;
                    xs[bad_row * k + k / 2 + 1] = bad;
                    let x = Tensor::from_vec(xs, (m, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let clean_x = x.narrow(0, 0, m - 1).unwrap();
                    let bad_col = N - 2; // a tail row of the weight (N is not a multiple of the tiles)
                    let bad_w = with_bad_scale(q, &w, k, bad_col, 1, bad);
                    for (what, x, w) in [("activation", &x, &w), ("scale", &clean_x, &bad_w)] {
                        for with_lora in [false, true] {
                            let rows = x.dim(0).unwrap();
                            let l = with_lora.then(|| lora(rows, N, k, dtype));
                            let got = emulate(x, w, l.as_ref(), variant);
                            let want = qmatmul_reference(x, w, l.as_ref()).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                            let ctx = format!("{q:?} {variant:?} {dtype:?} bad {what} {bad} lora={with_lora}");
                            assert_eq!(verdict(&got), verdict(&want), "{ctx}");
                            let bad_elems: Vec<usize> = (0..want.len()).filter(|&i| !want[i].is_finite()).collect();
                            match what {
                                "activation" => assert!(!bad_elems.is_empty() && bad_elems.iter().all(|i| i / N == bad_row), "{ctx}: {bad_elems:?}"),
                                _ => assert!(!bad_elems.is_empty() && bad_elems.iter().all(|i| i % N == bad_col), "{ctx}: {bad_elems:?}"),
                            }
                            let (g, f): (Vec<f32>, Vec<f32>) = got.iter().zip(&want).filter(|(_, y)| y.is_finite()).map(|(a, b)| (*a, *b)).unzip();
                            assert!(normalized_error(&g, &f) < tolerance(dtype), "{ctx}: finite elements");
                        }
                    }
                }
            }
        }
    }
}
