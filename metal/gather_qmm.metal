// mlx_ext.gather_qmm's own Metal kernel: many pairs of one row each, sorted
// by expert (mlx-lm's prefill: SwitchGLU sorts the (token, expert) pairs when
// there are 64 or more). Every other gather_qmm launch runs the affine kernels
// of quantized_matmul.metal with the function constant qmm_gather (one pair
// per grid z; its comment "Gather" says what that costs). Buffers are bound
// as quantized_matmul_bindings.h says, the indices always; shape.M is P here.
//
// gather_qmm_t / gather_qmm_n (transpose / not): the P pairs are the rows of
// one (P, K) product whose weight changes along the rows. A threadgroup
// computes a 32x32 tile of out (32 consecutive pairs, 32 output columns) as
// qmm_t / qmm_n do, once per run of equal experts among its 32 pairs: the x
// tile holds that run's rows (the others 0), the weight tile that expert's 32
// columns, dequantized once per tile.
//   thread:      per step of 32 in K, 8 values of the x tile (pair p0 + tid / 4's
//                row of x, read at lhs) and 8 dequantized weights;
//   simdgroup:   a 16x16 block of the tile: 2x2 float 8x8 accumulators, 4
//                simdgroup MMAs per 8 of K;
//   threadgroup: 4 simdgroups (2x2), out[32 ty .., 32 tx ..) over the runs;
//                grid (ceil(N / 32), ceil(P / 32)).
// Threadgroup memory: the x and weight tiles, 2 x 32 x 36 floats (9 KiB).
// Every thread reads the same 32 expert indices, so the runs (and the barriers
// inside them) are uniform across the threadgroup.
// Cost: a column tile reads one 32-column slice of an expert per run; sorted
// pairs make about ceil(P / 32) + (experts used) runs per column tile, so the
// weights are streamed about that many times where the per-pair GEMV streams
// them P times. Unsorted pairs are still correct but make up to 32 runs of one
// row per tile (32 K loops of MMAs, the GEMV's weight traffic): the host code
// takes this kernel only for sorted indices (gather_qmm/metal_plan.h).
// Out-of-range pairs (lhs >= X or rhs >= E, known only at run time) read
// nothing (a zero x row; a run of an out-of-range expert is skipped) and
// their outputs are NaN, as on the CPU.
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

#include "affine.h"
#include "common.h"
#include "quantized_matmul_bindings.h"

using namespace metal;

constant bool qmm_has_bias [[function_constant(QMM_FC_HAS_BIAS)]];

