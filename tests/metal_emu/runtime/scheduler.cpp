// Runs a grid of threadgroups: workers take groups from a shared counter; the
// threads of a group are fibers that switch only at threadgroup_barrier,
// simdgroup_barrier and simd/quad collectives (the scheduling points).
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "fiber.h"
#include "internal.h"

namespace emu {

thread_local Worker* tls_worker = nullptr;

size_t page_size() {
  static const size_t size = size_t(sysconf(_SC_PAGESIZE));
  return size;
}

size_t stack_stride() { return page_size() + kStackBytes; }

namespace {

void* map_or_die(size_t bytes, int prot) {
  void* p = mmap(nullptr, bytes, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    perror("metal_emu: mmap");
    abort();
  }
  return p;
}

// Worker memory is made once per worker slot and reused by later launches.
Worker* worker_slot(size_t index) {
  static std::vector<std::unique_ptr<Worker>> slots;
  while (slots.size() <= index) {
    auto w = std::make_unique<Worker>();
    w->fibers = new Fiber[EMU_MAX_THREADS];
    w->simd = new SimdGroup[EMU_MAX_THREADS / EMU_SIMD_WIDTH];
    w->order = new uint32_t[EMU_MAX_THREADS];
    // Each stack has a PROT_NONE guard page below it (stacks grow down).
    w->stacks = static_cast<char*>(map_or_die(EMU_MAX_THREADS * stack_stride(), PROT_NONE));
    for (size_t t = 0; t < EMU_MAX_THREADS; ++t) {
      mprotect(w->stacks + t * stack_stride() + page_size(), kStackBytes, PROT_READ | PROT_WRITE);
    }
    w->arena = static_cast<char*>(map_or_die(EMU_THREADGROUP_LIMIT + page_size(), PROT_NONE));
    mprotect(w->arena, EMU_THREADGROUP_LIMIT, PROT_READ | PROT_WRITE);
    w->altstack = new char[1 << 16];
    slots.push_back(std::move(w));
  }
  return slots[index].get();
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Worker* w = f->worker;
  w->shared->launch->entry(&f->builtins, w->shared->launch->buffers, w->threadgroup_buffers);
  f->state = State::Done;
  emu_fiber_switch(&f->sp, w->sched_sp);
  __builtin_unreachable();
}

void suspend(Worker& w, Fiber& f, State state, const char* what, EmuSite site) {
  f.state = state;
  f.what = what;
  f.site = site;
  emu_fiber_switch(&f.sp, w.sched_sp);
}

// "threads 0-31, 64" style list of the set bits of a per-thread predicate.
template <class Pred>
void describe_threads(char* out, size_t cap, uint32_t n, Pred pred) {
  size_t len = 0;
  out[0] = 0;
  for (uint32_t t = 0; t < n && len + 24 < cap; ++t) {
    if (!pred(t) || (t > 0 && pred(t - 1))) continue;
    uint32_t end = t;
    while (end + 1 < n && pred(end + 1)) ++end;
    len += size_t(snprintf(out + len, cap - len, len ? ", %u" : "%u", t));
    if (end > t) len += size_t(snprintf(out + len, cap - len, "-%u", end));
  }
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.what == b.what && a.site.line == b.site.line && a.site.column == b.site.column &&
         (a.site.file == b.site.file || strcmp(a.site.file, b.site.file) == 0);
}

// Describes each distinct (what, site) among the fibers selected by `pred`.
template <class Pred>
void describe_sites(Worker& w, char* out, size_t cap, Pred pred) {
  size_t len = 0;
  out[0] = 0;
  bool seen[EMU_MAX_THREADS] = {};
  for (uint32_t t = 0; t < w.threads && len + 64 < cap; ++t) {
    if (seen[t] || !pred(t)) continue;
    const Fiber& f = w.fibers[t];
    auto here = [&](uint32_t u) { return pred(u) && same_site(w.fibers[u], f); };
    for (uint32_t u = t; u < w.threads; ++u) seen[u] = seen[u] || here(u);
    char who[512];
    describe_threads(who, sizeof who, w.threads, here);
    len += size_t(snprintf(out + len, cap - len, "%sthreads %s at %s (%s:%u)", len ? "; " : "",
                           who, f.what, f.site.file, f.site.line));
  }
}

// A collective completes once every lane of the simdgroup that has not
// returned waits at it; lanes that returned are inactive lanes.
bool try_release_collective(Worker& w, uint32_t s) {
  SimdGroup& g = w.simd[s];
  if (g.arrived == 0 || (g.arrived | g.done) != g.members) return true;
  const Fiber* first = &w.fibers[s * EMU_SIMD_WIDTH + __builtin_ctz(g.arrived)];
  for (uint32_t m = g.arrived; m; m &= m - 1) {
    const Fiber& f = w.fibers[s * EMU_SIMD_WIDTH + __builtin_ctz(m)];
    if (!same_site(f, *first)) {
      char sites[2048];
      describe_sites(w, sites, sizeof sites, [&](uint32_t t) {
        return t / EMU_SIMD_WIDTH == s && w.fibers[t].state == State::Collective;
      });
      fail(w, first, EMU_ERR_DIVERGENT_COLLECTIVE,
           "divergent collectives in simdgroup %u: %s", s, sites);
      return false;
    }
  }
  EmuSimdView* view = &g.views[g.count & 1];
  view->active = g.arrived;
  view->shared_ready = 0;
  for (uint32_t m = g.arrived; m; m &= m - 1) {
    Fiber& f = w.fibers[s * EMU_SIMD_WIDTH + __builtin_ctz(m)];
    f.state = State::Ready;
    f.view = view;
  }
  g.arrived = 0;
  ++g.count;
  return true;
}

bool try_release_barrier(Worker& w) {
  if (w.at_barrier == 0 || w.at_barrier != w.live) return true;
  const Fiber* first = nullptr;
  for (uint32_t t = 0; t < w.threads; ++t) {
    const Fiber& f = w.fibers[t];
    if (f.state != State::Barrier) continue;
    if (!first) {
      first = &f;
    } else if (!same_site(f, *first)) {
      char sites[2048];
      describe_sites(w, sites, sizeof sites,
                     [&](uint32_t u) { return w.fibers[u].state == State::Barrier; });
      fail(w, first, EMU_ERR_BARRIER_MISMATCH, "threads at different barriers: %s", sites);
      return false;
    }
  }
  if (w.shared->launch->strict && w.live != w.threads) {
    char gone[512];
    describe_threads(gone, sizeof gone, w.threads,
                     [&](uint32_t t) { return w.fibers[t].state == State::Done; });
    fail(w, first, EMU_ERR_STRICT,
         "%s (%s:%u) reached after threads %s returned (strict)", first->what,
         first->site.file, first->site.line, gone);
    return false;
  }
  for (uint32_t t = 0; t < w.threads; ++t) {
    if (w.fibers[t].state == State::Barrier) w.fibers[t].state = State::Ready;
  }
  w.at_barrier = 0;
  return true;
}

// Accounts for the scheduling point fiber `f` just stopped at.
bool settle(Worker& w, Fiber& f) {
  uint32_t s = f.self.simdgroup;
  uint32_t bit = 1u << f.self.lane;
  switch (f.state) {
    case State::Done:
      --w.live;
      w.simd[s].done |= bit;
      return try_release_collective(w, s) && try_release_barrier(w);
    case State::Collective:
      w.simd[s].arrived |= bit;
      return try_release_collective(w, s);
    case State::Barrier:
      ++w.at_barrier;
      return try_release_barrier(w);
    case State::Ready:
      return true;
  }
  return true;
}

// Nothing can run: some lanes wait at a collective for lanes of their
// simdgroup that wait at a threadgroup barrier (the barrier in turn waits
// for them).
void diagnose_stall(Worker& w) {
  for (uint32_t s = 0; s * EMU_SIMD_WIDTH < w.threads; ++s) {
    const SimdGroup& g = w.simd[s];
    if (g.arrived == 0) continue;
    const Fiber* first = &w.fibers[s * EMU_SIMD_WIDTH + __builtin_ctz(g.arrived)];
    char sites[2048];
    describe_sites(w, sites, sizeof sites, [&](uint32_t t) {
      return t / EMU_SIMD_WIDTH == s && w.fibers[t].state != State::Done;
    });
    fail(w, first, EMU_ERR_DEADLOCK,
         "deadlock in simdgroup %u: a collective waits for lanes that wait at a "
         "threadgroup barrier: %s", s, sites);
    return;
  }
  char sites[2048];
  describe_sites(w, sites, sizeof sites,
                 [&](uint32_t t) { return w.fibers[t].state != State::Done; });
  fail(w, nullptr, EMU_ERR_DEADLOCK, "deadlock: %s", sites);
}

void make_order(Worker& w) {
  uint32_t n = w.threads;
  int schedule = w.shared->launch->schedule;
  for (uint32_t i = 0; i < n; ++i) w.order[i] = schedule == 1 ? n - 1 - i : i;
  if (schedule == 2) {
    for (uint32_t i = n - 1; i > 0; --i) {
      uint32_t j = uint32_t(splitmix64(w.rng) % (i + 1));
      uint32_t tmp = w.order[i];
      w.order[i] = w.order[j];
      w.order[j] = tmp;
    }
  }
}

void init_group(Worker& w, uint64_t linear) {
  const EmuLaunch& L = *w.shared->launch;
  const uint32_t* ng = w.shared->groups_per_grid;
  w.group[0] = uint32_t(linear % ng[0]);
  w.group[1] = uint32_t(linear / ng[0] % ng[1]);
  w.group[2] = uint32_t(linear / (uint64_t(ng[0]) * ng[1]));
  uint32_t size[3];
  for (int d = 0; d < 3; ++d) {
    size[d] = L.threadgroup[d];
    uint32_t start = w.group[d] * L.threadgroup[d];
    if (start + size[d] > L.grid[d]) size[d] = L.grid[d] - start;  // edge group
  }
  w.threads = size[0] * size[1] * size[2];
  w.live = w.threads;
  w.at_barrier = 0;
  w.rng = L.seed ^ (linear * 0x9e3779b97f4a7c15ull);
  uint32_t simdgroups = (w.threads + EMU_SIMD_WIDTH - 1) / EMU_SIMD_WIDTH;
  for (uint32_t s = 0; s < simdgroups; ++s) {
    uint32_t lanes = w.threads - s * EMU_SIMD_WIDTH;
    SimdGroup& g = w.simd[s];
    g.members = lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1;
    g.arrived = g.done = g.count = 0;
  }
  memset(w.arena, L.poison ? 0xff : 0, EMU_THREADGROUP_LIMIT);
  for (uint32_t t = 0; t < w.threads; ++t) {
    Fiber& f = w.fibers[t];
    f.worker = &w;
    f.state = State::Ready;
    f.tg_cursor = w.shared->dynamic_bytes;
    f.view = nullptr;
    f.self = EmuSelf{t % EMU_SIMD_WIDTH, t / EMU_SIMD_WIDTH, t, L.poison, L.strict};
    EmuBuiltins& b = f.builtins;
    uint32_t local[3] = {t % size[0], t / size[0] % size[1], t / (size[0] * size[1])};
    for (int d = 0; d < 3; ++d) {
      b.thread_position_in_threadgroup[d] = local[d];
      b.threadgroup_position_in_grid[d] = w.group[d];
      b.thread_position_in_grid[d] = w.group[d] * L.threadgroup[d] + local[d];
      b.threads_per_threadgroup[d] = size[d];
      b.dispatch_threads_per_threadgroup[d] = L.threadgroup[d];
      b.threadgroups_per_grid[d] = ng[d];
      b.threads_per_grid[d] = L.grid[d];
    }
    b.thread_index_in_threadgroup = t;
    b.thread_index_in_simdgroup = t % EMU_SIMD_WIDTH;
    b.simdgroup_index_in_threadgroup = t / EMU_SIMD_WIDTH;
    b.simdgroups_per_threadgroup = simdgroups;
    b.threads_per_simdgroup = EMU_SIMD_WIDTH;
    b.thread_index_in_quadgroup = t % 4;
    b.quadgroup_index_in_threadgroup = t / 4;
    b.quadgroups_per_threadgroup = (w.threads + 3) / 4;
    char* top = w.stacks + (t + 1) * stack_stride();
    f.sp = fiber_frame(top, fiber_main, &f);
  }
}

// Returns false when the launch failed (here or in another worker).
bool run_group(Worker& w, uint64_t linear) {
  init_group(w, linear);
  w.in_group = true;
  if (sigsetjmp(w.jump, 1)) {  // a fault or emu_kernel_error inside a fiber
    w.current = nullptr;
    return false;
  }
  while (w.live > 0) {
    make_order(w);
    bool ran = false;
    for (uint32_t i = 0; i < w.threads; ++i) {
      Fiber& f = w.fibers[w.order[i]];
      if (f.state != State::Ready) continue;
      ran = true;
      w.current = &f;
      emu_fiber_switch(&w.sched_sp, f.sp);
      w.current = nullptr;
      if (!settle(w, f)) return false;
    }
    if (w.shared->failed.load(std::memory_order_relaxed)) return false;
    if (!ran) {
      diagnose_stall(w);
      return false;
    }
  }
  return true;
}

void run_worker(Worker* w) {
  stack_t alt{}, old_alt{};
  alt.ss_sp = w->altstack;
  alt.ss_size = 1 << 16;
  sigaltstack(&alt, &old_alt);
  tls_worker = w;
  LaunchState& S = *w->shared;
  while (!S.failed.load(std::memory_order_relaxed)) {
    uint64_t g = S.next_group.fetch_add(1);
    if (g >= S.groups || !run_group(*w, g)) break;
  }
  tls_worker = nullptr;
  sigaltstack(&old_alt, nullptr);
}

bool validate(LaunchState& S, const EmuLaunch& L, Worker& w0) {
  uint64_t threads = uint64_t(L.threadgroup[0]) * L.threadgroup[1] * L.threadgroup[2];
  if (threads == 0 || threads > EMU_MAX_THREADS) {
    fail(w0, nullptr, EMU_ERR_LAUNCH, "threadgroup (%u, %u, %u) has %llu threads; 1..%d allowed",
         L.threadgroup[0], L.threadgroup[1], L.threadgroup[2], (unsigned long long)threads,
         EMU_MAX_THREADS);
    return false;
  }
  S.groups = 1;
  for (int d = 0; d < 3; ++d) {
    if (L.grid[d] == 0) {
      fail(w0, nullptr, EMU_ERR_LAUNCH, "grid (%u, %u, %u) is empty", L.grid[0], L.grid[1],
           L.grid[2]);
      return false;
    }
    S.groups_per_grid[d] = (L.grid[d] + L.threadgroup[d] - 1) / L.threadgroup[d];
    S.groups *= S.groups_per_grid[d];
  }
  uint32_t offset = 0;
  for (int i = 0; i < EMU_MAX_BUFFERS; ++i) {
    S.dynamic_offset[i] = offset;
    offset += (L.threadgroup_bytes[i] + 15) & ~15u;
  }
  S.dynamic_bytes = offset;
  if (offset > EMU_THREADGROUP_LIMIT) {
    fail(w0, nullptr, EMU_ERR_THREADGROUP_MEMORY,
         "threadgroup memory of %u bytes set for [[threadgroup(i)]] arguments exceeds the "
         "%d-byte limit", offset, EMU_THREADGROUP_LIMIT);
    return false;
  }
  return true;
}

}  // namespace

}  // namespace emu

