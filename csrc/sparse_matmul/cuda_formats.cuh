// Device-side reading of the sparse formats (sparse_matmul.h lays out their
// arrays) for the CUDA kernels of the sparse matmul (nvcc only): per format,
// a warp's walk over the stored values of one row of W (the decode kernels),
// the lookup of one element W[n, k] (the transposed product), and the
// position (row, column) of one stored value (the sampled product).
#pragma once

#include <cstdint>

#include "common/cuda/affine.cuh"
#include "common/cuda/device.cuh"
#include "sparse_matmul/cuda_params.h"

namespace mlx_ext::cuda::sparse {

// The formats, as the kernels' template parameter.
enum Fmt { CSR, BITMASK, BSR, NM };

// COUNT consecutive values of T at p (16-byte aligned, COUNT * sizeof(T) a
// multiple of 16) as float, streamed (read once: not kept in L1).
template <typename T, int COUNT>
__device__ __forceinline__ void load_values(const T* p, float (&v)[COUNT]) {
  constexpr int PER = 16 / sizeof(T);
  static_assert(COUNT % PER == 0, "whole 16-byte words");
#pragma unroll
  for (int i = 0; i < COUNT / PER; ++i) unpack16<T>(load_stream16(p + i * PER), v + i * PER);
}

// x of the block's MT rows: in shared memory as [K][MT] (XS), or read from
// global memory (x row-major (M, K), rows past M as zeros) when K * MT does
// not fit.
template <typename T, int MT, bool XS>
struct XRows {
  const T* x; // shared: xs; global: the block's first row of x
  int K, mt;
  static constexpr int PAD = spmv_pad_slots(MT * sizeof(T));
  __device__ __forceinline__ static int slot(int k) { return k + PAD * (k >> 5); }
  __device__ __forceinline__ void column(int k, float (&v)[MT]) const {
    if constexpr (XS) {
      const T* c = x + slot(k) * MT;
      if constexpr (MT * sizeof(T) % 16 == 0) {
#pragma unroll
        for (int i = 0; i < MT * int(sizeof(T)) / 16; ++i)
          unpack16<T>(reinterpret_cast<const uint4*>(c)[i], v + i * (16 / sizeof(T)));
      } else {
#pragma unroll
        for (int i = 0; i < MT; ++i) v[i] = to_float(c[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < MT; ++i) v[i] = i < mt ? to_float(x[int64_t(i) * K + k]) : 0.0f;
    }
  }
};

template <int MT, typename X>
__device__ __forceinline__ void fma_column(float (&acc)[MT], const X& xr, int k, float w) {
  float xv[MT];
  xr.column(k, xv);
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = fmaf(w, xv[i], acc[i]);
}

__device__ __forceinline__ int warp_exclusive_sum(int v, int lane) {
  int inclusive = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int o = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += o;
  }
  return inclusive - v;
}

// ---------------------------------------------------------------------------
// Row walks: acc[i] += sum over the stored (k, w) of row `row` of w x[i, k],
// this lane's share of them (the warp's lanes together cover the row once).

// CSR: lanes over consecutive stored values; with p.vec, 8 at a time from
// the 8-aligned chunk that holds them (16-byte loads of values and indices),
// the values outside [begin, end) masked.
template <typename T, int MT, typename X>
__device__ __forceinline__ void csr_row(const SpParams& p, int row, const X& xr, int lane, float (&acc)[MT]) {
  const int64_t b = p.row_ptr[row], e = p.row_ptr[row + 1];
  const T* values = static_cast<const T*>(p.values);
  if (p.vec) {
    auto cols8 = [&](int64_t c, uint32_t (&cols)[8]) {
      if (p.wide_columns) {
        const uint32_t* idx = static_cast<const uint32_t*>(p.pattern) + c;
        const uint4 a = load_stream16(idx), d = load_stream16(idx + 4);
        cols[0] = a.x, cols[1] = a.y, cols[2] = a.z, cols[3] = a.w;
        cols[4] = d.x, cols[5] = d.y, cols[6] = d.z, cols[7] = d.w;
      } else {
        const uint4 a = load_stream16(static_cast<const uint16_t*>(p.pattern) + c);
        const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) cols[2 * j] = w[j] & 0xffffu, cols[2 * j + 1] = w[j] >> 16;
      }
    };
    // Chunks of 8 from the 8-aligned one holding b; two per lane in flight.
    for (int64_t c0 = (b & ~int64_t(7)) + 8 * lane; c0 < e; c0 += 512) {
      float v[2][8];
      uint32_t cols[2][8];
      bool full[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t c = c0 + 256 * h;
        full[h] = c < e && c + 8 <= p.stored; // else scalar: no reads past the arrays
        if (full[h]) {
          load_values<T, 8>(values + c, v[h]);
          cols8(c, cols[h]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t c = c0 + 256 * h;
        if (full[h]) {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (c + j >= b && c + j < e) fma_column(acc, xr, int(cols[h][j]), v[h][j]);
        } else if (c < e) {
          for (int64_t i = c > b ? c : b; i < e && i < c + 8; ++i) {
            const uint32_t col = p.wide_columns ? static_cast<const uint32_t*>(p.pattern)[i]
                                                : static_cast<const uint16_t*>(p.pattern)[i];
            fma_column(acc, xr, int(col), to_float(values[i]));
          }
        }
      }
    }
  } else {
    for (int64_t i = b + lane; i < e; i += 32) {
      const uint32_t col = p.wide_columns ? static_cast<const uint32_t*>(p.pattern)[i]
                                          : static_cast<const uint16_t*>(p.pattern)[i];
      fma_column(acc, xr, int(col), to_float(values[i]));
    }
  }
}

// Bitmask: a lane per mask word (32 columns), 32 words per step; a warp-wide
// exclusive sum of the words' popcounts places each lane's values in the
// row's packed values.
template <typename T, int MT, typename X>
__device__ __forceinline__ void bitmask_row(const SpParams& p, int row, const X& xr, int lane, float (&acc)[MT]) {
  const int words = (p.K + 31) / 32;
  const uint32_t* mask = static_cast<const uint32_t*>(p.pattern) + int64_t(row) * words;
  const T* values = static_cast<const T*>(p.values) + p.row_ptr[row];
  // Two steps' mask words loaded before either is used.
  for (int w0 = 0; w0 < words; w0 += 64) {
    uint32_t word[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int w = w0 + 32 * h + lane;
      word[h] = w < words ? __ldg(mask + w) : 0u;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int count = __popc(word[h]);
      const int before = warp_exclusive_sum(count, lane);
      const int total = __shfl_sync(0xffffffffu, before + count, 31);
      const T* v = values + before;
      const int k0 = (w0 + 32 * h + lane) * 32;
      uint32_t bits = word[h];
      // Eight values loaded before their products.
      while (bits) {
        float w8[8];
        int k8[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          k8[j] = -1;
          if (bits) {
            k8[j] = k0 + __ffs(bits) - 1;
            bits &= bits - 1;
            w8[j] = to_float(v[j]);
          }
        }
        v += 8;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (k8[j] >= 0) fma_column(acc, xr, k8[j], w8[j]);
      }
      values += total;
    }
  }
}

// BSR: the row's part of each stored block of its block row, one after the
// other (bk values from column indices[j] * bk); with p.vec (bk % 8 == 0 and
// aligned data) 8 values per lane at a time.
template <typename T, int MT, typename X>
__device__ __forceinline__ void bsr_row(const SpParams& p, int row, const X& xr, int lane, float (&acc)[MT]) {
  const int bn = p.block_n, bk = p.block_k;
  const int br = row / bn, r = row - br * bn;
  const int j0 = p.row_ptr[br], nb = p.row_ptr[br + 1] - j0;
  const T* data = static_cast<const T*>(p.values);
  const int32_t* cols = static_cast<const int32_t*>(p.pattern);
  const int64_t len = int64_t(nb) * bk;
  if (p.vec) {
    for (int64_t e = 8 * lane; e < len; e += 256) {
      const int jj = int(e / bk), c = int(e - int64_t(jj) * bk);
      const int j = j0 + jj;
      float v[8];
      load_values<T, 8>(data + (int64_t(j) * bn + r) * bk + c, v);
      const int k = __ldg(cols + j) * bk + c;
#pragma unroll
      for (int t = 0; t < 8; ++t) fma_column(acc, xr, k + t, v[t]);
    }
  } else {
    for (int64_t e = lane; e < len; e += 32) {
      const int jj = int(e / bk), c = int(e - int64_t(jj) * bk);
      const int j = j0 + jj;
      fma_column(acc, xr, __ldg(cols + j) * bk + c, to_float(data[(int64_t(j) * bn + r) * bk + c]));
    }
  }
}

// N:M (CB = code_bits: 2 for m = 4, 4 for m = 8): a lane per code word, the
// V = 32 / CB values it describes. Value i of the row sits in group i / n, at
// position code_i of the group's m columns.
template <int CB>
__device__ __forceinline__ int nm_column(uint32_t code, int j, int group, int m) {
  return group * m + int((code >> (CB * j)) & ((1u << CB) - 1));
}

// A lane's code word w of the row: V values from vs (float), code `code`.
// NN > 0: n known at compile time (2:4), so each value's column is a
// constant offset plus its code.
template <int MT, int CB, int NN, typename X>
__device__ __forceinline__ void nm_word(const X& xr, const float* v, uint32_t code, int w, int kc, int n, int m,
                                        float (&acc)[MT]) {
  constexpr int V = 32 / CB;
  const int i0 = w * V;
  if constexpr (NN > 0) {
    const int base = i0 / NN * (1 << CB);
#pragma unroll
    for (int j = 0; j < V; ++j)
      fma_column(acc, xr, base + (j / NN) * (1 << CB) + int((code >> (CB * j)) & ((1u << CB) - 1)), v[j]);
  } else {
    int group = i0 / n, r = i0 - group * n;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (i0 + j < kc) fma_column(acc, xr, nm_column<CB>(code, j, group, m), v[j]);
      if (++r == n) r = 0, ++group;
    }
  }
}

template <typename T, int MT, int CB, typename X>
__device__ __forceinline__ void nm_row(const SpParams& p, int row, const X& xr, int lane, float (&acc)[MT]) {
  constexpr int V = 32 / CB;
  const int n = p.nm_n, m = p.nm_m, kc = p.K / m * n;
  const int words = (kc * CB + 31) / 32;
  const uint32_t* codes = static_cast<const uint32_t*>(p.pattern) + int64_t(row) * words;
  const T* values = static_cast<const T*>(p.values) + int64_t(row) * kc;
  if (p.vec) {
    // U code words per lane in flight (w, w + 32, ...: a whole row of 4096
    // columns of 2:4 in one round trip): every load before any arithmetic.
    constexpr int U = 4, CHUNKS = V * sizeof(T) / 16;
    const bool two_four = CB == 2 && n == 2;
    for (int w0 = lane; w0 < words; w0 += 32 * U) {
      uint32_t code[U];
      uint4 raw[U][CHUNKS];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int w = w0 + 32 * u;
        code[u] = w < words ? __ldg(codes + w) : 0u;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c)
          raw[u][c] = w < words ? load_stream16(values + w * V + c * (16 / sizeof(T))) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int w = w0 + 32 * u;
        if (w >= words) break;
        float v[V];
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) unpack16<T>(raw[u][c], v + c * (16 / sizeof(T)));
        if (two_four) nm_word<MT, CB, 2>(xr, v, code[u], w, kc, n, m, acc);
        else nm_word<MT, CB, 0>(xr, v, code[u], w, kc, n, m, acc);
      }
    }
    return;
  }
  for (int w = lane; w < words; w += 32) {
    const uint32_t code = __ldg(codes + w);
    const int i0 = w * V;
    float v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = i0 + j < kc ? to_float(values[i0 + j]) : 0.0f;
    nm_word<MT, CB, 0>(xr, v, code, w, kc, n, m, acc);
  }
}

