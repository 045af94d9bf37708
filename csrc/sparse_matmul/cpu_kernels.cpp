// Sparse matmul CPU kernels, compiled once per ISA (see simd.h). Every format
// is read through one row iterator, for_each_stored, which yields the stored
// values of one row of W with their columns; the kernels around it are shared.
// One task of every kernel owns rows r0 .. r1 of W (the driver balances them
// by stored values) and writes only their outputs: no atomics.
//
// matmul_rows_gather (decode, one row of x): each row of W streamed once as a
// SIMD dot product with x gathered by column; see "Decode" below.
//
// matmul_rows_panel (prefill): for each panel of `width` rows of x (packed
// transposed, so that column k of the panel is `width` contiguous floats),
// each row of W is streamed once and every stored value w[r, k] does one
// rank-1 update acc[0:width] += w[r, k] * xt[k, 0:width]: the weight is loaded
// once per panel and reused across all its rows of x. BSR updates several
// rows of a block at once (bsr_panel_rows, a dense micro-kernel per block).
//
// sampled_rows (the values' gradient): one dot product over M per stored value.
// transpose (for the x-gradient): W^T as CSR, one counting sort.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "common/cpu/float_io.h"
#include "common/cpu/gemm_tile.h"
#include "common/cpu/simd.h"
#include "sparse_matmul/cpu_kernels.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

// Calls f(col, j, value) for the kept values j0 .. j1 - 1 of float N:M row r
// (j0 a multiple of n): value j sits in group j / n at position code_j; `base`
// follows the group's first column without dividing.
template <FloatType VT, typename F>
MLX_EXT_INLINE void for_each_nm_value(const SparseW& w, int64_t r, int64_t j0, int64_t j1, F&& f) {
  const int64_t kc = w.K / w.m * w.n;
  const auto* codes = static_cast<const uint32_t*>(w.pattern) + r * ((kc * w.code_bits + 31) / 32);
  const uint32_t code_mask = (1u << w.code_bits) - 1;
  int64_t base = j0 / w.n * w.m;
  int t = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t bit = j * w.code_bits;
    f(base + ((codes[bit / 32] >> (bit % 32)) & code_mask), r * kc + j, load_float<VT>(w.values, r * kc + j));
    if (++t == w.n) t = 0, base += w.m;
  }
}

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
      const int64_t kc = w.K / w.m * w.n;
      if (w.bits == 0) return for_each_nm_value<VT>(w, r, 0, kc, f);
      // MLX's affine packing of the compressed row: bits 4 or 8 never
      // straddle a word; w = scale * q + bias per group.
      const auto* codes = static_cast<const uint32_t*>(w.pattern) + r * ((kc * w.code_bits + 31) / 32);
      const uint32_t code_mask = (1u << w.code_bits) - 1;
      const auto* wq = static_cast<const uint32_t*>(w.values) + r * (kc * w.bits / 32);
      const int64_t groups = kc / w.group_size;
      const uint32_t q_mask = (1u << w.bits) - 1;
      int64_t base = 0;
      int t = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = load_float<VT>(w.scales, r * groups + g);
        const float bias = load_float<VT>(w.biases, r * groups + g);
        for (int64_t j = g * w.group_size; j < (g + 1) * w.group_size; ++j) {
          const float q = float((wq[j * w.bits / 32] >> (j * w.bits % 32)) & q_mask);
          const int64_t bit = j * w.code_bits;
          f(base + ((codes[bit / 32] >> (bit % 32)) & code_mask), r * kc + j, scale * q + bias);
          if (++t == w.n) t = 0, base += w.m;
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

// --- Decode (one row of x): W streamed once, x gathered by column ----------
//
// Each row of W becomes (values, columns): CSR has both; N:M expands its codes
// into a per-thread column buffer (and quantized N:M dequantizes its row),
// then permutes x in registers for 2:4 and 4:8; Bitmask compresses x by the
// mask on AVX-512 (else expands its columns); BSR reads x contiguously per
// block. The dot products take kWidth values at a time.

#if defined(MLX_EXT_ISA_avx512)
using VecI = __m512i;
MLX_EXT_INLINE VecI load_index(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
MLX_EXT_INLINE VecI load_index(const uint32_t* p) { return _mm512_loadu_si512(p); }
MLX_EXT_INLINE VecI load_index(const int32_t* p) { return _mm512_loadu_si512(p); }
MLX_EXT_INLINE VecF gather(const float* x, VecI i) { return {_mm512_i32gather_ps(i, x, 4)}; }
#elif defined(MLX_EXT_ISA_avx2)
using VecI = __m256i;
MLX_EXT_INLINE VecI load_index(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MLX_EXT_INLINE VecI load_index(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
MLX_EXT_INLINE VecI load_index(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
MLX_EXT_INLINE VecF gather(const float* x, VecI i) { return {_mm256_i32gather_ps(x, i, 4)}; }
#else
struct VecI {
  int64_t v[kWidth];
};
template <typename Index>
MLX_EXT_INLINE VecI load_index(const Index* p) {
  VecI r;
  for (int l = 0; l < kWidth; ++l) r.v[l] = int64_t(p[l]);
  return r;
}
MLX_EXT_INLINE VecF gather(const float* x, VecI i) {
  alignas(64) float g[kWidth];
  for (int l = 0; l < kWidth; ++l) g[l] = x[i.v[l]];
  return load(g);
}
#endif

// sum_i values[j0 + i] * x[cols[i]] for i < n.
template <FloatType VT, typename Index>
MLX_EXT_INLINE float gather_dot(const void* values, int64_t j0, const Index* cols, int64_t n,
    const float* x) {
  VecF acc0 = zero(), acc1 = zero();
  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    acc0 = fma(load_floats<VT>(values, j0 + i), gather(x, load_index(cols + i)), acc0);
    acc1 = fma(load_floats<VT>(values, j0 + i + kWidth), gather(x, load_index(cols + i + kWidth)), acc1);
  }
  if (i + kWidth <= n) {
    acc0 = fma(load_floats<VT>(values, j0 + i), gather(x, load_index(cols + i)), acc0);
    i += kWidth;
  }
  float s = reduce_add(add(acc0, acc1));
  for (; i < n; ++i) s += load_float<VT>(values, j0 + i) * x[cols[i]];
  return s;
}

#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
// x[base + local[l]] for lane l, every local index in [0, 2 kWidth): the two
// vectors of x from base permuted, no gather (N:M with n / m >= 1/2).
MLX_EXT_INLINE VecF window(const float* x, VecI local) {
#if defined(MLX_EXT_ISA_avx512)
  return {_mm512_permutex2var_ps(_mm512_loadu_ps(x), local, _mm512_loadu_ps(x + 16))};
#else
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), local);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), local);
  return {_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(local, _mm256_set1_epi32(7))))};
