// Runs one attention call on the CPU: cuts it into tasks over (batch, kv
// head, query block) and, when those are too few to occupy the threads
// (decode), over key chunks too, merged afterwards by log-sum-exp; and its
// backward. Free of
// MLX types so that native tests can drive the kernels of any ISA directly.
#pragma once

#include "attention/cpu_kernels.h"

namespace mlx_ext::cpu {

void run_attention(const AttentionKernels& kernels, const AttentionArgs& a);

// The fused backward: dq over the forward's query blocks, then (float K/V,
// g.dk set) dk and dv over key blocks.
void run_attention_backward(
    const AttentionBackwardKernels& kernels, int key_block, const AttentionArgs& a,
    const AttentionGrads& g);

} // namespace mlx_ext::cpu
