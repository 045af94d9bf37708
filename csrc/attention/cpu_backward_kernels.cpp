// The fused attention backward, compiled once per ISA (simd.h). Probabilities
// are recomputed from the forward's log-sum-exp, p = exp(logit - lse), so no
// L x S matrix exists; with delta_i = dO_i . O_i,
//   ds_ij = p_ij (dO_i . v_j - delta_i),
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dO_i.
// Two passes, so that no two tasks write the same gradient:
// - dq: one task is the rows of a forward task (all heads of one kv head, a
//   block of queries) over all the keys they see, in key blocks whose K and V
//   tiles serve all the rows (quantized K/V read as codes, as forward);
// - dkv: one task is one key block of one kv head (float K/V only), over
//   every query row of its G query heads that sees it; the block's dk and dv
//   accumulate in float32 tiles.
// Both take the rows four at a time, sharing each load of a tile row.
#include "attention/cpu_tiles.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

// Rows that share each load of a K or V tile row.
constexpr int kRows = 4;

// out[i] = x_i . row j of the tile for the nr <= kRows rows x_i (stride D).
template <int bits>
MLX_EXT_INLINE void row_dots(int64_t nr, const float* x, const float* x_sums, const Tile& t, int64_t j,
    int64_t D, int group_size, float* out) {
  const int64_t groups = bits ? D / group_size : 0;
  if (nr == kRows) return tile_dot<kRows, bits>(x, x_sums, t, j, D, group_size, out);
  for (int64_t i = 0; i < nr; ++i)
    tile_dot<1, bits>(x + i * D, x_sums ? x_sums + i * groups : nullptr, t, j, D, group_size, out + i);
}

// dst[0:D] += sum_i w[i] rows_i for nr rows (stride D): one load and store of
// dst per vector for all of them.
MLX_EXT_INLINE void combine_rows(int64_t nr, const float* w, const float* rows, int64_t D, float* dst) {
  int64_t d = 0;
  for (; d + kWidth <= D; d += kWidth) {
    VecF acc = load(dst + d);
    for (int64_t i = 0; i < nr; ++i) acc = fma(broadcast(w[i]), load(rows + i * D + d), acc);
    store(dst + d, acc);
  }
  for (; d < D; ++d)
    for (int64_t i = 0; i < nr; ++i) dst[d] += w[i] * rows[i * D + d];
}

struct BackwardState {
  std::vector<float> q, q_sums, d_out, d_out_sums, acc, acc_groups;
  std::vector<int64_t> lo, hi;
  TileStorage k_tile, v_tile;
};

template <FloatType T, int bits>
void backward_dq(const AttentionArgs& a, const AttentionGrads& gr, const AttentionTask& t) {
  const int64_t D = a.D, G = a.Hq / a.Hkv, n_l = t.l1 - t.l0, R = G * n_l;
  const int gs = a.group_size;
  const int64_t groups = bits ? D / gs : 0;
  thread_local BackwardState st;
  st.q.resize(R * D);
  st.q_sums.resize(R * groups);
  st.d_out.resize(R * D);
  st.d_out_sums.resize(R * groups);
  st.acc.assign(R * D, 0.0f);
  st.acc_groups.assign(R * groups, 0.0f);
  st.lo.resize(R);
  st.hi.resize(R);
  auto row_of = [&](int64_t r) { return (t.b * a.Hq + t.hkv * G + r / n_l) * a.L + t.l0 + r % n_l; };
  int64_t first = a.S, last = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = row_of(r);
    visible_keys(a, t.b, t.l0 + r % n_l, st.lo[r], st.hi[r]);
    if (gr.lse[row] == kNegInf) st.hi[r] = st.lo[r]; // the row attended to nothing
    if (st.lo[r] >= st.hi[r]) continue;
    first = std::min(first, st.lo[r]);
    last = std::max(last, st.hi[r]);
    load_row<T, bits>(a.q, row, D, a.scale, st.q.data() + r * D, groups, gs, st.q_sums.data() + r * groups);
    load_row<T, bits>(gr.d_out, row, D, 1.0f, st.d_out.data() + r * D, groups, gs,
        st.d_out_sums.data() + r * groups);
  }
  for (int64_t j0 = first; j0 < last; j0 += kKeyBlock) {
    const int64_t n = std::min<int64_t>(kKeyBlock, last - j0);
    const Tile kt = load_tile<T, bits>(a, a.k, t.b, t.hkv, j0, n, st.k_tile);
    const Tile vt = load_tile<T, bits>(a, a.v, t.b, t.hkv, j0, n, st.v_tile);
    for (int64_t r0 = 0; r0 < R; r0 += kRows) {
      const int64_t nr = std::min<int64_t>(kRows, R - r0);
      int64_t begin = j0 + n, end = j0, m_row[kRows];
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = r0 + i, b = std::max(st.lo[r], j0), e = std::min(st.hi[r], j0 + n);
        if (b < e) begin = std::min(begin, b), end = std::max(end, e);
        m_row[i] = mask_row(a, t.b, t.hkv * G + r / n_l, t.l0 + r % n_l);
      }
      for (int64_t j = begin; j < end; ++j) {
        float s[kRows], dp[kRows], ds[kRows];
        row_dots<bits>(nr, st.q.data() + r0 * D, st.q_sums.data() + r0 * groups, kt, j - j0, D, gs, s);
        row_dots<bits>(nr, st.d_out.data() + r0 * D, st.d_out_sums.data() + r0 * groups, vt, j - j0, D, gs, dp);
        bool any = false;
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t r = r0 + i, row = row_of(r);
          const bool seen = j >= st.lo[r] && j < st.hi[r];
          const float p = seen ? exp_nonpositive(apply_mask(a, m_row[i], j, s[i]) - gr.lse[row]) : 0.0f;
          ds[i] = p * (dp[i] - gr.delta[row]);
          any |= ds[i] != 0.0f;
        }
        if (!any) continue;
        float* acc = st.acc.data() + r0 * D;
        float* acc_groups = st.acc_groups.data() + r0 * groups;
        if (nr == kRows) {
          tile_axpy<kRows, bits>(ds, kt, j - j0, acc, acc_groups, D, gs);
        } else {
          for (int64_t i = 0; i < nr; ++i)
            tile_axpy<1, bits>(ds + i, kt, j - j0, acc + i * D, acc_groups + i * groups, D, gs);
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* dq = st.acc.data() + r * D;
    for (int64_t d = 0; d < D && groups; ++d) dq[d] += st.acc_groups[r * groups + d / gs];
    from_code_order<bits>(dq, D);
    for (int64_t d = 0; d < D; ++d) store_float<T>(gr.dq, row_of(r) * D + d, a.scale * dq[d]);
  }
}

