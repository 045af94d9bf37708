// Quantized matmul CPU kernels for MLX's fp modes (mxfp4, nvfp4, mxfp8;
// common/fp_formats.h), compiled once per ISA (simd.h). The same table as the
// affine kernels (cpu_kernels.h), driven by the same driver; a.mode picks the
// format at the entry points, once per call.
//
// Rows are read in blocks of 32 codes (16 bytes of E2M1, 32 of E4M3), as the
// affine kernels do; nvfp4's groups of 16 make a block hold two scales, and
// a row (or a K block of the GEMM) may end on half a block, which is decoded
// from a zero-padded copy so that nothing past the row is read.
#include <vector>

#include "common/cpu/float_io.h"
#include "common/cpu/simd.h"
#include "common/fp_formats.h"
#include "common/math.h"
#include "quantized_matmul/cpu_kernels.h"
#include "quantized_matmul/cpu_tiles.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

// E4M3 code -> float, all 256 codes (NaN included), for the scalar decoder
// and nvfp4's scales.
struct E4M3Table {
  alignas(64) float v[256];
  E4M3Table() {
    for (int c = 0; c < 256; ++c) v[c] = e4m3_to_float(uint8_t(c));
  }
};
const E4M3Table kE4M3;

template <QuantMode M>
struct Fmt {
  static constexpr int bits = mode_spec(M).bits;
  static constexpr int group = mode_spec(M).group_size;
  static constexpr int block_bytes = kBlock * bits / 8;
  // The E2M1 decoders return twice the value (an integer, see kE2M1Twice):
  // the half is folded into the group scale.
  static constexpr float value_scale = bits == 4 ? 0.5f : 1.0f;
  static float scale(uint8_t code) {
    return value_scale * (M == QuantMode::nvfp4 ? kE4M3.v[code] : e8m0_to_float(code));
  }
};

// --- Decoding 32 codes into kVecsPerBlock vectors ---------------------------

template <QuantMode M>
MLX_EXT_INLINE void decode_block(const uint8_t* src, VecF* q) {
#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
  if constexpr (Fmt<M>::bits == 4) {
    // Byte i holds codes 2i (low nibble) and 2i+1: interleave the nibbles,
    // then one byte shuffle maps every code to 2 * its value (int8).
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i even = _mm_and_si128(b, mask);
    const __m128i odd = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2M1Twice));
    const __m128i lo = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(even, odd));
    const __m128i hi = _mm_shuffle_epi8(table, _mm_unpackhi_epi8(even, odd));
#if defined(MLX_EXT_ISA_avx512)
    q[0] = VecF{_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo))};
    q[1] = VecF{_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))};
#else
    q[0] = VecF{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))};
    q[1] = VecF{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)))};
    q[2] = VecF{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))};
    q[3] = VecF{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)))};
#endif
  } else {
    // E4M3 as MLX converts it: the 7 magnitude bits shifted into a float16
    // (exponent bias 15 instead of 7: times 256 afterwards, exact), the sign
    // moved to bit 15, and code 0x7f's exponent made all ones (NaN). The
    // hardware float16 conversion takes the subnormals too.
    // (Loads of exactly 16 bytes: nothing past the block is read.)
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepu8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * h)));
      const __m256i em = _mm256_and_si256(v, _mm256_set1_epi16(0x7f));
      const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8);
      const __m256i nan = _mm256_slli_epi16(
          _mm256_srli_epi16(_mm256_add_epi16(em, _mm256_set1_epi16(1)), 7), 14);
      const __m256i half = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi16(em, 7), sign), nan);
#if defined(MLX_EXT_ISA_avx512)
      q[h] = VecF{_mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.0f))};
#else
      const __m256 k256 = _mm256_set1_ps(256.0f);
      q[2 * h] = VecF{_mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(half)), k256)};
      q[2 * h + 1] = VecF{_mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)), k256)};
#endif
    }
  }
#else
  alignas(64) float f[kBlock];
  if constexpr (Fmt<M>::bits == 4) {
    for (int i = 0; i < kBlock / 2; ++i) {
      f[2 * i] = float(kE2M1Twice[src[i] & 15]);
      f[2 * i + 1] = float(kE2M1Twice[src[i] >> 4]);
    }
  } else {
    for (int i = 0; i < kBlock; ++i) f[i] = kE4M3.v[src[i]];
  }
  for (int v = 0; v < kVecsPerBlock; ++v) q[v] = load(f + v * kWidth);
#endif
}

