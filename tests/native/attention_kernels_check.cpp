// Drives the attention CPU kernels of every ISA compiled into this binary
// through the driver (forward, and the backward for float K/V), on random
// problems, against a float64 reference of tests/reference.py's definition.
// Used for ISAs the test machine cannot run natively (NEON under qemu on
// x86-64). Exit status 0 and one "ok <isa>: <n> cases" line per ISA when
// everything agrees. tests/test_cpu_kernels_arm64.py builds it with the
// attention's ISA_SOURCES, the common CPU sources and the sources named here:
// sources: csrc/attention/cpu_driver.cpp
// cases per isa: 72
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#define MLX_EXT_ISA_scalar 1 // the conversion helpers, baseline build
#include "attention/cpu_driver.h"
#include "float_buffer.h"

using namespace mlx_ext::cpu;

namespace {

struct Problem {
  int64_t B, Hq, Hkv, L, S, D;
  FloatType type;
  int bits, group_size, window;
  bool causal, sinks, lengths;
  int mask; // 0 none, 1 bool, 2 additive; shape (1, Hq, L, S) or (B, 1, 1, S)
  bool mask_per_head;
};

struct Data {
  Buffer q, k, v, k_s, k_b, v_s, v_b, d_out;
  std::vector<uint8_t> k_codes, v_codes, mask_bool;
  std::vector<float> mask_add, sinks;
  std::vector<int32_t> lengths;
};

double kv_value(const Problem& p, const Data& d, bool is_k, int64_t row, int64_t c) {
  if (!p.bits) return (is_k ? d.k : d.v).get(row * p.D + c);
  const auto& codes = is_k ? d.k_codes : d.v_codes;
  const int64_t bit = (row * p.D + c) * p.bits;
  const int q = (codes[bit / 8] >> (bit % 8)) & ((1 << p.bits) - 1);
  const int64_t g = row * (p.D / p.group_size) + c / p.group_size;
  return (is_k ? d.k_s : d.v_s).get(g) * q + (is_k ? d.k_b : d.v_b).get(g);
}

int64_t mask_at(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return p.mask_per_head ? (h * p.L + i) * p.S + j : b * p.S + j;
}

// Probabilities of row (b, h, i) over the keys (and the sink's in `sink_p`).
std::vector<double> probabilities(const Problem& p, const Data& d, int64_t b, int64_t h, int64_t i,
    double& sink_p) {
  const int64_t len = p.lengths ? std::clamp<int64_t>(d.lengths[b], 0, p.S) : p.S;
  const int64_t pos = i + len - p.L, hk = h / (p.Hq / p.Hkv);
  std::vector<double> logit(p.S, -INFINITY);
  double top = p.sinks ? d.sinks[h] : -INFINITY;
  for (int64_t j = 0; j < len; ++j) {
    if ((p.causal || p.window) && j > pos) continue;
    if (p.window && j <= pos - p.window) continue;
    if (p.mask == 1 && !d.mask_bool[mask_at(p, b, h, i, j)]) continue;
    double s = 0;
    for (int64_t c = 0; c < p.D; ++c)
      s += d.q.get(((b * p.Hq + h) * p.L + i) * p.D + c) * kv_value(p, d, true, (b * p.Hkv + hk) * p.S + j, c);
    logit[j] = s / std::sqrt(double(p.D)) + (p.mask == 2 ? d.mask_add[mask_at(p, b, h, i, j)] : 0.0);
    top = std::max(top, logit[j]);
  }
  std::vector<double> prob(p.S, 0.0);
  sink_p = 0;
  if (top == -INFINITY) return prob;
  double total = p.sinks ? std::exp(d.sinks[h] - top) : 0.0;
  for (int64_t j = 0; j < p.S; ++j) total += logit[j] == -INFINITY ? 0.0 : std::exp(logit[j] - top);
  for (int64_t j = 0; j < p.S; ++j) prob[j] = logit[j] == -INFINITY ? 0.0 : std::exp(logit[j] - top) / total;
  if (p.sinks) sink_p = std::exp(d.sinks[h] - top) / total;
  return prob;
}

// |got - want| within float32 error over the row's scale, plus one rounding
// to the problem's type.
double type_eps(const Problem& p) {
  return p.type == FloatType::f32 ? 0x1p-24 : p.type == FloatType::f16 ? 0x1p-11 : 0x1p-8;
}

bool close(double got, double want, double scale, const char* what, const Problem& p, double extra = 0) {
  if (std::abs(got - want) <= 2e-3 * scale + type_eps(p) * std::abs(want) + extra + 1e-6) return true;
  std::printf("FAIL %s: got %g want %g (scale %g) type=%d B=%ld Hq=%ld Hkv=%ld L=%ld S=%ld D=%ld bits=%d mask=%d\n",
      what, got, want, scale, int(p.type), long(p.B), long(p.Hq), long(p.Hkv), long(p.L), long(p.S), long(p.D),
      p.bits, p.mask);
  return false;
}

bool check(const AttentionKernels& fwd, const AttentionBackwardKernels& bwd, const Problem& p, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> byte(0, 255);
  const int64_t nq = p.B * p.Hq * p.L * p.D, nkv = p.B * p.Hkv * p.S * p.D;
  const int64_t groups = p.bits ? p.B * p.Hkv * p.S * (p.D / p.group_size) : 0;
  Data d{Buffer(p.type, nq), Buffer(p.type, p.bits ? 0 : nkv), Buffer(p.type, p.bits ? 0 : nkv),
      Buffer(p.type, groups), Buffer(p.type, groups), Buffer(p.type, groups), Buffer(p.type, groups),
      Buffer(p.type, nq)};
  for (int64_t i = 0; i < nq; ++i) d.q.set(i, normal(rng)), d.d_out.set(i, normal(rng));
  for (int64_t i = 0; i < (p.bits ? 0 : nkv); ++i) d.k.set(i, normal(rng)), d.v.set(i, normal(rng));
  for (int64_t i = 0; i < groups; ++i) {
    // Values of order 1, as float K/V: softmax not saturated.
    const float range = p.bits == 8 ? 1.0f / 128 : 1.0f / 8;
    d.k_s.set(i, range * normal(rng)), d.k_b.set(i, normal(rng));
    d.v_s.set(i, range * normal(rng)), d.v_b.set(i, normal(rng));
  }
  for (int64_t i = 0; i < (p.bits ? nkv * p.bits / 8 : 0); ++i) d.k_codes.push_back(byte(rng)), d.v_codes.push_back(byte(rng));
  const int64_t n_mask = p.mask_per_head ? p.Hq * p.L * p.S : p.B * p.S;
  for (int64_t i = 0; i < n_mask; ++i) d.mask_bool.push_back(byte(rng) < 180), d.mask_add.push_back(normal(rng));
  for (int64_t h = 0; h < p.Hq; ++h) d.sinks.push_back(normal(rng));
  for (int64_t b = 0; b < p.B; ++b) d.lengths.push_back(int32_t(byte(rng) % (p.S + 3)) - 1);

  AttentionArgs a{};
  a.q = d.q.data();
  const int64_t head_rows = p.S, batch_rows = p.Hkv * p.S;
  a.k.x = {p.bits ? static_cast<const void*>(d.k_codes.data()) : d.k.data(), batch_rows, head_rows};
  a.v.x = {p.bits ? static_cast<const void*>(d.v_codes.data()) : d.v.data(), batch_rows, head_rows};
  a.k.scales = {d.k_s.data(), batch_rows, head_rows};
  a.k.biases = {d.k_b.data(), batch_rows, head_rows};
  a.v.scales = {d.v_s.data(), batch_rows, head_rows};
  a.v.biases = {d.v_b.data(), batch_rows, head_rows};
  if (p.mask) {
    a.mask = p.mask == 1 ? static_cast<const void*>(d.mask_bool.data()) : d.mask_add.data();
    a.mask_is_bool = p.mask == 1;
    const int64_t s[4] = {0, p.L * p.S, p.S, 1}, t[4] = {p.S, 0, 0, 1};
    std::memcpy(a.mask_strides, p.mask_per_head ? s : t, sizeof(s));
  }
  a.sinks = p.sinks ? d.sinks.data() : nullptr;
  a.kv_lengths = p.lengths ? d.lengths.data() : nullptr;
  Buffer out(p.type, nq);
  std::vector<float> lse(p.B * p.Hq * p.L);
  a.out = out.data();
  a.lse = lse.data();
  a.type = p.type;
  a.B = p.B, a.Hq = p.Hq, a.Hkv = p.Hkv, a.L = p.L, a.S = p.S, a.D = p.D;
  a.scale = float(1.0 / std::sqrt(double(p.D)));
  a.causal = p.causal || p.window;
  a.window = p.window;
  a.bits = p.bits;
  a.group_size = p.group_size;
  run_attention(fwd, a);

  // Backward (float K/V): delta from the kernel's out, as the op computes it.
  std::vector<float> delta(p.B * p.Hq * p.L);
  for (size_t r = 0; r < delta.size(); ++r) {
    double s = 0;
    for (int64_t c = 0; c < p.D; ++c) s += d.d_out.get(r * p.D + c) * out.get(r * p.D + c);
    delta[r] = float(s);
  }
  Buffer dq(p.type, nq), dk(p.type, p.bits ? 0 : nkv), dv(p.type, p.bits ? 0 : nkv);
  AttentionGrads g{d.d_out.data(), lse.data(), delta.data(), dq.data(), p.bits ? nullptr : dk.data(),
      p.bits ? nullptr : dv.data()};
  run_attention_backward(bwd, fwd.key_block, a, g);

  std::vector<double> want_dk(p.bits ? 0 : nkv, 0.0), want_dv(p.bits ? 0 : nkv, 0.0);
  const double scale = 1.0 / std::sqrt(double(p.D));
  bool ok = true;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < p.L; ++i) {
        double sink_p;
        const auto prob = probabilities(p, d, b, h, i, sink_p);
        const int64_t row = (b * p.Hq + h) * p.L + i, kv0 = (b * p.Hkv + h / (p.Hq / p.Hkv)) * p.S;
        std::vector<double> o(p.D, 0.0), dq_want(p.D, 0.0), dp(p.S, 0.0);
        double mag = 1e-30, row_delta = 0, delta_abs = 0, k_mag = 0;
        for (int64_t j = 0; j < p.S; ++j)
          for (int64_t c = 0; c < p.D && prob[j] > 0; ++c) {
            o[c] += prob[j] * kv_value(p, d, false, kv0 + j, c);
            mag = std::max(mag, std::abs(kv_value(p, d, false, kv0 + j, c)));
            dp[j] += d.d_out.get(row * p.D + c) * kv_value(p, d, false, kv0 + j, c);
          }
        for (int64_t c = 0; c < p.D; ++c) {
          ok &= close(out.get(row * p.D + c), o[c], mag, "out", p);
          row_delta += d.d_out.get(row * p.D + c) * o[c];
          delta_abs += std::abs(d.d_out.get(row * p.D + c) * o[c]);
        }
        for (int64_t j = 0; j < p.S; ++j) {
          const double ds = prob[j] * (dp[j] - row_delta);
          for (int64_t c = 0; c < p.D && prob[j] > 0; ++c) {
            dq_want[c] += scale * ds * kv_value(p, d, true, kv0 + j, c);
            k_mag = std::max(k_mag, std::abs(kv_value(p, d, true, kv0 + j, c)));
            if (p.bits) continue;
            want_dk[(kv0 + j) * p.D + c] += scale * ds * d.q.get(row * p.D + c);
            want_dv[(kv0 + j) * p.D + c] += prob[j] * d.d_out.get(row * p.D + c);
          }
        }
        double dq_mag = 1e-30;
        for (double x : dq_want) dq_mag = std::max(dq_mag, std::abs(x));
        // delta comes from out rounded to the type: each p_j (dp_j - delta) is
        // off by p_j eps sum |dO o|, dq by scale eps sum |dO o| max |k|.
        const double delta_err = 2 * type_eps(p) * delta_abs * scale * k_mag;
        for (int64_t c = 0; c < p.D; ++c)
          ok &= close(dq.get(row * p.D + c), dq_want[c], 4 * dq_mag, "dq", p, delta_err);
      }
  double dk_mag = 1e-30, dv_mag = 1e-30;
  for (size_t e = 0; e < want_dk.size(); ++e)
    dk_mag = std::max(dk_mag, std::abs(want_dk[e])), dv_mag = std::max(dv_mag, std::abs(want_dv[e]));
  for (size_t e = 0; e < want_dk.size(); ++e) {
    ok &= close(dk.get(e), want_dk[e], 4 * dk_mag, "dk", p);
    ok &= close(dv.get(e), want_dv[e], 4 * dv_mag, "dv", p);
  }
  return ok;
}

} // namespace

