// Quantized matmul CPU kernels, compiled once per ISA (see simd.h). Reads MLX's
// affine format: each row of W is a little-endian bit stream of `bits`-bit
// values; value = scale * q + bias per group of `group_size` values.
//
// Everything works on blocks of 32 quantized values: 32 * bits / 8 = 4 * bits
// bytes, always whole bytes, and every group size (32, 64, 128) is a whole
// number of blocks.
#include <type_traits>

#include "common/cpu/float_io.h"
#include "common/cpu/simd.h"
#include "common/math.h"
#include "quantized_matmul/cpu_kernels.h"
#include "quantized_matmul/cpu_tiles.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

// sum_i a[i] * b[i]
MLX_EXT_INLINE float dot(const float* a, const float* b, int64_t n) {
  VecF acc = zero();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) acc = fma(load(a + i), load(b + i), acc);
  float s = reduce_add(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// --- Unpacking one block of 32 values into floats (q as 0 .. 2^bits - 1) ----

// Any bit width: copy the block's bytes into a zero-padded buffer, then read
// each value from a 16-bit window. With `bits` a constant every shift is too.
template <int bits>
MLX_EXT_INLINE void unpack_block_u8(const uint8_t* src, uint8_t* q) {
  if constexpr (bits == 8) {
    std::memcpy(q, src, kBlock);
  } else {
    uint8_t buf[4 * bits + 1];
    std::memcpy(buf, src, 4 * bits);
    buf[4 * bits] = 0;
#pragma GCC unroll 32
    for (int i = 0; i < kBlock; ++i) {
      const int bit = i * bits;
      const uint32_t window = buf[bit >> 3] | (uint32_t(buf[(bit >> 3) + 1]) << 8);
      q[i] = uint8_t((window >> (bit & 7)) & ((1u << bits) - 1));
    }
  }
}

template <int bits>
MLX_EXT_INLINE void unpack_block(const uint8_t* src, VecF* q) {
#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
  __m128i lo, hi; // values 0..15 and 16..31, one per byte
  if constexpr (bits == 8) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
  } else if constexpr (bits == 4) {
    // byte i holds values 2i (low nibble) and 2i+1: interleave the nibbles.
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i even = _mm_and_si128(b, mask);
    const __m128i odd = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    lo = _mm_unpacklo_epi8(even, odd);
    hi = _mm_unpackhi_epi8(even, odd);
  } else if constexpr (bits == 2) {
    // byte i holds values 4i .. 4i+3, two bits each from the low end.
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    const __m128i mask = _mm_set1_epi8(0x03);
    const __m128i v0 = _mm_and_si128(b, mask);
    const __m128i v1 = _mm_and_si128(_mm_srli_epi16(b, 2), mask);
    const __m128i v2 = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    const __m128i v3 = _mm_and_si128(_mm_srli_epi16(b, 6), mask);
    const __m128i v01 = _mm_unpacklo_epi8(v0, v1);
    const __m128i v23 = _mm_unpacklo_epi8(v2, v3);
    lo = _mm_unpacklo_epi16(v01, v23);
    hi = _mm_unpackhi_epi16(v01, v23);
  } else {
    alignas(16) uint8_t buf[kBlock];
    unpack_block_u8<bits>(src, buf);
    lo = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    hi = _mm_load_si128(reinterpret_cast<const __m128i*>(buf + 16));
  }
#if defined(MLX_EXT_ISA_avx512)
  q[0] = u8_to_float(lo);
  q[1] = u8_to_float(hi);
#else
  q[0] = u8_to_float(lo);
  q[1] = u8_to_float(_mm_unpackhi_epi64(lo, lo));
  q[2] = u8_to_float(hi);
  q[3] = u8_to_float(_mm_unpackhi_epi64(hi, hi));
#endif
#else
  uint8_t buf[kBlock];
  unpack_block_u8<bits>(src, buf);
  alignas(64) float f[kBlock];
  for (int i = 0; i < kBlock; ++i) f[i] = float(buf[i]);
  for (int v = 0; v < kVecsPerBlock; ++v) q[v] = load(f + v * kWidth);
#endif
}

