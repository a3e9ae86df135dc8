// Harness entries for selftest.metal, and the half/bfloat conversions for the Rust tests.
#include "selftest.metal"
#include "msl_entry.h"

namespace {

void set_constants(const uint8_t* c, size_t n) { st_use_barrier = n > 0 && c[0]; }

const msl_emu::KernelEntry TABLE[] = {
    {"selftest_barrier",
     [](void* const* b) {
         selftest_barrier((const float*)b[0], (float*)b[1], (float*)msl_emu::threadgroup_memory(0), msl_emu::tg_pos(),
                          msl_emu::tg_size(), ushort(msl_emu::linear_tid()));
     }},
    {"selftest_simd",
     [](void* const* b) {
         selftest_simd((const float*)b[0], (float*)b[1], (float*)b[2], (float*)msl_emu::threadgroup_memory(0),
                       msl_emu::tg_pos(), msl_emu::tg_size(), ushort(msl_emu::linear_tid()), msl_emu::simdgroup(),
                       msl_emu::lane());
     }},
    {"selftest_simdgroup_matmul",
     [](void* const* b) {
         selftest_simdgroup_matmul((const float*)b[0], (const float*)b[1], (float*)b[2], (const half*)b[3],
                                   (const half*)b[4], (half*)b[5], msl_emu::simdgroup());
     }},
    {"selftest_divergent_barrier", [](void* const* b) { selftest_divergent_barrier((float*)b[0], msl_emu::simdgroup()); }},
};

}  // namespace

MSL_EMU_DEFINE_RUN(selftest, TABLE, set_constants)

extern "C" uint16_t msl_emu_f32_to_f16(float f) { return half(f).bits; }
extern "C" float msl_emu_f16_to_f32(uint16_t h) {
    half x;
    x.bits = h;
    return float(x);
}
extern "C" uint16_t msl_emu_f32_to_bf16(float f) { return bfloat(f).bits; }
