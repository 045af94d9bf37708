// The interface between the CPU driver (cpu_driver.cpp: packing of x, the
// split of rows over threads, the transposed pattern) and the per-ISA kernels
// (cpu_kernels.cpp, compiled once per instruction set). Plain structs and
// function pointers only: no MLX or standard-library types cross it.
#pragma once

#include <cstdint>

#include "common/cpu/float_type.h"
#include "common/cpu/isa.h"

namespace mlx_ext::cpu {

enum class SparseKind : int { csr = 0, bitmask = 1, bsr = 2, nm = 3 };

// One sparse W of shape (N, K), as sparse_matmul.h lays out each format.
struct SparseW {
  SparseKind kind;
  FloatType value_type; // of the values (or of scales and biases when bits > 0)
  const void* values; // csr data, bitmask values, bsr data, nm values or w_q
  const void* scales; // quantized nm only
  const void* biases;
  const void* pattern; // csr columns, bitmask mask words, bsr block columns, nm codes
  const int32_t* row_ptr; // csr indptr, bitmask row_ptr, bsr indptr (block rows)
  bool wide_columns; // csr: uint32 columns, else uint16
  int64_t N, K;
  int block_n, block_k; // bsr
  int n, m, code_bits; // nm
  int bits, group_size; // nm with quantized values (bits 4 or 8), else bits == 0
};

// x packed for the row kernels: `tiles` panels of `width` rows of x, each
// (K, width) floats, `xt[(t * K + k) * width + i] = x[t * width + i, k]`,
// zero past M. width == 1 is x itself, row after row.
struct XPanels {
  const float* xt;
  int64_t M, tiles;
  int width;
};

struct SparseOut {
  void* out; // (M, N), row-major
  FloatType type;
  const void* bias; // (N,) of `type`, or nullptr
};

// The register-tile prefill (cpu_kernels.cpp, "Prefill on register tiles")
// for one W and M rows of x: x packed in panels of `width` rows, every task's
// rows of W starting at a multiple of `row_align`, and `tasks_per_thread`
// tasks (0: the driver's default). width 0: the other paths.
struct TilePlan {
  int width, row_align, tasks_per_thread;
};

struct SparseKernelTable {
  // The widest panel the row kernel takes (vectors of accumulators per row of W).
  int panel_width;
  // The register-tile plan for W (asked when M is past the decode rows).
  TilePlan (*tile_plan)(const SparseW&, int64_t M);
  // out[:, r0:r1] for every tile of x: rows r0 .. r1 of W, each streamed once per tile.
  void (*matmul_rows)(const SparseW&, const XPanels&, const SparseOut&, int64_t r0, int64_t r1);
  // dvalues of the stored values in rows r0 .. r1: gt (N, M) and xt (K, M)
  // are g and x transposed, float32; dvalues is of w.value_type.
  void (*sampled_rows)(const SparseW&, const float* gt, const float* xt, int64_t M,
      void* dvalues, int64_t r0, int64_t r1);
  // W^T as float32 CSR with uint32 columns: col_ptr (K + 1), rows and values
  // (nnz) in row order within each column (a counting sort, one pass).
  void (*transpose)(const SparseW&, int32_t* col_ptr, uint32_t* rows, float* values);
};

// Defined in cpu_kernels.cpp, once per ISA compiled in.
MLX_EXT_PER_ISA(SparseKernelTable, sparse_matmul_kernels)

} // namespace mlx_ext::cpu