// Dequantized block: w = scale * q + bias.
template <int bits>
MLX_EXT_INLINE void dequantize_block(const uint8_t* src, float scale, float bias, VecF* w) {
  unpack_block<bits>(src, w);
  const VecF s = broadcast(scale), b = broadcast(bias);
  for (int v = 0; v < kVecsPerBlock; ++v) w[v] = fma(w[v], s, b);
}

constexpr int64_t block_bytes(int bits) { return 4 * bits; }

// --- qmv: small M, transpose=true (decode) ------------------------------------
//
// One call computes out[m, n] for n in [n0, n1) and every m. For each weight
// row n, rows of x are taken `R` at a time while the packed row (K * bits / 8
// bytes) stays in L1. Per group the dot product is folded as
//   sum_k (s q_k + b) x_k = s * sum_k q_k x_k + b * sum_k x_k,
// with the group sums of x precomputed once per call, so the inner loop is one
// FMA per 32/width values and no dequantization.

template <FloatType T, int bits, int R>
void qmv_row(const QmmArgs& a, int64_t m0, int64_t n) {
  const int64_t groups = a.K / a.group_size;
  const int blocks_per_group = a.group_size / kBlock;
  const uint8_t* w = a.w + n * (a.K * bits / 8);
  const float* x = a.x + m0 * a.K;
  const float* xsum = a.x_group_sums + m0 * groups;
  VecF acc[R];
  float bias_acc[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = zero();
    bias_acc[r] = 0.0f;
  }
  for (int64_t g = 0; g < groups; ++g) {
    // With few rows, one accumulator per vector of the block keeps the FMA
    // chains independent; with many, the rows do and registers are scarce.
    constexpr int P = R >= 4 ? 1 : kVecsPerBlock;
    VecF part[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) part[r][p] = zero();
    for (int blk = 0; blk < blocks_per_group; ++blk) {
      const int64_t k = g * a.group_size + blk * kBlock;
      VecF q[kVecsPerBlock];
      unpack_block<bits>(w + (k / kBlock) * block_bytes(bits), q);
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kVecsPerBlock; ++v)
          part[r][v % P] = fma(q[v], load(x + r * a.K + k + v * kWidth), part[r][v % P]);
    }
    const int64_t sg = n * groups + g;
    const VecF scale = broadcast(load_float<T>(a.scales, sg));
    const float bias = load_float<T>(a.biases, sg);
    for (int r = 0; r < R; ++r) {
      VecF sum = part[r][0];
      for (int p = 1; p < P; ++p) sum = add(sum, part[r][p]);
      acc[r] = fma(sum, scale, acc[r]);
      bias_acc[r] += bias * xsum[r * groups + g];
    }
  }
  const float out_bias = a.bias ? load_float<T>(a.bias, n) : 0.0f;
  for (int r = 0; r < R; ++r)
    store_float<T>(a.out, (m0 + r) * a.N + n, reduce_add(acc[r]) + bias_acc[r] + out_bias);
}

// --- qmv_fast: bits 2, 4, 8 -------------------------------------------------
//
// When bits divides 32 no value straddles a uint32 word. A vector of kWidth
// words then holds a chunk of kWidth * vpw consecutive weights of a row, lane
// l holding weights l * vpw .. l * vpw + vpw - 1. Value j of every lane is
// isolated by one AND, without a shift: the integer is q * 2^(bits * j),
// exact in float32. x was permuted and pre-scaled by 2^(-bits * j) once per
// call (qmv_prepare), so one FMA per j multiplies every lane correctly. The
// top value is shifted down instead, to stay within int32. Per chunk the
// partial sums are scaled by a vector of the lanes' group scales.

