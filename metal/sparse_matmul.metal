// mlx_ext.sparse_matmul on Apple GPUs: out = x @ W.T (+ bias) for a sparse W
// of shape (N, K) in one of the formats of csrc/sparse_matmul/sparse_matmul.h
// (CSR, Bitmask, BSR, N:M with float or affine-quantized values), its
// transposed product out = g @ W (the x-gradient), and the sampled product
// dvalues[j] = sum_m g[m, row_j] x[m, col_j] (the values' gradient).
//
// Kernels (chosen by csrc/sparse_matmul/metal_plan.h):
//   sp_mv_<format>       decode (M <= 8; every M for CSR, which has no tiled
//                        kernel): a simdgroup owns a row of W and streams its
//                        stored values once for up to 8 rows of x
//   sp_mv_split_csr_*    CSR with long rows: balanced slices of stored
//                        values, then sp_split_fixup_* for rows across slices
//   sp_mm_t_<format>     prefill (M > 8): 32x32 tiles of W expanded into
//                        threadgroup memory, simdgroup 8x8 products
//   sp_mm_n_<format>     the transposed product g @ W, the same tiles
//   sp_sampled_<format>  the sampled product; one thread per stored value
// None uses atomics; every output has one writer and a fixed summation order.
//
// Types: T is the output dtype, and that of x and bias (the host converts x
// when its dtype differs); V that of the stored values (or of quantized N:M's
// scales and biases): V == T, or T float32 and V float16 / bfloat16. Float
// accumulation throughout; values are never rounded to T.
// Buffers are bound as sparse_matmul_bindings.h says.
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

#include "affine.h"
#include "common.h"
#include "sparse_matmul_bindings.h"

using namespace metal;

constant bool spmm_has_bias [[function_constant(SPMM_FC_HAS_BIAS)]];

// The decode kernels' shared sizes: 4 simdgroups (4 rows of W) per
// threadgroup; each lane keeps one partial sum per row of x, up to 8.
constant constexpr int kMvSimdgroups = 4;
constant constexpr int kMvRows = 8;
// Columns of x staged per step by the decode kernels that stage x (Bitmask,
// N:M): 8 rows x 512 floats = 16 KiB of threadgroup memory. Every lane of a
// simdgroup takes 16 of them: half a mask word, or a run of quantized values.
constant constexpr int kMvChunk = 512;

// x[m0 .. m0 + rows, k0 .. k0 + kMvChunk) as float into xs (row i at
// i * kMvChunk), zero past K and past `rows`; all 128 threads take part.
template <typename T>
inline void stage_x(const device T* x, int K, int m0, int rows, int k0, ushort tid,
    threadgroup float* xs) {
  for (int e = tid; e < kMvRows * kMvChunk; e += 32 * kMvSimdgroups) {
    const int i = e / kMvChunk;
    const int c = k0 + e % kMvChunk;
    xs[e] = i < rows && c < K ? float(x[int64_t(m0 + i) * K + c]) : 0.0f;
  }
}

// The simdgroup's sums acc[0 .. rows) (one per row of x) reduced, row i's
// total left on lane i. `rows` is uniform over the simdgroup, so decode at
// M = 1 pays for one simd_sum, not 8.
inline float mv_reduce(thread float* acc, int rows, ushort lane) {
  float total = 0.0f;
#pragma clang loop unroll(full)
  for (int i = 0; i < kMvRows; ++i) {
    if (i < rows) {
      const float s = simd_sum(acc[i]);
      total = lane == i ? s : total;
    }
  }
  return total;
}

// mv_reduce, then lane i < rows writes row m0 + i of column n (+ bias[n]).
template <typename T>
inline void mv_store(thread float* acc, device T* out, const device T* bias, int N, int n,
    int m0, int rows, bool live, ushort lane) {
  const float total = mv_reduce(acc, rows, lane);
  if (live && lane < rows) {
    const float b = spmm_has_bias ? float(bias[n]) : 0.0f;
    out[int64_t(m0 + lane) * N + n] = T(total + b);
  }
}

// ---- sp_mv_csr -------------------------------------------------------------------
//
// CSR, any M: the row-split gather kernel. Grid (ceil(N / 4), ceil(M / 8)),
// 128 threads.
//   thread:      stored values j = lane, lane + 32, ... of its row: value and
//                column read once, x[m, column] gathered from device memory
//                for the 8 rows of x of the threadgroup's step;
//   simdgroup:   row n of W, out[m0 .. m0 + 8, n] (simd_sum);
//   threadgroup: 4 rows of W.
// Reads per stored value: sizeof(V) + sizeof(I) once per 8 rows of x, plus
// 8 gathered x. x is not staged: the columns of a row are data-dependent
// and each x value is read by few of the threadgroup's rows. Threadgroup
// memory: none.

