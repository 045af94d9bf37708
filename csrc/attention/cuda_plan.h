// Which CUDA kernels run an attention call, on what grids: the choice
// cuda.cpp's eval_gpu makes, as plain C++ (no MLX or CUDA types) so that
// tests/test_attention_cuda_plan.py checks it on machines without a GPU.
// cuda.cpp fills the kernels' parameters (cuda_params.h) and launches what
// the plan says.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "attention/cuda_params.h"
#include "common/cuda/kernel_launch.h"
#include "common/math.h"

namespace mlx_ext::cuda::attn_plan {

// mma.sync with bfloat16 and cp.async: the kernels need Ampere or newer.
constexpr int kMinComputeCapability = 8;
// The tensor-core prefill takes 64 query rows of one head per block: it takes
// over from the decode kernels (attn_dec: 16 rows of one kv head per block;
// attn_vec: VEC_ROWS), whose blocks share each K/V load among a kv head's
// query heads, from this many queries on.
constexpr int kMmaMinL = 16;
// attn_vec: when (batch, kv head, row block) units give fewer blocks than
// this, the keys are cut into chunks (each at least kMinChunk keys, a
// multiple of the block's keys per step) until about this many blocks run:
// enough for every SM of an H100/H200 (132) to hold several, so that one
// query row reads K/V at the memory's rate.
constexpr int64_t kFillBlocks = 1024;
constexpr int kMinChunk = 64;
// attn_dec (the tensor-core decode): chunks until about this many blocks
// run, one wave of two blocks per SM of an H100/H200 (132 SMs): each block
// streams its chunk through its warps' cp.async stages, so more, shorter
// blocks only add start-up and merge work. Chunks of at least
// DEC_KEYS_PER_ROUND keys.
constexpr int64_t kDecFillBlocks = 264;
// At most this many chunks (grid.y, and the partials' scratch: chunks x rows
// x (D + 2) floats).
constexpr int kMaxChunks = kMaxMergeChunks;

struct Problem {
  int B, Hq, Hkv, L, S, D;
  int bits; // 0: float K/V
  std::string dtype; // of q (and out, float K/V, scales), as common/kernel_names.h spells it
  int group_size = 64; // quantized K/V
  // Quantized K/V: codes 16-byte and scales / biases 4-byte aligned, as
  // attn_dec_q's cp.async copies them (MLX's buffers are; a view may not be).
  bool kv_aligned = true;
};

struct Gpu {
  int cc_major, cc_minor; // compute capability
  // Dynamic shared memory a block may opt in to (an H100/H200's by default;
  // cuda.cpp reads the device's): attn_dec needs up to 160 KB, more than
  // sm_86 / sm_89 / sm_120 GPUs give (99 KB).
  int smem_optin = 227 * 1024;
};

enum class Path {
  mma, // attn_mma: one kernel writes out and lse
  vec, // attn_vec over key chunks, then attn_merge
  dec, // attn_dec (tensor cores) over key chunks, then attn_merge
};

struct Plan {
  Path path;
  KernelLaunch main;
  KernelLaunch merge; // vec and dec
  int chunks = 1, chunk_len = 0; // vec and dec: AttnParams::chunks, chunk_len
  int64_t partial_floats = 0; // vec and dec: the partials' scratch, part_acc then part_ml
};

// The head dims of the tensor-core kernel's instances (attn_mma.cu).
inline bool mma_head_dim(int D) { return D == 64 || D == 96 || D == 128 || D == 192 || D == 256; }

inline bool mma_applies(const Problem& p, const Gpu& gpu) {
  return gpu.cc_major >= kMinComputeCapability && p.bits == 0 && p.dtype != "float32" &&
      mma_head_dim(p.D) && p.L >= kMmaMinL;
}

// The tensor-core decode (attn_dec_mma.cu): 16-bit q, its head dims; every
// mask kind, sinks, kv_lengths, windows and sliced caches as attn_vec.
// 16-bit K/V, or 8- / 4-bit codes whose groups come in pairs (scales copied
// 4 bytes at a time) and cover whole column blocks of P V (32 values of D
// for 8-bit codes, 64 for 4-bit ones), aligned. float32 and the other
// quantized layouts stay on attn_vec.
inline bool dec_head_dim(int D) { return D == 64 || D == 128 || D == 256; }
// attn_dec_q reads groups of 32 (8-bit) and 128 too, but only group size 64
// (mlx-lm's QuantizedKVCache default) has been checked on a GPU so far
// (bench/cuda/attention.cu checks the others when built with this set).
#ifndef MLX_EXT_DEC_Q_ALL_GROUPS
#define MLX_EXT_DEC_Q_ALL_GROUPS 0
#endif

inline bool dec_quantized_layout(const Problem& p) {
  if (p.bits == 0) return true;
  if (p.bits != 8 && p.bits != 4) return false;
  const int gs = p.group_size;
  return (gs == 64 || (MLX_EXT_DEC_Q_ALL_GROUPS && (gs == 32 || gs == 128))) && p.D % gs == 0 && (p.D / gs) % 2 == 0 &&
      gs >= (p.bits == 8 ? 32 : 64) && p.kv_aligned;
}

inline int dec_smem(const Problem& p) { return p.bits ? dec_q_smem_bytes(p.D, p.bits) : dec_smem_bytes(p.D); }

inline bool dec_applies(const Problem& p, const Gpu& gpu) {
  return gpu.cc_major >= kMinComputeCapability && p.dtype != "float32" && dec_head_dim(p.D) && p.L < kMmaMinL &&
      dec_quantized_layout(p) && dec_smem(p) <= gpu.smem_optin;
}

// Keys per chunk of a split-K kernel that takes `units` (batch, kv head, row
// block) blocks per chunk and chunk lengths in multiples of `step`: chunks
// until about `fill` blocks run, each at least `min_chunk` keys, at most
// kMaxChunks chunks.
inline int64_t chunk_keys(int64_t S, int64_t units, int step, int64_t fill, int min_chunk) {
  int64_t chunk_len = round_up(S, step);
  if (units < fill) {
    const int64_t wanted = ceil_div(fill, units);
    chunk_len = std::max<int64_t>(round_up(min_chunk, step), round_up(ceil_div(S, wanted), step));
  }
  return std::max<int64_t>(chunk_len, round_up(ceil_div(S, kMaxChunks), step));
}

// dec_fill: the blocks attn_dec aims for (bench/cuda/attention.cu times others).
inline Plan plan_forward(const Problem& p, const Gpu& gpu, int64_t dec_fill = kDecFillBlocks) {
  Plan plan;
  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  const int64_t S = std::max(p.S, 1);
  if (dec_applies(p, gpu)) {
    plan.path = Path::dec;
    const int64_t row_blocks = ceil_div(int64_t(p.Hq / p.Hkv) * p.L, DEC_ROWS);
    const int64_t chunk_len =
        chunk_keys(S, row_blocks * p.B * p.Hkv, DEC_KEYS_PER_ROUND, dec_fill, DEC_KEYS_PER_ROUND);
    plan.chunks = int(ceil_div(S, chunk_len));
    plan.chunk_len = int(chunk_len);
    plan.partial_floats = plan.chunks * rows * (p.D + 2);
    plan.main = {"attn_dec_" + p.dtype + "_b" + std::to_string(p.bits) + "_d" + std::to_string(p.D),
        {row_blocks, plan.chunks, int64_t(p.B) * p.Hkv}, DEC_THREADS, dec_smem(p)};
    plan.merge = {"attn_merge_" + p.dtype, {rows, 1, 1}, MERGE_THREADS, 0};
    return plan;
  }
  if (mma_applies(p, gpu)) {
    plan.path = Path::mma;
    plan.main = {"attn_mma_" + p.dtype + "_d" + std::to_string(p.D),
        {ceil_div(p.L, MMA_BM), int64_t(p.B) * p.Hq, 1}, MMA_THREADS, mma_smem_bytes(p.D)};
    return plan;
  }
  plan.path = Path::vec;
  const int dmax = vec_dmax(p.D);
  const int step = vec_keys_per_step(dmax, p.bits);
  const int64_t row_blocks = ceil_div(int64_t(p.Hq / p.Hkv) * p.L, VEC_ROWS);
  const int64_t chunk_len = chunk_keys(S, row_blocks * p.B * p.Hkv, step, kFillBlocks, kMinChunk);
  plan.chunks = int(ceil_div(S, chunk_len));
  plan.chunk_len = int(chunk_len);
  plan.partial_floats = plan.chunks * rows * (p.D + 2);
  plan.main = {"attn_vec_" + p.dtype + "_b" + std::to_string(p.bits) + "_d" + std::to_string(dmax),
      {row_blocks, plan.chunks, int64_t(p.B) * p.Hkv}, VEC_THREADS, 0};
  plan.merge = {"attn_merge_" + p.dtype, {rows, 1, 1}, MERGE_THREADS, 0};
  return plan;
}

// The backward: dq over row blocks (float or quantized K/V), then dk and dv
// over key blocks (float K/V only; empty kernel name otherwise).
struct BackwardPlan {
  KernelLaunch dq, dkv;
};

inline BackwardPlan plan_backward(const Problem& p) {
  BackwardPlan plan;
  const int dmax = vec_dmax(p.D);
  const std::string d = "_d" + std::to_string(dmax);
  const int64_t row_blocks = ceil_div(int64_t(p.Hq / p.Hkv) * p.L, BWD_ROWS);
  plan.dq = {"attn_bwd_dq_" + p.dtype + "_b" + std::to_string(p.bits) + d,
      {row_blocks, 1, int64_t(p.B) * p.Hkv}, BWD_THREADS, 0};
  if (p.bits == 0) {
    const int keys_per_block = BWD_WARPS * (32 / (dmax / 8));
    plan.dkv = {"attn_bwd_dkv_" + p.dtype + d, {ceil_div(p.S, keys_per_block), 1, int64_t(p.B) * p.Hkv},
        BWD_THREADS, 0};
  }
  return plan;
}

} // namespace mlx_ext::cuda::attn_plan