#endif
}

// gather_dot for N:M rows whose every kWidth values span exactly 2 kWidth
// columns (2:4, 4:8): chunk c of the values reads x[2 kWidth c, 2 kWidth (c + 1)).
template <FloatType VT>
MLX_EXT_INLINE float window_dot(const void* values, int64_t j0, const int32_t* cols, int64_t n,
    const float* x) {
  VecF acc = zero();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    const int32_t base = int32_t(2 * i);
#if defined(MLX_EXT_ISA_avx512)
    const VecI local = _mm512_sub_epi32(load_index(cols + i), _mm512_set1_epi32(base));
#else
    const VecI local = _mm256_sub_epi32(load_index(cols + i), _mm256_set1_epi32(base));
#endif
    acc = fma(load_floats<VT>(values, j0 + i), window(x + base, local), acc);
  }
  float s = reduce_add(acc);
  for (; i < n; ++i) s += load_float<VT>(values, j0 + i) * x[cols[i]];
  return s;
}
#else
template <FloatType VT>
MLX_EXT_INLINE float window_dot(const void* values, int64_t j0, const int32_t* cols, int64_t n,
    const float* x) {
  return gather_dot<VT>(values, j0, cols, n, x);
}
#endif

// sum_i values[j0 + i] * x[i] for i < n.
template <FloatType VT>
MLX_EXT_INLINE float contiguous_dot(const void* values, int64_t j0, const float* x, int64_t n) {
  VecF acc = zero();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) acc = fma(load_floats<VT>(values, j0 + i), load(x + i), acc);
  float s = reduce_add(acc);
  for (; i < n; ++i) s += load_float<VT>(values, j0 + i) * x[i];
  return s;
}

// Set-bit positions of every byte value, lowest first, and their count.
struct BytePositions {
  uint8_t pos[256][8];
  uint8_t count[256];
  constexpr BytePositions() : pos(), count() {
    for (int b = 0; b < 256; ++b)
      for (int bit = 0; bit < 8; ++bit)
        if (b >> bit & 1) pos[b][count[b]++] = uint8_t(bit);
  }
};
constexpr BytePositions kBytePositions;

#if defined(MLX_EXT_ISA_avx512)
// Bitmask rows on AVX-512. The mask is stored as 32-bit words per row (bit b
// of word t: column 32 t + b), the row's values packed in column order.

// float32 of 16-bit values (VT f16 or bf16).
template <FloatType VT>
MLX_EXT_INLINE __m512 halves_to_float(__m256i h) {
  if constexpr (VT == FloatType::f16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The columns of word t's set bits past the whole words, one at a time.
template <FloatType VT>
MLX_EXT_INLINE float bitmask_tail(const void* values, int64_t j, uint32_t bits, const float* x) {
  float s = 0.0f;
  for (; bits; bits &= bits - 1) s += load_float<VT>(values, j++) * x[__builtin_ctz(bits)];
  return s;
}

// With AVX512-VBMI2 (Ice Lake and later): each 32-bit mask word expands the
// next popcount stored values to their columns (zeros elsewhere) in one
// expanding load -- vpexpandw for 16-bit values, two vexpandps for float32 --
// against x read contiguously. An expanding load reads exactly the values it
// places, so nothing past the row is touched. About 9 vector operations per
// 32 columns.
template <FloatType VT>
__attribute__((target("avx512vbmi2,popcnt"))) float bitmask_dot_expand(const SparseW& w, int64_t r,
    const float* x) {
  const int64_t words = (w.K + 31) / 32, full = w.K / 32;
  const auto* mask = static_cast<const uint32_t*>(w.pattern) + r * words;
  int64_t j = w.row_ptr[r];
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t t = 0; t < full; ++t) {
    const uint32_t m = mask[t];
    if constexpr (VT == FloatType::f32) {
      const float* v = static_cast<const float*>(w.values) + j;
      acc0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(__mmask16(m), v), _mm512_loadu_ps(x + 32 * t), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps(__mmask16(m >> 16), v + __builtin_popcount(m & 0xFFFFu)),
          _mm512_loadu_ps(x + 32 * t + 16), acc1);
    } else {
      const __m512i h = _mm512_maskz_expandloadu_epi16(__mmask32(m), static_cast<const uint16_t*>(w.values) + j);
      acc0 = _mm512_fmadd_ps(halves_to_float<VT>(_mm512_castsi512_si256(h)), _mm512_loadu_ps(x + 32 * t), acc0);
      acc1 = _mm512_fmadd_ps(halves_to_float<VT>(_mm512_extracti64x4_epi64(h, 1)), _mm512_loadu_ps(x + 32 * t + 16),
          acc1);
    }
    j += __builtin_popcount(m);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  if (full < words) s += bitmask_tail<VT>(w.values, j, mask[full], x + 32 * full);
  return s;
}

// Without VBMI2 (Skylake-X, Cascade Lake): 16 columns at a time, the next
// popcount values loaded under a first-count mask (a table, not a variable
// shift), converted, then expanded to their columns (vexpandps).
struct FirstMasks {
  uint16_t m[17];
  constexpr FirstMasks() : m() {
    for (int c = 0; c <= 16; ++c) m[c] = uint16_t((1u << c) - 1);
  }
};
constexpr FirstMasks kFirstMasks;

template <FloatType VT>
MLX_EXT_INLINE __m512 load_first(const void* p, int64_t i, int count) {
  const __mmask16 first = kFirstMasks.m[count];
  if constexpr (VT == FloatType::f32) return _mm512_maskz_loadu_ps(first, static_cast<const float*>(p) + i);
  return halves_to_float<VT>(_mm256_maskz_loadu_epi16(first, static_cast<const uint16_t*>(p) + i));
}

template <FloatType VT>
float bitmask_dot(const SparseW& w, int64_t r, const float* x) {
  const int64_t words = (w.K + 31) / 32, full = w.K / 32;
  const auto* mask = static_cast<const uint32_t*>(w.pattern) + r * words;
  int64_t j = w.row_ptr[r];
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t t = 0; t < full; ++t) {
    const uint32_t m = mask[t];
    const int c0 = __builtin_popcount(m & 0xFFFFu), c1 = __builtin_popcount(m >> 16);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_expand_ps(__mmask16(m), load_first<VT>(w.values, j, c0)),
        _mm512_loadu_ps(x + 32 * t), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_expand_ps(__mmask16(m >> 16), load_first<VT>(w.values, j + c0, c1)),
        _mm512_loadu_ps(x + 32 * t + 16), acc1);
    j += c0 + c1;
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  if (full < words) s += bitmask_tail<VT>(w.values, j, mask[full], x + 32 * full);
  return s;
}

