// Float arrays stored as the kernels read them (float32, float16, bfloat16
// bit patterns), for the native checkers: values rounded to the type on the
// way in, widened exactly on the way out.
#pragma once

#include <cstdint>
#include <vector>

#include "common/cpu/float_type.h"
#include "common/cpu/simd.h" // the scalar build's conversions (MLX_EXT_ISA_scalar)

namespace mlx_ext::cpu {

inline uint16_t encode(FloatType t, float v) {
  return t == FloatType::f16 ? scalar::float_to_half(v) : scalar::float_to_bf16(v);
}

inline double decode(FloatType t, const void* p, size_t i) {
  if (t == FloatType::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return t == FloatType::f16 ? scalar::half_to_float(h) : scalar::bf16_to_float(h);
}

// A float array stored in type t (values rounded to it).
struct Buffer {
  FloatType type;
  std::vector<float> f32;
  std::vector<uint16_t> f16;
  Buffer(FloatType t, size_t n) : type(t), f32(t == FloatType::f32 ? n : 0), f16(t == FloatType::f32 ? 0 : n) {}
  void* data() { return type == FloatType::f32 ? static_cast<void*>(f32.data()) : f16.data(); }
  const void* data() const { return type == FloatType::f32 ? static_cast<const void*>(f32.data()) : f16.data(); }
  void set(size_t i, float v) {
    if (type == FloatType::f32) f32[i] = v; else f16[i] = encode(type, v);
  }
  double get(size_t i) const { return decode(type, data(), i); }
};

} // namespace mlx_ext::cpu
