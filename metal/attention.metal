// mlx_ext.scaled_dot_product_attention on Apple GPUs: out = softmax(scale q
// k^T + mask) v per query head h, against kv head h / (Hq / Hkv), with
// causal (lower-right aligned to each sequence's length) / window /
// kv_lengths / bool or additive masks / sinks, float or quantized K/V; and
// its backward. Softmax in float32; every kernel accumulates in float32.
//
// Kernels (chosen by csrc/attention/metal_plan.h):
//   attn_decode   L small: vector kernel, the query rows of one kv head share
//                 each K/V load; one pass, or pass 1 of split-K (chunks > 1)
//   attn_merge    split-K pass 2: log-sum-exp merge of the chunks
//   attn_prefill  L large: 32-row tiles, simdgroup 8x8 MMA for QK^T and PV,
//                 online softmax
//   attn_dq       backward: dq, probabilities recomputed from the saved lse
//   attn_dkv      backward: dk and dv (float K/V), one key per simdgroup,
//                 so no two threads add to one value (no atomics)
// T (float, half, bfloat), D (64, 80, 96, 128, 192, 256) and the K/V format
// (bits 0 = float, 4, 8; group_size a runtime argument) are template
// parameters; the call's head dim sh.D (a multiple of 8 up to 256) runs on the
// next instantiated D at or above it, with the columns past sh.D zero. Masks,
// sinks and kv_lengths are function constants and causal, window and scale
// runtime arguments of one kernel (attention.h). Buffers are bound as
// attention_bindings.h says.
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

#include "attention.h"
#include "attention_bindings.h"
#include "common.h"

using namespace metal;

// The arguments every forward and backward kernel shares, in binding order.
#define ATTN_INPUTS                                                              \
  const device T* q [[buffer(ATTN_BUFFER_Q)]],                                   \
      const device uchar* k [[buffer(ATTN_BUFFER_K)]],                           \
      const device T* k_scales [[buffer(ATTN_BUFFER_K_SCALES)]],                 \
      const device T* k_biases [[buffer(ATTN_BUFFER_K_BIASES)]],                 \
      const device uchar* v [[buffer(ATTN_BUFFER_V)]],                           \
      const device T* v_scales [[buffer(ATTN_BUFFER_V_SCALES)]],                 \
      const device T* v_biases [[buffer(ATTN_BUFFER_V_BIASES)]],                 \
      const device uchar* mask [[buffer(ATTN_BUFFER_MASK), function_constant(attn_has_mask)]], \
      const device float* sinks [[buffer(ATTN_BUFFER_SINKS), function_constant(attn_has_sinks)]], \
      const device int* kv_lengths [[buffer(ATTN_BUFFER_KV_LENGTHS),             \
          function_constant(attn_has_kv_lengths)]]

#define ATTN_KV_ROWS                                                                              \
  const auto K = mlx_ext::kv_rows<T, D, bits>(k, k_scales, k_biases, sh.k_bs, sh.k_hs, sh.ks_bs, \
      sh.ks_hs, sh.kb_bs, sh.kb_hs, sh.D, sh.group_size);                                         \
  const auto V = mlx_ext::kv_rows<T, D, bits>(v, v_scales, v_biases, sh.v_bs, sh.v_hs, sh.vs_bs, \
      sh.vs_hs, sh.vb_bs, sh.vb_hs, sh.D, sh.group_size)

// ---- attn_decode -------------------------------------------------------------------
//
// Grid (chunks, Hkv * ceil(G L / 8), B), G = Hq / Hkv: threadgroup (c, y, b)
// takes 8 of the G L query rows of kv head y % Hkv (row r: head r / L, query
// r % L) against key chunk c.
//   thread:      values d = lane + 32 e (e < ceil(D / 32)) of each key and of
//                its 8 rows' q and accumulators;
//   simdgroup:   keys j = j0 + sg, j0 + sg + 4, ...: per key one K and one V
//                row load for all 8 rows, per row a simd_sum dot and an
//                online-softmax update (running max m, sum l, acc);
//   threadgroup: 4 simdgroups; their (m, l, acc) merged row by row through
//                threadgroup memory; chunks == 1 writes out and lse, else
//                float32 partials for attn_merge.
// Threadgroup memory: 4 (D + 2) floats, 4.0 KiB at D = 256 (of 32 KiB).
// Registers per thread: q, acc 2 x 8 x ceil(D / 32) floats (128 at D = 256),
// plus 2 x ceil(D / 32) for the key's K and V values.
constexpr constant int kDecodeSimdgroups = 4;
constexpr constant int kDecodeRows = 8;