// VBMI2 unless the CPU lacks it or MLX_EXT_CPU_NO_VBMI2 is set (the tests
// use it to run the fallback on machines that have VBMI2).
bool use_vbmi2() {
  static const bool use = [] {
    const char* off = std::getenv("MLX_EXT_CPU_NO_VBMI2");
    return __builtin_cpu_supports("avx512vbmi2") && !(off && *off && *off != '0');
  }();
  return use;
}
#else
// Columns of the stored values of bitmask row r, in order, into cols (room
// for K + 8: each byte of the mask writes 8); returns their count.
int64_t bitmask_columns(const SparseW& w, int64_t r, int32_t* cols) {
  const int64_t bytes = (w.K + 31) / 32 * 4;
  const auto* mask = reinterpret_cast<const uint8_t*>(w.pattern) + r * bytes;
  int64_t n = 0;
  for (int64_t byte = 0; byte < bytes; ++byte) {
    const uint8_t b = mask[byte];
#if defined(MLX_EXT_ISA_avx2)
    const __m128i pos = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kBytePositions.pos[b]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + n),
        _mm256_add_epi32(_mm256_cvtepu8_epi32(pos), _mm256_set1_epi32(int32_t(byte * 8))));
#else
    for (int t = 0; t < 8; ++t) cols[n + t] = int32_t(byte * 8 + kBytePositions.pos[b][t]);
#endif
    n += kBytePositions.count[b];
  }
  return n;
}
#endif

// Columns of the kept values of N:M row r: first[j] (the first column of
// value j's group, the same for every row) plus its code.
template <int code_bits>
void nm_columns(const SparseW& w, int64_t r, const int32_t* first, int32_t* cols) {
  constexpr int per_word = 32 / code_bits;
  const int64_t kc = w.K / w.m * w.n;
  const auto* codes = static_cast<const uint32_t*>(w.pattern) + r * ((kc + per_word - 1) / per_word);
  constexpr uint32_t mask = (1u << code_bits) - 1;
  // Whole words with their codes unrolled (constant shifts), then the rest.
  const int64_t full = kc / per_word;
  for (int64_t i = 0; i < full; ++i) {
    const uint32_t word = codes[i];
#pragma GCC unroll 16
    for (int t = 0; t < per_word; ++t)
      cols[i * per_word + t] = first[i * per_word + t] + int32_t((word >> (t * code_bits)) & mask);
  }
  for (int64_t j = full * per_word; j < kc; ++j)
    cols[j] = first[j] + int32_t((codes[full] >> ((j - full * per_word) * code_bits)) & mask);
}

// The kept values of quantized N:M row r, dequantized into values.
template <FloatType VT, int bits>
void nm_dequantize(const SparseW& w, int64_t r, float* values) {
  constexpr int per_word = 32 / bits;
  const int64_t kc = w.K / w.m * w.n, groups = kc / w.group_size;
  const auto* wq = static_cast<const uint32_t*>(w.values) + r * (kc / per_word);
  const int64_t words_per_group = w.group_size / per_word;
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = load_float<VT>(w.scales, r * groups + g);
    const float bias = load_float<VT>(w.biases, r * groups + g);
    // One word at a time, its values unrolled: constant shifts the compiler vectorizes.
    for (int64_t i = g * words_per_group; i < (g + 1) * words_per_group; ++i) {
      const uint32_t word = wq[i];
#pragma GCC unroll 8
      for (int t = 0; t < per_word; ++t)
        values[i * per_word + t] = scale * float(int32_t((word >> (t * bits)) & ((1u << bits) - 1))) + bias;
    }
  }
}

#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
// 2:4 decode fused (no column or value buffer): each chunk of kWidth kept
// values of row r is one word of 2-bit codes (AVX2: half a word) plus its
// values -- float, or MLX's affine codes read straight from the packed words
// (4-bit: kWidth / 8 words; 8-bit: kWidth bytes) -- against the window of
// 2 kWidth columns of x the chunk covers: value l of a chunk sits in group
// l / 2, at local column 4 (l / 2) + code_l. Needs kc % kWidth == 0 and, for
// quantized values, group_size % kWidth == 0 (nm24_fused_ok).
MLX_EXT_INLINE bool nm24_fused_ok(const SparseW& w) {
  const int64_t kc = w.K / 2;
  return w.n == 2 && w.m == 4 && kc % kWidth == 0 && (w.bits == 0 || w.group_size % kWidth == 0);
}

template <int bits>
MLX_EXT_INLINE VecF nm24_quants(const uint32_t* wq, int64_t c) {
#if defined(MLX_EXT_ISA_avx512)
  if constexpr (bits == 8) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 4 * c))))};
  } else {
    // Lanes 0-7 from word 2c, 8-15 from word 2c + 1, nibble l % 8 each.
    const __m512i words = _mm512_inserti32x8(
        _mm512_castsi256_si512(_mm256_set1_epi32(int32_t(wq[2 * c]))), _mm256_set1_epi32(int32_t(wq[2 * c + 1])), 1);
    const __m512i shifts = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
    return {_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32(15)))};
  }
#else
  if constexpr (bits == 8) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wq + 2 * c))))};
  } else {
    const __m256i shifts = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
    return {_mm256_cvtepi32_ps(_mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(int32_t(wq[c])), shifts), _mm256_set1_epi32(15)))};
  }
#endif
}

// Local columns (in [0, 2 kWidth)) of chunk c's values.
MLX_EXT_INLINE VecI nm24_local(const uint32_t* codes, int64_t c) {
#if defined(MLX_EXT_ISA_avx512)
  const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i first = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int32_t(codes[c])), shifts),
      _mm512_set1_epi32(3));
  return _mm512_add_epi32(first, code);
