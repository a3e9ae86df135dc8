// Quantized matmul with a fused multi-adapter LoRA epilogue (see docs/KERNELS.md).
//
//   y (m, n) = x (m, k) · W (n, k)ᵀ  [+ s[id_i] · B[id_i] (n, r) · t_i]   for each row i of x,
//   t (m, r) = A[id_i] (r, k) · x_i    (the "shrink", a separate small kernel writing f32)
//
// W rows are GGML blocks (Q4_0, Q8_0, Q4_K, Q6_K) exactly as candle/ggml store them. Activations,
// adapters and y are float / half / bfloat; every accumulation is f32.
#ifndef MC_KERNELS_H
#include "mc_kernels.h"
#endif

MC_FUNCTION_CONSTANT(bool, mc_has_lora, MC_FC_HAS_LORA);

#define MC_WT_Q4_0 0
#define MC_WT_Q8_0 1
#define MC_WT_Q4_K 2
#define MC_WT_Q6_K 3

inline float mc_load_half(device const uchar* p) { return float(*((device const half*)p)); }

// Dequantizes values [chunk·16, chunk·16+16) of one quantized row into `out`.
template <int WT> void mc_dequant_chunk(device const uchar* row, uint chunk, thread float* out);

template <> inline void mc_dequant_chunk<MC_WT_Q4_0>(device const uchar* row, uint chunk, thread float* out) {
    // block: half d; uchar qs[16]; value j = d·((qs[j] & 15) − 8), value j+16 = d·((qs[j] >> 4) − 8)
    device const uchar* b = row + (chunk / 2) * MC_Q4_0_BYTES;
    const float d = mc_load_half(b);
    const uint shift = (chunk % 2) * 4;
    for (uint i = 0; i < MC_QCHUNK; ++i) out[i] = d * (float((b[2 + i] >> shift) & 15) - 8.0f);
}

template <> inline void mc_dequant_chunk<MC_WT_Q8_0>(device const uchar* row, uint chunk, thread float* out) {
    // block: half d; int8 qs[32]
    device const uchar* b = row + (chunk / 2) * MC_Q8_0_BYTES;
    const float d = mc_load_half(b);
    device const int8_t* qs = (device const int8_t*)(b + 2) + (chunk % 2) * MC_QCHUNK;
    for (uint i = 0; i < MC_QCHUNK; ++i) out[i] = d * float(qs[i]);
}

