//! GGML block layouts the kernels read, dequantized by the shared reference in
//! [`super::cpu::blocks`].
//! Layouts (ggml-common.h): Q4_0 `{f16 d; u8 qs[16]}`, Q8_0 `{f16 d; i8 qs[32]}`,
//! Q4_K `{f16 d, dmin; u8 scales[12]; u8 qs[128]}`, Q6_K `{u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}`.

use candle_core::quantized::GgmlDType;

use super::cpu::CpuQuant;
use super::names::ElemType;

/// Weight quantizations the custom qmatmul kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// GGML Q4_0: 32 values per 18-byte block.
    Q4_0,
    /// GGML Q8_0: 32 values per 34-byte block.
    Q8_0,
    /// GGML Q4_K: 256 values per 144-byte block.
    Q4K,
    /// GGML Q6_K: 256 values per 210-byte block.
    Q6K,
}

/// The quant types the kernels take, for error messages.
pub const SUPPORTED_QUANTS: &str = "Q4_0, Q8_0, Q4_K, Q6_K";

impl QuantType {
    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// The kernel-name element type.
    pub fn elem(self) -> ElemType {
        match self {
            Self::Q4_0 => ElemType::Q4_0,
            Self::Q8_0 => ElemType::Q8_0,
            Self::Q4K => ElemType::Q4K,
            Self::Q6K => ElemType::Q6K,
        }
    }

    /// The matching candle dtype.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// The same layout as a CPU kernel type.
    pub fn cpu(self) -> CpuQuant {
        match self {
            Self::Q4_0 => CpuQuant::Q4_0,
            Self::Q8_0 => CpuQuant::Q8_0,
            Self::Q4K => CpuQuant::Q4K,
            Self::Q6K => CpuQuant::Q6K,
        }
    }

    /// The quant type of a candle dtype, if the kernels take it.
    pub fn from_ggml(d: GgmlDType) -> Option<Self> {
        match d {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }
}

/// Dequantizes one row: `row` holds `out.len() / block_values` blocks (the shared reference
/// dequantizer of [`super::cpu::blocks`]).
pub fn dequantize_row(qt: QuantType, row: &[u8], out: &mut [f32]) {
    super::cpu::blocks::dequantize_row(qt.cpu(), row, out)
}
