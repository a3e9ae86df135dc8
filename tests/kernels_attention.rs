//! Flash-attention kernels (metal/attention.metal) through the MSL host emulation, compared with
//! the Rust reference twin; the twin compared with the model's plain attention
//! (`kernels::attend_reference`).

#[path = "msl_harness/mod.rs"]
mod msl_harness;

use candle_core::{DType, Device, Tensor};
use metal_candle::kernels::abi;
use metal_candle::kernels::attention::{attn_plan, AttnDims};
use metal_candle::kernels::{flash_attention, flash_attention_reference, AttnParams, ElemType};
use msl_harness::{buf_of, f32_of, harness, launch, normalized_error, Buf, Family};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const N_KV: usize = 2;
/// Prefill: 7 new queries after 12 cached keys (not multiples of the 8-row or 32-key tiles).
const T_PREFILL: usize = 7;
const KV_PREFILL: usize = 19;
/// Decode: 70 keys in splits of 32 (three splits, the last partial).
const KV_DECODE: usize = 70;
const DECODE_SPLIT: usize = 32;

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

fn rand(shape: (usize, usize, usize, usize), dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Runs the planned kernels in the emulator. `kv_capacity` ≥ kv_len lays K/V out like a
/// preallocated cache (head stride capacity·d), exercising the strided path.
fn emulate(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams, kv_capacity: usize) -> Vec<f32> {
    let dims = AttnDims::of(q, k, v, p).unwrap();
    let (d, dtype) = (dims.d, q.dtype());
    let pad = |t: &Tensor| {
        let extra = kv_capacity - dims.kv_len;
        if extra == 0 {
            return t.clone();
        }
        let z = Tensor::zeros((dims.b, dims.n_kv, extra, d), dtype, &Device::Cpu).unwrap();
        Tensor::cat(&[t, &z], 2).unwrap()
    };
    let strides = (dims.n_kv * kv_capacity * d, kv_capacity * d);
    let plan = attn_plan(
        &dims,
        p,
        ElemType::from_float_dtype(dtype).unwrap(),
        strides,
        strides,
    )
    .unwrap();
    let mut args = Buf::from_pod(&[plan.args]);
    let (mut qb, mut kb, mut vb) = (buf_of(q), buf_of(&pad(k)), buf_of(&pad(v)));
    let mut mask = match &p.mask {
        Some(m) => buf_of(&m.to_dtype(DType::F32).unwrap()),
        None => Buf::zeros(4),
    };
    let mut out = Buf::zeros(q.elem_count() * dtype.size_in_bytes());
    let h = harness();
    match &plan.reduce {
        None => {
            let bufs: &mut [&mut Buf] =
                &mut [&mut qb, &mut kb, &mut vb, &mut mask, &mut out, &mut args];
            h.run(
                Family::Attention,
                &plan.main.kernel.to_string(),
                bufs,
                &launch(&plan.main),
            )
            .unwrap();
        }
        Some(reduce) => {
            let splits = plan.args.n_splits as usize;
            let mut po = Buf::zeros(4 * splits * dims.b * dims.h * d);
            let mut pml = Buf::zeros(4 * splits * dims.b * dims.h * 2);
            let bufs: &mut [&mut Buf] = &mut [
                &mut qb, &mut kb, &mut vb, &mut mask, &mut po, &mut pml, &mut args,
            ];
            h.run(
                Family::Attention,
                &plan.main.kernel.to_string(),
                bufs,
                &launch(&plan.main),
            )
            .unwrap();
            let bufs: &mut [&mut Buf] = &mut [&mut po, &mut pml, &mut out, &mut args];
            h.run(
                Family::Attention,
                &reduce.kernel.to_string(),
                bufs,
                &launch(reduce),
            )
            .unwrap();
        }
    }
    f32_of(&out, dtype)
}

fn reference(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Vec<f32> {
    let y = flash_attention_reference(q, k, v, p).unwrap();
    y.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// An additive mask (t, kv_len): random small biases and some −inf, never a whole row.
fn mask(t: usize, kv_len: usize) -> Tensor {
    let v: Vec<f32> = (0..t * kv_len)
        .map(|i| {
            if i % 5 == 3 && i % kv_len != 0 {
                f32::NEG_INFINITY
            } else {
                ((i * 7 % 11) as f32 - 5.0) * 0.1
            }
        })
        .collect();
    Tensor::from_vec(v, (t, kv_len), &Device::Cpu).unwrap()
}

struct Case {
    d: usize,
    n_rep: usize,
    t: usize,
    kv_len: usize,
    dtype: DType,
    params: AttnParams,
    kv_capacity: usize,
}

fn check(c: Case) {
    let h = N_KV * c.n_rep;
    let q = rand((1, h, c.t, c.d), c.dtype);
    let (k, v) = (
        rand((1, N_KV, c.kv_len, c.d), c.dtype),
        rand((1, N_KV, c.kv_len, c.d), c.dtype),
    );
    let got = emulate(&q, &k, &v, &c.params, c.kv_capacity);
    let want = reference(&q, &k, &v, &c.params);
    let e = normalized_error(&got, &want);
    let p = &c.params;
    assert!(
        e < tolerance(c.dtype),
        "d={} n_rep={} t={} kv={} {:?} causal={} window={:?} mask={}: normalised error {e}",
        c.d,
        c.n_rep,
        c.t,
        c.kv_len,
        c.dtype,
        p.causal,
        p.window,
        p.mask.is_some()
    );
}

#[test]
fn prefill_causal_every_head_dim_dtype_and_gqa_ratio() {
    for d in abi::ATTN_HEAD_DIMS {
        for dtype in DTYPES {
            for n_rep in [1, 4, 8] {
                let params = AttnParams {
                    causal: true,
                    ..AttnParams::new(d)
                };
                check(Case {
                    d,
                    n_rep,
                    t: T_PREFILL,
                    kv_len: KV_PREFILL,
                    dtype,
                    params,
                    kv_capacity: KV_PREFILL,
                });
            }
        }
    }
}

#[test]
fn decode_split_every_head_dim_dtype_and_gqa_ratio() {
    for d in abi::ATTN_HEAD_DIMS {
        for dtype in DTYPES {
            for n_rep in [1, 4, 8] {
                let params = AttnParams {
                    decode_keys_per_split: Some(DECODE_SPLIT),
                    ..AttnParams::new(d)
                };
                check(Case {
                    d,
                    n_rep,
                    t: 1,
                    kv_len: KV_DECODE,
                    dtype,
                    params,
                    kv_capacity: KV_DECODE,
                });
            }
        }
    }
}

#[test]
fn masks_windows_and_gqa_together() {
    for dtype in [DType::F32, DType::F16] {
        for n_rep in [1, 4, 8] {
            for (causal, window, with_mask) in [
                (false, None, true),
                (true, None, true),
                (true, Some(5), false),
                (true, Some(5), true),
                (false, Some(9), false),
            ] {
                let params = AttnParams {
                    causal,
                    window,
                    mask: with_mask.then(|| mask(T_PREFILL, KV_PREFILL)),
                    ..AttnParams::new(80)
                };
                check(Case {
                    d: 80,
                    n_rep,
                    t: T_PREFILL,
                    kv_len: KV_PREFILL,
                    dtype,
                    params,
                    kv_capacity: KV_PREFILL,
                });
            }
        }
    }
}

#[test]
fn long_prefill_spans_several_key_tiles_and_row_blocks() {
    for window in [None, Some(20)] {
        let params = AttnParams {
            causal: true,
            window,
            ..AttnParams::new(64)
        };
        check(Case {
            d: 64,
            n_rep: 4,
            t: 45,
            kv_len: 45,
            dtype: DType::F32,
            params,
            kv_capacity: 45,
        });
    }
}

#[test]
fn decode_with_mask_window_and_strided_cache() {
    for dtype in DTYPES {
        let params = AttnParams {
            mask: Some(mask(1, KV_DECODE)),
            window: Some(40),
            decode_keys_per_split: Some(DECODE_SPLIT),
            ..AttnParams::new(128)
        };
        check(Case {
            d: 128,
            n_rep: 4,
            t: 1,
            kv_len: KV_DECODE,
            dtype,
            params,
            kv_capacity: KV_DECODE + 26,
        });
    }
    let params = AttnParams {
        causal: true,
        ..AttnParams::new(96)
    };
    check(Case {
        d: 96,
        n_rep: 8,
        t: T_PREFILL,
        kv_len: KV_PREFILL,
        dtype: DType::F16,
        params,
        kv_capacity: 40,
    });
}

/// The reference twin against the model's plain attention with an equivalent additive mask.
#[test]
fn reference_matches_model_attention() {
    for (n_rep, causal, window, with_mask) in [
        (1, false, None, false),
        (4, true, None, true),
        (8, true, Some(4), false),
        (4, false, None, true),
    ] {
        let (d, h) = (64, N_KV * n_rep);
        let q = rand((2, h, T_PREFILL, d), DType::F32);
        let (k, v) = (
            rand((2, N_KV, KV_PREFILL, d), DType::F32),
            rand((2, N_KV, KV_PREFILL, d), DType::F32),
        );
        let m = with_mask.then(|| mask(T_PREFILL, KV_PREFILL));
        let p = AttnParams {
            causal,
            window,
            mask: m.clone(),
            ..AttnParams::new(d)
        };
        let mut add = vec![0f32; T_PREFILL * KV_PREFILL];
        let offset = KV_PREFILL - T_PREFILL;
        for i in 0..T_PREFILL {
            for key in 0..KV_PREFILL {
                let pos = offset + i;
                if (causal && key > pos) || window.is_some_and(|w| pos >= key + w) {
                    add[i * KV_PREFILL + key] = f32::NEG_INFINITY;
                }
            }
        }
        let mut full = Tensor::from_vec(add, (T_PREFILL, KV_PREFILL), &Device::Cpu).unwrap();
        if let Some(m) = &m {
            full = (full + m).unwrap();
        }
        let want = metal_candle::kernels::attend_reference(
            &q,
            &k,
            &v,
            Some(&full),
            p.scale as f64,
        )
        .unwrap();
        let got = flash_attention_reference(&q, &k, &v, &p).unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e = normalized_error(&f(&got), &f(&want));
        assert!(
            e < 1e-5,
            "n_rep={n_rep} causal={causal} window={window:?} mask={with_mask}: {e}"
        );
        // The dispatcher (candle path on the CPU) agrees too.
        let e = normalized_error(&f(&flash_attention(&q, &k, &v, &p).unwrap()), &f(&want));
        assert!(e < 1e-5, "dispatch: {e}");
    }
}

#[test]
fn unsupported_shapes_are_typed_errors() {
    let q = rand((1, 6, 3, 64), DType::F32);
    let k = rand((1, 4, 3, 64), DType::F32); // 6 heads over 4 KV heads
    let e = flash_attention(&q, &k, &k, &AttnParams::new(64)).unwrap_err();
    assert!(
        matches!(e, metal_candle::Error::UnsupportedKernel { .. }),
        "{e}"
    );
    let k = rand((1, 2, 3, 64), DType::F32);
    let p = AttnParams {
        mask: Some(Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap()),
        ..AttnParams::new(64)
    };
    assert!(matches!(
        flash_attention(&q, &k, &k, &p).unwrap_err(),
        metal_candle::Error::UnsupportedKernel { .. }
    ));
    let dims = AttnDims {
        b: 1,
        h: 2,
        n_kv: 1,
        t: 2,
        kv_len: 2,
        d: 72,
        q_offset: 0,
    };
    assert!(attn_plan(&dims, &AttnParams::new(72), ElemType::F32, (0, 0), (0, 0)).is_err());
}

// ---- NaN and ±Inf (issue 18): the kernels give their twin's verdict, element by element ----

const BAD: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `t` with element `at` (of its 4-d shape) set to `value`, in `t`'s dtype.
fn with_value(t: &Tensor, at: [usize; 4], value: f32) -> Tensor {
    let dims = t.dims4().unwrap();
    let mut v = host(t);
    v[((at[0] * dims.1 + at[1]) * dims.2 + at[2]) * dims.3 + at[3]] = value;
    Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap().to_dtype(t.dtype()).unwrap()
}

/// Same finite/non-finite pattern, and the finite values within the dtype's tolerance.
fn assert_same_verdict(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        assert_eq!(x.is_finite(), y.is_finite(), "{what}: element {i}: kernel {x}, twin {y}");
        assert_eq!(x.is_nan(), y.is_nan(), "{what}: element {i}: kernel {x}, twin {y}");
    }
    let (g, w): (Vec<f32>, Vec<f32>) = got.iter().zip(want).filter(|(x, _)| x.is_finite()).map(|(x, y)| (*x, *y)).unzip();
    if !g.is_empty() {
        let e = normalized_error(&g, &w);
        assert!(e < tol, "{what}: finite elements off by {e}");
    }
}

fn non_finite_cases(d: usize, t: usize, kv_len: usize) -> Vec<(&'static str, AttnParams)> {
    vec![
        ("plain", AttnParams { decode_keys_per_split: Some(DECODE_SPLIT), ..AttnParams::new(d) }),
        ("causal", AttnParams { causal: true, ..AttnParams::new(d) }),
        (
            "causal+window+mask",
            AttnParams { causal: true, window: Some(5), mask: Some(mask(t, kv_len)), decode_keys_per_split: Some(DECODE_SPLIT), ..AttnParams::new(d) },
        ),
        ("mask", AttnParams { mask: Some(mask(t, kv_len)), decode_keys_per_split: Some(DECODE_SPLIT), ..AttnParams::new(d) }),
    ]
}

/// One NaN/±Inf in q, in a key or in a value — visible to some rows and hidden (causal, window,
/// additive −∞) from others — through prefill and split decode: the kernel's output has exactly
/// the twin's non-finite elements, and the twin's agree with the CPU kernel's where both apply.
#[test]
fn non_finite_inputs_propagate_like_the_twin() {
    let d = 64;
    let n_rep = 2;
    let h = N_KV * n_rep;
    for (t, kv_len) in [(T_PREFILL, KV_PREFILL), (1, KV_DECODE)] {
        let q = rand((1, h, t, d), DType::F32);
        let k = rand((1, N_KV, kv_len, d), DType::F32);
        let v = rand((1, N_KV, kv_len, d), DType::F32);
        // Key kv_len−3: hidden from earlier queries by the causal mask; key 2: outside the window
        // of later ones; the mask() helper hides (i·kv_len + key) % 5 == 3.
        let spots = [(0usize, [0, 1, t - 1, 5]), (1, [0, 1, kv_len - 3, 0]), (1, [0, 0, 2, 9]), (2, [0, 1, kv_len - 3, 7]), (2, [0, 0, 3, 1])];
        for dtype in [DType::F32, DType::F16] {
            for (name, p) in non_finite_cases(d, t, kv_len) {
                for (which, at) in spots {
                    for bad in BAD {
                        let mut qkv = [q.clone(), k.clone(), v.clone()];
                        qkv[which] = with_value(&qkv[which], at, bad);
                        let [q, k, v] = qkv.map(|x| x.to_dtype(dtype).unwrap());
                        let got = emulate(&q, &k, &v, &p, kv_len);
                        let want = reference(&q, &k, &v, &p);
                        let what = format!("t={t} {dtype:?} {name}: {bad} in {} at {at:?}", ["q", "k", "v"][which]);
                        assert_same_verdict(&got, &want, tolerance(dtype), &what);
                        // A NaN that some row sees reaches the output (a −∞ key may only weigh 0).
                        let seen_by_some_row = which != 2 || p.mask.is_none() || t > 1;
                        if bad.is_nan() && !p.causal && p.window.is_none() && seen_by_some_row {
                            assert!(want.iter().any(|x| x.is_nan()), "{what}: nothing propagated");
                        }
                        if dtype == DType::F32 && !p.causal && p.window.is_none() {
                            // The CPU kernel takes the same additive mask (−∞ hides).
                            let cpu = metal_candle::kernels::cpu::cpu_attention(&q, &k, &v, p.mask.as_ref(), p.scale).unwrap();
                            assert_same_verdict(&host(&cpu), &want, 1e-5, &format!("{what} (CPU kernel)"));
                        }
                    }
                }
            }
        }
    }
}

/// Scores of −∞ (a key of −∞ against a positive query): keys seen before the first finite score,
/// a whole decode split of them, and rows whose every visible score is −∞ (NaN, like
/// softmax(−∞…)), next to a row that sees no key at all (zeros).
#[test]
fn minus_infinite_scores_and_fully_hidden_rows() {
    let d = 64;
    let kv_len = KV_DECODE;
    let q = Tensor::ones((1, N_KV, 1, d), DType::F32, &Device::Cpu).unwrap();
    let v = rand((1, N_KV, kv_len, d), DType::F32);
    // Head 0: keys 0..40 score −∞, the rest finite (finite output). Head 1: every key −∞ (NaN).
    let kv: Vec<f32> = (0..N_KV * kv_len * d)
        .map(|i| {
            let (g, key) = (i / (kv_len * d), i / d % kv_len);
            if g == 1 || key < 40 { f32::NEG_INFINITY } else { ((i * 37 % 101) as f32 - 50.0) / 50.0 }
        })
        .collect();
    let k = Tensor::from_vec(kv, (1, N_KV, kv_len, d), &Device::Cpu).unwrap();
    for p in [AttnParams { decode_keys_per_split: Some(DECODE_SPLIT), ..AttnParams::new(d) }, AttnParams::new(d)] {
        let got = emulate(&q, &k, &v, &p, kv_len);
        let want = reference(&q, &k, &v, &p);
        assert!(want[..d].iter().all(|x| x.is_finite()), "head 0 is finite in the twin");
        assert!(want[d..].iter().all(|x| x.is_nan()), "head 1 is NaN in the twin");
        assert_same_verdict(&got, &want, 1e-5, &format!("split {:?}", p.decode_keys_per_split));
        let plain = host(&metal_candle::kernels::attend_reference(&q, &k, &v, None, p.scale as f64).unwrap());
        assert_same_verdict(&want, &plain, 1e-5, "twin vs plain softmax");
    }
    // A row whose keys are all hidden by the additive mask: zeros on every path.
    let q = rand((1, N_KV, 2, d), DType::F32);
    let k = rand((1, N_KV, KV_PREFILL, d), DType::F32);
    let v = rand((1, N_KV, KV_PREFILL, d), DType::F32);
    let m: Vec<f32> = (0..2 * KV_PREFILL).map(|i| if i < KV_PREFILL { f32::NEG_INFINITY } else { 0.0 }).collect();
    let p = AttnParams { mask: Some(Tensor::from_vec(m, (2, KV_PREFILL), &Device::Cpu).unwrap()), ..AttnParams::new(d) };
    let got = emulate(&q, &k, &v, &p, KV_PREFILL);
    let want = reference(&q, &k, &v, &p);
    for head in 0..N_KV {
        assert!(want[head * 2 * d..][..d].iter().all(|x| *x == 0.0), "hidden row: zeros");
    }
    assert_same_verdict(&got, &want, 1e-5, "fully hidden row");
    let cpu = metal_candle::kernels::cpu::cpu_attention(&q, &k, &v, p.mask.as_ref(), p.scale).unwrap();
    assert_same_verdict(&host(&cpu), &want, 1e-5, "fully hidden row (CPU kernel)");
}
