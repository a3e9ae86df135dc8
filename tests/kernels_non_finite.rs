//! NaN and ±Inf through the CPU kernels (issue 18): each propagates them as its plain twin does.
//!
//! - Quantized matmul (every type, SIMD and reference backends): a non-finite activation makes
//!   its whole output row non-finite, as `x · dequant(W)ᵀ` in f32 does (NaN·w, Inf·0 are NaN);
//!   a non-finite weight scale makes that output column non-finite. candle's quantized matmul
//!   (the `METAL_CANDLE_CPU_KERNELS=0` path) behind [`Linear`] gives the same verdict.
//! - CPU attention: with no mask, the exact non-finite pattern of `attend_reference`; with a
//!   causal or window mask, that of the reference run on the visible keys only (a masked key is
//!   skipped because it is masked, never because a comparison with NaN is false).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, IndexOp, Tensor};
use metal_candle::kernels::cpu::{cpu_attention, cpu_backend, cpu_matmul_with, dequantize_row, CpuBackend, CpuQuant, CpuWeight};
use metal_candle::kernels::attend_reference;
use metal_candle::model::linear::{Linear, LinearWeight};

const BAD: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

fn values(shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flags(t: &Tensor) -> Vec<bool> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.is_finite()).collect()
}

/// Same finite/non-finite pattern (value accuracy of the 8-bit kernels is tests/kernels_cpu.rs's).
fn assert_same_pattern(ours: &Tensor, reference: &Tensor, what: &str) {
    let (a, b) = (flags(ours), flags(reference));
    assert_eq!(a.len(), b.len(), "{what}");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{what}: element {i}: ours finite {}, reference finite {}", a[i], b[i]);
    }
}

/// Same finite/non-finite pattern, and the finite values close.
fn assert_same_verdict(ours: &Tensor, reference: &Tensor, what: &str) {
    let (a, b) = (ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), reference.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.is_finite(), y.is_finite(), "{what}: element {i}: ours {x}, reference {y}");
        if x.is_finite() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}: element {i}: ours {x}, reference {y}");
        }
    }
}

fn backends() -> Vec<CpuBackend> {
    let mut b = vec![CpuBackend::Reference];
    if cpu_backend().is_simd() {
        b.push(cpu_backend());
    }
    #[cfg(target_arch = "x86_64")]
    if cpu_backend() == CpuBackend::Simd(metal_candle::kernels::cpu::Isa::Avx512Vnni) {
        b.push(CpuBackend::Simd(metal_candle::kernels::cpu::Isa::Avx2));
    }
    b
}

/// x · dequant(W)ᵀ in f32.
fn dense_reference(x: &Tensor, w: &CpuWeight) -> Tensor {
    let (n, k) = w.dims();
    let mut dense = vec![0f32; n * k];
    for (row, out) in dense.chunks_exact_mut(k).enumerate() {
        dequantize_row(w.quant(), &w.row(row), out);
    }
    x.matmul(&tensor(dense, &[n, k]).t().unwrap()).unwrap()
}

/// `data` with the f16 scale of block `blk` of weight row `row` set to `value`.
fn bad_scale(q: CpuQuant, data: &mut [u8], k: usize, row: usize, blk: usize, value: f32) {
    let per_row = k / q.block_values() * q.block_bytes();
    // d is the first field of every block but Q6_K's (ggml-common.h); F16 "blocks" are values.
    let offset = if q == CpuQuant::Q6K { 208 } else { 0 };
    let at = row * per_row + blk * q.block_bytes() + offset;
    data[at..at + 2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes());
}

#[test]
fn quantized_matmul_propagates_non_finite_activations_and_scales() {
    let (n, m) = (37, 9);
    for q in CpuQuant::ALL {
        let k = if q.block_values() == 256 { 512 } else { 96 };
        let w = tensor(values(&[n, k], 1), &[n, k]);
        let qt = QTensor::quantize(&w, q.ggml()).unwrap();
        for bad in BAD {
            // Activation row 2 holds one bad value.
            let mut xv = values(&[m, k], 2);
            xv[2 * k + 40] = bad;
            let x = tensor(xv, &[m, k]);
            let cw = CpuWeight::from_qtensor(&qt).unwrap();
            let reference = dense_reference(&x, &cw);
            for backend in backends() {
                let y = cpu_matmul_with(&x, &[&cw], backend).unwrap();
                assert_same_pattern(&y, &reference, &format!("{q:?} {backend:?} activation {bad}"));
                // Decode (one row) takes other kernels.
                let y1 = cpu_matmul_with(&x.i(2..3).unwrap(), &[&cw], backend).unwrap();
                assert!(flags(&y1).iter().all(|f| !f), "{q:?} {backend:?} decode activation {bad}");
            }
            // A bad scale in weight row 11 (an interleaved row) and row 35 (a tail row).
            let mut data = qt.data().unwrap().into_owned();
            bad_scale(q, &mut data, k, 11, 1, bad);
            bad_scale(q, &mut data, k, 35, 0, bad);
            let cw = CpuWeight::new(data, q, n, k).unwrap();
            let x = tensor(values(&[m, k], 3), &[m, k]);
            let reference = dense_reference(&x, &cw);
            for backend in backends() {
                let y = cpu_matmul_with(&x, &[&cw], backend).unwrap();
                assert_same_pattern(&y, &reference, &format!("{q:?} {backend:?} weight scale {bad}"));
                let bad_cols: Vec<usize> = flags(&y.i(0).unwrap()).iter().enumerate().filter(|(_, f)| !**f).map(|(i, _)| i).collect();
                assert_eq!(bad_cols, vec![11, 35], "{q:?} {backend:?} weight scale {bad}");
            }
        }
    }
}

