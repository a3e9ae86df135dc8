//! metal-candle's own kernels: Metal kernels with plain Rust reference twins, the CPU kernels
//! ([`cpu`]), and the one attention dispatcher ([`attend`]).
//!
//! Two op families, each a candle `CustomOp` whose `metal_fwd` runs our MSL kernels
//! (`metal/*.metal`, feature `metal`) and whose `cpu_fwd` is the reference twin accumulating in
//! f32; one dispatch function per op picks the custom kernel, candle's built-in path or the
//! reference:
//!
//! - [`qmatmul`](fn@qmatmul): GGML-quantized (Q4_0, Q8_0, Q4_K, Q6_K) `x · Wᵀ` with F32/F16/BF16 activations and
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
    attend, attend_reference, flash_attention, flash_attention_reference, AttnBackend, AttnParams, FlashAttention,
};
pub use names::{kernel_name, ElemType, KernelName};
pub use qmatmul::{
    qmatmul, qmatmul_reference, LoraBatch, QMatMulOp, QMatmulBackend, QWeight, NO_ADAPTER,
};
pub use quant::QuantType;

/// Which of metal-candle's own kernels a model uses, decided once at load
/// ([`crate::LoadOptions::kernels`]) and stored on the model: nothing in a forward pass reads the
/// environment. The CLI maps `METAL_CANDLE_CPU_KERNELS` / `METAL_CANDLE_CUSTOM_KERNELS` onto it
/// ([`KernelPolicy::from_switches`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Our CPU kernels: quantized/F16 matmul on x86 CPUs with AVX2 + FMA + F16C, and attention on
    /// the CPU in f32 (portable). On by default.
    pub cpu: bool,
    /// Our Metal kernels (quantized matmul, flash attention). Off by default: they pass their
    /// emulated tests but have not yet run on Apple hardware, so candle's tested Metal ops stay
    /// the default until they have.
    pub metal: bool,
}

impl Default for KernelPolicy {
    fn default() -> Self {
        Self { cpu: true, metal: false }
    }
}

impl KernelPolicy {
    /// candle's kernels and ops everywhere (the baseline for comparisons).
    pub const CANDLE: KernelPolicy = KernelPolicy { cpu: false, metal: false };

    /// The policy the switches ask for: `cpu` is the value of `METAL_CANDLE_CPU_KERNELS` (`0`
    /// turns our CPU kernels off), `metal` that of `METAL_CANDLE_CUSTOM_KERNELS` (`1` turns our
    /// Metal kernels on); `None` is an unset variable.
    pub fn from_switches(cpu: Option<&str>, metal: Option<&str>) -> Self {
        Self { cpu: cpu != Some("0"), metal: metal == Some("1") }
    }
}

/// Environment variable the CLI reads for [`KernelPolicy::metal`].
pub const CUSTOM_KERNELS_ENV: &str = "METAL_CANDLE_CUSTOM_KERNELS";
