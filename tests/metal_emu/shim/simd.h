// Barriers and every simd_* / quad_* collective. A collective publishes the
// lane's value into the simdgroup's slots and waits (a scheduling point);
// once every lane that has not returned arrived, each lane reads the slots.
// Reductions and scans are computed once, by the first lane to resume, into
// the view's shared buffer. Quad functions are the same over 4-lane segments.
// Reading an inactive lane is undefined: an error under `strict`, else NaN
// (all bits set) under `poison`, else zero.
#pragma once

#include "../runtime/abi.h"
#include "math.h"

namespace metal {

enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }

inline void threadgroup_barrier(mem_flags, EmuSite site = EMU_HERE) {
  emu_threadgroup_barrier(site);
}
inline void simdgroup_barrier(mem_flags, EmuSite site = EMU_HERE) {
  emu_simd_sync(nullptr, 0, "simdgroup_barrier", site);
}

// A ballot: bit i set when lane i voted true; all() and any() are over the
// lanes that took part.
template <class V>
struct emu_vote {
  typedef V vote_t;
  constexpr explicit emu_vote(vote_t v = 0, vote_t active = vote_t(~0ull)) : v(v), active(active) {}
  constexpr explicit operator vote_t() const { return v; }
  constexpr bool all() const { return (v & active) == active; }
  constexpr bool any() const { return v != 0; }
  vote_t v, active;
};
typedef emu_vote<ulong> simd_vote;
typedef emu_vote<ushort> quad_vote;

