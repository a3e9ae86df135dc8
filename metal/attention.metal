// Flash attention (see docs/KERNELS.md): softmax(q·kᵀ·scale + mask)·v with an online softmax in
// f32, GQA/MQA without repeating K/V, causal / sliding-window / additive-mask specialisations.
//
// q (b, h, t, d) contiguous; k, v (b, n_kv, kv_len, d) with rows of d contiguous and strided
// batch/head (a KV-cache view needs no copy); mask (t, kv_len) f32; out (b, h, t, d).
// The query heads of one KV head are folded into rows: row = rep·t + i, head = kv_head·n_rep + rep.
#ifndef MC_KERNELS_H
#include "mc_kernels.h"
#endif

MC_FUNCTION_CONSTANT(bool, mc_causal, MC_FC_CAUSAL);
MC_FUNCTION_CONSTANT(bool, mc_has_mask, MC_FC_HAS_MASK);
MC_FUNCTION_CONSTANT(bool, mc_has_window, MC_FC_HAS_WINDOW);

#define MC_ATTN_ROWS_PER_TG (MC_ATTN_SIMDGROUPS * MC_ATTN_ROWS_PER_SIMDGROUP)

/// Threadgroup memory (floats) of the attention kernels for head dim D.
#define MC_ATTN_SHMEM_FLOATS(D) \
    (MC_ATTN_ROWS_PER_TG * (D) + MC_ATTN_BLOCK_KEYS * ((D) + MC_ATTN_KV_PAD) + MC_ATTN_ROWS_PER_TG * MC_ATTN_BLOCK_KEYS)

/// The running softmax state of one query row, kept by every lane of its SIMD group; lane l owns
/// output elements l, l+32, ... `seen`: some key was visible (a row that sees none yields zeros).
template <int D> struct MCRowState {
    float m;
    float l;
    bool seen;
    float o[(D + MC_SIMD_WIDTH - 1) / MC_SIMD_WIDTH];
};

// Non-finite values (see docs/KERNELS.md, "NaN and Inf"): a key is skipped only because it is
// hidden (causal, window, or an additive −∞); the scores of visible keys are used whatever their
// value, as the reference softmax(s)·v does: a NaN score makes the row's max NaN (MSL's max drops
// NaN, so the kernels test for it), p = exp(s − m) keeps NaN and +∞ − +∞, and a visible key of
// weight 0 still adds 0·v (NaN for a NaN or ±∞ value). Needs the library compiled without fast
// math (src/kernels/metal.rs), which would assume no NaN or ∞.

/// The factor e^(m_old − m_new) that rescales sums taken under max `m_old` to max `m_new`; 1 when
/// they are equal, so equal ±∞ maxima give 1 rather than e^(∞ − ∞) = NaN.
inline float mc_rescale(float m_old, float m_new) { return m_old == m_new ? 1.0f : exp(m_old - m_new); }

inline bool mc_key_visible(constant AttnArgs& a, uint pos, uint key) {
    if (mc_causal && key > pos) return false;
    if (mc_has_window && pos >= key + a.window) return false;
    return true;
}