// Quantized N:M: the row's kc values are MLX's affine BITS-bit integers
// (w = s q + b per group of group_size values, group_size >= 32 so that a
// lane's V values lie in one group); per lane s sum(x q) + b sum(x).
template <typename T, int MT, int CB, int BITS, typename X>
__device__ __forceinline__ void nmq_row(const SpParams& p, int row, const X& xr, int lane, float (&acc)[MT]) {
  constexpr int V = 32 / CB, QW = V * BITS / 32; // values and w_q words per code word
  const int n = p.nm_n, m = p.nm_m, kc = p.K / m * n;
  const int words = (kc * CB + 31) / 32, row_q = kc * BITS / 32, G = kc / p.group_size;
  const int gs_shift = __ffs(p.group_size) - 1;
  const bool two_four = CB == 2 && n == 2;
  const uint32_t* codes = static_cast<const uint32_t*>(p.pattern) + int64_t(row) * words;
  const uint32_t* wq = static_cast<const uint32_t*>(p.values) + int64_t(row) * row_q;
  const T* scales = static_cast<const T*>(p.scales) + int64_t(row) * G;
  const T* biases = static_cast<const T*>(p.biases) + int64_t(row) * G;
  // U code words per lane in flight (w, w + 32, ...): all loads first.
  constexpr int U = 4;
  for (int w0 = lane; w0 < words; w0 += 32 * U) {
    uint32_t code[U], q[U][QW];
    float s[U], b[U];
#pragma unroll
    for (int h = 0; h < U; ++h) {
      const int w = w0 + 32 * h, i0 = w * V;
      const bool valid = w < words;
      code[h] = valid ? __ldg(codes + w) : 0u;
#pragma unroll
      for (int l = 0; l < QW; ++l) q[h][l] = valid && i0 * BITS / 32 + l < row_q ? __ldg(wq + i0 * BITS / 32 + l) : 0u;
      s[h] = valid ? to_float(scales[i0 >> gs_shift]) : 0.0f;
      b[h] = valid ? to_float(biases[i0 >> gs_shift]) : 0.0f;
    }
#pragma unroll
    for (int h = 0; h < U; ++h) {
      const int w = w0 + 32 * h, i0 = w * V;
      if (w >= words) break;
      float dot[MT] = {}, xsum[MT] = {};
      auto add = [&](int j, int col) {
        const float qj = int_bits_to_float(extract<BITS>(q[h], j) | 0x4b000000u);
        float xv[MT];
        xr.column(col, xv);
#pragma unroll
        for (int i = 0; i < MT; ++i) dot[i] = fmaf(qj, xv[i], dot[i]), xsum[i] += xv[i];
      };
      if (two_four && i0 + V <= kc) {
        const int base = i0 / 2 * 4;
#pragma unroll
        for (int j = 0; j < V; ++j) add(j, base + (j / 2) * 4 + int((code[h] >> (CB * j)) & 3u));
      } else {
        int group = i0 / n, r = i0 - group * n;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (i0 + j < kc) add(j, nm_column<CB>(code[h], j, group, m));
          if (++r == n) r = 0, ++group;
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) acc[i] = fmaf(s[h], dot[i], fmaf(b[h], xsum[i], acc[i]));
    }
  }
}

