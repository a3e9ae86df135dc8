//! The kernels' ABI: MSL sources, the `#[repr(C)]` mirrors of the argument structs in
//! `metal/mc_kernels.h` (sizes asserted at compile time on both sides), the tuning constants, and
//! launch plans (grid, threadgroup, threadgroup memory, function constants) shared by the Metal
//! dispatch and the host-emulation tests.

use super::names::KernelName;

/// The shared header, prepended to each family's source before compiling it.
pub const HEADER_SRC: &str = include_str!("../../metal/mc_kernels.h");
/// metal/qmatmul.metal
pub const QMATMUL_SRC: &str = include_str!("../../metal/qmatmul.metal");
/// metal/attention.metal
pub const ATTENTION_SRC: &str = include_str!("../../metal/attention.metal");

/// Lanes per SIMD group.
pub const SIMD_WIDTH: usize = 32;
/// Values per dequantization chunk.
pub const QCHUNK: usize = 16;
/// Mat-vec output rows per SIMD group.
pub const QMV_ROWS_PER_SIMDGROUP: usize = 4;
/// Mat-vec SIMD groups per threadgroup.
pub const QMV_SIMDGROUPS: usize = 2;
/// Mat-mat tile rows (activations).
pub const QMM_BM: usize = 32;
/// Mat-mat tile columns (output features).
pub const QMM_BN: usize = 32;
/// Mat-mat tile depth.
pub const QMM_BK: usize = 32;
/// Mat-mat SIMD groups per threadgroup.
pub const QMM_SIMDGROUPS: usize = 4;
/// LoRA shrink SIMD groups (ranks) per threadgroup.
pub const LORA_SHRINK_SIMDGROUPS: usize = 4;
/// Attention SIMD groups per threadgroup.
pub const ATTN_SIMDGROUPS: usize = 4;
/// Attention query rows per SIMD group.
pub const ATTN_ROWS_PER_SIMDGROUP: usize = 2;
/// Keys per attention K/V tile.
pub const ATTN_BLOCK_KEYS: usize = 32;
/// Largest head dim the attention kernels take.
pub const ATTN_MAX_HEAD_DIM: usize = 128;
/// Padding of a staged K/V row.
pub const ATTN_KV_PAD: usize = 1;
/// Function-constant index: LoRA epilogue on.
pub const FC_HAS_LORA: usize = 0;
/// Function-constant index: causal.
pub const FC_CAUSAL: usize = 1;
/// Function-constant index: additive mask present.
pub const FC_HAS_MASK: usize = 2;
/// Function-constant index: sliding window.
pub const FC_HAS_WINDOW: usize = 3;
/// Rows of x at or below which the mat-vec kernel is used (above: mat-mat).
pub const QMV_MAX_ROWS: usize = 8;
/// Head dims the attention kernels are instantiated for.
pub const ATTN_HEAD_DIMS: [usize; 4] = [64, 80, 96, 128];
/// Decode: fewest keys one split handles.
pub const DECODE_MIN_KEYS_PER_SPLIT: usize = 256;
/// Decode: most splits.
pub const DECODE_MAX_SPLITS: usize = 32;

