// Device helpers shared by the quantized matmul kernels: activation types,
// loads, and the exact conversion of packed integers to floats. No MLX
// headers here (see docs/mlx-facts.md): kernels see only cuda_params.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "quantized_matmul/cuda_params.h"

namespace mlx_ext::cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(f16 v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ f16 from_float<f16>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

// 16-byte load through the read-only path, not kept in L1 (streamed weights).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

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

// Eight consecutive activations as float (16 bytes, or 32 for float32);
// p is 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const f16* p, float (&v)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const bf16* p, float (&v)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) { // bfloat16 -> float is a shift of the bits
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
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

// Per-bit-width geometry of the weight loads: each chunk is LOADS 16-byte
// loads holding VPT whole values (3-, 5- and 6-bit values never straddle two
// chunks), processed as sub-chunks of 32 values that each lie in one group.
template <int BITS>
struct Chunk {
  static constexpr int LOADS = qmv_t_loads(BITS);
  static constexpr int VPT = qmv_t_values_per_chunk(BITS);
  static constexpr int WORDS = LOADS * 4;
  static constexpr int SUBS = VPT / 32;
};

} // namespace mlx_ext::cuda
