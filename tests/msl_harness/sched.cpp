// Fiber scheduler for the MSL host emulation (see include/msl_sched.h).
//
// Fibers start through ucontext (makecontext/setcontext) and then switch with _setjmp/_longjmp,
// which do not save the signal mask and so avoid a system call per switch.
#include "msl_sched.h"

#include <csetjmp>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ucontext.h>

namespace msl_emu {
namespace {

constexpr size_t FIBER_STACK_BYTES = 128 * 1024;
constexpr uint32_t MAX_THREADS_PER_TG = 1024;

enum class State { Ready, AtThreadgroupBarrier, AtSimdBarrier, Done };

struct Fiber {
    ThreadCtx ctx{};
    State state = State::Ready;
    bool started = false;
    jmp_buf jb;
    ucontext_t uc;
    std::unique_ptr<unsigned char[]> stack;
};

struct Scheduler {
    std::vector<Fiber> fibers;
    std::vector<std::vector<unsigned char>> tg_mem;
    std::vector<std::vector<unsigned char>> slots;  // per SIMD group
    const std::function<void()>* body = nullptr;
    Fiber* current = nullptr;
    jmp_buf sched_jb;
};

thread_local Scheduler* g_sched = nullptr;

void fiber_entry() {
    Scheduler* s = g_sched;
    (*s->body)();
    s->current->state = State::Done;
    _longjmp(s->sched_jb, 1);
}

void yield_with(State st) {
    Scheduler* s = g_sched;
    Fiber* f = s->current;
    f->state = st;
    if (!_setjmp(f->jb)) _longjmp(s->sched_jb, 1);
}

void resume(Scheduler& s, Fiber& f) {
    s.current = &f;
    if (!_setjmp(s.sched_jb)) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.uc);
        }
        _longjmp(f.jb, 1);
    }
}

const char* state_name(State st) {
    switch (st) {
        case State::Ready: return "running";
        case State::AtThreadgroupBarrier: return "threadgroup_barrier";
        case State::AtSimdBarrier: return "simd collective";
        case State::Done: return "returned";
    }
    return "?";
}

// Releases every barrier all of whose threads have arrived. Returns false on a deadlock.
bool release(Scheduler& s, uint32_t n_simd, std::string& err) {
    bool any = false;
    const uint32_t n = static_cast<uint32_t>(s.fibers.size());
    for (uint32_t g = 0; g < n_simd; ++g) {
        uint32_t lo = g * SIMD_WIDTH, hi = std::min(n, lo + SIMD_WIDTH);
        bool all = true;
        for (uint32_t i = lo; i < hi; ++i) all = all && s.fibers[i].state == State::AtSimdBarrier;
        if (all) {
            for (uint32_t i = lo; i < hi; ++i) s.fibers[i].state = State::Ready;
            any = true;
        }
    }
    if (any) return true;
    bool all_tg = true, all_done = true;
    for (auto& f : s.fibers) {
        all_tg = all_tg && f.state == State::AtThreadgroupBarrier;
        all_done = all_done && f.state == State::Done;
    }
    if (all_done) return true;
    if (all_tg) {
        for (auto& f : s.fibers) f.state = State::Ready;
        return true;
    }
    err = "deadlock: a barrier or SIMD collective was not reached by all threads (";
    for (uint32_t i = 0; i < n; ++i) {
        if (i == 0 || s.fibers[i].state != s.fibers[i - 1].state) {
            err += " thread " + std::to_string(i) + ": " + state_name(s.fibers[i].state);
        }
    }
    err += " )";
    return false;
}

std::string run_threadgroup(Scheduler& s, Dim3 tg_id, Dim3 grid, Dim3 tg) {
    const uint32_t n = tg.x * tg.y * tg.z;
    const uint32_t n_simd = (n + SIMD_WIDTH - 1) / SIMD_WIDTH;
    for (auto& m : s.tg_mem) std::memset(m.data(), 0xFF, m.size());
    for (uint32_t i = 0; i < n; ++i) {
        Fiber& f = s.fibers[i];
        f.state = State::Ready;
        f.started = false;
        f.ctx.thread_in_tg = {i % tg.x, (i / tg.x) % tg.y, i / (tg.x * tg.y)};
        f.ctx.tg_in_grid = tg_id;
        f.ctx.threads_per_tg = tg;
        f.ctx.tgs_per_grid = grid;
        f.ctx.linear = i;
        f.ctx.lane = i % SIMD_WIDTH;
        f.ctx.simdgroup = i / SIMD_WIDTH;
        f.ctx.simd_width = std::min(SIMD_WIDTH, n - f.ctx.simdgroup * SIMD_WIDTH);
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = f.stack.get();
        f.uc.uc_stack.ss_size = FIBER_STACK_BYTES;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, fiber_entry, 0);
    }
    for (;;) {
        bool ran = false;
        for (uint32_t i = 0; i < n; ++i) {
            if (s.fibers[i].state == State::Ready) {
                resume(s, s.fibers[i]);
                ran = true;
            }
        }
        bool done = true;
        for (auto& f : s.fibers) done = done && f.state == State::Done;
        if (done) return {};
        std::string err;
        if (!release(s, n_simd, err)) return err;
        (void)ran;
    }
}

}  // namespace

const ThreadCtx& ctx() { return g_sched->current->ctx; }

void threadgroup_barrier_impl() { yield_with(State::AtThreadgroupBarrier); }

void simdgroup_barrier_impl() { yield_with(State::AtSimdBarrier); }

unsigned char* simd_slots() { return g_sched->slots[g_sched->current->ctx.simdgroup].data(); }

void* threadgroup_memory(uint32_t index) {
    if (index >= g_sched->tg_mem.size()) return nullptr;
    return g_sched->tg_mem[index].data();
}

std::string dispatch(Dim3 grid, Dim3 tg, const std::vector<size_t>& tg_mem_bytes,
                     const std::function<void()>& body) {
    const uint64_t n = uint64_t(tg.x) * tg.y * tg.z;
    if (n == 0 || n > MAX_THREADS_PER_TG) return "bad threadgroup size " + std::to_string(n);
    if (g_sched != nullptr) return "nested dispatch";
    Scheduler s;
    s.body = &body;
    s.fibers.resize(n);
    for (auto& f : s.fibers) f.stack.reset(new unsigned char[FIBER_STACK_BYTES]);
    for (size_t b : tg_mem_bytes) s.tg_mem.emplace_back(b);
    s.slots.assign((n + SIMD_WIDTH - 1) / SIMD_WIDTH,
                   std::vector<unsigned char>(SIMD_WIDTH * SIMD_SLOT_BYTES));
    g_sched = &s;
    std::string err;
    for (uint32_t z = 0; z < grid.z && err.empty(); ++z)
        for (uint32_t y = 0; y < grid.y && err.empty(); ++y)
            for (uint32_t x = 0; x < grid.x && err.empty(); ++x)
                err = run_threadgroup(s, {x, y, z}, grid, tg);
    g_sched = nullptr;
    return err;
}

}  // namespace msl_emu
