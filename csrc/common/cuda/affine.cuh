// Device-side reading of MLX's affine quantization format (common/affine.h
// says the layout: each row of W a little-endian bit stream of BITS-bit
// values in uint32 words; each value is scale * q + bias of its group), for
// the CUDA kernels of every operator that reads it (nvcc only).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/cuda/device.cuh"

namespace mlx_ext::cuda {

// Loads the 32 consecutive BITS-bit values (4 * BITS bytes) at p with the
// widest loads their alignment allows.
template <int BITS>
__device__ __forceinline__ void load_piece(const uint32_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS % 4 == 0) {
#pragma unroll
    for (int l = 0; l < BITS / 4; ++l) {
      const uint4 v = load_stream16(p + 4 * l);
      w[4 * l] = v.x, w[4 * l + 1] = v.y, w[4 * l + 2] = v.z, w[4 * l + 3] = v.w;
    }
  } else if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int l = 0; l < BITS / 2; ++l) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + l);
      w[2 * l] = v.x, w[2 * l + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int l = 0; l < BITS; ++l) w[l] = __ldg(p + l);
  }
}

// The `BITS`-bit value number i (compile-time after unrolling) of a packed
// little-endian bit stream held in registers.
template <int BITS, int N>
__device__ __forceinline__ uint32_t extract(const uint32_t (&w)[N], int i) {
  const int bit = i * BITS, word = bit / 32, shift = bit % 32;
  if (shift + BITS <= 32) return (w[word] >> shift) & ((1u << BITS) - 1);
  return __funnelshift_r(w[word], w[word + 1], shift) & ((1u << BITS) - 1);
}

// An integer below 2^23 as float, exactly: its bits under the exponent of 2^23.
__device__ __forceinline__ float int_bits_to_float(uint32_t magic_bits) {
  return __uint_as_float(magic_bits) - 8388608.0f;
}

// Values i0 .. i0+7 of a packed stream as floats (exact integers). 4- and
// 8-bit values sit in whole bytes: one byte permute each puts a byte under the
// exponent of 2^23.
template <int BITS, int N>
__device__ __forceinline__ void dequant8(const uint32_t (&w)[N], int i0, float (&q)[8]) {
  if constexpr (BITS == 4) {
    const uint32_t word = w[i0 / 8];
    const uint32_t lo = word & 0x0f0f0f0fu, hi = (word >> 4) & 0x0f0f0f0fu;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      q[2 * j] = int_bits_to_float(__byte_perm(lo, 0x4b000000u, 0x7540 + j));
      q[2 * j + 1] = int_bits_to_float(__byte_perm(hi, 0x4b000000u, 0x7540 + j));
    }
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t word = w[i0 / 4 + h];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        q[4 * h + j] = int_bits_to_float(__byte_perm(word, 0x4b000000u, 0x7540 + j));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) q[j] = int_bits_to_float(extract<BITS>(w, i0 + j) | 0x4b000000u);
  }
}

// The exponent bits dequant_pair puts above a pair of integers.
template <typename T>
constexpr __device__ uint32_t dequant_magic() {
  return std::is_same_v<T, f16> ? 0x64006400u : 0x43004300u;
}

// Two BITS-bit integers, in the low bits of the two 16-bit halves of q, as
// the (T, T) pair s * q + b with one rounding (s2, b2: the group's scale and
// bias in both halves). The integers go under T's "magic" exponent, where they
// are exact (1024 + q in float16, 128 + q in bfloat16), the magic is
// subtracted (exact) and one fma applies s and b. 8-bit integers do not fit
// bfloat16's mantissa: they take a float32 fma instead, rounded once too.
// `magic_bits`: dequant_magic<T>(), or opaque(dequant_magic<T>(), ...) held by
// the caller.
template <typename T, int BITS>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t q, uint32_t s2, uint32_t b2,
                                                 uint32_t magic_bits = dequant_magic<T>()) {
  if constexpr (std::is_same_v<T, f16>) {
    const uint32_t magic_q = q | magic_bits;
    const __half2 magic = __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400));
    __half2 w = __hfma2(__hsub2(*reinterpret_cast<const __half2*>(&magic_q), magic),
                        *reinterpret_cast<const __half2*>(&s2), *reinterpret_cast<const __half2*>(&b2));
    return *reinterpret_cast<uint32_t*>(&w);
  } else if constexpr (BITS < 8) {
    const uint32_t magic_q = q | magic_bits;
    const __nv_bfloat162 magic = __halves2bfloat162(__ushort_as_bfloat16(0x4300), __ushort_as_bfloat16(0x4300));
    __nv_bfloat162 w = __hfma2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&magic_q), magic),
                               *reinterpret_cast<const __nv_bfloat162*>(&s2),
                               *reinterpret_cast<const __nv_bfloat162*>(&b2));
    return *reinterpret_cast<uint32_t*>(&w);
  } else {
    const float q0 = int_bits_to_float((q & 0xffu) | 0x4b000000u);
    const float q1 = int_bits_to_float((q >> 16) | 0x4b000000u);
    const float2 s = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&s2));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&b2));
    __nv_bfloat162 w = __floats2bfloat162_rn(fmaf(q0, s.x, b.x), fmaf(q1, s.y, b.y));
    return *reinterpret_cast<uint32_t*>(&w);
  }
}

} // namespace mlx_ext::cuda
