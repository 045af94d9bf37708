// Helpers shared by the forward and backward attention kernels, compiled
// into each ISA's namespace with them (simd.h): K/V blocks as float32 tiles,
// dot products and updates against a tile's rows (through the per-group
// identity for quantized K/V), and which keys a query row sees.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/cpu_kernels.h"
#include "common/cpu/float_io.h"
#include "common/cpu/simd.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {

constexpr int kKeyBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (softmax arguments), within 2 ulp; 0 below -87 and for
// -inf. Branch-free arithmetic, so that a loop of it vectorises on every ISA
// (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r).
MLX_EXT_INLINE float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f; // round to nearest
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return x < -87.0f ? 0.0f : p * two_n;
}

// 4-bit codes unpack in this order within each block of 32 values: the 16
// low nibbles (values 0, 2, .., 30), then the 16 high ones (1, 3, .., 31), a
// plain widening of bytes on every ISA. A row dotted with such a tile (q, dO)
// is put in that order first and a row accumulated from one (out, dq) is put
// back after: group sums and dot products do not change.
template <int bits, bool to_codes>
MLX_EXT_INLINE void permute_code_order(float* row, int64_t D) {
  if constexpr (bits == 4) {
    float tmp[32];
    for (int64_t b = 0; b < D; b += 32) {
      for (int i = 0; i < 16; ++i) {
        if constexpr (to_codes) {
          tmp[i] = row[b + 2 * i];
          tmp[16 + i] = row[b + 2 * i + 1];
        } else {
          tmp[2 * i] = row[b + i];
          tmp[2 * i + 1] = row[b + 16 + i];
        }
      }
      std::memcpy(row + b, tmp, sizeof(tmp));
    }
  }
}

template <int bits>
MLX_EXT_INLINE void to_code_order(float* row, int64_t D) {
  permute_code_order<bits, true>(row, D);
}

template <int bits>
MLX_EXT_INLINE void from_code_order(float* row, int64_t D) {
  permute_code_order<bits, false>(row, D);
}

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

// The same block read where it is stored (T values, or packed codes with T
// scales and biases), converted in registers: no copy. Row j is row0 + j
// of the arrays (KvRows: a block's rows are contiguous).
template <FloatType T, int bits>
struct StoredRows {
  const void* x;
  const void* scales;
  const void* biases;
  int64_t x_row0, scale_row0, bias_row0;
};

template <FloatType T, int bits>
StoredRows<T, bits> stored_rows(const KvInput& kv, int64_t b, int64_t h, int64_t j0) {
  return {kv.x.data, kv.scales.data, kv.biases.data, kv.x.at(b, h, j0),
      bits ? kv.scales.at(b, h, j0) : 0, bits ? kv.biases.at(b, h, j0) : 0};
}

// Positions [d, d + kWidth) of row j (code order for quantized rows), its
// scale and bias of group g: the kernels read a Tile and StoredRows alike.
MLX_EXT_INLINE VecF row_vec(const Tile& t, int64_t j, int64_t d, int64_t D) {
  return load(t.x + j * D + d);
}
MLX_EXT_INLINE float row_float(const Tile& t, int64_t j, int64_t d, int64_t D) {
  return t.x[j * D + d];
}
MLX_EXT_INLINE float row_scale(const Tile& t, int64_t j, int64_t g, int64_t groups) {
  return t.scale[j * groups + g];
}
MLX_EXT_INLINE float row_bias(const Tile& t, int64_t j, int64_t g, int64_t groups) {
  return t.bias[j * groups + g];
}

template <FloatType T, int bits>
MLX_EXT_INLINE VecF row_vec(const StoredRows<T, bits>& r, int64_t j, int64_t d, int64_t D) {
  if constexpr (bits == 0) {
    return load_floats<T>(r.x, (r.x_row0 + j) * D + d);
  } else if constexpr (bits == 8) {
    return load_u8_field(static_cast<const uint8_t*>(r.x) + (r.x_row0 + j) * D + d, 0, 255);
  } else { // code order: in each 32 values, the low nibbles of 16 bytes, then the high ones
    const int64_t c = d & 31;
    const uint8_t* bytes = static_cast<const uint8_t*>(r.x) + (r.x_row0 + j) * D / 2 + (d - c) / 2;
    return load_u8_field(bytes + (c & 15), c < 16 ? 0 : 4, 15);
  }
}
// Asks for row j's cache lines ahead of use: a decode task streams K and V
// once, and the prefetcher alone keeps too few lines in flight per core.
template <FloatType T, int bits>
MLX_EXT_INLINE void prefetch_row(const StoredRows<T, bits>& r, int64_t j, int64_t D) {
  constexpr int64_t elem_bits = bits ? bits : T == FloatType::f32 ? 32 : 16;
  const int64_t row_bytes = D * elem_bits / 8;
  const char* row = static_cast<const char*>(r.x) + (r.x_row0 + j) * row_bytes;
  for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off);
}