// The first `n` (16 or 32) codes at src; past n the vectors hold zeros.
template <QuantMode M>
MLX_EXT_INLINE void decode_codes(const uint8_t* src, int n, VecF* q) {
  if (n == kBlock) return decode_block<M>(src, q);
  uint8_t buf[Fmt<M>::block_bytes] = {};
  std::memcpy(buf, src, n * Fmt<M>::bits / 8);
  decode_block<M>(buf, q);
}

// The dequantized values: the codes of each group times its scale;
// `scales` points at the scale code of the block's first group.
template <QuantMode M>
MLX_EXT_INLINE void dequantize_codes(const uint8_t* src, int n, const uint8_t* scales, VecF* w) {
  decode_codes<M>(src, n, w);
  constexpr int group_vecs = Fmt<M>::group / kWidth;
  for (int g = 0; g * Fmt<M>::group < n; ++g) {
    const VecF s = broadcast(Fmt<M>::scale(scales[g]));
    for (int v = g * group_vecs; v < (g + 1) * group_vecs; ++v) w[v] = fma(w[v], s, zero());
  }
}

// --- qmv: small M, transpose=true -------------------------------------------
//
// For each weight row n and each block of R rows of x: per group, the dot of
// the decoded codes with x, then one FMA by the group's scale. The codes are
// decoded once per row block and reused by all R rows of x.

constexpr int kPrefetchBytes = 2048;

template <FloatType T, QuantMode M, int R>
void qmv_row(const QmmArgs& a, int64_t m0, int64_t n) {
  using F = Fmt<M>;
  constexpr int group_vecs = F::group / kWidth;
  const uint8_t* w = a.w + n * (a.K * F::bits / 8);
  const uint8_t* scales = static_cast<const uint8_t*>(a.scales) + n * (a.K / F::group);
  const float* x = a.x + m0 * a.K;
  // With few rows of x, each group's sum goes to one of A accumulators in
  // turn, so that consecutive groups' FMAs do not wait on each other.
  constexpr int A = R >= 4 ? 1 : 4 / R;
  VecF acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < A; ++i) acc[r][i] = zero();
  int turn = 0;
  for (int64_t k = 0; k < a.K; k += kBlock) {
    const int len = a.K - k < kBlock ? int(a.K - k) : kBlock;
    const uint8_t* src = w + k * F::bits / 8;
    __builtin_prefetch(src + kPrefetchBytes);
    VecF q[kVecsPerBlock];
    decode_codes<M>(src, len, q);
    for (int g = 0; g * F::group < len; ++g) {
      const VecF s = broadcast(F::scale(scales[k / F::group + g]));
      for (int r = 0; r < R; ++r) {
        VecF part = zero();
        for (int v = g * group_vecs; v < (g + 1) * group_vecs; ++v)
          part = fma(q[v], load(x + r * a.K + k + v * kWidth), part);
        acc[r][turn] = fma(part, s, acc[r][turn]);
      }
      turn = turn + 1 == A ? 0 : turn + 1;
    }
  }
  const float out_bias = a.bias ? load_float<T>(a.bias, n) : 0.0f;
  for (int r = 0; r < R; ++r) {
    VecF sum = acc[r][0];
    for (int i = 1; i < A; ++i) sum = add(sum, acc[r][i]);
    store_float<T>(a.out, (m0 + r) * a.N + n, reduce_add(sum) + out_bias);
  }
}

// --- qmv_fast: mxfp4 and nvfp4 on AVX2 / AVX-512 -----------------------------
//
// A vector of kWidth 32-bit lanes holds 8 kWidth codes of a row, lane l codes
// 8l .. 8l + 7. Masking the low and the high nibbles of every byte and one
// byte shuffle each give, per lane, 4 bytes of 2 * value (int8, kE2M1Twice):
// byte j of the "even" vector is code 8l + 2j, of the "odd" one 8l + 2j + 1.
// Byte j is moved to the top of its lane and shifted down arithmetically
// (sign-extended), converted and multiplied by x permuted to match, once per
// call (qmv_prepare): 8 vectors of x per vector of codes. 4 lanes (mxfp4's
// 32 codes) or 2 (nvfp4's 16) share a group scale: spread over the lanes once
// per chunk.

#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
constexpr bool kFp4Fast = true;
#else
constexpr bool kFp4Fast = false;
#endif
constexpr int kFp4Chunk = 8 * kWidth; // codes per vector of packed bytes

