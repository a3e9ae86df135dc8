// MSL host emulation: the fiber scheduler behind the shim (test support only).
//
// A dispatch runs threadgroups one after another on the calling OS thread. The threads of one
// threadgroup are cooperative fibers: a fiber runs until it reaches a threadgroup barrier, a
// SIMD-group collective (which is a SIMD-group barrier) or its end, then the next fiber runs.
// A barrier is released only when every thread it spans has reached it, so a kernel that forgets a
// barrier reads stale (NaN-filled) threadgroup memory here just as it would race on a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace msl_emu {

/// Width of a SIMD group on Apple GPUs.
constexpr uint32_t SIMD_WIDTH = 32;
/// Bytes each lane may publish in one SIMD-group collective.
constexpr size_t SIMD_SLOT_BYTES = 64;

struct Dim3 {
    uint32_t x, y, z;
};

/// What a kernel thread can ask about itself (the `[[...]]` attribute values).
struct ThreadCtx {
    Dim3 thread_in_tg;     // thread_position_in_threadgroup
    Dim3 tg_in_grid;       // threadgroup_position_in_grid
    Dim3 threads_per_tg;   // threads_per_threadgroup
    Dim3 tgs_per_grid;     // threadgroups_per_grid
    uint32_t linear;       // thread_index_in_threadgroup
    uint32_t lane;         // thread_index_in_simdgroup
    uint32_t simdgroup;    // simdgroup_index_in_threadgroup
    uint32_t simd_width;   // lanes in this SIMD group (the last one may be partial)
};

/// The running fiber's context.
const ThreadCtx& ctx();
/// Blocks until every thread of the threadgroup arrives.
void threadgroup_barrier_impl();
/// Blocks until every lane of the caller's SIMD group arrives.
void simdgroup_barrier_impl();
/// This SIMD group's exchange area: SIMD_WIDTH slots of SIMD_SLOT_BYTES.
unsigned char* simd_slots();
/// Threadgroup memory bound at `[[threadgroup(index)]]`.
void* threadgroup_memory(uint32_t index);

/// Runs `body` once per thread of a `grid` of threadgroups of `tg` threads, with threadgroup
/// memory buffers of the given byte sizes (filled with 0xFF, i.e. NaN for floats, at the start of
/// every threadgroup). Returns an empty string on success, else what went wrong (a barrier not
/// reached by all threads, a bad geometry).
std::string dispatch(Dim3 grid, Dim3 tg, const std::vector<size_t>& tg_mem_bytes,
                     const std::function<void()>& body);

}  // namespace msl_emu
