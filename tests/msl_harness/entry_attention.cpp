// Harness entries for metal/attention.metal.
#include "attention.metal"
#include "msl_entry.h"

namespace {

void set_constants(const uint8_t* c, size_t n) {
    mc_causal = n > MC_FC_CAUSAL && c[MC_FC_CAUSAL];
    mc_has_mask = n > MC_FC_HAS_MASK && c[MC_FC_HAS_MASK];
    mc_has_window = n > MC_FC_HAS_WINDOW && c[MC_FC_HAS_WINDOW];
}

#define ENTRY_ATTN(PRE, DEC, RED, T, D)                                                                     \
    {#PRE, [](void* const* b) {                                                                             \
         PRE((const T*)b[0], (const T*)b[1], (const T*)b[2], (const float*)b[3], (T*)b[4],                 \
             *(AttnArgs*)b[5], (float*)msl_emu::threadgroup_memory(0), msl_emu::tg_pos(),                   \
             ushort(msl_emu::linear_tid()), msl_emu::simdgroup(), msl_emu::lane());                        \
     }},                                                                                                    \
    {#DEC, [](void* const* b) {                                                                             \
         DEC((const T*)b[0], (const T*)b[1], (const T*)b[2], (const float*)b[3], (float*)b[4],             \
             (float*)b[5], *(AttnArgs*)b[6], (float*)msl_emu::threadgroup_memory(0), msl_emu::tg_pos(),     \
             ushort(msl_emu::linear_tid()), msl_emu::simdgroup(), msl_emu::lane());                        \
     }},                                                                                                    \
    {#RED, [](void* const* b) {                                                                             \
         RED((const float*)b[0], (const float*)b[1], (T*)b[2], *(AttnArgs*)b[3], msl_emu::tg_pos(),        \
             msl_emu::lane());                                                                             \
     }},

const msl_emu::KernelEntry TABLE[] = {MC_ATTN_KERNELS(ENTRY_ATTN)};

}  // namespace

MSL_EMU_DEFINE_RUN(attention, TABLE, set_constants)
