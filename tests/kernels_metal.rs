//! The kernels on a real Apple GPU (feature `metal`, macOS): the same cases as the emulated tests,
//! through the public dispatch functions, compared with the reference twins. Not yet run on Apple
//! hardware (see docs/KERNELS.md); type-checked in CI for aarch64-apple-darwin.
#![cfg(feature = "metal")]

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use metal_candle::kernels::abi::ATTN_HEAD_DIMS;
use metal_candle::kernels::{
    flash_attention, flash_attention_reference, qmatmul, qmatmul_reference,
};
use metal_candle::kernels::{AttnParams, LoraBatch, QWeight, QuantType, NO_ADAPTER};

const QUANTS: [QuantType; 4] = [
    QuantType::Q4_0,
    QuantType::Q8_0,
    QuantType::Q4K,
    QuantType::Q6K,
];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4, // fast-math exp on the GPU
        DType::F16 => 3e-3,
        _ => 1.5e-2,
    }
}

fn nerr(a: &Tensor, b: &Tensor) -> f32 {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (f(a), f(b));
    let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-24)).sqrt()
}

fn metal() -> Option<Device> {
    Device::new_metal(0).ok()
}

#[test]
fn qmatmul_on_gpu_matches_reference() {
    let Some(dev) = metal() else {
        return eprintln!("SKIPPED: no Metal device");
    };
    for q in QUANTS {
        let k = if q.block_values() == 256 { 512 } else { 96 };
        let n = 37;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let w = QWeight::from_qtensor(Arc::new(QTensor::quantize(&w, q.ggml()).unwrap())).unwrap();
        for dtype in DTYPES {
            for m in [3, 41] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let ids: Vec<u32> = (0..m).map(|i| [0, NO_ADAPTER, 2, 1][i % 4]).collect();
                let lora = LoraBatch {
                    a: (Tensor::randn(0f32, 0.2, (3, 5, k), &dev).unwrap())
                        .to_dtype(dtype)
                        .unwrap(),
                    b: (Tensor::randn(0f32, 0.2, (3, n, 5), &dev).unwrap())
                        .to_dtype(dtype)
                        .unwrap(),
                    scales: Tensor::new(&[0.5f32, 1.0, 2.0], &dev).unwrap(),
                    ids: Tensor::new(ids.as_slice(), &dev).unwrap(),
                };
                for l in [None, Some(&lora)] {
                    let e = nerr(
                        &qmatmul(&x, &w, l).unwrap(),
                        &qmatmul_reference(&x, &w, l).unwrap(),
                    );
                    assert!(
                        e < tolerance(dtype),
                        "{q:?} {dtype:?} m={m} lora={}: {e}",
                        l.is_some()
                    );
                }
            }
        }
    }
}

#[test]
fn flash_attention_on_gpu_matches_reference() {
    let Some(dev) = metal() else {
        return eprintln!("SKIPPED: no Metal device");
    };
    for d in ATTN_HEAD_DIMS {
        for dtype in DTYPES {
            for n_rep in [1, 4, 8] {
                for (t, kv) in [(7, 19), (1, 300)] {
                    let q = Tensor::randn(0f32, 1.0, (1, 2 * n_rep, t, d), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let k = Tensor::randn(0f32, 1.0, (1, 2, kv, d), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let v = Tensor::randn(0f32, 1.0, (1, 2, kv, d), &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let mask = Tensor::randn(0f32, 0.5, (t, kv), &dev).unwrap();
                    for p in [
                        AttnParams {
                            causal: true,
                            ..AttnParams::new(d)
                        },
                        AttnParams {
                            causal: true,
                            window: Some(5),
                            mask: Some(mask.clone()),
                            ..AttnParams::new(d)
                        },
                        AttnParams {
                            mask: Some(mask.clone()),
                            decode_keys_per_split: Some(64),
                            ..AttnParams::new(d)
                        },
                    ] {
                        let got = flash_attention(&q, &k, &v, &p).unwrap();
                        let want = flash_attention_reference(&q, &k, &v, &p).unwrap();
                        let e = nerr(&got, &want);
                        assert!(
                            e < tolerance(dtype),
                            "d={d} {dtype:?} n_rep={n_rep} t={t}: {e}"
                        );
                    }
                }
            }
        }
    }
}
