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

// Shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of BYTES (8 or 16) bytes global -> shared; zeros when !valid.
template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src, bool valid) {
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(valid ? 8 : 0));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// d = a b + c for one mma.sync m16n8k16 tile of T (float16 / bfloat16),
// float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                             const float (&c)[4]) {
  if constexpr (std::is_same_v<T, f16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  }
}

// c, in a register whose value ptxas cannot see (it folds every constant it
// can, through moves and shuffles too): an instruction takes one immediate
// operand, so (a & mask) | c is one LOP3 only with c in a register. The sign
// bit of p.M (never negative) is an operand ptxas cannot know is zero.
__device__ __forceinline__ uint32_t opaque(uint32_t c, const QmmParams& p) {
  return c | uint32_t(uint64_t(p.M) >> 63);
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
// `magic_bits`: dequant_magic<T>(), or opaque(dequant_magic<T>(), p) held by the caller.
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