template <typename T, int group_size, int bits, bool transpose>
[[kernel]] void gather_qmm_rows(
    const device uint32_t* w [[buffer(QMM_BUFFER_W)]],
    const device T* scales [[buffer(QMM_BUFFER_SCALES)]],
    const device T* biases [[buffer(QMM_BUFFER_BIASES)]],
    const device T* x [[buffer(QMM_BUFFER_X)]],
    device T* out [[buffer(QMM_BUFFER_OUT)]],
    const device T* bias [[buffer(QMM_BUFFER_BIAS), function_constant(qmm_has_bias)]],
    constant QmmShape& shape [[buffer(QMM_BUFFER_SHAPE)]],
    const device uint* lhs [[buffer(QMM_BUFFER_LHS)]],
    const device uint* rhs [[buffer(QMM_BUFFER_RHS)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int tile = 32; // BM = BN = BK
  constexpr int ld = tile + 4; // padded rows: fewer threadgroup bank conflicts
  threadgroup float x_tile[tile * ld];
  threadgroup float w_tile[tile * ld];

  const int P = shape.M; // one row per pair
  const int N = shape.N;
  const int K = shape.K;
  const uint X = shape.X;
  const uint E = shape.E;
  const int p0 = tgid.y * tile;
  const int n0 = tgid.x * tile;
  const int rows = min(tile, P - p0);

  // Loading: thread tid fills row `lr`, columns lc .. lc + 8 of both tiles.
  const int lr = tid / 4;
  const int lc = tid % 4 * 8;
  const int lp = min(p0 + lr, P - 1);
  const bool row_ok = p0 + lr < P && lhs[lp] < X && rhs[lp] < E;
  const device T* x_row = x + (row_ok ? int64_t(lhs[lp]) * K : int64_t(0)) + lc;
  const int w_cols = transpose ? K : N; // values per row of w
  const int64_t w_row_bytes = int64_t(w_cols) * bits / 8;
  const int w_row_groups = w_cols / group_size;
  const int n_row = min(n0 + lr, N - 1); // transpose: the weight row

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

  for (int r0 = 0; r0 < rows;) {
    // The run of pairs r0 .. r1 routed to expert e.
    const uint e = rhs[p0 + r0];
    int r1 = r0 + 1;
    while (r1 < rows && rhs[p0 + r1] == e) {
      ++r1;
    }
    if (e < E) {
      const bool in_run = row_ok && lr >= r0 && lr < r1;
      const device uchar* w_bytes =
          (const device uchar*)(w + int64_t(e) * shape.w_stride) + lc / 8 * bits;
      const device T* run_scales = scales + int64_t(e) * shape.group_stride;
      const device T* run_biases = biases + int64_t(e) * shape.group_stride;
      for (int k0 = 0; k0 < K; k0 += tile) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma clang loop unroll(full)
        for (int j = 0; j < 8; ++j) {
          const bool inside = in_run && k0 + lc + j < K;
          x_tile[lr * ld + lc + j] = inside ? float(x_row[k0 + j]) : 0.0f;
        }
        const int64_t w_row = transpose ? n_row : min(k0 + lr, K - 1);
        const int w_col = transpose ? k0 : n0; // first of the 32 values
        if (w_col + lc < w_cols) {
          const int64_t g = w_row * w_row_groups + (w_col + lc) / group_size;
          mlx_ext::dequantize8<bits>(w_bytes + w_row * w_row_bytes + w_col / 8 * bits,
              float(run_scales[g]), float(run_biases[g]), w_tile + lr * ld + lc);
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
    }
    r0 = r1;
  }

  // Epilogue straight from the accumulators: + the pair's expert's bias, or
  // NaN for an out-of-range pair.
  const short2 coord = mlx_ext::simdgroup_matrix_coord(lane);
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
    const int m = p0 + 16 * sm + 8 * i + coord.y;
    if (m < P) {
      const uint e = rhs[m];
      const bool valid = lhs[m] < X && e < E;
#pragma clang loop unroll(full)
      for (int j = 0; j < 2; ++j) {
#pragma clang loop unroll(full)
        for (int c = 0; c < 2; ++c) {
          const int n = n0 + 16 * sn + 8 * j + coord.x + c;
          if (n < N) {
            const float b = qmm_has_bias && valid ? float(bias[int64_t(e) * shape.bias_stride + n]) : 0.0f;
            const float v = acc[i][j].thread_elements()[c] + b;
            out[int64_t(m) * N + n] = T(valid ? v : as_type<float>(0x7fc00000u));
          }
        }
      }
    }
  }
}

// ---- Instantiations ------------------------------------------------------------
//
// Host names gather_qmm_t_<type>_gs<group size>_b<bits> and gather_qmm_n_...,
// e.g. gather_qmm_t_bfloat16_gs64_b4; the bias epilogue a function constant.

#define instantiate_kernel(name, kernel, ...) \
  template [[host_name(name)]] [[kernel]] decltype(kernel<__VA_ARGS__>) kernel<__VA_ARGS__>;

#define instantiate_gather(type, type_name, gs, bits)                                                    \
  instantiate_kernel("gather_qmm_t_" #type_name "_gs" #gs "_b" #bits, gather_qmm_rows, type, gs, bits, true) \
  instantiate_kernel("gather_qmm_n_" #type_name "_gs" #gs "_b" #bits, gather_qmm_rows, type, gs, bits, false)

#define instantiate_gather_group_sizes(type, type_name, bits) \
  instantiate_gather(type, type_name, 32, bits)               \
  instantiate_gather(type, type_name, 64, bits)               \
  instantiate_gather(type, type_name, 128, bits)

#define instantiate_gather_bits(type, type_name)         \
  instantiate_gather_group_sizes(type, type_name, 2)     \
  instantiate_gather_group_sizes(type, type_name, 3)     \
  instantiate_gather_group_sizes(type, type_name, 4)     \
  instantiate_gather_group_sizes(type, type_name, 5)     \
  instantiate_gather_group_sizes(type, type_name, 6)     \
  instantiate_gather_group_sizes(type, type_name, 8)

instantiate_gather_bits(float, float32)
instantiate_gather_bits(half, float16)
instantiate_gather_bits(bfloat, bfloat16)