template <FloatType T>
void backward_dkv(const AttentionArgs& a, const AttentionGrads& gr, const AttentionTask& t) {
  const int64_t D = a.D, G = a.Hq / a.Hkv, n = t.s1 - t.s0;
  thread_local BackwardState st;
  st.q.resize(kRows * D);
  st.d_out.resize(kRows * D);
  st.acc.assign(2 * n * D, 0.0f); // dk rows, then dv rows
  float* dk = st.acc.data();
  float* dv = dk + n * D;
  const Tile kt = load_tile<T, 0>(a, a.k, t.b, t.hkv, t.s0, n, st.k_tile);
  const Tile vt = load_tile<T, 0>(a, a.v, t.b, t.hkv, t.s0, n, st.v_tile);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = t.hkv * G + g;
    for (int64_t i0 = 0; i0 < a.L; i0 += kRows) {
      const int64_t nr = std::min<int64_t>(kRows, a.L - i0);
      int64_t lo[kRows], hi[kRows], m_row[kRows], begin = n, end = 0;
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t row = (t.b * a.Hq + h) * a.L + i0 + i;
        visible_keys(a, t.b, i0 + i, lo[i], hi[i]);
        lo[i] = std::max(lo[i], t.s0) - t.s0;
        hi[i] = gr.lse[row] == kNegInf ? lo[i] : std::min(hi[i], t.s1) - t.s0;
        if (lo[i] < hi[i]) begin = std::min(begin, lo[i]), end = std::max(end, hi[i]);
        m_row[i] = mask_row(a, t.b, h, i0 + i);
      }
      if (begin >= end) continue; // no row of the group sees this block
      const int64_t row0 = (t.b * a.Hq + h) * a.L + i0;
      for (int64_t i = 0; i < nr; ++i) {
        load_row<T, 0>(a.q, row0 + i, D, a.scale, st.q.data() + i * D, 0, 0, nullptr);
        load_row<T, 0>(gr.d_out, row0 + i, D, 1.0f, st.d_out.data() + i * D, 0, 0, nullptr);
      }
      for (int64_t j = begin; j < end; ++j) {
        float s[kRows], dp[kRows], p[kRows], ds[kRows];
        row_dots<0>(nr, st.q.data(), nullptr, kt, j, D, 0, s);
        row_dots<0>(nr, st.d_out.data(), nullptr, vt, j, D, 0, dp);
        for (int64_t i = 0; i < nr; ++i) {
          const bool seen = j >= lo[i] && j < hi[i];
          p[i] = seen ? exp_nonpositive(apply_mask(a, m_row[i], t.s0 + j, s[i]) - gr.lse[row0 + i]) : 0.0f;
          ds[i] = p[i] * (dp[i] - gr.delta[row0 + i]);
        }
        combine_rows(nr, p, st.d_out.data(), D, dv + j * D);
        combine_rows(nr, ds, st.q.data(), D, dk + j * D);
      }
    }
  }
  const int64_t out0 = ((t.b * a.Hkv + t.hkv) * a.S + t.s0) * D; // dk, dv are contiguous
  for (int64_t e = 0; e < n * D; ++e) {
    store_float<T>(gr.dk, out0 + e, dk[e]);
    store_float<T>(gr.dv, out0 + e, dv[e]);
  }
}

template <FloatType T>
void dq_bits(const AttentionArgs& a, const AttentionGrads& gr, const AttentionTask& t) {
  switch (a.bits) {
    case 4: return backward_dq<T, 4>(a, gr, t);
    case 8: return backward_dq<T, 8>(a, gr, t);
    default: return backward_dq<T, 0>(a, gr, t);
  }
}

void dq_entry(const AttentionArgs& a, const AttentionGrads& gr, const AttentionTask& t) {
  switch (a.type) {
    case FloatType::f16: return dq_bits<FloatType::f16>(a, gr, t);
    case FloatType::bf16: return dq_bits<FloatType::bf16>(a, gr, t);
    default: return dq_bits<FloatType::f32>(a, gr, t);
  }
}

void dkv_entry(const AttentionArgs& a, const AttentionGrads& gr, const AttentionTask& t) {
  switch (a.type) {
    case FloatType::f16: return backward_dkv<FloatType::f16>(a, gr, t);
    case FloatType::bf16: return backward_dkv<FloatType::bf16>(a, gr, t);
    default: return backward_dkv<FloatType::f32>(a, gr, t);
  }
}

} // namespace

extern const AttentionBackwardKernels attention_backward_kernels = {dq_entry, dkv_entry};

} // namespace mlx_ext::cpu::MLX_EXT_ISA_NS
