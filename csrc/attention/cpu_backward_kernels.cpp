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
#include "attention/cpu_tiles.h"

namespace mlx_ext::cpu::MLX_EXT_ISA_NS {
namespace {

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
    for (int64_t r = 0; r < R; ++r) {
      const int64_t begin = std::max(st.lo[r], j0), end = std::min(st.hi[r], j0 + n);
      const int64_t row = row_of(r);
      const float lse = gr.lse[row], delta = gr.delta[row];
      const int64_t m_row = mask_row(a, t.b, t.hkv * G + r / n_l, t.l0 + r % n_l);
      const float* q = st.q.data() + r * D;
      const float* d_out = st.d_out.data() + r * D;
      for (int64_t j = begin; j < end; ++j) {
        float s, dp;
        tile_dot<1, bits>(q, st.q_sums.data() + r * groups, kt, j - j0, D, gs, &s);
        const float p = exp_nonpositive(apply_mask(a, m_row, j, s) - lse);
        if (p == 0.0f) continue;
        tile_dot<1, bits>(d_out, st.d_out_sums.data() + r * groups, vt, j - j0, D, gs, &dp);
        const float ds = p * (dp - delta);
        tile_axpy<1, bits>(&ds, kt, j - j0, st.acc.data() + r * D, st.acc_groups.data() + r * groups, D, gs);
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
  st.q.resize(D);
  st.d_out.resize(D);
  st.acc.assign(2 * n * D, 0.0f); // dk rows, then dv rows
  float* dk = st.acc.data();
  float* dv = dk + n * D;
  const Tile kt = load_tile<T, 0>(a, a.k, t.b, t.hkv, t.s0, n, st.k_tile);
  const Tile vt = load_tile<T, 0>(a, a.v, t.b, t.hkv, t.s0, n, st.v_tile);
  const Tile q_row{st.q.data(), nullptr, nullptr};
  const Tile d_out_row{st.d_out.data(), nullptr, nullptr};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = t.hkv * G + g;
    for (int64_t i = 0; i < a.L; ++i) {
      const int64_t row = (t.b * a.Hq + h) * a.L + i;
      int64_t lo, hi;
      visible_keys(a, t.b, i, lo, hi);
      lo = std::max(lo, t.s0);
      hi = std::min(hi, t.s1);
      const float lse = gr.lse[row], delta = gr.delta[row];
      if (lo >= hi || lse == kNegInf) continue;
      load_row<T, 0>(a.q, row, D, a.scale, st.q.data(), 0, 0, nullptr);
      load_row<T, 0>(gr.d_out, row, D, 1.0f, st.d_out.data(), 0, 0, nullptr);
      const int64_t m_row = mask_row(a, t.b, h, i);
      for (int64_t j = lo - t.s0; j < hi - t.s0; ++j) {
        float s, dp;
        tile_dot<1, 0>(st.q.data(), nullptr, kt, j, D, 0, &s);
        const float p = exp_nonpositive(apply_mask(a, m_row, t.s0 + j, s) - lse);
        if (p == 0.0f) continue;
        tile_dot<1, 0>(st.d_out.data(), nullptr, vt, j, D, 0, &dp);
        const float ds = p * (dp - delta);
        tile_axpy<1, 0>(&p, d_out_row, 0, dv + j * D, nullptr, D, 0);
        tile_axpy<1, 0>(&ds, q_row, 0, dk + j * D, nullptr, D, 0);
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
