// The harness's C ABI: one `msl_emu_run_<family>` per translation unit, looking kernels up by name.
#pragma once

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "msl_sched.h"

namespace msl_emu {

struct KernelEntry {
    const char* name;
    void (*invoke)(void* const* buffers);
};

inline int fail(char* err, size_t err_len, const std::string& msg) {
    if (err_len > 0) {
        std::strncpy(err, msg.c_str(), err_len - 1);
        err[err_len - 1] = 0;
    }
    return 1;
}

/// Finds `name` in `table`, sets the family's function constants, runs the grid.
inline int run_table(const KernelEntry* table, size_t n_entries, void (*set_constants)(const uint8_t*, size_t),
                     const char* name, const uint8_t* constants, size_t n_constants, void* const* buffers,
                     const uint32_t* grid, const uint32_t* tg, const size_t* tg_mem, size_t n_tg_mem, char* err,
                     size_t err_len) {
    const KernelEntry* e = nullptr;
    for (size_t i = 0; i < n_entries; ++i)
        if (std::strcmp(table[i].name, name) == 0) e = &table[i];
    if (e == nullptr) return fail(err, err_len, std::string("no kernel named ") + name);
    set_constants(constants, n_constants);
    std::vector<size_t> mem(tg_mem, tg_mem + n_tg_mem);
    std::function<void()> body = [e, buffers] { e->invoke(buffers); };
    const std::string r = dispatch({grid[0], grid[1], grid[2]}, {tg[0], tg[1], tg[2]}, mem, body);
    if (!r.empty()) return fail(err, err_len, r);
    return 0;
}

}  // namespace msl_emu

#define MSL_EMU_DEFINE_RUN(FAMILY, TABLE, SET_CONSTANTS)                                                      \
    extern "C" int msl_emu_run_##FAMILY(const char* name, const uint8_t* constants, size_t n_constants,       \
                                        void* const* buffers, const uint32_t* grid, const uint32_t* tg,       \
                                        const size_t* tg_mem, size_t n_tg_mem, char* err, size_t err_len) {   \
        return msl_emu::run_table(TABLE, sizeof(TABLE) / sizeof(TABLE[0]), SET_CONSTANTS, name, constants,    \
                                  n_constants, buffers, grid, tg, tg_mem, n_tg_mem, err, err_len);            \
    }
