// The interface between the attention CPU driver (cpu_driver.cpp: task
// shapes, threads, the split of keys in decode) and the per-ISA kernels
// (cpu_kernels.cpp, compiled once per instruction set). Plain structs and
// function pointers only.
#pragma once

#include <cstdint>

#include "common/cpu/float_type.h"
#include "common/cpu/isa.h"

namespace mlx_ext::cpu {

// One array of K or V whose rows (one per key) are contiguous within each
// (batch, kv head), as in a slice [..., :S, :] of a preallocated cache: row j
// of (b, h) is row b * batch_stride + h * head_stride + j.
struct KvRows {
  const void* data;
  int64_t batch_stride, head_stride; // in rows
  int64_t at(int64_t b, int64_t h, int64_t j) const { return b * batch_stride + h * head_stride + j; }
};

// K or V: float values (D per row), or packed codes (uint32 words, D * bits /
// 32 per row) with scales and biases (D / group_size per row).
struct KvInput {
  KvRows x, scales, biases;
};

// One attention call. q, out (B, Hq, L, D), contiguous; K and V (B, Hkv, S,
// D); query head h reads kv head h / (Hq / Hkv).
struct AttentionArgs {
  const void* q;
  KvInput k, v;
  // bool (one byte per value) or float32 additive mask of shape (Bm, Hm, Lm,
  // Sm), read at b * mask_strides[0] + h * [1] + i * [2] + j * [3] (element
  // strides, 0 on broadcast dims); nullptr when none.
  const void* mask;
  bool mask_is_bool;
  int64_t mask_strides[4];
  const float* sinks; // (Hq,) or nullptr
  const int32_t* kv_lengths; // (B,) or nullptr; each clamped to [0, S]
  void* out; // (B, Hq, L, D), `type`
  float* lse; // (B, Hq, L): log-sum-exp of each row's logits (sinks included)
  FloatType type; // of q, out, float K/V, scales and biases
  int64_t B, Hq, Hkv, L, S, D;
  float scale;
  bool causal; // lower-right aligned to each sequence's key length
  int window; // 0: none
  int bits; // 0: float K/V
  int group_size;
};

// One forward task: query rows [l0, l1) of every query head of kv head
// `hkv` in batch `b`, against keys [s0, s1).
struct AttentionTask {
  int64_t b, hkv, l0, l1, s0, s1;
};

// Unnormalised partial results of one task over a key range, for the
// log-sum-exp merge: per row (b, h, l) the running max m, the sum of
// exp(logit - m) and the accumulator sum exp(logit - m) v (D floats).
struct AttentionPartials {
  float* m; // (chunks, B, Hq, L)
  float* l; // (chunks, B, Hq, L)
  float* acc; // (chunks, B, Hq, L, D)
  int64_t chunk; // which chunk this task writes
};

struct AttentionKernels {
  const char* isa;
  // Key block of the tiled loop; the driver's key chunks are multiples of it.
  int key_block;
  // The task's rows over its keys: normalised into out and lse when
  // `partials` is nullptr, else unnormalised into partials (sinks join chunk 0).
  void (*attend)(const AttentionArgs&, const AttentionTask&, const AttentionPartials* partials);
  // Rows [r0, r1) of the flattened (B, Hq, L): merges `chunks` partials into
  // out and lse.
  void (*merge)(const AttentionArgs&, const AttentionPartials&, int64_t chunks, int64_t r0,
      int64_t r1);
};

MLX_EXT_PER_ISA(AttentionKernels, attention_kernels)

// The gradients of one attention call, given the cotangent of out.
struct AttentionGrads {
  const void* d_out; // (B, Hq, L, D), the args' type
  const float* lse; // (B, Hq, L): the forward's log-sum-exp
  const float* delta; // (B, Hq, L): d_out . out of each row
  void* dq; // (B, Hq, L, D)
  void* dk; // (B, Hkv, S, D); float K/V only
  void* dv;
};

struct AttentionBackwardKernels {
  // dq of the task's rows, over all the keys they see.
  void (*dq)(const AttentionArgs&, const AttentionGrads&, const AttentionTask&);
  // dk and dv of keys [s0, s1) (at most key_block of them) of kv head `hkv`,
  // over all the query rows that see them; l0 and l1 are ignored.
  void (*dkv)(const AttentionArgs&, const AttentionGrads&, const AttentionTask&);
};

MLX_EXT_PER_ISA(AttentionBackwardKernels, attention_backward_kernels)

} // namespace mlx_ext::cpu