/// Runs one threadgroup's rows [row0, row0 + ROWS_PER_TG) of KV head `g` in batch `b` over keys
/// [key_begin, key_end). K then V tiles of BLOCK_KEYS keys are staged in threadgroup memory as
/// f32 (one buffer, reused); lane j scores key j of the tile against a query row held in
/// threadgroup memory (pre-scaled), the SIMD group updates the row's max and sum, and the
/// probabilities go through threadgroup memory to the V pass.
template <typename T, int D>
void mc_attn_rows(device const T* q, device const T* k, device const T* v, device const float* mask,
                  constant AttnArgs& a, uint b, uint g, uint row0, uint key_begin, uint key_end,
                  threadgroup float* shmem, ushort tid, ushort sgitg, ushort tiisg,
                  thread MCRowState<D>* st) {
    constexpr uint E = (D + MC_SIMD_WIDTH - 1) / MC_SIMD_WIDTH;
    constexpr uint KS = D + MC_ATTN_KV_PAD;
    constexpr uint NT = MC_ATTN_SIMDGROUPS * MC_SIMD_WIDTH;
    threadgroup float* qs = shmem;                                   // (ROWS_PER_TG, D)
    threadgroup float* kv = qs + MC_ATTN_ROWS_PER_TG * D;            // (BLOCK_KEYS, KS)
    threadgroup float* ps = kv + MC_ATTN_BLOCK_KEYS * KS;            // (ROWS_PER_TG, BLOCK_KEYS)
    const uint n_rep = a.n_heads / a.n_kv_heads, rows = n_rep * a.q_len;
    for (uint idx = tid; idx < MC_ATTN_ROWS_PER_TG * D; idx += NT) {
        const uint r = row0 + idx / D, e = idx % D;
        float val = 0.0f;
        if (r < rows) {
            const uint h = g * n_rep + r / a.q_len, i = r % a.q_len;
            val = float(q[((ulong(b) * a.n_heads + h) * a.q_len + i) * D + e]) * a.scale;
        }
        qs[idx] = val;
    }
    // Key range every row of this threadgroup may see (uniform across the threadgroup).
    uint pos_lo = 0xFFFFFFFFu, pos_hi = 0;
    for (uint r = row0; r < min(row0 + MC_ATTN_ROWS_PER_TG, rows); ++r) {
        pos_lo = min(pos_lo, a.q_offset + r % a.q_len);
        pos_hi = max(pos_hi, a.q_offset + r % a.q_len);
    }
    uint lo = key_begin, hi = key_end;
    if (mc_causal) hi = min(hi, pos_hi + 1);
    if (mc_has_window && pos_lo + 1 > a.window) lo = max(lo, pos_lo + 1 - a.window);
    for (uint j = 0; j < MC_ATTN_ROWS_PER_SIMDGROUP; ++j) {
        st[j].m = -INFINITY;
        st[j].l = 0.0f;
        st[j].seen = false;
        for (uint e = 0; e < E; ++e) st[j].o[e] = 0.0f;
    }
    device const T* kh = k + ulong(b) * a.k_batch_stride + ulong(g) * a.k_head_stride;
    device const T* vh = v + ulong(b) * a.v_batch_stride + ulong(g) * a.v_head_stride;
    float alpha[MC_ATTN_ROWS_PER_SIMDGROUP];
    for (uint kb = lo; kb < hi; kb += MC_ATTN_BLOCK_KEYS) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint idx = tid; idx < MC_ATTN_BLOCK_KEYS * D; idx += NT) {
            const uint key = kb + idx / D, e = idx % D;
            kv[(idx / D) * KS + e] = key < hi ? float(kh[ulong(key) * D + e]) : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const uint key = kb + tiisg;
        for (uint j = 0; j < MC_ATTN_ROWS_PER_SIMDGROUP; ++j) {
            const uint lr = sgitg * MC_ATTN_ROWS_PER_SIMDGROUP + j, r = row0 + lr;
            const uint pos = a.q_offset + r % a.q_len;
            bool vis = r < rows && key < hi && mc_key_visible(a, pos, key);
            float s = 0.0f;
            if (vis) {
                threadgroup const float* qr = qs + lr * D;
                threadgroup const float* kr = kv + tiisg * KS;
                float dot_ = 0.0f;
                for (uint e = 0; e < D; ++e) dot_ += qr[e] * kr[e];
                s = dot_;
                if (mc_has_mask) {
                    const float bias = mask[ulong(r % a.q_len) * a.mask_row_stride + key];
                    vis = bias != -INFINITY;
                    s += bias;
                }
            }
            // p < 0 marks a hidden key for the V pass (a visible key's p is ≥ 0 or NaN).
            float p = -1.0f;
            alpha[j] = 1.0f;
            if (simd_any(vis)) {  // uniform across the SIMD group
                const bool nan_score = simd_any(vis && isnan(s));
                const float block_max = simd_max(vis ? s : -INFINITY);
                const float m_new = nan_score || isnan(st[j].m) ? NAN : max(st[j].m, block_max);
                // exp(−∞ − m) = 0 for any m but NaN (then the row is NaN anyway); saying so keeps a
                // −∞ score seen before the first finite one from giving exp(−∞ + ∞) = NaN.
                if (vis) p = s == -INFINITY ? 0.0f : exp(s - m_new);
                alpha[j] = mc_rescale(st[j].m, m_new);
                st[j].l = st[j].l * alpha[j] + simd_sum(vis ? p : 0.0f);
                st[j].m = m_new;
                st[j].seen = true;
            }
            ps[lr * MC_ATTN_BLOCK_KEYS + tiisg] = p;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint idx = tid; idx < MC_ATTN_BLOCK_KEYS * D; idx += NT) {
            const uint key = kb + idx / D, e = idx % D;
            kv[(idx / D) * KS + e] = key < hi ? float(vh[ulong(key) * D + e]) : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint j = 0; j < MC_ATTN_ROWS_PER_SIMDGROUP; ++j) {
            threadgroup const float* pr = ps + (sgitg * MC_ATTN_ROWS_PER_SIMDGROUP + j) * MC_ATTN_BLOCK_KEYS;
            for (uint e = 0; e < E; ++e) st[j].o[e] *= alpha[j];
            for (uint kk = 0; kk < MC_ATTN_BLOCK_KEYS; ++kk) {
                const float pk = pr[kk];
                if (pk < 0.0f) continue;  // hidden key: its value is never read
                for (uint e = 0; e < E; ++e) {
                    const uint col = tiisg + e * MC_SIMD_WIDTH;
                    if (col < D) st[j].o[e] += pk * kv[kk * KS + col];
                }
            }
        }
    }
}

