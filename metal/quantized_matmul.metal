// mlx_ext.quantized_matmul on Apple GPUs, for MLX's affine quantization and
// its fp modes (mxfp4, nvfp4, mxfp8: metal/fp.h):
//   transpose: out = x @ dequantize(w).T (+ bias), w packed as (N, K)
//   otherwise: out = x @ dequantize(w)   (+ bias), w packed as (K, N)
// dequantize(w)[r, c] = scale[r, c / gs] * q[r, c] + bias[r, c / gs], each row
// of w one little-endian stream of `bits`-bit values (3-, 5- and 6-bit values
// cross word boundaries). x, scales, biases, bias and out have the output
// dtype T; everything accumulates in float.
//
// Kernels (chosen by csrc/quantized_matmul/metal_plan.h):
//   qmv_fast, qmv   M small, transpose (decode); qmv_fast when K % 512 == 0
//                   and N % 8 == 0
//   qvm             M small, not transpose
//   qmm_t, qmm_n    M large: 32x32 tiles, simdgroup 8x8 MMA (every mode)
//   fp_qmv, fp_qvm  the fp modes' GEMVs (M small; transpose / not)
// T, the group size and bits (and the mode) are template parameters, the bias
// epilogue a function constant; buffers are bound as
// quantized_matmul_bindings.h says (fp modes: uint8 scales, no biases).
// Packed values are read and dequantized by the helpers of affine.h and fp.h.
//
// mlx_ext.gather_qmm (csrc/gather_qmm/metal.cpp) runs the same affine kernels
// with the function constant qmm_gather (see "Gather" below): one launch, one
// (row, expert) pair per grid z.
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

#include "affine.h"
#include "common.h"
#include "fp.h"
#include "quantized_matmul_bindings.h"

using namespace metal;

constant bool qmm_has_bias [[function_constant(QMM_FC_HAS_BIAS)]];
constant bool qmm_gather [[function_constant(QMM_FC_GATHER)]];

// ---- Gather ------------------------------------------------------------------
//
// With qmm_gather (mlx_ext.gather_qmm, affine mode), the grid's z dimension
// runs over the P pairs of the broadcast indices, and the threadgroups of
// pair p = tgid.z compute out[p] = x[lhs[p]] @ dequantize(w[rhs[p]]).T (or
// without .T) + bias[rhs[p]], an (M, N) block, exactly as the plain launch
// computes one matmul: same tiling, threadgroup memory and per-thread work
// within a pair (the comment of each kernel). Each threadgroup first moves
// its pointers to its pair's matrices (gather_pair: two index loads and a few
// integer multiplies); every pair's threadgroups stream that pair's expert
// slice, so a decode step (M = 1, top-k pairs per token) reads each routed
// expert's weights once per pair, all pairs in one launch. Cost with many
// pairs of one row each: the weights are read once per pair, P times an
// expert's bytes, where the CPU path (expert-grouped) reads each used expert
// once; so sorted one-row pairs from 32 on (mlx-lm's prefill) take
// metal/gather_qmm.metal's tiles over pairs instead, and only unsorted ones
// pay this. Larger M per pair takes the tiled qmm (32 x 32 tiles per pair).
//
// Indices are known only at run time: a pair with lhs[p] >= X or rhs[p] >= E
// reads nothing (its reduction length becomes 0 and its offsets 0) and
// writes NaN over its whole block, as the CPU path does
// (csrc/gather_qmm/cpu_driver.h); negative indices arrive as large uint32.
// The pairs' values are uniform across a threadgroup, so no control flow
// diverges.

struct GatherPair {
  bool valid; // both indices in range
  int64_t x; // element offsets of the pair's matrices (0 when !valid)
  int64_t w; // uint32 words
  int64_t groups; // scales / biases elements
  int64_t bias;
  int64_t out; // out[p]: always the pair's own block
};