template <typename T, typename V, typename I>
[[kernel]] void sp_mv_csr(
    const device V* values [[buffer(SPMM_BUFFER_VALUES)]],
    const device I* cols [[buffer(SPMM_BUFFER_PATTERN)]],
    const device int* row_ptr [[buffer(SPMM_BUFFER_ROW_PTR)]],
    const device T* x [[buffer(SPMM_BUFFER_X)]],
    device T* out [[buffer(SPMM_BUFFER_OUT)]],
    const device T* bias [[buffer(SPMM_BUFFER_BIAS), function_constant(spmm_has_bias)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const int N = shape.N;
  const int K = shape.K;
  const int m0 = tgid.y * kMvRows;
  const int rows = min(kMvRows, shape.M - m0);
  const int n = int(tgid.x) * kMvSimdgroups + sg;
  if (n >= N) {
    return; // the whole simdgroup; this kernel has no barrier
  }
  float acc[kMvRows];
#pragma clang loop unroll(full)
  for (int i = 0; i < kMvRows; ++i) {
    acc[i] = 0.0f;
  }
  x += int64_t(m0) * K;
  for (int j = row_ptr[n] + lane; j < row_ptr[n + 1]; j += 32) {
    const float v = float(values[j]);
    const int c = int(cols[j]);
#pragma clang loop unroll(full)
    for (int i = 0; i < kMvRows; ++i) {
      if (i < rows) {
        acc[i] += v * float(x[int64_t(i) * K + c]);
      }
    }
  }
  mv_store<T>(acc, out, bias, N, n, m0, rows, true, lane);
}

// ---- sp_mv_split_csr + sp_split_fixup ----------------------------------------------
//
// CSR with long rows: balanced slices of stored values instead of rows, so
// that a few long rows among short ones do not leave most of the GPU idle.
// Slice s holds stored values [s S, (s + 1) S), S = shape.slice_values. Grid
// (ceil(slices / 4), ceil(M / 8)), 128 threads.
//   thread:      as sp_mv_csr, over the part of each row inside its slice;
//   simdgroup:   one slice: the row holding its first value (binary search in
//                row_ptr), then row after row to the slice's end, a simd_sum
//                per row; a row lying wholly in the slice is written to out,
//                the part of a row that began before the slice goes to its
//                `head` partial sums, of a row that goes on past it to its
//                `tail` (8 floats each, per step of 8 rows of x);
//   threadgroup: 4 slices.
// sp_split_fixup then writes every row that crosses a slice boundary, from
// tail[first slice] + head[each later slice], and every empty row (bias or 0):
// one thread per row of W, grid (ceil(N / 128), ceil(M / 8)). Each output has
// one writer; every partial read was written (NaN-filled scratch in the tests).
// Reads per stored value: as sp_mv_csr; scratch: 2 x 8 floats per slice per 8
// rows of x, written and read once. Threadgroup memory: none.

template <typename T, typename V, typename I>
[[kernel]] void sp_mv_split_csr(
    const device V* values [[buffer(SPMM_BUFFER_VALUES)]],
    const device I* cols [[buffer(SPMM_BUFFER_PATTERN)]],
    const device int* row_ptr [[buffer(SPMM_BUFFER_ROW_PTR)]],
    const device T* x [[buffer(SPMM_BUFFER_X)]],
    device T* out [[buffer(SPMM_BUFFER_OUT)]],
    const device T* bias [[buffer(SPMM_BUFFER_BIAS), function_constant(spmm_has_bias)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    device float* partials [[buffer(SPMM_BUFFER_PARTIALS)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const int N = shape.N;
  const int K = shape.K;
  const int S = shape.slice_values;
  const int stored = row_ptr[N];
  const int slices = max(1, (stored + S - 1) / S);
  const int slice = int(tgid.x) * kMvSimdgroups + sg;
  const int a = slice * S;
  if (a >= stored) {
    return; // the whole simdgroup; this kernel has no barrier
  }
  const int b = min(a + S, stored);
  const int m0 = tgid.y * kMvRows;
  const int rows = min(kMvRows, shape.M - m0);
  device float* head = partials + (int64_t(tgid.y) * slices + slice) * 2 * kMvRows;
  device float* tail = head + kMvRows;
  x += int64_t(m0) * K;

  // The last row starting at or before a: it holds value a.
  int lo = 0;
  int hi = N;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (row_ptr[mid] <= a) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  for (int r = lo - 1; r < N && row_ptr[r] < b; ++r) {
    const int start = row_ptr[r];
    const int end = row_ptr[r + 1];
    if (start == end) {
      continue; // empty rows are the fix-up's
    }
    float acc[kMvRows];
#pragma clang loop unroll(full)
    for (int i = 0; i < kMvRows; ++i) {
      acc[i] = 0.0f;
    }
    for (int j = max(start, a) + lane; j < min(end, b); j += 32) {
      const float v = float(values[j]);
      const int c = int(cols[j]);
#pragma clang loop unroll(full)
      for (int i = 0; i < kMvRows; ++i) {
        if (i < rows) {
          acc[i] += v * float(x[int64_t(i) * K + c]);
        }
      }
    }
    const float total = mv_reduce(acc, rows, lane);
    if (lane < rows) {
      if (start < a) {
        head[lane] = total;
      } else if (end > b) {
        tail[lane] = total;
      } else {
        const float bv = spmm_has_bias ? float(bias[r]) : 0.0f;
        out[int64_t(m0 + lane) * N + r] = T(total + bv);
      }
    }
  }
}

template <typename T>
[[kernel]] void sp_split_fixup(
    const device int* row_ptr [[buffer(SPMM_BUFFER_ROW_PTR)]],
    device T* out [[buffer(SPMM_BUFFER_OUT)]],
    const device T* bias [[buffer(SPMM_BUFFER_BIAS), function_constant(spmm_has_bias)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    const device float* partials [[buffer(SPMM_BUFFER_PARTIALS)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]]) {
  const int N = shape.N;
  const int r = int(tgid.x) * 128 + tid;
  if (r >= N) {
    return; // no barrier or collective follows
  }
  const int m0 = tgid.y * kMvRows;
  const int rows = min(kMvRows, shape.M - m0);
  const int S = shape.slice_values;
  const int slices = max(1, (row_ptr[N] + S - 1) / S);
  const int start = row_ptr[r];
  const int end = row_ptr[r + 1];
  const int first = start / S;
  const int last = (end - 1) / S;
  if (start != end && first == last) {
    return; // written by its slice
  }
  const device float* step = partials + int64_t(tgid.y) * slices * 2 * kMvRows;
  const float bv = spmm_has_bias ? float(bias[r]) : 0.0f;
  for (int i = 0; i < rows; ++i) {
    float v = 0.0f;
    if (start != end) {
      v = step[(int64_t(first) * 2 + 1) * kMvRows + i];
      for (int s = first + 1; s <= last; ++s) {
        v += step[int64_t(s) * 2 * kMvRows + i];
      }
    }
    out[int64_t(m0 + i) * N + r] = T(v + bv);
  }
}

// ---- sp_mv_bitmask -----------------------------------------------------------------
//
// Bitmask, M <= 8. Grid (ceil(N / 4), 1), 128 threads; per step of 512
// columns, x[0 .. M, step) is staged in threadgroup memory (16 KiB).
//   thread:      16 columns of its row per step (half a mask word): the
//                population count of those bits, its exclusive prefix over the
//                simdgroup (simd_prefix_exclusive_sum) gives the offset of its
//                first packed value; then one value per set bit (ctz);
//   simdgroup:   row n of W, out[0 .. M, n] (simd_sum);
//   threadgroup: 4 rows of W sharing the staged x. Rows past N are clamped to
//                N - 1 (read, never stored): no thread leaves before a barrier.
// Reads per stored value: sizeof(V) once, plus 1/8 byte of mask per element.
// Threadgroup memory: 16 KiB (x, 8 rows x 512 floats).

template <typename T, typename V>
[[kernel]] void sp_mv_bitmask(
    const device V* values [[buffer(SPMM_BUFFER_VALUES)]],
    const device uint* mask [[buffer(SPMM_BUFFER_PATTERN)]],
    const device int* row_ptr [[buffer(SPMM_BUFFER_ROW_PTR)]],
    const device T* x [[buffer(SPMM_BUFFER_X)]],
    device T* out [[buffer(SPMM_BUFFER_OUT)]],
    const device T* bias [[buffer(SPMM_BUFFER_BIAS), function_constant(spmm_has_bias)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup float xs[kMvRows * kMvChunk];
  const int N = shape.N;
  const int K = shape.K;
  const int rows = min(kMvRows, shape.M);
  const int n = int(tgid.x) * kMvSimdgroups + sg;
  const int row = min(n, N - 1);
  const int words = (K + 31) / 32;
  const device uint* row_mask = mask + int64_t(row) * words;
  int base = row_ptr[row];

  float acc[kMvRows];
#pragma clang loop unroll(full)
  for (int i = 0; i < kMvRows; ++i) {
    acc[i] = 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += kMvChunk) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    stage_x<T>(x, K, 0, rows, k0, tid, xs);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int word = k0 / 32 + lane / 2;
    uint bits = word < words ? (row_mask[word] >> (16 * (lane % 2))) & 0xFFFFu : 0u;
    const int count = popcount(bits);
    int j = base + simd_prefix_exclusive_sum(count);
    base += simd_sum(count);
    while (bits != 0) {
      const int c = 16 * lane + ctz(bits);
      const float v = float(values[j++]);
#pragma clang loop unroll(full)
      for (int i = 0; i < kMvRows; ++i) {
        if (i < rows) {
          acc[i] += v * xs[i * kMvChunk + c];
        }
      }
      bits &= bits - 1;
    }
  }
  mv_store<T>(acc, out, bias, N, n, 0, rows, n < N, lane);
}

// ---- sp_mv_bsr -------------------------------------------------------------------
//
// BSR, M <= 8. Grid (ceil(N / 4), 1), 128 threads.
//   thread:      elements e = lane, lane + 32, ... of its row's part of the
//                block row (block e / block_k, column e % block_k): consecutive
//                lanes read consecutive values of a block row and of x;
//   simdgroup:   row n of W, out[0 .. M, n] (simd_sum);
//   threadgroup: 4 rows of W (of one block row when block_n >= 4).
// Reads per stored value: sizeof(V) once, plus 4 bytes of block column per
// block_k values. x is read from device memory, not staged: staging would
// read all K columns of x per threadgroup where a block row touches only its
// blocks' columns, read as coalesced runs of block_k that the block row's
// other rows find in the cache. Threadgroup memory: none.

template <typename T, typename V>
[[kernel]] void sp_mv_bsr(
    const device V* data [[buffer(SPMM_BUFFER_VALUES)]],
    const device int* block_cols [[buffer(SPMM_BUFFER_PATTERN)]],
    const device int* row_ptr [[buffer(SPMM_BUFFER_ROW_PTR)]],
    const device T* x [[buffer(SPMM_BUFFER_X)]],
    device T* out [[buffer(SPMM_BUFFER_OUT)]],
    const device T* bias [[buffer(SPMM_BUFFER_BIAS), function_constant(spmm_has_bias)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const int N = shape.N;
  const int K = shape.K;
  const int bn = shape.block_n;
  const int bk = shape.block_k;
  const int rows = min(kMvRows, shape.M);
  const int n = int(tgid.x) * kMvSimdgroups + sg;
  if (n >= N) {
    return; // the whole simdgroup; this kernel has no barrier
  }
  const int start = row_ptr[n / bn];
  const int elements = (row_ptr[n / bn + 1] - start) * bk;
  const int r = n % bn;

  float acc[kMvRows];
#pragma clang loop unroll(full)
  for (int i = 0; i < kMvRows; ++i) {
    acc[i] = 0.0f;
  }
  for (int e = lane; e < elements; e += 32) {
    const int b = start + e / bk;
    const int c = e % bk;
    const float v = float(data[(int64_t(b) * bn + r) * bk + c]);
    const int col = block_cols[b] * bk + c;
#pragma clang loop unroll(full)
    for (int i = 0; i < kMvRows; ++i) {
      if (i < rows) {
        acc[i] += v * float(x[int64_t(i) * K + col]);
      }
    }
  }
  mv_store<T>(acc, out, bias, N, n, 0, rows, true, lane);
}

// ---- sp_mv_nm -----------------------------------------------------------------------
//
// N:M, M <= 8. Grid (ceil(N / 4), 1), 128 threads; per step of 512 columns,
// x[0 .. M, step) is staged in threadgroup memory (16 KiB). Row n keeps
// kc = K n / m values; value j sits in column (j / n) m + code_j, its code
// (2 bits for m = 4, 4 for m = 8) at bit j * code_bits of the row's words.
//   thread, float values (bits == 0): values j = lane, lane + 32, ... of the
//                step: one value and one code each;
//   thread, quantized (bits 4 or 8): runs of 16 consecutive values, read as
//                the quantized matmul's GEMV reads them (affine.h: `bits`
//                16-bit units, masked values against x pre-scaled by 2^-s,
//                then scale * sum(q x) + bias * sum(x) per run, a run lying in
//                one group);
//   simdgroup:   row n of W, out[0 .. M, n] (simd_sum);
//   threadgroup: 4 rows of W sharing the staged x; rows past N clamped to
//                N - 1 (read, never stored).
// Reads per stored value: sizeof(V) (float) or bits / 8 (quantized, plus
// 2 sizeof(V) per group) once, plus code_bits / 8. Threadgroup memory:
// 16 KiB (x, 8 rows x 512 floats).

template <typename T, typename V, int bits, int group_size>
[[kernel]] void sp_mv_nm(
    const device uint* values [[buffer(SPMM_BUFFER_VALUES)]], // V, or w_q when bits > 0
    const device V* scales [[buffer(SPMM_BUFFER_SCALES)]],
    const device V* biases [[buffer(SPMM_BUFFER_BIASES)]],
    const device uint* codes [[buffer(SPMM_BUFFER_PATTERN)]],
    const device T* x [[buffer(SPMM_BUFFER_X)]],
    device T* out [[buffer(SPMM_BUFFER_OUT)]],
    const device T* bias [[buffer(SPMM_BUFFER_BIAS), function_constant(spmm_has_bias)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup float xs[kMvRows * kMvChunk];
  const int N = shape.N;
  const int K = shape.K;
  const int keep = shape.n;
  const int m = shape.m;
  const int code_bits = m == 8 ? 4 : 2;
  const int kc = K / m * keep;
  const int rows = min(kMvRows, shape.M);
  const int n = int(tgid.x) * kMvSimdgroups + sg;
  const int row = min(n, N - 1);
  const device uint* row_codes = codes + int64_t(row) * ((kc * code_bits + 31) / 32);

  float acc[kMvRows];
#pragma clang loop unroll(full)
  for (int i = 0; i < kMvRows; ++i) {
    acc[i] = 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += kMvChunk) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    stage_x<T>(x, K, 0, rows, k0, tid, xs);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int j0 = k0 / m * keep;
    const int j1 = min(k0 + kMvChunk, K) / m * keep;
    if constexpr (bits == 0) {
      const device V* row_values = (const device V*)values + int64_t(row) * kc;
      for (int j = j0 + lane; j < j1; j += 32) {
        const uint code = (row_codes[j * code_bits / 32] >> (j * code_bits % 32)) & uint(m - 1);
        const int c = j / keep * m + int(code) - k0;
        const float v = float(row_values[j]);
#pragma clang loop unroll(full)
        for (int i = 0; i < kMvRows; ++i) {
          if (i < rows) {
            acc[i] += v * xs[i * kMvChunk + c];
          }
        }
      }
    } else {
      // Runs of 16 values: j0 and j1 are multiples of 16 (kc is a multiple
      // of the group size), and so is every run's first unit a whole word.
      const device ushort* row_units = (const device ushort*)values + int64_t(row) * (kc * bits / 16);
      const int groups = kc / group_size;
      for (int j = j0 + 16 * lane; j < j1; j += 16 * 32) {
        ushort units[bits > 0 ? bits : 1];
        mlx_ext::load_units<bits, true>(row_units + j / 16 * bits, units);
        float dot[kMvRows];
        float x_sum[kMvRows];
#pragma clang loop unroll(full)
        for (int i = 0; i < kMvRows; ++i) {
          dot[i] = 0.0f;
          x_sum[i] = 0.0f;
        }
#pragma clang loop unroll(full)
        for (int t = 0; t < 16; ++t) {
          const int jt = j + t;
          const uint code = (row_codes[jt * code_bits / 32] >> (jt * code_bits % 32)) & uint(m - 1);
          const int c = jt / keep * m + int(code) - k0;
          const float q = float(mlx_ext::masked_value<bits>(units, t));
          const float shift = mlx_ext::unit_shift_scale<bits>(t);
#pragma clang loop unroll(full)
          for (int i = 0; i < kMvRows; ++i) {
            if (i < rows) {
              const float xv = xs[i * kMvChunk + c];
              dot[i] += q * (xv * shift);
              x_sum[i] += xv;
            }
          }
        }
        const int64_t g = int64_t(row) * groups + j / group_size;
        const float scale = float(scales[g]);
        const float offset = float(biases[g]);
#pragma clang loop unroll(full)
        for (int i = 0; i < kMvRows; ++i) {
          acc[i] += scale * dot[i] + offset * x_sum[i];
        }
      }
    }
  }
  mv_store<T>(acc, out, bias, N, n, 0, rows, n < N, lane);
}

// ---- tiles of W for sp_mm_t / sp_mm_n ----------------------------------------------------
//
// Each format's reader writes W[row, col .. col + 8) as float into threadgroup
// memory (zeros where nothing is stored, and past K) and says whether it wrote
// a stored value. A reader lives in one thread; its members cache where the
// last call ended, so that a thread walking along a row (sp_mm_t) advances
// rather than searches.

template <typename V, typename I>
struct CsrTiles {
  const device V* values;
  const device I* cols;
  const device int* row_ptr;
  int K;

  bool expand8(int row, int col, threadgroup float* dst) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 8; ++j) {
      dst[j] = 0.0f;
    }
    // First stored column >= col: binary search in the row's sorted columns.
    int lo = row_ptr[row];
    int hi = row_ptr[row + 1];
    const int end = hi;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (int(cols[mid]) < col) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    bool any = false;
    for (int j = lo; j < end && int(cols[j]) < col + 8; ++j) {
      dst[int(cols[j]) - col] = float(values[j]);
      any = true;
    }
    return any;
  }
};

template <typename V>
struct BitmaskTiles {
  const device V* values;
  const device uint* mask;
  const device int* row_ptr;
  int K;
  int cached_row = -1; // the packed values of words [0, cached_word) of
  int cached_word = 0; // cached_row start at cached_offset
  int cached_offset = 0;

  bool expand8(int row, int col, threadgroup float* dst) {
    const int words = (K + 31) / 32;
    const int word = col / 32;
    if (row != cached_row || word < cached_word) {
      cached_row = row;
      cached_word = 0;
      cached_offset = row_ptr[row];
    }
    for (; cached_word < word; ++cached_word) {
      cached_offset += popcount(mask[int64_t(row) * words + cached_word]);
    }
    const uint bits = mask[int64_t(row) * words + word];
    const int s = col % 32; // 0, 8, 16 or 24
    int j = cached_offset + popcount(bits & ((1u << s) - 1u));
    const uint mine = (bits >> s) & 0xFFu;
#pragma clang loop unroll(full)
    for (int t = 0; t < 8; ++t) {
      dst[t] = (mine >> t) & 1u ? float(values[j++]) : 0.0f;
    }
    return mine != 0;
  }
};

template <typename V>
struct BsrTiles {
  const device V* data;
  const device int* block_cols;
  const device int* row_ptr;
  int K;
  int bn;
  int bk;

  // The stored block (block_row, block_col), or -1: binary search in the
  // block row's sorted block columns.
  int find(int block_row, int block_col) const {
    int lo = row_ptr[block_row];
    int hi = row_ptr[block_row + 1];
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (block_cols[mid] < block_col) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo < row_ptr[block_row + 1] && block_cols[lo] == block_col ? lo : -1;
  }

  bool expand8(int row, int col, threadgroup float* dst) {
    const int r = row % bn;
    int block_col = -1;
    int b = -1;
    bool any = false;
#pragma clang loop unroll(full)
    for (int t = 0; t < 8; ++t) {
      const int c = col + t;
      if (c < K && c / bk != block_col) {
        block_col = c / bk;
        b = find(row / bn, block_col);
      }
      const bool stored = c < K && b >= 0;
      dst[t] = stored ? float(data[(int64_t(b) * bn + r) * bk + c % bk]) : 0.0f;
      any = any || stored;
    }
    return any;
  }
};

template <typename V, int bits, int group_size>
struct NmTiles {
  const device uint* values; // V, or w_q when bits > 0
  const device V* scales;
  const device V* biases;
  const device uint* codes;
  int K;
  int keep; // n
  int m;

  float value(int row, int j, int kc) const {
    if constexpr (bits == 0) {
      return float(((const device V*)values)[int64_t(row) * kc + j]);
    } else {
      const uint word = values[int64_t(row) * (kc * bits / 32) + j * bits / 32];
      const float q = float((word >> (j * bits % 32)) & ((1u << bits) - 1u));
      const int64_t g = int64_t(row) * (kc / group_size) + j / group_size;
      return fma(float(scales[g]), q, float(biases[g]));
    }
  }

  // col is a multiple of 8: the 8 columns are 8 / m whole groups of m.
  bool expand8(int row, int col, threadgroup float* dst) {
    const int code_bits = m == 8 ? 4 : 2;
    const int kc = K / m * keep;
    const device uint* row_codes = codes + int64_t(row) * ((kc * code_bits + 31) / 32);
#pragma clang loop unroll(full)
    for (int t = 0; t < 8; ++t) {
      dst[t] = 0.0f;
    }
    for (int g = col / m; g < (col + 8) / m && g * m < K; ++g) {
      for (int t = 0; t < keep; ++t) {
        const int j = g * keep + t;
        const uint code = (row_codes[j * code_bits / 32] >> (j * code_bits % 32)) & uint(m - 1);
        dst[g * m - col + int(code)] = value(row, j, kc);
      }
    }
    return true;
  }
};

// The reader of each format from the kernel's buffers.
template <typename Tiles>
struct MakeTiles;

template <typename V, typename I>
struct MakeTiles<CsrTiles<V, I>> {
  static CsrTiles<V, I> make(const device uchar* values, const device V*, const device V*,
      const device uchar* pattern, const device int* row_ptr, constant SpmmShape& shape) {
    return {(const device V*)values, (const device I*)pattern, row_ptr, shape.K};
  }
};

template <typename V>
struct MakeTiles<BitmaskTiles<V>> {
  static BitmaskTiles<V> make(const device uchar* values, const device V*, const device V*,
      const device uchar* pattern, const device int* row_ptr, constant SpmmShape& shape) {
    return {(const device V*)values, (const device uint*)pattern, row_ptr, shape.K};
  }
};

template <typename V>
struct MakeTiles<BsrTiles<V>> {
  static BsrTiles<V> make(const device uchar* values, const device V*, const device V*,
      const device uchar* pattern, const device int* row_ptr, constant SpmmShape& shape) {
    return {(const device V*)values, (const device int*)pattern, row_ptr, shape.K, shape.block_n,
        shape.block_k};
  }
};

template <typename V, int bits, int group_size>
struct MakeTiles<NmTiles<V, bits, group_size>> {
  static NmTiles<V, bits, group_size> make(const device uchar* values, const device V* scales,
      const device V* biases, const device uchar* pattern, const device int*,
      constant SpmmShape& shape) {
    return {(const device uint*)values, scales, biases, (const device uint*)pattern, shape.K,
        shape.n, shape.m};
  }
};

// ---- sp_mm_t / sp_mm_n --------------------------------------------------------------------
//
// sp_mm_t (transpose): out (M, N) = x (M, K) W^T, M > 8 (prefill).
// sp_mm_n: out (M, K) = g (M, N) W, the x-gradient, any M.
// A threadgroup computes a 32x32 tile of out over the reduction in steps of
// 32; per step the activation tile and the W tile are expanded as float into
// threadgroup memory (2 x 32 x 36 floats = 9 KiB, padded rows), by the
// format's reader.
//   thread:      per step, 8 activations and 8 elements of one row of W (4
//                threads per tile row);
//   simdgroup:   a 16x16 block of the tile: 2x2 float 8x8 accumulators, 4
//                simdgroup MMAs per 8 of the reduction; skipped, for the
//                whole threadgroup, when the W tile holds no stored value
//                (BSR's empty blocks; a flag in threadgroup memory);
//   threadgroup: 4 simdgroups (2x2); grid (ceil(out columns / 32), ceil(M / 32)).
// The W tile is (n, k) for sp_mm_t, read transposed by the MMA, and (n, k)
// for sp_mm_n, where n is the reduction. Rows of x past M, and of W past its
// N, are clamped to the last row (read, never stored; for sp_mm_n the
// activations past N are zero). Reads per stored value: sp_mm_t reads each
// once per 32 rows of x (Bitmask: plus 1/8 byte of mask per element; CSR and
// BSR: a binary search per 8 columns); sp_mm_n likewise per 32 rows of g,
// Bitmask also re-counting the words before the tile (O(K / 32) per row).

template <typename T, typename V, typename Tiles, bool transpose>
[[kernel]] void sp_mm(
    const device uchar* values [[buffer(SPMM_BUFFER_VALUES)]],
    const device V* scales [[buffer(SPMM_BUFFER_SCALES)]],
    const device V* biases [[buffer(SPMM_BUFFER_BIASES)]],
    const device uchar* pattern [[buffer(SPMM_BUFFER_PATTERN)]],
    const device int* row_ptr [[buffer(SPMM_BUFFER_ROW_PTR)]],
    const device T* x [[buffer(SPMM_BUFFER_X)]],
    device T* out [[buffer(SPMM_BUFFER_OUT)]],
    const device T* bias [[buffer(SPMM_BUFFER_BIAS), function_constant(spmm_has_bias)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int tile = 32;
  constexpr int ld = tile + 4;
  threadgroup float x_tile[tile * ld];
  threadgroup float w_tile[tile * ld];
  threadgroup int stored[2]; // per step parity: does the W tile hold a value?

  const int M = shape.M;
  const int N = shape.N;
  const int K = shape.K;
  const int cols = transpose ? N : K; // of out
  const int depth = transpose ? K : N; // the reduction
  const int m0 = tgid.y * tile;
  const int o0 = tgid.x * tile;
  Tiles tiles = MakeTiles<Tiles>::make(values, scales, biases, pattern, row_ptr, shape);

  const int lr = tid / 4;
  const int lc = tid % 4 * 8;
  const device T* x_row = x + int64_t(min(m0 + lr, M - 1)) * depth + lc;

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
  if (tid == 0) {
    stored[0] = 0;
    stored[1] = 0;
  }

  int parity = 0;
  for (int k0 = 0; k0 < depth; k0 += tile) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma clang loop unroll(full)
    for (int j = 0; j < 8; ++j) {
      x_tile[lr * ld + lc + j] = k0 + lc + j < depth ? float(x_row[k0 + j]) : 0.0f;
    }
    const int w_row = transpose ? min(o0 + lr, N - 1) : min(k0 + lr, N - 1);
    const int w_col = (transpose ? k0 : o0) + lc;
    bool any = false;
    if (w_col < K) {
      any = tiles.expand8(w_row, w_col, w_tile + lr * ld + lc);
    } else {
#pragma clang loop unroll(full)
      for (int j = 0; j < 8; ++j) {
        w_tile[lr * ld + lc + j] = 0.0f;
      }
    }
    if (any) {
      stored[parity] = 1; // every writer writes the same value
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    if (stored[parity] != 0) {
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
    // The other parity's flag was last read before this step's first
    // barrier and is next written after the next step's: clear it between.
    if (tid == 0) {
      stored[1 - parity] = 0;
    }
    parity = 1 - parity;
  }

  const short2 coord = mlx_ext::simdgroup_matrix_coord(lane);
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
    const int mm = m0 + 16 * sm + 8 * i + coord.y;
#pragma clang loop unroll(full)
    for (int j = 0; j < 2; ++j) {
#pragma clang loop unroll(full)
      for (int e = 0; e < 2; ++e) {
        const int o = o0 + 16 * sn + 8 * j + coord.x + e;
        if (mm < M && o < cols) {
          const float b = spmm_has_bias ? float(bias[o]) : 0.0f;
          out[int64_t(mm) * cols + o] = T(acc[i][j].thread_elements()[e] + b);
        }
      }
    }
  }
}

// ---- sp_sampled_<format> ---------------------------------------------------------------------
//
// dvalues[j] = sum_m g[m, row_j] x[m, col_j] for every stored value j (float
// values only). Grid (ceil(N / 4), 1), 128 threads.
//   thread:      stored values of its row as the decode kernels walk them
//                (CSR, N:M: j = lane, lane + 32, ...; BSR: elements of the
//                block row; Bitmask: 16 columns of each 512), each a dot
//                product over the M rows of g and x, written once;
//   simdgroup:   row n of W;
//   threadgroup: 4 rows of W.
// Reads per stored value: its pattern once, 2 M floats of g and x.
// Threadgroup memory: none.

inline float sampled_dot(const device float* g, const device float* x, int M, int N, int K,
    int row, int col) {
  float s = 0.0f;
  for (int i = 0; i < M; ++i) {
    s += g[int64_t(i) * N + row] * x[int64_t(i) * K + col];
  }
  return s;
}

template <typename V, int format, typename I>
[[kernel]] void sp_sampled(
    const device uchar* pattern [[buffer(SPMM_BUFFER_PATTERN)]],
    const device int* row_ptr [[buffer(SPMM_BUFFER_ROW_PTR)]],
    const device float* x [[buffer(SPMM_BUFFER_X)]],
    device V* dvalues [[buffer(SPMM_BUFFER_OUT)]],
    constant SpmmShape& shape [[buffer(SPMM_BUFFER_SHAPE)]],
    const device float* g [[buffer(SPMM_BUFFER_G)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const int M = shape.M;
  const int N = shape.N;
  const int K = shape.K;
  const int n = int(tgid.x) * kMvSimdgroups + sg;
  if (n >= N) {
    return; // the whole simdgroup; no barrier follows
  }
  if (format == 0) { // csr
    const device I* cols = (const device I*)pattern;
    for (int j = row_ptr[n] + lane; j < row_ptr[n + 1]; j += 32) {
      dvalues[j] = V(sampled_dot(g, x, M, N, K, n, int(cols[j])));
    }
  } else if (format == 1) { // bitmask
    const device uint* mask = (const device uint*)pattern;
    const int words = (K + 31) / 32;
    int base = row_ptr[n];
    for (int k0 = 0; k0 < K; k0 += kMvChunk) {
      const int word = k0 / 32 + lane / 2;
      uint bits = word < words ? (mask[int64_t(n) * words + word] >> (16 * (lane % 2))) & 0xFFFFu : 0u;
      const int count = popcount(bits);
      int j = base + simd_prefix_exclusive_sum(count);
      base += simd_sum(count);
      while (bits != 0) {
        dvalues[j++] = V(sampled_dot(g, x, M, N, K, n, k0 + 16 * lane + ctz(bits)));
        bits &= bits - 1;
      }
    }
  } else if (format == 2) { // bsr
    const device int* block_cols = (const device int*)pattern;
    const int bn = shape.block_n;
    const int bk = shape.block_k;
    const int start = row_ptr[n / bn];
    const int elements = (row_ptr[n / bn + 1] - start) * bk;
    for (int e = lane; e < elements; e += 32) {
      const int b = start + e / bk;
      const int c = e % bk;
      dvalues[(int64_t(b) * bn + n % bn) * bk + c] =
          V(sampled_dot(g, x, M, N, K, n, block_cols[b] * bk + c));
    }
  } else { // nm
    const device uint* codes = (const device uint*)pattern;
    const int keep = shape.n;
    const int m = shape.m;
    const int code_bits = m == 8 ? 4 : 2;
    const int kc = K / m * keep;
    const device uint* row_codes = codes + int64_t(n) * ((kc * code_bits + 31) / 32);
    for (int j = lane; j < kc; j += 32) {
      const uint code = (row_codes[j * code_bits / 32] >> (j * code_bits % 32)) & uint(m - 1);
      dvalues[int64_t(n) * kc + j] = V(sampled_dot(g, x, M, N, K, n, j / keep * m + int(code)));
    }
  }
}

// ---- Instantiations -------------------------------------------------------------------------
//
// Host names sp_<kernel>_<format>_<T>_<V>, e.g. sp_mv_csr_u16_float16_float16,
// sp_mm_t_nm_b4_gs64_float32_bfloat16, sp_sampled_<format>_<V> and
// sp_split_fixup_<T>. Formats:
// csr_u16, csr_u32 (column index type), bitmask, bsr, nm (float values),
// nm_b<bits>_gs<group size> (quantized). (T, V): each dtype with itself, and
// float32 outputs of float16 / bfloat16 values.

#define instantiate_kernel(name, kernel, ...) \
  template [[host_name(name)]] [[kernel]] decltype(kernel<__VA_ARGS__>) kernel<__VA_ARGS__>;

#define instantiate_nmq(tn, vn, t, v, bits, gs)                                                   \
  instantiate_kernel("sp_mv_nm_b" #bits "_gs" #gs "_" #tn "_" #vn, sp_mv_nm, t, v, bits, gs)      \
  instantiate_kernel("sp_mm_t_nm_b" #bits "_gs" #gs "_" #tn "_" #vn, sp_mm, t, v,                 \
      NmTiles<v, bits, gs>, true)                                                                 \
  instantiate_kernel("sp_mm_n_nm_b" #bits "_gs" #gs "_" #tn "_" #vn, sp_mm, t, v,                 \
      NmTiles<v, bits, gs>, false)

#define instantiate_pair(tn, vn, t, v)                                                              \
  instantiate_kernel("sp_mv_csr_u16_" #tn "_" #vn, sp_mv_csr, t, v, ushort)                         \
  instantiate_kernel("sp_mv_csr_u32_" #tn "_" #vn, sp_mv_csr, t, v, uint)                           \
  instantiate_kernel("sp_mv_split_csr_u16_" #tn "_" #vn, sp_mv_split_csr, t, v, ushort)             \
  instantiate_kernel("sp_mv_split_csr_u32_" #tn "_" #vn, sp_mv_split_csr, t, v, uint)               \
  instantiate_kernel("sp_mv_bitmask_" #tn "_" #vn, sp_mv_bitmask, t, v)                             \
  instantiate_kernel("sp_mv_bsr_" #tn "_" #vn, sp_mv_bsr, t, v)                                     \
  instantiate_kernel("sp_mv_nm_" #tn "_" #vn, sp_mv_nm, t, v, 0, 32)                                \
  instantiate_kernel("sp_mm_t_bitmask_" #tn "_" #vn, sp_mm, t, v, BitmaskTiles<v>, true)            \
  instantiate_kernel("sp_mm_t_bsr_" #tn "_" #vn, sp_mm, t, v, BsrTiles<v>, true)                    \
  instantiate_kernel("sp_mm_t_nm_" #tn "_" #vn, sp_mm, t, v, NmTiles<v, 0, 32>, true) \
  instantiate_kernel("sp_mm_n_csr_u16_" #tn "_" #vn, sp_mm, t, v, CsrTiles<v, ushort>, false) \
  instantiate_kernel("sp_mm_n_csr_u32_" #tn "_" #vn, sp_mm, t, v, CsrTiles<v, uint>, false)   \
  instantiate_kernel("sp_mm_n_bitmask_" #tn "_" #vn, sp_mm, t, v, BitmaskTiles<v>, false)           \
  instantiate_kernel("sp_mm_n_bsr_" #tn "_" #vn, sp_mm, t, v, BsrTiles<v>, false)                   \
  instantiate_kernel("sp_mm_n_nm_" #tn "_" #vn, sp_mm, t, v, NmTiles<v, 0, 32>, false) \
  instantiate_nmq(tn, vn, t, v, 4, 32)                                                              \
  instantiate_nmq(tn, vn, t, v, 4, 64)                                                              \
  instantiate_nmq(tn, vn, t, v, 4, 128)                                                             \
  instantiate_nmq(tn, vn, t, v, 8, 32)                                                              \
  instantiate_nmq(tn, vn, t, v, 8, 64)                                                              \
  instantiate_nmq(tn, vn, t, v, 8, 128)


instantiate_pair(float32, float32, float, float)
instantiate_pair(float16, float16, half, half)
instantiate_pair(bfloat16, bfloat16, bfloat, bfloat)
instantiate_pair(float32, float16, float, half)
instantiate_pair(float32, bfloat16, float, bfloat)

#define instantiate_sampled(vn, v)                                                 \
  instantiate_kernel("sp_sampled_csr_u16_" #vn, sp_sampled, v, 0, ushort)          \
  instantiate_kernel("sp_sampled_csr_u32_" #vn, sp_sampled, v, 0, uint)            \
  instantiate_kernel("sp_sampled_bitmask_" #vn, sp_sampled, v, 1, uint)            \
  instantiate_kernel("sp_sampled_bsr_" #vn, sp_sampled, v, 2, uint)                \
  instantiate_kernel("sp_sampled_nm_" #vn, sp_sampled, v, 3, uint)

instantiate_kernel("sp_split_fixup_float32", sp_split_fixup, float)
instantiate_kernel("sp_split_fixup_float16", sp_split_fixup, half)
instantiate_kernel("sp_split_fixup_bfloat16", sp_split_fixup, bfloat)

instantiate_sampled(float32, float)
instantiate_sampled(float16, half)
instantiate_sampled(bfloat16, bfloat)
