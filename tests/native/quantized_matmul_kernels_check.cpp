// Drives the CPU quantized matmul of every ISA compiled into this binary
// through the driver, on random problems, against a float64 reference. Used to
// test ISAs the test machine cannot run natively (NEON under qemu on x86-64).
// Exit status 0 and one "ok <isa>: <n> cases" line per ISA when everything
// agrees. tests/test_cpu_kernels_arm64.py links it with the operator's
// ISA_SOURCES, the common CPU sources and the sources named here:
// sources: csrc/quantized_matmul/cpu_driver.cpp
// cases per isa: 504
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#define MLX_EXT_ISA_scalar 1 // the conversion helpers, baseline build
#include "common/fp_formats.h"
#include "quantized_matmul/cpu_driver.h"
#include "float_buffer.h"

using namespace mlx_ext::cpu;

namespace {

int64_t value_at(const std::vector<uint8_t>& w, int64_t row_bytes, int64_t r, int64_t c, int bits) {
  int64_t v = 0;
  for (int b = 0; b < bits; ++b) {
    const int64_t bit = c * bits + b;
    v |= int64_t((w[r * row_bytes + bit / 8] >> (bit % 8)) & 1) << b;
  }
  return v;
}

bool check(const KernelTable& kt, std::mt19937& rng, int bits, int gs, bool transpose, int64_t M,
           int64_t N, int64_t K, FloatType type, bool with_bias) {
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  const int64_t rows = transpose ? N : K, cols = transpose ? K : N;
  const int64_t row_bytes = cols * bits / 8, groups = cols / gs;
  std::vector<uint8_t> w(rows * row_bytes);
  for (auto& b : w) b = uint8_t(rng());
  Buffer scales(type, rows * groups), biases(type, rows * groups), bias(type, N), out(type, M * N);
  for (int64_t i = 0; i < rows * groups; ++i) scales.set(i, 0.1f * unit(rng)), biases.set(i, 0.5f * unit(rng));
  for (int64_t i = 0; i < N; ++i) bias.set(i, unit(rng));
  std::vector<float> x(M * K);
  for (auto& v : x) v = unit(rng);

  QmmArgs a{};
  a.x = x.data(); a.w = w.data(); a.scales = scales.data(); a.biases = biases.data();
  a.bias = with_bias ? bias.data() : nullptr; a.out = out.data(); a.type = type;
  a.M = M; a.N = N; a.K = K; a.group_size = gs; a.bits = bits;
  run_quantized_matmul(kt, a, transpose);

  const double eps_out = type == FloatType::f32 ? 0x1p-24 : type == FloatType::f16 ? 0x1p-11 : 0x1p-8;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double want = with_bias ? bias.get(n) : 0.0, mag = std::fabs(want);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = transpose ? n : k, c = transpose ? k : n;
        const double s = scales.get(r * groups + c / gs), b = biases.get(r * groups + c / gs);
        const double q = double(value_at(w, row_bytes, r, c, bits));
        want += x[m * K + k] * (s * q + b);
        mag += std::fabs(x[m * K + k]) * (std::fabs(s) * q + std::fabs(b));
      }
      const double got = out.get(m * N + n);
      const double tol = 2 * (K + 4) * 0x1p-24 * mag + eps_out * std::fabs(want) + 1e-30;
      if (!(std::fabs(got - want) <= tol)) {
        std::printf("FAIL %s bits=%d gs=%d transpose=%d M=%ld N=%ld K=%ld type=%d bias=%d at (%ld,%ld): "
                    "got %.9g want %.9g\n", kt.isa, bits, gs, int(transpose), long(M), long(N), long(K),
                    int(type), int(with_bias), long(m), long(n), got, want);
        return false;
      }
    }
  return true;
}

