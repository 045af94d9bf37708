// The tensor-core GEMV's per-word steps (qmv_tc.cu's header comment says the
// fragment layout): dequantizing one 32-bit word of two W rows straight into
// mma.sync A fragments, and the mma steps of that word against x permuted
// alike. Shared with gather_qmm's tensor-core kernels (gather_qmm/gather_tc.cu),
// which run the same inner loop over gathered rows (nvcc only).
#pragma once

#include "common/cuda/affine.cuh"

namespace mlx_ext::cuda {

// Spans of loads in flight per lane (U), the fastest measured on an H200
// (bench/cuda/quantized_matmul.cu): 2 for 4 bits (64 bytes of W: 12.5 us at
// 14336 x 4096, 13.2 with 8 spans, whose 128 registers halve the warps).
constexpr __host__ __device__ int qmv_tc_spans(int bits) { return bits == 8 ? 4 : 2; }

// The A fragments of the STEPS = V / 4 mma steps of word c of a lane's
// chunks: wa of row g, wb of row g + 8; sb = scale | bias << 16 of each row.
template <typename T, int BITS>
__device__ __forceinline__ void qmv_tc_dequant_word(uint32_t (&a)[8 / BITS][4], uint32_t wa,
                                                    uint32_t wb, uint32_t sb_a, uint32_t sb_b, uint32_t magic) {
  constexpr int V = 32 / BITS;
  constexpr uint32_t PAIR_MASK = ((1u << BITS) - 1) * 0x10001u;  // value j and j + V / 2 of a word
  const uint32_t sa = (sb_a & 0xffffu) * 0x10001u, ba = (sb_a >> 16) * 0x10001u;
  const uint32_t sb = (sb_b & 0xffffu) * 0x10001u, bb = (sb_b >> 16) * 0x10001u;
#pragma unroll
  for (int st = 0; st < V / 4; ++st)  // mma steps of this word: pairs 2 st, 2 st + 1
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = 2 * st + e;  // pair j: values j and j + V / 2
      a[st][2 * e] = dequant_pair<T, BITS>((wa >> (BITS * j)) & PAIR_MASK, sa, ba, magic);
      a[st][2 * e + 1] = dequant_pair<T, BITS>((wb >> (BITS * j)) & PAIR_MASK, sb, bb, magic);
    }
}

// d += the mma steps of one word: A fragments a, x values xc (V / 2 words of
// (2i, 2i + 1) pairs) permuted into B alike.
template <typename T, int BITS>
__device__ __forceinline__ void qmv_tc_mma_word(float (&d)[4], const uint32_t (&a)[8 / BITS][4],
                                                const uint32_t* xc) {
  constexpr int V = 32 / BITS;
#pragma unroll
  for (int st = 0; st < V / 4; ++st) {
    uint32_t b[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = 2 * st + e;
      b[e] = __byte_perm(xc[j / 2], xc[(j + V / 2) / 2], j % 2 ? 0x7632 : 0x5410);
    }
    mma_m16n8k16<T>(d, a[st], b[0], b[1], d);
  }
}

} // namespace mlx_ext::cuda
