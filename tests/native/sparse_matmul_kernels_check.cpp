// Drives the sparse matmul CPU kernels of every ISA compiled into this binary
// through the driver (x W^T, x W and the sampled product of the values'
// gradient) for each format, on random patterns, against a float64
// reference. Used for ISAs the test machine cannot run natively (NEON under
// qemu on x86-64). Exit status 0 and one "ok <isa>: <n> cases" line per ISA
// when everything agrees. tests/test_cpu_kernels_arm64.py builds it with the
// sparse matmul's ISA_SOURCES, the common CPU sources and the sources named here:
// sources: csrc/sparse_matmul/cpu_driver.cpp
// cases per isa: 120
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#define MLX_EXT_ISA_scalar 1 // the conversion helpers, baseline build
#include "float_buffer.h"
#include "sparse_matmul/cpu_driver.h"

using namespace mlx_ext::cpu;

namespace {

// K: two and a half 64-column prefill blocks; N: two BSR block rows of 32.
constexpr int kN = 64, kK = 160;

// One format's arrays, built from a dense W whose zeros are not stored.
struct Stored {
  SparseW w{};
  Buffer values;
  std::vector<uint16_t> columns16;
  std::vector<int32_t> columns32, row_ptr;
  std::vector<uint32_t> words;
  std::vector<double> dense; // W as the kernels see it (values rounded)
  std::vector<int64_t> dense_index; // of each stored value in W, in storage order
  explicit Stored(FloatType t) : values(t, kN * kK) {}
  void keep(int64_t index, float v) {
    values.set(dense_index.size(), v);
    dense[index] = values.get(dense_index.size());
    dense_index.push_back(index);
  }
};

// Fills s (in place: s.w points into its vectors).
void make(Stored& s, SparseKind kind, FloatType type, int kBlock, std::mt19937& rng) {
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  s.dense.assign(kN * kK, 0.0);
  s.w.kind = kind;
  s.w.value_type = type;
  s.w.N = kN;
  s.w.K = kK;
  if (kind == SparseKind::nm) { // 2:4 along K: codes of 2 bits, 16 per word
    s.w.n = 2, s.w.m = 4, s.w.code_bits = 2;
    const int kept = kK / 2, words = kept / 16;
    s.words.assign(kN * words, 0u);
    for (int r = 0; r < kN; ++r)
      for (int g = 0; g < kK / 4; ++g) {
        const int first = int(rng() % 3), second = first + 1 + int(rng() % (3 - first));
        for (int e = 0; e < 2; ++e) {
          const int j = 2 * g + e, pos = e ? second : first;
          s.words[r * words + j / 16] |= uint32_t(pos) << (2 * (j % 16));
          s.keep(int64_t(r) * kK + 4 * g + pos, unit(rng));
        }
      }
  } else if (kind == SparseKind::bsr) { // kBlock x kBlock blocks (8: no register tile on
    // AVX-512; 32: the tile on every ISA), about half stored
    s.w.block_n = s.w.block_k = kBlock;
    s.row_ptr.push_back(0);
    for (int br = 0; br < kN / kBlock; ++br) {
      for (int bc = 0; bc < kK / kBlock; ++bc) {
        if (rng() % 2) continue;
        s.columns32.push_back(bc);
        for (int i = 0; i < kBlock; ++i)
          for (int j = 0; j < kBlock; ++j)
            s.keep(int64_t(br * kBlock + i) * kK + bc * kBlock + j, unit(rng));
      }
      s.row_ptr.push_back(int32_t(s.columns32.size()));
    }
  } else { // csr or bitmask: about a third stored, row 3 empty
    const int words = kK / 32;
    s.words.assign(kN * words, 0u);
    s.row_ptr.push_back(0);
    for (int r = 0; r < kN; ++r) {
      for (int c = 0; c < kK; ++c) {
        if (r == 3 || rng() % 3) continue;
        s.columns16.push_back(uint16_t(c));
        s.words[r * words + c / 32] |= 1u << (c % 32);
        s.keep(int64_t(r) * kK + c, unit(rng));
      }
      s.row_ptr.push_back(int32_t(s.dense_index.size()));
    }
  }
  s.w.values = s.values.data();
  s.w.row_ptr = s.row_ptr.empty() ? nullptr : s.row_ptr.data();
  if (kind == SparseKind::csr) s.w.pattern = s.columns16.data();
  else if (kind == SparseKind::bsr) s.w.pattern = s.columns32.data();
  else s.w.pattern = s.words.data();
}

bool close(double got, double want, double scale, const char* what) {
  if (std::fabs(got - want) <= 1e-5 * scale + 1e-30) return true;
  std::printf("FAIL %s: got %.9g, want %.9g\n", what, got, want);
  return false;
}

// out = x W^T (transpose) or x W with bias, and the sampled product.
bool check(const SparseKernelTable& kt, const Stored& s, int64_t M, bool transpose, std::mt19937& rng) {
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  const int64_t in = transpose ? kK : kN, outs = transpose ? kN : kK;
  std::vector<float> x(M * in), bias(outs), out(M * outs, NAN);
  for (auto& v : x) v = unit(rng);
  for (auto& v : bias) v = unit(rng);
  run_sparse_matmul(kt, s.w, x.data(), M, SparseOut{out.data(), FloatType::f32, bias.data()}, transpose);
  bool ok = true;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < outs; ++o) {
      double want = bias[o], scale = std::fabs(bias[o]);
      for (int64_t i = 0; i < in; ++i) {
        const double w = transpose ? s.dense[o * kK + i] : s.dense[i * kK + o];
        want += x[m * in + i] * w;
        scale += std::fabs(x[m * in + i] * w);
      }
      ok &= close(out[m * outs + o], want, scale, transpose ? "x W^T" : "x W");
    }
  if (!transpose) return ok;
  // dvalues[j] = sum_m g[m, row_j] x[m, col_j], in the values' type.
  std::vector<float> g(M * kN);
  for (auto& v : g) v = unit(rng);
  Buffer dvalues(s.w.value_type, s.dense_index.size());
  run_sparse_sampled(kt, s.w, g.data(), x.data(), M, dvalues.data());
  const double eps = s.w.value_type == FloatType::f32 ? 0 : s.w.value_type == FloatType::f16 ? 0x1p-11 : 0x1p-8;
  for (size_t j = 0; j < s.dense_index.size(); ++j) {
    const int64_t r = s.dense_index[j] / kK, c = s.dense_index[j] % kK;
    double want = 0, scale = 0;
    for (int64_t m = 0; m < M; ++m) {
      want += double(g[m * kN + r]) * x[m * kK + c];
      scale += std::fabs(double(g[m * kN + r]) * x[m * kK + c]);
    }
    // float16 rounding is absolute below its normal range (2^-14): half an ulp there is 2^-25.
    const double floor = s.w.value_type == FloatType::f16 ? 0x1p-25 : 0;
    ok &= close(dvalues.get(j), want, scale + (eps * std::fabs(want) + floor) / 1e-5, "sampled");
  }
  return ok;
}

} // namespace

