// The interface between the emulator runtime (libmetal_emu_rt), the kernel
// libraries it runs (shim + rewritten .metal + generated wrappers) and Python
// (library.py mirrors the launch structs with ctypes: keep both in step).
#pragma once

#include <stddef.h>
#include <stdint.h>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

enum {
  EMU_MAX_BUFFERS = 31,        // [[buffer(0..30)]], as Metal
  EMU_MAX_THREADS = 1024,      // threads per threadgroup
  EMU_SIMD_WIDTH = 32,
  EMU_THREADGROUP_LIMIT = 32768,  // bytes of threadgroup memory per group
  EMU_SLOT_BYTES = 64,         // one lane's contribution to a collective
  EMU_SHARED_BYTES = 1024,     // per-collective result computed once (32 lanes x 32 B)
};

// Error kinds; library.py maps each to an exception class.
enum EmuErrorKind {
  EMU_OK = 0,
  EMU_ERR_DEADLOCK,
  EMU_ERR_BARRIER_MISMATCH,
  EMU_ERR_DIVERGENT_COLLECTIVE,
  EMU_ERR_OUT_OF_BOUNDS,
  EMU_ERR_UNBOUND_BUFFER,
  EMU_ERR_THREADGROUP_MEMORY,
  EMU_ERR_STACK_OVERFLOW,
  EMU_ERR_STRICT,              // undefined shuffle read / barrier after return
  EMU_ERR_FAULT,               // any other SIGSEGV/SIGBUS
  EMU_ERR_FUNCTION_CONSTANT,   // read of a function constant that was not set
  EMU_ERR_LAUNCH,              // bad launch parameters
};

// Builtin kernel arguments of one thread, named as the MSL attributes.
struct EmuBuiltins {
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threads_per_threadgroup[3];           // actual size of this group
  uint32_t dispatch_threads_per_threadgroup[3];  // size requested at launch
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t threads_per_simdgroup;
  uint32_t thread_index_in_quadgroup;
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
};

// One generated entry per instantiated kernel: binds the arguments with the
// kernel's own parameter types and calls it for one thread.
typedef void (*EmuEntry)(const EmuBuiltins* builtins,
                         void* const* buffers,
                         void* const* threadgroup_buffers);

// A buffer copy with PROT_NONE guard zones on both sides:
//   [guard_lo, data_lo) guard | [data_lo, data_hi) pages | [data_hi, guard_hi) guard
// `data` is placed against data_hi (check_bounds=1) or data_lo (=2).
struct EmuRegion {
  char* data;
  uint64_t nbytes;
  char* guard_lo;
  char* data_lo;
  char* data_hi;
  char* guard_hi;
};

enum EmuBinding { EMU_BIND_NONE = 0, EMU_BIND_DATA = 1, EMU_BIND_UNBOUND = 2 };

struct EmuLaunch {
  EmuEntry entry;
  const char* kernel;                      // host name, for messages
  uint32_t grid[3];                        // threads (dispatch_threads)
  uint32_t threadgroup[3];
  void* buffers[EMU_MAX_BUFFERS];
  struct EmuRegion regions[EMU_MAX_BUFFERS];  // guarded copies, for fault reports
  int32_t binding[EMU_MAX_BUFFERS];        // EmuBinding per index
  uint32_t threadgroup_bytes[EMU_MAX_BUFFERS];  // [[threadgroup(i)]] lengths
  int32_t schedule;                        // 0 forward, 1 reverse, 2 random
  int32_t poison;
  int32_t strict;
  int32_t workers;
  uint64_t seed;
};

struct EmuError {
  int32_t kind;  // EmuErrorKind
  uint32_t threadgroup[3];
  int32_t thread;     // thread_index_in_threadgroup, -1 if none
  int32_t simdgroup;
  int32_t lane;
  char message[4096];
};

// Where a barrier or collective was called: identifies it for the
// divergence checks and names it in messages.
struct EmuSite {
  const char* file;
  unsigned line;
  unsigned column;
};
#define EMU_HERE \
  EmuSite { __builtin_FILE(), __builtin_LINE(), __builtin_COLUMN() }

// What a lane sees after a collective completed. Lanes write `slot[lane]`
// before waiting; the first lane to resume fills `shared` (the collective's
// result for every lane) and sets `shared_ready`.
struct EmuSimdView {
  uint32_t active;  // bit i: lane i took part (lanes that returned are inactive)
  uint32_t shared_ready;
  alignas(16) unsigned char slot[EMU_SIMD_WIDTH][EMU_SLOT_BYTES];
  alignas(16) unsigned char shared[EMU_SHARED_BYTES];
};

// The calling fiber, for shim functions that need its lane or the options.
struct EmuSelf {
  uint32_t lane;
  uint32_t simdgroup;
  uint32_t thread;
  int32_t poison;
  int32_t strict;
};

// Called by kernel code (through the shim), always from a fiber.
EMU_EXPORT void emu_threadgroup_barrier(EmuSite site);
EMU_EXPORT EmuSimdView* emu_simd_sync(const void* value, unsigned size,
                                      const char* what, EmuSite site);
EMU_EXPORT void* emu_threadgroup_alloc(size_t size, size_t align);
EMU_EXPORT const EmuSelf* emu_self(void);
EMU_EXPORT __attribute__((noreturn, format(printf, 2, 3))) void emu_kernel_error(
    int kind, const char* fmt, ...);

// Called by Python.
EMU_EXPORT int emu_launch(const EmuLaunch* launch, EmuError* error);
EMU_EXPORT int emu_region_alloc(uint64_t nbytes, int side, EmuRegion* region);
EMU_EXPORT void emu_region_free(const EmuRegion* region);
EMU_EXPORT void* emu_poison_block(void);
// sizeof(EmuLaunch), sizeof(EmuError): library.py checks its ctypes mirrors.
EMU_EXPORT void emu_struct_sizes(size_t* launch, size_t* error);