using namespace emu;

EMU_EXPORT int emu_launch(const EmuLaunch* launch, EmuError* error) {
  memset(error, 0, sizeof *error);
  LaunchState S;
  S.launch = launch;
  S.error = error;
  int workers = launch->workers < 1 ? 1 : launch->workers;
  std::vector<Worker*> pool;
  for (int i = 0; i < workers; ++i) {
    pool.push_back(worker_slot(size_t(i)));
    pool.back()->shared = &S;
    pool.back()->current = nullptr;
    pool.back()->in_group = false;
  }
  if (!validate(S, *launch, *pool[0])) return error->kind;
  for (Worker* w : pool) {
    for (int i = 0; i < EMU_MAX_BUFFERS; ++i) {
      w->threadgroup_buffers[i] =
          launch->threadgroup_bytes[i] ? w->arena + S.dynamic_offset[i] : nullptr;
    }
  }
  if (uint64_t(workers) > S.groups) workers = int(S.groups);
  install_fault_handlers();
  std::vector<std::thread> threads;
  for (int i = 1; i < workers; ++i) threads.emplace_back(run_worker, pool[size_t(i)]);
  run_worker(pool[0]);
  for (auto& t : threads) t.join();
  restore_fault_handlers();
  return error->kind;
}

EMU_EXPORT void emu_struct_sizes(size_t* launch, size_t* error) {
  *launch = sizeof(EmuLaunch);
  *error = sizeof(EmuError);
}

