// Attention CPU kernels, compiled once per ISA (simd.h).
//
// attend: one task is query rows [l0, l1) of the G = Hq / Hkv query heads that
// share kv head `hkv` of batch `b` (R = G * (l1 - l0) rows, q pre-scaled to
// float32), against keys [s0, s1) in blocks of kKeyBlock keys. Each block of
// K and of V is brought once into a float32 tile and serves all R rows, so
// each K/V byte is read once per task. Rows go kRows at a time through a
// block: their scores (each tile row loaded once for all of them; with many
// rows the key tile is transposed and keys fill the vector lanes), the
// online-softmax update of each row's running max m, sum l and float32
// accumulator (D floats), then p v into the accumulators (in registers
// across the block's keys). Blocks no row can see (causal, window,
// kv_lengths) are never loaded, nor scored for a group of rows that cannot
// see them.
//
// Quantized K/V tiles hold the codes as floats and never the dequantized
// values: per group g of D, q . k = s_g (q . codes)_g + b_g (sum q)_g, and the
// value accumulator takes p s_g codes_g plus p b_g in a per-group term.
#include <type_traits>

#include "attention/cpu_tiles.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

// Rows that share each load of a K or V tile row.
constexpr int kRows = 4;
// From this many rows per task on, key tiles are transposed (see attend).
constexpr int64_t kTransposeRows = 16;
// How far ahead of the key being scored decode prefetches K and V rows (a
// hint: past the end of the array it fetches nothing and cannot fault).
constexpr int64_t kPrefetchKeys = 16;
// Keys per dot product call in decode: two keys' accumulator chains
// interleave, hiding the FMA latency; AVX2's 16 registers hold one key's.
#if defined(MLX_EXT_ISA_avx2)
constexpr int kDotKeys = 1;
#else
constexpr int kDotKeys = 2;
#endif

// max and sum of x[0:n] in 8 independent lanes: no chain of n dependent
// operations, and a form the compiler vectorises without reassociating.
MLX_EXT_INLINE float max_of(const float* x, int64_t n) {
  float m[8] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) m[l] = std::max(m[l], x[j + l]);
  for (; j < n; ++j) m[0] = std::max(m[0], x[j]);
  return std::max(std::max(std::max(m[0], m[1]), std::max(m[2], m[3])),
      std::max(std::max(m[4], m[5]), std::max(m[6], m[7])));
}

MLX_EXT_INLINE float sum_of(const float* x, int64_t n) {
  float s[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) s[l] += x[j + l];
  for (; j < n; ++j) s[0] += x[j];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// A tile of n keys transposed to columns: x (D, kKeyBlock), scale and bias
// (groups, kKeyBlock); columns n.. are left as they were.
Tile transpose_keys(const Tile& t, int64_t n, int64_t D, int64_t groups, TileStorage& st) {
  st.x.resize(D * kKeyBlock);
  st.scale.resize(groups * kKeyBlock);
  st.bias.resize(groups * kKeyBlock);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < D; ++d) st.x[d * kKeyBlock + j] = t.x[j * D + d];
    for (int64_t g = 0; g < groups; ++g) {
      st.scale[g * kKeyBlock + j] = t.scale[j * groups + g];
      st.bias[g * kKeyBlock + j] = t.bias[j * groups + g];
    }
  }
  return {st.x.data(), st.scale.data(), st.bias.data()};
}

