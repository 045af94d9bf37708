// Fiber context switch: saves the callee-saved registers on the current stack,
// stores the stack pointer in *save_sp, loads load_sp and restores the
// registers saved there. ucontext would also save the signal mask with a
// system call, 15-20x slower.
//
//   void emu_fiber_switch(void** save_sp, void* load_sp);
//   emu_fiber_entry: first "return address" of a new fiber; calls fn(arg),
//   with fn and arg taken from the registers of the initial frame
//   (fiber.h builds that frame).

#if defined(__x86_64__)

// Frame (low to high): r15 r14 r13 r12 rbx rbp, return address.
// New fiber: r13 = fn, r12 = arg.
  .text
  .globl emu_fiber_switch
  .hidden emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch

  .globl emu_fiber_entry
  .hidden emu_fiber_entry
  .type emu_fiber_entry, @function
emu_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_entry, .-emu_fiber_entry

  .section .note.GNU-stack, "", @progbits

#elif defined(__aarch64__)

// Frame (low to high, 160 bytes): x19..x28, x29, x30 (return address),
// d8..d15. New fiber: x20 = fn, x19 = arg.
  .text
  .globl emu_fiber_switch
  .hidden emu_fiber_switch
  .type emu_fiber_switch, %function
emu_fiber_switch:
  sub sp, sp, #160
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #160
  ret
  .size emu_fiber_switch, .-emu_fiber_switch

  .globl emu_fiber_entry
  .hidden emu_fiber_entry
  .type emu_fiber_entry, %function
emu_fiber_entry:
  mov x0, x19
  blr x20
  brk #0
  .size emu_fiber_entry, .-emu_fiber_entry

  .section .note.GNU-stack, "", %progbits

#else
#error "the Metal emulator's fibers support x86-64 and aarch64 only"
#endif
