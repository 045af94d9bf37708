// MLX's microscaling float quantization formats (mx.quantize(..., mode=...)
// of MLX 0.32.4), as every backend decodes them. Plain C++, no MLX types: the
// op functions, the CPU kernels, the native checks and the CUDA kernels
// (host-device functions) include it; Metal (metal/fp.h) mirrors it.
//
// Layout, all three modes: w is uint32 (rows, cols * bits / 32), each row a
// little-endian stream of `bits`-bit codes (low bits first), so byte i of a
// 4-bit row holds codes 2i (low nibble) and 2i+1; scales are uint8
// (rows, cols / group_size); there are no biases. value = decode(code) * scale.
//
//   mode    codes   group  scale
//   mxfp4   E2M1    32     E8M0: 2^(s - 127)
//   nvfp4   E2M1    16     E4M3 (MLX 0.32.4's quantized_matmul has no global scale)
//   mxfp8   E4M3    32     E8M0
#pragma once

#include <cstdint>
#include <cstring>

#include "common/math.h" // MLX_EXT_HOST_DEVICE

namespace mlx_ext {

enum class QuantMode : int { affine = 0, mxfp4 = 1, nvfp4 = 2, mxfp8 = 3 };

struct FpModeSpec {
  int group_size;
  int bits;
};

// The one group size and bit width each fp mode has (affine: MLX's defaults).
MLX_EXT_HOST_DEVICE inline constexpr FpModeSpec mode_spec(QuantMode m) {
  switch (m) {
    case QuantMode::mxfp4: return {32, 4};
    case QuantMode::nvfp4: return {16, 4};
    case QuantMode::mxfp8: return {32, 8};
    default: return {64, 4};
  }
}

inline constexpr const char* mode_name(QuantMode m) {
  switch (m) {
    case QuantMode::mxfp4: return "mxfp4";
    case QuantMode::nvfp4: return "nvfp4";
    case QuantMode::mxfp8: return "mxfp8";
    default: return "affine";
  }
}

MLX_EXT_HOST_DEVICE inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// E2M1 (sign, 2 exponent bits, 1 mantissa bit, bias 1): 0, 0.5, 1, 1.5, 2, 3,
// 4, 6 and their negatives. Twice the magnitude is an integer, which the SIMD
// kernels use (a byte table of 2 * value, then a 0.5 folded into the scale).
inline constexpr int8_t kE2M1Twice[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

MLX_EXT_HOST_DEVICE inline float e2m1_to_float(uint8_t code) {
  const int e = (code >> 1) & 3, m = code & 1; // (the table above, computed)
  const float mag = e == 0 ? 0.5f * float(m) : float(1 << (e - 1)) * (1.0f + 0.5f * float(m));
  return (code & 8) ? -mag : mag;
}

// E4M3 "fn" (bias 7, no infinities): normal 2^(e-7) (1 + m/8), subnormal
// m 2^-9, and 0x7f / 0xff NaN, as MLX's fp8_e4m3 converts it.
MLX_EXT_HOST_DEVICE inline float e4m3_to_float(uint8_t code) {
  const uint32_t sign = uint32_t(code & 0x80) << 24;
  const uint32_t em = code & 0x7f;
  if (em == 0x7f) return bits_to_float(sign | 0x7fc00000u);
  float mag;
  if (em < 8) {
    mag = float(em) * (1.0f / 512.0f); // subnormal, exact
  } else {
    mag = bits_to_float((em << 20) + (120u << 23)); // exponent e - 7 + 127
  }
  return sign ? -mag : mag;
}

// E8M0 (an exponent alone, bias 127): 2^(s - 127); 0 -> 2^-127 and 255 ->
// inf, bit for bit what MLX's fp8_e8m0 -> float conversion gives.
MLX_EXT_HOST_DEVICE inline float e8m0_to_float(uint8_t code) {
  return bits_to_float(code == 0 ? 0x00400000u : uint32_t(code) << 23);
}

// The float value of one group scale of an fp mode.
MLX_EXT_HOST_DEVICE inline float fp_scale_to_float(QuantMode m, uint8_t code) {
  return m == QuantMode::nvfp4 ? e4m3_to_float(code) : e8m0_to_float(code);
}

} // namespace mlx_ext