EMU_EXPORT void emu_threadgroup_barrier(EmuSite site) {
  Worker& w = *tls_worker;
  suspend(w, *w.current, State::Barrier, "threadgroup_barrier", site);
}

EMU_EXPORT EmuSimdView* emu_simd_sync(const void* value, unsigned size, const char* what,
                                      EmuSite site) {
  Worker& w = *tls_worker;
  Fiber& f = *w.current;
  SimdGroup& g = w.simd[f.self.simdgroup];
  if (size) memcpy(g.views[g.count & 1].slot[f.self.lane], value, size);
  suspend(w, f, State::Collective, what, site);
  return f.view;
}

EMU_EXPORT void* emu_threadgroup_alloc(size_t size, size_t align) {
  Worker& w = *tls_worker;
  Fiber& f = *w.current;
  size_t offset = (f.tg_cursor + align - 1) & ~(align - 1);
  if (offset + size > EMU_THREADGROUP_LIMIT) {
    emu_kernel_error(EMU_ERR_THREADGROUP_MEMORY,
                     "threadgroup memory of %zu bytes (%u for [[threadgroup(i)]] arguments, "
                     "%zu declared) exceeds the %d-byte limit",
                     offset + size, w.shared->dynamic_bytes,
                     offset + size - w.shared->dynamic_bytes, EMU_THREADGROUP_LIMIT);
  }
  f.tg_cursor = offset + size;
  return w.arena + offset;
}

EMU_EXPORT const EmuSelf* emu_self(void) { return &tls_worker->current->self; }

EMU_EXPORT void emu_kernel_error(int kind, const char* fmt, ...) {
  Worker& w = *tls_worker;
  va_list ap;
  va_start(ap, fmt);
  vfail(w, w.current, kind, fmt, ap);
  va_end(ap);
  siglongjmp(w.jump, 1);
}
