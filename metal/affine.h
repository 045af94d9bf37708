// Reading MLX's affine quantization format in MSL (the format of
// csrc/common/affine.h: each row of uint32 words one little-endian stream of
// `bits`-bit values, value = scale * q + bias per group), for any kernel that
// reads it: weights, a quantized KV cache, quantized sparse values.
#pragma once

#include <metal_stdlib>

namespace mlx_ext {

using namespace metal;

// A run of values that starts on a 16-bit boundary is read in 16-bit units.
// Value j starts at bit s = (j * bits) % 16 of unit (j * bits) / 16; if it
// crosses into the next unit, it lies in the 32-bit window of both. ANDing
// the unit (or window) with mask << s gives q * 2^s exactly (at most 23
// significant bits), so a dot product never shifts a value: it folds 2^-s into
// the other operand (load_prescaled_x, then qdot16) or into its final sums
// (unit_shift_scale).

template <int bits>
inline uint masked_value(thread const ushort* units, int j) {
  const int unit = j * bits / 16;
  const int s = j * bits % 16;
  const uint window = s + bits > 16 ? (uint(units[unit]) | (uint(units[unit + 1]) << 16))
                                    : uint(units[unit]);
  return window & (((1u << bits) - 1) << s);
}

// 2^-s for value j (see masked_value).
template <int bits>
inline float unit_shift_scale(int j) {
  return 1.0f / float(1u << (j * bits % 16));
}

// `count` units from device memory: as whole words when `from_words` (the
// address is 4-byte aligned and count even), else one unit at a time.
template <int count, bool from_words>
inline void load_units(const device ushort* src, thread ushort* units) {
  if (from_words) {
    const device uint* words = (const device uint*)src;
#pragma clang loop unroll(full)
    for (int i = 0; i < count / 2; ++i) {
      const uint word = words[i];
      units[2 * i] = ushort(word);
      units[2 * i + 1] = ushort(word >> 16);
    }
  } else {
#pragma clang loop unroll(full)
    for (int i = 0; i < count; ++i) {
      units[i] = src[i];
    }
  }
}

// x[0 .. 16) into xs, each times 2^-s of its value (see masked_value); returns
// the sum of x[0 .. 16).
template <typename T, int bits>
inline float load_prescaled_x(const device T* x, thread float* xs) {
  float sum = 0.0f;
#pragma clang loop unroll(full)
  for (int j = 0; j < 16; ++j) {
    const float v = float(x[j]);
    sum += v;
    xs[j] = v * unit_shift_scale<bits>(j);
  }
  return sum;
}

// sum_j q_j x_j over 16 values: `bits` units against load_prescaled_x's xs.
template <int bits>
inline float qdot16(thread const ushort* units, thread const float* xs) {
  float sum = 0.0f;
#pragma clang loop unroll(full)
  for (int j = 0; j < 16; ++j) {
    sum += float(masked_value<bits>(units, j)) * xs[j];
  }
  return sum;
}

// Dequantizes 8 values (the `bits` bytes at src, starting on a byte) into dst.
// For tiled kernels, which dequantize each value once per tile.
template <int bits>
inline void dequantize8(const device uchar* src, float scale, float bias, threadgroup float* dst) {
  uchar bytes[bits];
#pragma clang loop unroll(full)
  for (int i = 0; i < bits; ++i) {
    bytes[i] = src[i];
  }
#pragma clang loop unroll(full)
  for (int j = 0; j < 8; ++j) {
    const int byte = j * bits / 8;
    const int s = j * bits % 8;
    const uint window = s + bits > 8 ? (uint(bytes[byte]) | (uint(bytes[byte + 1]) << 8))
                                     : uint(bytes[byte]);
    dst[j] = fma(scale, float((window >> s) & ((1u << bits) - 1)), bias);
  }
}

} // namespace mlx_ext
