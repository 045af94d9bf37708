// The CUDA kernels of the quantized matmul on their own, without MLX: checks
// each against a float64 reference on the host and times it with CUDA events,
// so kernel work can be measured apart from MLX's per-call costs.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        bench/cuda/quantized_matmul.cu -o /tmp/qmm_kernels && /tmp/qmm_kernels
//
// (scripts/gpu_kernels.sh builds and runs it on the GPU machine.) Prints one
// line per check and per timing; exits non-zero if a check fails.
#include "common.cuh"
#include "quantized_matmul/qmm_wgmma.cu"
#include "quantized_matmul/qmv.cu"
#include "quantized_matmul/qmv_tc.cu"

using mlx_ext::ceil_div;
using mlx_ext::cuda::QmmParams;

// The Hopper GEMM with parts of its work skipped (qmm_wgmma.cu's VARIANT),
// to see which part bounds it.
template <int VARIANT>
__global__ void __launch_bounds__(mlx_ext::cuda::WG_THREADS, 1) wgmma_bf16_b4_variant(const QmmParams p) {
  mlx_ext::cuda::qmm_t_wgmma<__nv_bfloat16, 4, VARIANT>(p);
}
// The tensor-core GEMV with U spans of loads in flight per lane.
template <int BITS, int U>
__global__ void __launch_bounds__(mlx_ext::cuda::QMV_TC_THREADS) qmv_tc_bf16_u(const QmmParams p) {
  mlx_ext::cuda::qmv_tc<__nv_bfloat16, BITS, U, 1>(p);
}

namespace {

// One problem's device buffers (16-bit activations), `copies` sets of weights.
struct Problem {
  int64_t M;
  int N, K, bits, gs;
  bool bf16;
  int copies;
  uint16_t *x = nullptr, *out = nullptr, *bias = nullptr;
  std::vector<uint32_t*> w;
  std::vector<uint16_t*> scales, biases;

  Problem(int64_t M_, int N_, int K_, int bits_, int gs_, bool bf16_, int copies_ = 1, bool with_bias = false)
      : M(M_), N(N_), K(K_), bits(bits_), gs(gs_), bf16(bf16_), copies(copies_) {
    CHECK(cudaMalloc(&x, M * K * 2));
    CHECK(cudaMalloc(&out, M * N * 2));
    fill(x, M * K, 11, -1.0f, 1.0f);
    if (with_bias) {
      CHECK(cudaMalloc(&bias, N * 2));
      fill(bias, N, 12, -0.5f, 0.5f);
    }
    for (int c = 0; c < copies; ++c) {
      uint32_t* wp;
      uint16_t *s, *b;
      const size_t words = size_t(N) * K * bits / 32, groups = size_t(N) * (K / gs);
      CHECK(cudaMalloc(&wp, words * 4));
      CHECK(cudaMalloc(&s, groups * 2));
      CHECK(cudaMalloc(&b, groups * 2));
      fill_words<<<1024, 256>>>(wp, words, 100 + c);
      fill(s, groups, 200 + c, 0.002f, 0.02f);
      fill(b, groups, 300 + c, -0.1f, 0.1f);
      w.push_back(wp), scales.push_back(s), biases.push_back(b);
    }
    CHECK(cudaDeviceSynchronize());
  }
  ~Problem() {
    cudaFree(x), cudaFree(out), cudaFree(bias);
    for (int c = 0; c < copies; ++c) cudaFree(w[c]), cudaFree(scales[c]), cudaFree(biases[c]);
  }
  void fill(uint16_t* p, size_t n, uint32_t seed, float lo, float hi) { fill_16bit(p, n, bf16, seed, lo, hi); }
  QmmParams params(int c) const {
    QmmParams p{};
    p.x = x, p.w = w[c], p.scales = scales[c], p.biases = biases[c], p.bias = bias, p.out = out;
    p.M = M, p.N = N, p.K = K, p.group_size = gs, p.bits = bits, p.k_split = 1;
    return p;
  }
  double bytes() const { return double(N) * K * bits / 8 + 2.0 * N * (K / gs) * 2; }
  double flops() const { return 2.0 * M * N * K; }

