//! CPU attention (src/kernels/cpu/attention.rs) against its plain-op twin
//! (`kernels::attend_reference`): decode and prefill, GQA ratios, head dims that are
//! and are not multiples of 8, K/V read from a larger (cache-like) buffer, causal and
//! sliding-window masks, and the typed errors.

use candle_core::{DType, Device, Tensor};
use metal_candle::kernels::cpu::cpu_attention;
use metal_candle::kernels::attend_reference;
use metal_candle::Error;

const TOL: f32 = 1e-5;

fn values(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Additive (t, kv_len) mask: query i at position kv_len − t + i sees keys ≤ it, and with a
/// window only the last `w`.
fn mask(t: usize, kv_len: usize, window: Option<usize>) -> Tensor {
    let mut m = vec![0f32; t * kv_len];
    for i in 0..t {
        let pos = kv_len - t + i;
        for key in 0..kv_len {
            if key > pos || window.is_some_and(|w| pos >= key + w) {
                m[i * kv_len + key] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(m, (t, kv_len), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar::<f32>().unwrap()
}

struct Case {
    b: usize,
    h: usize,
    n_kv: usize,
    t: usize,
    kv_len: usize,
    d: usize,
    window: Option<usize>,
}

fn check(c: &Case) {
    let q = values(&[c.b, c.h, c.t, c.d], 1);
    // K/V as the cache holds them: the first kv_len positions of a larger buffer.
    let cap = c.kv_len + 7;
    let k_buf = values(&[c.b, c.n_kv, cap, c.d], 2);
    let v_buf = values(&[c.b, c.n_kv, cap, c.d], 3);
    let k = k_buf.narrow(2, 0, c.kv_len).unwrap();
    let v = v_buf.narrow(2, 0, c.kv_len).unwrap();
    let m = (c.t > 1 || c.window.is_some()).then(|| mask(c.t, c.kv_len, c.window));
    let scale = 1.0 / (c.d as f64).sqrt();
    let ours = cpu_attention(&q, &k, &v, m.as_ref(), scale as f32).unwrap();
    let reference = attend_reference(&q, &k, &v, m.as_ref(), scale).unwrap();
    assert_eq!(ours.dims(), reference.dims());
    let err = max_abs_diff(&ours, &reference);
    let (b, h, n_kv, t, kv_len, d) = (c.b, c.h, c.n_kv, c.t, c.kv_len, c.d);
    assert!(err < TOL, "b {b} h {h} n_kv {n_kv} t {t} kv_len {kv_len} d {d} window {:?}: {err}", c.window);
}

#[test]
fn decode_equals_the_reference() {
    for (h, n_kv) in [(4, 4), (9, 3), (8, 1)] {
        for d in [64, 36] {
            for kv_len in [1, 5, 130] {
                check(&Case { b: 1, h, n_kv, t: 1, kv_len, d, window: None });
            }
        }
    }
    check(&Case { b: 1, h: 9, n_kv: 3, t: 1, kv_len: 40, d: 64, window: Some(16) });
}

#[test]
fn prefill_equals_the_reference() {
    for (h, n_kv) in [(4, 4), (14, 2)] {
        for (t, kv_len) in [(3, 3), (17, 17), (40, 52)] {
            check(&Case { b: 1, h, n_kv, t, kv_len, d: 64, window: None });
        }
    }
    check(&Case { b: 2, h: 4, n_kv: 2, t: 9, kv_len: 12, d: 80, window: None });
    check(&Case { b: 1, h: 4, n_kv: 2, t: 33, kv_len: 33, d: 64, window: Some(8) });
}

#[test]
fn bad_inputs_are_typed_errors() {
    let q = values(&[1, 4, 2, 64], 1);
    let k = values(&[1, 3, 5, 64], 2);
    let err = cpu_attention(&q, &k, &k, None, 0.125).unwrap_err();
    assert!(matches!(err, Error::UnsupportedKernel { .. }), "{err}");
    let k = values(&[1, 2, 5, 64], 2);
    let bad_mask = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let err = cpu_attention(&q, &k, &k, Some(&bad_mask), 0.125).unwrap_err();
    assert!(matches!(err, Error::UnsupportedKernel { .. }), "{err}");
    let half = q.to_dtype(DType::F16).unwrap();
    let err = cpu_attention(&half, &k, &k, None, 0.125).unwrap_err();
    assert!(matches!(err, Error::UnsupportedKernel { .. }), "{err}");
}