// out_i[0:kKeyBlock] = q_i . k_j for NR rows against a transposed key tile,
// keys in the vector lanes: two vectors of keys x NR rows of accumulators
// stay in registers over d and need no horizontal sums. Quantized: per group,
// s_jg (q_i . codes_j)_g + b_jg (sum q_i)_g.
template <int NR, int bits>
MLX_EXT_INLINE void block_scores(const float* q, const float* q_sums, const Tile& kt, int64_t D,
    int group_size, float* out) {
  static_assert(kKeyBlock % (2 * kWidth) == 0, "key blocks are whole pairs of vectors");
  const int64_t groups = bits ? D / group_size : 1;
  const int64_t span = bits ? group_size : D;
  for (int64_t jc = 0; jc < kKeyBlock; jc += 2 * kWidth) {
    VecF acc[NR][2];
    for (int i = 0; i < NR; ++i) acc[i][0] = zero(), acc[i][1] = zero();
    for (int64_t g = 0; g < groups; ++g) {
      VecF part[NR][2];
      for (int i = 0; i < NR; ++i) part[i][0] = zero(), part[i][1] = zero();
      for (int64_t d = g * span; d < (g + 1) * span; ++d) {
        const float* k = kt.x + d * kKeyBlock + jc;
        const VecF k0 = load(k), k1 = load(k + kWidth);
        for (int i = 0; i < NR; ++i) {
          const VecF qd = broadcast(q[i * D + d]);
          part[i][0] = fma(qd, k0, part[i][0]);
          part[i][1] = fma(qd, k1, part[i][1]);
        }
      }
      if constexpr (bits == 0) {
        for (int i = 0; i < NR; ++i) acc[i][0] = part[i][0], acc[i][1] = part[i][1];
      } else {
        const float* sg = kt.scale + g * kKeyBlock + jc;
        const float* bg = kt.bias + g * kKeyBlock + jc;
        for (int c = 0; c < 2; ++c) {
          const VecF s = load(sg + c * kWidth), b = load(bg + c * kWidth);
          for (int i = 0; i < NR; ++i)
            acc[i][c] = fma(b, broadcast(q_sums[i * groups + g]), fma(s, part[i][c], acc[i][c]));
        }
      }
    }
    for (int i = 0; i < NR; ++i) {
      store(out + i * kKeyBlock + jc, acc[i][0]);
      store(out + i * kKeyBlock + jc + kWidth, acc[i][1]);
    }
  }
}

// acc_i[d0:d1] += sum_j w_i[j] x[j, d0:d1] over block rows j in [jb, je), for
// NR rows i (w_i at stride kKeyBlock, acc_i at stride D). The accumulators of
// two vectors of d for all NR rows stay in registers across the keys, so each
// key costs one load of x per vector and no stores.
template <int NR, typename Rows>
MLX_EXT_INLINE void weighted_rows(const float* w, const Rows& x, int64_t jb, int64_t je, int64_t d0,
    int64_t d1, float* acc, int64_t D) {
  int64_t d = d0;
  for (; d + 2 * kWidth <= d1; d += 2 * kWidth) {
    VecF a0[NR], a1[NR];
    for (int i = 0; i < NR; ++i) a0[i] = load(acc + i * D + d), a1[i] = load(acc + i * D + d + kWidth);
    for (int64_t j = jb; j < je; ++j) {
      const VecF v0 = row_vec(x, j, d, D), v1 = row_vec(x, j, d + kWidth, D);
      for (int i = 0; i < NR; ++i) {
        const VecF wi = broadcast(w[i * kKeyBlock + j]);
        a0[i] = fma(wi, v0, a0[i]);
        a1[i] = fma(wi, v1, a1[i]);
      }
    }
    for (int i = 0; i < NR; ++i) store(acc + i * D + d, a0[i]), store(acc + i * D + d + kWidth, a1[i]);
  }
  for (; d + kWidth <= d1; d += kWidth) {
    VecF a0[NR];
    for (int i = 0; i < NR; ++i) a0[i] = load(acc + i * D + d);
    for (int64_t j = jb; j < je; ++j) {
      const VecF v0 = row_vec(x, j, d, D);
      for (int i = 0; i < NR; ++i) a0[i] = fma(broadcast(w[i * kKeyBlock + j]), v0, a0[i]);
    }
    for (int i = 0; i < NR; ++i) store(acc + i * D + d, a0[i]);
  }
  for (; d < d1; ++d)
    for (int i = 0; i < NR; ++i)
      for (int64_t j = jb; j < je; ++j) acc[i * D + d] += w[i * kKeyBlock + j] * row_float(x, j, d, D);
}

// p v for NR rows over block rows [jb, je) (p_i at stride kKeyBlock). For
// quantized V, per group: the weights p_ij s_jg against the codes (in
// `weights`, NR x kKeyBlock) and sum_j p_ij b_jg into acc_groups.
template <int NR, int bits, typename Rows>
MLX_EXT_INLINE void accumulate_pv(const float* p, const Rows& vt, int64_t jb, int64_t je, float* acc,
    float* acc_groups, int64_t D, int group_size, float* weights) {
  if constexpr (bits == 0) {
    weighted_rows<NR>(p, vt, jb, je, 0, D, acc, D);
  } else {
    const int64_t groups = D / group_size;
    float scale[kKeyBlock], bias[kKeyBlock];
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t j = jb; j < je; ++j) {
        scale[j] = row_scale(vt, j, g, groups);
        bias[j] = row_bias(vt, j, g, groups);
      }
      for (int i = 0; i < NR; ++i) {
        float bias_sum = 0.0f;
        for (int64_t j = jb; j < je; ++j) {
          weights[i * kKeyBlock + j] = p[i * kKeyBlock + j] * scale[j];
          bias_sum += p[i * kKeyBlock + j] * bias[j];
        }
        acc_groups[i * groups + g] += bias_sum;
      }
      weighted_rows<NR>(weights, vt, jb, je, g * group_size, (g + 1) * group_size, acc, D);
    }
  }
}