inline GatherPair gather_pair(uint p, const device uint* lhs, const device uint* rhs,
    constant QmmShape& shape) {
  const uint l = lhs[p];
  const uint e = rhs[p];
  GatherPair g = {false, 0, 0, 0, 0, int64_t(p) * shape.M * shape.N};
  if (l < uint(shape.X) && e < uint(shape.E)) {
    g.valid = true;
    g.x = int64_t(l) * shape.x_stride;
    g.w = int64_t(e) * shape.w_stride;
    g.groups = int64_t(e) * shape.group_stride;
    g.bias = int64_t(e) * shape.bias_stride;
  }
  return g;
}

// What an out-of-range pair's outputs hold.
inline float gather_nan() {
  return as_type<float>(0x7fc00000u);
}

// ---- qmv_fast / qmv ----------------------------------------------------------
//
// M small, transpose. Each lane takes 16 consecutive values of K in every
// 512-wide block of K.
//   thread:      for its 16 values per block and the 4 weight rows of its
//                simdgroup: x loaded once (pre-scaled, summed), then per row
//                one AND, one convert and one FMA per value, and per group
//                scale * sum(q x) + bias * sum(x);
//   simdgroup:   out[m, n .. n + 4): the lanes' partial sums (simd_sum);
//   threadgroup: 2 simdgroups, out[m, 8 t .. 8 t + 8); grid (M, ceil(N / 8)),
//                so consecutive threadgroups read the same weight rows;
//                gather: grid (M, ceil(N / 8), P), z the pair. No
//                threadgroup memory.
// qmv_fast (aligned) needs K % 512 == 0 and N % 8 == 0. qmv also runs the
// tail of K past the last whole block (K is a multiple of 32, so no lane's 16
// values are cut) and clamps rows past N to row N - 1 (read, never stored).

