//! Kernel names, built by one typed function: `<family>_<variant>_<weight type>_<activation
//! type>[_d<head dim>]` (e.g. `qmatmul_mv_q4_k_f16`, `attn_prefill_bf16_bf16_d128`). The `.metal`
//! files instantiate exactly these names through their X-macro lists.

use std::fmt;

/// A kernel family: one `.metal` file each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// metal/qmatmul.metal
    Qmatmul,
    /// metal/attention.metal
    Attn,
}

/// The variant inside a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Quantized mat-vec (decode, few rows).
    Mv,
    /// Quantized mat-mat (prefill).
    Mm,
    /// LoRA shrink `t = A·x` (f32 output).
    Shrink,
    /// Flash attention over many queries.
    Prefill,
    /// Flash attention for one query, split over the keys.
    Decode,
    /// Merge of the decode splits.
    Reduce,
}

/// Element types of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// GGML Q4_0 blocks (32 values, 18 bytes).
    Q4_0,
    /// GGML Q8_0 blocks (32 values, 34 bytes).
    Q8_0,
    /// GGML Q4_K blocks (256 values, 144 bytes).
    Q4K,
    /// GGML Q6_K blocks (256 values, 210 bytes).
    Q6K,
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl ElemType {
    /// The token used in kernel names.
    pub fn token(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    /// The float element type of a candle dtype, if it is one the kernels take.
    pub fn from_float_dtype(dtype: candle_core::DType) -> Option<Self> {
        match dtype {
            candle_core::DType::F32 => Some(Self::F32),
            candle_core::DType::F16 => Some(Self::F16),
            candle_core::DType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }
}

/// A kernel's name as its parts; `Display` gives the MSL function name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelName {
    /// The `.metal` file the kernel is in.
    pub family: Family,
    /// Which kernel of the family.
    pub variant: Variant,
    /// The weight element type (attention: the K/V type, or F32 for the split reduce).
    pub weight: ElemType,
    /// The activation element type.
    pub act: ElemType,
    /// The head dim attention kernels are instantiated for; `None` for qmatmul.
    pub head_dim: Option<usize>,
}

/// Builds a kernel name (the only place names are spelled).
pub fn kernel_name(
    family: Family,
    variant: Variant,
    weight: ElemType,
    act: ElemType,
    head_dim: Option<usize>,
) -> KernelName {
    KernelName {
        family,
        variant,
        weight,
        act,
        head_dim,
    }
}

impl fmt::Display for KernelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family {
            Family::Qmatmul => "qmatmul",
            Family::Attn => "attn",
        };
        let variant = match self.variant {
            Variant::Mv => "mv",
            Variant::Mm => "mm",
            Variant::Shrink => "shrink",
            Variant::Prefill => "prefill",
            Variant::Decode => "decode",
            Variant::Reduce => "reduce",
        };
        write!(
            f,
            "{family}_{variant}_{}_{}",
            self.weight.token(),
            self.act.token()
        )?;
        if let Some(d) = self.head_dim {
            write!(f, "_d{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_scheme() {
        let n = kernel_name(
            Family::Qmatmul,
            Variant::Mv,
            ElemType::Q4K,
            ElemType::F16,
            None,
        );
        assert_eq!(n.to_string(), "qmatmul_mv_q4_k_f16");
        let n = kernel_name(
            Family::Attn,
            Variant::Prefill,
            ElemType::BF16,
            ElemType::BF16,
            Some(128),
        );
        assert_eq!(n.to_string(), "attn_prefill_bf16_bf16_d128");
    }
}