// Everything one task keeps per query row, as R-row arrays.
struct RowState {
  std::vector<float> q, q_sums, acc, acc_groups, m, l, scores, weights;
  std::vector<int64_t> lo, hi;
  TileStorage k_tile, k_transposed, v_tile;
};

// Scores p_i[j] (stride kKeyBlock) of NR rows for block keys [begin, end) read
// where they are stored (decode), kDotKeys keys per dot call, prefetching
// kPrefetchKeys ahead.
template <int NR, int bits, typename KRows, typename VRows>
MLX_EXT_INLINE void stored_scores(const float* q, const float* q_sums, const KRows& kt,
    const VRows& vt, int64_t j0, int64_t begin, int64_t end, int64_t D, int gs, float* p) {
  float s[kDotKeys * NR];
  int64_t j = begin;
  for (; j + kDotKeys <= end; j += kDotKeys) {
    for (int k = 0; k < kDotKeys; ++k) {
      prefetch_row(kt, j + k - j0 + kPrefetchKeys, D);
      prefetch_row(vt, j + k - j0 + kPrefetchKeys, D);
    }
    tile_dot<NR, bits, kDotKeys>(q, q_sums, kt, j - j0, D, gs, s);
    for (int k = 0; k < kDotKeys; ++k)
      for (int i = 0; i < NR; ++i) p[i * kKeyBlock + j + k - j0] = s[k * NR + i];
  }
  for (; j < end; ++j) {
    tile_dot<NR, bits>(q, q_sums, kt, j - j0, D, gs, s);
    for (int i = 0; i < NR; ++i) p[i * kKeyBlock + j - j0] = s[i];
  }
}

// Keys [j0, j0 + n) of the task for all its rows, kRows at a time: scores (a
// transposed key Tile: keys in the vector lanes; else one dot per key), the
// online-softmax update, then p v into the accumulators.
template <int bits, typename KRows, typename VRows>
void attend_block(const AttentionArgs& a, const AttentionTask& t, RowState& st, const KRows& kt,
    const VRows& vt, int64_t j0, int64_t n) {
  constexpr bool transposed = std::is_same_v<KRows, Tile>;
  const int64_t D = a.D, G = a.Hq / a.Hkv, n_l = t.l1 - t.l0, R = G * n_l;
  const int gs = a.group_size;
  const int64_t groups = bits ? D / gs : 0;
  for (int64_t r0 = 0; r0 < R; r0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, R - r0);
    // The keys of this block any of the rows sees; scores for all of them,
    // each key's tile row loaded once for the kRows rows.
    int64_t begin = j0 + n, end = j0;
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const int64_t b = std::max(st.lo[r], j0), e = std::min(st.hi[r], j0 + n);
      if (b < e) begin = std::min(begin, b), end = std::max(end, e);
    }
    if (begin >= end) continue;
    const float* q = st.q.data() + r0 * D;
    const float* q_sums = st.q_sums.data() + r0 * groups;
    float* p = st.scores.data(); // (kRows, kKeyBlock): scores, then probabilities
    if constexpr (transposed) {
      if (nr == kRows) {
        block_scores<kRows, bits>(q, q_sums, kt, D, gs, p);
      } else {
        for (int64_t i = 0; i < nr; ++i)
          block_scores<1, bits>(q + i * D, q_sums + i * groups, kt, D, gs, p + i * kKeyBlock);
      }
    } else {
      switch (nr) { // every row count its own registers: GQA groups of 1 to 3 heads too
        case 4: stored_scores<4, bits>(q, q_sums, kt, vt, j0, begin, end, D, gs, p); break;
        case 3: stored_scores<3, bits>(q, q_sums, kt, vt, j0, begin, end, D, gs, p); break;
        case 2: stored_scores<2, bits>(q, q_sums, kt, vt, j0, begin, end, D, gs, p); break;
        default: stored_scores<1, bits>(q, q_sums, kt, vt, j0, begin, end, D, gs, p); break;
      }
    }
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r0 + i;
      float* row_p = p + i * kKeyBlock - j0;
      const int64_t b = std::max(st.lo[r], begin), e = std::min(st.hi[r], end);
      const int64_t m_row = mask_row(a, t.b, t.hkv * G + r / n_l, t.l0 + r % n_l);
      std::fill(row_p + begin, row_p + std::max(begin, b), kNegInf);
      std::fill(row_p + std::max(e, begin), row_p + end, kNegInf);
      if (a.mask)
        for (int64_t j = b; j < e; ++j) row_p[j] = apply_mask(a, m_row, j, row_p[j]);
      const float block_max = max_of(row_p + begin, end - begin);
      if (block_max == kNegInf) {
        std::fill(row_p + begin, row_p + end, 0.0f);
        continue;
      }
      // Online softmax: rescale what was summed under the old max.
      const float m = std::max(st.m[r], block_max);
      const float alpha = exp_nonpositive(st.m[r] - m);
      if (alpha != 1.0f) {
        float* acc = st.acc.data() + r * D;
        const VecF av = broadcast(alpha);
        int64_t d = 0;
        for (; d + kWidth <= D; d += kWidth) store(acc + d, fma(av, load(acc + d), zero()));
        for (; d < D; ++d) acc[d] *= alpha;
        for (int64_t g = 0; g < groups; ++g) st.acc_groups[r * groups + g] *= alpha;
        st.l[r] *= alpha;
      }
      st.m[r] = m;
      for (int64_t j = begin; j < end; ++j) row_p[j] = exp_nonpositive(row_p[j] - m);
      st.l[r] += sum_of(row_p + begin, end - begin);
    }
    float* acc = st.acc.data() + r0 * D;
    float* acc_groups = st.acc_groups.data() + r0 * groups;
    float* w = st.weights.data();
    switch (nr) {
      case 4: accumulate_pv<4, bits>(p, vt, begin - j0, end - j0, acc, acc_groups, D, gs, w); break;
      case 3: accumulate_pv<3, bits>(p, vt, begin - j0, end - j0, acc, acc_groups, D, gs, w); break;
      case 2: accumulate_pv<2, bits>(p, vt, begin - j0, end - j0, acc, acc_groups, D, gs, w); break;
      default: accumulate_pv<1, bits>(p, vt, begin - j0, end - j0, acc, acc_groups, D, gs, w); break;
    }
  }
}

