// Initial frames for new fibers, matching the register order of
// fiber_switch.S: the first emu_fiber_switch to the returned stack pointer
// "returns" into emu_fiber_entry, which calls fn(arg).
#pragma once

extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_entry(void);

namespace emu {

// `top` is the 16-byte aligned end of the fiber's stack.
inline void* fiber_frame(char* top, void (*fn)(void*), void* arg) {
#if defined(__x86_64__)
  // 6 registers + return address are popped; emu_fiber_entry's call then
  // needs rsp 16-aligned, so the frame starts 72 bytes below the top.
  void** sp = reinterpret_cast<void**>(top - 72);
  for (int i = 0; i < 9; ++i) sp[i] = nullptr;
  sp[2] = reinterpret_cast<void*>(fn);  // r13
  sp[3] = arg;                          // r12
  sp[6] = reinterpret_cast<void*>(&emu_fiber_entry);
#elif defined(__aarch64__)
  void** sp = reinterpret_cast<void**>(top - 160);
  for (int i = 0; i < 20; ++i) sp[i] = nullptr;
  sp[0] = arg;                                        // x19
  sp[1] = reinterpret_cast<void*>(fn);                // x20
  sp[11] = reinterpret_cast<void*>(&emu_fiber_entry); // x30
#endif
  return sp;
}

}  // namespace emu
