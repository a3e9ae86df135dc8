// Kernels that test the host emulation's own semantics (tests/kernels_harness.rs).
#include <metal_stdlib>
using namespace metal;

#if defined(MSL_HOST_EMULATION)
inline thread_local bool st_use_barrier;
#else
constant bool st_use_barrier [[function_constant(0)]];
#endif

// out[i] = 2·in[neighbour]: correct only if the barrier orders the writes before the reads.
kernel void selftest_barrier(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                             threadgroup float* tg [[threadgroup(0)]],
                             uint3 tgpig [[threadgroup_position_in_grid]],
                             uint3 tptg [[threads_per_threadgroup]],
                             ushort tid [[thread_index_in_threadgroup]]) {
    const uint n = tptg.x, base = tgpig.x * n;
    tg[tid] = 2.0f * in[base + tid];
    if (st_use_barrier) threadgroup_barrier(mem_flags::mem_threadgroup);
    out[base + tid] = tg[(tid + 1) % n];
}

// Per thread: simd_sum, simd_max, a shuffle_xor butterfly sum, simd_shuffle(lane+3 mod w),
// simd_broadcast(lane 5), simd_shuffle_down(1); per threadgroup (last slot): the threadgroup sum
// through simd_sum + threadgroup memory + barrier.
kernel void selftest_simd(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                          device float* tg_sums [[buffer(2)]], threadgroup float* partial [[threadgroup(0)]],
                          uint3 tgpig [[threadgroup_position_in_grid]],
                          uint3 tptg [[threads_per_threadgroup]],
                          ushort tid [[thread_index_in_threadgroup]],
                          ushort sgitg [[simdgroup_index_in_threadgroup]],
                          ushort tiisg [[thread_index_in_simdgroup]]) {
    const uint gid = tgpig.x * tptg.x + tid;
    const float x = in[gid];
    device float* o = out + gid * 6;
    o[0] = simd_sum(x);
    o[1] = simd_max(x);
    float v = x;
    for (ushort off = 16; off > 0; off /= 2) v += simd_shuffle_xor(v, off);
    o[2] = v;
    o[3] = simd_shuffle(x, ushort((tiisg + 3) % 32));
    o[4] = simd_broadcast(x, ushort(5));
    o[5] = simd_shuffle_down(x, ushort(1));
    const float s = simd_sum(x);
    if (tiisg == 0) partial[sgitg] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        float total = 0.0f;
        for (uint i = 0; i < (tptg.x + 31) / 32; ++i) total += partial[i];
        tg_sums[tgpig.x] = total;
    }
}

// C (16×16) = A (16×8) · B (8×16) with four SIMD groups, one 8×8 output block each, in float and
// in half (inputs rounded to half, accumulated as half).
kernel void selftest_simdgroup_matmul(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                                      device float* c [[buffer(2)]], device const half* ah [[buffer(3)]],
                                      device const half* bh [[buffer(4)]], device half* ch [[buffer(5)]],
                                      ushort sgitg [[simdgroup_index_in_threadgroup]]) {
    const uint bi = sgitg / 2, bj = sgitg % 2;
    simdgroup_float8x8 ma, mb, mc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_load(ma, a + bi * 8 * 8, 8);
    simdgroup_load(mb, b + bj * 8, 16);
    simdgroup_multiply_accumulate(mc, ma, mb, mc);
    simdgroup_store(mc, c + bi * 8 * 16 + bj * 8, 16);
    simdgroup_half8x8 ha, hb, hc = make_filled_simdgroup_matrix<half, 8, 8>(half(0.0f));
    simdgroup_load(ha, ah + bi * 8 * 8, 8);
    simdgroup_load(hb, bh + bj * 8, 16);
    simdgroup_multiply_accumulate(hc, ha, hb, hc);
    simdgroup_store(hc, ch + bi * 8 * 16 + bj * 8, 16);
}

// A kernel whose barrier only the first SIMD group reaches (undefined on a GPU): the emulator must
// report it rather than hang.
kernel void selftest_divergent_barrier(device float* out [[buffer(0)]],
                                       ushort sgitg [[simdgroup_index_in_threadgroup]]) {
    if (sgitg == 0) threadgroup_barrier(mem_flags::mem_threadgroup);
    out[0] = 1.0f;
}