template <FloatType T, int bits>
void attend(const AttentionArgs& a, const AttentionTask& t, const AttentionPartials* parts) {
  const int64_t D = a.D, G = a.Hq / a.Hkv, n_l = t.l1 - t.l0, R = G * n_l;
  const int gs = a.group_size;
  const int64_t groups = bits ? D / gs : 0;
  thread_local RowState st;
  st.q.resize(R * D);
  st.acc.assign(R * D, 0.0f);
  st.q_sums.resize(R * groups);
  st.acc_groups.assign(R * groups, 0.0f);
  st.m.resize(R);
  st.l.resize(R);
  st.lo.resize(R);
  st.hi.resize(R);
  st.scores.resize(kRows * kKeyBlock);
  st.weights.resize(kRows * kKeyBlock);

  const bool sinks = a.sinks && (!parts || parts->chunk == 0);
  int64_t first = t.s1, last = t.s0; // the union of the rows' key ranges
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = t.hkv * G + r / n_l, i = t.l0 + r % n_l;
    load_row<T, bits>(a.q, (t.b * a.Hq + h) * a.L + i, D, a.scale, st.q.data() + r * D, groups, gs,
        st.q_sums.data() + r * groups);
    visible_keys(a, t.b, i, st.lo[r], st.hi[r]);
    st.lo[r] = std::max(st.lo[r], t.s0);
    st.hi[r] = std::min(st.hi[r], t.s1);
    if (st.lo[r] < st.hi[r]) {
      first = std::min(first, st.lo[r]);
      last = std::max(last, st.hi[r]);
    }
    // A sink is one more logit with no value: the softmax starts from it.
    st.m[r] = sinks ? a.sinks[h] : kNegInf;
    st.l[r] = sinks ? 1.0f : 0.0f;
  }

  // Many rows (prefill) amortise converting each K/V block to a float32 tile
  // once and transposing the key tile, which lets the scores be computed with
  // keys in the vector lanes (block_scores). Few rows (decode) read K and V
  // where they are stored, converting in registers (StoredRows), and take one
  // dot product per key (tile_dot): no pass over the block but the one that
  // uses it.
  const bool transposed = R >= kTransposeRows;
  for (int64_t j0 = first; j0 < last; j0 += kKeyBlock) {
    const int64_t n = std::min<int64_t>(kKeyBlock, last - j0);
    if (transposed) {
      const Tile kt = transpose_keys(load_tile<T, bits>(a, a.k, t.b, t.hkv, j0, n, st.k_tile), n, D,
          groups, st.k_transposed);
      attend_block<bits>(a, t, st, kt, load_tile<T, bits>(a, a.v, t.b, t.hkv, j0, n, st.v_tile), j0, n);
    } else {
      attend_block<bits>(a, t, st, stored_rows<T, bits>(a.k, t.b, t.hkv, j0),
          stored_rows<T, bits>(a.v, t.b, t.hkv, j0), j0, n);
    }
  }

  const int64_t n_rows = a.B * a.Hq * a.L;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = t.hkv * G + r / n_l, i = t.l0 + r % n_l;
    const int64_t row = (t.b * a.Hq + h) * a.L + i;
    float* acc = st.acc.data() + r * D;
    for (int64_t d = 0; d < D && groups; ++d) acc[d] += st.acc_groups[r * groups + d / gs];
    from_code_order<bits>(acc, D);
    if (parts) {
      const int64_t at = parts->chunk * n_rows + row;
      parts->m[at] = st.m[r];
      parts->l[at] = st.l[r];
      std::copy(acc, acc + D, parts->acc + at * D);
      continue;
    }
    // A row that sees no key (and has no sink) attends to nothing: 0.
    const float inv = st.l[r] > 0.0f ? 1.0f / st.l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) store_float<T>(a.out, row * D + d, acc[d] * inv);
    a.lse[row] = st.l[r] > 0.0f ? st.m[r] + std::log(st.l[r]) : kNegInf;
  }
}