template <typename T, int group_size, int bits, bool aligned>
[[kernel]] void qmv(
    const device uint32_t* w [[buffer(QMM_BUFFER_W)]],
    const device T* scales [[buffer(QMM_BUFFER_SCALES)]],
    const device T* biases [[buffer(QMM_BUFFER_BIASES)]],
    const device T* x [[buffer(QMM_BUFFER_X)]],
    device T* out [[buffer(QMM_BUFFER_OUT)]],
    const device T* bias [[buffer(QMM_BUFFER_BIAS), function_constant(qmm_has_bias)]],
    constant QmmShape& shape [[buffer(QMM_BUFFER_SHAPE)]],
    const device uint* lhs [[buffer(QMM_BUFFER_LHS), function_constant(qmm_gather)]],
    const device uint* rhs [[buffer(QMM_BUFFER_RHS), function_constant(qmm_gather)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int rows = 4;
  constexpr int values = 16;
  constexpr int block = 32 * values;
  const int N = shape.N;
  int K = shape.K;
  bool valid = true;
  if (qmm_gather) {
    const GatherPair g = gather_pair(tgid.z, lhs, rhs, shape);
    valid = g.valid;
    K = valid ? K : 0;
    w += g.w;
    scales += g.groups;
    biases += g.groups;
    x += g.x;
    out += g.out;
    if (qmm_has_bias) {
      bias += g.bias;
    }
  }
  const int n0 = (int(tgid.y) * 2 + sg) * rows;
  if (!aligned && n0 >= N) {
    return; // the whole simdgroup; this kernel has no threadgroup barrier
  }
  const int groups = K / group_size;
  const int64_t row_units = int64_t(K) * bits / 16;

  const device ushort* w_row[rows];
  const device T* scale_row[rows];
  const device T* bias_row[rows];
#pragma clang loop unroll(full)
  for (int r = 0; r < rows; ++r) {
    const int n = aligned ? n0 + r : min(n0 + r, N - 1);
    w_row[r] = (const device ushort*)w + n * row_units + lane * bits;
    scale_row[r] = scales + int64_t(n) * groups;
    bias_row[r] = biases + int64_t(n) * groups;
  }
  const int m = tgid.x;
  x += int64_t(m) * K + lane * values;

  float acc[rows] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k = 0; k < K; k += block) {
    if (aligned || k + lane * values < K) {
      float xs[values];
      const float x_sum = mlx_ext::load_prescaled_x<T, bits>(x + k, xs);
      const int g = (k + lane * values) / group_size;
#pragma clang loop unroll(full)
      for (int r = 0; r < rows; ++r) {
        ushort units[bits];
        mlx_ext::load_units<bits, bits % 2 == 0>(w_row[r] + k / 16 * bits, units);
        acc[r] += float(scale_row[r][g]) * mlx_ext::qdot16<bits>(units, xs) +
            float(bias_row[r][g]) * x_sum;
      }
    }
  }

#pragma clang loop unroll(full)
  for (int r = 0; r < rows; ++r) {
    acc[r] = simd_sum(acc[r]);
  }
  if (lane == 0) {
#pragma clang loop unroll(full)
    for (int r = 0; r < rows; ++r) {
      const int n = n0 + r;
      if (aligned || n < N) {
        const float b = qmm_has_bias && valid ? float(bias[n]) : 0.0f;
        out[int64_t(m) * N + n] = T(valid ? acc[r] + b : gather_nan());
      }
    }
  }
}

// ---- qvm ---------------------------------------------------------------------
//
// M small, not transpose. N is a multiple of the group size, so the 32 columns
// of a threadgroup share one group per row of w: row k adds
// (x_k scale_k) q_kj + x_k bias_k to column j.
//   thread:      rows k = 128 i + 32 sg + lane of w: its 32 values in the
//                threadgroup's columns (`bits` words), one AND, one convert
//                and one FMA each, into 32 float partial sums (2^-s applied
//                once at the end), and the sum of x_k bias_k;
//   simdgroup:   a reduce-scatter leaves column `lane`'s total over the
//                simdgroup's rows on lane `lane` (31 shuffles);
//   threadgroup: 4 simdgroups (split K), combined in threadgroup memory
//                (4 x 32 floats, 512 bytes): out[m, 32 t .. 32 t + 32);
//                grid (M, N / 32); gather: (M, N / 32, P), z the pair.

template <typename T, int group_size, int bits>
[[kernel]] void qvm(
    const device uint32_t* w [[buffer(QMM_BUFFER_W)]],
    const device T* scales [[buffer(QMM_BUFFER_SCALES)]],
    const device T* biases [[buffer(QMM_BUFFER_BIASES)]],
    const device T* x [[buffer(QMM_BUFFER_X)]],
    device T* out [[buffer(QMM_BUFFER_OUT)]],
    const device T* bias [[buffer(QMM_BUFFER_BIAS), function_constant(qmm_has_bias)]],
    constant QmmShape& shape [[buffer(QMM_BUFFER_SHAPE)]],
    const device uint* lhs [[buffer(QMM_BUFFER_LHS), function_constant(qmm_gather)]],
    const device uint* rhs [[buffer(QMM_BUFFER_RHS), function_constant(qmm_gather)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int simdgroups = 4;
  constexpr int columns = 32;
  threadgroup float partial[simdgroups * columns];

  const int N = shape.N;
  int K = shape.K;
  bool valid = true;
  if (qmm_gather) {
    const GatherPair g = gather_pair(tgid.z, lhs, rhs, shape);
    valid = g.valid;
    K = valid ? K : 0;
    w += g.w;
    scales += g.groups;
    biases += g.groups;
    x += g.x;
    out += g.out;
    if (qmm_has_bias) {
      bias += g.bias;
    }
  }
  const int m = tgid.x;
  const int n0 = tgid.y * columns;
  const int groups = N / group_size;
  const int64_t row_words = int64_t(N) * bits / 32;
  const device uint32_t* w_block = w + n0 / columns * bits;
  scales += n0 / group_size;
  biases += n0 / group_size;
  x += int64_t(m) * K;

  float acc[columns];
#pragma clang loop unroll(full)
  for (int j = 0; j < columns; ++j) {
    acc[j] = 0.0f;
  }
  float bias_acc = 0.0f;
  for (int k = sg * columns + lane; k < K; k += simdgroups * columns) {
    const float xk = float(x[k]);
    const float xs = xk * float(scales[int64_t(k) * groups]);
    bias_acc += xk * float(biases[int64_t(k) * groups]);
    ushort units[2 * bits];
    mlx_ext::load_units<2 * bits, true>((const device ushort*)(w_block + k * row_words), units);
#pragma clang loop unroll(full)
    for (int j = 0; j < columns; ++j) {
      acc[j] += xs * float(mlx_ext::masked_value<bits>(units, j));
    }
  }
#pragma clang loop unroll(full)
  for (int j = 0; j < columns; ++j) {
    acc[j] *= mlx_ext::unit_shift_scale<bits>(j);
  }
  mlx_ext::simd_reduce_scatter32(acc, lane);
  partial[sg * columns + lane] = acc[0] + simd_sum(bias_acc);
  threadgroup_barrier(mem_flags::mem_threadgroup);

  if (sg == 0) {
    float v = 0.0f;
#pragma clang loop unroll(full)
    for (int s = 0; s < simdgroups; ++s) {
      v += partial[s * columns + lane];
    }
    const int n = n0 + lane;
    if (qmm_has_bias && valid) {
      v += float(bias[n]);
    }
    out[int64_t(m) * N + n] = T(valid ? v : gather_nan());
  }
}

// ---- qmm_t / qmm_n -------------------------------------------------------------
//
// M large. A threadgroup computes a 32x32 tile of out over K in steps of 32;
// per step x and the weights are staged as float tiles in threadgroup memory,
// the weights dequantized once per tile (scale * q + bias in float, never
// rounded to T).
//   thread:      per step, 8 values of the x tile and 8 dequantized weights
//                (one run of `bits` bytes; 4 threads per tile row);
//   simdgroup:   a 16x16 block of the tile: 2x2 float 8x8 accumulators,
//                4 simdgroup MMAs per 8 of K;
//   threadgroup: 4 simdgroups (2x2), out[32 ty .., 32 tx ..);
//                grid (ceil(N / 32), ceil(M / 32)); gather: (.., .., P), z
//                the pair, so the tiles cover the M rows of one pair.
// Threadgroup memory: the x and weight tiles, 2 x 32 x 36 floats (9 KiB).
// Rows of x past M, and weight rows past N (qmm_t) or K (qmm_n), are clamped
// to the last row (read, never stored); x past K (qmm_n: K is any size) is 0.
// The weight tile is (n, k) for qmm_t, read transposed, and (k, n) for qmm_n:
// in both, tile row r holds 32 values of one row of w, `bits` words.
// mode 0 is affine (T scales and biases); the fp modes (fp.h) read uint8
// scales and no biases, and their groups of 16 (nvfp4) let K (qmm_t) or N
// (qmm_n) end on half a tile row: those 8-value runs are zeros.

// 8 dequantized values of one group into the weight tile.
template <typename T, int group_size, int bits, int mode>
inline void load_w8(const device uchar* src, const device uchar* scales, const device T* biases,
    int64_t group, threadgroup float* dst) {
  if constexpr (mode == 0) {
    mlx_ext::dequantize8<bits>(
        src, float(((const device T*)scales)[group]), float(biases[group]), dst);
  } else {
    mlx_ext::fp_dequantize8<mode>(src, mlx_ext::fp_scale<mode>(scales[group]), dst);
  }
}

template <typename T, int group_size, int bits, bool transpose, int mode>
[[kernel]] void qmm(
    const device uint32_t* w [[buffer(QMM_BUFFER_W)]],
    const device uchar* scales [[buffer(QMM_BUFFER_SCALES)]], // T, or fp modes' uint8 codes
    const device T* biases [[buffer(QMM_BUFFER_BIASES)]], // affine only
    const device T* x [[buffer(QMM_BUFFER_X)]],
    device T* out [[buffer(QMM_BUFFER_OUT)]],
    const device T* bias [[buffer(QMM_BUFFER_BIAS), function_constant(qmm_has_bias)]],
    constant QmmShape& shape [[buffer(QMM_BUFFER_SHAPE)]],
    const device uint* lhs [[buffer(QMM_BUFFER_LHS), function_constant(qmm_gather)]],
    const device uint* rhs [[buffer(QMM_BUFFER_RHS), function_constant(qmm_gather)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int tile = 32; // BM = BN = BK
  constexpr int ld = tile + 4; // padded rows: fewer threadgroup bank conflicts
  threadgroup float x_tile[tile * ld];
  threadgroup float w_tile[tile * ld];

  const int M = shape.M;
  const int N = shape.N;
  int K = shape.K;
  bool valid = true;
  if (qmm_gather) { // scales are bytes here: T elements (affine) or uint8 codes
    const GatherPair g = gather_pair(tgid.z, lhs, rhs, shape);
    valid = g.valid;
    K = valid ? K : 0;
    w += g.w;
    scales += g.groups * (mode == 0 ? int64_t(sizeof(T)) : int64_t(1));
    biases += g.groups;
    x += g.x;
    out += g.out;
    if (qmm_has_bias) {
      bias += g.bias;
    }
  }
  const int m0 = tgid.y * tile;
  const int n0 = tgid.x * tile;

  // Loading: thread tid fills row `lr`, columns lc .. lc + 8 of both tiles.
  const int lr = tid / 4;
  const int lc = tid % 4 * 8;
  const device T* x_row = x + int64_t(min(m0 + lr, M - 1)) * K + lc;
  const int w_cols = transpose ? K : N; // values per row of w
  const int64_t w_row_bytes = int64_t(w_cols) * bits / 8;
  const int w_row_groups = w_cols / group_size;
  const device uchar* w_bytes = (const device uchar*)w + lc / 8 * bits;
  const int n_row = min(n0 + lr, N - 1); // qmm_t's weight row

  // Computing: simdgroup sg owns rows 16 sm .., columns 16 sn .. of the tile.
  const int sm = sg / 2;
  const int sn = sg % 2;
  simdgroup_matrix<float, 8, 8> acc[2][2];
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 2; ++j) {
      acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  for (int k0 = 0; k0 < K; k0 += tile) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma clang loop unroll(full)
    for (int j = 0; j < 8; ++j) {
      const bool inside = k0 + lc + j < K;
      x_tile[lr * ld + lc + j] = inside ? float(x_row[k0 + j]) : 0.0f;
    }
    const int64_t w_row = transpose ? n_row : min(k0 + lr, K - 1);
    const int w_col = transpose ? k0 : n0; // first of the 32 values
    if (w_col + lc < w_cols) {
      load_w8<T, group_size, bits, mode>(
          w_bytes + w_row * w_row_bytes + w_col / 8 * bits, scales, biases,
          w_row * w_row_groups + (w_col + lc) / group_size, w_tile + lr * ld + lc);
    } else {
#pragma clang loop unroll(full)
      for (int j = 0; j < 8; ++j) {
        w_tile[lr * ld + lc + j] = 0.0f;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

#pragma clang loop unroll(full)
    for (int kk = 0; kk < tile; kk += 8) {
      simdgroup_matrix<float, 8, 8> a[2];
      simdgroup_matrix<float, 8, 8> b[2];
#pragma clang loop unroll(full)
      for (int i = 0; i < 2; ++i) {
        simdgroup_load(a[i], x_tile + (16 * sm + 8 * i) * ld + kk, ld);
      }
#pragma clang loop unroll(full)
      for (int j = 0; j < 2; ++j) {
        if (transpose) {
          simdgroup_load(b[j], w_tile + (16 * sn + 8 * j) * ld + kk, ld, ulong2(0, 0), true);
        } else {
          simdgroup_load(b[j], w_tile + kk * ld + 16 * sn + 8 * j, ld);
        }
      }
#pragma clang loop unroll(full)
      for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
        for (int j = 0; j < 2; ++j) {
          simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
    }
  }

  // Epilogue straight from the accumulators: + bias, rounded to T.
  const short2 coord = mlx_ext::simdgroup_matrix_coord(lane);
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
    const int m = m0 + 16 * sm + 8 * i + coord.y;
#pragma clang loop unroll(full)
    for (int j = 0; j < 2; ++j) {
#pragma clang loop unroll(full)
      for (int e = 0; e < 2; ++e) {
        const int n = n0 + 16 * sn + 8 * j + coord.x + e;
        if (m < M && n < N) {
          const float b = qmm_has_bias && valid ? float(bias[n]) : 0.0f;
          const float v = acc[i][j].thread_elements()[e] + b;
          out[int64_t(m) * N + n] = T(valid ? v : gather_nan());
        }
      }
    }
  }
}

// ---- fp_qmv ----------------------------------------------------------------------
//
// fp modes, M small, transpose: as qmv's grid (M, ceil(N / 8)), 2 simdgroups of
// 4 output rows. Each lane takes 16 consecutive values of K in every 512-wide
// block (K is a multiple of 16, so no lane's run is cut, and a run lies in
// one group): per row, the dot of the decoded codes with x times the run's
// group scale. Rows past N are clamped to N - 1 (read, never stored).

template <typename T, int mode>
[[kernel]] void fp_qmv(
    const device uint32_t* w [[buffer(QMM_BUFFER_W)]],
    const device uchar* scales [[buffer(QMM_BUFFER_SCALES)]],
    const device T* x [[buffer(QMM_BUFFER_X)]],
    device T* out [[buffer(QMM_BUFFER_OUT)]],
    const device T* bias [[buffer(QMM_BUFFER_BIAS), function_constant(qmm_has_bias)]],
    constant QmmShape& shape [[buffer(QMM_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  using F = mlx_ext::FpMode<mode>;
  constexpr int rows = 4;
  constexpr int values = 16;
  constexpr int block = 32 * values;
  constexpr int run_bytes = values * F::bits / 8;
  const int N = shape.N;
  const int K = shape.K;
  const int n0 = (int(tgid.y) * 2 + sg) * rows;
  if (n0 >= N) {
    return; // the whole simdgroup; this kernel has no threadgroup barrier
  }
  const int groups = K / F::group_size;
  const int64_t row_bytes = int64_t(K) * F::bits / 8;
  const int m = tgid.x;
  x += int64_t(m) * K;

  float acc[rows] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k = lane * values; k < K; k += block) {
    float xs[values];
#pragma clang loop unroll(full)
    for (int j = 0; j < values; ++j) {
      xs[j] = float(x[k + j]);
    }
#pragma clang loop unroll(full)
    for (int r = 0; r < rows; ++r) {
      const int n = min(n0 + r, N - 1);
      const device uchar* src = (const device uchar*)w + n * row_bytes + k * F::bits / 8;
      uchar bytes[run_bytes];
#pragma clang loop unroll(full)
      for (int i = 0; i < run_bytes; ++i) {
        bytes[i] = src[i];
      }
      float dot = 0.0f;
#pragma clang loop unroll(full)
      for (int j = 0; j < values; ++j) {
        dot += mlx_ext::fp_value<mode>(mlx_ext::fp_code<mode>(bytes, j)) * xs[j];
      }
      acc[r] += dot * mlx_ext::fp_scale<mode>(scales[int64_t(n) * groups + k / F::group_size]);
    }
  }
#pragma clang loop unroll(full)
  for (int r = 0; r < rows; ++r) {
    const float v = simd_sum(acc[r]);
    const int n = n0 + r;
    if (lane == 0 && n < N) {
      out[int64_t(m) * N + n] = T(v + (qmm_has_bias ? float(bias[n]) : 0.0f));
    }
  }
}

// ---- fp_qvm ----------------------------------------------------------------------
//
// fp modes, M small, not transpose (w is (K, N), groups along N): grid
// (M, ceil(N / 32)), one simdgroup; lane l owns output column 32 t + l and
// walks all of K (consecutive lanes read consecutive codes of a row).

template <typename T, int mode>
[[kernel]] void fp_qvm(
    const device uint32_t* w [[buffer(QMM_BUFFER_W)]],
    const device uchar* scales [[buffer(QMM_BUFFER_SCALES)]],
    const device T* x [[buffer(QMM_BUFFER_X)]],
    device T* out [[buffer(QMM_BUFFER_OUT)]],
    const device T* bias [[buffer(QMM_BUFFER_BIAS), function_constant(qmm_has_bias)]],
    constant QmmShape& shape [[buffer(QMM_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
  using F = mlx_ext::FpMode<mode>;
  const int N = shape.N;
  const int K = shape.K;
  const int n = int(tgid.y) * 32 + lane;
  if (n >= N) {
    return; // no barrier or collective follows
  }
  const int groups = N / F::group_size;
  const int64_t row_bytes = int64_t(N) * F::bits / 8;
  const int m = tgid.x;
  x += int64_t(m) * K;
  const device uchar* col = (const device uchar*)w + n * F::bits / 8;
  const int shift = F::bits == 4 ? 4 * (n % 2) : 0;
  float acc = 0.0f;
  for (int k = 0; k < K; ++k) {
    const uint code = (uint(col[k * row_bytes]) >> shift) & ((1u << F::bits) - 1);
    const float s = mlx_ext::fp_scale<mode>(scales[int64_t(k) * groups + n / F::group_size]);
    acc += float(x[k]) * (s * mlx_ext::fp_value<mode>(code));
  }
  out[int64_t(m) * N + n] = T(acc + (qmm_has_bias ? float(bias[n]) : 0.0f));
}

// ---- Instantiations ------------------------------------------------------------
//
// Host names <kernel>_<type>_gs<group size>_b<bits>, e.g. qmv_fast_float16_gs64_b4,
// qmm_t_bfloat16_gs32_b3, and <kernel>_<type>_<mode> for the fp modes, e.g.
// fp_qmv_float16_mxfp4; the bias epilogue is a function constant of each.

#define instantiate_kernel(name, kernel, ...) \
  template [[host_name(name)]] [[kernel]] decltype(kernel<__VA_ARGS__>) kernel<__VA_ARGS__>;

#define instantiate_qmm(type, type_name, gs, bits)                                           \
  instantiate_kernel("qmv_fast_" #type_name "_gs" #gs "_b" #bits, qmv, type, gs, bits, true) \
  instantiate_kernel("qmv_" #type_name "_gs" #gs "_b" #bits, qmv, type, gs, bits, false)     \
  instantiate_kernel("qvm_" #type_name "_gs" #gs "_b" #bits, qvm, type, gs, bits)            \
  instantiate_kernel("qmm_t_" #type_name "_gs" #gs "_b" #bits, qmm, type, gs, bits, true, 0) \
  instantiate_kernel("qmm_n_" #type_name "_gs" #gs "_b" #bits, qmm, type, gs, bits, false, 0)

#define instantiate_qmm_group_sizes(type, type_name, bits) \
  instantiate_qmm(type, type_name, 32, bits)               \
  instantiate_qmm(type, type_name, 64, bits)               \
  instantiate_qmm(type, type_name, 128, bits)

#define instantiate_qmm_bits(type, type_name)         \
  instantiate_qmm_group_sizes(type, type_name, 2)     \
  instantiate_qmm_group_sizes(type, type_name, 3)     \
  instantiate_qmm_group_sizes(type, type_name, 4)     \
  instantiate_qmm_group_sizes(type, type_name, 5)     \
  instantiate_qmm_group_sizes(type, type_name, 6)     \
  instantiate_qmm_group_sizes(type, type_name, 8)

instantiate_qmm_bits(float, float32)
instantiate_qmm_bits(half, float16)
instantiate_qmm_bits(bfloat, bfloat16)

#define instantiate_fp_mode(type, type_name, mode_name, mode, gs, bits)                          \
  instantiate_kernel("fp_qmv_" #type_name "_" #mode_name, fp_qmv, type, mode)                     \
  instantiate_kernel("fp_qvm_" #type_name "_" #mode_name, fp_qvm, type, mode)                     \
  instantiate_kernel("qmm_t_" #type_name "_" #mode_name, qmm, type, gs, bits, true, mode)         \
  instantiate_kernel("qmm_n_" #type_name "_" #mode_name, qmm, type, gs, bits, false, mode)

#define instantiate_fp_modes(type, type_name)             \
  instantiate_fp_mode(type, type_name, mxfp4, 1, 32, 4)   \
  instantiate_fp_mode(type, type_name, nvfp4, 2, 16, 4)   \
  instantiate_fp_mode(type, type_name, mxfp8, 3, 32, 8)

instantiate_fp_modes(float, float32)
instantiate_fp_modes(half, float16)
instantiate_fp_modes(bfloat, bfloat16)