/// Prefill: grid (ceil(n_rep·t / ROWS_PER_TG), n_kv, b), MC_ATTN_SIMDGROUPS SIMD groups.
template <typename T, int D>
void mc_attn_prefill_impl(device const T* q, device const T* k, device const T* v, device const float* mask,
                          device T* out, constant AttnArgs& a, threadgroup float* shmem, uint3 tgpig,
                          ushort tid, ushort sgitg, ushort tiisg) {
    MCRowState<D> st[MC_ATTN_ROWS_PER_SIMDGROUP];
    const uint row0 = tgpig.x * MC_ATTN_ROWS_PER_TG;
    mc_attn_rows<T, D>(q, k, v, mask, a, tgpig.z, tgpig.y, row0, 0, a.kv_len, shmem, tid, sgitg, tiisg, st);
    const uint n_rep = a.n_heads / a.n_kv_heads;
    for (uint j = 0; j < MC_ATTN_ROWS_PER_SIMDGROUP; ++j) {
        const uint r = row0 + sgitg * MC_ATTN_ROWS_PER_SIMDGROUP + j;
        if (r >= n_rep * a.q_len) continue;
        const uint h = tgpig.y * n_rep + r / a.q_len, i = r % a.q_len;
        // A row that sees no key at all (fully masked) yields zeros rather than NaN; one whose
        // visible scores are all −∞ has l = 0 and yields 0·∞ = NaN, like the reference softmax.
        const float inv = st[j].seen ? 1.0f / st[j].l : 0.0f;
        device T* o = out + ((ulong(tgpig.z) * a.n_heads + h) * a.q_len + i) * D;
        for (uint e = 0; e < (D + MC_SIMD_WIDTH - 1) / MC_SIMD_WIDTH; ++e) {
            const uint col = tiisg + e * MC_SIMD_WIDTH;
            if (col < D) o[col] = T(st[j].o[e] * inv);
        }
    }
}

