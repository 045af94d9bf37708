// MSL math through compiler builtins (no libc headers, so metal::abs cannot
// clash with ::abs). The __metal_* spellings are what MLX's bf16_math.h calls;
// metal::, metal::fast:: and metal::precise:: share one implementation
// (libm accuracy, not Apple's GPU math). half is computed in float.
#pragma once

#include "vec.h"

constexpr int __METAL_MAYBE_FAST_MATH__ = 0;
constexpr int __METAL_FAST_MATH__ = 1;
constexpr int __METAL_PRECISE_MATH__ = 2;

#define EMU_MATH1(name, expr)                                                       \
  inline float __metal_##name(float x, int = 0) { return expr; }                    \
  inline half __metal_##name(half x, int = 0) { return half(__metal_##name(float(x))); }
#define EMU_MATH2(name, expr)                                                       \
  inline float __metal_##name(float x, float y, int = 0) { return expr; }           \
  inline half __metal_##name(half x, half y, int = 0) {                             \
    return half(__metal_##name(float(x), float(y)));                                \
  }
#define EMU_MATH3(name, expr)                                                       \
  inline float __metal_##name(float x, float y, float z, int = 0) { return expr; }  \
  inline half __metal_##name(half x, half y, half z, int = 0) {                     \
    return half(__metal_##name(float(x), float(y), float(z)));                      \
  }

// MSL's math constants (macros in Apple's headers; constants here, since the
// kernel source was preprocessed without them).
constexpr float M_E_F = 2.71828182845904523536f;
constexpr float M_LOG2E_F = 1.44269504088896340736f;
constexpr float M_LOG10E_F = 0.434294481903251827651f;
constexpr float M_LN2_F = 0.693147180559945309417f;
constexpr float M_LN10_F = 2.30258509299404568402f;
constexpr float M_PI_F = 3.14159265358979323846f;
constexpr float M_PI_2_F = 1.57079632679489661923f;
constexpr float M_PI_4_F = 0.785398163397448309616f;
constexpr float M_1_PI_F = 0.318309886183790671538f;
constexpr float M_2_PI_F = 0.636619772367581343076f;
constexpr float M_2_SQRTPI_F = 1.12837916709551257390f;
constexpr float M_SQRT2_F = 1.41421356237309504880f;
constexpr float M_SQRT1_2_F = 0.707106781186547524401f;
constexpr half M_E_H = M_E_F, M_LOG2E_H = M_LOG2E_F, M_LOG10E_H = M_LOG10E_F, M_LN2_H = M_LN2_F,
               M_LN10_H = M_LN10_F, M_PI_H = M_PI_F, M_PI_2_H = M_PI_2_F, M_PI_4_H = M_PI_4_F,
               M_1_PI_H = M_1_PI_F, M_2_PI_H = M_2_PI_F, M_2_SQRTPI_H = M_2_SQRTPI_F,
               M_SQRT2_H = M_SQRT2_F, M_SQRT1_2_H = M_SQRT1_2_F;
constexpr float MAXFLOAT = 3.40282346638528859812e+38f;
constexpr float HUGE_VALF = __builtin_inff();
constexpr float INFINITY = __builtin_inff();
constexpr float NAN = __builtin_nanf("");
constexpr float FLT_MAX = 3.40282346638528859812e+38f;
constexpr float FLT_MIN = 1.17549435082228750797e-38f;
constexpr float FLT_EPSILON = 1.1920928955078125e-07f;
constexpr half HALF_MAX = half(65504.0f);
constexpr half HALF_MIN = half(6.103515625e-05f);
constexpr half HALF_EPSILON = half(0.0009765625f);

constexpr float emu_pi = M_PI_F;

