// The binding table of metal/attention.metal: buffer indices, function
// constants and the shape argument. The kernels, the host code
// (csrc/attention/metal.cpp) and the emulator tests (which parse this file)
// all bind through it. Valid MSL and C++.
//
// Layouts (D the call's head dim, a multiple of 8 up to 256, run by the
// kernel instantiated for the next supported head dim at or above it, the
// columns past D zero): q, out, d_out, dq (B, Hq, L, D) contiguous, T = q's dtype. K and V
// (and dk, dv) are read by rows: row j of (batch b, kv head h) of an array is
// row b * <array>_bs + h * <array>_hs + j (strides in rows, as a slice
// [..., :S, :] of a preallocated cache has them). Float K/V rows hold D values
// of T; quantized rows hold D * bits / 32 uint32 words of codes (MLX's
// packing), and their scales / biases rows D / group_size values of T.
#pragma once

#define ATTN_BUFFER_Q 0 // T (B, Hq, L, D)
#define ATTN_BUFFER_K 1 // T rows, or uint32 code rows
#define ATTN_BUFFER_K_SCALES 2 // T rows (quantized only)
#define ATTN_BUFFER_K_BIASES 3 // T rows (quantized only)
#define ATTN_BUFFER_V 4
#define ATTN_BUFFER_V_SCALES 5
#define ATTN_BUFFER_V_BIASES 6
#define ATTN_BUFFER_MASK 7 // bool (uchar) or float32 (Bm, Hm, Lm, Sm), with ATTN_FC_MASK_*
#define ATTN_BUFFER_SINKS 8 // float32 (Hq,), with ATTN_FC_HAS_SINKS
#define ATTN_BUFFER_KV_LENGTHS 9 // int32 (B,), with ATTN_FC_HAS_KV_LENGTHS
#define ATTN_BUFFER_OUT 10 // T (B, Hq, L, D)
#define ATTN_BUFFER_LSE 11 // float32 (B, Hq, L)
#define ATTN_BUFFER_PARTIAL_M 12 // float32 (chunks, B, Hq, L): split-K running max
#define ATTN_BUFFER_PARTIAL_L 13 // float32 (chunks, B, Hq, L): sum of exp(logit - m)
#define ATTN_BUFFER_PARTIAL_ACC 14 // float32 (chunks, B, Hq, L, D): sum of exp(logit - m) v
#define ATTN_BUFFER_D_OUT 15 // T (B, Hq, L, D): the cotangent of out
#define ATTN_BUFFER_DELTA 16 // float32 (B, Hq, L): sum(d_out * out, -1)
#define ATTN_BUFFER_DQ 17 // T (B, Hq, L, D)
#define ATTN_BUFFER_DK 18 // T (B, Hkv, S, D), contiguous
#define ATTN_BUFFER_DV 19 // T (B, Hkv, S, D), contiguous
#define ATTN_BUFFER_SHAPE 20 // AttnShape

// Function constants, set when the pipeline is created: which optional
// inputs exist (one kernel serves every combination).
#define ATTN_FC_MASK_BOOL 0 // bool: a bool mask (True = attend)
#define ATTN_FC_MASK_ADDITIVE 1 // bool: a float32 additive mask
#define ATTN_FC_HAS_SINKS 2 // bool: sinks join each row's softmax denominator
#define ATTN_FC_HAS_KV_LENGTHS 3 // bool: per-sequence key lengths, clamped to [0, S]

struct AttnShape {
  int D; // head dim: the kernel's template D is the smallest instantiated one >= D
  int B;
  int Hq;
  int Hkv;
  int L;
  int S;
  int group_size; // quantized K/V: values per scale / bias
  int causal; // 1: key j seen by query i only if j <= i + len_b - L
  int window; // 0: none; else also j > i + len_b - L - window
  float scale;
  int chunks; // decode: key chunks (1: one pass, out and lse written directly)
  int chunk_len; // decode: keys per chunk
  int k_bs; // K row strides (values or codes), per batch and per kv head
  int k_hs;
  int ks_bs; // K scales
  int ks_hs;
  int kb_bs; // K biases
  int kb_hs;
  int v_bs;
  int v_hs;
  int vs_bs;
  int vs_hs;
  int vb_bs;
  int vb_hs;
  int mask_b; // mask element strides (0 on broadcast dims)
  int mask_h;
  int mask_l;
  int mask_s;
};
