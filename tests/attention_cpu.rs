//! CPU attention (src/kernels/cpu/attention.rs) against its plain-op twin
//! (`kernels::attend_reference`): decode and prefill, GQA ratios, head dims that are
//! and are not multiples of 8, K/V read from a larger (cache-like) buffer, causal and
//! sliding-window masks, and the typed errors; the tiled prefill kernel over lengths that are and
//! are not tile multiples, with windows, GQA and arbitrary additive masks.

use candle_core::{DType, Device, Tensor};
use metal_candle::kernels::cpu::attention::{cpu_attention_with, CpuAttnKernel};
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
    for kernel in [CpuAttnKernel::Rows, CpuAttnKernel::Tiled] {
        check_with(c, kernel, None);
    }
}

/// `extra`: an additive (t, kv_len) mask used instead of the causal/window one.
fn check_with(c: &Case, kernel: CpuAttnKernel, extra: Option<Tensor>) {
    let q = values(&[c.b, c.h, c.t, c.d], 1);
    // K/V as the cache holds them: the first kv_len positions of a larger buffer.
    let cap = c.kv_len + 7;
    let k_buf = values(&[c.b, c.n_kv, cap, c.d], 2);
    let v_buf = values(&[c.b, c.n_kv, cap, c.d], 3);
    let k = k_buf.narrow(2, 0, c.kv_len).unwrap();
    let v = v_buf.narrow(2, 0, c.kv_len).unwrap();
    let m = extra.or_else(|| (c.t > 1 || c.window.is_some()).then(|| mask(c.t, c.kv_len, c.window)));
    let scale = 1.0 / (c.d as f64).sqrt();
    let ours = cpu_attention_with(&q, &k, &v, m.as_ref(), scale as f32, kernel).unwrap();
    let reference = attend_reference(&q, &k, &v, m.as_ref(), scale).unwrap();
    assert_eq!(ours.dims(), reference.dims());
    let err = max_abs_diff(&ours, &reference);
    let (b, h, n_kv, t, kv_len, d) = (c.b, c.h, c.n_kv, c.t, c.kv_len, c.d);
    assert!(err < TOL, "{kernel:?}: b {b} h {h} n_kv {n_kv} t {t} kv_len {kv_len} d {d} window {:?}: {err}", c.window);
}

#[test]
fn tiled_prefill_equals_the_reference_across_lengths() {
    // Lengths around the 16-query and 64-key tiles, and a long one.
    for t in [1, 2, 15, 16, 17, 63, 64, 65, 100, 129, 600] {
        check_with(&Case { b: 1, h: 9, n_kv: 3, t, kv_len: t, d: 64, window: None }, CpuAttnKernel::Tiled, None);
    }
    // Queries after a cached prefix (a second chunk of a prompt, a chat turn).
    for (t, kv_len) in [(1, 70), (37, 200), (64, 64 + 128), (250, 517)] {
        check_with(&Case { b: 1, h: 14, n_kv: 2, t, kv_len, d: 64, window: None }, CpuAttnKernel::Tiled, None);
    }
}

#[test]
fn tiled_prefill_equals_the_reference_with_windows_gqa_and_head_dims() {
    for window in [1, 7, 64, 100] {
        check_with(&Case { b: 1, h: 8, n_kv: 2, t: 300, kv_len: 300, d: 64, window: Some(window) }, CpuAttnKernel::Tiled, None);
    }
    check_with(&Case { b: 1, h: 4, n_kv: 2, t: 90, kv_len: 150, d: 64, window: Some(40) }, CpuAttnKernel::Tiled, None);
    for (h, n_kv) in [(4, 4), (8, 1), (7, 1), (6, 2)] {
        for d in [36, 64, 80, 128] {
            check_with(&Case { b: 2, h, n_kv, t: 70, kv_len: 70, d, window: None }, CpuAttnKernel::Tiled, None);
        }
    }
}