#else
  const uint32_t half = codes[c / 2] >> (16 * (c % 2));
  const __m256i shifts = _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0);
  const __m256i first = _mm256_set_epi32(12, 12, 8, 8, 4, 4, 0, 0);
  const __m256i code = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int32_t(half)), shifts),
      _mm256_set1_epi32(3));
  return _mm256_add_epi32(first, code);
#endif
}

#if defined(MLX_EXT_ISA_avx512)
// 2:4 with 4-bit values on AVX-512, 16 kept values (one 64-bit word of codes
// and one 32-bit word of 2-bit column codes) per step, in 6 vector operations:
// the lanes hold the chunk's values in the order 0, 8, 1, 9, ..., 7, 15
// (lane 2i: value i, lane 2i + 1: value 8 + i), because one variable 64-bit
// shift of the broadcast word puts nibble i in the low dword of qword i and
// nibble 8 + i in its high dword. The dequantized values come from a 16-entry
// table scale * q + bias per group (a permute, which reads only the index's
// low 4 bits, so nothing needs masking), and the x values from the chunk's
// 32-column window (a two-source permute, low 5 bits of each index).
constexpr int64_t kPrefetchBytes = 2048;

// The 16 values of one chunk, from its 64-bit word of nibbles.
MLX_EXT_INLINE __m512 chunk_values(uint64_t nibbles, __m512 table) {
  const __m512i shifts = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(_mm512_srlv_epi64(_mm512_set1_epi64(int64_t(nibbles)), shifts), table);
}

// The x value of each of one chunk's 16 values, from its 32-bit word of
// 2-bit codes and the chunk's 32 columns of x.
MLX_EXT_INLINE __m512 chunk_x(uint32_t codes, const float* x) {
  const __m512i shifts = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
  // Lane 2i: group i / 2 of the chunk; lane 2i + 1: group (8 + i) / 2.
  const __m512i first = _mm512_set_epi32(28, 12, 28, 12, 24, 8, 24, 8, 20, 4, 20, 4, 16, 0, 16, 0);
  const __m512i code = _mm512_srlv_epi32(_mm512_set1_epi32(int32_t(codes)), shifts);
  // (code & 3) | first: each value's column inside the 32-wide window.
  const __m512i local = _mm512_ternarylogic_epi32(code, _mm512_set1_epi32(3), first, 0xEA);
  return _mm512_permutex2var_ps(_mm512_loadu_ps(x), local, _mm512_loadu_ps(x + 16));
}

template <FloatType VT>
float nm24_dot_q4(const SparseW& w, int64_t r, const float* x) {
  const int64_t kc = w.K / 2, groups = kc / w.group_size, per_group = w.group_size / 16;
  const auto* codes = static_cast<const uint32_t*>(w.pattern) + r * (kc / 16);
  const auto* wq = static_cast<const uint64_t*>(w.values) + r * (kc / 16);
  const __m512 levels = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  // One group: its 16-entry table scale * q + bias, then its chunks, two per
  // step (per_group is even: group sizes 32, 64, 128), one accumulator each.
  const auto group = [&](int64_t g, __m512 scale, __m512 bias) {
    const __m512 table = _mm512_fmadd_ps(levels, scale, bias);
    for (int64_t c = g * per_group; c < (g + 1) * per_group; c += 2) {
      // The codes and values streams, prefetched kPrefetchBytes ahead (into
      // the next rows: a thread's rows are contiguous): one row alone is too
      // short for the hardware prefetcher to run ahead of the loads.
      if ((c & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(wq + c) + kPrefetchBytes, _MM_HINT_T0);
      if ((c & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(codes + c) + kPrefetchBytes, _MM_HINT_T0);
      acc0 = _mm512_fmadd_ps(chunk_values(wq[c], table), chunk_x(codes[c], x + 32 * c), acc0);
      acc1 = _mm512_fmadd_ps(chunk_values(wq[c + 1], table), chunk_x(codes[c + 1], x + 32 * c + 32), acc1);
    }
  };
  // Scales and biases converted 16 groups at a time, each broadcast by a permute.
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    const __m512 scales = load_floats<VT>(w.scales, r * groups + g).v;
    const __m512 biases = load_floats<VT>(w.biases, r * groups + g).v;
    for (int t = 0; t < 16; ++t) {
      const __m512i lane = _mm512_set1_epi32(t);
      group(g + t, _mm512_permutexvar_ps(lane, scales), _mm512_permutexvar_ps(lane, biases));
    }
  }
  for (; g < groups; ++g)
    group(g, _mm512_set1_ps(load_float<VT>(w.scales, r * groups + g)),
        _mm512_set1_ps(load_float<VT>(w.biases, r * groups + g)));
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

// Row r of a 2:4 W . x; bits 0: float values of type VT, else VT is the
// scales' and biases' type.
template <FloatType VT, int bits>
float nm24_dot(const SparseW& w, int64_t r, const float* x) {
  const int64_t kc = w.K / 2, chunks = kc / kWidth;
  const auto* codes = static_cast<const uint32_t*>(w.pattern) + r * ((kc * 2 + 31) / 32);
  VecF acc0 = zero(), acc1 = zero();
  if constexpr (bits == 0) {
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      acc0 = fma(load_floats<VT>(w.values, r * kc + c * kWidth), window(x + 2 * kWidth * c, nm24_local(codes, c)), acc0);
      acc1 = fma(load_floats<VT>(w.values, r * kc + (c + 1) * kWidth),
          window(x + 2 * kWidth * (c + 1), nm24_local(codes, c + 1)), acc1);
    }
    if (c < chunks)
      acc0 = fma(load_floats<VT>(w.values, r * kc + c * kWidth), window(x + 2 * kWidth * c, nm24_local(codes, c)), acc0);
  } else {
    const auto* wq = static_cast<const uint32_t*>(w.values) + r * (kc * bits / 32);
    const int64_t groups = kc / w.group_size, per_group = w.group_size / kWidth;
    for (int64_t g = 0; g < groups; ++g) {
      // sum scale q x + bias x: the scale applied per value, the bias once per group.
      VecF qx = zero(), xs = zero();
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const VecF xw = window(x + 2 * kWidth * c, nm24_local(codes, c));
        qx = fma(nm24_quants<bits>(wq, c), xw, qx);
        xs = add(xs, xw);
      }
      acc0 = fma(broadcast(load_float<VT>(w.scales, r * groups + g)), qx, acc0);
      acc1 = fma(broadcast(load_float<VT>(w.biases, r * groups + g)), xs, acc1);
    }
  }
  return reduce_add(add(acc0, acc1));
}
#endif