/// Decode (t = 1): grid (n_splits, ceil(n_rep / ROWS_PER_TG), b·n_kv). Split s covers keys
/// [s·keys_per_split, (s+1)·keys_per_split) and writes its unnormalised output and (max, sum)
/// to f32 partials: part_o (n_splits, b, h, D), part_ml (n_splits, b, h, 2).
template <typename T, int D>
void mc_attn_decode_impl(device const T* q, device const T* k, device const T* v, device const float* mask,
                         device float* part_o, device float* part_ml, constant AttnArgs& a,
                         threadgroup float* shmem, uint3 tgpig, ushort tid, ushort sgitg, ushort tiisg) {
    MCRowState<D> st[MC_ATTN_ROWS_PER_SIMDGROUP];
    const uint b = tgpig.z / a.n_kv_heads, g = tgpig.z % a.n_kv_heads;
    const uint row0 = tgpig.y * MC_ATTN_ROWS_PER_TG;
    const uint k0 = tgpig.x * a.keys_per_split, k1 = min(a.kv_len, k0 + a.keys_per_split);
    mc_attn_rows<T, D>(q, k, v, mask, a, b, g, row0, k0, k1, shmem, tid, sgitg, tiisg, st);
    const uint n_rep = a.n_heads / a.n_kv_heads;
    for (uint j = 0; j < MC_ATTN_ROWS_PER_SIMDGROUP; ++j) {
        const uint r = row0 + sgitg * MC_ATTN_ROWS_PER_SIMDGROUP + j;
        if (r >= n_rep) continue;
        const ulong bh = ulong(tgpig.x) * a.batch * a.n_heads + ulong(b) * a.n_heads + g * n_rep + r;
        for (uint e = 0; e < (D + MC_SIMD_WIDTH - 1) / MC_SIMD_WIDTH; ++e) {
            const uint col = tiisg + e * MC_SIMD_WIDTH;
            if (col < D) part_o[bh * D + col] = st[j].o[e];
        }
        if (tiisg == 0) {
            // A split that saw no key writes l = −1 (a seen split's l is ≥ 0 or NaN).
            part_ml[bh * 2] = st[j].m;
            part_ml[bh * 2 + 1] = st[j].seen ? st[j].l : -1.0f;
        }
    }
}

/// Decode reduce: one SIMD group per (b, h) merges the splits: out = Σ e^(m_s−M)·o_s / Σ e^(m_s−M)·l_s.
template <typename T, int D>
void mc_attn_reduce_impl(device const float* part_o, device const float* part_ml, device T* out,
                         constant AttnArgs& a, uint3 tgpig, ushort tiisg) {
    const ulong bh = tgpig.x, stride = ulong(a.batch) * a.n_heads;
    float m = -INFINITY;
    bool seen = false, nan_max = false;
    for (uint s = 0; s < a.n_splits; ++s) {
        if (part_ml[(s * stride + bh) * 2 + 1] < 0.0f) continue;  // the split saw no key
        const float ms = part_ml[(s * stride + bh) * 2];
        seen = true;
        nan_max = nan_max || isnan(ms);
        m = max(m, ms);
    }
    if (nan_max) m = NAN;
    float l = 0.0f;
    float o[(D + MC_SIMD_WIDTH - 1) / MC_SIMD_WIDTH] = {0.0f};
    for (uint s = 0; s < a.n_splits; ++s) {
        const float ls = part_ml[(s * stride + bh) * 2 + 1];
        if (ls < 0.0f) continue;
        const float w = mc_rescale(part_ml[(s * stride + bh) * 2], m);
        l += w * ls;
        for (uint e = 0; e < (D + MC_SIMD_WIDTH - 1) / MC_SIMD_WIDTH; ++e) {
            const uint col = tiisg + e * MC_SIMD_WIDTH;
            if (col < D) o[e] += w * part_o[(s * stride + bh) * D + col];
        }
    }
    const float inv = seen ? 1.0f / l : 0.0f;
    for (uint e = 0; e < (D + MC_SIMD_WIDTH - 1) / MC_SIMD_WIDTH; ++e) {
        const uint col = tiisg + e * MC_SIMD_WIDTH;
        if (col < D) out[bh * D + col] = T(o[e] * inv);
    }
}