/// candle's quantized matmul quantizes activations to 8 bits and would turn a NaN into 0; the
/// linear layer's candle path (what `METAL_CANDLE_CPU_KERNELS=0` runs) keeps the row non-finite.
#[test]
fn candle_quantized_linear_propagates_non_finite_rows() {
    use candle_core::quantized::GgmlDType;
    let (n, m) = (40, 5);
    for (ggml, k) in [(GgmlDType::Q8_0, 64), (GgmlDType::Q4K, 256)] {
        let w = tensor(values(&[n, k], 4), &[n, k]);
        let dense = Linear::new(LinearWeight::Dense(w.clone()), None);
        let quant = Linear::new(LinearWeight::Quantized(Arc::new(QTensor::quantize(&w, ggml).unwrap())), None);
        for bad in BAD {
            let mut xv = values(&[m, k], 5);
            xv[3 * k + 7] = bad;
            let x = tensor(xv, &[1, m, k]);
            let (a, b) = (quant.forward(&x).unwrap(), dense.forward(&x).unwrap());
            let (fa, fb) = (flags(&a), flags(&b));
            assert_eq!(fa, fb, "{ggml:?} {bad}");
            assert!(fa[3 * n..4 * n].iter().all(|f| !f) && fa[..3 * n].iter().all(|f| *f), "{ggml:?} {bad}");
        }
    }
}

fn causal(t: usize, kv_len: usize, window: Option<usize>) -> Tensor {
    let mut m = vec![0f32; t * kv_len];
    for i in 0..t {
        let pos = kv_len - t + i;
        for key in 0..kv_len {
            if key > pos || window.is_some_and(|w| pos >= key + w) {
                m[i * kv_len + key] = f32::NEG_INFINITY;
            }
        }
    }
    tensor(m, &[t, kv_len])
}

/// The reference on visible keys only: each query row attends to the keys its mask row leaves
/// visible (a contiguous range for causal / window masks), with no mask.
fn reference_on_visible_keys(q: &Tensor, k: &Tensor, v: &Tensor, t: usize, kv_len: usize, window: Option<usize>, scale: f64) -> Tensor {
    let rows: Vec<Tensor> = (0..t)
        .map(|i| {
            let pos = kv_len - t + i;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let (kk, vv) = (k.narrow(2, lo, pos + 1 - lo).unwrap(), v.narrow(2, lo, pos + 1 - lo).unwrap());
            attend_reference(&q.narrow(2, i, 1).unwrap().contiguous().unwrap(), &kk, &vv, None, scale).unwrap()
        })
        .collect();
    Tensor::cat(&rows, 2).unwrap()
}

#[test]
fn cpu_attention_propagates_like_the_reference() {
    let (b, h, n_kv, d) = (1, 4, 2, 16);
    let scale = 1.0 / (d as f64).sqrt();
    for (t, kv_len, window) in [(1, 9, None), (6, 6, None), (5, 8, Some(3))] {
        let masked = t > 1 || window.is_some();
        for which in ["q", "k", "v"] {
            for bad in BAD {
                let (qs, ks) = ([b, h, t, d], [b, n_kv, kv_len, d]);
                let (mut qv, mut kv, mut vv) = (values(&qs, 6), values(&ks, 7), values(&ks, 8));
                match which {
                    "q" => qv[(h - 1) * t * d + (t - 1) * d + 3] = bad, // last head, last row
                    "k" => kv[kv_len.min(4) * d + 5] = bad,                // group 0, key 4
                    _ => vv[(kv_len + kv_len.min(4)) * d + 2] = bad,       // group 1, key 4
                }
                let (q, k, v) = (tensor(qv, &qs), tensor(kv, &ks), tensor(vv, &ks));
                let mask = masked.then(|| causal(t, kv_len, window));
                let ours = cpu_attention(&q, &k, &v, mask.as_ref(), scale as f32).unwrap();
                let what = format!("t {t} kv {kv_len} window {window:?}: {which} = {bad}");
                let reference = if masked {
                    reference_on_visible_keys(&q, &k, &v, t, kv_len, window, scale)
                } else {
                    attend_reference(&q, &k, &v, None, scale).unwrap()
                };
                assert_same_verdict(&ours, &reference, &what);
                assert!(flags(&ours).iter().any(|f| !f), "{what}: the damage must be visible somewhere");
            }
        }
    }
}

/// A NaN in a key every row masks (a future position in prefill) leaves the output finite: it is
/// skipped because it is masked. (Adding −inf to NaN, as plain-op attention and HF do, would
/// make every row NaN.)
#[test]
fn masked_keys_are_skipped_whatever_they_hold() {
    let (t, kv_len, d) = (4, 6, 16);
    let mut kv = values(&[1, 1, kv_len, d], 9);
    let mut vv = values(&[1, 1, kv_len, d], 10);
    kv[5 * d] = f32::NAN; // key 5: visible to the last row only (position 5)
    vv[5 * d + 1] = f32::INFINITY;
    let (q, k, v) = (tensor(values(&[1, 1, t, d], 11), &[1, 1, t, d]), tensor(kv, &[1, 1, kv_len, d]), tensor(vv, &[1, 1, kv_len, d]));
    let ours = cpu_attention(&q, &k, &v, Some(&causal(t, kv_len, None)), 0.25).unwrap();
    let rows: Vec<bool> = (0..t).map(|i| flags(&ours.i((0, 0, i)).unwrap()).iter().all(|f| *f)).collect();
    assert_eq!(rows, [true, true, true, false]);
    let leaky = attend_reference(&q, &k, &v, Some(&causal(t, kv_len, None)), 0.25).unwrap();
    assert!(flags(&leaky).iter().all(|f| !f), "plain-op attention leaks masked NaN keys (documented difference)");
}