// Per-thread buffers of the decode path: one row's columns and values, and
// the N:M groups' first columns.
struct DecodeScratch {
  std::vector<int32_t> cols, first;
  int first_n = 0, first_m = 0; // the N:M pattern `first` was filled for
  std::vector<float> values;
};

template <FloatType VT>
float decode_row(const SparseW& w, int64_t r, const float* x, DecodeScratch& s) {
  switch (w.kind) {
    case SparseKind::csr: {
      const int64_t j0 = w.row_ptr[r], n = w.row_ptr[r + 1] - j0;
      if (w.wide_columns)
        return gather_dot<VT>(w.values, j0, static_cast<const uint32_t*>(w.pattern) + j0, n, x);
      return gather_dot<VT>(w.values, j0, static_cast<const uint16_t*>(w.pattern) + j0, n, x);
    }
    case SparseKind::bitmask: {
#if defined(MLX_EXT_ISA_avx512)
      return use_vbmi2() ? bitmask_dot_expand<VT>(w, r, x) : bitmask_dot<VT>(w, r, x);
#else
      const int64_t n = bitmask_columns(w, r, s.cols.data());
      return gather_dot<VT>(w.values, w.row_ptr[r], s.cols.data(), n, x);
#endif
    }
    case SparseKind::bsr: {
      const int64_t br = r / w.block_n, i = r % w.block_n;
      const auto* block_cols = static_cast<const int32_t*>(w.pattern);
      float sum = 0.0f;
      for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b)
        sum += contiguous_dot<VT>(w.values, (b * w.block_n + i) * w.block_k,
            x + int64_t(block_cols[b]) * w.block_k, w.block_k);
      return sum;
    }
    case SparseKind::nm: {
#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
      if (nm24_fused_ok(w)) {
#if defined(MLX_EXT_ISA_avx512)
        if (w.bits == 4 && w.group_size % 32 == 0) return nm24_dot_q4<VT>(w, r, x);
        if (w.bits == 4) return nm24_dot<VT, 4>(w, r, x);
#else
        if (w.bits == 4) return nm24_dot<VT, 4>(w, r, x);
#endif
        if (w.bits == 8) return nm24_dot<VT, 8>(w, r, x);
        return nm24_dot<VT, 0>(w, r, x);
      }
#endif
      const int64_t kc = w.K / w.m * w.n;
      if (w.code_bits == 2) {
        nm_columns<2>(w, r, s.first.data(), s.cols.data());
      } else {
        nm_columns<4>(w, r, s.first.data(), s.cols.data());
      }
      const bool windowed = 2 * w.n == w.m && kWidth % w.n == 0;
      if (w.bits == 0)
        return windowed ? window_dot<VT>(w.values, r * kc, s.cols.data(), kc, x)
                        : gather_dot<VT>(w.values, r * kc, s.cols.data(), kc, x);
      if (w.bits == 4) {
        nm_dequantize<VT, 4>(w, r, s.values.data());
      } else {
        nm_dequantize<VT, 8>(w, r, s.values.data());
      }
      return windowed ? window_dot<FloatType::f32>(s.values.data(), 0, s.cols.data(), kc, x)
                      : gather_dot<FloatType::f32>(s.values.data(), 0, s.cols.data(), kc, x);
    }
  }
  return 0.0f;
}

template <FloatType VT>
void matmul_rows_gather(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0,
    int64_t r1) {
  thread_local DecodeScratch s;
  if (int64_t(s.cols.size()) < w.K + 8) s.cols.resize(w.K + 8), s.values.resize(w.K);
  bool fused = false;
#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
  fused = w.kind == SparseKind::nm && nm24_fused_ok(w);
#endif
  if (w.kind == SparseKind::nm && !fused &&
      (int64_t(s.first.size()) != w.K / w.m * w.n || s.first_n != w.n || s.first_m != w.m)) {
    s.first_n = w.n, s.first_m = w.m;
    s.first.resize(w.K / w.m * w.n);
    for (int64_t j = 0; j < int64_t(s.first.size()); ++j) s.first[j] = int32_t(j / w.n * w.m);
  }
  for (int64_t m = 0; m < xp.M; ++m) {
    const float* x = xp.xt + m * w.K;
    for (int64_t r = r0; r < r1; ++r) {
      const float bias = o.bias ? load_any(o.type, o.bias, r) : 0.0f;
      store_any(o.type, o.out, m * w.N + r, decode_row<VT>(w, r, x, s) + bias);
    }
  }
}

// The sums of one row r of W over a panel, kept as `width` consecutive floats
// of the task's buffer (row r - r0); written to out once the task's rows are
// done, each output row in one run (columns of out one at a time would touch
// a new cache line per value).
template <int V>
MLX_EXT_INLINE void keep_panel_row(float* sums, const VecF* acc) {
  for (int v = 0; v < V; ++v) store(sums + v * kWidth, acc[v]);
}

void store_panel(const SparseOut& o, const float* sums, int width, int64_t N, int64_t m0,
    int64_t rows, int64_t r0, int64_t r1) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t r = r0; r < r1; ++r) {
      const float bias = o.bias ? load_any(o.type, o.bias, r) : 0.0f;
      store_any(o.type, o.out, (m0 + i) * N + r, sums[(r - r0) * width + i] + bias);
    }
}

// BSR: the R rows r .. r + R - 1 of one block row share their columns, so
// each vector of the panel loaded serves R rows: an R x V tile of
// accumulators, a dense micro-kernel over each block's bk columns.
#if defined(MLX_EXT_ISA_avx2)
constexpr int kBsrRows = 2; // 16 vector registers
#else
constexpr int kBsrRows = 4;
#endif

template <FloatType VT, int R, int V>
void bsr_panel_rows(const SparseW& w, const float* xt, int64_t r, float* sums) {
  constexpr int width = V * kWidth;
  const int64_t br = r / w.block_n, i0 = r % w.block_n;
  const auto* block_cols = static_cast<const int32_t*>(w.pattern);
  VecF acc[R][V];
  for (int ri = 0; ri < R; ++ri)
    for (int v = 0; v < V; ++v) acc[ri][v] = zero();
  for (int64_t b = w.row_ptr[br]; b < w.row_ptr[br + 1]; ++b) {
    const float* xp = xt + int64_t(block_cols[b]) * w.block_k * width;
    const int64_t j0 = (b * w.block_n + i0) * w.block_k;
    for (int kk = 0; kk < w.block_k; ++kk) {
      VecF xv[V];
      for (int v = 0; v < V; ++v) xv[v] = load(xp + kk * width + v * kWidth);
      for (int ri = 0; ri < R; ++ri) {
        const VecF wv = broadcast(load_float<VT>(w.values, j0 + ri * w.block_k + kk));
        for (int v = 0; v < V; ++v) acc[ri][v] = fma(wv, xv[v], acc[ri][v]);
      }
    }
  }
  for (int ri = 0; ri < R; ++ri) keep_panel_row<V>(sums + ri * width, acc[ri]);
}

