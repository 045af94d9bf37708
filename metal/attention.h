// MSL helpers of metal/attention.metal: the function constants, reading a
// row of K or V (float or MLX-affine-quantized codes), which keys a query row
// sees, and the log-sum-exp rescale every kernel of the file uses.
#pragma once

#include <metal_stdlib>

#include "attention_bindings.h"

using namespace metal;

constant bool attn_mask_bool [[function_constant(ATTN_FC_MASK_BOOL)]];
constant bool attn_mask_additive [[function_constant(ATTN_FC_MASK_ADDITIVE)]];
constant bool attn_has_mask = attn_mask_bool || attn_mask_additive;
constant bool attn_has_sinks [[function_constant(ATTN_FC_HAS_SINKS)]];
constant bool attn_has_kv_lengths [[function_constant(ATTN_FC_HAS_KV_LENGTHS)]];

namespace mlx_ext {

// K or V of one call, of head dim `dim` (at most the kernel's D): `bits` 0
// reads rows of dim values of T; 4 or 8 reads rows of dim * bits / 32 uint32
// words, value d being code d (bits d * bits .. of the row's little-endian
// stream, the CPU's layout) times the scale plus the bias of group
// d / group_size. Row j of (b, h) is at b * *_bs + h * *_hs + j of each array
// (attention_bindings.h).
template <typename T, int D, int bits>
struct KvRows {
  const device uchar* x;
  const device T* scales;
  const device T* biases;
  int x_bs, x_hs, s_bs, s_hs, b_bs, b_hs;
  int dim;
  int group_size;

  float at(int b, int h, int j, int d) const {
    if (bits == 0) {
      const int64_t row = int64_t(b) * x_bs + int64_t(h) * x_hs + j;
      return float(((const device T*)x)[row * dim + d]);
    }
    const int words = dim * bits / 32;
    const int64_t row = int64_t(b) * x_bs + int64_t(h) * x_hs + j;
    const uint word = ((const device uint*)x)[row * words + d * bits / 32];
    const uint code = (word >> (d * bits % 32)) & ((1u << bits) - 1);
    const int groups = dim / group_size;
    const int g = d / group_size;
    const float s = float(scales[(int64_t(b) * s_bs + int64_t(h) * s_hs + j) * groups + g]);
    const float c = float(biases[(int64_t(b) * b_bs + int64_t(h) * b_hs + j) * groups + g]);
    return fma(s, float(code), c);
  }
};

template <typename T, int D, int bits>
inline KvRows<T, D, bits> kv_rows(const device uchar* x, const device T* scales,
    const device T* biases, int x_bs, int x_hs, int s_bs, int s_hs, int b_bs, int b_hs, int dim,
    int group_size) {
  KvRows<T, D, bits> r;
  r.x = x;
  r.scales = scales;
  r.biases = biases;
  r.x_bs = x_bs;
  r.x_hs = x_hs;
  r.s_bs = s_bs;
  r.s_hs = s_hs;
  r.b_bs = b_bs;
  r.b_hs = b_hs;
  r.dim = dim;
  r.group_size = group_size;
  return r;
}

// The keys of sequence b: kv_lengths[b] clamped to [0, S], or S.
inline int sequence_length(constant AttnShape& sh, const device int* kv_lengths, int b) {
  return attn_has_kv_lengths ? clamp(kv_lengths[b], 0, sh.S) : sh.S;
}

// Keys [lo, hi) that query rows i0 .. i1 (inclusive) of a sequence of `len`
// keys may see under causal / window: what every kernel loops over, so that
// blocks nobody sees are skipped whole.
inline int2 key_range(constant AttnShape& sh, int len, int i0, int i1) {
  int lo = 0;
  int hi = len;
  if (sh.causal != 0) {
    hi = min(len, i1 + len - sh.L + 1);
    if (sh.window > 0) {
      lo = max(0, i0 + len - sh.L - sh.window + 1);
    }
  }
  return int2(lo, max(lo, hi));
}

// What query (b, h, i) adds to its logit for key j < len: -INFINITY when it
// does not see j (causal, window, a bool mask's False), else the additive
// mask's value (0 without one).
inline float mask_term(constant AttnShape& sh, const device uchar* mask, int len, int b, int h,
    int i, int j) {
  if (sh.causal != 0) {
    const int pos = i + len - sh.L;
    if (j > pos || (sh.window > 0 && j <= pos - sh.window)) {
      return -INFINITY;
    }
  }
  if (attn_has_mask) {
    const int64_t at = int64_t(b) * sh.mask_b + int64_t(h) * sh.mask_h + int64_t(i) * sh.mask_l +
        int64_t(j) * sh.mask_s;
    if (attn_mask_bool) {
      return mask[at] != 0 ? 0.0f : -INFINITY;
    }
    return ((const device float*)mask)[at];
  }
  return 0.0f;
}

// exp(m - top) for a running max m under a larger one: 0 for m = -inf (no
// key yet), so that -inf - -inf never makes a NaN.
inline float rescale(float m, float top) {
  return m == -INFINITY ? 0.0f : exp(m - top);
}

// A row's final (max, sum of exp(logit - max)) with its sink's logit (when
// the call has sinks) joining the denominator: returns the factor that turns
// the unnormalised accumulator into the output (0 for a row that sees
// nothing), and the log-sum-exp in *lse (-inf then).
inline float finish_row(float m, float l, const device float* sinks, int h, thread float* lse) {
  float top = m;
  float total = l;
  if (attn_has_sinks) {
    const float sink = sinks[h];
    top = max(m, sink);
    total = l * rescale(m, top) + exp(sink - top);
  }
  if (!(total > 0.0f)) {
    *lse = -INFINITY;
    return 0.0f;
  }
  *lse = top + log(total);
  return rescale(m, top) / total;
}

} // namespace mlx_ext
