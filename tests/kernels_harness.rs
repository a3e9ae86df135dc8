//! Tests of the MSL host-emulation harness's own semantics: barriers, SIMD-group collectives,
//! simdgroup matrices, half/bfloat rounding, deadlock reporting.

#[path = "msl_harness/mod.rs"]
mod msl_harness;

use msl_harness::{harness, Buf, Family, Launch};

const TG_THREADS: u32 = 96; // three SIMD groups
const N_TG: u32 = 3;

fn inputs(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25)
        .collect()
}

fn run_barrier(use_barrier: bool) -> (Vec<f32>, Vec<f32>) {
    let n = (TG_THREADS * N_TG) as usize;
    let x = inputs(n);
    let (mut inp, mut out) = (Buf::from_pod(&x), Buf::zeros(4 * n));
    let launch = Launch {
        grid: [N_TG, 1, 1],
        threadgroup: [TG_THREADS, 1, 1],
        tg_mem_bytes: vec![4 * TG_THREADS as usize],
        constants: vec![use_barrier],
    };
    harness()
        .run(
            Family::Selftest,
            "selftest_barrier",
            &mut [&mut inp, &mut out],
            &launch,
        )
        .unwrap();
    let t = TG_THREADS as usize;
    let want = (0..n)
        .map(|i| 2.0 * x[(i / t) * t + (i % t + 1) % t])
        .collect();
    (out.to_f32(), want)
}

#[test]
fn barrier_orders_threadgroup_memory() {
    let (got, want) = run_barrier(true);
    assert_eq!(got, want);
}

#[test]
fn missing_barrier_is_a_visible_race() {
    // Without the barrier each fiber runs to completion before its neighbour writes: the read
    // sees the NaN fill, as a racing GPU kernel would see garbage.
    let (got, want) = run_barrier(false);
    assert_ne!(got, want);
    assert!(got.iter().any(|v| v.is_nan()));
}

#[test]
fn simd_collectives_and_threadgroup_reduction() {
    let threads = 80u32; // 32 + 32 + a partial SIMD group of 16
    let n = (threads * 2) as usize;
    let x = inputs(n);
    let (mut inp, mut out, mut sums) =
        (Buf::from_pod(&x), Buf::zeros(4 * 6 * n), Buf::zeros(4 * 2));
    let launch = Launch {
        grid: [2, 1, 1],
        threadgroup: [threads, 1, 1],
        tg_mem_bytes: vec![4 * 4],
        constants: vec![],
    };
    harness()
        .run(
            Family::Selftest,
            "selftest_simd",
            &mut [&mut inp, &mut out, &mut sums],
            &launch,
        )
        .unwrap();
    let got = out.to_f32();
    for tg in 0..2usize {
        let base = tg * threads as usize;
        for sg in 0..3usize {
            let lo = base + sg * 32;
            let w = (threads as usize - sg * 32).min(32);
            let lanes = &x[lo..lo + w];
            let sum: f32 = lanes.iter().sum();
            let max = lanes.iter().cloned().fold(f32::MIN, f32::max);
            for l in 0..w {
                let o = &got[(lo + l) * 6..(lo + l) * 6 + 6];
                assert!((o[0] - sum).abs() < 1e-4, "simd_sum");
                assert_eq!(o[1], max, "simd_max");
                if w == 32 {
                    assert!((o[2] - sum).abs() < 1e-4, "shuffle_xor butterfly");
                }
                let src = (l + 3) % 32;
                assert_eq!(
                    o[3],
                    if src < w { lanes[src] } else { lanes[l] },
                    "simd_shuffle"
                );
                assert_eq!(o[4], lanes[5], "simd_broadcast");
                assert_eq!(
                    o[5],
                    if l + 1 < w { lanes[l + 1] } else { lanes[l] },
                    "simd_shuffle_down"
                );
            }
        }
        let total: f32 = x[base..base + threads as usize].iter().sum();
        assert!(
            (sums.to_f32()[tg] - total).abs() < 1e-3,
            "threadgroup reduction"
        );
    }
}