namespace emu_simd {

template <class T>
T load(const unsigned char* p) {
  T v;
  __builtin_memcpy(&v, p, sizeof(T));
  return v;
}

template <class P>
EmuSimdView* publish(const P& payload, const char* what, EmuSite site) {
  static_assert(sizeof(P) <= EMU_SLOT_BYTES, "collective argument too large");
  return emu_simd_sync(&payload, sizeof(P), what, site);
}

template <class T>
T undefined_read(const char* what, uint src) {
  const EmuSelf* me = emu_self();
  if (me->strict) {
    emu_kernel_error(EMU_ERR_STRICT, "%s reads lane %u, which is inactive (strict)", what, src);
  }
  T r;
  __builtin_memset(&r, me->poison ? 0xff : 0, sizeof r);
  return r;
}

template <class T>
T read_lane(const EmuSimdView* v, uint src, const char* what) {
  if (src >= EMU_SIMD_WIDTH || !((v->active >> src) & 1)) return undefined_read<T>(what, src);
  return load<T>(v->slot[src]);
}

// Lanes of segment `base` (W lanes) that took part.
template <uint W>
uint segment_active(const EmuSimdView* v, uint base) {
  return (v->active >> base) & (W == 32 ? ~0u : (1u << W) - 1);
}

inline uint my_lane() { return emu_self()->lane; }

template <uint W, class T>
T shuffle(T x, uint index, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  uint lane = my_lane();
  if (index >= W) return undefined_read<T>(what, index);
  return read_lane<T>(v, lane / W * W + index, what);
}
template <uint W, class T>
T shuffle_up(T x, uint delta, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  uint lane = my_lane();
  return lane % W >= delta ? read_lane<T>(v, lane - delta, what) : x;
}
template <uint W, class T>
T shuffle_down(T x, uint delta, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  uint lane = my_lane();
  return lane % W + delta < W ? read_lane<T>(v, lane + delta, what) : x;
}
template <uint W, class T>
T shuffle_xor(T x, uint mask, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  uint lane = my_lane();
  uint j = (lane % W) ^ mask;
  return j < W ? read_lane<T>(v, lane / W * W + j, what) : undefined_read<T>(what, j);
}
template <uint W, class T>
T shuffle_rotate(T x, int delta, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  uint lane = my_lane();
  uint j = uint(int(lane % W) + delta % int(W) + int(W)) % W;
  return read_lane<T>(v, lane / W * W + j, what);
}
// Within groups of `modulo` lanes: data from delta lanes up (down), and past
// the group's end `filling` wrapped around from its start (end).
template <uint W, class T>
T shuffle_and_fill(T x, T filling, int delta, uint modulo, const char* what, EmuSite site) {
  struct Pair {
    T data, fill;
  };
  EmuSimdView* v = publish(Pair{x, filling}, what, site);
  uint lane = my_lane();
  if (modulo == 0 || modulo > W) modulo = W;
  int i = int(lane % modulo);
  int group = int(lane) - i;
  int j = i + delta;
  if (j >= 0 && j < int(modulo)) return read_lane<Pair>(v, uint(group + j), what).data;
  return read_lane<Pair>(v, uint(group + (j + int(modulo)) % int(modulo)), what).fill;
}
template <uint W, class T>
T broadcast(T x, uint index, const char* what, EmuSite site) {
  return shuffle<W>(x, index, what, site);
}
template <uint W, class T>
T broadcast_first(T x, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  uint base = my_lane() / W * W;
  return load<T>(v->slot[base + __builtin_ctz(segment_active<W>(v, base))]);
}

// Fills the view's shared buffer once with every lane's result.
template <class T, class Compute>
T shared_result(EmuSimdView* v, Compute compute) {
  static_assert(sizeof(T) * EMU_SIMD_WIDTH <= EMU_SHARED_BYTES, "collective result too large");
  if (!v->shared_ready) {
    v->shared_ready = 1;
    T out[EMU_SIMD_WIDTH];
    compute(out);
    __builtin_memcpy(v->shared, out, sizeof out);
  }
  return load<T>(v->shared + my_lane() * sizeof(T));
}

template <uint W, class T, class Op>
T reduce(T x, Op op, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  return shared_result<T>(v, [&](T* out) {
    for (uint base = 0; base < EMU_SIMD_WIDTH; base += W) {
      uint seg = segment_active<W>(v, base);
      if (!seg) continue;
      T acc = load<T>(v->slot[base + __builtin_ctz(seg)]);
      for (uint m = seg & (seg - 1); m; m &= m - 1) {
        acc = op(acc, load<T>(v->slot[base + __builtin_ctz(m)]));
      }
      for (uint l = 0; l < W; ++l) out[base + l] = acc;
    }
  });
}

template <uint W, bool Inclusive, class T, class Op>
T scan(T x, T identity, Op op, const char* what, EmuSite site) {
  EmuSimdView* v = publish(x, what, site);
  return shared_result<T>(v, [&](T* out) {
    for (uint base = 0; base < EMU_SIMD_WIDTH; base += W) {
      T acc = identity;
      for (uint l = base; l < base + W; ++l) {
        if (!((v->active >> l) & 1)) continue;
        T value = load<T>(v->slot[l]);
        if (Inclusive) acc = op(acc, value);
        out[l] = acc;
        if (!Inclusive) acc = op(acc, value);
      }
    }
  });
}

// Bit i (i within the segment): lane i is active and voted true.
template <uint W, class Vote>
Vote ballot(bool b, const char* what, EmuSite site) {
  EmuSimdView* v = publish(b, what, site);
  uint base = my_lane() / W * W;
  uint active = segment_active<W>(v, base), mask = 0;
  for (uint m = active; m; m &= m - 1) {
    uint l = __builtin_ctz(m);
    if (load<bool>(v->slot[base + l])) mask |= 1u << l;
  }
  return Vote(mask, active);
}
template <uint W>
uint active_mask(const char* what, EmuSite site) {
  EmuSimdView* v = publish(true, what, site);
  return segment_active<W>(v, my_lane() / W * W);
}

struct Plus {
  template <class T>
  T operator()(T a, T b) const { return a + b; }
};
struct Times {
  template <class T>
  T operator()(T a, T b) const { return a * b; }
};
struct Min {
  template <class T>
  T operator()(T a, T b) const { return metal::min(a, b); }
};
struct Max {
  template <class T>
  T operator()(T a, T b) const { return metal::max(a, b); }
};
// Bitwise reductions; on floating-point values (MLX's bfloat simd_xor calls
// the float one) they act on the bit patterns.
template <class T>
struct element {
  using type = T;
};
template <class T, int N>
struct element<vec<T, N>> {
  using type = T;
};
template <class T, class Op>
T bitwise(T a, T b, Op op) {
  if constexpr (is_integral_v<typename element<T>::type>) {
    return op(a, b);
  } else {
    unsigned char x[sizeof(T)], y[sizeof(T)];
    __builtin_memcpy(x, &a, sizeof(T));
    __builtin_memcpy(y, &b, sizeof(T));
    for (size_t i = 0; i < sizeof(T); ++i) x[i] = (unsigned char)op(x[i], y[i]);
    __builtin_memcpy(&a, x, sizeof(T));
    return a;
  }
}
struct And {
  template <class T>
  T operator()(T a, T b) const { return bitwise(a, b, [](auto x, auto y) { return x & y; }); }
};
struct Or {
  template <class T>
  T operator()(T a, T b) const { return bitwise(a, b, [](auto x, auto y) { return x | y; }); }
};
struct Xor {
  template <class T>
  T operator()(T a, T b) const { return bitwise(a, b, [](auto x, auto y) { return x ^ y; }); }
};

}  // namespace emu_simd