// Entry points. Buffer indices are part of the ABI (src/kernels/attention.rs binds them).
#define MC_ATTN_PREFILL_KERNEL(NAME, T, D)                                                         \
    kernel void NAME(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],             \
                     device const T* v [[buffer(2)]], device const float* mask [[buffer(3)]],      \
                     device T* out [[buffer(4)]], constant AttnArgs& a [[buffer(5)]],              \
                     threadgroup float* shmem [[threadgroup(0)]],                                  \
                     uint3 tgpig [[threadgroup_position_in_grid]],                                 \
                     ushort tid [[thread_index_in_threadgroup]],                                   \
                     ushort sgitg [[simdgroup_index_in_threadgroup]],                              \
                     ushort tiisg [[thread_index_in_simdgroup]]) {                                 \
        mc_attn_prefill_impl<T, D>(q, k, v, mask, out, a, shmem, tgpig, tid, sgitg, tiisg);        \
    }

#define MC_ATTN_DECODE_KERNEL(NAME, T, D)                                                          \
    kernel void NAME(device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],             \
                     device const T* v [[buffer(2)]], device const float* mask [[buffer(3)]],      \
                     device float* part_o [[buffer(4)]], device float* part_ml [[buffer(5)]],      \
                     constant AttnArgs& a [[buffer(6)]],                                           \
                     threadgroup float* shmem [[threadgroup(0)]],                                  \
                     uint3 tgpig [[threadgroup_position_in_grid]],                                 \
                     ushort tid [[thread_index_in_threadgroup]],                                   \
                     ushort sgitg [[simdgroup_index_in_threadgroup]],                              \
                     ushort tiisg [[thread_index_in_simdgroup]]) {                                 \
        mc_attn_decode_impl<T, D>(q, k, v, mask, part_o, part_ml, a, shmem, tgpig, tid, sgitg, tiisg); \
    }

#define MC_ATTN_REDUCE_KERNEL(NAME, T, D)                                                          \
    kernel void NAME(device const float* part_o [[buffer(0)]], device const float* part_ml [[buffer(1)]], \
                     device T* out [[buffer(2)]], constant AttnArgs& a [[buffer(3)]],              \
                     uint3 tgpig [[threadgroup_position_in_grid]],                                 \
                     ushort tiisg [[thread_index_in_simdgroup]]) {                                 \
        mc_attn_reduce_impl<T, D>(part_o, part_ml, out, a, tgpig, tiisg);                          \
    }

// Names: attn_<variant>_<k/v type>_<q type>_d<head dim>; the reduce reads f32 partials.
#define MC_ATTN_FOR_DIM(X, T, TN, D) \
    X(attn_prefill_##TN##_##TN##_d##D, attn_decode_##TN##_##TN##_d##D, attn_reduce_f32_##TN##_d##D, T, D)
#define MC_ATTN_FOR_ACT(X, T, TN) \
    MC_ATTN_FOR_DIM(X, T, TN, 64) MC_ATTN_FOR_DIM(X, T, TN, 80) MC_ATTN_FOR_DIM(X, T, TN, 96) MC_ATTN_FOR_DIM(X, T, TN, 128)
#if defined(__HAVE_BFLOAT__)
#define MC_ATTN_BF16(X) MC_ATTN_FOR_ACT(X, bfloat, bf16)
#else
#define MC_ATTN_BF16(X)
#endif
#define MC_ATTN_KERNELS(X) MC_ATTN_FOR_ACT(X, float, f32) MC_ATTN_FOR_ACT(X, half, f16) MC_ATTN_BF16(X)

#define MC_DEFINE_ATTN(PRE, DEC, RED, T, D) \
    MC_ATTN_PREFILL_KERNEL(PRE, T, D) MC_ATTN_DECODE_KERNEL(DEC, T, D) MC_ATTN_REDUCE_KERNEL(RED, T, D)
MC_ATTN_KERNELS(MC_DEFINE_ATTN)
