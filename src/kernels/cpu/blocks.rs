//! GGML weight layouts the CPU kernels read (ggml-common.h), and the plain dequantizer every
//! kernel — CPU and Metal — is checked against.
//!
//! | type | block | bytes | layout                                         | value            |
//! |------|-------|-------|------------------------------------------------|------------------|
//! | Q4_0 | 32    | 18    | `f16 d; u8 qs[16]`                             | d·(q − 8)        |
//! | Q4_1 | 32    | 20    | `f16 d, m; u8 qs[16]`                          | d·q + m          |
//! | Q5_0 | 32    | 22    | `f16 d; u32 qh; u8 qs[16]`                     | d·(q − 16)       |
//! | Q5_1 | 32    | 24    | `f16 d, m; u32 qh; u8 qs[16]`                  | d·q + m          |
//! | Q8_0 | 32    | 34    | `f16 d; i8 qs[32]`                             | d·q              |
//! | Q4_K | 256   | 144   | `f16 d, dmin; u8 scales[12]; u8 qs[128]`       | d·sc·q − dmin·mn |
//! | Q6_K | 256   | 210   | `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`  | d·sc·(q − 32)    |
//! | F16  | 1     | 2     | f16                                            | w                |
//!
//! 4-bit values: element j < 16 is the low nibble of `qs[j]`, element j + 16 its high nibble; the
//! fifth bit of Q5 element j is bit j of `qh`.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Weight types the CPU kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuQuant {
    /// GGML Q4_0.
    Q4_0,
    /// GGML Q4_1.
    Q4_1,
    /// GGML Q5_0.
    Q5_0,
    /// GGML Q5_1.
    Q5_1,
    /// GGML Q8_0.
    Q8_0,
    /// GGML Q4_K.
    Q4K,
    /// GGML Q6_K.
    Q6K,
    /// IEEE half precision.
    F16,
}

impl CpuQuant {
    /// All of them, for tests and benches.
    pub const ALL: [CpuQuant; 8] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q6K,
        Self::F16,
    ];

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => 256,
            Self::F16 => 1,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
            Self::F16 => 2,
        }
    }

    /// The matching candle dtype.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
            Self::F16 => GgmlDType::F16,
        }
    }

    /// The CPU quant type of a candle dtype, if the kernels take it.
    pub fn from_ggml(d: GgmlDType) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.ggml() == d)
    }
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub(crate) fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The 4-bit value of element `j` (0..32) of a 16-byte `qs`.
pub(crate) fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 15
    } else {
        qs[j - 16] >> 4
    }
}

/// Dequantizes one row: `row` holds `out.len() / block_values` blocks.
pub fn dequantize_row(qt: CpuQuant, row: &[u8], out: &mut [f32]) {
    let (bv, bb) = (qt.block_values(), qt.block_bytes());
    for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        match qt {
            CpuQuant::Q4_0 => {
                let d = f16_at(blk, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * (nibble(&blk[2..], j) as f32 - 8.0);
                }
            }
            CpuQuant::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * nibble(&blk[4..], j) as f32 + m;
                }
            }
            CpuQuant::Q5_0 => {
                let (d, qh) = (f16_at(blk, 0), u32_at(blk, 2));
                for (j, v) in o.iter_mut().enumerate() {
                    let q = nibble(&blk[6..], j) | (((qh >> j) & 1) << 4) as u8;
                    *v = d * (q as f32 - 16.0);
                }
            }
            CpuQuant::Q5_1 => {
                let (d, m, qh) = (f16_at(blk, 0), f16_at(blk, 2), u32_at(blk, 4));
                for (j, v) in o.iter_mut().enumerate() {
                    let q = nibble(&blk[8..], j) | (((qh >> j) & 1) << 4) as u8;
                    *v = d * q as f32 + m;
                }
            }
            CpuQuant::Q8_0 => {
                let d = f16_at(blk, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * (blk[2 + j] as i8) as f32;
                }
            }
            CpuQuant::Q4K => dequant_q4k(blk, o),
            CpuQuant::Q6K => dequant_q6k(blk, o),
            CpuQuant::F16 => o[0] = f16_at(blk, 0),
        }
    }
}

/// 6-bit scale and min of sub-block `j` (0..8) of a Q4_K `scales[12]`.
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
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
            o[64 * g + l] = d * s1 as f32 * (q & 15) as f32 - dmin * m1 as f32;
            o[64 * g + 32 + l] = d * s2 as f32 * (q >> 4) as f32 - dmin * m2 as f32;
        }
    }
}

/// The 6-bit value (0..64, before the −32) of element `e` (0..256) of a Q6_K block, and the index
/// of its scale in `scales[16]`.
pub(crate) fn q6k_value(blk: &[u8], e: usize) -> (u8, usize) {
    let (half, r) = (e / 128, e % 128);
    let (quarter, l) = (r / 32, r % 32);
    let ql = &blk[64 * half..64 * half + 64];
    let qh = blk[128 + 32 * half + l];
    let low = match quarter {
        0 => ql[l] & 15,
        1 => ql[l + 32] & 15,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    let high = (qh >> (2 * quarter)) & 3;
    (low | (high << 4), 8 * half + 2 * quarter + l / 16)
}

fn dequant_q6k(blk: &[u8], o: &mut [f32]) {
    let d = f16_at(blk, 208);
    for (e, v) in o.iter_mut().enumerate() {
        let (q, s) = q6k_value(blk, e);
        *v = d * (blk[192 + s] as i8) as f32 * (q as f32 - 32.0);
    }
}
