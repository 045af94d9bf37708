// Sparse matmul CPU kernels, compiled once per ISA (see simd.h). Every format
// is read through one row iterator, for_each_stored, which yields the stored
// values of one row of W with their columns; the kernels around it are shared.
//
// matmul_rows: one task computes out[:, r0:r1]. For each panel of `width`
// rows of x (packed transposed, so that column k of the panel is `width`
// contiguous floats), each row of W is streamed once and every stored value
// w[r, k] does one rank-1 update acc[0:width] += w[r, k] * xt[k, 0:width]:
// the weight is loaded once per panel and reused across all its rows of x,
// and a block of BSR or a group of N:M expands into consecutive columns, so
// consecutive updates read consecutive panel rows. With width 1 (one row of
// x, decode) the update is a scalar gather with four independent sums.
#include <algorithm>
#include <vector>

#include "common/cpu/float_io.h"
#include "common/cpu/simd.h"
#include "sparse_matmul/cpu_kernels.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

// Calls f(col, j, value) for each stored value of row r of W: its column, its
// index in the values array and its value as float. VT: the values' type.
template <FloatType VT, typename F>
MLX_EXT_INLINE void for_each_stored(const SparseW& w, int64_t r, F&& f) {
  switch (w.kind) {
    case SparseKind::csr: {
      const int64_t end = w.row_ptr[r + 1];
      if (w.wide_columns) {
        const auto* cols = static_cast<const uint32_t*>(w.pattern);
        for (int64_t j = w.row_ptr[r]; j < end; ++j) f(int64_t(cols[j]), j, load_float<VT>(w.values, j));
      } else {
        const auto* cols = static_cast<const uint16_t*>(w.pattern);
        for (int64_t j = w.row_ptr[r]; j < end; ++j) f(int64_t(cols[j]), j, load_float<VT>(w.values, j));
      }
      break;
    }
    case SparseKind::bitmask: {
      // Set bits of the row's mask, lowest first, in the order of the values.
      const int64_t words = (w.K + 31) / 32;
      const auto* mask = static_cast<const uint32_t*>(w.pattern) + r * words;
      int64_t j = w.row_ptr[r];
      for (int64_t word = 0; word < words; ++word)
        for (uint32_t bits = mask[word]; bits; bits &= bits - 1, ++j)
          f(word * 32 + __builtin_ctz(bits), j, load_float<VT>(w.values, j));
      break;
    }
    case SparseKind::bsr: {
      // Row i of each block of block row br: block_k consecutive columns.
      const int64_t br = r / w.block_n, i = r % w.block_n;
      const auto* block_cols = static_cast<const int32_t*>(w.pattern);
      const int64_t block_size = int64_t(w.block_n) * w.block_k;
      for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
        const int64_t col0 = int64_t(block_cols[b]) * w.block_k;
        const int64_t j0 = b * block_size + i * w.block_k;
        for (int kk = 0; kk < w.block_k; ++kk) f(col0 + kk, j0 + kk, load_float<VT>(w.values, j0 + kk));
      }
      break;
    }
    case SparseKind::nm: {
      // Compressed value j of the row sits in group j / n at position code_j.
      const int64_t kc = w.K / w.m * w.n;
      const int64_t code_words = (kc * w.code_bits + 31) / 32;
      const auto* codes = static_cast<const uint32_t*>(w.pattern) + r * code_words;
      const uint32_t code_mask = (1u << w.code_bits) - 1;
      const auto code = [&](int64_t j) {
        const int64_t bit = j * w.code_bits;
        return int64_t((codes[bit / 32] >> (bit % 32)) & code_mask);
      };
      if (w.bits == 0) {
        for (int64_t j = 0; j < kc; ++j)
          f(j / w.n * w.m + code(j), r * kc + j, load_float<VT>(w.values, r * kc + j));
      } else {
        // MLX's affine packing of the compressed row: bits 4 or 8 never
        // straddle a word; w = scale * q + bias per group.
        const auto* wq = static_cast<const uint32_t*>(w.values) + r * (kc * w.bits / 32);
        const int64_t groups = kc / w.group_size;
        const uint32_t q_mask = (1u << w.bits) - 1;
        for (int64_t g = 0; g < groups; ++g) {
          const float scale = load_float<VT>(w.scales, r * groups + g);
          const float bias = load_float<VT>(w.biases, r * groups + g);
          for (int64_t j = g * w.group_size; j < (g + 1) * w.group_size; ++j) {
            const int64_t bit = j * w.bits;
            const float q = float((wq[bit / 32] >> (bit % 32)) & q_mask);
            f(j / w.n * w.m + code(j), r * kc + j, scale * q + bias);
          }
        }
      }
      break;
    }
  }
}

MLX_EXT_INLINE float load_any(FloatType t, const void* p, int64_t i) {
  switch (t) {
    case FloatType::f16: return load_float<FloatType::f16>(p, i);
    case FloatType::bf16: return load_float<FloatType::bf16>(p, i);
    default: return load_float<FloatType::f32>(p, i);
  }
}

MLX_EXT_INLINE void store_any(FloatType t, void* p, int64_t i, float v) {
  switch (t) {
    case FloatType::f16: return store_float<FloatType::f16>(p, i, v);
    case FloatType::bf16: return store_float<FloatType::bf16>(p, i, v);
    default: return store_float<FloatType::f32>(p, i, v);
  }
}

