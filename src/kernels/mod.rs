//! Custom kernels (issue 6): Metal kernels with plain Rust reference twins.
//!
//! Two op families, each a candle `CustomOp` whose `metal_fwd` runs our MSL kernels
//! (`metal/*.metal`, feature `metal`) and whose `cpu_fwd` is the reference twin accumulating in
//! f32; one dispatch function per op picks the custom kernel, candle's built-in path or the
//! reference:
//!
//! - [`qmatmul`]: GGML-quantized (Q4_0, Q8_0, Q4_K, Q6_K) `x · Wᵀ` with F32/F16/BF16 activations and
//!   an optional fused multi-adapter LoRA epilogue ([`LoraBatch`], one adapter id per row);
//! - [`flash_attention`]: causal / sliding-window / masked attention with GQA, prefill and
//!   split-K decode.
//!
//! The kernels are verified on Linux by an MSL host-emulation harness (`tests/msl_harness`) and
//! type-checked for aarch64-apple-darwin; they have not yet run on Apple hardware. See
//! docs/KERNELS.md.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use metal_candle::kernels::{flash_attention, AttnParams};
//! # fn main() -> metal_candle::Result<()> {
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1.0, (1, 8, 5, 64), &dev)?; // (b, h, t, d)
//! let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 64), &dev)?; // (b, n_kv, kv_len, d)
//! let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 64), &dev)?;
//! let y = flash_attention(&q, &k, &v, &AttnParams { causal: true, ..AttnParams::new(64) })?;
//! assert_eq!(y.dims(), &[1, 8, 5, 64]);
//! # Ok(()) }
//! ```

pub mod abi;
pub mod attention;
pub mod cpu;
#[cfg(feature = "metal")]
mod metal;
pub mod names;
pub mod qmatmul;
pub mod quant;

pub use attention::{
    flash_attention, flash_attention_reference, AttnBackend, AttnParams, FlashAttention,
};
pub use names::{kernel_name, ElemType, KernelName};
pub use qmatmul::{
    qmatmul, qmatmul_reference, LoraBatch, QMatMulOp, QMatmulBackend, QWeight, NO_ADAPTER,
};
pub use quant::QuantType;

/// Environment variable that routes the model's attention through the custom Metal kernels.
pub const CUSTOM_KERNELS_ENV: &str = "METAL_CANDLE_CUSTOM_KERNELS";

/// Whether the models use the custom Metal kernels instead of candle's built-ins. Off unless
/// `METAL_CANDLE_CUSTOM_KERNELS=1`: the kernels pass their emulated tests but have not yet run on
/// Apple hardware, so candle's tested Metal ops stay the default until they have.
pub fn custom_kernels_enabled() -> bool {
    std::env::var(CUSTOM_KERNELS_ENV).is_ok_and(|v| v == "1")
}
