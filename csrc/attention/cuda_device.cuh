// Device helpers of the attention's CUDA kernels (attn_*.cu, nvcc only):
// which keys a query row sees, the mask, and one lane's 8 values of a K/V
// row as float (16-bit or float32 values, or 8-/4-bit codes dequantized with
// their group's scale and bias). The meaning is the CPU's (cpu_tiles.h).
#pragma once

#include <cstdint>

#include "attention/cuda_params.h"
#include "common/cuda/affine.cuh"
#include "common/cuda/device.cuh"

namespace mlx_ext::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// Keys [lo, hi) of the first kv_lengths[b] (clamped to [0, S]); causal: up to
// the row's position i + len - L (lower-right aligned); window: only the last
// `window` of those.
struct KeyRange {
  int lo, hi;
};
__device__ __forceinline__ int kv_length(const AttnParams& p, int b) {
  return p.kv_lengths ? min(max(p.kv_lengths[b], 0), p.S) : p.S;
}
__device__ __forceinline__ KeyRange visible_keys(const AttnParams& p, int len, int i) {
  KeyRange r{0, len};
  if (p.causal) {
    const int pos = i + len - p.L;
    r.hi = min(r.hi, pos + 1);
    if (p.window) r.lo = max(0, pos + 1 - p.window);
  }
  r.hi = max(r.hi, r.lo);
  return r;
}

// The base-2 logit s of key j after the array mask (row: b * strides[0] + h *
// [1] + i * [2]): -inf where a bool mask is False, + log2(e) * the additive one.
__device__ __forceinline__ float apply_mask(const AttnParams& p, int64_t row, int j, float s) {
  const int64_t at = row + int64_t(j) * p.mask_strides[3];
  if (p.mask_is_bool) return static_cast<const uint8_t*>(p.mask)[at] ? s : neg_inf();
  return fmaf(static_cast<const float*>(p.mask)[at], kLog2e, s);
}
__device__ __forceinline__ int64_t mask_row(const AttnParams& p, int b, int h, int i) {
  return b * p.mask_strides[0] + h * p.mask_strides[1] + i * p.mask_strides[2];
}

// Row index of key j of (b, kv head h) in one of K's or V's arrays.
__device__ __forceinline__ int64_t kv_row(const AttnRows& r, int b, int h, int j) {
  return b * r.batch_stride + h * r.head_stride + j;
}

// Eight consecutive 16-bit or float32 values as float; p 16-byte aligned.
__device__ __forceinline__ void load8_f(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T>
__device__ __forceinline__ void load8_f(const T* p, float (&v)[8]) {
  unpack16<T>(*reinterpret_cast<const uint4*>(p), v);
}

// Values [8c, 8c + 8) of key j of (b, h) in K or V, as loaded (KvRaw: the
// load is issued first, decoded to float when used, so that many loads are
// in flight with few registers). Quantized rows (BITS 8: one byte per value;
// BITS 4: value 2n in the low nibble of byte n) are dequantized as scale *
// code + bias of their group (group sizes are multiples of 32, so the 8
// values share one group).
template <typename T, int BITS>
struct KvRaw {
  uint4 w[sizeof(T) == 4 && BITS == 0 ? 2 : 1];
  float s, z;
};
template <typename T, int BITS>
__device__ __forceinline__ void load_kv_raw(const AttnKv& kv, int b, int h, int j, int c, int D,
                                            int group_size, KvRaw<T, BITS>& r) {
  if constexpr (BITS == 0) {
    const uint4* src = reinterpret_cast<const uint4*>(
        static_cast<const T*>(kv.x.data) + kv_row(kv.x, b, h, j) * D + 8 * c);
    r.w[0] = src[0];
    if constexpr (sizeof(T) == 4) r.w[1] = src[1];
  } else {
    const int groups = D / group_size, g = 8 * c / group_size;
    r.s = to_float(static_cast<const T*>(kv.scales.data)[kv_row(kv.scales, b, h, j) * groups + g]);
    r.z = to_float(static_cast<const T*>(kv.biases.data)[kv_row(kv.biases, b, h, j) * groups + g]);
    const uint8_t* row = static_cast<const uint8_t*>(kv.x.data) + kv_row(kv.x, b, h, j) * (D * BITS / 8);
    if constexpr (BITS == 8) {
      const uint2 w = *reinterpret_cast<const uint2*>(row + 8 * c);
      r.w[0].x = w.x, r.w[0].y = w.y;
    } else {
      r.w[0].x = *reinterpret_cast<const uint32_t*>(row + 4 * c);
    }
  }
}
template <typename T, int BITS>
__device__ __forceinline__ void zero_raw(KvRaw<T, BITS>& r) {
#pragma unroll
  for (auto& w : r.w) w = make_uint4(0, 0, 0, 0);
  r.s = r.z = 0.0f;
}
template <typename T, int BITS>
__device__ __forceinline__ void decode_kv(const KvRaw<T, BITS>& r, float (&v)[8]) {
  if constexpr (BITS == 0) { // float32 values in two words, 16-bit ones in one
#pragma unroll
    for (int i = 0; i < int(sizeof(r.w) / sizeof(uint4)); ++i) unpack16<T>(r.w[i], v + i * (16 / sizeof(T)));
  } else { // codes as exact floats by a byte permute under 2^23 (affine.cuh), not int-to-float conversions
    const uint32_t w[2] = {r.w[0].x, r.w[0].y};
    dequant8<BITS>(w, 0, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = fmaf(r.s, v[e], r.z);
  }
}
template <typename T, int BITS>
__device__ __forceinline__ void load_kv8(const AttnKv& kv, int b, int h, int j, int c, int D,
                                         int group_size, float (&v)[8]) {
  KvRaw<T, BITS> r;
  load_kv_raw<T, BITS>(kv, b, h, j, c, D, group_size, r);
  decode_kv(r, v);
}

// m, l of two partial softmaxes over disjoint keys (base-2 logits) merged
// into the first; returns the factors that rescale each one's accumulator.
__device__ __forceinline__ void merge_softmax(float& m, float& l, float m2, float l2, float& a, float& a2) {
  const float mx = fmaxf(m, m2);
  if (mx == neg_inf()) {
    a = a2 = 0.0f;
    return;
  }
  a = exp2f(m - mx), a2 = exp2f(m2 - mx);
  l = l * a + l2 * a2;
  m = mx;
}

// (a, b) as the sum of two 16-bit pairs, hi + lo, to about 2^-16 of each
// (2^-18 for bfloat16 pairs): the probabilities enter the tensor-core kernels'
// P V at the float32 arithmetic the op promises (tests/test_attention.py's
// tolerance), not rounded to q's type, for one more mma per V fragment.
template <typename T>
__device__ __forceinline__ void split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  hi = pack2<T>(a, b);
  const float2 h = unpack2<T>(hi);
  lo = pack2<T>(a - h.x, b - h.y);
}

} // namespace mlx_ext::cuda