// The fp modes (common/fp_formats.h): random codes (not mxfp8's NaN) and
// scale bytes, through quantized_matmul_fp_kernels.
bool check_fp(const KernelTable& kt, std::mt19937& rng, mlx_ext::QuantMode mode, bool transpose, int64_t M, int64_t N,
              int64_t K, FloatType type, bool with_bias) {
  using mlx_ext::QuantMode;
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  const auto spec = mlx_ext::mode_spec(mode);
  const int bits = spec.bits, gs = spec.group_size;
  const int64_t rows = transpose ? N : K, cols = transpose ? K : N;
  const int64_t row_bytes = cols * bits / 8, groups = cols / gs;
  std::vector<uint8_t> w(rows * row_bytes), scales(rows * groups);
  for (auto& b : w) {
    b = uint8_t(rng());
    if (bits == 8 && (b & 0x7f) == 0x7f) b -= 1;
  }
  for (auto& s : scales) s = mode == QuantMode::nvfp4 ? uint8_t(rng() % 0x58) : uint8_t(121 + rng() % 9);
  Buffer bias(type, N), out(type, M * N);
  for (int64_t i = 0; i < N; ++i) bias.set(i, unit(rng));
  std::vector<float> x(M * K);
  for (auto& v : x) v = unit(rng);

  QmmArgs a{};
  a.x = x.data(); a.w = w.data(); a.scales = scales.data(); a.biases = nullptr;
  a.bias = with_bias ? bias.data() : nullptr; a.out = out.data(); a.type = type;
  a.M = M; a.N = N; a.K = K; a.group_size = gs; a.bits = bits; a.mode = int(mode);
  run_quantized_matmul(kt, a, transpose);

  const double eps_out = type == FloatType::f32 ? 0x1p-24 : type == FloatType::f16 ? 0x1p-11 : 0x1p-8;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double want = with_bias ? bias.get(n) : 0.0, mag = std::fabs(want);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = transpose ? n : k, c = transpose ? k : n;
        const double s = mlx_ext::fp_scale_to_float(mode, scales[r * groups + c / gs]);
        const auto code = uint8_t(value_at(w, row_bytes, r, c, bits));
        const double v = s * (bits == 8 ? mlx_ext::e4m3_to_float(code) : mlx_ext::e2m1_to_float(code));
        want += x[m * K + k] * v;
        mag += std::fabs(x[m * K + k] * v);
      }
      const double got = out.get(m * N + n);
      const double tol = 2 * (K + 4) * 0x1p-24 * mag + eps_out * std::fabs(want) + 1e-30;
      if (!(std::fabs(got - want) <= tol)) {
        std::printf("FAIL %s mode=%s transpose=%d M=%ld N=%ld K=%ld type=%d bias=%d at (%ld,%ld): "
                    "got %.9g want %.9g\n", kt.isa, mlx_ext::mode_name(mode), int(transpose), long(M), long(N),
                    long(K), int(type), int(with_bias), long(m), long(n), got, want);
        return false;
      }
    }
  return true;
}

} // namespace

int main() {
  std::mt19937 rng(1234);
  bool all_ok = true;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::neon}) {
    const KernelTable& kt = quantized_matmul_kernels_for(isa);
    if (isa_name(isa) != kt.isa) continue; // not compiled into this binary
    int cases = 0;
    bool ok = true;
    for (int bits : {2, 3, 4, 5, 6, 8})
      for (int gs : {32, 64, 128})
        for (bool transpose : {true, false})
          for (int64_t M : {1, 3, 6, 13})
            for (FloatType type : {FloatType::f32, FloatType::f16, FloatType::bf16}) {
              const int64_t K = transpose ? 2 * gs + (gs == 32 ? 288 : 256) : 40 + M;
              const int64_t N = transpose ? 19 + M : gs * (1 + M % 3);
              ok &= check(kt, rng, bits, gs, transpose, M, N, K, type, (M + bits) % 2 == 0);
              ++cases;
            }
    const KernelTable& fp = quantized_matmul_fp_kernels_for(isa);
    for (auto mode : {mlx_ext::QuantMode::mxfp4, mlx_ext::QuantMode::nvfp4, mlx_ext::QuantMode::mxfp8})
      for (bool transpose : {true, false})
        for (int64_t M : {1, 3, 6, 13})
          for (FloatType type : {FloatType::f32, FloatType::f16, FloatType::bf16}) {
            // nvfp4: a row ending on half a block of 32 and GEMM K blocks of 256 + 16.
            const int64_t gs = mlx_ext::mode_spec(mode).group_size;
            const int64_t K = transpose ? 256 + gs * (1 + M % 3) : 40 + M;
            const int64_t N = transpose ? 19 + M : gs * (1 + M % 3);
            ok &= check_fp(fp, rng, mode, transpose, M, N, K, type, (M + int(mode)) % 2 == 0);
            ++cases;
          }
    std::printf("%s %s: %d cases\n", ok ? "ok" : "FAILED", kt.isa, cases);
    all_ok &= ok;
  }
  return all_ok ? 0 : 1;
}