// ---------------------------------------------------------------------------
// One element W[n, k] (the transposed product): its value, or 0 when not stored.

__device__ __forceinline__ int64_t find_sorted_u16(const uint16_t* a, int64_t lo, int64_t hi, uint32_t key) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}
template <typename I>
__device__ __forceinline__ int64_t lower_bound(const I* a, int64_t lo, int64_t hi, I key) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}
// The last index r in [0, count) with a[r] <= key (a non-decreasing, a[0] <= key).
__device__ __forceinline__ int last_at_most(const int32_t* a, int count, int64_t key) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a[mid] <= key) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, int CB, int BITS>
__device__ __forceinline__ float nm_element(const SpParams& p, int n, int k) {
  const int nn = p.nm_n, m = p.nm_m, kc = p.K / m * nn;
  const int words = (kc * CB + 31) / 32;
  const uint32_t* codes = static_cast<const uint32_t*>(p.pattern) + int64_t(n) * words;
  const int group = k / m, pos = k - group * m;
  for (int t = 0; t < nn; ++t) {
    const int i = group * nn + t;
    const uint32_t c = (__ldg(codes + i * CB / 32) >> (i * CB % 32)) & ((1u << CB) - 1);
    if (int(c) != pos) continue;
    if constexpr (BITS == 0) return to_float(static_cast<const T*>(p.values)[int64_t(n) * kc + i]);
    const uint32_t* wq = static_cast<const uint32_t*>(p.values) + int64_t(n) * (kc * BITS / 32);
    const uint32_t q = (__ldg(wq + i * BITS / 32) >> (i * BITS % 32)) & ((1u << BITS) - 1);
    const int64_t gi = int64_t(n) * (kc / p.group_size) + i / p.group_size;
    return fmaf(to_float(static_cast<const T*>(p.scales)[gi]), float(q),
                to_float(static_cast<const T*>(p.biases)[gi]));
  }
  return 0.0f;
}

} // namespace mlx_ext::cuda::sparse