  // max |out - ref| / max |ref| over `samples` (m, n) (all when samples <= 0),
  // in float64 on the host from copies of copy 0's inputs; NaN if any output
  // is NaN (the output is poisoned with NaN before the kernel runs).
  double check(int samples) const {
    std::vector<uint16_t> hx(M * K), ho(M * N), hs(size_t(N) * (K / gs)), hb(hs.size()), hbias(N);
    std::vector<uint32_t> hw(size_t(N) * K * bits / 32);
    CHECK(cudaMemcpy(hx.data(), x, hx.size() * 2, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(ho.data(), out, ho.size() * 2, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(hw.data(), w[0], hw.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(hs.data(), scales[0], hs.size() * 2, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(hb.data(), biases[0], hb.size() * 2, cudaMemcpyDeviceToHost));
    if (bias) CHECK(cudaMemcpy(hbias.data(), bias, N * 2, cudaMemcpyDeviceToHost));
    const int64_t words_per_row = int64_t(K) * bits / 32;
    RelativeError error;
    for_each_sample(M * N, samples, [&](int64_t idx) {
      const int64_t m = idx / N, n = idx % N;
      double acc = bias ? to_host_float(hbias[n], bf16) : 0.0;
      const uint32_t* row = hw.data() + n * words_per_row;
      for (int k = 0; k < K; ++k) {
        const int64_t bit = int64_t(k) * bits;
        uint64_t pair = row[bit / 32];
        if (bit / 32 + 1 < words_per_row) pair |= uint64_t(row[bit / 32 + 1]) << 32;
        const uint32_t q = uint32_t(pair >> (bit % 32)) & ((1u << bits) - 1);
        const size_t g = size_t(n) * (K / gs) + k / gs;
        acc += double(to_host_float(hx[m * K + k], bf16)) *
               (double(to_host_float(hs[g], bf16)) * q + double(to_host_float(hb[g], bf16)));
      }
      error.add(to_host_float(ho[idx], bf16), acc);
    });
    return error.value();
  }
  void poison() const { ::poison(out, M * N * 2); }
};

struct Kernel {
  std::string name;
  void (*fn)(QmmParams);
  dim3 grid;
  int threads, smem;
};

Kernel gemv_old(const Problem& p) {
  auto fn = p.bits == 4 ? (p.bf16 ? qmv_t_bfloat16_b4_m1 : qmv_t_float16_b4_m1)
                        : (p.bf16 ? qmv_t_bfloat16_b8_m1 : qmv_t_float16_b8_m1);
  if (p.M > 1)
    fn = p.bits == 4 ? (p.bf16 ? qmv_t_bfloat16_b4_m8 : qmv_t_float16_b4_m8)
                     : (p.bf16 ? qmv_t_bfloat16_b8_m8 : qmv_t_float16_b8_m8);
  const int rows = mlx_ext::cuda::QMV_T_WARPS * mlx_ext::cuda::qmv_t_rows_per_warp(p.bits);
  return {"qmv_t (CUDA cores)", fn, dim3(ceil_div(p.N, rows), unsigned(ceil_div(p.M, 8))),
          mlx_ext::cuda::QMV_T_WARPS * 32, 0};
}

// The tensor-core GEMV with `rows` rows of x per block (8, or 16, 32:
// W dequantized once for all of them).
Kernel gemv_tc(const Problem& p, int rows = 8) {
  void (*fn)(QmmParams) = nullptr;
  if (rows == 8) {
    if (p.bf16)
      fn = p.bits == 2 ? qmv_tc_bfloat16_b2 : p.bits == 4 ? qmv_tc_bfloat16_b4 : qmv_tc_bfloat16_b8;
    else
      fn = p.bits == 2 ? qmv_tc_float16_b2 : p.bits == 4 ? qmv_tc_float16_b4 : qmv_tc_float16_b8;
  } else {
    void (*table[2][2][2])(QmmParams) = {  // [bf16][bits 4, 8][rows 16, 32]
        {{qmv_tc_float16_b4_m16, qmv_tc_float16_b4_m32},
         {qmv_tc_float16_b8_m16, qmv_tc_float16_b8_m32}},
        {{qmv_tc_bfloat16_b4_m16, qmv_tc_bfloat16_b4_m32},
         {qmv_tc_bfloat16_b8_m16, qmv_tc_bfloat16_b8_m32}}};
    fn = table[p.bf16][p.bits == 8][rows == 32];
  }
  using mlx_ext::cuda::QMV_TC_ROWS;
  return {"qmv_tc (mma.sync) x" + std::to_string(rows), fn,
          dim3(ceil_div(p.N, QMV_TC_ROWS), unsigned(ceil_div(p.M, rows))),
          mlx_ext::cuda::QMV_TC_THREADS, 0};
}

Kernel gemm_wgmma(const Problem& p) {
  using namespace mlx_ext::cuda;
  void (*table[2][9])(QmmParams) = {
      {nullptr, nullptr, qmm_t_wgmma_float16_b2, qmm_t_wgmma_float16_b3, qmm_t_wgmma_float16_b4,
       qmm_t_wgmma_float16_b5, qmm_t_wgmma_float16_b6, nullptr, qmm_t_wgmma_float16_b8},
      {nullptr, nullptr, qmm_t_wgmma_bfloat16_b2, qmm_t_wgmma_bfloat16_b3, qmm_t_wgmma_bfloat16_b4,
       qmm_t_wgmma_bfloat16_b5, qmm_t_wgmma_bfloat16_b6, nullptr, qmm_t_wgmma_bfloat16_b8}};
  auto fn = table[p.bf16][p.bits];
  const int smem = wg_smem_bytes(p.bits);
  CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  return {"qmm_t_wgmma", fn, dim3(ceil_div(p.N, WG_BN), unsigned(ceil_div(p.M, WG_BM))), WG_THREADS,
          smem};
}

void launch(const Kernel& k, const QmmParams& p, cudaStream_t s = 0) {
  k.fn<<<k.grid, k.threads, k.smem, s>>>(p);
}

void check(const char* what, const Problem& p, const Kernel& k, double tol = 1.5e-2) {
  p.poison();
  launch(k, p.params(0));
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  char label[128];
  std::snprintf(label, sizeof label, "%-20s %-5s bits %d gs %3d M %5lld N %6d K %6d bias %d", what,
                p.bf16 ? "bf16" : "f16", p.bits, p.gs, (long long)p.M, p.N, p.K, p.bias != nullptr);
  report_check(label, p.check(p.M * p.N > 200000 ? 4096 : 0), tol);
}

// Median microseconds per call: `reps` rounds of `calls` launches (rotating
// the weight copies), each round timed with events; in graph mode each round
// is one CUDA graph of `calls` independent kernel nodes, as MLX records them.
double time_us(const Problem& p, const Kernel& k, int calls, int reps, bool graph) {
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::vector<QmmParams> params(calls);
  for (int i = 0; i < calls; ++i) params[i] = p.params(i % p.copies);
  cudaGraphExec_t exec = graph ? kernel_graph(k.fn, k.grid, dim3(k.threads), k.smem, params) : nullptr;
  const double ms = median_round_ms(s, [&] {
    if (graph) CHECK(cudaGraphLaunch(exec, s));
    else
      for (int i = 0; i < calls; ++i) launch(k, params[i], s);
  }, reps);
  if (exec) cudaGraphExecDestroy(exec);
  cudaStreamDestroy(s);
  return 1e3 * ms / calls;
}

}  // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool quick = mode == "--checks-only";
  if (mode == "--profile") {  // one launch of each main kernel, for ncu
    Problem g(4096, 4096, 14336, 4, 64, true);
    launch(gemm_wgmma(g), g.params(0));
    Problem v(1, 14336, 4096, 4, 64, true);
    launch(gemv_tc(v), v.params(0));
    launch(gemv_old(v), v.params(0));
    CHECK(cudaDeviceSynchronize());
    return 0;
  }

  // Correctness: every bit width and group size of each kernel, odd shapes.
  for (bool bf : {true, false})
    for (int bits : {2, 4, 8})
      for (int gs : {32, 64, 128})
        for (int64_t M : {1, 3, 8, 13}) {
          Problem p(M, 200, 1024, bits, gs, bf, 1, M == 3);
          check("qmv_tc", p, gemv_tc(p));
        }
  for (bool bf : {true, false})
    for (int bits : {4, 8})
      for (int gs : {32, 64, 128})
        for (int64_t M : {9, 16, 29, 50, 64, 100})
          for (int rows : {16, 32}) {
            Problem p(M, 200, 1024, bits, gs, bf, 1, M == 29);
            check("qmv_tc rows", p, gemv_tc(p, rows));
          }
  for (bool bf : {true, false})
    for (int bits : {2, 3, 4, 5, 6, 8})
      for (int gs : {32, 64, 128})
        for (int K : {64, 128, 448, 640}) {
          if (K % gs) continue;
          Problem p(200, 300, K, bits, gs, bf, 1, gs == 64);
          check("qmm_t_wgmma", p, gemm_wgmma(p));
        }
  {
    Problem p(4096, 4096, 14336, 4, 64, true);
    check("qmm_t_wgmma", p, gemm_wgmma(p));
    Problem q(1, 14336, 4096, 4, 64, true);
    check("qmv_tc", q, gemv_tc(q));
    check("qmv_t", q, gemv_old(q));
  }
  std::printf("checks: %d failed\n", check_failures);
  if (quick) return check_failures ? 1 : 0;

  const double bw = copy_gbps();
  std::printf("\ncopy bandwidth %.0f GB/s (cudaMemcpy device to device, read + write)\n\n", bw);
  std::printf("| kernel | bits | M | N | K | mode | calls | us/call | GB/s | of copy BW | TFLOP/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  auto row = [&](const Problem& p, const Kernel& k, int calls, bool graph) {
    const double us = time_us(p, k, calls, 15, graph);
    std::printf("| %s | %d | %lld | %d | %d | %s | %d | %.1f | %.0f | %.2f | %.1f |\n", k.name.c_str(), p.bits,
                (long long)p.M, p.N, p.K, graph ? "graph" : "stream", calls, us, p.bytes() / us / 1e3,
                p.bytes() / us / 1e3 / bw, p.flops() / us / 1e6);
    std::fflush(stdout);
  };
  for (auto [N, K] : {std::pair{14336, 4096}, std::pair{4096, 4096}, std::pair{128256, 4096}})
    for (int bits : {4, 8})
      for (int64_t M : {1, 8}) {
        const double one = double(N) * K * bits / 8;
        Problem p(M, N, K, bits, 64, true, std::max(1, int(std::ceil(300e6 / one))));
        for (bool graph : {false, true}) {
          row(p, gemv_tc(p), 24, graph);
          if (M == 1) row(p, gemv_old(p), 24, graph);
        }
      }
  for (auto [N, K] : {std::pair{4096, 14336}, std::pair{14336, 4096}})
    for (int bits : {4, 8})
      for (int64_t M : {512, 4096}) {
        Problem p(M, N, K, bits, 64, true, 2);
        row(p, gemm_wgmma(p), 4, false);
        if (bits == 4 && M == 4096 && N == 4096) {
          Kernel k = gemm_wgmma(p);
          // (Skipping the dequantization alone, VARIANT 2, feeds wgmma garbage
          // bits and ran slower than the whole kernel: not a measure.)
          void (*skips[])(QmmParams) = {wgmma_bf16_b4_variant<4>, wgmma_bf16_b4_variant<6>};
          const char* names[] = {"wgmma, no mma", "wgmma, loads only"};
          for (int i = 0; i < 2; ++i) {
            k.fn = skips[i], k.name = names[i];
            CHECK(cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem));
            row(p, k, 4, false);
          }
        }
      }
  for (int bits : {4, 8}) {
    Problem p(1, 14336, 4096, bits, 64, true, 8);
    Kernel k = gemv_tc(p);
    void (*variants[])(QmmParams) = {bits == 4 ? qmv_tc_bf16_u<4, 2> : qmv_tc_bf16_u<8, 2>,
                                     bits == 4 ? qmv_tc_bf16_u<4, 4> : qmv_tc_bf16_u<8, 4>,
                                     bits == 4 ? qmv_tc_bf16_u<4, 16> : qmv_tc_bf16_u<8, 16>};
    const char* names[] = {"qmv_tc U=2", "qmv_tc U=4", "qmv_tc U=16"};
    for (int i = 0; i < 3; ++i) {
      k.fn = variants[i], k.name = names[i];
      row(p, k, 24, true);
    }
  }
  for (auto [N, K] : {std::pair{14336, 4096}, std::pair{4096, 14336}, std::pair{4096, 4096}})
    for (int64_t M : {16, 32, 64})
      for (int bits : {4, 8}) {
        Problem p(M, N, K, bits, 64, true, 8);
        row(p, gemv_tc(p), 24, true);
        for (int rows : {16, 32})
          if (rows <= M) row(p, gemv_tc(p, rows), 24, true);
      }
  return check_failures ? 1 : 0;
}