constexpr int kPrefetchBytes = 2048;

template <int bits>
struct FastLayout {
  static constexpr bool enabled = bits == 2 || bits == 4 || bits == 8;
  static constexpr int vpw = enabled ? 32 / bits : 1; // values per word
  static constexpr int chunk = kWidth * vpw; // weights per vector of words
  // Weights covered by whole chunks that also end on a group boundary; the
  // rest of the row (a multiple of 32) goes through the block path.
  static int64_t fast_length(int64_t K, int group_size) {
    const int64_t step = chunk > group_size ? chunk : group_size;
    return K / step * step;
  }
};

template <int bits>
bool qmv_prepare(const QmmArgs& a, float* xp) {
  using L = FastLayout<bits>;
  if constexpr (!L::enabled) {
    return false;
  } else {
    const int64_t kf = L::fast_length(a.K, a.group_size);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t c = 0; c < kf; c += L::chunk)
        for (int j = 0; j < L::vpw; ++j) {
          const float scale = j == L::vpw - 1 ? 1.0f : 1.0f / float(1u << (bits * j));
          for (int l = 0; l < kWidth; ++l)
            xp[m * a.K + c + j * kWidth + l] = a.x[m * a.K + c + l * L::vpw + j] * scale;
        }
    return true;
  }
}

// Per-task scratch: one row's scales and biases as float32, plus one vector
// of slack that spread() may read past the last group.
struct RowParams {
  explicit RowParams(int64_t groups) : data(new float[2 * groups + kWidth]()), groups(groups) {}
  ~RowParams() { delete[] data; }
  float* scales() { return data; }
  float* biases() { return data + groups; }
  float* data;
  int64_t groups;
};

template <FloatType T, int bits, int R>
void qmv_fast_row(const QmmArgs& a, int64_t m0, int64_t n, RowParams& row) {
  using L = FastLayout<bits>;
  const int64_t groups = row.groups;
  const int64_t kf = L::fast_length(a.K, a.group_size);
  const int group_shift = __builtin_ctz(unsigned(a.group_size));
  const uint32_t* w = reinterpret_cast<const uint32_t*>(a.w + n * (a.K * bits / 8));
  float* scales = row.scales();
  convert_to_float<T>(a.scales, n * groups, groups, scales);
  convert_to_float<T>(a.biases, n * groups, groups, row.biases());

  VecF acc[R];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = zero();
  constexpr uint32_t kMask = (1u << bits) - 1;
  const SpreadIndex lane_group = spread_index(a.group_size / L::vpw); // lanes sharing a scale
  for (int64_t c = 0; c < kf; c += L::chunk) {
    const VecU words = load_u32(w + c / L::vpw);
    // A single core's hardware prefetch leaves this stream latency-bound.
    __builtin_prefetch(reinterpret_cast<const char*>(w + c / L::vpw) + kPrefetchBytes);
    // With few rows, extra partial sums keep the FMA dependency chains short.
    constexpr int kPartials = R >= 4 ? 1 : 2;
    VecF part[R][kPartials];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < kPartials; ++p) part[r][p] = zero();
#pragma GCC unroll 16
    for (int j = 0; j < L::vpw; ++j) {
      const VecF q = j == L::vpw - 1 ? shifted_to_float(words, 32 - bits)
                                     : masked_to_float(words, kMask << (bits * j));
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        part[r][j % kPartials] =
            fma(q, load(a.x_prepared + (m0 + r) * a.K + c + j * kWidth), part[r][j % kPartials]);
    }
    const float* s = scales + (c >> group_shift);
    const VecF scale = L::chunk > a.group_size ? spread(s, lane_group) : broadcast(*s);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      VecF sum = part[r][0];
      for (int p = 1; p < kPartials; ++p) sum = add(sum, part[r][p]);
      acc[r] = fma(sum, scale, acc[r]);
    }
  }
  // The rest of the row, whole groups, through the block path.
  for (int64_t k = kf; k < a.K; k += kBlock) {
    VecF q[kVecsPerBlock];
    unpack_block<bits>(a.w + n * (a.K * bits / 8) + (k / kBlock) * block_bytes(bits), q);
    const VecF scale = broadcast(scales[k >> group_shift]);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      VecF part = zero();
      for (int v = 0; v < kVecsPerBlock; ++v)
        part = fma(q[v], load(a.x + (m0 + r) * a.K + k + v * kWidth), part);
      acc[r] = fma(part, scale, acc[r]);
    }
  }
  const float out_bias = a.bias ? load_float<T>(a.bias, n) : 0.0f;
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    // sum_g b_g * sum(x over g): the biases' share of the row.
    const float bias_part = dot(row.biases(), a.x_group_sums + (m0 + r) * groups, groups);
    store_float<T>(a.out, (m0 + r) * a.N + n, reduce_add(acc[r]) + bias_part + out_bias);
  }
}

