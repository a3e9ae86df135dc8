// metal-candle kernels: argument structs and tuning constants shared by every .metal family.
//
// The Rust side mirrors each struct with #[repr(C)] (src/kernels/abi.rs) and asserts the same
// sizes at compile time; a test parses the #defines below and compares them with the Rust constants.
// The Rust loader prepends this header to each family's source, so the #include in the .metal
// files is skipped on the GPU (MC_KERNELS_H is already defined) and used by the host emulation.
#ifndef MC_KERNELS_H
#define MC_KERNELS_H

#include <metal_stdlib>
using namespace metal;

#define MC_SIMD_WIDTH 32

// Quantized weights are dequantized in chunks of this many consecutive values of one row.
#define MC_QCHUNK 16
// Mat-vec: output rows per SIMD group, SIMD groups per threadgroup.
#define MC_QMV_ROWS_PER_SIMDGROUP 4
#define MC_QMV_SIMDGROUPS 2
// Mat-mat tile: BM activation rows × BN output features, BK-deep steps; SIMD groups per threadgroup.
#define MC_QMM_BM 32
#define MC_QMM_BN 32
#define MC_QMM_BK 32
#define MC_QMM_SIMDGROUPS 4
// LoRA shrink: adapter ranks computed per threadgroup (one per SIMD group).
#define MC_LORA_SHRINK_SIMDGROUPS 4

// Flash attention: SIMD groups per threadgroup, query rows per SIMD group, keys per K/V tile.
#define MC_ATTN_SIMDGROUPS 4
#define MC_ATTN_ROWS_PER_SIMDGROUP 2
#define MC_ATTN_BLOCK_KEYS 32
#define MC_ATTN_MAX_HEAD_DIM 128
// Padding of a K/V tile row in threadgroup memory (avoids bank conflicts in the score loop).
#define MC_ATTN_KV_PAD 1

// GGML block sizes (values per block) and bytes per block.
#define MC_QK4_0 32
#define MC_Q4_0_BYTES 18
#define MC_QK8_0 32
#define MC_Q8_0_BYTES 34
#define MC_QK_K 256
#define MC_Q4_K_BYTES 144
#define MC_Q6_K_BYTES 210

// Function-constant indices.
#define MC_FC_HAS_LORA 0
#define MC_FC_CAUSAL 1
#define MC_FC_HAS_MASK 2
#define MC_FC_HAS_WINDOW 3

// A LoRA adapter id at or above `n_adapters` (e.g. 0xFFFFFFFF) means "no adapter" for that row.

// Function constants: specialised at pipeline creation on the GPU; thread-local variables set by
// the host emulation before each dispatch.
#if defined(MSL_HOST_EMULATION)
#define MC_FUNCTION_CONSTANT(type, name, index) inline thread_local type name
#else
#define MC_FUNCTION_CONSTANT(type, name, index) constant type name [[function_constant(index)]]
#endif

/// Quantized matmul y (m, n) = x (m, k) · Wᵀ, W (n, k) in GGML blocks, plus the LoRA epilogue.
struct QMatmulArgs {
    uint m;          // activation rows
    uint n;          // output features (rows of W)
    uint k;          // input features
    uint row_bytes;  // bytes of one quantized row of W
    uint lora_rank;  // r (0 without adapters)
    uint n_adapters; // adapters stacked in A (n_adapters, r, k) and B (n_adapters, n, r)
};
static_assert(sizeof(QMatmulArgs) == 24, "QMatmulArgs layout is mirrored in Rust");

/// Flash attention over q (b, h, t, d) and k/v (b, n_kv, kv_len, d) with strided batch/head.
struct AttnArgs {
    uint batch;
    uint n_heads;
    uint n_kv_heads;
    uint q_len;
    uint kv_len;
    uint q_offset;        // absolute position of query 0 (causal / window)
    uint window;          // a query at p sees keys p-window+1..=p (with MC_FC_HAS_WINDOW)
    uint mask_row_stride; // elements between mask rows; mask is (q_len, kv_len) f32
    uint k_batch_stride;  // elements
    uint k_head_stride;
    uint v_batch_stride;
    uint v_head_stride;
    uint keys_per_split;  // decode: keys handled by one split
    uint n_splits;        // decode: splits over kv_len
    float scale;          // softmax scale (1/sqrt(d) usually)
    uint pad;
};
static_assert(sizeof(AttnArgs) == 64, "AttnArgs layout is mirrored in Rust");

#endif  // MC_KERNELS_H