template <> inline void mc_dequant_chunk<MC_WT_Q4_K>(device const uchar* row, uint chunk, thread float* out) {
    // super-block: half d, dmin; uchar scales[12] (8 × 6-bit scale + 6-bit min); uchar qs[128].
    // Sub-block j (32 values) = d·sc_j·q − dmin·m_j; sub-blocks 2g and 2g+1 share qs[32g..32g+32]
    // (low / high nibbles).
    device const uchar* b = row + (chunk / 16) * MC_Q4_K_BYTES;
    const uint c = chunk % 16, j = c / 2;
    device const uchar* sc = b + 4;
    uint s, m;
    if (j < 4) {
        s = sc[j] & 63;
        m = sc[j + 4] & 63;
    } else {
        s = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
        m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
    const float d = mc_load_half(b) * float(s), dm = mc_load_half(b + 2) * float(m);
    device const uchar* qs = b + 16 + (c / 4) * 32 + (c % 2) * MC_QCHUNK;
    const uint shift = (j % 2) * 4;
    for (uint i = 0; i < MC_QCHUNK; ++i) out[i] = d * float((qs[i] >> shift) & 15) - dm;
}

template <> inline void mc_dequant_chunk<MC_WT_Q6_K>(device const uchar* row, uint chunk, thread float* out) {
    // super-block: uchar ql[128] (low 4 bits), uchar qh[64] (high 2 bits), int8 scales[16], half d.
    // Each half (128 values) holds four quarters qq of 32: low/high nibbles of ql[0..32] and
    // ql[32..64], high bits at qh >> 2qq; 16 values share one scale.
    device const uchar* b = row + (chunk / 16) * MC_Q6_K_BYTES;
    const uint c = chunk % 16, half_ = c / 8, r = c % 8, qq = r / 2, l0 = (r % 2) * MC_QCHUNK;
    device const uchar* ql = b + half_ * 64 + (qq % 2) * 32 + l0;
    device const uchar* qh = b + 128 + half_ * 32 + l0;
    device const int8_t* scales = (device const int8_t*)(b + 192);
    const float d = mc_load_half(b + 208) * float(scales[half_ * 8 + l0 / MC_QCHUNK + qq * 2]);
    const uint lshift = (qq / 2) * 4, hshift = qq * 2;
    for (uint i = 0; i < MC_QCHUNK; ++i) {
        const int q = int(((ql[i] >> lshift) & 15) | (((qh[i] >> hshift) & 3) << 4)) - 32;
        out[i] = d * float(q);
    }
}

// Σ_j B[id, col, j] · t[row, j] over the lanes of a SIMD group (lane-strided partial sum).
template <typename T>
inline float mc_lora_expand_partial(device const T* lora_b, device const float* t, constant QMatmulArgs& a,
                                    uint id, uint row, uint col, uint lane, uint stride) {
    float acc = 0.0f;
    device const T* brow = lora_b + (ulong(id) * a.n + col) * a.lora_rank;
    device const float* trow = t + ulong(row) * a.lora_rank;
    for (uint j = lane; j < a.lora_rank; j += stride) acc += float(brow[j]) * trow[j];
    return acc;
}

// Mat-vec (decode): threadgroup = MC_QMV_SIMDGROUPS SIMD groups, each owning
// MC_QMV_ROWS_PER_SIMDGROUP output features of one activation row. Lanes stride over 16-value
// chunks of the row, so neighbouring lanes read neighbouring weight bytes.
template <int WT, typename T>
void mc_qmv_impl(device const uchar* w, device const T* x, device T* y, constant QMatmulArgs& a,
                 device const T* lora_b, device const float* lora_t, device const float* lora_scales,
                 device const uint* lora_ids, uint3 tgpig, ushort sgitg, ushort tiisg) {
    const uint row = tgpig.y;
    const uint col0 = (tgpig.x * MC_QMV_SIMDGROUPS + sgitg) * MC_QMV_ROWS_PER_SIMDGROUP;
    const uint n_chunks = a.k / MC_QCHUNK;
    device const T* xr = x + ulong(row) * a.k;
    float acc[MC_QMV_ROWS_PER_SIMDGROUP] = {0.0f};
    float xs[MC_QCHUNK], ws[MC_QCHUNK];
    for (uint c = tiisg; c < n_chunks; c += MC_SIMD_WIDTH) {
        for (uint i = 0; i < MC_QCHUNK; ++i) xs[i] = float(xr[c * MC_QCHUNK + i]);
        for (uint r = 0; r < MC_QMV_ROWS_PER_SIMDGROUP; ++r) {
            if (col0 + r >= a.n) break;
            mc_dequant_chunk<WT>(w + ulong(col0 + r) * a.row_bytes, c, ws);
            for (uint i = 0; i < MC_QCHUNK; ++i) acc[r] += ws[i] * xs[i];
        }
    }
    if (mc_has_lora) {
        const uint id = lora_ids[row];
        if (id < a.n_adapters) {
            const float s = lora_scales[id];
            for (uint r = 0; r < MC_QMV_ROWS_PER_SIMDGROUP; ++r) {
                if (col0 + r >= a.n) break;
                acc[r] += s * mc_lora_expand_partial(lora_b, lora_t, a, id, row, col0 + r, tiisg, MC_SIMD_WIDTH);
            }
        }
    }
    for (uint r = 0; r < MC_QMV_ROWS_PER_SIMDGROUP; ++r) {
        const float total = simd_sum(acc[r]);
        if (tiisg == 0 && col0 + r < a.n) y[ulong(row) * a.n + col0 + r] = T(total);
    }
}

// Mat-mat (prefill): threadgroup = MC_QMM_SIMDGROUPS SIMD groups computing a BM × BN tile of y.
// Per BK step the threadgroup stages x (BM × BK) and the dequantized W tile, transposed
// (BK × BN), in threadgroup memory as f32; each SIMD group multiplies a 16 × 16 quarter with
// 2 × 2 simdgroup 8×8 accumulators. The epilogue stages the tile and adds the LoRA expand.
template <int WT, typename T>
void mc_qmm_impl(device const uchar* w, device const T* x, device T* y, constant QMatmulArgs& a,
                 device const T* lora_b, device const float* lora_t, device const float* lora_scales,
                 device const uint* lora_ids, threadgroup float* shmem, uint3 tgpig, ushort tid,
                 ushort sgitg) {
    constexpr uint NT = MC_QMM_SIMDGROUPS * MC_SIMD_WIDTH;
    threadgroup float* xs = shmem;                        // (BM, BK)
    threadgroup float* wt = shmem + MC_QMM_BM * MC_QMM_BK; // (BK, BN)
    const uint m0 = tgpig.y * MC_QMM_BM, n0 = tgpig.x * MC_QMM_BN;
    const uint sm = (sgitg / 2) * 16, sn = (sgitg % 2) * 16;
    simdgroup_float8x8 acc[2][2];
    for (uint i = 0; i < 2; ++i)
        for (uint j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    float ws[MC_QCHUNK];
    for (uint k0 = 0; k0 < a.k; k0 += MC_QMM_BK) {
        for (uint idx = tid; idx < MC_QMM_BM * MC_QMM_BK; idx += NT) {
            const uint r = idx / MC_QMM_BK, c = idx % MC_QMM_BK;
            xs[idx] = m0 + r < a.m ? float(x[ulong(m0 + r) * a.k + k0 + c]) : 0.0f;
        }
        constexpr uint CHUNKS = MC_QMM_BK / MC_QCHUNK;
        for (uint job = tid; job < MC_QMM_BN * CHUNKS; job += NT) {
            const uint nn = job / CHUNKS, cc = job % CHUNKS;
            if (n0 + nn < a.n) {
                mc_dequant_chunk<WT>(w + ulong(n0 + nn) * a.row_bytes, k0 / MC_QCHUNK + cc, ws);
            } else {
                for (uint i = 0; i < MC_QCHUNK; ++i) ws[i] = 0.0f;
            }
            for (uint i = 0; i < MC_QCHUNK; ++i) wt[(cc * MC_QCHUNK + i) * MC_QMM_BN + nn] = ws[i];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint kk = 0; kk < MC_QMM_BK; kk += 8) {
            simdgroup_float8x8 am[2], bm[2];
            for (uint i = 0; i < 2; ++i) simdgroup_load(am[i], xs + (sm + 8 * i) * MC_QMM_BK + kk, MC_QMM_BK);
            for (uint j = 0; j < 2; ++j) simdgroup_load(bm[j], wt + kk * MC_QMM_BN + sn + 8 * j, MC_QMM_BN);
            for (uint i = 0; i < 2; ++i)
                for (uint j = 0; j < 2; ++j) simdgroup_multiply_accumulate(acc[i][j], am[i], bm[j], acc[i][j]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    threadgroup float* cs = shmem;  // (BM, BN), reuses the x tile
    for (uint i = 0; i < 2; ++i)
        for (uint j = 0; j < 2; ++j) simdgroup_store(acc[i][j], cs + (sm + 8 * i) * MC_QMM_BN + sn + 8 * j, MC_QMM_BN);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint idx = tid; idx < MC_QMM_BM * MC_QMM_BN; idx += NT) {
        const uint r = idx / MC_QMM_BN, c = idx % MC_QMM_BN;
        if (m0 + r >= a.m || n0 + c >= a.n) continue;
        float v = cs[idx];
        if (mc_has_lora) {
            const uint id = lora_ids[m0 + r];
            if (id < a.n_adapters)
                v += lora_scales[id] * mc_lora_expand_partial(lora_b, lora_t, a, id, m0 + r, n0 + c, 0, 1);
        }
        y[ulong(m0 + r) * a.n + n0 + c] = T(v);
    }
}

// LoRA shrink: t[row, j] = A[id_row, j, :] · x[row, :] in f32 (0 for rows without an adapter).
// One SIMD group per (row, j); lanes stride over k.
template <typename T>
void mc_lora_shrink_impl(device const T* x, device const T* lora_a, device const uint* lora_ids,
                         device float* t, constant QMatmulArgs& a, uint3 tgpig, ushort sgitg, ushort tiisg) {
    const uint row = tgpig.y, j = tgpig.x * MC_LORA_SHRINK_SIMDGROUPS + sgitg;
    if (j >= a.lora_rank) return;  // uniform per SIMD group
    const uint id = lora_ids[row];
    float acc = 0.0f;
    if (id < a.n_adapters) {
        device const T* arow = lora_a + (ulong(id) * a.lora_rank + j) * a.k;
        device const T* xr = x + ulong(row) * a.k;
        for (uint i = tiisg; i < a.k; i += MC_SIMD_WIDTH) acc += float(arow[i]) * float(xr[i]);
    }
    const float total = simd_sum(acc);
    if (tiisg == 0) t[ulong(row) * a.lora_rank + j] = total;
}

// Entry points. Buffer indices are part of the ABI (src/kernels/qmatmul.rs binds them).
#define MC_QMV_KERNEL(NAME, WT, T)                                                                 \
    kernel void NAME(device const uchar* w [[buffer(0)]], device const T* x [[buffer(1)]],         \
                     device T* y [[buffer(2)]], constant QMatmulArgs& a [[buffer(3)]],             \
                     device const T* lora_b [[buffer(4)]], device const float* lora_t [[buffer(5)]], \
                     device const float* lora_scales [[buffer(6)]],                                \
                     device const uint* lora_ids [[buffer(7)]],                                    \
                     uint3 tgpig [[threadgroup_position_in_grid]],                                 \
                     ushort sgitg [[simdgroup_index_in_threadgroup]],                              \
                     ushort tiisg [[thread_index_in_simdgroup]]) {                                 \
        mc_qmv_impl<WT, T>(w, x, y, a, lora_b, lora_t, lora_scales, lora_ids, tgpig, sgitg, tiisg); \
    }

#define MC_QMM_KERNEL(NAME, WT, T)                                                                 \
    kernel void NAME(device const uchar* w [[buffer(0)]], device const T* x [[buffer(1)]],         \
                     device T* y [[buffer(2)]], constant QMatmulArgs& a [[buffer(3)]],             \
                     device const T* lora_b [[buffer(4)]], device const float* lora_t [[buffer(5)]], \
                     device const float* lora_scales [[buffer(6)]],                                \
                     device const uint* lora_ids [[buffer(7)]],                                    \
                     threadgroup float* shmem [[threadgroup(0)]],                                  \
                     uint3 tgpig [[threadgroup_position_in_grid]],                                 \
                     ushort tid [[thread_index_in_threadgroup]],                                   \
                     ushort sgitg [[simdgroup_index_in_threadgroup]]) {                            \
        mc_qmm_impl<WT, T>(w, x, y, a, lora_b, lora_t, lora_scales, lora_ids, shmem, tgpig, tid, sgitg); \
    }

#define MC_SHRINK_KERNEL(NAME, T)                                                                  \
    kernel void NAME(device const T* x [[buffer(0)]], device const T* lora_a [[buffer(1)]],        \
                     device const uint* lora_ids [[buffer(2)]], device float* t [[buffer(3)]],     \
                     constant QMatmulArgs& a [[buffer(4)]],                                        \
                     uint3 tgpig [[threadgroup_position_in_grid]],                                 \
                     ushort sgitg [[simdgroup_index_in_threadgroup]],                              \
                     ushort tiisg [[thread_index_in_simdgroup]]) {                                 \
        mc_lora_shrink_impl<T>(x, lora_a, lora_ids, t, a, tgpig, sgitg, tiisg);                   \
    }

// X-macro lists of every instantiated entry point: the names follow
// <family>_<variant>_<weight type>_<activation type> (src/kernels/names.rs builds the same).
#define MC_QMATMUL_FOR_ACT(X, T, TN)              \
    X(qmatmul_mv_q4_0_##TN, qmatmul_mm_q4_0_##TN, MC_WT_Q4_0, T) \
    X(qmatmul_mv_q8_0_##TN, qmatmul_mm_q8_0_##TN, MC_WT_Q8_0, T) \
    X(qmatmul_mv_q4_k_##TN, qmatmul_mm_q4_k_##TN, MC_WT_Q4_K, T) \
    X(qmatmul_mv_q6_k_##TN, qmatmul_mm_q6_k_##TN, MC_WT_Q6_K, T)

#define MC_QMATMUL_KERNELS(X)            \
    MC_QMATMUL_FOR_ACT(X, float, f32)    \
    MC_QMATMUL_FOR_ACT(X, half, f16)     \
    MC_QMATMUL_BF16(X)

#define MC_SHRINK_KERNELS(X)             \
    X(qmatmul_shrink_f32_f32, float)     \
    X(qmatmul_shrink_f16_f16, half)      \
    MC_SHRINK_BF16(X)

#if defined(__HAVE_BFLOAT__)
#define MC_QMATMUL_BF16(X) MC_QMATMUL_FOR_ACT(X, bfloat, bf16)
#define MC_SHRINK_BF16(X) X(qmatmul_shrink_bf16_bf16, bfloat)
#else
#define MC_QMATMUL_BF16(X)
#define MC_SHRINK_BF16(X)
#endif

#define MC_DEFINE_QMATMUL(MV, MM, WT, T) MC_QMV_KERNEL(MV, WT, T) MC_QMM_KERNEL(MM, WT, T)
MC_QMATMUL_KERNELS(MC_DEFINE_QMATMUL)
MC_SHRINK_KERNELS(MC_SHRINK_KERNEL)
