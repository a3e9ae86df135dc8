//! Kernel benches: our custom kernels (Metal, and the CPU quantized matmul), candle's built-ins and the reference twins,
//! for a decode-shaped and a prefill-shaped quantized matmul and attention. On Linux this measures
//! the candle CPU paths and the references; with `--features metal` on a Mac, the dispatch
//! functions take the custom kernels. The device is synchronised inside each timed iteration.
//! Memory-bound cases report throughput in bytes of weights (or K/V) read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metal_candle::kernels::{
    flash_attention, flash_attention_reference, qmatmul, qmatmul_reference,
};
use metal_candle::kernels::cpu::cpu_attention;
use metal_candle::kernels::{AttnParams, QWeight, QuantType};
use metal_candle::kernels::attend_reference;

/// A Qwen2.5-0.5B-sized projection (hidden 896 → 4864).
const QM_N: usize = 4864;
const QM_K: usize = 896;
const PREFILL_ROWS: usize = 64;
/// Attention: 14 heads over 2 KV heads, head dim 64.
const HEADS: usize = 14;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const KV_LEN: usize = 1024;

fn device() -> Device {
    #[cfg(feature = "metal")]
    if let Ok(d) = Device::new_metal(0) {
        return d;
    }
    Device::Cpu
}

fn timed(dev: &Device, iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().ok();
    start.elapsed()
}

fn bench_qmatmul(c: &mut Criterion) {
    let dev = device();
    let mut g = c.benchmark_group("qmatmul");
    g.sample_size(10);
    for quant in [QuantType::Q4_0, QuantType::Q8_0] {
        let Ok(w) = Tensor::randn(0f32, 1.0, (QM_N, QM_K), &dev) else {
            return;
        };
        let Ok(qt) = QTensor::quantize(&w, quant.ggml()) else {
            return;
        };
        let bytes = qt.storage_size_in_bytes() as u64;
        let qt = Arc::new(qt);
        let Ok(ours) = QWeight::from_qtensor(qt.clone()) else {
            return;
        };
        let Ok(builtin) = QMatMul::from_arc(qt) else {
            return;
        };
        for rows in [1, PREFILL_ROWS] {
            let Ok(x) = Tensor::randn(0f32, 1.0, (rows, QM_K), &dev) else {
                return;
            };
            g.throughput(Throughput::Bytes(bytes));
            let id = format!("{quant:?}/rows{rows}");
            g.bench_function(format!("dispatch/{id}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(qmatmul(&x, &ours, None))))
            });
            g.bench_function(format!("candle/{id}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(builtin.forward(&x))))
            });
            if rows == 1 {
                g.bench_function(format!("reference/{id}"), |b| {
                    b.iter_custom(|n| timed(&dev, n, || drop(qmatmul_reference(&x, &ours, None))))
                });
            }
        }
    }
    g.finish();
}