int main() {
  int failures = 0;
  for (Isa isa : {Isa::scalar, Isa::neon, Isa::avx2, Isa::avx512}) {
    const auto& fwd = attention_kernels_for(isa);
    const auto& bwd = attention_backward_kernels_for(isa);
    if (isa != Isa::scalar && &fwd == &attention_kernels_for(Isa::scalar)) continue; // not compiled in
    std::mt19937 rng(7);
    int cases = 0, failed = 0;
    for (FloatType type : {FloatType::f32, FloatType::f16, FloatType::bf16})
      for (int bits : {0, 4, 8})
        for (int variant = 0; variant < 8; ++variant) {
          Problem p{};
          p.B = 1 + variant % 2;
          p.Hkv = 1 + variant % 2;
          p.Hq = p.Hkv * (variant < 4 ? 1 : 4);
          p.L = variant % 3 == 0 ? 1 : 1 + variant * 4;
          p.S = p.L + 20 + variant * 13; // > key_block from variant 3 on
          p.D = bits ? 64 : (variant % 2 ? 24 : 64);
          p.type = type;
          p.bits = bits;
          p.group_size = variant % 2 ? 32 : 64;
          p.causal = variant % 4 == 1;
          p.window = variant == 6 ? 17 : 0;
          p.sinks = variant % 3 == 2;
          p.lengths = variant == 3 || variant == 7;
          p.mask = variant % 3;
          p.mask_per_head = variant % 2;
          failed += !check(fwd, bwd, p, rng);
          ++cases;
        }
    failures += failed;
    if (!failed) std::printf("ok %s: %d cases\n", fwd.isa, cases);
  }
  return failures ? 1 : 0;
}
