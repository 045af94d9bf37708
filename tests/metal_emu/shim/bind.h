// What the rewriter's output and the generated entry wrappers call: kernel
// argument binding, function constants as runtime slots, and threadgroup
// variables placed in the group's memory arena.
#pragma once

#include "../runtime/abi.h"
#include "vec.h"

namespace emu_bind {

// Type of parameter I of a function pointer type.
template <class F>
struct params;
template <class R, class... A>
struct params<R (*)(A...)> {
  template <int I>
  using type = __type_pack_element<I, A...>;
};
template <class F, int I>
using param_t = typename params<F>::template type<I>;

// [[buffer(i)]]: a pointer, a reference (constant T&) or a struct by value.
template <class P>
P buffer(void* p) {
  if constexpr (std::is_pointer_v<P>) {
    return static_cast<P>(p);
  } else if constexpr (std::is_reference_v<P>) {
    return *static_cast<std::remove_reference_t<P>*>(p);
  } else {
    return *static_cast<const P*>(p);
  }
}

// Builtins: scalar attributes, or the first N coordinates of a 3-D one.
template <class P>
P builtin(uint32_t v) {
  return P(v);
}
template <class P>
P builtin(const uint32_t (&v)[3]) {
  if constexpr (metal::is_vector_v<P>) {
    using E = std::remove_cvref_t<decltype(std::declval<P>()[0])>;
    if constexpr (metal::vec_elements<P>::value == 2) return P(E(v[0]), E(v[1]));
    else return P(E(v[0]), E(v[1]), E(v[2]));
  } else {
    return P(v[0]);
  }
}

}  // namespace emu_bind

// Function constants: the values of one launch, by slot (the rewriter numbers
// the file's function constants; library.py fills the slots by index).
inline uint64_t emu_function_constant_values[256];
inline bool emu_function_constant_set[256];

EMU_EXPORT void emu_set_function_constants(const uint64_t* values, const uint8_t* set, int n) {
  for (int i = 0; i < n; ++i) {
    emu_function_constant_values[i] = values[i];
    emu_function_constant_set[i] = set[i] != 0;
  }
}

// `constant T name [[function_constant(index)]];` becomes one of these.
template <class T, int Slot>
struct emu_function_constant {
  const char* name;
  int index;
  operator T() const {
    if (!emu_function_constant_set[Slot]) {
      emu_kernel_error(EMU_ERR_FUNCTION_CONSTANT,
                       "function constant '%s' (index %d) is read but was not set", name, index);
    }
    T v;
    __builtin_memcpy(&v, &emu_function_constant_values[Slot], sizeof(T));
    return v;
  }
};
template <class T, int Slot>
bool is_function_constant_defined(const emu_function_constant<T, Slot>&) {
  return emu_function_constant_set[Slot];
}

// A program-scope constant computed from function constants, evaluated at use.
template <class T>
struct emu_derived_constant {
  T (*value)();
  operator T() const { return value(); }
};

// `threadgroup T name[N];` inside a function becomes a reference to
// threadgroup memory: emu_threadgroup_ref<T[N]> name = emu_threadgroup_var<T[N]>();
template <class T>
using emu_threadgroup_ref = T&;
template <class T>
T& emu_threadgroup_var() {
  return *static_cast<T*>(emu_threadgroup_alloc(sizeof(T), alignof(T)));
}