template <FloatType T, int bits>
void qmv(const QmmArgs& a, int64_t n0, int64_t n1) {
  if constexpr (FastLayout<bits>::enabled) {
    if (a.x_prepared) {
      RowParams row(a.K / a.group_size);
      for (int64_t n = n0; n < n1; ++n)
        for_row_blocks(a.M, [&](auto rows, int64_t m) { qmv_fast_row<T, bits, rows()>(a, m, n, row); });
      return;
    }
  }
  for (int64_t n = n0; n < n1; ++n)
    for_row_blocks(a.M, [&](auto rows, int64_t m) { qmv_row<T, bits, rows()>(a, m, n); });
}

// --- qvm: small M, transpose=false ---------------------------------------------
//
// W is (K, N), groups run along N. One call owns output columns [n0, n1)
// (at most kQvmCols, multiples of 32) and walks all K rows, accumulating
// out[m, n0:n1] += x[m, k] * dequant(W[k, n0:n1]) in a float buffer in L1.

constexpr int64_t kQvmCols = 256;

template <FloatType T, int bits>
void qvm(const QmmArgs& a, int64_t n0, int64_t n1) {
  const int64_t cols = n1 - n0;
  const int64_t groups = a.N / a.group_size;
  const int64_t row_bytes = a.N * bits / 8;
  alignas(64) float acc[kQmvRows][kQvmCols];
  for (int64_t m0 = 0; m0 < a.M; m0 += kQmvRows) {
    const int rows = int(a.M - m0 < kQmvRows ? a.M - m0 : kQmvRows);
    for (int r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) acc[r][c] = 0.0f;
    for (int64_t k = 0; k < a.K; ++k) {
      const uint8_t* w = a.w + k * row_bytes;
      VecF xk[kQmvRows];
      for (int r = 0; r < rows; ++r) xk[r] = broadcast(a.x[(m0 + r) * a.K + k]);
      for (int64_t c = 0; c < cols; c += kBlock) {
        const int64_t sg = k * groups + (n0 + c) / a.group_size;
        VecF wv[kVecsPerBlock];
        dequantize_block<bits>(
            w + ((n0 + c) / kBlock) * block_bytes(bits),
            load_float<T>(a.scales, sg), load_float<T>(a.biases, sg), wv);
        for (int r = 0; r < rows; ++r)
          for (int v = 0; v < kVecsPerBlock; ++v) {
            float* dst = &acc[r][c + v * kWidth];
            store(dst, fma(wv[v], xk[r], load(dst)));
          }
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float b = a.bias ? load_float<T>(a.bias, n0 + c) : 0.0f;
        store_float<T>(a.out, (m0 + r) * a.N + n0 + c, acc[r][c] + b);
      }
  }
}

// --- qmm: large M, blocked GEMM --------------------------------------------------
//
// BLIS-style: per task, a column block of nc outputs. For each K block of kc,
// the kc x nc block of W^T is dequantized into float panels of nr columns
// (Bp[panel][k][j]), then every mr-row panel of packed x meets every B panel
// in the mr x nr register-blocked micro-kernel, accumulating into a float C
// block (M_padded x nc) that the epilogue converts (+ bias) into out.

// Bp for transpose=true: W rows n0 .. n0+cols are the columns of B. Each row's
// 32-value block is dequantized into a small row-major tile, then written
// transposed so that every store into Bp is a contiguous run of nr floats.
template <FloatType T, int bits>
void pack_b_transposed(const QmmArgs& a, int64_t n0, int64_t cols, int64_t k0, int kc, float* Bp) {
  const int64_t groups = a.K / a.group_size;
  const int64_t row_bytes = a.K * bits / 8;
  const int64_t panels = ceil_div(cols, kNR);
  alignas(64) float tile[kNR][kBlock];
  for (int64_t p = 0; p < panels; ++p) {
    float* panel = Bp + p * kc * kNR;
    const int64_t jn = cols - p * kNR < kNR ? cols - p * kNR : kNR;
    for (int64_t kb = 0; kb < kc; kb += kBlock) {
      const int64_t k = k0 + kb;
      for (int64_t j = 0; j < kNR; ++j) {
        if (j < jn) {
          const int64_t n = n0 + p * kNR + j;
          const int64_t sg = n * groups + k / a.group_size;
          VecF wv[kVecsPerBlock];
          dequantize_block<bits>(
              a.w + n * row_bytes + (k / kBlock) * block_bytes(bits),
              load_float<T>(a.scales, sg), load_float<T>(a.biases, sg), wv);
          for (int v = 0; v < kVecsPerBlock; ++v) store(&tile[j][v * kWidth], wv[v]);
        } else {
          for (int t = 0; t < kBlock; ++t) tile[j][t] = 0.0f; // padding columns
        }
      }
      for (int t = 0; t < kBlock; ++t)
        for (int j = 0; j < kNR; ++j) panel[(kb + t) * kNR + j] = tile[j][t];
    }
  }
}

// Bp for transpose=false: row k of W holds B[k, :] contiguously, so each
// dequantized vector lands directly in its panel. cols is a multiple of 32.
template <FloatType T, int bits>
void pack_b_rows(const QmmArgs& a, int64_t n0, int64_t cols, int64_t k0, int kc, float* Bp) {
  const int64_t groups = a.N / a.group_size;
  const int64_t row_bytes = a.N * bits / 8;
  for (int k = 0; k < kc; ++k) {
    const uint8_t* w = a.w + (k0 + k) * row_bytes;
    for (int64_t c = 0; c < cols; c += kBlock) {
      const int64_t sg = (k0 + k) * groups + (n0 + c) / a.group_size;
      VecF wv[kVecsPerBlock];
      dequantize_block<bits>(
          w + ((n0 + c) / kBlock) * block_bytes(bits), load_float<T>(a.scales, sg),
          load_float<T>(a.biases, sg), wv);
      for (int v = 0; v < kVecsPerBlock; ++v) {
        const int64_t col = c + v * kWidth;
        store(Bp + (col / kNR) * kc * kNR + k * kNR + col % kNR, wv[v]);
      }
    }
  }
}

template <FloatType T, int bits, bool transpose>
void qmm(const QmmArgs& a, const PackedA& pa, int64_t n0, float* scratch) {
  const int64_t cols = a.N - n0 < kNC ? a.N - n0 : kNC;
  const int64_t n_panels = ceil_div(cols, kNR);
  float* Bp = scratch;
  float* C = scratch + int64_t(kKC) * kNC;
  const int64_t c_size = pa.panels * kMR * kNC;
  for (int64_t i = 0; i < c_size; ++i) C[i] = 0.0f;
  for (int64_t k0 = 0, kb = 0; k0 < a.K; k0 += kKC, ++kb) {
    const int kc = int(a.K - k0 < kKC ? a.K - k0 : kKC);
    if constexpr (transpose) {
      pack_b_transposed<T, bits>(a, n0, cols, k0, kc, Bp);
    } else {
      pack_b_rows<T, bits>(a, n0, cols, k0, kc, Bp);
    }
    for (int64_t p = 0; p < pa.panels; ++p) {
      const float* Ap = pa.a + (kb * pa.panels + p) * kMR * kKC;
      for (int64_t q = 0; q < n_panels; ++q)
        micro_kernel(Ap, Bp + q * kc * kNR, C + p * kMR * kNC + q * kNR, kNC, kc);
    }
  }
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t j = 0; j < cols; ++j) {
      const float b = a.bias ? load_float<T>(a.bias, n0 + j) : 0.0f;
      store_float<T>(a.out, m * a.N + n0 + j, C[m * kNC + j] + b);
    }
}

