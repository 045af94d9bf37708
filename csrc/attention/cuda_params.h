// The one argument of every CUDA kernel of the attention, filled by cuda.cpp
// (host, g++) and read by the kernels (attn_*.cu, nvcc): plain C++ only, no
// MLX or CUDA types, so both compilers see the same layout. The meaning of
// each field is the CPU's (cpu_kernels.h, AttentionArgs).
#pragma once

#include <cstdint>

#include "common/math.h"

namespace mlx_ext::cuda {

// One array of K or V (values, codes, scales or biases) whose rows are
// contiguous within each (batch, kv head), as a slice [..., :S, :] of a
// preallocated cache is: row j of (b, h) is row b * batch_stride + h *
// head_stride + j. Strides in rows; 0 on a broadcast dim.
struct AttnRows {
  const void* data;
  int64_t batch_stride, head_stride;
};

// K or V: float values (D per row, q's type), or packed codes (uint32 words,
// D * bits / 32 per row, MLX's little-endian affine layout) with scales and
// biases (D / group_size per row, q's type).
struct AttnKv {
  AttnRows x, scales, biases;
};

struct AttnParams {
  const void* q; // (B, Hq, L, D), contiguous, type T
  AttnKv k, v;
  // bool (one byte) or float32 additive mask (Bm, Hm, Lm, Sm), read at b *
  // mask_strides[0] + h * [1] + i * [2] + j * [3] (element strides, 0 on
  // broadcast dims); nullptr when none.
  const void* mask;
  int mask_is_bool;
  int64_t mask_strides[4];
  const float* sinks; // (Hq,) or nullptr
  const int32_t* kv_lengths; // (B,) or nullptr; each clamped to [0, S]
  void* out; // (B, Hq, L, D), type T
  float* lse; // (B, Hq, L), natural log, sinks included; -inf for a row that sees nothing
  // Split-K forward (attn_vec): chunk c of the keys writes, per row (b, h, i),
  // the max m and sum l of exp2 of its base-2 logits and acc = sum exp2(s - m)
  // v (D floats) to part_ml (chunks, rows, 2) and part_acc (chunks, rows, D),
  // one scratch buffer, part_acc first (16-byte aligned rows for attn_merge);
  // attn_merge combines the chunks and the sinks into out and lse.
  float* part_ml;
  float* part_acc;
  int chunks, chunk_len;
  // Backward (attn_bwd_*): lse and delta (B, Hq, L) float32, d_out (B, Hq,
  // L, D) type T; dq (B, Hq, L, D) and dk, dv (B, Hkv, S, D), type T,
  // contiguous (dk, dv nullptr for quantized K/V).
  const float* bwd_lse;
  const float* delta;
  const void* d_out;
  void* dq;
  void* dk;
  void* dv;
  int B, Hq, Hkv, L, S, D;
  float scale;
  int causal; // lower-right aligned to each sequence's key length
  int window; // 0: none
  int bits; // 0: float K/V
  int group_size;
};

// attn_vec (attn_vec.cu): rows of one kv head (its G = Hq / Hkv query heads
// times L queries) in blocks of VEC_ROWS, VEC_WARPS warps per block; each lane
// owns VEC_PIECES pieces of 8 consecutive values of D (pieces past D idle), so
// a key takes dmax / (8 VEC_PIECES) lanes and a warp reads 32 / that many keys
// at once, VEC_UNROLL (float) or VEC_UNROLL_Q (quantized) times per step.
#ifndef MLX_EXT_VEC_PIECES
#define MLX_EXT_VEC_PIECES 2
#endif
constexpr int VEC_ROWS = 4;
constexpr int VEC_WARPS = 4;
constexpr int VEC_THREADS = VEC_WARPS * 32;
constexpr int VEC_PIECES = MLX_EXT_VEC_PIECES; // pieces of 8 values of D per lane
constexpr int VEC_UNROLL = 4 / VEC_PIECES;
constexpr int VEC_UNROLL_Q = 8 / VEC_PIECES;
constexpr MLX_EXT_HOST_DEVICE int vec_dmax(int D) { return D <= 64 ? 64 : D <= 128 ? 128 : 256; }
constexpr MLX_EXT_HOST_DEVICE int vec_unroll(int bits) { return bits ? VEC_UNROLL_Q : VEC_UNROLL; }
// Lanes per key: each takes VEC_PIECES pieces of 8 values.
constexpr MLX_EXT_HOST_DEVICE int vec_lanes_per_key(int dmax) { return dmax / (8 * VEC_PIECES); }
// Keys one block consumes per step: a chunk's length is a multiple of it.
constexpr MLX_EXT_HOST_DEVICE int vec_keys_per_step(int dmax, int bits) {
  return VEC_WARPS * (32 / vec_lanes_per_key(dmax)) * vec_unroll(bits);
}
// attn_merge: one block of MERGE_THREADS per row, at most kMaxMergeChunks chunks.
constexpr int MERGE_THREADS = 128;
constexpr int kMaxMergeChunks = 1024;

// attn_mma (attn_mma.cu, mma.sync m16n8k16): MMA_BM query rows of one query
// head per block (MMA_WARPS warps of 16 rows), key tiles of mma_bn(D) keys,
// Q and two stages of K and V in shared memory, rows padded by 16 bytes.
constexpr int MMA_WARPS = 4;
constexpr int MMA_THREADS = MMA_WARPS * 32;
constexpr int MMA_BM = MMA_WARPS * 16;
constexpr MLX_EXT_HOST_DEVICE int mma_bn(int D) { return D <= 128 ? 64 : 32; }
constexpr MLX_EXT_HOST_DEVICE int mma_row_bytes(int D) { return D * 2 + 16; }
constexpr MLX_EXT_HOST_DEVICE int mma_smem_bytes(int D) {
  return (MMA_BM + 4 * mma_bn(D)) * mma_row_bytes(D);
}

// attn_dec (attn_dec_mma.cu, mma.sync m16n8k16 decode): DEC_ROWS rows of one
// kv head per block (the mma's 16 rows: G query heads x L queries), DEC_WARPS
// warps each streaming its own key tiles of DEC_KEYS keys through
// dec_stages(D) shared-memory stages of K and V (rows padded by 16 bytes),
// after Q's DEC_ROWS rows. Two blocks of D = 128 fit an SM (2 x 106 KB).
#ifndef MLX_EXT_DEC_STAGES
#define MLX_EXT_DEC_STAGES 3
#endif
constexpr int DEC_ROWS = 16;
constexpr int DEC_KEYS = 16;
constexpr int DEC_WARPS = 4;
constexpr int DEC_THREADS = DEC_WARPS * 32;
constexpr MLX_EXT_HOST_DEVICE int dec_row_bytes(int D) { return D * 2 + 16; }
constexpr MLX_EXT_HOST_DEVICE int dec_stages(int D) { return D <= 128 ? MLX_EXT_DEC_STAGES : 2; }
constexpr MLX_EXT_HOST_DEVICE int dec_smem_bytes(int D) {
  return (DEC_ROWS + DEC_WARPS * dec_stages(D) * 2 * DEC_KEYS) * dec_row_bytes(D);
}
// Keys a block's warps take per round: a chunk's length is a multiple of it.
constexpr int DEC_KEYS_PER_ROUND = DEC_WARPS * DEC_KEYS;
// Quantized K/V (attn_dec_q): a stage holds the tile's K and V codes (rows
// of D * bits / 8 bytes padded by 16) and their scales and biases (D bytes
// each: DEC_KEYS keys x at most D / 32 groups of 16-bit values); 4 stages.
constexpr int DEC_Q_STAGES = 4;
constexpr MLX_EXT_HOST_DEVICE int dec_q_code_row_bytes(int D, int bits) { return D * bits / 8 + 16; }
constexpr MLX_EXT_HOST_DEVICE int dec_q_stage_bytes(int D, int bits) {
  return 2 * DEC_KEYS * dec_q_code_row_bytes(D, bits) + 4 * D;
}
constexpr MLX_EXT_HOST_DEVICE int dec_q_smem_bytes(int D, int bits) {
  return DEC_ROWS * dec_row_bytes(D) + DEC_WARPS * DEC_Q_STAGES * dec_q_stage_bytes(D, bits);
}

// The backward on CUDA cores (attn_bwd.cu): the vec kernel's lane layout;
// dq over blocks of BWD_ROWS rows, dk / dv over blocks of BWD_KEYS keys of
// one kv head (float K/V only).
constexpr int BWD_ROWS = 4;
constexpr int BWD_KEYS = 4;
constexpr int BWD_WARPS = 4;
constexpr int BWD_THREADS = BWD_WARPS * 32;

} // namespace mlx_ext::cuda