template <FloatType T, int bits> // one position: the D % kWidth tails
MLX_EXT_INLINE float row_float(const StoredRows<T, bits>& r, int64_t j, int64_t d, int64_t D) {
  if constexpr (bits == 0) {
    return load_float<T>(r.x, (r.x_row0 + j) * D + d);
  } else if constexpr (bits == 8) {
    return float(static_cast<const uint8_t*>(r.x)[(r.x_row0 + j) * D + d]);
  } else {
    const int64_t c = d & 31;
    const uint8_t byte =
        static_cast<const uint8_t*>(r.x)[(r.x_row0 + j) * D / 2 + (d - c) / 2 + (c & 15)];
    return float(c < 16 ? byte & 15 : byte >> 4);
  }
}
template <FloatType T, int bits>
MLX_EXT_INLINE float row_scale(const StoredRows<T, bits>& r, int64_t j, int64_t g, int64_t groups) {
  return load_float<T>(r.scales, (r.scale_row0 + j) * groups + g);
}
template <FloatType T, int bits>
MLX_EXT_INLINE float row_bias(const StoredRows<T, bits>& r, int64_t j, int64_t g, int64_t groups) {
  return load_float<T>(r.biases, (r.bias_row0 + j) * groups + g);
}

// Keys [j0, j0 + n) of kv head h of batch b, from K or V.
template <FloatType T, int bits>
Tile load_tile(const AttentionArgs& a, const KvInput& kv, int64_t b, int64_t h, int64_t j0,
    int64_t n, TileStorage& st) {
  const int64_t D = a.D;
  const int64_t row0 = kv.x.at(b, h, j0);
  if constexpr (bits == 0) {
    if constexpr (T == FloatType::f32) {
      return {static_cast<const float*>(kv.x.data) + row0 * D, nullptr, nullptr};
    } else {
      st.x.resize(n * D);
      convert_to_float<T>(kv.x.data, row0 * D, n * D, st.x.data());
      return {st.x.data(), nullptr, nullptr};
    }
  } else {
    const int64_t groups = D / a.group_size;
    st.x.resize(n * D);
    st.scale.resize(n * groups);
    st.bias.resize(n * groups);
    const uint8_t* codes = static_cast<const uint8_t*>(kv.x.data) + row0 * D * bits / 8;
    float* x = st.x.data();
    if constexpr (bits == 8) {
      for (int64_t i = 0; i < n * D; ++i) x[i] = float(codes[i]);
    } else { // byte i holds values 2i (low nibble) and 2i + 1: see to_code_order
      for (int64_t c = 0; c < n * D; c += 32, codes += 16) {
        for (int i = 0; i < 16; ++i) x[c + i] = float(codes[i] & 15);
        for (int i = 0; i < 16; ++i) x[c + 16 + i] = float(codes[i] >> 4);
      }
    }
    convert_to_float<T>(kv.scales.data, kv.scales.at(b, h, j0) * groups, n * groups, st.scale.data());
    convert_to_float<T>(kv.biases.data, kv.biases.at(b, h, j0) * groups, n * groups, st.bias.data());
    return {x, st.scale.data(), st.bias.data()};
  }
}

// out[i] = the sum of acc[i]'s lanes, four rows at a time through one add tree.
template <int NR>
MLX_EXT_INLINE void reduce_lanes(const VecF* acc, float* out) {
  int i = 0;
  for (; i + 4 <= NR; i += 4) reduce_add4(acc + i, out + i);
  for (; i < NR; ++i) out[i] = reduce_add(acc[i]);
}