template <typename T, int D, int bits>
[[kernel]] void attn_decode(
    ATTN_INPUTS,
    device T* out [[buffer(ATTN_BUFFER_OUT)]],
    device float* lse [[buffer(ATTN_BUFFER_LSE)]],
    device float* part_m [[buffer(ATTN_BUFFER_PARTIAL_M)]],
    device float* part_l [[buffer(ATTN_BUFFER_PARTIAL_L)]],
    device float* part_acc [[buffer(ATTN_BUFFER_PARTIAL_ACC)]],
    constant AttnShape& sh [[buffer(ATTN_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int E = (D + 31) / 32;
  constexpr int R = kDecodeRows;
  const int dim = sh.D;
  threadgroup float sg_m[kDecodeSimdgroups];
  threadgroup float sg_l[kDecodeSimdgroups];
  threadgroup float sg_acc[kDecodeSimdgroups * D];
  ATTN_KV_ROWS;

  const int G = sh.Hq / sh.Hkv;
  const int chunk = tgid.x;
  const int hkv = int(tgid.y) % sh.Hkv;
  const int r0 = int(tgid.y) / sh.Hkv * R;
  const int b = tgid.z;
  const int rows = min(R, G * sh.L - r0);
  const int len = mlx_ext::sequence_length(sh, kv_lengths, b);

  float qv[R][E];
  float acc[R][E];
  float m[R];
  float l[R];
  int head[R];
  int query[R];
#pragma clang loop unroll(full)
  for (int r = 0; r < R; ++r) {
    const int row = r0 + min(r, rows - 1); // rows past the end repeat the last (never stored)
    head[r] = hkv * G + row / sh.L;
    query[r] = row % sh.L;
    const device T* q_row = q + ((int64_t(b) * sh.Hq + head[r]) * sh.L + query[r]) * dim;
#pragma clang loop unroll(full)
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      qv[r][e] = d < dim ? sh.scale * float(q_row[d]) : 0.0f;
      acc[r][e] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  // The rows' queries are query[0] .. query[rows - 1] in some order: the
  // smallest and largest bound the keys any of them sees.
  int i_lo = query[0];
  int i_hi = query[0];
#pragma clang loop unroll(full)
  for (int r = 1; r < R; ++r) {
    i_lo = min(i_lo, query[r]);
    i_hi = max(i_hi, query[r]);
  }
  const int2 seen = mlx_ext::key_range(sh, len, i_lo, i_hi);
  const int j0 = max(seen.x, chunk * sh.chunk_len);
  const int j1 = min(seen.y, (chunk + 1) * sh.chunk_len);

  for (int j = j0 + sg; j < j1; j += kDecodeSimdgroups) {
    float kv[E];
    float vv[E];
#pragma clang loop unroll(full)
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      kv[e] = d < dim ? K.at(b, hkv, j, d) : 0.0f;
      vv[e] = d < dim ? V.at(b, hkv, j, d) : 0.0f;
    }
#pragma clang loop unroll(full)
    for (int r = 0; r < R; ++r) {
      if (r >= rows) {
        break;
      }
      const float term = mlx_ext::mask_term(sh, mask, len, b, head[r], query[r], j);
      if (term == -INFINITY) {
        continue; // uniform across the simdgroup: the collective below is skipped by all
      }
      float dot = 0.0f;
#pragma clang loop unroll(full)
      for (int e = 0; e < E; ++e) {
        dot = fma(qv[r][e], kv[e], dot);
      }
      const float s = simd_sum(dot) + term;
      if (s == -INFINITY) {
        continue; // an additive -inf: the key adds nothing
      }
      const float top = max(m[r], s);
      const float factor = mlx_ext::rescale(m[r], top);
      const float p = exp(s - top);
      l[r] = l[r] * factor + p;
      m[r] = top;
#pragma clang loop unroll(full)
      for (int e = 0; e < E; ++e) {
        acc[r][e] = fma(acc[r][e], factor, p * vv[e]);
      }
    }
  }

  const int64_t row_count = int64_t(sh.B) * sh.Hq * sh.L;
#pragma clang loop unroll(full)
  for (int r = 0; r < R; ++r) {
    if (r >= rows) {
      break; // uniform across the threadgroup
    }
    if (lane == 0) {
      sg_m[sg] = m[r];
      sg_l[sg] = l[r];
    }
#pragma clang loop unroll(full)
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      if (d < dim) {
        sg_acc[sg * dim + d] = acc[r][e];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float top = sg_m[0];
    for (int i = 1; i < kDecodeSimdgroups; ++i) {
      top = max(top, sg_m[i]);
    }
    float weight[kDecodeSimdgroups];
    float total = 0.0f;
    for (int i = 0; i < kDecodeSimdgroups; ++i) {
      weight[i] = mlx_ext::rescale(sg_m[i], top);
      total += sg_l[i] * weight[i];
    }
    const int64_t row = (int64_t(b) * sh.Hq + head[r]) * sh.L + query[r];
    float row_lse = 0.0f;
    const float norm = sh.chunks == 1 ? mlx_ext::finish_row(top, total, sinks, head[r], &row_lse)
                                      : 1.0f;
    for (int d = tid; d < dim; d += 32 * kDecodeSimdgroups) {
      float a = 0.0f;
      for (int i = 0; i < kDecodeSimdgroups; ++i) {
        a = fma(sg_acc[i * dim + d], weight[i], a);
      }
      if (sh.chunks == 1) {
        out[row * dim + d] = T(a * norm);
      } else {
        part_acc[(chunk * row_count + row) * dim + d] = a;
      }
    }
    if (tid == 0) {
      if (sh.chunks == 1) {
        lse[row] = row_lse;
      } else {
        part_m[chunk * row_count + row] = top;
        part_l[chunk * row_count + row] = total;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// ---- attn_merge --------------------------------------------------------------------
//
// Split-K pass 2. Grid (B Hq L): one simdgroup per query row.
//   thread: values d = lane + 32 e of the row: sum over chunks of
//           acc_c exp(m_c - max) / (sum_c l_c exp(m_c - max) + the sink);
//   lane 0 writes the row's lse. No threadgroup memory; a few scalars of
//   registers per thread (the chunks are re-read, not held).
template <typename T, int D>
[[kernel]] void attn_merge(
    const device float* sinks [[buffer(ATTN_BUFFER_SINKS), function_constant(attn_has_sinks)]],
    device T* out [[buffer(ATTN_BUFFER_OUT)]],
    device float* lse [[buffer(ATTN_BUFFER_LSE)]],
    const device float* part_m [[buffer(ATTN_BUFFER_PARTIAL_M)]],
    const device float* part_l [[buffer(ATTN_BUFFER_PARTIAL_L)]],
    const device float* part_acc [[buffer(ATTN_BUFFER_PARTIAL_ACC)]],
    constant AttnShape& sh [[buffer(ATTN_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
  const int dim = sh.D;
  const int64_t row = tgid.x;
  const int64_t row_count = int64_t(sh.B) * sh.Hq * sh.L;
  const int h = int(row / sh.L % sh.Hq);
  float top = -INFINITY;
  for (int c = 0; c < sh.chunks; ++c) {
    top = max(top, part_m[c * row_count + row]);
  }
  float total = 0.0f;
  for (int c = 0; c < sh.chunks; ++c) {
    total += part_l[c * row_count + row] * mlx_ext::rescale(part_m[c * row_count + row], top);
  }
  float row_lse = 0.0f;
  const float norm = mlx_ext::finish_row(top, total, sinks, h, &row_lse);
  for (int d = lane; d < dim; d += 32) {
    float a = 0.0f;
    for (int c = 0; c < sh.chunks; ++c) {
      const float w = mlx_ext::rescale(part_m[c * row_count + row], top);
      a = fma(part_acc[(c * row_count + row) * dim + d], w, a);
    }
    out[row * dim + d] = T(a * norm);
  }
  if (lane == 0) {
    lse[row] = row_lse;
  }
}

// ---- attn_prefill ------------------------------------------------------------------
//
// Grid (ceil(L / 32), Hq, B): threadgroup (x, h, b) computes query rows
// 32 x .. 32 x + 32 of head h, over key blocks of 16; blocks that no row of
// the tile sees (causal, window, kv_lengths: key_range) are skipped whole.
//   thread:      in the softmax, 4 logits of one row (row lane / 4, keys
//                4 (lane % 4) ..); in the products, its 2 elements of each
//                8x8 fragment;
//   simdgroup:   8 query rows: q (scaled) as D / 8 fragments held in
//                registers, S = q K^T (2 x D / 8 MMAs per block), the online
//                softmax in float32 (row max and sum over 4 lanes by
//                shuffles), the rescale of its D / 8 output fragments, then
//                O += P V (2 x D / 8 MMAs);
//   threadgroup: 4 simdgroups sharing each K block, then each V block, in
//                one tile (dequantized to float there for quantized K/V, the
//                codes read straight from the cache).
// Threadgroup memory (floats): tile 16 (D + 4), probs 4 x 8 x 16, factors
// 32: 18.4 KiB at D = 256, 6.4 KiB at D = 64 (of 32 KiB). Registers per
// thread: 2 x D / 8 fragments of 2 floats (q and out: 128 floats at D = 256,
// which a GPU may spill) plus 2 logit fragments.
constexpr constant int kPrefillSimdgroups = 4;
constexpr constant int kPrefillRows = 8 * kPrefillSimdgroups;
constexpr constant int kPrefillKeys = 16;

// Rows [j0, j0 + 16) of K or V into the tile, float32; zeros past S and
// past the head dim.
template <typename T, int D, int bits>
inline void load_kv_tile(thread const mlx_ext::KvRows<T, D, bits>& x, int b, int h, int j0, int S,
    ushort tid, threadgroup float* tile) {
  constexpr int ld = D + 4;
  for (int at = tid; at < kPrefillKeys * D; at += 32 * kPrefillSimdgroups) {
    const int r = at / D;
    const int d = at % D;
    tile[r * ld + d] = j0 + r < S && d < x.dim ? x.at(b, h, j0 + r, d) : 0.0f;
  }
}

template <typename T, int D, int bits>
[[kernel]] void attn_prefill(
    ATTN_INPUTS,
    device T* out [[buffer(ATTN_BUFFER_OUT)]],
    device float* lse [[buffer(ATTN_BUFFER_LSE)]],
    constant AttnShape& sh [[buffer(ATTN_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int ld = D + 4; // padded rows: fewer threadgroup bank conflicts
  constexpr int BK = kPrefillKeys;
  constexpr int F = D / 8;
  threadgroup float tile[kPrefillKeys * (D + 4)];
  threadgroup float probs[kPrefillRows * kPrefillKeys];
  threadgroup float factors[kPrefillRows];
  ATTN_KV_ROWS;

  const int h = tgid.y;
  const int b = tgid.z;
  const int hkv = h / (sh.Hq / sh.Hkv);
  const int i0 = tgid.x * kPrefillRows;
  const int len = mlx_ext::sequence_length(sh, kv_lengths, b);
  const int dim = sh.D;
  const device T* q_head = q + (int64_t(b) * sh.Hq + h) * sh.L * dim;

  // q (scaled; zeros past L and past the head dim) into fragments, staged 16
  // rows at a time through the tile.
  simdgroup_matrix<float, 8, 8> qf[F];
#pragma clang loop unroll(full)
  for (int half_rows = 0; half_rows < 2; ++half_rows) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int at = tid; at < 16 * D; at += 32 * kPrefillSimdgroups) {
      const int i = i0 + 16 * half_rows + at / D;
      const int d = at % D;
      tile[at / D * ld + d] = i < sh.L && d < dim ? sh.scale * float(q_head[int64_t(i) * dim + d]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg / 2 == half_rows) {
#pragma clang loop unroll(full)
      for (int f = 0; f < F; ++f) {
        simdgroup_load(qf[f], tile + 8 * (sg % 2) * ld + 8 * f, ld);
      }
    }
  }
  simdgroup_matrix<float, 8, 8> of[F];
#pragma clang loop unroll(full)
  for (int f = 0; f < F; ++f) {
    of[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  // The lane's row in the softmax and its 4 keys of each block.
  const int rr = lane / 4;
  const int c0 = lane % 4 * 4;
  const int i = i0 + 8 * sg + rr;
  const short2 coord = mlx_ext::simdgroup_matrix_coord(lane);
  threadgroup float* p_sg = probs + 8 * BK * sg;
  threadgroup float* factor_sg = factors + 8 * sg;
  float m = -INFINITY;
  float l = 0.0f;
  const int2 seen = mlx_ext::key_range(sh, len, i0, min(i0 + kPrefillRows, sh.L) - 1);

  for (int j0 = seen.x / BK * BK; j0 < seen.y; j0 += BK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    load_kv_tile(K, b, hkv, j0, sh.S, tid, tile);
    threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma clang loop unroll(full)
    for (int c = 0; c < 2; ++c) {
      simdgroup_matrix<float, 8, 8> s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
#pragma clang loop unroll(full)
      for (int f = 0; f < F; ++f) {
        simdgroup_matrix<float, 8, 8> kf;
        simdgroup_load(kf, tile + 8 * c * ld + 8 * f, ld, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s, qf[f], kf, s);
      }
      simdgroup_store(s, p_sg + 8 * c, BK);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // Online softmax over the block: logits -> probabilities in place.
    float x[4];
    float block_max = -INFINITY;
#pragma clang loop unroll(full)
    for (int t = 0; t < 4; ++t) {
      const int j = j0 + c0 + t;
      const float term = i < sh.L && j < len ? mlx_ext::mask_term(sh, mask, len, b, h, i, j)
                                             : -INFINITY;
      x[t] = term == -INFINITY ? -INFINITY : p_sg[rr * BK + c0 + t] + term;
      block_max = max(block_max, x[t]);
    }
    block_max = max(block_max, simd_shuffle_xor(block_max, 1));
    block_max = max(block_max, simd_shuffle_xor(block_max, 2));
    const float top = max(m, block_max);
    const float factor = mlx_ext::rescale(m, top);
    float sum = 0.0f;
#pragma clang loop unroll(full)
    for (int t = 0; t < 4; ++t) {
      const float p = x[t] == -INFINITY ? 0.0f : exp(x[t] - top);
      p_sg[rr * BK + c0 + t] = p;
      sum += p;
    }
    sum += simd_shuffle_xor(sum, 1);
    sum += simd_shuffle_xor(sum, 2);
    l = l * factor + sum;
    m = top;
    if (lane % 4 == 0) {
      factor_sg[rr] = factor;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    const float row_factor = factor_sg[coord.y];
#pragma clang loop unroll(full)
    for (int f = 0; f < F; ++f) {
      of[f].thread_elements()[0] *= row_factor;
      of[f].thread_elements()[1] *= row_factor;
    }

    threadgroup_barrier(mem_flags::mem_threadgroup);
    load_kv_tile(V, b, hkv, j0, sh.S, tid, tile);
    threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma clang loop unroll(full)
    for (int c = 0; c < 2; ++c) {
      simdgroup_matrix<float, 8, 8> pf;
      simdgroup_load(pf, p_sg + 8 * c, BK);
#pragma clang loop unroll(full)
      for (int f = 0; f < F; ++f) {
        simdgroup_matrix<float, 8, 8> vf;
        simdgroup_load(vf, tile + 8 * c * ld + 8 * f, ld);
        simdgroup_multiply_accumulate(of[f], pf, vf, of[f]);
      }
    }
  }

  // Normalise (sinks join here) and store the rows inside L.
  float row_lse = 0.0f;
  const float norm = mlx_ext::finish_row(m, l, sinks, h, &row_lse);
  simdgroup_barrier(mem_flags::mem_threadgroup); // every lane has read factor_sg
  if (lane % 4 == 0) {
    factor_sg[rr] = norm;
    if (i < sh.L) {
      lse[(int64_t(b) * sh.Hq + h) * sh.L + i] = row_lse;
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  const int out_i = i0 + 8 * sg + coord.y;
  if (out_i < sh.L) {
    const float row_norm = factor_sg[coord.y];
    device T* out_row = out + ((int64_t(b) * sh.Hq + h) * sh.L + out_i) * dim;
#pragma clang loop unroll(full)
    for (int f = 0; f < F; ++f) {
#pragma clang loop unroll(full)
      for (int e = 0; e < 2; ++e) {
        if (8 * f + coord.x + e < dim) {
          out_row[8 * f + coord.x + e] = T(of[f].thread_elements()[e] * row_norm);
        }
      }
    }
  }
}

// ---- attn_dq -----------------------------------------------------------------------
//
// Backward, dq = scale sum_j ds_j k_j with p_j = exp(logit_j - lse) and
// ds_j = p_j (d_out . v_j - delta). Grid (ceil(L / 4), Hq, B): one simdgroup
// per query row, over the keys it sees (key_range).
//   thread:    values d = lane + 32 e of q, d_out, k_j, v_j and dq;
//   simdgroup: per visible key two simd_sum dots (q . k, d_out . v);
//   threadgroup: 4 rows, independent (no barrier, no threadgroup memory).
// Registers: 5 ceil(D / 32) floats (40 at D = 256).
template <typename T, int D, int bits>
[[kernel]] void attn_dq(
    ATTN_INPUTS,
    const device float* lse [[buffer(ATTN_BUFFER_LSE)]],
    const device T* d_out [[buffer(ATTN_BUFFER_D_OUT)]],
    const device float* delta [[buffer(ATTN_BUFFER_DELTA)]],
    device T* dq [[buffer(ATTN_BUFFER_DQ)]],
    constant AttnShape& sh [[buffer(ATTN_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int E = (D + 31) / 32;
  const int dim = sh.D;
  const int i = tgid.x * 4 + sg;
  if (i >= sh.L) {
    return; // the whole simdgroup; this kernel has no threadgroup barrier
  }
  ATTN_KV_ROWS;
  const int h = tgid.y;
  const int b = tgid.z;
  const int hkv = h / (sh.Hq / sh.Hkv);
  const int64_t row = (int64_t(b) * sh.Hq + h) * sh.L + i;
  const int len = mlx_ext::sequence_length(sh, kv_lengths, b);
  float qv[E];
  float go[E];
  float grad[E];
#pragma clang loop unroll(full)
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    qv[e] = d < dim ? sh.scale * float(q[row * dim + d]) : 0.0f;
    go[e] = d < dim ? float(d_out[row * dim + d]) : 0.0f;
    grad[e] = 0.0f;
  }
  const float row_lse = lse[row];
  const float row_delta = delta[row];
  const int2 seen = mlx_ext::key_range(sh, len, i, i);
  for (int j = seen.x; j < seen.y; ++j) {
    const float term = mlx_ext::mask_term(sh, mask, len, b, h, i, j);
    if (term == -INFINITY) {
      continue;
    }
    float kv[E];
    float qk = 0.0f;
    float gv = 0.0f;
#pragma clang loop unroll(full)
    for (int e = 0; e < E; ++e) {
      const int d = lane + 32 * e;
      kv[e] = d < dim ? K.at(b, hkv, j, d) : 0.0f;
      qk = fma(qv[e], kv[e], qk);
      gv = fma(go[e], d < dim ? V.at(b, hkv, j, d) : 0.0f, gv);
    }
    const float s = simd_sum(qk) + term;
    const float dp = simd_sum(gv);
    if (s == -INFINITY) {
      continue;
    }
    const float p = exp(s - row_lse);
    const float ds = p * (dp - row_delta);
#pragma clang loop unroll(full)
    for (int e = 0; e < E; ++e) {
      grad[e] = fma(ds, kv[e], grad[e]);
    }
  }
#pragma clang loop unroll(full)
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    if (d < dim) {
      dq[row * dim + d] = T(sh.scale * grad[e]);
    }
  }
}

// ---- attn_dkv ----------------------------------------------------------------------
//
// Backward, float K/V: dv_j = sum p d_out, dk_j = scale sum ds q over the
// query rows of every q head of kv head h that see key j. Grid (ceil(S / 4),
// Hkv, B): one simdgroup per key, so each dk / dv value has one writer (no
// atomics); rows outside the causal / window band of j are skipped.
//   thread:    values d = lane + 32 e of k_j, v_j, q, d_out, dk, dv;
//   simdgroup: per visible (head, row) two simd_sum dots;
//   threadgroup: 4 keys, independent (no barrier, no threadgroup memory).
// Registers: 6 ceil(D / 32) floats (48 at D = 256).
template <typename T, int D>
[[kernel]] void attn_dkv(
    const device T* q [[buffer(ATTN_BUFFER_Q)]],
    const device T* k [[buffer(ATTN_BUFFER_K)]],
    const device T* v [[buffer(ATTN_BUFFER_V)]],
    const device uchar* mask [[buffer(ATTN_BUFFER_MASK), function_constant(attn_has_mask)]],
    const device int* kv_lengths [[buffer(ATTN_BUFFER_KV_LENGTHS),
        function_constant(attn_has_kv_lengths)]],
    const device float* lse [[buffer(ATTN_BUFFER_LSE)]],
    const device T* d_out [[buffer(ATTN_BUFFER_D_OUT)]],
    const device float* delta [[buffer(ATTN_BUFFER_DELTA)]],
    device T* dk [[buffer(ATTN_BUFFER_DK)]],
    device T* dv [[buffer(ATTN_BUFFER_DV)]],
    constant AttnShape& sh [[buffer(ATTN_BUFFER_SHAPE)]],
    uint3 tgid [[threadgroup_position_in_grid]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int E = (D + 31) / 32;
  const int dim = sh.D;
  const int j = tgid.x * 4 + sg;
  if (j >= sh.S) {
    return; // the whole simdgroup; this kernel has no threadgroup barrier
  }
  const int hkv = tgid.y;
  const int b = tgid.z;
  const int G = sh.Hq / sh.Hkv;
  const int len = mlx_ext::sequence_length(sh, kv_lengths, b);
  const int64_t k_row = int64_t(b) * sh.k_bs + int64_t(hkv) * sh.k_hs + j;
  const int64_t v_row = int64_t(b) * sh.v_bs + int64_t(hkv) * sh.v_hs + j;
  float kv[E];
  float vv[E];
  float gk[E];
  float gv[E];
#pragma clang loop unroll(full)
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    kv[e] = d < dim ? float(k[k_row * dim + d]) : 0.0f;
    vv[e] = d < dim ? float(v[v_row * dim + d]) : 0.0f;
    gk[e] = 0.0f;
    gv[e] = 0.0f;
  }
  // Query i's causal position is i + len - L: it sees j from i = j - len + L
  // on, and with a window until i = j - len + L + window - 1.
  int i_lo = 0;
  int i_hi = j < len ? sh.L : 0;
  if (sh.causal != 0) {
    i_lo = max(0, j - len + sh.L);
    if (sh.window > 0) {
      i_hi = min(i_hi, j - len + sh.L + sh.window);
    }
  }
  for (int g = 0; g < G; ++g) {
    const int h = hkv * G + g;
    for (int i = i_lo; i < i_hi; ++i) {
      const float term = mlx_ext::mask_term(sh, mask, len, b, h, i, j);
      if (term == -INFINITY) {
        continue;
      }
      const int64_t row = (int64_t(b) * sh.Hq + h) * sh.L + i;
      float qv[E];
      float go[E];
      float qk = 0.0f;
      float ov = 0.0f;
#pragma clang loop unroll(full)
      for (int e = 0; e < E; ++e) {
        const int d = lane + 32 * e;
        qv[e] = d < dim ? sh.scale * float(q[row * dim + d]) : 0.0f;
        go[e] = d < dim ? float(d_out[row * dim + d]) : 0.0f;
        qk = fma(qv[e], kv[e], qk);
        ov = fma(go[e], vv[e], ov);
      }
      const float s = simd_sum(qk) + term;
      const float dp = simd_sum(ov);
      if (s == -INFINITY) {
        continue;
      }
      const float p = exp(s - lse[row]);
      const float ds = p * (dp - delta[row]);
#pragma clang loop unroll(full)
      for (int e = 0; e < E; ++e) {
        gv[e] = fma(p, go[e], gv[e]);
        gk[e] = fma(ds, qv[e], gk[e]);
      }
    }
  }
  const int64_t out_row = (int64_t(b) * sh.Hkv + hkv) * sh.S + j;
#pragma clang loop unroll(full)
  for (int e = 0; e < E; ++e) {
    const int d = lane + 32 * e;
    if (d < dim) {
      dk[out_row * dim + d] = T(gk[e]);
      dv[out_row * dim + d] = T(gv[e]);
    }
  }
}

// ---- instantiations ----------------------------------------------------------------
//
// Host names <kernel>_<type>_d<D>[_q<bits>], e.g. attn_decode_float16_d128,
// attn_prefill_bfloat16_d64_q4 (quantized K/V, any group size), attn_merge_float32_d256.

#define instantiate_kernel(name, kernel, ...) \
  template [[host_name(name)]] [[kernel]] decltype(kernel<__VA_ARGS__>) kernel<__VA_ARGS__>;

#define instantiate_attn_format(type, type_name, d, bits, suffix)                       \
  instantiate_kernel("attn_decode_" #type_name "_d" #d suffix, attn_decode, type, d, bits)   \
  instantiate_kernel("attn_prefill_" #type_name "_d" #d suffix, attn_prefill, type, d, bits) \
  instantiate_kernel("attn_dq_" #type_name "_d" #d suffix, attn_dq, type, d, bits)

// Float K/V kernels of one head dim.
#define instantiate_attn_float(type, type_name, d)                          \
  instantiate_attn_format(type, type_name, d, 0, "")                        \
  instantiate_kernel("attn_merge_" #type_name "_d" #d, attn_merge, type, d) \
  instantiate_kernel("attn_dkv_" #type_name "_d" #d, attn_dkv, type, d)

// And quantized K/V, for head dims that a group size (32, 64, 128) divides.
#define instantiate_attn(type, type_name, d)            \
  instantiate_attn_float(type, type_name, d)            \
  instantiate_attn_format(type, type_name, d, 4, "_q4") \
  instantiate_attn_format(type, type_name, d, 8, "_q8")

#define instantiate_attn_head_dims(type, type_name) \
  instantiate_attn(type, type_name, 64)              \
  instantiate_attn_float(type, type_name, 80)        \
  instantiate_attn(type, type_name, 96)              \
  instantiate_attn(type, type_name, 128)             \
  instantiate_attn(type, type_name, 192)             \
  instantiate_attn(type, type_name, 256)

instantiate_attn_head_dims(float, float32)
instantiate_attn_head_dims(half, float16)
instantiate_attn_head_dims(bfloat, bfloat16)
