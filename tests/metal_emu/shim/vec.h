// MSL vectors: vec<T, N> for N = 2, 3, 4 with MSL's layout (a 3-vector is
// padded to 4 elements, vectors are aligned to their padded size), x/y/z/w
// and r/g/b/a components, all swizzles (MS properties: read, and write where
// no component repeats), element-wise operators, and explicit element-wise
// conversions. Not clang's ext_vector_type: it turns float4(uint4) into a
// bit cast.
#pragma once

#include <initializer_list>

#include "swizzles.h"
#include "types.h"

namespace metal {

namespace emu_vec {
// Components a constructor argument contributes: float4(float2, float, float).
template <class A>
constexpr int components = is_vector_v<A> ? vec_elements<remove_cv_t<A>>::value
                                          : (is_scalar_v<A> ? 1 : 0);
}  // namespace emu_vec

#define EMU_SWIZZLE_GET(n, name, ...) \
  vec<T, n> __get_##name() const { return this->template swizzle<__VA_ARGS__>(); }
#define EMU_SWIZZLE_R(n, name, ...)   \
  EMU_SWIZZLE_GET(n, name, __VA_ARGS__) \
  __declspec(property(get = __get_##name)) vec<T, n> name;
#define EMU_SWIZZLE_W(n, name, ...)                                                     \
  EMU_SWIZZLE_GET(n, name, __VA_ARGS__)                                                 \
  void __put_##name(vec<T, n> v) { this->template swizzle_put<__VA_ARGS__>(v); }        \
  __declspec(property(get = __get_##name, put = __put_##name)) vec<T, n> name;
#define EMU_SWIZZLE(mode, n, xyzw, rgba, ...) \
  EMU_SWIZZLE_##mode(n, xyzw, __VA_ARGS__) EMU_SWIZZLE_##mode(n, rgba, __VA_ARGS__)

#define EMU_SWIZZLE_HELPERS                                            \
  template <int... I>                                                  \
  vec<T, sizeof...(I)> swizzle() const {                               \
    return vec<T, sizeof...(I)>(s[I]...);                              \
  }                                                                    \
  template <int... I>                                                  \
  void swizzle_put(vec<T, sizeof...(I)> v) {                           \
    int k = 0;                                                         \
    ((s[I] = v[k++]), ...);                                            \
  }

// Storage and components; the union gives x/y/z/w and r/g/b/a as lvalues.
template <class T, int N>
struct vec_base;

template <class T>
struct alignas(2 * sizeof(T)) vec_base<T, 2> {
  union {
    T s[2];
    struct { T x, y; };
    struct { T r, g; };
  };
  EMU_SWIZZLE_HELPERS
  EMU_SWIZZLES_XY(EMU_SWIZZLE)
};

template <class T>
struct alignas(4 * sizeof(T)) vec_base<T, 3> {
  union {
    T s[4];
    struct { T x, y, z; };
    struct { T r, g, b; };
  };
  EMU_SWIZZLE_HELPERS
  EMU_SWIZZLES_XY(EMU_SWIZZLE)
  EMU_SWIZZLES_XYZ(EMU_SWIZZLE)
};

template <class T>
struct alignas(4 * sizeof(T)) vec_base<T, 4> {
  union {
    T s[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
  };
  EMU_SWIZZLE_HELPERS
  EMU_SWIZZLES_XY(EMU_SWIZZLE)
  EMU_SWIZZLES_XYZ(EMU_SWIZZLE)
  EMU_SWIZZLES_XYZW(EMU_SWIZZLE)
};

#define EMU_VEC_ARITHMETIC(op)                                            \
  friend constexpr vec operator op(vec a, const vec& b) {                 \
    for (int i = 0; i < N; ++i) a.s[i] = T(a.s[i] op b.s[i]);             \
    return a;                                                             \
  }                                                                       \
  constexpr vec& operator op##=(const vec& b) {                           \
    for (int i = 0; i < N; ++i) this->s[i] = T(this->s[i] op b.s[i]);     \
    return *this;                                                         \
  }

#define EMU_VEC_BOOLEAN(op)                                                   \
  friend constexpr vec<bool, N> operator op(const vec& a, const vec& b) {     \
    vec<bool, N> r;                                                           \
    for (int i = 0; i < N; ++i) r.s[i] = a.s[i] op b.s[i];                    \
    return r;                                                                 \
  }

template <class T, int N>
struct vec : vec_base<T, N> {
  static_assert(N >= 2 && N <= 4, "MSL vectors have 2, 3 or 4 elements");

  vec() = default;

  // Broadcast, implicit as in MSL: float4 v = 0;
  template <class U, enable_if_t<is_scalar_v<U>, int> = 0>
  constexpr vec(U v) {
    for (int i = 0; i < N; ++i) this->s[i] = T(v);
  }

  // Element-wise conversion, explicit as in MSL: float4(int4(...)).
  template <class U, enable_if_t<!is_same_v<U, T>, int> = 0>
  constexpr explicit vec(const vec<U, N>& v) {
    for (int i = 0; i < N; ++i) this->s[i] = emu_static_cast<T>(v.s[i]);
  }

  // Braces of same-typed scalars fill leading elements and zero the rest,
  // as for clang's vectors: uint4 k = {a, b, c};
  template <class U, enable_if_t<is_scalar_v<U>, int> = 0>
  constexpr vec(std::initializer_list<U> list) : vec_base<T, N>{} {
    int k = 0;
    for (U u : list) {
      if (k < N) this->s[k++] = T(u);
    }
  }

  // Concatenation of scalars and vectors: float4(xy, z, w).
  template <class... A,
            enable_if_t<(sizeof...(A) > 1) && (emu_vec::components<A> + ...) == N, int> = 0>
  constexpr vec(const A&... parts) {
    int k = 0;
    (append(k, parts), ...);
  }

  constexpr T& operator[](int i) { return this->s[i]; }
  constexpr const T& operator[](int i) const { return this->s[i]; }

  EMU_VEC_ARITHMETIC(+)
  EMU_VEC_ARITHMETIC(-)
  EMU_VEC_ARITHMETIC(*)
  EMU_VEC_ARITHMETIC(/)
  EMU_VEC_ARITHMETIC(%)
  EMU_VEC_ARITHMETIC(&)
  EMU_VEC_ARITHMETIC(|)
  EMU_VEC_ARITHMETIC(^)
  EMU_VEC_ARITHMETIC(<<)
  EMU_VEC_ARITHMETIC(>>)
  EMU_VEC_BOOLEAN(==)
  EMU_VEC_BOOLEAN(!=)
  EMU_VEC_BOOLEAN(<)
  EMU_VEC_BOOLEAN(<=)
  EMU_VEC_BOOLEAN(>)
  EMU_VEC_BOOLEAN(>=)
  EMU_VEC_BOOLEAN(&&)
  EMU_VEC_BOOLEAN(||)

  friend constexpr vec operator-(vec a) {
    for (int i = 0; i < N; ++i) a.s[i] = T(-a.s[i]);
    return a;
  }
  friend constexpr vec operator+(const vec& a) { return a; }
  friend constexpr vec operator~(vec a) {
    for (int i = 0; i < N; ++i) a.s[i] = T(~a.s[i]);
    return a;
  }
  friend constexpr vec<bool, N> operator!(const vec& a) {
    vec<bool, N> r;
    for (int i = 0; i < N; ++i) r.s[i] = !a.s[i];
    return r;
  }

 private:
  template <class A>
  constexpr void append(int& k, const A& part) {
    if constexpr (is_vector_v<A>) {
      for (int j = 0; j < vec_elements<A>::value; ++j) this->s[k++] = emu_static_cast<T>(part[j]);
    } else {
      this->s[k++] = emu_static_cast<T>(part);
    }
  }
};

#undef EMU_VEC_ARITHMETIC
#undef EMU_VEC_BOOLEAN

namespace emu_vec {
// Applies f to each element (of each argument): the element-wise functions.
template <class T, int N, class F>
constexpr auto map(const vec<T, N>& a, F f) {
  vec<decltype(f(a[0])), N> r;
  for (int i = 0; i < N; ++i) r[i] = f(a[i]);
  return r;
}
template <class T, class U, int N, class F>
constexpr auto map(const vec<T, N>& a, const vec<U, N>& b, F f) {
  vec<decltype(f(a[0], b[0])), N> r;
  for (int i = 0; i < N; ++i) r[i] = f(a[i], b[i]);
  return r;
}
template <class T, class U, class V, int N, class F>
constexpr auto map(const vec<T, N>& a, const vec<U, N>& b, const vec<V, N>& c, F f) {
  vec<decltype(f(a[0], b[0], c[0])), N> r;
  for (int i = 0; i < N; ++i) r[i] = f(a[i], b[i], c[i]);
  return r;
}
}  // namespace emu_vec

inline constexpr bool all(bool b) { return b; }
inline constexpr bool any(bool b) { return b; }
template <int N>
constexpr bool all(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i)
    if (!v[i]) return false;
  return true;
}
template <int N>
constexpr bool any(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i)
    if (v[i]) return true;
  return false;
}

}  // namespace metal

#define EMU_VEC_TYPEDEFS(T, name)          \
  typedef metal::vec<T, 2> name##2;        \
  typedef metal::vec<T, 3> name##3;        \
  typedef metal::vec<T, 4> name##4;        \
  namespace metal {                        \
  using ::name##2;                         \
  using ::name##3;                         \
  using ::name##4;                         \
  }

EMU_VEC_TYPEDEFS(float, float)
EMU_VEC_TYPEDEFS(half, half)
EMU_VEC_TYPEDEFS(bfloat, bfloat)
EMU_VEC_TYPEDEFS(int, int)
EMU_VEC_TYPEDEFS(uint, uint)
EMU_VEC_TYPEDEFS(short, short)
EMU_VEC_TYPEDEFS(ushort, ushort)
EMU_VEC_TYPEDEFS(char, char)
EMU_VEC_TYPEDEFS(uchar, uchar)
EMU_VEC_TYPEDEFS(long, long)
EMU_VEC_TYPEDEFS(ulong, ulong)
EMU_VEC_TYPEDEFS(bool, bool)

#undef EMU_VEC_TYPEDEFS