// out[k * NR + i] = x_i . row j + k of the block for NR rows x_i (stride D;
// x_sums: their sums over each group, stride `groups`, quantized only) and
// NK keys. The NR rows share every load of a key's row; the NR x NK
// accumulators are independent FMA chains.
template <int NR, int bits, int NK = 1, typename Rows>
MLX_EXT_INLINE void tile_dot(const float* x, const float* x_sums, const Rows& t, int64_t j,
    int64_t D, int group_size, float* out) {
  VecF acc[NK][NR];
  for (int k = 0; k < NK; ++k)
    for (int i = 0; i < NR; ++i) acc[k][i] = zero();
  if constexpr (bits == 0) {
    int64_t d = 0;
    for (; d + kWidth <= D; d += kWidth) {
      VecF key[NK];
      for (int k = 0; k < NK; ++k) key[k] = row_vec(t, j + k, d, D);
      for (int i = 0; i < NR; ++i) {
        const VecF xi = load(x + i * D + d);
        for (int k = 0; k < NK; ++k) acc[k][i] = fma(xi, key[k], acc[k][i]);
      }
    }
    for (int k = 0; k < NK; ++k) {
      reduce_lanes<NR>(acc[k], out + k * NR);
      for (int i = 0; i < NR; ++i)
        for (int64_t e = d; e < D; ++e) out[k * NR + i] += x[i * D + e] * row_float(t, j + k, e, D);
    }
  } else { // group sizes are multiples of every kWidth
    const int64_t groups = D / group_size;
    float s[NK][NR] = {};
    for (int64_t g = 0; g < groups; ++g) {
      VecF part[NK][NR];
      for (int k = 0; k < NK; ++k)
        for (int i = 0; i < NR; ++i) part[k][i] = zero();
      for (int64_t d = g * group_size; d < (g + 1) * group_size; d += kWidth) {
        VecF codes[NK];
        for (int k = 0; k < NK; ++k) codes[k] = row_vec(t, j + k, d, D);
        for (int i = 0; i < NR; ++i) {
          const VecF xi = load(x + i * D + d);
          for (int k = 0; k < NK; ++k) part[k][i] = fma(xi, codes[k], part[k][i]);
        }
      }
      for (int k = 0; k < NK; ++k) {
        const float bg = row_bias(t, j + k, g, groups);
        const VecF sg = broadcast(row_scale(t, j + k, g, groups));
        for (int i = 0; i < NR; ++i) {
          acc[k][i] = fma(sg, part[k][i], acc[k][i]);
          s[k][i] += bg * x_sums[i * groups + g];
        }
      }
    }
    for (int k = 0; k < NK; ++k) {
      reduce_lanes<NR>(acc[k], out + k * NR);
      for (int i = 0; i < NR; ++i) out[k * NR + i] += s[k][i];
    }
  }
}

// acc_i += p[i] * row j of the tile for NR rows (stride D); quantized: acc_i
// += p[i] s_g codes per group and acc_groups_i[g] += p[i] b_g (stride
// `groups`; added to each of the group's D entries at the end).
template <int NR, int bits>
MLX_EXT_INLINE void tile_axpy(const float* p, const Tile& t, int64_t j, float* acc,
    float* acc_groups, int64_t D, int group_size) {
  const float* row = t.x + j * D;
  if constexpr (bits == 0) {
    VecF w[NR];
    for (int i = 0; i < NR; ++i) w[i] = broadcast(p[i]);
    int64_t d = 0;
    for (; d + kWidth <= D; d += kWidth) {
      const VecF v = load(row + d);
      for (int i = 0; i < NR; ++i) store(acc + i * D + d, fma(w[i], v, load(acc + i * D + d)));
    }
    for (; d < D; ++d)
      for (int i = 0; i < NR; ++i) acc[i * D + d] += p[i] * row[d];
  } else {
    const int64_t groups = D / group_size;
    for (int64_t g = 0; g < groups; ++g) {
      const float sg = t.scale[j * groups + g], bg = t.bias[j * groups + g];
      VecF w[NR];
      for (int i = 0; i < NR; ++i) {
        w[i] = broadcast(p[i] * sg);
        acc_groups[i * groups + g] += p[i] * bg;
      }
      for (int64_t d = g * group_size; d < (g + 1) * group_size; d += kWidth) {
        const VecF c = load(row + d);
        for (int i = 0; i < NR; ++i) store(acc + i * D + d, fma(w[i], c, load(acc + i * D + d)));
      }
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

// dst[0:D] = scale * float(src row) in code order, and the sums of dst over
// each group of group_size (quantized K/V only: groups may be 0).
template <FloatType T, int bits>
MLX_EXT_INLINE void load_row(const void* src, int64_t row, int64_t D, float scale, float* dst,
    int64_t groups, int group_size, float* sums) {
  convert_to_float<T>(src, row * D, D, dst);
  for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
  to_code_order<bits>(dst, D);
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.0f;
    for (int64_t d = g * group_size; d < (g + 1) * group_size; ++d) s += dst[d];
    sums[g] = s;
  }
}

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