// CSR, Bitmask and N:M prefill, K in blocks of kBlockK columns. For each
// block, the stored values of the task's rows that fall in it are decoded
// once into a small buffer (their float values and their offsets col * width
// in a panel), then every panel of x adds them: decoding (indices, codes,
// half floats, dequantization) costs once per call instead of once per panel,
// and each panel's slice of the block (kBlockK x width floats) stays in L1.
// sums holds every panel's sums of every task row (layout: panel, row, width).
constexpr int64_t kBlockK = 64; // a multiple of 32 (mask words) and of every m

struct BlockScratch {
  std::vector<float> sums, values;
  std::vector<int32_t> offsets;
  std::vector<int64_t> cursor; // per row: the next stored value's index (CSR, Bitmask)
};

// The stored values of row r in columns [k0, k0 + kBlockK) into values and
// offsets; returns their count. cursor: that row's position, advanced.
template <FloatType VT>
MLX_EXT_INLINE int64_t decode_block(const SparseW& w, int64_t r, int64_t k0, int width, int64_t& cursor,
    float* values, int32_t* offsets) {
  const int64_t k1 = std::min(w.K, k0 + kBlockK);
  int64_t n = 0;
  switch (w.kind) {
    case SparseKind::csr: {
      const int64_t end = w.row_ptr[r + 1];
      int64_t j = cursor;
      if (w.wide_columns) {
        const auto* cols = static_cast<const uint32_t*>(w.pattern);
        for (; j < end && cols[j] < k1; ++j, ++n) values[n] = load_float<VT>(w.values, j), offsets[n] = int32_t(cols[j]) * width;
      } else {
        const auto* cols = static_cast<const uint16_t*>(w.pattern);
        for (; j < end && cols[j] < k1; ++j, ++n) values[n] = load_float<VT>(w.values, j), offsets[n] = int32_t(cols[j]) * width;
      }
      cursor = j;
      break;
    }
    case SparseKind::bitmask: {
      const auto* mask = static_cast<const uint32_t*>(w.pattern) + r * ((w.K + 31) / 32);
      int64_t j = cursor;
      for (int64_t word = k0 / 32; word < (k1 + 31) / 32; ++word)
        for (uint32_t bits = mask[word]; bits; bits &= bits - 1, ++j, ++n)
          values[n] = load_float<VT>(w.values, j), offsets[n] = int32_t(word * 32 + __builtin_ctz(bits)) * width;
      cursor = j;
      break;
    }
    default: { // nm: kept values j0 .. j1 of the row
      const int64_t kc = w.K / w.m * w.n, j0 = k0 / w.m * w.n, j1 = k1 / w.m * w.n;
      const auto* codes = static_cast<const uint32_t*>(w.pattern) + r * ((kc * w.code_bits + 31) / 32);
      const uint32_t code_mask = (1u << w.code_bits) - 1;
#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
      // Float 2:4: kWidth values per step (j0 is a multiple of kWidth), their
      // columns from one word of codes (nm24_local), their values converted
      // as a vector; about a tenth of the scalar decode's time per value.
      if (w.n == 2 && w.m == 4 && w.bits == 0) {
        // The task's rows are visited one K block each, rows kc values
        // apart: too many streams for the hardware prefetcher, so each row's
        // values two blocks ahead (and its codes a line ahead) are prefetched.
        const auto* v = static_cast<const char*>(w.values) + (r * kc + j0) * (VT == FloatType::f32 ? 4 : 2);
        _mm_prefetch(v + 2 * (VT == FloatType::f32 ? 4 : 2) * (kBlockK / 2), _MM_HINT_T0);
        if (VT == FloatType::f32) _mm_prefetch(v + 2 * 4 * (kBlockK / 2) + 64, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(codes + j0 / 16) + 64, _MM_HINT_T0);
        for (; j0 + n + kWidth <= j1; n += kWidth) {
          const int64_t c = (j0 + n) / kWidth;
          store(values + n, load_floats<VT>(w.values, r * kc + j0 + n));
#if defined(MLX_EXT_ISA_avx512)
          const __m512i col = _mm512_add_epi32(nm24_local(codes, c), _mm512_set1_epi32(int32_t(2 * kWidth * c)));
          _mm512_storeu_si512(offsets + n, _mm512_mullo_epi32(col, _mm512_set1_epi32(width)));
#else
          const __m256i col = _mm256_add_epi32(nm24_local(codes, c), _mm256_set1_epi32(int32_t(2 * kWidth * c)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + n), _mm256_mullo_epi32(col, _mm256_set1_epi32(width)));
#endif
        }
      }
#endif
      for (int64_t j = j0 + n; j < j1; ++j, ++n) {
        const int64_t bit = j * w.code_bits;
        offsets[n] = int32_t(j / w.n * w.m + ((codes[bit / 32] >> (bit % 32)) & code_mask)) * width;
        if (w.bits == 0) {
          values[n] = load_float<VT>(w.values, r * kc + j);
        } else { // MLX's affine packing of the compressed row (never straddles a word)
          const auto* wq = static_cast<const uint32_t*>(w.values) + r * (kc * w.bits / 32);
          const int64_t g = r * (kc / w.group_size) + j / w.group_size;
          const float q = float((wq[j * w.bits / 32] >> (j * w.bits % 32)) & ((1u << w.bits) - 1));
          values[n] = load_float<VT>(w.scales, g) * q + load_float<VT>(w.biases, g);
        }
      }
    }
  }
  return n;
}

