// State shared by the runtime's source files (scheduler and fault handling).
#pragma once

#include <setjmp.h>

#include <atomic>
#include <cstdarg>

#include "abi.h"

namespace emu {

constexpr size_t kStackBytes = 128 << 10;  // per fiber, plus one guard page
constexpr size_t kGuardZone = 1 << 20;     // PROT_NONE bytes on each side of a buffer

enum class State : uint8_t { Ready, Barrier, Collective, Done };

struct Worker;

// One thread of the threadgroup being run.
struct Fiber {
  void* sp;  // saved stack pointer while suspended
  State state;
  EmuSite site;       // where it waits (Barrier / Collective)
  const char* what;   // which barrier or collective
  EmuSimdView* view;  // the completed collective it resumes from
  size_t tg_cursor;   // next free byte of threadgroup memory for its declarations
  EmuSelf self;
  EmuBuiltins builtins;
  Worker* worker;
};

// The lanes of one simdgroup. views[count & 1] collects the next collective
// while lanes may still read the previous one from the other view.
struct SimdGroup {
  EmuSimdView views[2];
  uint32_t members;  // lanes that exist (the last simdgroup may be partial)
  uint32_t arrived;  // lanes waiting at a collective
  uint32_t done;     // lanes that returned
  uint32_t count;
};

// What all workers of one launch share.
struct LaunchState {
  const EmuLaunch* launch;
  EmuError* error;
  std::atomic<uint64_t> next_group{0};
  std::atomic<int> failed{0};
  uint64_t groups;
  uint32_t groups_per_grid[3];
  uint32_t dynamic_bytes;  // [[threadgroup(i)]] memory, placed first in the arena
  uint32_t dynamic_offset[EMU_MAX_BUFFERS];
};

// One OS thread running threadgroups; its memory is kept between launches.
struct Worker {
  LaunchState* shared;
  Fiber* fibers;     // EMU_MAX_THREADS
  SimdGroup* simd;   // EMU_MAX_THREADS / EMU_SIMD_WIDTH
  char* stacks;      // EMU_MAX_THREADS x (guard page + kStackBytes)
  char* arena;       // threadgroup memory, followed by a guard page
  char* altstack;    // signal stack for SIGSEGV on this thread
  uint32_t* order;   // schedule of the current pass
  void* sched_sp;    // scheduler context while a fiber runs
  sigjmp_buf jump;   // back to run_group on an error inside a fiber
  Fiber* current;
  bool in_group;         // false while validating a launch: no threadgroup to name
  uint32_t group[3];
  uint32_t threads;      // in this group
  uint32_t live;         // threads that have not returned
  uint32_t at_barrier;   // threads waiting at threadgroup_barrier
  uint64_t rng;
  void* threadgroup_buffers[EMU_MAX_BUFFERS];
};

extern thread_local Worker* tls_worker;

size_t page_size();
size_t stack_stride();  // guard page + stack

// Records the launch's first error; later errors (other workers) are dropped.
// `f` names the thread; null when the error concerns no single thread.
void fail(Worker& w, const Fiber* f, int kind, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
void vfail(Worker& w, const Fiber* f, int kind, const char* fmt, va_list ap);

// Installs / restores the SIGSEGV and SIGBUS handlers around one launch.
void install_fault_handlers();
void restore_fault_handlers();

}  // namespace emu
