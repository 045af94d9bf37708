// Helpers shared by the forward and backward attention kernels, compiled
// into each ISA's namespace with them (simd.h): K/V blocks as float32 tiles,
// dot products and updates against a tile's rows (through the per-group
// identity for quantized K/V), and which keys a query row sees.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/cpu_kernels.h"
#include "common/cpu/float_io.h"
#include "common/cpu/simd.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {

constexpr int kKeyBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A block of keys or values as float32 rows of D values: the values, or (bits
// != 0) the codes 0 .. 2^bits - 1 with each row's per-group scale and bias.
struct Tile {
  const float* x; // (n, D)
  const float* scale; // (n, groups)
  const float* bias; // (n, groups)
};

struct TileStorage {
  std::vector<float> x, scale, bias;
};

// Rows [row0, row0 + n) of a (rows, D) K or V (rows flattened over B, Hkv, S).
template <FloatType T, int bits>
Tile load_tile(const AttentionArgs& a, const void* data, const void* scales, const void* biases,
    int64_t row0, int64_t n, TileStorage& st) {
  const int64_t D = a.D;
  if constexpr (bits == 0) {
    if constexpr (T == FloatType::f32) {
      return {static_cast<const float*>(data) + row0 * D, nullptr, nullptr};
    } else {
      st.x.resize(n * D);
      convert_to_float<T>(data, row0 * D, n * D, st.x.data());
      return {st.x.data(), nullptr, nullptr};
    }
  } else {
    const int64_t groups = D / a.group_size;
    st.x.resize(n * D);
    st.scale.resize(n * groups);
    st.bias.resize(n * groups);
    const uint8_t* codes = static_cast<const uint8_t*>(data) + row0 * D * bits / 8;
    float* x = st.x.data();
    if constexpr (bits == 8) {
      for (int64_t i = 0; i < n * D; ++i) x[i] = float(codes[i]);
    } else { // byte i holds values 2i (low nibble) and 2i + 1
      for (int64_t i = 0; i < n * D / 2; ++i) {
        x[2 * i] = float(codes[i] & 15);
        x[2 * i + 1] = float(codes[i] >> 4);
      }
    }
    convert_to_float<T>(scales, row0 * groups, n * groups, st.scale.data());
    convert_to_float<T>(biases, row0 * groups, n * groups, st.bias.data());
    return {x, st.scale.data(), st.bias.data()};
  }
}

// x . row j of the tile (x_sums: the sums of x over each group, quantized only).
template <int bits>
MLX_EXT_INLINE float tile_dot(const float* x, const float* x_sums, const Tile& t, int64_t j,
    int64_t D, int group_size) {
  const float* row = t.x + j * D;
  if constexpr (bits == 0) {
    VecF acc = zero();
    int64_t d = 0;
    for (; d + kWidth <= D; d += kWidth) acc = fma(load(x + d), load(row + d), acc);
    float s = reduce_add(acc);
    for (; d < D; ++d) s += x[d] * row[d];
    return s;
  } else { // group sizes are multiples of every kWidth
    const int64_t groups = D / group_size;
    const float* scale = t.scale + j * groups;
    const float* bias = t.bias + j * groups;
    VecF acc = zero();
    float s = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      VecF part = zero();
      for (int64_t d = g * group_size; d < (g + 1) * group_size; d += kWidth)
        part = fma(load(x + d), load(row + d), part);
      acc = fma(broadcast(scale[g]), part, acc);
      s += bias[g] * x_sums[g];
    }
    return s + reduce_add(acc);
  }
}

// acc += p * row j of the tile; quantized: acc += p s_g codes per group and
// acc_groups[g] += p b_g (added to each of the group's D entries at the end).
template <int bits>
MLX_EXT_INLINE void tile_axpy(float p, const Tile& t, int64_t j, float* acc, float* acc_groups,
    int64_t D, int group_size) {
  const float* row = t.x + j * D;
  if constexpr (bits == 0) {
    const VecF pv = broadcast(p);
    int64_t d = 0;
    for (; d + kWidth <= D; d += kWidth) store(acc + d, fma(pv, load(row + d), load(acc + d)));
    for (; d < D; ++d) acc[d] += p * row[d];
  } else {
    const int64_t groups = D / group_size;
    for (int64_t g = 0; g < groups; ++g) {
      const VecF w = broadcast(p * t.scale[j * groups + g]);
      for (int64_t d = g * group_size; d < (g + 1) * group_size; d += kWidth)
        store(acc + d, fma(w, load(row + d), load(acc + d)));
      acc_groups[g] += p * t.bias[j * groups + g];
    }
  }
}

// The keys [lo, hi) query row i of batch b may see: up to kv_lengths[b]
// (clamped to [0, S]); causal: up to its position, lower-right aligned to
// that length; window: only the last `window` of those.
MLX_EXT_INLINE void visible_keys(const AttentionArgs& a, int64_t b, int64_t i, int64_t& lo,
    int64_t& hi) {
  const int64_t len = a.kv_lengths ? std::clamp<int64_t>(a.kv_lengths[b], 0, a.S) : a.S;
  lo = 0;
  hi = len;
  if (a.causal) {
    const int64_t pos = i + len - a.L;
    hi = std::min(hi, pos + 1);
    if (a.window) lo = std::max<int64_t>(0, pos + 1 - a.window);
  }
  hi = std::max(hi, lo);
}

// Offset of query row i of head h, batch b, in the mask (add j * strides[3]).
MLX_EXT_INLINE int64_t mask_row(const AttentionArgs& a, int64_t b, int64_t h, int64_t i) {
  return b * a.mask_strides[0] + h * a.mask_strides[1] + i * a.mask_strides[2];
}

// The logit s of key j after the mask: -inf where a bool mask is False.
MLX_EXT_INLINE float apply_mask(const AttentionArgs& a, int64_t row, int64_t j, float s) {
  if (!a.mask) return s;
  const int64_t at = row + j * a.mask_strides[3];
  if (a.mask_is_bool) return static_cast<const uint8_t*>(a.mask)[at] ? s : kNegInf;
  return s + static_cast<const float*>(a.mask)[at];
}

// dst[0:D] = scale * float(src row), and the sums of dst over each group of
// group_size (quantized K/V only: groups may be 0).
template <FloatType T>
MLX_EXT_INLINE void load_row(const void* src, int64_t row, int64_t D, float scale, float* dst,
    int64_t groups, int group_size, float* sums) {
  convert_to_float<T>(src, row * D, D, dst);
  for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.0f;
    for (int64_t d = g * group_size; d < (g + 1) * group_size; ++d) s += dst[d];
    sums[g] = s;
  }
}

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
