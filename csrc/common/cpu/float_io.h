// Loads and stores of float32 / float16 / bfloat16 arrays as float, for
// kernels compiled once per ISA (simd.h): one element, or one VecF of
// consecutive elements. The element type is a template argument so that the
// conversion is chosen at compile time, outside the kernels' loops.
#pragma once

#include "common/cpu/float_type.h"
#include "common/cpu/simd.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {

template <FloatType T>
MLX_EXT_INLINE float load_float(const void* p, int64_t i) {
  if constexpr (T == FloatType::f32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (T == FloatType::f16) {
    return half_to_float(static_cast<const uint16_t*>(p)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

template <FloatType T>
MLX_EXT_INLINE void store_float(void* p, int64_t i, float v) {
  if constexpr (T == FloatType::f32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (T == FloatType::f16) {
    static_cast<uint16_t*>(p)[i] = float_to_half(v);
  } else {
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  }
}

// Elements i .. i + kWidth - 1.
template <FloatType T>
MLX_EXT_INLINE VecF load_floats(const void* p, int64_t i) {
  if constexpr (T == FloatType::f32) {
    return load(static_cast<const float*>(p) + i);
  } else if constexpr (T == FloatType::f16) {
    return load_half(static_cast<const uint16_t*>(p) + i);
  } else {
    return load_bf16(static_cast<const uint16_t*>(p) + i);
  }
}

// Elements i .. i + kWidth - 1 = v, rounded to T (to nearest even).
template <FloatType T>
MLX_EXT_INLINE void store_floats(void* p, int64_t i, VecF v) {
  if constexpr (T == FloatType::f32) {
    store(static_cast<float*>(p) + i, v);
#if defined(MLX_EXT_ISA_avx512)
  } else if constexpr (T == FloatType::f16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i),
        _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(MLX_EXT_ISA_avx2)
  } else if constexpr (T == FloatType::f16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
        _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  } else {
    alignas(64) float lanes[kWidth];
    store(lanes, v);
    for (int l = 0; l < kWidth; ++l) store_float<T>(p, i + l, lanes[l]);
  }
}

// dst[0:n] = float(src[offset : offset + n]).
template <FloatType T>
void convert_to_float(const void* src, int64_t offset, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) store(dst + i, load_floats<T>(src, offset + i));
  for (; i < n; ++i) dst[i] = load_float<T>(src, offset + i);
}

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