/// Our CPU kernels (src/kernels/cpu) against candle's CPU quantized matmul, every type, decode
/// (1 row) and prefill (64 rows) shapes; throughput in weight bytes. F16 compares with candle's
/// path for F16 files (weights widened to F32 at load, then an F32 matmul).
fn bench_cpu_qmatmul(c: &mut Criterion) {
    use metal_candle::kernels::cpu::{cpu_backend, cpu_matmul, CpuQuant, CpuWeight};
    let dev = Device::Cpu;
    let mut g = c.benchmark_group(format!("cpu_qmatmul/{:?}", cpu_backend()));
    g.sample_size(10);
    for quant in CpuQuant::ALL {
        let Ok(w) = Tensor::randn(0f32, 1.0, (QM_N, QM_K), &dev) else { return };
        let Ok(qt) = QTensor::quantize(&w, quant.ggml()) else { return };
        let Ok(ours) = CpuWeight::from_qtensor(&qt) else { return };
        g.throughput(Throughput::Bytes(ours.bytes() as u64));
        let builtin = match quant {
            CpuQuant::F16 => QMatMul::Tensor(w.clone()),
            _ => match QMatMul::from_qtensor(qt) {
                Ok(q) => q,
                Err(_) => return,
            },
        };
        for rows in [1, PREFILL_ROWS] {
            let Ok(x) = Tensor::randn(0f32, 1.0, (rows, QM_K), &dev) else { return };
            let id = format!("{quant:?}/rows{rows}");
            g.bench_function(format!("ours/{id}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(cpu_matmul(&x, &[&ours]))))
            });
            g.bench_function(format!("candle/{id}"), |b| {
                b.iter_custom(|n| timed(&dev, n, || drop(builtin.forward(&x))))
            });
        }
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let dev = device();
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    for t in [1, 128] {
        let mk = |h, len| {
            Tensor::randn(0f32, 1.0, (1, h, len, HEAD_DIM), &dev)
                .and_then(|x| x.to_dtype(DType::F32))
        };
        let (Ok(q), Ok(k), Ok(v)) = (mk(HEADS, t), mk(KV_HEADS, KV_LEN), mk(KV_HEADS, KV_LEN))
        else {
            return;
        };
        let p = AttnParams {
            causal: true,
            ..AttnParams::new(HEAD_DIM)
        };
        g.throughput(Throughput::Bytes(
            (2 * KV_HEADS * KV_LEN * HEAD_DIM * 4) as u64,
        ));
        g.bench_function(format!("dispatch/t{t}"), |b| {
            b.iter_custom(|n| timed(&dev, n, || drop(flash_attention(&q, &k, &v, &p))))
        });
        g.bench_function(format!("reference/t{t}"), |b| {
            b.iter_custom(|n| timed(&dev, n, || drop(flash_attention_reference(&q, &k, &v, &p))))
        });
    }
    g.finish();
}

/// The model's CPU attention against candle's ops (its twin) on the cache layout: K/V the first
/// `len` positions of a larger buffer, decode and a causal 128-token prefill, by context length.
fn bench_cpu_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_attention");
    g.sample_size(10);
    let dev = Device::Cpu;
    for (t, len) in [(1, 128), (1, 512), (1, 2048), (128, 128), (128, 512)] {
        let mk = |h, len| Tensor::randn(0f32, 1.0, (1, h, len, HEAD_DIM), &dev);
        let (Ok(q), Ok(kb), Ok(vb)) = (mk(HEADS, t), mk(KV_HEADS, len + 64), mk(KV_HEADS, len + 64)) else {
            return;
        };
        let (Ok(k), Ok(v)) = (kb.narrow(2, 0, len), vb.narrow(2, 0, len)) else { return };
        let mask = (t > 1).then(|| causal_mask(t, len)).flatten();
        let scale = 1.0 / (HEAD_DIM as f64).sqrt();
        g.throughput(Throughput::Bytes((2 * KV_HEADS * len * HEAD_DIM * 4) as u64));
        g.bench_function(format!("ours/t{t}/kv{len}"), |b| {
            b.iter(|| drop(cpu_attention(&q, &k, &v, mask.as_ref(), scale as f32)))
        });
        g.bench_function(format!("candle/t{t}/kv{len}"), |b| {
            b.iter(|| drop(attend_reference(&q, &k, &v, mask.as_ref(), scale)))
        });
    }
    g.finish();
}

/// (t, len) additive mask: query i (at position len − t + i) sees keys ≤ its position.
fn causal_mask(t: usize, len: usize) -> Option<Tensor> {
    let m: Vec<f32> = (0..t * len)
        .map(|e| if e % len > len - t + e / len { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    Tensor::from_vec(m, (t, len), &Device::Cpu).ok()
}

criterion_group!(benches, bench_qmatmul, bench_cpu_qmatmul, bench_attention, bench_cpu_attention);
criterion_main!(benches);