/// Arbitrary additive masks: finite values and holes of −inf inside a row.
#[test]
fn tiled_prefill_equals_the_reference_with_arbitrary_masks() {
    let (t, kv_len) = (150, 210);
    let noise = values(&[t, kv_len], 4).to_vec2::<f32>().unwrap();
    let mut m = vec![0f32; t * kv_len];
    for i in 0..t {
        for key in 0..kv_len {
            let x = noise[i][key];
            m[i * kv_len + key] = if x > 1.4 || (key / 64 == 1 && i < 80) { f32::NEG_INFINITY } else if x < -1.0 { x } else { 0.0 };
        }
    }
    let m = Tensor::from_vec(m, (t, kv_len), &Device::Cpu).unwrap();
    for kernel in [CpuAttnKernel::Rows, CpuAttnKernel::Tiled] {
        check_with(&Case { b: 1, h: 6, n_kv: 3, t, kv_len, d: 64, window: None }, kernel, Some(m.clone()));
    }
    // Without a mask (every key visible): every tile is clean.
    check_with(&Case { b: 1, h: 4, n_kv: 2, t: 65, kv_len: 130, d: 64, window: None }, CpuAttnKernel::Tiled, Some(Tensor::zeros((65, 130), DType::F32, &Device::Cpu).unwrap()));
}

/// A row that sees no key is zeros (the reference's softmax would give NaN), in both kernels.
#[test]
fn rows_without_visible_keys_are_zeros() {
    let (t, kv_len, d) = (40, 100, 64);
    let mut m = mask(t, kv_len, None).to_vec2::<f32>().unwrap();
    m[5].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    let m = Tensor::new(m, &Device::Cpu).unwrap();
    let (q, k, v) = (values(&[1, 4, t, d], 1), values(&[1, 2, kv_len, d], 2), values(&[1, 2, kv_len, d], 3));
    let rows = cpu_attention_with(&q, &k, &v, Some(&m), 0.125, CpuAttnKernel::Rows).unwrap();
    let tiled = cpu_attention_with(&q, &k, &v, Some(&m), 0.125, CpuAttnKernel::Tiled).unwrap();
    assert!(max_abs_diff(&rows, &tiled) < TOL);
    let row5 = tiled.narrow(2, 5, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(row5.iter().all(|x| *x == 0.0));
}

#[test]
fn the_dispatch_picks_tiles_for_long_prompts() {
    assert_eq!(CpuAttnKernel::for_queries(1), CpuAttnKernel::Rows);
    assert_eq!(CpuAttnKernel::for_queries(4000), CpuAttnKernel::Tiled);
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

/// The tiled kernel treats NaN and ±Inf as the row kernel does (whose agreement with the reference
/// is tests/kernels_non_finite.rs's): the same finite/non-finite pattern and close finite values,
/// with the bad value in a visible key, a masked one (a future position, or outside the window),
/// a clean tile and a mixed one.
#[test]
fn tiled_non_finite_values_propagate_like_the_row_kernel() {
    let (h, n_kv, d) = (4, 2, 16);
    for (t, kv_len, window) in [(70, 70, None), (40, 140, None), (90, 90, Some(20))] {
        for which in ["q", "k", "v"] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [3, 30, 66, kv_len - 1] {
                    let (mut q, mut k, mut v) = (
                        values(&[1, h, t, d], 6).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        values(&[1, n_kv, kv_len, d], 7).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        values(&[1, n_kv, kv_len, d], 8).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    match which {
                        "q" => q[(at % t) * d + 3] = bad,    // head 0
                        "k" => k[at * d + 5] = bad,          // group 0
                        _ => v[(kv_len + at) * d + 2] = bad, // group 1
                    }
                    let q = Tensor::from_vec(q, (1, h, t, d), &Device::Cpu).unwrap();
                    let k = Tensor::from_vec(k, (1, n_kv, kv_len, d), &Device::Cpu).unwrap();
                    let v = Tensor::from_vec(v, (1, n_kv, kv_len, d), &Device::Cpu).unwrap();
                    let m = mask(t, kv_len, window);
                    let rows = cpu_attention_with(&q, &k, &v, Some(&m), 0.25, CpuAttnKernel::Rows).unwrap();
                    let tiled = cpu_attention_with(&q, &k, &v, Some(&m), 0.25, CpuAttnKernel::Tiled).unwrap();
                    let (a, b) = (rows.flatten_all().unwrap().to_vec1::<f32>().unwrap(), tiled.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    let what = format!("t {t} kv {kv_len} window {window:?}: {which}[{at}] = {bad}");
                    assert!(a.iter().any(|x| !x.is_finite()), "{what}: the damage must be visible");
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        assert_eq!(x.is_finite(), y.is_finite(), "{what}: element {i}: rows {x}, tiled {y}");
                        if x.is_finite() {
                            assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{what}: element {i}: rows {x}, tiled {y}");
                        }
                    }
                }
            }
        }
    }
}