// --- dispatch over (dtype, bits) once per call ---------------------------------

template <template <FloatType, int> class F, typename... Args>
void dispatch(const QmmArgs& a, Args... args) {
#define MLX_EXT_CASE_BITS(T)                 \
  switch (a.bits) {                          \
    case 2: return F<T, 2>::run(a, args...); \
    case 3: return F<T, 3>::run(a, args...); \
    case 4: return F<T, 4>::run(a, args...); \
    case 5: return F<T, 5>::run(a, args...); \
    case 6: return F<T, 6>::run(a, args...); \
    case 8: return F<T, 8>::run(a, args...); \
  }
  switch (a.type) {
    case FloatType::f32: MLX_EXT_CASE_BITS(FloatType::f32) break;
    case FloatType::f16: MLX_EXT_CASE_BITS(FloatType::f16) break;
    case FloatType::bf16: MLX_EXT_CASE_BITS(FloatType::bf16) break;
  }
#undef MLX_EXT_CASE_BITS
}

template <FloatType T, int bits>
struct QmvFn {
  static void run(const QmmArgs& a, int64_t n0, int64_t n1) { qmv<T, bits>(a, n0, n1); }
};
template <FloatType T, int bits>
struct QvmFn {
  static void run(const QmmArgs& a, int64_t n0, int64_t n1) { qvm<T, bits>(a, n0, n1); }
};
template <FloatType T, int bits>
struct QmmFn {
  static void run(const QmmArgs& a, const PackedA& pa, int64_t n0, float* scratch, bool t) {
    if (t) {
      qmm<T, bits, true>(a, pa, n0, scratch);
    } else {
      qmm<T, bits, false>(a, pa, n0, scratch);
    }
  }
};

