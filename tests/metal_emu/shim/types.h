// MSL scalar types, type traits, numeric_limits and as_type.
// half is _Float16 and bfloat is __bf16 (clang >= 17), both arithmetic types.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <limits>
#include <type_traits>

typedef _Float16 half;
typedef __bf16 bfloat;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace metal {

template <class T, int N>
struct vec;

using ::bfloat;
using ::half;
using ::uchar;
using ::uint;
using ::ulong;
using ::ushort;

using std::add_const;
using std::add_const_t;
using std::bool_constant;
using std::conditional;
using std::conditional_t;
using std::decay;
using std::decay_t;
using std::declval;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_base_of;
using std::is_base_of_v;
using std::is_class;
using std::is_class_v;
using std::is_const;
using std::is_const_v;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_pointer;
using std::is_pointer_v;
using std::is_reference;
using std::is_reference_v;
using std::is_same;
using std::is_same_v;
using std::is_trivially_copyable;
using std::is_trivially_copyable_v;
using std::is_void;
using std::is_void_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_pointer;
using std::remove_pointer_t;
using std::remove_reference;
using std::remove_reference_t;
using std::remove_volatile;
using std::remove_volatile_t;
using std::true_type;

// Apple-internal helpers MLX uses under `#pragma METAL internals`.
template <class... B>
using _disjunction = std::disjunction<B...>;
template <class... B>
using _conjunction = std::conjunction<B...>;
template <class B>
using _negation = std::negation<B>;

// uniform<T> only promises the compiler that a value is the same in every
// thread; here it is T itself.
template <class T>
using uniform = T;
template <class T>
constexpr T make_uniform(T v) {
  return v;
}

// The emulator erases address spaces, so removing one is the identity.
template <class T>
struct remove_addrspace {
  using type = T;
};
template <class T>
using remove_addrspace_t = typename remove_addrspace<T>::type;

// libstdc++ 12 does not count _Float16 / __bf16 as floating point.
template <class T>
struct is_floating_point
    : bool_constant<std::is_floating_point_v<remove_cv_t<T>> || is_same_v<remove_cv_t<T>, half> ||
                    is_same_v<remove_cv_t<T>, bfloat>> {};
template <class T>
constexpr bool is_floating_point_v = is_floating_point<T>::value;

template <class T>
struct is_arithmetic : bool_constant<is_integral_v<T> || is_floating_point_v<T>> {};
template <class T>
constexpr bool is_arithmetic_v = is_arithmetic<T>::value;

template <class T>
struct is_scalar : is_arithmetic<T> {};
template <class T>
constexpr bool is_scalar_v = is_scalar<T>::value;

template <class T>
struct is_signed : bool_constant<is_floating_point_v<T> || std::is_signed_v<T>> {};
template <class T>
constexpr bool is_signed_v = is_signed<T>::value;

template <class T>
struct is_unsigned : bool_constant<std::is_unsigned_v<T>> {};
template <class T>
constexpr bool is_unsigned_v = is_unsigned<T>::value;

template <class T>
struct is_vector : false_type {};
template <class T, int N>
struct is_vector<vec<T, N>> : true_type {};
template <class T>
constexpr bool is_vector_v = is_vector<remove_cv_t<T>>::value;

template <class T>
struct vec_elements : integral_constant<int, 1> {};
template <class T, int N>
struct vec_elements<vec<T, N>> : integral_constant<int, N> {};

template <class T>
struct numeric_limits : std::numeric_limits<T> {};

// Limits of a 16-bit float format given by its bit patterns.
template <class T, uint16_t Max, uint16_t Min, uint16_t Eps, uint16_t Inf, uint16_t NaN,
          int Digits>
struct float16_limits {
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = Digits;
  static constexpr T bits(uint16_t b) { return __builtin_bit_cast(T, b); }
  static constexpr T max() { return bits(Max); }
  static constexpr T min() { return bits(Min); }
  static constexpr T lowest() { return bits(uint16_t(Max | 0x8000)); }
  static constexpr T epsilon() { return bits(Eps); }
  static constexpr T infinity() { return bits(Inf); }
  static constexpr T quiet_NaN() { return bits(NaN); }
  static constexpr T denorm_min() { return bits(1); }
};
template <>
struct numeric_limits<half> : float16_limits<half, 0x7bff, 0x0400, 0x1400, 0x7c00, 0x7e00, 11> {};
template <>
struct numeric_limits<bfloat> : float16_limits<bfloat, 0x7f7f, 0x0080, 0x3c00, 0x7f80, 0x7fc0, 8> {};

// static_cast as the rewriter spells it: clang refuses any conversion
// between _Float16 and __bf16 (neither range contains the other), MSL allows
// it explicitly; it goes through float.
template <class To, class From>
constexpr To emu_static_cast(From x) {
  using T = remove_cv_t<To>;
  if constexpr ((is_same_v<T, half> && is_same_v<From, bfloat>) ||
                (is_same_v<T, bfloat> && is_same_v<From, half>)) {
    return To(float(x));
  } else {
    return static_cast<To>(x);
  }
}

template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  return __builtin_bit_cast(To, x);
}

// MSL's fixed-size array.
template <class T, size_t N>
struct array {
  T elems[N];
  T& operator[](size_t i) { return elems[i]; }
  const T& operator[](size_t i) const { return elems[i]; }
  static constexpr size_t size() { return N; }
  T* data() { return elems; }
  const T* data() const { return elems; }
};

}  // namespace metal