template <FloatType VT, int V>
void blocked_prefill(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0, int64_t r1) {
  constexpr int width = V * kWidth;
  const int64_t rows = r1 - r0;
  thread_local BlockScratch s;
  s.sums.assign(xp.tiles * rows * width, 0.0f);
  s.values.resize(rows * kBlockK);
  s.offsets.resize(rows * kBlockK);
  s.cursor.resize(rows);
  std::vector<int64_t> counts(rows);
  if (w.kind != SparseKind::nm)
    for (int64_t r = r0; r < r1; ++r) s.cursor[r - r0] = w.row_ptr[r];
  for (int64_t k0 = 0; k0 < w.K; k0 += kBlockK) {
    for (int64_t r = r0; r < r1; ++r)
      counts[r - r0] = decode_block<VT>(w, r, k0, width, s.cursor[r - r0], s.values.data() + (r - r0) * kBlockK,
          s.offsets.data() + (r - r0) * kBlockK);
    for (int64_t t = 0; t < xp.tiles; ++t) {
      const float* xt = xp.xt + t * w.K * width;
      for (int64_t i = 0; i < rows; ++i) {
        float* row_sums = s.sums.data() + (t * rows + i) * width;
        const float* values = s.values.data() + i * kBlockK;
        const int32_t* offsets = s.offsets.data() + i * kBlockK;
        // Even and odd values in two sets of accumulators: 2 V independent
        // FMA chains, enough to hide the FMA latency.
        VecF acc[V], odd[V];
        for (int v = 0; v < V; ++v) acc[v] = load(row_sums + v * kWidth), odd[v] = zero();
        int64_t j = 0;
        for (; j + 2 <= counts[i]; j += 2) {
          const VecF b0 = broadcast(values[j]), b1 = broadcast(values[j + 1]);
          const float* p0 = xt + offsets[j];
          const float* p1 = xt + offsets[j + 1];
          for (int v = 0; v < V; ++v) {
            acc[v] = fma(b0, load(p0 + v * kWidth), acc[v]);
            odd[v] = fma(b1, load(p1 + v * kWidth), odd[v]);
          }
        }
        if (j < counts[i]) {
          const VecF b = broadcast(values[j]);
          for (int v = 0; v < V; ++v) acc[v] = fma(b, load(xt + offsets[j] + v * kWidth), acc[v]);
        }
        for (int v = 0; v < V; ++v) acc[v] = add(acc[v], odd[v]);
        keep_panel_row<V>(row_sums, acc);
      }
    }
  }
  for (int64_t t = 0; t < xp.tiles; ++t) {
    const int64_t m0 = t * width;
    store_panel(o, s.sums.data() + t * rows * width, width, w.N, m0, std::min<int64_t>(width, xp.M - m0), r0, r1);
  }
}

// Panels of V * kWidth rows of x: V vector accumulators per row of W.
template <FloatType VT, int V>
void matmul_rows_panel(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0,
    int64_t r1) {
  constexpr int width = V * kWidth;
  if (w.kind != SparseKind::bsr && (w.kind != SparseKind::nm || kBlockK % w.m == 0))
    return blocked_prefill<VT, V>(w, xp, o, r0, r1);
  thread_local std::vector<float> sums;
  sums.resize((r1 - r0) * width);
  for (int64_t t = 0; t < xp.tiles; ++t) {
    const float* xt = xp.xt + t * w.K * width;
    if (w.kind == SparseKind::bsr) {
      for (int64_t r = r0; r < r1;) {
        const int64_t block_row_end = std::min<int64_t>(r1, (r / w.block_n + 1) * w.block_n);
        if (r + kBsrRows <= block_row_end) {
          bsr_panel_rows<VT, kBsrRows, V>(w, xt, r, sums.data() + (r - r0) * width);
          r += kBsrRows;
        } else {
          bsr_panel_rows<VT, 1, V>(w, xt, r, sums.data() + (r - r0) * width);
          r += 1;
        }
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) {
        VecF acc[V];
        for (int v = 0; v < V; ++v) acc[v] = zero();
        for_each_stored<VT>(w, r, [&](int64_t col, int64_t, float value) {
          const VecF b = broadcast(value);
          const float* p = xt + col * width;
          for (int v = 0; v < V; ++v) acc[v] = fma(b, load(p + v * kWidth), acc[v]);
        });
        keep_panel_row<V>(sums.data() + (r - r0) * width, acc);
      }
    }
    const int64_t m0 = t * width;
    store_panel(o, sums.data(), width, w.N, m0, std::min<int64_t>(width, xp.M - m0), r0, r1);
  }
}

// --- Prefill on register tiles (BSR) ------------------------------------------
//
// x is packed in panels of kMR rows (XPanels of width kMR: the A layout of
// common/cpu/gemm_tile.h, one panel over all of K), and each task owns whole
// block rows of W. For each block row and each group of nr of its rows (nr
// output columns), the stored blocks are expanded once into B, float and
// k-major (B[(b * bk + kk) * nr + j] = W[row0 + j, col_b * bk + kk]); then
// every panel of x runs the kMR x nr micro-kernel over the stored blocks in
// turn -- block b reads the bk columns col_b * bk .. of the panel, which are
// contiguous -- with the tile in registers across blocks and stored once.
// Zero blocks are skipped whole; B (nb x 4 KiB for 32 x 32 float blocks)
// stays in L2 while all of M streams past it.

// Vectors per tile row for BSR blocks of block_n rows (the micro-kernel's
// nr must divide block_n), or 0: no tile path (e.g. blocks of 8 on AVX-512).
MLX_EXT_INLINE int bsr_tile_vectors(const SparseW& w) {
  if (w.block_k % kWidth != 0) return 0;
  if (w.block_n % kNR == 0) return kNV;
  if (w.block_n % kWidth == 0) return 1;
  return 0;
}

// Float 2:4 on AVX-512 takes the blocked prefill (below) with panels of 8
// vectors (128 rows of x) once M fills one: each stored value then does 8
// FMAs for its two scalar loads (value, offset), 1.25 loads per FMA against
// 1.5 with 4 vectors; the 32 zmm registers hold the 16 accumulators.
constexpr int kWideVectors = 8;
MLX_EXT_INLINE bool nm24_wide(const SparseW& w, int64_t M) {
#if defined(MLX_EXT_ISA_avx512)
  return w.kind == SparseKind::nm && w.n == 2 && w.m == 4 && w.bits == 0 && M >= kWideVectors * kWidth;
#else
  (void)w, (void)M;
  return false;
#endif
}

// BSR asks for few, large tasks: each panel of x (K x kMR floats, in L2) is
// read once per chunk of block rows, so chunks as large as B's budget
// (kBsrChunkFloats) read x from L3 fewest times; 4 tasks a thread still
// balance the load.
TilePlan tile_plan(const SparseW& w, int64_t M) {
  if (w.kind == SparseKind::bsr && bsr_tile_vectors(w)) return {kMR, w.block_n, 4};
  if (nm24_wide(w, M)) return {kWideVectors * kWidth, 1, 0};
  return {0, 1, 0};
}