/// `(#define name, Rust value)` pairs a test checks against the header.
pub const MIRRORED_DEFINES: &[(&str, usize)] = &[
    ("MC_SIMD_WIDTH", SIMD_WIDTH),
    ("MC_QCHUNK", QCHUNK),
    ("MC_QMV_ROWS_PER_SIMDGROUP", QMV_ROWS_PER_SIMDGROUP),
    ("MC_QMV_SIMDGROUPS", QMV_SIMDGROUPS),
    ("MC_QMM_BM", QMM_BM),
    ("MC_QMM_BN", QMM_BN),
    ("MC_QMM_BK", QMM_BK),
    ("MC_QMM_SIMDGROUPS", QMM_SIMDGROUPS),
    ("MC_LORA_SHRINK_SIMDGROUPS", LORA_SHRINK_SIMDGROUPS),
    ("MC_ATTN_SIMDGROUPS", ATTN_SIMDGROUPS),
    ("MC_ATTN_ROWS_PER_SIMDGROUP", ATTN_ROWS_PER_SIMDGROUP),
    ("MC_ATTN_BLOCK_KEYS", ATTN_BLOCK_KEYS),
    ("MC_ATTN_MAX_HEAD_DIM", ATTN_MAX_HEAD_DIM),
    ("MC_ATTN_KV_PAD", ATTN_KV_PAD),
    ("MC_FC_HAS_LORA", FC_HAS_LORA),
    ("MC_FC_CAUSAL", FC_CAUSAL),
    ("MC_FC_HAS_MASK", FC_HAS_MASK),
    ("MC_FC_HAS_WINDOW", FC_HAS_WINDOW),
];

/// Mirror of `QMatmulArgs` in mc_kernels.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QMatmulArgs {
    /// Activation rows.
    pub m: u32,
    /// Output features (rows of the weight matrix).
    pub n: u32,
    /// Input features.
    pub k: u32,
    /// Bytes of one quantized weight row.
    pub row_bytes: u32,
    /// LoRA rank `r` (0 without adapters).
    pub lora_rank: u32,
    /// Adapters stacked in A `(n_adapters, r, k)` and B `(n_adapters, n, r)`.
    pub n_adapters: u32,
}
const _: () = assert!(std::mem::size_of::<QMatmulArgs>() == 24);

/// Mirror of `AttnArgs` in mc_kernels.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttnArgs {
    /// Batch size.
    pub batch: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads.
    pub n_kv_heads: u32,
    /// Query positions per sequence.
    pub q_len: u32,
    /// Key/value positions per sequence.
    pub kv_len: u32,
    /// Absolute position of query 0 (for the causal mask and the window).
    pub q_offset: u32,
    /// Sliding window: a query at p sees keys `p-window+1..=p` (with `FC_HAS_WINDOW`).
    pub window: u32,
    /// Elements between rows of the `(q_len, kv_len)` f32 mask.
    pub mask_row_stride: u32,
    /// Elements between batches of K.
    pub k_batch_stride: u32,
    /// Elements between heads of K.
    pub k_head_stride: u32,
    /// Elements between batches of V.
    pub v_batch_stride: u32,
    /// Elements between heads of V.
    pub v_head_stride: u32,
    /// Decode: keys one split handles.
    pub keys_per_split: u32,
    /// Decode: splits over `kv_len`.
    pub n_splits: u32,
    /// Softmax scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Padding to 64 bytes; unused.
    pub pad: u32,
}
const _: () = assert!(std::mem::size_of::<AttnArgs>() == 64);

/// One kernel dispatch: what to run and with which geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The kernel function to run.
    pub kernel: KernelName,
    /// Threadgroups per grid (x, y, z).
    pub grid: [usize; 3],
    /// Threads per threadgroup (x, y, z).
    pub threadgroup: [usize; 3],
    /// Bytes of threadgroup memory at `[[threadgroup(0)]]`, if any.
    pub tg_mem_bytes: Option<usize>,
    /// Boolean function constants `(index, value)`.
    pub constants: Vec<(usize, bool)>,
}

impl Launch {
    /// Function-constant values by index, for the host emulation.
    pub fn constant_values(&self) -> Vec<bool> {
        let len = self.constants.iter().map(|(i, _)| i + 1).max().unwrap_or(0);
        let mut v = vec![false; len];
        for &(i, b) in &self.constants {
            v[i] = b;
        }
        v
    }
}

/// Converts a size to the u32 the kernels take, or an `UnsupportedKernel` error.
pub(crate) fn to_u32(op: &'static str, what: &str, v: usize) -> crate::Result<u32> {
    u32::try_from(v).map_err(|_| crate::Error::UnsupportedKernel {
        op,
        reason: format!("{what} = {v} exceeds u32"),
    })
}