int main() {
  int failures = 0;
  for (Isa isa : {Isa::scalar, Isa::neon, Isa::avx2, Isa::avx512}) {
    const auto& kt = sparse_matmul_kernels_for(isa);
    if (isa != Isa::scalar && &kt == &sparse_matmul_kernels_for(Isa::scalar)) continue; // not compiled in
    std::mt19937 rng(11);
    int cases = 0, failed = 0;
    for (SparseKind kind : {SparseKind::csr, SparseKind::bitmask, SparseKind::bsr, SparseKind::nm})
      for (FloatType type : {FloatType::f32, FloatType::f16, FloatType::bf16})
        for (int block : {8, 32}) {
          if (block != 8 && kind != SparseKind::bsr) continue;
          Stored s(type);
          make(s, kind, type, block, rng);
          // 37: register-tile panels and a partial last one on every ISA;
          // 130: float 2:4's 128-row panels on AVX-512, and a partial one.
          for (int64_t M : {1, 3, 37, 130})
            for (bool transpose : {true, false}) {
              failed += !check(kt, s, M, transpose, rng);
              ++cases;
            }
        }
    failures += failed;
    if (!failed) std::printf("ok %s: %d cases\n", isa_name(isa).c_str(), cases);
  }
  return failures ? 1 : 0;
}
