// Error records, and memory faults turned into them: buffers live between
// PROT_NONE guard zones; a SIGSEGV inside kernel code is classified by the
// faulting address and jumps back to the worker's scheduler.
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>

#include "internal.h"

namespace emu {

void vfail(Worker& w, const Fiber* f, int kind, const char* fmt, va_list ap) {
  LaunchState& S = *w.shared;
  if (S.failed.exchange(1) != 0) return;
  EmuError& e = *S.error;
  e.kind = kind;
  memcpy(e.threadgroup, w.group, sizeof e.threadgroup);
  e.thread = f ? int32_t(f->self.thread) : -1;
  e.simdgroup = f ? int32_t(f->self.simdgroup) : -1;
  e.lane = f ? int32_t(f->self.lane) : -1;
  int len = snprintf(e.message, sizeof e.message, "kernel '%s'", S.launch->kernel);
  if (w.in_group) {
    len += snprintf(e.message + len, sizeof e.message - size_t(len), " threadgroup (%u, %u, %u)",
                    w.group[0], w.group[1], w.group[2]);
  }
  if (f) {
    len += snprintf(e.message + len, sizeof e.message - size_t(len),
                    " thread %u (simdgroup %u, lane %u)", f->self.thread, f->self.simdgroup,
                    f->self.lane);
  }
  len += snprintf(e.message + len, sizeof e.message - size_t(len), ": ");
  vsnprintf(e.message + len, sizeof e.message - size_t(len), fmt, ap);
}

void fail(Worker& w, const Fiber* f, int kind, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(w, f, kind, fmt, ap);
  va_end(ap);
}

namespace {

struct sigaction old_segv, old_bus;

bool within(const char* p, const char* lo, const char* hi) { return p >= lo && p < hi; }

const char* access_kind(void* context) {
#if defined(__x86_64__)
  // Bit 1 of the page-fault error code: the access was a write.
  auto* uc = static_cast<ucontext_t*>(context);
  return (uc->uc_mcontext.gregs[REG_ERR] & 2) ? "write" : "read";
#else
  (void)context;
  return "access";
#endif
}

void describe_fault(Worker& w, const siginfo_t* si, void* context) {
  const char* addr = static_cast<const char*>(si->si_addr);
  const EmuLaunch& L = *w.shared->launch;
  const Fiber* f = w.current;
  for (int i = 0; i < EMU_MAX_BUFFERS; ++i) {
    const EmuRegion& r = L.regions[i];
    if (L.binding[i] == EMU_BIND_NONE || r.guard_lo == nullptr) continue;
    if (!within(addr, r.guard_lo, r.data_lo) && !within(addr, r.data_hi, r.guard_hi)) continue;
    if (L.binding[i] == EMU_BIND_UNBOUND) {
      fail(w, f, EMU_ERR_UNBOUND_BUFFER, "%s of unbound [[buffer(%d)]] (byte offset %td)",
           access_kind(context), i, addr - r.data);
    } else {
      fail(w, f, EMU_ERR_OUT_OF_BOUNDS,
           "out-of-bounds %s of [[buffer(%d)]] at byte offset %td (buffer of %llu bytes)",
           access_kind(context), i, addr - r.data, (unsigned long long)r.nbytes);
    }
    return;
  }
  if (within(addr, w.arena + EMU_THREADGROUP_LIMIT,
             w.arena + EMU_THREADGROUP_LIMIT + page_size())) {
    fail(w, f, EMU_ERR_OUT_OF_BOUNDS, "%s beyond the %d bytes of threadgroup memory",
         access_kind(context), EMU_THREADGROUP_LIMIT);
    return;
  }
  if (within(addr, w.stacks, w.stacks + EMU_MAX_THREADS * stack_stride()) &&
      size_t(addr - w.stacks) % stack_stride() < page_size()) {
    fail(w, f, EMU_ERR_STACK_OVERFLOW, "fiber stack overflow (%zu KiB per thread)",
         kStackBytes >> 10);
    return;
  }
  const char* poison = static_cast<const char*>(emu_poison_block());
  if (within(addr, poison, poison + page_size())) {
    fail(w, f, EMU_ERR_UNBOUND_BUFFER, "write through a reference argument that is not bound");
    return;
  }
  fail(w, f, EMU_ERR_FAULT, "%s at address %p (signal %d, code %d; a wild or misaligned pointer)",
       access_kind(context), si->si_addr, si->si_signo, si->si_code);
}

void on_fault(int sig, siginfo_t* si, void* context) {
  Worker* w = tls_worker;
  if (w == nullptr || w->current == nullptr) {
    // Not kernel code: let the previous handler (or the default) see it again.
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    (void)sig;
    return;
  }
  describe_fault(*w, si, context);
  siglongjmp(w->jump, 1);
}

}  // namespace

void install_fault_handlers() {
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
}

void restore_fault_handlers() {
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
}

}  // namespace emu

using namespace emu;

EMU_EXPORT int emu_region_alloc(uint64_t nbytes, int side, EmuRegion* r) {
  size_t page = page_size();
  size_t pages = (size_t(nbytes) + page - 1) / page * page;
  size_t total = kGuardZone + pages + kGuardZone;
  void* base = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return -1;
  r->guard_lo = static_cast<char*>(base);
  r->data_lo = r->guard_lo + kGuardZone;
  r->data_hi = r->data_lo + pages;
  r->guard_hi = r->data_hi + kGuardZone;
  r->nbytes = nbytes;
  if (pages && mprotect(r->data_lo, pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(base, total);
    return -1;
  }
  // Against the upper guard: exactly when that keeps vector loads aligned
  // (sizes under 16 bytes or multiples of 16), else 16-aligned with a little
  // slack after the data.
  size_t padded = nbytes < 16 ? size_t(nbytes) : (size_t(nbytes) + 15) & ~size_t(15);
  r->data = side == 2 ? r->data_lo : r->data_hi - padded;
  // The slack around the data reads as NaN / -1, never as plausible values.
  memset(r->data_lo, 0xff, size_t(r->data - r->data_lo));
  memset(r->data + nbytes, 0xff, size_t(r->data_hi - (r->data + nbytes)));
  return 0;
}

EMU_EXPORT void emu_region_free(const EmuRegion* r) {
  munmap(r->guard_lo, size_t(r->guard_hi - r->guard_lo));
}

// Stands in for a reference argument left unbound on purpose (its
// function_constant is false): clang may hoist loads through references, so
// it must be readable; all 0xff (NaN / -1), read-only.
EMU_EXPORT void* emu_poison_block(void) {
  static void* block = [] {
    void* p = mmap(nullptr, page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    memset(p, 0xff, page_size());
    mprotect(p, page_size(), PROT_READ);
    return p;
  }();
  return block;
}
