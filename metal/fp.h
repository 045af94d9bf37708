// Reading MLX's fp quantization modes in MSL: mxfp4 (E2M1 codes, groups of
// 32, E8M0 scales), nvfp4 (E2M1, groups of 16, E4M3 scales) and mxfp8 (E4M3,
// groups of 32, E8M0 scales). The same decoding as csrc/common/fp_formats.h
// (which defines the formats and their layout: codes packed little-endian in
// each row, uint8 scales, no biases); mode numbers are QuantMode's.
#pragma once

#include <metal_stdlib>

namespace mlx_ext {

using namespace metal;

constant constexpr int kModeMxfp4 = 1;
constant constexpr int kModeNvfp4 = 2;
constant constexpr int kModeMxfp8 = 3;

template <int mode>
struct FpMode {
  static constexpr int bits = mode == kModeMxfp8 ? 8 : 4;
  static constexpr int group_size = mode == kModeNvfp4 ? 16 : 32;
};

// E2M1: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
inline float e2m1_to_float(uint code) {
  const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = mag[code & 7];
  return (code & 8) ? -v : v;
}

// E4M3 "fn": 2^(e-7) (1 + m/8), subnormals m 2^-9, 0x7f / 0xff NaN.
inline float e4m3_to_float(uint code) {
  const uint em = code & 0x7f;
  float mag;
  if (em == 0x7f) {
    mag = as_type<float>(0x7fc00000u); // NaN
  } else if (em < 8) {
    mag = float(em) * (1.0f / 512.0f);
  } else {
    mag = as_type<float>((em << 20) + (120u << 23));
  }
  return (code & 0x80) ? -mag : mag;
}

// E8M0: 2^(s - 127); 0 -> 2^-127 and 255 -> inf, as MLX decodes it.
inline float e8m0_to_float(uint code) {
  return as_type<float>(code == 0 ? 0x00400000u : code << 23);
}

template <int mode>
inline float fp_scale(uchar code) {
  return mode == kModeNvfp4 ? e4m3_to_float(code) : e8m0_to_float(code);
}

template <int mode>
inline float fp_value(uint code) {
  return mode == kModeMxfp8 ? e4m3_to_float(code) : e2m1_to_float(code);
}

// Code j of a run of codes starting on a byte.
template <int mode>
inline uint fp_code(thread const uchar* bytes, int j) {
  if (FpMode<mode>::bits == 8) {
    return bytes[j];
  }
  return (bytes[j / 2] >> (4 * (j % 2))) & 15;
}

// Dequantizes 8 values (the 8 * bits / 8 bytes at src, one group's) into dst.
template <int mode>
inline void fp_dequantize8(const device uchar* src, float scale, threadgroup float* dst) {
  constexpr int nbytes = FpMode<mode>::bits;
  uchar bytes[nbytes];
#pragma clang loop unroll(full)
  for (int i = 0; i < nbytes; ++i) {
    bytes[i] = src[i];
  }
#pragma clang loop unroll(full)
  for (int j = 0; j < 8; ++j) {
    dst[j] = scale * fp_value<mode>(fp_code<mode>(bytes, j));
  }
}

} // namespace mlx_ext
