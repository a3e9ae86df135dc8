//! GGML block layouts the kernels read, and a plain Rust dequantizer for the reference twin.
//! Layouts (ggml-common.h): Q4_0 {f16 d; u8 qs[16]}, Q8_0 {f16 d; i8 qs[32]},
//! Q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}, Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::names::ElemType;

/// Weight quantizations the custom qmatmul kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q4_0,
    Q8_0,
    Q4K,
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

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes one row: `row` holds `out.len() / block_values` blocks.
pub fn dequantize_row(qt: QuantType, row: &[u8], out: &mut [f32]) {
    let (bv, bb) = (qt.block_values(), qt.block_bytes());
    for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        match qt {
            QuantType::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    o[j] = d * ((blk[2 + j] & 15) as f32 - 8.0);
                    o[j + 16] = d * ((blk[2 + j] >> 4) as f32 - 8.0);
                }
            }
            QuantType::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    o[j] = d * (blk[2 + j] as i8) as f32;
                }
            }
            QuantType::Q4K => dequant_q4k(blk, o),
            QuantType::Q6K => dequant_q6k(blk, o),
        }
    }
}

/// 6-bit scale and min of sub-block `j` (ggml `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((s[j] & 63) as f32, (s[j + 4] & 63) as f32)
    } else {
        (
            ((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4)) as f32,
            ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f32,
        )
    }
}

fn dequant_q4k(blk: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let (scales, qs) = (&blk[4..16], &blk[16..144]);
    for g in 0..4 {
        let (s1, m1) = scale_min_k4(2 * g, scales);
        let (s2, m2) = scale_min_k4(2 * g + 1, scales);
        for l in 0..32 {
            let q = qs[32 * g + l];
            o[64 * g + l] = d * s1 * (q & 15) as f32 - dmin * m1;
            o[64 * g + 32 + l] = d * s2 * (q >> 4) as f32 - dmin * m2;
        }
    }
}

fn dequant_q6k(blk: &[u8], o: &mut [f32]) {
    let d = f16_at(blk, 208);
    for half_ in 0..2 {
        let ql = &blk[64 * half_..64 * half_ + 64];
        let qh = &blk[128 + 32 * half_..128 + 32 * half_ + 32];
        let sc = &blk[192 + 8 * half_..192 + 8 * half_ + 8];
        let y = &mut o[128 * half_..128 * half_ + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