// x_prepared[m, c + (4 t + j) kWidth + l] = x[m, c + 8 l + 2 j + t] for each
// whole chunk c; the rest of the row is read from x itself.
bool qmv_prepare_fp4(const QmmArgs& a, float* xp) {
  if (!kFp4Fast || QuantMode(a.mode) == QuantMode::mxfp8) return false;
  const int64_t kf = a.K / kFp4Chunk * kFp4Chunk;
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t c = 0; c < kf; c += kFp4Chunk)
      for (int t = 0; t < 2; ++t)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < kWidth; ++l)
            xp[m * a.K + c + (4 * t + j) * kWidth + l] = a.x[m * a.K + c + 8 * l + 2 * j + t];
  return true;
}

#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
// The even and odd codes of kWidth * 4 bytes as 2 * value, int8 in 32-bit lanes.
MLX_EXT_INLINE void fp4_chunk(const uint8_t* src, VecU* u) {
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kE2M1Twice));
#if defined(MLX_EXT_ISA_avx512)
  const __m512i b = _mm512_loadu_si512(src);
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i t = _mm512_broadcast_i32x4(table);
  u[0] = VecU{_mm512_shuffle_epi8(t, _mm512_and_si512(b, mask))};
  u[1] = VecU{_mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(b, 4), mask))};
#else
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i t = _mm256_broadcastsi128_si256(table);
  u[0] = VecU{_mm256_shuffle_epi8(t, _mm256_and_si256(b, mask))};
  u[1] = VecU{_mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(b, 4), mask))};
#endif
}

// Byte j of every lane, sign-extended, as float.
template <int j>
MLX_EXT_INLINE VecF byte_to_float(VecU u) {
#if defined(MLX_EXT_ISA_avx512)
  return {_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(u.v, 24 - 8 * j), 24))};
#else
  return {_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(u.v, 24 - 8 * j), 24))};
#endif
}

template <FloatType T, QuantMode M, int R>
void qmv_fp4_fast_row(const QmmArgs& a, int64_t m0, int64_t n, float* row_scales) {
  using F = Fmt<M>;
  const int64_t groups = a.K / F::group;
  const int64_t kf = a.K / kFp4Chunk * kFp4Chunk;
  const uint8_t* w = a.w + n * (a.K / 2);
  const uint8_t* sc = static_cast<const uint8_t*>(a.scales) + n * groups;
  for (int64_t g = 0; g < groups; ++g) row_scales[g] = F::scale(sc[g]);
  VecF acc[R];
  for (int r = 0; r < R; ++r) acc[r] = zero();
  const SpreadIndex lane_group = spread_index(F::group / 8);
  for (int64_t c = 0; c < kf; c += kFp4Chunk) {
    __builtin_prefetch(w + c / 2 + kPrefetchBytes);
    VecU u[2];
    fp4_chunk(w + c / 2, u);
    // With few rows of x, independent partial sums keep the FMA chains short.
    constexpr int P = R >= 4 ? 1 : 4 / R;
    VecF part[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) part[r][p] = zero();
    auto term = [&](VecF q, int at) {
      for (int r = 0; r < R; ++r)
        part[r][at % P] = fma(q, load(a.x_prepared + (m0 + r) * a.K + c + at * kWidth), part[r][at % P]);
    };
    for (int t = 0; t < 2; ++t) {
      term(byte_to_float<0>(u[t]), 4 * t + 0);
      term(byte_to_float<1>(u[t]), 4 * t + 1);
      term(byte_to_float<2>(u[t]), 4 * t + 2);
      term(byte_to_float<3>(u[t]), 4 * t + 3);
    }
    const VecF scale = spread(row_scales + c / F::group, lane_group);
    for (int r = 0; r < R; ++r) {
      VecF sum = part[r][0];
      for (int p = 1; p < P; ++p) sum = add(sum, part[r][p]);
      acc[r] = fma(sum, scale, acc[r]);
    }
  }
  constexpr int group_vecs = F::group / kWidth;
  for (int64_t k = kf; k < a.K; k += kBlock) { // the rest: whole groups, from x
    const int len = a.K - k < kBlock ? int(a.K - k) : kBlock;
    VecF q[kVecsPerBlock];
    decode_codes<M>(w + k / 2, len, q);
    for (int g = 0; g * F::group < len; ++g) {
      const VecF scale = broadcast(row_scales[k / F::group + g]);
      for (int r = 0; r < R; ++r) {
        VecF part = zero();
        for (int v = g * group_vecs; v < (g + 1) * group_vecs; ++v)
          part = fma(q[v], load(a.x + (m0 + r) * a.K + k + v * kWidth), part);
        acc[r] = fma(part, scale, acc[r]);
      }
    }
  }
  const float out_bias = a.bias ? load_float<T>(a.bias, n) : 0.0f;
  for (int r = 0; r < R; ++r)
    store_float<T>(a.out, (m0 + r) * a.N + n, reduce_add(acc[r]) + out_bias);
}
#endif