// The simd_* (W = 32) and quad_* (W = 4) families from one definition.
#define EMU_COLLECTIVES(P, W, vote)                                                          \
  template <class T>                                                                         \
  T P##_shuffle(T x, ushort lane, EmuSite s = EMU_HERE) {                                    \
    return emu_simd::shuffle<W>(x, lane, #P "_shuffle", s);                                  \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_shuffle_up(T x, ushort delta, EmuSite s = EMU_HERE) {                                \
    return emu_simd::shuffle_up<W>(x, delta, #P "_shuffle_up", s);                           \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_shuffle_down(T x, ushort delta, EmuSite s = EMU_HERE) {                              \
    return emu_simd::shuffle_down<W>(x, delta, #P "_shuffle_down", s);                       \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_shuffle_xor(T x, ushort mask, EmuSite s = EMU_HERE) {                                \
    return emu_simd::shuffle_xor<W>(x, mask, #P "_shuffle_xor", s);                          \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_shuffle_rotate_up(T x, ushort delta, EmuSite s = EMU_HERE) {                         \
    return emu_simd::shuffle_rotate<W>(x, -int(delta), #P "_shuffle_rotate_up", s);          \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_shuffle_rotate_down(T x, ushort delta, EmuSite s = EMU_HERE) {                       \
    return emu_simd::shuffle_rotate<W>(x, int(delta), #P "_shuffle_rotate_down", s);         \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_shuffle_and_fill_up(T x, T filling, ushort delta, ushort modulo = W,                 \
                            EmuSite s = EMU_HERE) {                                          \
    return emu_simd::shuffle_and_fill<W>(x, filling, -int(delta), modulo,                    \
                                         #P "_shuffle_and_fill_up", s);                      \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_shuffle_and_fill_down(T x, T filling, ushort delta, ushort modulo = W,               \
                              EmuSite s = EMU_HERE) {                                        \
    return emu_simd::shuffle_and_fill<W>(x, filling, int(delta), modulo,                     \
                                         #P "_shuffle_and_fill_down", s);                    \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_broadcast(T x, ushort lane, EmuSite s = EMU_HERE) {                                  \
    return emu_simd::broadcast<W>(x, lane, #P "_broadcast", s);                              \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_broadcast_first(T x, EmuSite s = EMU_HERE) {                                         \
    return emu_simd::broadcast_first<W>(x, #P "_broadcast_first", s);                        \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_sum(T x, EmuSite s = EMU_HERE) {                                                     \
    return emu_simd::reduce<W>(x, emu_simd::Plus{}, #P "_sum", s);                           \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_product(T x, EmuSite s = EMU_HERE) {                                                 \
    return emu_simd::reduce<W>(x, emu_simd::Times{}, #P "_product", s);                      \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_min(T x, EmuSite s = EMU_HERE) {                                                     \
    return emu_simd::reduce<W>(x, emu_simd::Min{}, #P "_min", s);                            \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_max(T x, EmuSite s = EMU_HERE) {                                                     \
    return emu_simd::reduce<W>(x, emu_simd::Max{}, #P "_max", s);                            \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_and(T x, EmuSite s = EMU_HERE) {                                                     \
    return emu_simd::reduce<W>(x, emu_simd::And{}, #P "_and", s);                            \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_or(T x, EmuSite s = EMU_HERE) {                                                      \
    return emu_simd::reduce<W>(x, emu_simd::Or{}, #P "_or", s);                              \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_xor(T x, EmuSite s = EMU_HERE) {                                                     \
    return emu_simd::reduce<W>(x, emu_simd::Xor{}, #P "_xor", s);                            \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_prefix_inclusive_sum(T x, EmuSite s = EMU_HERE) {                                    \
    return emu_simd::scan<W, true>(x, T(0), emu_simd::Plus{}, #P "_prefix_inclusive_sum", s); \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_prefix_exclusive_sum(T x, EmuSite s = EMU_HERE) {                                    \
    return emu_simd::scan<W, false>(x, T(0), emu_simd::Plus{}, #P "_prefix_exclusive_sum",   \
                                    s);                                                      \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_prefix_inclusive_product(T x, EmuSite s = EMU_HERE) {                                \
    return emu_simd::scan<W, true>(x, T(1), emu_simd::Times{},                               \
                                   #P "_prefix_inclusive_product", s);                       \
  }                                                                                          \
  template <class T>                                                                         \
  T P##_prefix_exclusive_product(T x, EmuSite s = EMU_HERE) {                                \
    return emu_simd::scan<W, false>(x, T(1), emu_simd::Times{},                              \
                                    #P "_prefix_exclusive_product", s);                      \
  }                                                                                          \
  inline vote P##_ballot(bool b, EmuSite s = EMU_HERE) {                                     \
    return emu_simd::ballot<W, vote>(b, #P "_ballot", s);                                    \
  }                                                                                          \
  inline vote P##_active_threads_mask(EmuSite s = EMU_HERE) {                                \
    uint active = emu_simd::active_mask<W>(#P "_active_threads_mask", s);                    \
    return vote(active, active);                                                             \
  }                                                                                          \
  inline bool P##_all(bool b, EmuSite s = EMU_HERE) {                                        \
    return emu_simd::ballot<W, vote>(b, #P "_all", s).all();                                 \
  }                                                                                          \
  inline bool P##_any(bool b, EmuSite s = EMU_HERE) {                                        \
    return emu_simd::ballot<W, vote>(b, #P "_any", s).any();                                 \
  }                                                                                          \
  inline bool P##_is_first(EmuSite s = EMU_HERE) {                                           \
    uint lane = emu_simd::my_lane();                                                         \
    uint mask = emu_simd::active_mask<W>(#P "_is_first", s);                                 \
    return uint(__builtin_ctz(mask)) == lane % W;                                            \
  }                                                                                          \
  inline bool P##_is_helper_thread() { return false; }

EMU_COLLECTIVES(simd, 32, simd_vote)
EMU_COLLECTIVES(quad, 4, quad_vote)

#undef EMU_COLLECTIVES

}  // namespace metal

// The builtins MLX's bf16_math.h calls to build its bfloat overloads.
template <class T>
T __metal_get_simdgroup_size(T) {
  return T(EMU_SIMD_WIDTH);
}
template <class T>
T __metal_get_thread_index_in_simdgroup(T) {
  return T(metal::emu_simd::my_lane());
}

#define EMU_METAL_BUILTIN(name, params, args)                          \
  template <class T>                                                   \
  T __metal_##name params {                                            \
    return metal::name args;                                           \
  }
EMU_METAL_BUILTIN(simd_broadcast, (T x, ushort l, EmuSite s = EMU_HERE), (x, l, s))
EMU_METAL_BUILTIN(simd_shuffle, (T x, ushort l, EmuSite s = EMU_HERE), (x, l, s))
EMU_METAL_BUILTIN(simd_shuffle_up, (T x, ushort d, EmuSite s = EMU_HERE), (x, d, s))
EMU_METAL_BUILTIN(simd_shuffle_down, (T x, ushort d, EmuSite s = EMU_HERE), (x, d, s))
EMU_METAL_BUILTIN(simd_shuffle_xor, (T x, ushort m, EmuSite s = EMU_HERE), (x, m, s))
EMU_METAL_BUILTIN(simd_shuffle_rotate_up, (T x, ushort d, EmuSite s = EMU_HERE), (x, d, s))
EMU_METAL_BUILTIN(simd_shuffle_rotate_down, (T x, ushort d, EmuSite s = EMU_HERE), (x, d, s))
EMU_METAL_BUILTIN(simd_shuffle_and_fill_up,
                  (T x, T f, ushort d, ushort m, EmuSite s = EMU_HERE), (x, f, d, m, s))
EMU_METAL_BUILTIN(simd_shuffle_and_fill_down,
                  (T x, T f, ushort d, ushort m, EmuSite s = EMU_HERE), (x, f, d, m, s))
EMU_METAL_BUILTIN(simd_sum, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_product, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_min, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_max, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_and, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_or, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_xor, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_prefix_inclusive_sum, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_prefix_exclusive_sum, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_prefix_inclusive_product, (T x, EmuSite s = EMU_HERE), (x, s))
EMU_METAL_BUILTIN(simd_prefix_exclusive_product, (T x, EmuSite s = EMU_HERE), (x, s))
#undef EMU_METAL_BUILTIN