void qmv_entry(const QmmArgs& a, int64_t n0, int64_t n1) { dispatch<QmvFn>(a, n0, n1); }
bool qmv_prepare_entry(const QmmArgs& a, float* x_prepared) {
  switch (a.bits) {
    case 2: return qmv_prepare<2>(a, x_prepared);
    case 4: return qmv_prepare<4>(a, x_prepared);
    case 8: return qmv_prepare<8>(a, x_prepared);
    default: return false;
  }
}
void qvm_entry(const QmmArgs& a, int64_t n0, int64_t n1) { dispatch<QvmFn>(a, n0, n1); }
void qmm_t_entry(const QmmArgs& a, const PackedA& pa, int64_t n0, float* s) {
  dispatch<QmmFn>(a, pa, n0, s, true);
}
void qmm_n_entry(const QmmArgs& a, const PackedA& pa, int64_t n0, float* s) {
  dispatch<QmmFn>(a, pa, n0, s, false);
}

} // namespace

extern const KernelTable quantized_matmul_kernels = {
    MLX_EXT_ISA_NAME,
    GemmPlan{kMR, kNR, kKC, kNC},
    qmv_prepare_entry,
    qmv_entry,
    qvm_entry,
    qmm_t_entry,
    qmm_n_entry,
    kQvmCols,
};

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