// One row of x (decode): out[m, r] for r in [r0, r1), each row of W once per row of x.
template <FloatType VT>
void matmul_rows_gather(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0,
    int64_t r1) {
  for (int64_t m = 0; m < xp.M; ++m) {
    const float* x = xp.xt + m * w.K;
    for (int64_t r = r0; r < r1; ++r) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      unsigned c = 0;
      for_each_stored<VT>(w, r, [&](int64_t col, int64_t, float v) { acc[c++ & 3] += v * x[col]; });
      const float bias = o.bias ? load_any(o.type, o.bias, r) : 0.0f;
      store_any(o.type, o.out, m * w.N + r, (acc[0] + acc[1]) + (acc[2] + acc[3]) + bias);
    }
  }
}

// Panels of V * kWidth rows of x: V vector accumulators per row of W.
template <FloatType VT, int V>
void matmul_rows_panel(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0,
    int64_t r1) {
  constexpr int width = V * kWidth;
  for (int64_t t = 0; t < xp.tiles; ++t) {
    const float* xt = xp.xt + t * w.K * width;
    const int64_t rows = std::min<int64_t>(width, xp.M - t * width);
    for (int64_t r = r0; r < r1; ++r) {
      VecF acc[V];
      for (int v = 0; v < V; ++v) acc[v] = zero();
      for_each_stored<VT>(w, r, [&](int64_t col, int64_t, float value) {
        const VecF b = broadcast(value);
        const float* p = xt + col * width;
        for (int v = 0; v < V; ++v) acc[v] = fma(b, load(p + v * kWidth), acc[v]);
      });
      alignas(64) float sums[width];
      for (int v = 0; v < V; ++v) store(sums + v * kWidth, acc[v]);
      const float bias = o.bias ? load_any(o.type, o.bias, r) : 0.0f;
      for (int64_t i = 0; i < rows; ++i)
        store_any(o.type, o.out, (t * width + i) * w.N + r, sums[i] + bias);
    }
  }
}

template <FloatType VT>
void matmul_rows_typed(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0,
    int64_t r1) {
  if (xp.width == 1) return matmul_rows_gather<VT>(w, xp, o, r0, r1);
  if (xp.width == kWidth) return matmul_rows_panel<VT, 1>(w, xp, o, r0, r1);
  matmul_rows_panel<VT, 4>(w, xp, o, r0, r1);
}

MLX_EXT_INLINE float dot(const float* a, const float* b, int64_t n) {
  VecF acc = zero();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) acc = fma(load(a + i), load(b + i), acc);
  float s = reduce_add(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One dot product over the M rows per stored value: gt and xt hold each row of
// g (and column of x) contiguously.
template <FloatType VT>
void sampled_rows_typed(const SparseW& w, const float* gt, const float* xt, int64_t M,
    void* dvalues, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for_each_stored<VT>(w, r, [&](int64_t col, int64_t j, float) {
      store_float<VT>(dvalues, j, dot(gt + r * M, xt + col * M, M));
    });
}

template <FloatType VT>
void transpose_typed(const SparseW& w, int32_t* col_ptr, uint32_t* rows, float* values) {
  std::fill(col_ptr, col_ptr + w.K + 1, 0);
  for (int64_t r = 0; r < w.N; ++r)
    for_each_stored<VT>(w, r, [&](int64_t col, int64_t, float) { ++col_ptr[col + 1]; });
  for (int64_t k = 0; k < w.K; ++k) col_ptr[k + 1] += col_ptr[k];
  std::vector<int32_t> next(col_ptr, col_ptr + w.K);
  for (int64_t r = 0; r < w.N; ++r)
    for_each_stored<VT>(w, r, [&](int64_t col, int64_t, float v) {
      const int32_t pos = next[col]++;
      rows[pos] = uint32_t(r);
      values[pos] = v;
    });
}

#define MLX_EXT_BY_VALUE_TYPE(fn, w, ...)                                         \
  switch ((w).value_type) {                                                       \
    case FloatType::f16: return fn<FloatType::f16>(w, __VA_ARGS__);               \
    case FloatType::bf16: return fn<FloatType::bf16>(w, __VA_ARGS__);             \
    default: return fn<FloatType::f32>(w, __VA_ARGS__);                           \
  }

void matmul_rows(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0, int64_t r1) {
  MLX_EXT_BY_VALUE_TYPE(matmul_rows_typed, w, xp, o, r0, r1)
}
void sampled_rows(const SparseW& w, const float* gt, const float* xt, int64_t M, void* dvalues,
    int64_t r0, int64_t r1) {
  MLX_EXT_BY_VALUE_TYPE(sampled_rows_typed, w, gt, xt, M, dvalues, r0, r1)
}
void transpose(const SparseW& w, int32_t* col_ptr, uint32_t* rows, float* values) {
  MLX_EXT_BY_VALUE_TYPE(transpose_typed, w, col_ptr, rows, values)
}

} // namespace

extern const SparseKernelTable sparse_matmul_kernels = {
    4 * kWidth,
    matmul_rows,
    sampled_rows,
    transpose,
};

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