EMU_MATH1(acos, __builtin_acosf(x))
EMU_MATH1(acosh, __builtin_acoshf(x))
EMU_MATH1(asin, __builtin_asinf(x))
EMU_MATH1(asinh, __builtin_asinhf(x))
EMU_MATH1(atan, __builtin_atanf(x))
EMU_MATH1(atanh, __builtin_atanhf(x))
EMU_MATH1(ceil, __builtin_ceilf(x))
EMU_MATH1(cos, __builtin_cosf(x))
EMU_MATH1(cosh, __builtin_coshf(x))
EMU_MATH1(cospi, __builtin_cosf(emu_pi * x))
EMU_MATH1(exp, __builtin_expf(x))
EMU_MATH1(exp10, __builtin_exp10f(x))
EMU_MATH1(exp2, __builtin_exp2f(x))
EMU_MATH1(fabs, __builtin_fabsf(x))
EMU_MATH1(floor, __builtin_floorf(x))
EMU_MATH1(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
EMU_MATH1(log, __builtin_logf(x))
EMU_MATH1(log10, __builtin_log10f(x))
EMU_MATH1(log2, __builtin_log2f(x))
EMU_MATH1(rint, __builtin_rintf(x))
EMU_MATH1(round, __builtin_roundf(x))
EMU_MATH1(rsqrt, 1.0f / __builtin_sqrtf(x))
EMU_MATH1(sin, __builtin_sinf(x))
EMU_MATH1(sinh, __builtin_sinhf(x))
EMU_MATH1(sinpi, __builtin_sinf(emu_pi * x))
EMU_MATH1(sqrt, __builtin_sqrtf(x))
EMU_MATH1(tan, __builtin_tanf(x))
EMU_MATH1(tanh, __builtin_tanhf(x))
EMU_MATH1(tanpi, __builtin_tanf(emu_pi * x))
EMU_MATH1(trunc, __builtin_truncf(x))
EMU_MATH2(atan2, __builtin_atan2f(x, y))
EMU_MATH2(copysign, __builtin_copysignf(x, y))
EMU_MATH2(divide, x / y)
EMU_MATH2(fdim, __builtin_fdimf(x, y))
EMU_MATH2(fmax, __builtin_fmaxf(x, y))
EMU_MATH2(fmin, __builtin_fminf(x, y))
EMU_MATH2(fmod, __builtin_fmodf(x, y))
EMU_MATH2(nextafter, __builtin_nextafterf(x, y))
EMU_MATH2(pow, __builtin_powf(x, y))
EMU_MATH2(powr, __builtin_powf(x, y))
EMU_MATH3(fma, __builtin_fmaf(x, y, z))
EMU_MATH3(fmax3, __builtin_fmaxf(x, __builtin_fmaxf(y, z)))
EMU_MATH3(fmin3, __builtin_fminf(x, __builtin_fminf(y, z)))
EMU_MATH3(fmedian3, __builtin_fmaxf(__builtin_fminf(x, y), __builtin_fminf(__builtin_fmaxf(x, y), z)))

inline float __metal_ldexp(float x, int k, int = 0) { return __builtin_ldexpf(x, k); }
inline half __metal_ldexp(half x, int k, int = 0) { return half(__builtin_ldexpf(float(x), k)); }
inline float __metal_frexp(float x, int* e) { return __builtin_frexpf(x, e); }
inline half __metal_frexp(half x, int* e) { return half(__builtin_frexpf(float(x), e)); }

#undef EMU_MATH1
#undef EMU_MATH2
#undef EMU_MATH3

// The float functions of MSL, for one namespace (metal, fast, precise):
// scalar float and half overloads plus element-wise vector templates.
#define EMU_API1(name)                                                        \
  inline float name(float x) { return __metal_##name(x); }                    \
  inline half name(half x) { return __metal_##name(x); }                      \
  template <class T, int N>                                                   \
  vec<T, N> name(const vec<T, N>& x) {                                        \
    return emu_vec::map(x, [](T e) { return name(e); });                      \
  }
#define EMU_API2(name)                                                        \
  inline float name(float x, float y) { return __metal_##name(x, y); }        \
  inline half name(half x, half y) { return __metal_##name(x, y); }           \
  template <class T, int N>                                                   \
  vec<T, N> name(const vec<T, N>& x, const vec<T, N>& y) {                    \
    return emu_vec::map(x, y, [](T a, T b) { return name(a, b); });           \
  }
#define EMU_API3(name)                                                                \
  inline float name(float x, float y, float z) { return __metal_##name(x, y, z); }   \
  inline half name(half x, half y, half z) { return __metal_##name(x, y, z); }        \
  template <class T, int N>                                                           \
  vec<T, N> name(const vec<T, N>& x, const vec<T, N>& y, const vec<T, N>& z) {        \
    return emu_vec::map(x, y, z, [](T a, T b, T c) { return name(a, b, c); });        \
  }

#define EMU_FLOAT_API                                                             \
  EMU_API1(acos) EMU_API1(acosh) EMU_API1(asin) EMU_API1(asinh) EMU_API1(atan)    \
  EMU_API1(atanh) EMU_API1(ceil) EMU_API1(cos) EMU_API1(cosh) EMU_API1(cospi)     \
  EMU_API1(exp) EMU_API1(exp10) EMU_API1(exp2) EMU_API1(fabs) EMU_API1(floor)     \
  EMU_API1(fract) EMU_API1(log) EMU_API1(log10) EMU_API1(log2) EMU_API1(rint)     \
  EMU_API1(round) EMU_API1(rsqrt) EMU_API1(sin) EMU_API1(sinh) EMU_API1(sinpi)    \
  EMU_API1(sqrt) EMU_API1(tan) EMU_API1(tanh) EMU_API1(tanpi) EMU_API1(trunc)     \
  EMU_API2(atan2) EMU_API2(copysign) EMU_API2(divide) EMU_API2(fdim)              \
  EMU_API2(fmax) EMU_API2(fmin) EMU_API2(fmod) EMU_API2(nextafter) EMU_API2(pow)  \
  EMU_API2(powr) EMU_API3(fma) EMU_API3(fmax3) EMU_API3(fmin3) EMU_API3(fmedian3) \
  inline float ldexp(float x, int k) { return __metal_ldexp(x, k); }              \
  inline half ldexp(half x, int k) { return __metal_ldexp(x, k); }                \
  inline float frexp(float x, int& e) { return __metal_frexp(x, &e); }            \
  inline half frexp(half x, int& e) { return __metal_frexp(x, &e); }              \
  inline float modf(float x, float& i) {                                          \
    i = __builtin_truncf(x);                                                      \
    return x - i;                                                                 \
  }                                                                               \
  inline float sincos(float x, float& c) {                                        \
    c = __builtin_cosf(x);                                                        \
    return __builtin_sinf(x);                                                     \
  }

namespace metal {
EMU_FLOAT_API
namespace fast {
EMU_FLOAT_API
}
namespace precise {
EMU_FLOAT_API
}

// Functions over all arithmetic types (bfloat included unless MLX's
// bf16_math.h adds its own non-template overloads, which then win).
template <class T>
constexpr bool emu_float = is_floating_point_v<T>;

template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T abs(T x) {
  if constexpr (emu_float<T>) return T(__builtin_fabsf(float(x)));
  else if constexpr (is_signed_v<T>) return x < 0 ? T(-x) : x;
  else return x;
}
template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T max(T x, T y) {
  if constexpr (emu_float<T>) return T(__builtin_fmaxf(float(x), float(y)));
  else return x > y ? x : y;
}
template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T min(T x, T y) {
  if constexpr (emu_float<T>) return T(__builtin_fminf(float(x), float(y)));
  else return x < y ? x : y;
}
template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T max3(T x, T y, T z) { return max(x, max(y, z)); }
template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T min3(T x, T y, T z) { return min(x, min(y, z)); }
template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T median3(T x, T y, T z) { return max(min(x, y), min(max(x, y), z)); }
template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
T saturate(T x) { return clamp(x, T(0), T(1)); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
T mix(T x, T y, T a) { return T(float(x) + (float(y) - float(x)) * float(a)); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
T sign(T x) { return x > T(0) ? T(1) : x < T(0) ? T(-1) : x == x ? T(0) : x; }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
T step(T edge, T x) { return x < edge ? T(0) : T(1); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
T smoothstep(T e0, T e1, T x) {
  float t = float(clamp(T((float(x) - float(e0)) / (float(e1) - float(e0))), T(0), T(1)));
  return T(t * t * (3.0f - 2.0f * t));
}
template <class T, enable_if_t<is_arithmetic_v<T>, int> = 0>
T select(T a, T b, bool c) { return c ? b : a; }

template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
bool isnan(T x) { return x != x; }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
bool isnormal(T x) { return x == x && abs(x) >= numeric_limits<T>::min() && !isinf(x); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
bool signbit(T x) { return __builtin_signbit(float(x)); }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
bool isordered(T x, T y) { return x == x && y == y; }
template <class T, enable_if_t<is_floating_point_v<T>, int> = 0>
bool isunordered(T x, T y) { return !isordered(x, y); }

// Integer functions.
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T popcount(T x) { return T(__builtin_popcountll(make_unsigned_t<T>(x))); }
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T clz(T x) {
  constexpr int bits = 8 * sizeof(T);
  auto u = (unsigned long long)make_unsigned_t<T>(x);
  return T(u == 0 ? bits : __builtin_clzll(u) - (64 - bits));
}
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T ctz(T x) {
  auto u = (unsigned long long)make_unsigned_t<T>(x);
  return T(u == 0 ? 8 * sizeof(T) : __builtin_ctzll(u));
}
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T reverse_bits(T x) {
  make_unsigned_t<T> u = make_unsigned_t<T>(x), r = 0;
  for (unsigned i = 0; i < 8 * sizeof(T); ++i, u >>= 1) r = make_unsigned_t<T>((r << 1) | (u & 1));
  return T(r);
}
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T rotate(T x, T n) {
  constexpr unsigned bits = 8 * sizeof(T);
  auto u = make_unsigned_t<T>(x);
  unsigned k = unsigned(n) % bits;
  return T(k == 0 ? u : make_unsigned_t<T>((u << k) | (u >> (bits - k))));
}
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T extract_bits(T x, uint offset, uint bits) {
  if (bits == 0) return T(0);
  auto u = (unsigned long long)make_unsigned_t<T>(x) >> offset;
  unsigned long long mask = bits >= 64 ? ~0ull : (1ull << bits) - 1;
  u &= mask;
  if constexpr (is_signed_v<T>) {
    if (bits < 8 * sizeof(T) && (u >> (bits - 1)) & 1) u |= ~mask;  // sign-extend
  }
  return T(u);
}
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T insert_bits(T base, T insert, uint offset, uint bits) {
  unsigned long long mask = (bits >= 64 ? ~0ull : (1ull << bits) - 1) << offset;
  auto b = (unsigned long long)make_unsigned_t<T>(base);
  auto i = (unsigned long long)make_unsigned_t<T>(insert) << offset;
  return T((b & ~mask) | (i & mask));
}
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T mulhi(T x, T y) {
  if constexpr (sizeof(T) == 8) {
    using W = conditional_t<is_signed_v<T>, __int128, unsigned __int128>;
    return T((W(x) * W(y)) >> 64);
  } else {
    return T((long long)(x) * (long long)(y) >> (8 * sizeof(T)));
  }
}
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T hadd(T x, T y) { return T((__int128(x) + __int128(y)) >> 1); }
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
T rhadd(T x, T y) { return T((__int128(x) + __int128(y) + 1) >> 1); }
template <class T, enable_if_t<is_integral_v<T>, int> = 0>
make_unsigned_t<T> absdiff(T x, T y) {
  return make_unsigned_t<T>(x > y ? x - y : y - x);
}
inline int mul24(int x, int y) { return (x << 8 >> 8) * (y << 8 >> 8); }
inline uint mul24(uint x, uint y) { return (x & 0xffffffu) * (y & 0xffffffu); }
inline int mad24(int x, int y, int z) { return mul24(x, y) + z; }
inline uint mad24(uint x, uint y, uint z) { return mul24(x, y) + z; }

// Element-wise vector forms, with a scalar second argument where MSL allows one.
#define EMU_VEC_FORM1(name)                                   \
  template <class T, int N>                                   \
  auto name(const vec<T, N>& x) {                             \
    return emu_vec::map(x, [](T a) { return name(a); });      \
  }
#define EMU_VEC_FORM2(name)                                                     \
  template <class T, int N>                                                     \
  vec<T, N> name(const vec<T, N>& x, const vec<T, N>& y) {                      \
    return emu_vec::map(x, y, [](T a, T b) { return name(a, b); });             \
  }                                                                             \
  template <class T, int N>                                                     \
  vec<T, N> name(const vec<T, N>& x, std::type_identity_t<T> y) {               \
    return name(x, vec<T, N>(y));                                               \
  }
#define EMU_VEC_FORM3(name)                                                            \
  template <class T, int N>                                                            \
  vec<T, N> name(const vec<T, N>& x, const vec<T, N>& y, const vec<T, N>& z) {         \
    return emu_vec::map(x, y, z, [](T a, T b, T c) { return name(a, b, c); });         \
  }

EMU_VEC_FORM1(abs)
EMU_VEC_FORM1(saturate)
EMU_VEC_FORM1(sign)
EMU_VEC_FORM1(isnan)
EMU_VEC_FORM1(isinf)
EMU_VEC_FORM1(isfinite)
EMU_VEC_FORM1(isnormal)
EMU_VEC_FORM1(signbit)
EMU_VEC_FORM1(popcount)
EMU_VEC_FORM1(clz)
EMU_VEC_FORM1(ctz)
EMU_VEC_FORM1(reverse_bits)
EMU_VEC_FORM2(max)
EMU_VEC_FORM2(min)
EMU_VEC_FORM2(step)
EMU_VEC_FORM2(rotate)
EMU_VEC_FORM2(mulhi)
EMU_VEC_FORM2(hadd)
EMU_VEC_FORM2(rhadd)
EMU_VEC_FORM3(max3)
EMU_VEC_FORM3(min3)
EMU_VEC_FORM3(median3)
EMU_VEC_FORM3(clamp)
EMU_VEC_FORM3(mix)
EMU_VEC_FORM3(smoothstep)

#undef EMU_VEC_FORM1
#undef EMU_VEC_FORM2
#undef EMU_VEC_FORM3

template <class T, int N>
vec<T, N> clamp(const vec<T, N>& x, std::type_identity_t<T> lo, std::type_identity_t<T> hi) {
  return clamp(x, vec<T, N>(lo), vec<T, N>(hi));
}
template <class T, int N>
vec<T, N> mix(const vec<T, N>& x, const vec<T, N>& y, std::type_identity_t<T> a) {
  return mix(x, y, vec<T, N>(a));
}
template <class T, int N>
vec<T, N> smoothstep(std::type_identity_t<T> e0, std::type_identity_t<T> e1, const vec<T, N>& x) {
  return smoothstep(vec<T, N>(e0), vec<T, N>(e1), x);
}

template <class T, int N>
vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <class T, int N>
vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) {
  return c ? b : a;
}

// Geometric functions.
template <class T, int N>
T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = a[0] * b[0];
  for (int i = 1; i < N; ++i) s += a[i] * b[i];
  return s;
}
template <class T, int N>
T length_squared(const vec<T, N>& a) { return dot(a, a); }
template <class T, int N>
T length(const vec<T, N>& a) { return T(__builtin_sqrtf(float(dot(a, a)))); }
template <class T, int N>
T distance(const vec<T, N>& a, const vec<T, N>& b) { return length(a - b); }
template <class T, int N>
vec<T, N> normalize(const vec<T, N>& a) { return a * T(1.0f / float(length(a))); }
template <class T>
vec<T, 3> cross(const vec<T, 3>& a, const vec<T, 3>& b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

}  // namespace metal

#undef EMU_API1
#undef EMU_API2
#undef EMU_API3
#undef EMU_FLOAT_API
