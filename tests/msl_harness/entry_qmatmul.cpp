// Harness entries for metal/qmatmul.metal.
#include "qmatmul.metal"
#include "msl_entry.h"

namespace {

void set_constants(const uint8_t* c, size_t n) { mc_has_lora = n > MC_FC_HAS_LORA && c[MC_FC_HAS_LORA]; }

#define ENTRY_QMATMUL(MV, MM, WT, T)                                                                        \
    {#MV, [](void* const* b) {                                                                              \
         MV((const uchar*)b[0], (const T*)b[1], (T*)b[2], *(QMatmulArgs*)b[3], (const T*)b[4],             \
            (const float*)b[5], (const float*)b[6], (const uint*)b[7], msl_emu::tg_pos(),                  \
            msl_emu::simdgroup(), msl_emu::lane());                                                        \
     }},                                                                                                    \
    {#MM, [](void* const* b) {                                                                              \
         MM((const uchar*)b[0], (const T*)b[1], (T*)b[2], *(QMatmulArgs*)b[3], (const T*)b[4],             \
            (const float*)b[5], (const float*)b[6], (const uint*)b[7],                                     \
            (float*)msl_emu::threadgroup_memory(0), msl_emu::tg_pos(), ushort(msl_emu::linear_tid()),       \
            msl_emu::simdgroup());                                                                         \
     }},
#define ENTRY_SHRINK(NAME, T)                                                                              \
    {#NAME, [](void* const* b) {                                                                            \
         NAME((const T*)b[0], (const T*)b[1], (const uint*)b[2], (float*)b[3], *(QMatmulArgs*)b[4],        \
              msl_emu::tg_pos(), msl_emu::simdgroup(), msl_emu::lane());                                   \
     }},

const msl_emu::KernelEntry TABLE[] = {MC_QMATMUL_KERNELS(ENTRY_QMATMUL) MC_SHRINK_KERNELS(ENTRY_SHRINK)};

}  // namespace

MSL_EMU_DEFINE_RUN(qmatmul, TABLE, set_constants)