// Rows [r0, r1) of (B, Hq, L): out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
template <FloatType T>
void merge(const AttentionArgs& a, const AttentionPartials& p, int64_t chunks, int64_t r0,
    int64_t r1) {
  const int64_t D = a.D, n_rows = a.B * a.Hq * a.L;
  thread_local std::vector<float> acc;
  acc.resize(D);
  for (int64_t r = r0; r < r1; ++r) {
    float M = kNegInf;
    for (int64_t c = 0; c < chunks; ++c)
      if (p.l[c * n_rows + r] > 0.0f) M = std::max(M, p.m[c * n_rows + r]);
    std::fill(acc.begin(), acc.end(), 0.0f);
    float l = 0.0f;
    for (int64_t c = 0; c < chunks && M != kNegInf; ++c) {
      const int64_t at = c * n_rows + r;
      if (p.l[at] == 0.0f) continue;
      const float w = exp_nonpositive(p.m[at] - M);
      l += w * p.l[at];
      const VecF wv = broadcast(w);
      const float* src = p.acc + at * D;
      int64_t d = 0;
      for (; d + kWidth <= D; d += kWidth) store(acc.data() + d, fma(wv, load(src + d), load(acc.data() + d)));
      for (; d < D; ++d) acc[d] += w * src[d];
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < D; ++d) store_float<T>(a.out, r * D + d, acc[d] * inv);
    a.lse[r] = l > 0.0f ? M + std::log(l) : kNegInf;
  }
}

template <FloatType T>
void attend_bits(const AttentionArgs& a, const AttentionTask& t, const AttentionPartials* p) {
  switch (a.bits) {
    case 4: return attend<T, 4>(a, t, p);
    case 8: return attend<T, 8>(a, t, p);
    default: return attend<T, 0>(a, t, p);
  }
}

void attend_entry(const AttentionArgs& a, const AttentionTask& t, const AttentionPartials* p) {
  switch (a.type) {
    case FloatType::f16: return attend_bits<FloatType::f16>(a, t, p);
    case FloatType::bf16: return attend_bits<FloatType::bf16>(a, t, p);
    default: return attend_bits<FloatType::f32>(a, t, p);
  }
}

void merge_entry(const AttentionArgs& a, const AttentionPartials& p, int64_t chunks, int64_t r0,
    int64_t r1) {
  switch (a.type) {
    case FloatType::f16: return merge<FloatType::f16>(a, p, chunks, r0, r1);
    case FloatType::bf16: return merge<FloatType::bf16>(a, p, chunks, r0, r1);
    default: return merge<FloatType::f32>(a, p, chunks, r0, r1);
  }
}

} // namespace

extern const AttentionKernels attention_kernels = {
    MLX_EXT_ISA_NAME,
    kKeyBlock,
    attend_entry,
    merge_entry,
};

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