// out[m0 + i, col0 .. col0 + n] = tile[i, 0 .. n] (+ bias) for i < rows; n a
// multiple of kWidth.
template <FloatType OT>
void store_tile(const SparseOut& o, const float* tile, int ld, int64_t N, int64_t m0, int64_t rows,
    int64_t col0, int n) {
  for (int j = 0; j < n; j += kWidth) {
    const VecF bias = o.bias ? load_floats<OT>(o.bias, col0 + j) : zero();
    for (int64_t i = 0; i < rows; ++i) store_floats<OT>(o.out, (m0 + i) * N + col0 + j, add(load(tile + i * ld + j), bias));
  }
}

void store_tile_any(const SparseOut& o, const float* tile, int ld, int64_t N, int64_t m0, int64_t rows,
    int64_t col0, int n) {
  switch (o.type) {
    case FloatType::f16: return store_tile<FloatType::f16>(o, tile, ld, N, m0, rows, col0, n);
    case FloatType::bf16: return store_tile<FloatType::bf16>(o, tile, ld, N, m0, rows, col0, n);
    default: return store_tile<FloatType::f32>(o, tile, ld, N, m0, rows, col0, n);
  }
}

// B of the block rows of one chunk: panel q (block row br, rows c0 .. c0 + nr
// of it) starts at offset[q]; its blocks are block row br's stored blocks.
constexpr int64_t kBsrChunkFloats = (768 << 10) / 4; // with x's panel, within a 2 MiB L2

template <FloatType VT, int NV>
void bsr_tiled(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0, int64_t r1) {
  constexpr int nr = AccTile<NV>::nr;
  const int bn = w.block_n, bk = w.block_k;
  const auto* block_cols = static_cast<const int32_t*>(w.pattern);
  thread_local std::vector<float> B;
  std::vector<int64_t> offset;
  alignas(64) float tile[kMR * nr];
  alignas(64) float lanes[kWidth];
  for (int64_t br0 = r0 / bn; br0 < r1 / bn;) {
    // The chunk: block rows br0 .. br1, as many as fit kBsrChunkFloats (at least one).
    int64_t br1 = br0, size = 0;
    offset.clear();
    while (br1 < r1 / bn) {
      const int64_t panel = int64_t(w.row_ptr[br1 + 1] - w.row_ptr[br1]) * bk * nr;
      if (br1 > br0 && size + panel * (bn / nr) > kBsrChunkFloats) break;
      for (int c0 = 0; c0 < bn; c0 += nr) offset.push_back(size), size += panel;
      ++br1;
    }
    if (int64_t(B.size()) < size) B.resize(size);
    // Row j of each block converted kWidth values at a time, then scattered
    // into column j of its panel (bk is a multiple of kWidth).
    for (int64_t br = br0; br < br1; ++br)
      for (int c0 = 0; c0 < bn; c0 += nr) {
        const int64_t b0 = w.row_ptr[br], nb = w.row_ptr[br + 1] - b0;
        float* panel = B.data() + offset[(br - br0) * (bn / nr) + c0 / nr];
        for (int64_t b = 0; b < nb; ++b)
          for (int j = 0; j < nr; ++j) {
            const int64_t src = ((b0 + b) * bn + c0 + j) * bk;
            float* dst = panel + b * bk * nr + j;
            for (int kk = 0; kk < bk; kk += kWidth) {
              store(lanes, load_floats<VT>(w.values, src + kk));
              for (int l = 0; l < kWidth; ++l) dst[(kk + l) * nr] = lanes[l];
            }
          }
      }
    // Each panel of x (in L2) meets every panel of the chunk's B (in L2).
    for (int64_t t = 0; t < xp.tiles; ++t) {
      const float* A = xp.xt + t * w.K * kMR;
      const int64_t m0 = t * kMR, rows = std::min<int64_t>(kMR, xp.M - m0);
      for (int64_t br = br0; br < br1; ++br)
        for (int c0 = 0; c0 < bn; c0 += nr) {
          const int64_t b0 = w.row_ptr[br], nb = w.row_ptr[br + 1] - b0;
          const float* panel = B.data() + offset[(br - br0) * (bn / nr) + c0 / nr];
          AccTile<NV> acc;
          acc.zero();
          for (int64_t b = 0; b < nb; ++b)
            acc.update(A + int64_t(block_cols[b0 + b]) * bk * kMR, panel + b * bk * nr, bk);
          acc.store_to(tile, nr);
          store_tile_any(o, tile, nr, w.N, m0, rows, br * bn + c0, nr);
        }
    }
    br0 = br1;
  }
}

template <FloatType VT, int V>
void blocked_prefill(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0, int64_t r1);

template <FloatType VT>
void matmul_rows_tiled(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0, int64_t r1) {
  if (w.kind == SparseKind::nm) return blocked_prefill<VT, kWideVectors>(w, xp, o, r0, r1);
  if (bsr_tile_vectors(w) == kNV) return bsr_tiled<VT, kNV>(w, xp, o, r0, r1);
  bsr_tiled<VT, 1>(w, xp, o, r0, r1);
}

template <FloatType VT>
void matmul_rows_typed(const SparseW& w, const XPanels& xp, const SparseOut& o, int64_t r0,
    int64_t r1) {
  if (xp.width == 1) return matmul_rows_gather<VT>(w, xp, o, r0, r1);
  if (xp.width == tile_plan(w, xp.M).width) return matmul_rows_tiled<VT>(w, xp, o, r0, r1);
  if (xp.width == kWidth) return matmul_rows_panel<VT, 1>(w, xp, o, r0, r1);
  matmul_rows_panel<VT, 4>(w, xp, o, r0, r1);
}

// One dot product over the M rows per stored value: gt and xt hold each row of
// g (and column of x) contiguously.
template <FloatType VT>
void sampled_rows_typed(const SparseW& w, const float* gt, const float* xt, int64_t M,
    void* dvalues, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for_each_stored<VT>(w, r, [&](int64_t col, int64_t j, float) {
      store_float<VT>(dvalues, j, contiguous_dot<FloatType::f32>(gt, r * M, xt + col * M, M));
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
    tile_plan,
    matmul_rows,
    sampled_rows,
    transpose,
};

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
