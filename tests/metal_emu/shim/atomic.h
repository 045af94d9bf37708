// MSL atomics through the __atomic builtins. Threads of one threadgroup
// interleave only at scheduling points, so atomics matter between
// threadgroups run by different workers. Operations are relaxed (all that
// MSL's atomic functions offer); fences are sequentially consistent.
#pragma once

#include "simd.h"

namespace metal {

enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst,
};
enum thread_scope {
  thread_scope_thread,
  thread_scope_simdgroup,
  thread_scope_threadgroup,
  thread_scope_device,
};

template <class T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;

template <class T>
using emu_atomic_value = std::type_identity_t<T>;

template <class T>
void atomic_store_explicit(atomic<T>* obj, emu_atomic_value<T> v, memory_order) {
  __atomic_store(&obj->value, &v, __ATOMIC_RELAXED);
}
template <class T>
T atomic_load_explicit(const atomic<T>* obj, memory_order) {
  T v;
  __atomic_load(&obj->value, &v, __ATOMIC_RELAXED);
  return v;
}
template <class T>
T atomic_exchange_explicit(atomic<T>* obj, emu_atomic_value<T> v, memory_order) {
  T old;
  __atomic_exchange(&obj->value, &v, &old, __ATOMIC_RELAXED);
  return old;
}
template <class T>
bool atomic_compare_exchange_weak_explicit(atomic<T>* obj, T* expected, emu_atomic_value<T> desired,
                                           memory_order, memory_order) {
  return __atomic_compare_exchange(&obj->value, expected, &desired, true, __ATOMIC_RELAXED,
                                   __ATOMIC_RELAXED);
}
template <class T>
bool atomic_compare_exchange_strong_explicit(atomic<T>* obj, T* expected,
                                             emu_atomic_value<T> desired, memory_order,
                                             memory_order) {
  return __atomic_compare_exchange(&obj->value, expected, &desired, false, __ATOMIC_RELAXED,
                                   __ATOMIC_RELAXED);
}

// Read-modify-write as a compare-exchange loop: covers float and min/max,
// which the integer __atomic_fetch_* builtins do not.
template <class T, class Op>
T emu_atomic_update(atomic<T>* obj, Op op) {
  T old;
  __atomic_load(&obj->value, &old, __ATOMIC_RELAXED);
  T desired = op(old);
  while (!__atomic_compare_exchange(&obj->value, &old, &desired, true, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED)) {
    desired = op(old);
  }
  return old;
}

#define EMU_ATOMIC_FETCH(name, expr)                                                \
  template <class T>                                                                \
  T atomic_fetch_##name##_explicit(atomic<T>* obj, emu_atomic_value<T> v, memory_order) { \
    return emu_atomic_update(obj, [v](T old) { return T(expr); });                  \
  }
EMU_ATOMIC_FETCH(add, old + v)
EMU_ATOMIC_FETCH(sub, old - v)
EMU_ATOMIC_FETCH(and, old & v)
EMU_ATOMIC_FETCH(or, old | v)
EMU_ATOMIC_FETCH(xor, old ^ v)
EMU_ATOMIC_FETCH(min, old < v ? old : v)
EMU_ATOMIC_FETCH(max, old > v ? old : v)
#undef EMU_ATOMIC_FETCH

inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

}  // namespace metal