template <FloatType T, QuantMode M>
void qmv(const QmmArgs& a, int64_t n0, int64_t n1) {
#if defined(MLX_EXT_ISA_avx512) || defined(MLX_EXT_ISA_avx2)
  if constexpr (M != QuantMode::mxfp8) {
    if (a.x_prepared) {
      // + one vector of slack: spread() reads a whole vector of scales.
      std::vector<float> row_scales(a.K / Fmt<M>::group + kWidth);
      for (int64_t n = n0; n < n1; ++n)
        for_row_blocks(a.M, [&](auto rows, int64_t m) {
          qmv_fp4_fast_row<T, M, rows()>(a, m, n, row_scales.data());
        });
      return;
    }
  }
#endif
  for (int64_t n = n0; n < n1; ++n)
    for_row_blocks(a.M, [&](auto rows, int64_t m) { qmv_row<T, M, rows()>(a, m, n); });
}

// --- qvm: small M, transpose=false --------------------------------------------
//
// W is (K, N) with groups along N. One call owns columns [n0, n1) (at most
// kQvmCols) and walks all K rows, accumulating x[m, k] * W[k, n0:n1] in L1.

constexpr int64_t kQvmCols = 256;

template <FloatType T, QuantMode M>
void qvm(const QmmArgs& a, int64_t n0, int64_t n1) {
  using F = Fmt<M>;
  const int64_t cols = n1 - n0;
  const int64_t groups = a.N / F::group;
  const int64_t row_bytes = a.N * F::bits / 8;
  alignas(64) float acc[kQmvRows][kQvmCols];
  for (int64_t m0 = 0; m0 < a.M; m0 += kQmvRows) {
    const int rows = int(a.M - m0 < kQmvRows ? a.M - m0 : kQmvRows);
    for (int r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) acc[r][c] = 0.0f;
    for (int64_t k = 0; k < a.K; ++k) {
      const uint8_t* w = a.w + k * row_bytes;
      const uint8_t* scales = static_cast<const uint8_t*>(a.scales) + k * groups;
      VecF xk[kQmvRows];
      for (int r = 0; r < rows; ++r) xk[r] = broadcast(a.x[(m0 + r) * a.K + k]);
      for (int64_t c = 0; c < cols; c += kBlock) {
        const int len = cols - c < kBlock ? int(cols - c) : kBlock;
        VecF wv[kVecsPerBlock];
        dequantize_codes<M>(w + (n0 + c) * F::bits / 8, len, scales + (n0 + c) / F::group, wv);
        for (int r = 0; r < rows; ++r)
          for (int v = 0; v * kWidth < len; ++v) {
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

// --- qmm: large M, the blocked GEMM of cpu_tiles.h ----------------------------
//
// As the affine qmm: per task a column block of kNC outputs; per K block of
// kKC, the block of W^T is dequantized into panels of kNR columns
// (Bp[panel][k][j]) and every mr-row panel of packed x meets every B panel.

// transpose=true: W rows n0 .. n0+cols are B's columns. Each row's block of
// 32 is dequantized into a row-major tile, then written transposed.
template <QuantMode M>
void pack_b_transposed(const QmmArgs& a, int64_t n0, int64_t cols, int64_t k0, int kc, float* Bp) {
  using F = Fmt<M>;
  const int64_t groups = a.K / F::group;
  const int64_t row_bytes = a.K * F::bits / 8;
  const uint8_t* scales = static_cast<const uint8_t*>(a.scales);
  alignas(64) float tile[kNR][kBlock];
  for (int64_t p = 0; p < ceil_div(cols, kNR); ++p) {
    float* panel = Bp + p * kc * kNR;
    const int64_t jn = cols - p * kNR < kNR ? cols - p * kNR : kNR;
    for (int kb = 0; kb < kc; kb += kBlock) {
      const int64_t k = k0 + kb;
      const int len = kc - kb < kBlock ? kc - kb : kBlock;
      for (int64_t j = 0; j < kNR; ++j) {
        if (j < jn) {
          const int64_t n = n0 + p * kNR + j;
          VecF wv[kVecsPerBlock];
          dequantize_codes<M>(a.w + n * row_bytes + k * F::bits / 8, len,
              scales + n * groups + k / F::group, wv);
          for (int v = 0; v < kVecsPerBlock; ++v) store(&tile[j][v * kWidth], wv[v]);
        } else {
          for (int t = 0; t < kBlock; ++t) tile[j][t] = 0.0f; // padding columns
        }
      }
      for (int t = 0; t < len; ++t)
        for (int j = 0; j < kNR; ++j) panel[(kb + t) * kNR + j] = tile[j][t];
    }
  }
}

// transpose=false: row k of W is B[k, :]; each dequantized vector lands in
// its panel. cols may end on half a block (nvfp4); panels are zero-padded.
template <QuantMode M>
void pack_b_rows(const QmmArgs& a, int64_t n0, int64_t cols, int64_t k0, int kc, float* Bp) {
  using F = Fmt<M>;
  const int64_t groups = a.N / F::group;
  const int64_t row_bytes = a.N * F::bits / 8;
  const uint8_t* scales = static_cast<const uint8_t*>(a.scales);
  const int64_t padded = round_up(cols, int64_t(kNR));
  for (int k = 0; k < kc; ++k) {
    const uint8_t* w = a.w + (k0 + k) * row_bytes;
    for (int64_t c = 0; c < padded; c += kBlock) {
      const int len = cols - c < kBlock ? int(cols > c ? cols - c : 0) : kBlock;
      VecF wv[kVecsPerBlock];
      if (len > 0) {
        dequantize_codes<M>(w + (n0 + c) * F::bits / 8, len,
            scales + (k0 + k) * groups + (n0 + c) / F::group, wv);
      } else {
        for (int v = 0; v < kVecsPerBlock; ++v) wv[v] = zero();
      }
      for (int v = 0; v < kVecsPerBlock && c + v * kWidth < padded; ++v) {
        const int64_t col = c + v * kWidth;
        store(Bp + (col / kNR) * kc * kNR + k * kNR + col % kNR, wv[v]);
      }
    }
  }
}

template <FloatType T, QuantMode M, bool transpose>
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
      pack_b_transposed<M>(a, n0, cols, k0, kc, Bp);
    } else {
      pack_b_rows<M>(a, n0, cols, k0, kc, Bp);
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

// --- dispatch over (dtype, mode) once per call ----------------------------------

template <template <FloatType, QuantMode> class Fn, typename... Args>
void dispatch(const QmmArgs& a, Args... args) {
#define MLX_EXT_CASE_MODE(T)                                                       \
  switch (QuantMode(a.mode)) {                                                     \
    case QuantMode::mxfp4: return Fn<T, QuantMode::mxfp4>::run(a, args...);        \
    case QuantMode::nvfp4: return Fn<T, QuantMode::nvfp4>::run(a, args...);        \
    case QuantMode::mxfp8: return Fn<T, QuantMode::mxfp8>::run(a, args...);        \
    default: return;                                                               \
  }
  switch (a.type) {
    case FloatType::f32: MLX_EXT_CASE_MODE(FloatType::f32) break;
    case FloatType::f16: MLX_EXT_CASE_MODE(FloatType::f16) break;
    case FloatType::bf16: MLX_EXT_CASE_MODE(FloatType::bf16) break;
  }
#undef MLX_EXT_CASE_MODE
}

template <FloatType T, QuantMode M>
struct QmvFn {
  static void run(const QmmArgs& a, int64_t n0, int64_t n1) { qmv<T, M>(a, n0, n1); }
};
template <FloatType T, QuantMode M>
struct QvmFn {
  static void run(const QmmArgs& a, int64_t n0, int64_t n1) { qvm<T, M>(a, n0, n1); }
};
template <FloatType T, QuantMode M>
struct QmmFn {
  static void run(const QmmArgs& a, const PackedA& pa, int64_t n0, float* scratch, bool t) {
    if (t) {
      qmm<T, M, true>(a, pa, n0, scratch);
    } else {
      qmm<T, M, false>(a, pa, n0, scratch);
    }
  }
};

bool qmv_prepare_entry(const QmmArgs& a, float* x_prepared) { return qmv_prepare_fp4(a, x_prepared); }
void qmv_entry(const QmmArgs& a, int64_t n0, int64_t n1) { dispatch<QmvFn>(a, n0, n1); }
void qvm_entry(const QmmArgs& a, int64_t n0, int64_t n1) { dispatch<QvmFn>(a, n0, n1); }
void qmm_t_entry(const QmmArgs& a, const PackedA& pa, int64_t n0, float* s) {
  dispatch<QmmFn>(a, pa, n0, s, true);
}
void qmm_n_entry(const QmmArgs& a, const PackedA& pa, int64_t n0, float* s) {
  dispatch<QmmFn>(a, pa, n0, s, false);
}

} // namespace

extern const KernelTable quantized_matmul_fp_kernels = {
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