#[test]
fn simdgroup_matrix_multiply_8x8_blocks() {
    let h = harness();
    let a: Vec<f32> = (0..128)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.5)
        .collect(); // (16, 8)
    let b: Vec<f32> = (0..128)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.25)
        .collect(); // (8, 16)
    let ah: Vec<u16> = a.iter().map(|&v| h.f32_to_f16(v)).collect();
    let bh: Vec<u16> = b.iter().map(|&v| h.f32_to_f16(v)).collect();
    let (mut ba, mut bb, mut bc) = (Buf::from_pod(&a), Buf::from_pod(&b), Buf::zeros(4 * 256));
    let (mut bah, mut bbh, mut bch) = (Buf::from_pod(&ah), Buf::from_pod(&bh), Buf::zeros(2 * 256));
    let launch = Launch {
        grid: [1, 1, 1],
        threadgroup: [128, 1, 1],
        ..Default::default()
    };
    h.run(
        Family::Selftest,
        "selftest_simdgroup_matmul",
        &mut [&mut ba, &mut bb, &mut bc, &mut bah, &mut bbh, &mut bch],
        &launch,
    )
    .unwrap();
    let (c, ch) = (bc.to_f32(), bch.to_u16());
    for i in 0..16 {
        for j in 0..16 {
            let want: f32 = (0..8).map(|k| a[i * 8 + k] * b[k * 16 + j]).sum();
            assert!((c[i * 16 + j] - want).abs() < 1e-5, "f32 ({i},{j})");
            assert!(
                (h.f16_to_f32(ch[i * 16 + j]) - want).abs() <= want.abs() * 1e-3 + 1e-3,
                "f16 ({i},{j})"
            );
        }
    }
}

#[test]
fn divergent_barrier_is_reported_not_hung() {
    let mut out = Buf::zeros(4);
    let launch = Launch {
        grid: [1, 1, 1],
        threadgroup: [64, 1, 1],
        ..Default::default()
    };
    let err = harness()
        .run(
            Family::Selftest,
            "selftest_divergent_barrier",
            &mut [&mut out],
            &launch,
        )
        .unwrap_err();
    assert!(err.contains("deadlock"), "{err}");
}

#[test]
fn unknown_kernel_is_an_error() {
    let launch = Launch {
        grid: [1, 1, 1],
        threadgroup: [32, 1, 1],
        ..Default::default()
    };
    assert!(harness()
        .run(Family::Selftest, "no_such_kernel", &mut [], &launch)
        .is_err());
}

#[test]
fn half_and_bfloat_round_to_nearest_even() {
    let h = harness();
    let mut bits = 0u32;
    // Every 2^12-th f32 bit pattern plus edge cases: subnormals, ties, overflow, NaN, inf.
    let mut vals: Vec<f32> = Vec::new();
    while let Some(next) = bits.checked_add(4093) {
        vals.push(f32::from_bits(bits));
        bits = next;
    }
    vals.extend([
        65504.0,
        65519.99,
        65520.0,
        5.960_464_5e-8,
        2.980_232_2e-8,
        2.980_233e-8,
        1.0 + 1.0 / 2048.0,
        f32::INFINITY,
    ]);
    for v in vals {
        let want = half::f16::from_f32(v);
        let got = h.f32_to_f16(v);
        if v.is_nan() {
            assert!(half::f16::from_bits(got).is_nan());
            continue;
        }
        assert_eq!(got, want.to_bits(), "f16 of {v:e} ({:#x})", v.to_bits());
        assert_eq!(h.f16_to_f32(got).to_bits(), want.to_f32().to_bits());
        let wb = half::bf16::from_f32(v);
        assert_eq!(h.f32_to_bf16(v), wb.to_bits(), "bf16 of {v:e}");
    }
}
