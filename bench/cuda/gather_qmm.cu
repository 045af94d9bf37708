// The CUDA kernels of gather_qmm on their own, without MLX: the plan
// (csrc/gather_qmm/cuda_plan.h) and the kernels it names, launched as
// cuda.cpp launches them, checked against a float64 host reference with
// adversarial routings (repeated experts, experts with no rows, one expert
// with every row, out-of-range indices, several rows per pair), outputs
// poisoned with NaN first; then timed beside our dense quantized matmul
// kernels over the same bytes / FLOPs (kernel-only figures).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        bench/cuda/gather_qmm.cu -o /tmp/gather_kernels && /tmp/gather_kernels [--checks-only]
//
// (scripts/gpu_kernels.sh gather_qmm builds and runs it.) Prints one line per
// check, a markdown table of timings and the targets (met / not met); exits
// non-zero if a check fails.
#include <cstdarg>
#include <map>

#include "common.cuh"
#include "gather_qmm/cuda_plan.h"
#include "gather_qmm/gather_generic.cu"
#include "gather_qmm/gather_tc.cu"
#include "quantized_matmul/cuda_plan.h"
#include "quantized_matmul/qmm_wgmma.cu"
#include "quantized_matmul/qmv.cu"
#include "quantized_matmul/qmv_tc.cu"

using mlx_ext::ceil_div;
using mlx_ext::cuda::GatherParams;
using mlx_ext::cuda::QmmParams;
namespace gp = mlx_ext::cuda::gather_plan;

// The tiles kernel with 4 warps over 64 rows of W (gather_tile's WN = 4),
// which the plan does not use: checked and timed here beside the shipped one.
__global__ void __launch_bounds__(mlx_ext::cuda::GATHER_TC_THREADS) gather_tiles_wide_bfloat16_b4(const GatherParams p) {
  mlx_ext::cuda::gather_tc_tiles<__nv_bfloat16, 4, 4, 1, 4>(p);
}

namespace {

using GatherFn = void (*)(GatherParams);

// Every kernel cuda_plan.h may name, by name (as the registry finds them).
const std::map<std::string, GatherFn>& gather_kernels() {
  static const std::map<std::string, GatherFn> table = {
#define TC_BITS(NAME, BITS, MT)                                                                  \
  {"gather_tc_decode_" #NAME "_b" #BITS, gather_tc_decode_##NAME##_b##BITS},                    \
      {"gather_tc_decode_" #NAME "_b" #BITS "_swiglu", gather_tc_decode_##NAME##_b##BITS##_swiglu}, \
      {"gather_tc_tiles_" #NAME "_b" #BITS "_m" #MT, gather_tc_tiles_##NAME##_b##BITS##_m##MT},  \
      {"gather_tc_tiles_" #NAME "_b" #BITS "_m" #MT "_swiglu", gather_tc_tiles_##NAME##_b##BITS##_m##MT##_swiglu},
#define TYPE(NAME)                                                                               \
  TC_BITS(NAME, 2, 8) TC_BITS(NAME, 4, 32) TC_BITS(NAME, 8, 32){"gather_group_" #NAME, gather_group_##NAME}, \
      {"gather_generic_t_" #NAME, gather_generic_t_##NAME},                                      \
      {"gather_generic_t_" #NAME "_swiglu", gather_generic_t_##NAME##_swiglu},                   \
      {"gather_generic_n_" #NAME, gather_generic_n_##NAME},
      TYPE(bfloat16) TYPE(float16)
#undef TYPE
#undef TC_BITS
  };
  return table;
}

GatherFn kernel(const std::string& name) {
  auto it = gather_kernels().find(name);
  if (it == gather_kernels().end()) {
    std::fprintf(stderr, "plan names an unknown kernel %s\n", name.c_str());
    std::exit(2);
  }
  return it->second;
}

void launch(const mlx_ext::cuda::KernelLaunch& l, const GatherParams& p, cudaStream_t s) {
  kernel(l.kernel)<<<dim3(unsigned(l.grid[0]), unsigned(l.grid[1]), unsigned(l.grid[2])), l.threads,
                     l.smem_bytes, s>>>(p);
}

// One routing: pairs (lhs[p], rhs[p]), on the host and the device.
struct Routing {
  std::vector<uint32_t> lhs, rhs;
  uint32_t *d_lhs = nullptr, *d_rhs = nullptr;
  void upload() {
    CHECK(cudaMalloc(&d_lhs, lhs.size() * 4));
    CHECK(cudaMalloc(&d_rhs, rhs.size() * 4));
    CHECK(cudaMemcpy(d_lhs, lhs.data(), lhs.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_rhs, rhs.data(), rhs.size() * 4, cudaMemcpyHostToDevice));
  }
  void release() { cudaFree(d_lhs), cudaFree(d_rhs); }
};

// A gather problem: E experts of (N, K) (transpose) or (K, N), X matrices of
// x (M, K), 16-bit activations; `stacks` = 2: a second stack (SwiGLU's up).
struct Gather {
  int E, N, K, M, X, bits, gs, stacks;
  bool bf16, transpose, with_bias, bias_per_expert;
  int64_t P = 0;
  uint16_t *x = nullptr, *out = nullptr, *bias = nullptr;
  uint32_t* w[2] = {};
  uint16_t *scales[2] = {}, *biases[2] = {};
  int* scratch = nullptr;

  Gather(int E_, int N_, int K_, int M_, int X_, int bits_, int gs_, bool bf16_, int stacks_ = 1,
         bool transpose_ = true, bool with_bias_ = false, bool per_expert_ = false)
      : E(E_), N(N_), K(K_), M(M_), X(X_), bits(bits_), gs(gs_), stacks(stacks_), bf16(bf16_),
        transpose(transpose_), with_bias(with_bias_), bias_per_expert(per_expert_) {
    CHECK(cudaMalloc(&x, size_t(X) * M * K * 2));
    fill_16bit(x, size_t(X) * M * K, bf16, 11, -1.0f, 1.0f);
    for (int s = 0; s < stacks; ++s) {
      CHECK(cudaMalloc(&w[s], words() * 4));
      CHECK(cudaMalloc(&scales[s], groups() * 2));
      CHECK(cudaMalloc(&biases[s], groups() * 2));
      fill_words<<<1024, 256>>>(w[s], words(), 100 + s);
      fill_16bit(scales[s], groups(), bf16, 200 + s, 0.002f, 0.02f);
      fill_16bit(biases[s], groups(), bf16, 300 + s, -0.1f, 0.1f);
    }
    if (with_bias) {
      const size_t n = size_t(per_expert_ ? E : 1) * N;
      CHECK(cudaMalloc(&bias, n * 2));
      fill_16bit(bias, n, bf16, 12, -0.5f, 0.5f);
    }
    CHECK(cudaDeviceSynchronize());
  }
  ~Gather() {
    cudaFree(x), cudaFree(out), cudaFree(bias), cudaFree(scratch);
    for (int s = 0; s < stacks; ++s) cudaFree(w[s]), cudaFree(scales[s]), cudaFree(biases[s]);
  }
  int rows() const { return transpose ? N : K; }
  int cols() const { return transpose ? K : N; }
  size_t words() const { return size_t(E) * rows() * cols() * bits / 32; }
  size_t groups() const { return size_t(E) * rows() * (cols() / gs); }
  double expert_bytes() const { return stacks * (double(rows()) * cols() * bits / 8 + 2.0 * rows() * (cols() / gs) * 2); }

  // Output and scratch for P pairs.
  void reserve(int64_t pairs) {
    if (pairs <= P) return;
    cudaFree(out), cudaFree(scratch);
    P = pairs;
    CHECK(cudaMalloc(&out, size_t(P) * M * N * 2));
    CHECK(cudaMalloc(&scratch, (P + 3 * size_t(E) + 4) * 4));
  }
  gp::Plan plan(int64_t pairs) const {
    return gp::plan({pairs, M, N, K, E, bits, gs, transpose, bf16 ? "bfloat16" : "float16", true, stacks == 2});
  }
  // As cuda.cpp fills and launches them; `wide`: the WN = 4 tiles kernel
  // (bfloat16, 4-bit, one stack) in place of the plan's.
  void run(const Routing& r, cudaStream_t s = 0, bool wide = false) {
    const int64_t pairs = int64_t(r.lhs.size());
    reserve(pairs);
    GatherParams p{};
    p.x = x, p.w = w[0], p.scales = scales[0], p.biases = biases[0];
    if (stacks == 2) p.w_up = w[1], p.scales_up = scales[1], p.biases_up = biases[1];
    p.bias = bias, p.bias_per_expert = bias_per_expert;
    p.lhs = r.d_lhs, p.rhs = r.d_rhs, p.out = out;
    p.P = pairs, p.M = M, p.N = N, p.K = K, p.X = X, p.E = E, p.group_size = gs, p.bits = bits;
    const gp::Plan pl = plan(pairs);
    if (pl.path == gp::Path::tiles) {
      p.order = scratch, p.offsets = scratch + pairs, p.tile_offsets = p.offsets + E + 2;
      p.cursor = p.tile_offsets + E + 1, p.tile_rows = pl.tile_rows;
      launch(pl.group, p, s);
      if (wide) {
        gather_tiles_wide_bfloat16_b4<<<dim3(unsigned(pl.main.grid[0]), unsigned(ceil_div(N, 64))),
                                        mlx_ext::cuda::GATHER_TC_THREADS, 0, s>>>(p);
        return;
      }
    }
    launch(pl.main, p, s);
  }

  // W's value (row, col) of expert e, stack s, in float64 from host copies.
  struct Host {
    std::vector<uint16_t> x, out, bias;
    std::vector<uint32_t> w[2];
    std::vector<uint16_t> scales[2], biases[2];
  };
  Host download(int64_t pairs) const {
    Host h;
    h.x.resize(size_t(X) * M * K), h.out.resize(size_t(pairs) * M * N);
    CHECK(cudaMemcpy(h.x.data(), x, h.x.size() * 2, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(h.out.data(), out, h.out.size() * 2, cudaMemcpyDeviceToHost));
    for (int s = 0; s < stacks; ++s) {
      h.w[s].resize(words()), h.scales[s].resize(groups()), h.biases[s].resize(groups());
      CHECK(cudaMemcpy(h.w[s].data(), w[s], words() * 4, cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(h.scales[s].data(), scales[s], groups() * 2, cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(h.biases[s].data(), biases[s], groups() * 2, cudaMemcpyDeviceToHost));
    }
    if (bias) {
      h.bias.resize(size_t(bias_per_expert ? E : 1) * N);
      CHECK(cudaMemcpy(h.bias.data(), bias, h.bias.size() * 2, cudaMemcpyDeviceToHost));
    }
    return h;
  }
  double w_value(const Host& h, int s, int e, int row, int col) const {
    const int64_t words_per_row = int64_t(cols()) * bits / 32;
    const uint32_t* r = h.w[s].data() + (int64_t(e) * rows() + row) * words_per_row;
    const int64_t bit = int64_t(col) * bits;
    uint64_t pair = r[bit / 32];
    if (bit / 32 + 1 < words_per_row) pair |= uint64_t(r[bit / 32 + 1]) << 32;
    const uint32_t q = uint32_t(pair >> (bit % 32)) & ((1u << bits) - 1);
    const size_t g = (size_t(e) * rows() + row) * (cols() / gs) + col / gs;
    return double(to_host_float(h.scales[s][g], bf16)) * q + double(to_host_float(h.biases[s][g], bf16));
  }
  // max |out - ref| / max |ref| over sampled valid elements; invalid pairs'
  // elements must all be NaN (else the result is NaN: a failure).
  double check(const Routing& r, int samples) const {
    const int64_t pairs = int64_t(r.lhs.size());
    const Host h = download(pairs);
    RelativeError error;
    bool invalid_ok = true;
    for (int64_t i = 0; i < pairs * M * N; ++i) {
      const int64_t pair = i / (int64_t(M) * N);
      if (r.rhs[pair] >= uint32_t(E) || r.lhs[pair] >= uint32_t(X))
        invalid_ok &= std::isnan(to_host_float(h.out[i], bf16));
    }
    for_each_sample(pairs * M * N, samples, [&](int64_t i) {
      const int64_t row = i / N, pair = row / M;
      const int n = int(i % N), m = int(row % M);
      const uint32_t e = r.rhs[pair], l = r.lhs[pair];
      if (e >= uint32_t(E) || l >= uint32_t(X)) return;
      double v[2] = {0, 0};
      for (int s = 0; s < stacks; ++s)
        for (int k = 0; k < K; ++k)
          v[s] += double(to_host_float(h.x[(size_t(l) * M + m) * K + k], bf16)) *
                  w_value(h, s, int(e), transpose ? n : k, transpose ? k : n);
      double ref = v[0];
      if (stacks == 2) ref = v[0] / (1.0 + std::exp(-v[0])) * v[1];
      else if (bias) ref += to_host_float(h.bias[(bias_per_expert ? size_t(e) * N : 0) + n], bf16);
      error.add(to_host_float(h.out[i], bf16), ref);
    });
    return invalid_ok ? error.value() : NAN;
  }
};

// Top-k routing of `tokens` tokens (M rows each, lhs = token): distinct
// random experts per token, shifted by `shift`.
Routing top_k(int tokens, int k, int E, uint32_t seed, int shift = 0) {
  Routing r;
  for (int t = 0; t < tokens; ++t) {
    std::vector<int> perm(E);
    for (int e = 0; e < E; ++e) perm[e] = e;
    for (int e = E - 1; e > 0; --e) std::swap(perm[e], perm[hash32(uint64_t(t) * 977 + e, seed) % (e + 1)]);
    for (int j = 0; j < k; ++j) r.lhs.push_back(t), r.rhs.push_back((perm[j] + shift) % E);
  }
  return r;
}

void check_case(const std::string& what, Gather& g, Routing r, double tol = 1.5e-2, bool wide = false) {
  r.upload();
  g.reserve(int64_t(r.lhs.size()));
  poison(g.out, size_t(g.P) * g.M * g.N * 2);
  g.run(r, 0, wide);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  const gp::Plan pl = g.plan(int64_t(r.lhs.size()));
  char label[256];
  std::snprintf(label, sizeof label, "%-26s %-4s %s b%d gs%3d E%3d N%4d K%5d M%d P%4zu st%d bias%d%d %s", what.c_str(),
                g.bf16 ? "bf16" : "f16", g.transpose ? "t" : "n", g.bits, g.gs, g.E, g.N, g.K, g.M, r.lhs.size(),
                g.stacks, g.with_bias, g.bias_per_expert, wide ? "gather_tiles_wide (WN=4)" : pl.main.kernel.c_str());
  const int64_t total = int64_t(r.lhs.size()) * g.M * g.N;
  report_check(label, g.check(r, total > 4000 ? 2000 : 0), tol);  // the host reference bounds the run time
  r.release();
}

void correctness() {
  for (bool bf : {true, false})
    for (int bits : {2, 4, 8})
      for (int gs : {32, 64, 128})
        for (int stacks : {1, 2})
          // The second K: a partial last span of 4 chunks (a multiple of the group).
          for (int K : {1024, bits == 8 ? 224 : 320}) {
          if (K != 1024 && gs != (bits == 8 ? 32 : 64)) continue;
          const int E = 8, N = 200;
          Gather g(E, N, K, 1, 64, bits, gs, bf, stacks, true, stacks == 1 && gs == 64, bits == 4);
          // decode: one token top-4, 8 tokens top-4; tiles: 40 tokens top-4
          check_case("top-k decode", g, top_k(1, 4, E, bits + gs));
          check_case("top-k decode 8 tokens", g, top_k(8, 4, E, bits + gs + 1));
          check_case("top-k tiles", g, top_k(40, 4, E, bits + gs + 2));
          // adversarial: repeated experts, one expert for all, experts without rows
          Routing rep;
          for (int t = 0; t < 6; ++t)
            for (int j = 0; j < 4; ++j) rep.lhs.push_back(t), rep.rhs.push_back(j % 2 ? 3 : 5);
          check_case("repeated experts", g, rep);
          for (int pairs : {13, 64, 65, 300}) {
            Routing one;
            for (int q = 0; q < pairs; ++q) one.lhs.push_back(q % 64), one.rhs.push_back(E - 1);
            check_case("one expert, all rows", g, one);
          }
          // out of range: rhs >= E, lhs >= X, mixed with valid pairs (decode and tiles)
          for (int pairs : {10, 120}) {
            Routing bad = top_k(pairs / 4, 4, E, 7);
            for (size_t q = 0; q < bad.rhs.size(); q += 3) bad.rhs[q] = E + q;
            bad.lhs[1] = 64 + 2, bad.rhs[2] = 0xffffffffu;
            check_case("out-of-range indices", g, bad);
          }
        }
  // Several rows per pair (lhs arbitrary), ragged N, decode and tiles.
  for (int M : {3, 5}) {
    Gather g(6, 77, 512, M, 10, 4, 64, true, 1, true, true, true);
    for (int pairs : {4, 20, 90}) {
      Routing r;
      for (int q = 0; q < pairs; ++q) r.lhs.push_back(hash32(q, 3) % 10), r.rhs.push_back(hash32(q, 4) % 6);
      check_case("M rows per pair", g, r);
    }
  }
  // The generic kernel: transpose=False (the vjp), 3- and 6-bit W, K % 128 != 0.
  {
    Gather n(5, 256, 96, 1, 12, 4, 32, true, 1, false, true, true);
    check_case("generic n", n, top_k(12, 3, 5, 1));
    Gather b3(5, 50, 384, 1, 12, 3, 64, false, 2);
    check_case("generic t 3-bit swiglu", b3, top_k(12, 3, 5, 2));
    Gather b6(5, 50, 192, 2, 12, 6, 64, true, 1, true, true, false);
    Routing bad = top_k(12, 3, 5, 3);
    bad.rhs[4] = 9;
    check_case("generic t 6-bit, invalid", b6, bad);
  }
  // The WN = 4 tiles variant: ragged N, several rows per pair, out-of-range pairs.
  {
    Gather g(8, 200, 320, 1, 64, 4, 64, true, 1, true, true, true);
    check_case("wide tiles", g, top_k(40, 4, 8, 9), 1.5e-2, true);
    Routing one;
    for (int q = 0; q < 300; ++q) one.lhs.push_back(q % 64), one.rhs.push_back(q % 5 == 0 ? 99 : 7);
    check_case("wide tiles, one expert + invalid", g, one, 1.5e-2, true);
    Gather m3(6, 77, 512, 3, 10, 4, 64, true);
    Routing r;
    for (int q = 0; q < 90; ++q) r.lhs.push_back(hash32(q, 3) % 10), r.rhs.push_back(hash32(q, 4) % 6);
    check_case("wide tiles, M rows per pair", m3, r, 1.5e-2, true);
  }
  // The issue's shapes, decode and prefill paths, sampled.
  for (auto [E, N, K, k] : {std::tuple{128, 768, 2048, 8}, std::tuple{32, 2880, 2880, 4}})
    for (int tokens : {1, 8, 512}) {
      Gather g(E, N, K, 1, tokens, 4, 64, true);
      check_case("issue shape", g, top_k(tokens, k, E, 5));
      if (tokens == 512) check_case("issue shape, wide tiles", g, top_k(tokens, k, E, 5), 1.5e-2, true);
      if (tokens == 8) {
        Gather s(E, N, K, 1, tokens, 4, 64, true, 2);
        check_case("issue shape swiglu", s, top_k(tokens, k, E, 6));
      }
    }
}

// ---- timing -------------------------------------------------------------

// The results table: printed, and kept for $OUT/gather_qmm_kernels.md.
std::string markdown;
void emit(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void emit(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::fputs(buf, stdout);
  markdown += buf;
}

// Median microseconds per call of `calls` calls, stream-launched or captured
// into one CUDA graph (serially, as MLX's encoder records a step).
template <typename Call>
double time_us(Call call, int calls, bool graph) {
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < calls; ++i) call(i, s);
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaGraphInstantiate(&exec, g, 0));
    cudaGraphDestroy(g);
  }
  const double ms = median_round_ms(s, [&] {
    if (graph) CHECK(cudaGraphLaunch(exec, s));
    else
      for (int i = 0; i < calls; ++i) call(i, s);
  }, 15);
  if (exec) cudaGraphExecDestroy(exec);
  cudaStreamDestroy(s);
  return 1e3 * ms / calls;
}

// Dense baseline: x (M, top_k N) ... as bench/bench_gather_qmm.py: x (M, K)
// times one (top_k N, K) matrix, copies rotated over >= 300 MB.
struct Dense {
  int64_t M;
  int N, K;
  uint16_t *x, *out;
  std::vector<uint32_t*> w;
  std::vector<uint16_t*> s, b;
  Dense(int64_t M_, int N_, int K_) : M(M_), N(N_), K(K_) {
    CHECK(cudaMalloc(&x, M * K * 2));
    CHECK(cudaMalloc(&out, M * N * 2));
    fill_16bit(x, M * K, true, 11, -1, 1);
    const int copies = std::max(2, int(std::ceil(300e6 / bytes())));
    for (int c = 0; c < copies; ++c) {
      uint32_t* wp;
      uint16_t *sp, *bp;
      CHECK(cudaMalloc(&wp, size_t(N) * K / 2));
      CHECK(cudaMalloc(&sp, size_t(N) * (K / 64) * 2));
      CHECK(cudaMalloc(&bp, size_t(N) * (K / 64) * 2));
      fill_words<<<1024, 256>>>(wp, size_t(N) * K / 8, 100 + c);
      fill_16bit(sp, size_t(N) * (K / 64), true, 200 + c, 0.002f, 0.02f);
      fill_16bit(bp, size_t(N) * (K / 64), true, 300 + c, -0.1f, 0.1f);
      w.push_back(wp), s.push_back(sp), b.push_back(bp);
    }
    // Once, outside the timed CUDA graph capture.
    CHECK(cudaFuncSetAttribute(qmm_t_wgmma_bfloat16_b4, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               mlx_ext::cuda::wg_smem_bytes(4)));
    CHECK(cudaDeviceSynchronize());
  }
  ~Dense() {
    cudaFree(x), cudaFree(out);
    for (size_t c = 0; c < w.size(); ++c) cudaFree(w[c]), cudaFree(s[c]), cudaFree(b[c]);
  }
  double bytes() const { return double(N) * K / 2 + 2.0 * N * (K / 64) * 2; }
  // The kernel our quantized matmul's plan takes (one of these four here).
  mlx_ext::cuda::qmm_plan::Plan plan() const {
    return mlx_ext::cuda::qmm_plan::plan({M, N, K, 4, 64, true, "bfloat16", true, true}, {9, 0, true, true});
  }
  void run(int i, cudaStream_t st) {
    const int c = i % int(w.size());
    QmmParams p{};
    p.x = x, p.w = w[c], p.scales = s[c], p.biases = b[c], p.out = out;
    p.M = M, p.N = N, p.K = K, p.group_size = 64, p.bits = 4, p.k_split = 1;
    const auto pl = plan();
    static const std::map<std::string, void (*)(QmmParams)> fns = {
        {"qmv_tc_bfloat16_b4", qmv_tc_bfloat16_b4}, {"qmv_t_bfloat16_b4_m1", qmv_t_bfloat16_b4_m1},
        {"qmv_t_bfloat16_b4_m8", qmv_t_bfloat16_b4_m8}, {"qmm_t_wgmma_bfloat16_b4", qmm_t_wgmma_bfloat16_b4}};
    auto it = fns.find(pl.main.kernel);
    if (it == fns.end() || pl.parts != 1) {
      std::fprintf(stderr, "dense plan %s not in the bench's table\n", pl.main.kernel.c_str());
      std::exit(2);
    }
    it->second<<<dim3(unsigned(pl.main.grid[0]), unsigned(pl.main.grid[1]), unsigned(pl.main.grid[2])),
                 pl.main.threads, pl.main.smem_bytes, st>>>(p);
  }
};

struct Row {
  int E, N, K, k, tokens;
  std::string path, dense_kernel;
  double us, dense_us, bytes, dense_bytes, flops, swiglu_us, wide_us = 0;
};

void timings(bool quick) {
  const double bw = copy_gbps();
  std::printf("\ncopy bandwidth %.0f GB/s (cudaMemcpy device to device, read + write)\n", bw);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  emit("# gather_qmm's CUDA kernels on their own (bench/cuda/gather_qmm.cu), %s: KERNEL-ONLY figures\n\n", prop.name);
  emit("- %d SMs, L2 %d MB; copy bandwidth %.0f GB/s (cudaMemcpy device to device, read + write)\n",
       prop.multiProcessorCount, prop.l2CacheSize >> 20, bw);
  emit("- checks against a float64 host reference: %d failed (adversarial routings, NaN-poisoned outputs)\n",
       check_failures);
  emit("- bfloat16 x, scales and biases; 4-bit W, group 64; x (M, K) routed top-k (M tokens, one row per pair); "
       "24 calls per CUDA graph (captured in order), consecutive calls routed to other experts; GB/s counts "
       "the distinct experts a call reads once. Dense: our quantized matmul's kernel for x (M, K) times one "
       "(top_k N, K) matrix (the same FLOPs; at M=1 the same bytes), copies rotated over >= 300 MB. "
       "'SwiGLU fused': gather_quantized_swiglu's kernels (two stacks); 'x 2 gathers': twice the gather's "
       "time over it (the activation kernel not counted).\n");
  emit("- reproduce: `bash scripts/gpu_kernels.sh gather_qmm` (scripts/gpu_run.sh's cuda stage)\n");
  std::vector<Row> rows;
  for (auto [E, N, K, k] : {std::tuple{128, 768, 2048, 8}, std::tuple{32, 2880, 2880, 4}})
    for (int tokens : {1, 8, 512}) {
      if (quick && tokens == 512) continue;
      // Consecutive calls route to other experts (shifted by tokens * k), as the MLX bench.
      const int calls = 24;
      Gather g(E, N, K, 1, tokens, 4, 64, true);
      Gather sw(E, N, K, 1, tokens, 4, 64, true, 2);
      std::vector<Routing> rs;
      double distinct = 0;
      for (int i = 0; i < calls; ++i) {
        rs.push_back(top_k(tokens, k, E, 1, i * tokens * k));
        rs.back().upload();
        std::vector<bool> seen(E);
        for (auto e : rs.back().rhs) distinct += !seen[e], seen[e] = true;
      }
      distinct /= calls;
      g.reserve(int64_t(tokens) * k), sw.reserve(int64_t(tokens) * k);
      Dense d(tokens, k * N, K);
      Row r{E, N, K, k, tokens, g.plan(int64_t(tokens) * k).main.kernel, d.plan().main.kernel};
      r.us = time_us([&](int i, cudaStream_t s) { g.run(rs[i], s); }, calls, true);
      r.swiglu_us = time_us([&](int i, cudaStream_t s) { sw.run(rs[i], s); }, calls, true);
      r.dense_us = time_us([&](int i, cudaStream_t s) { d.run(i, s); }, calls, true);
      if (g.plan(int64_t(tokens) * k).path == gp::Path::tiles)
        r.wide_us = time_us([&](int i, cudaStream_t s) { g.run(rs[i], s, true); }, calls, true);
      r.bytes = distinct * g.expert_bytes();
      r.dense_bytes = d.bytes();
      r.flops = 2.0 * tokens * k * N * K;
      rows.push_back(r);
      for (auto& x : rs) x.release();
      std::printf("timed E%d N%d K%d top-%d M%d: %.1f us (dense %.1f us)\n", E, N, K, k, tokens, r.us, r.dense_us);
      std::fflush(stdout);
    }
  emit("\n| E | N | K | top-k | M | gather kernel | us/call | GB/s | of copy BW | TFLOP/s | dense kernel | dense us "
              "| dense of copy BW | dense TFLOP/s | SwiGLU fused us | x 2 gathers |\n");
  emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    emit("| %d | %d | %d | %d | %d | %s | %.1f | %.0f | %.2f | %.1f | %s | %.1f | %.2f | %.1f | %.1f | %.2f |\n",
                r.E, r.N, r.K, r.k, r.tokens, r.path.c_str(), r.us, r.bytes / r.us / 1e3, r.bytes / r.us / 1e3 / bw,
                r.flops / r.us / 1e6, r.dense_kernel.c_str(), r.dense_us,
                r.dense_bytes / r.dense_us / 1e3 / bw, r.flops / r.dense_us / 1e6, r.swiglu_us, 2 * r.us / r.swiglu_us);
  }
  for (const Row& r : rows)
    if (r.wide_us > 0)
      emit("\nExperimental tiles kernel with 4 warps over 64 rows of W (WN=4, not used by the plan), "
           "%dx%dx%d top-%d M=%d: %.1f us (%.1f TFLOP/s, %.2f of the dense GEMM's rate) vs %.1f us shipped\n",
           r.E, r.N, r.K, r.k, r.tokens, r.wide_us, r.flops / r.wide_us / 1e6, r.dense_us / r.wide_us, r.us);
  emit("\n### Targets (issue 16, H200, kernel-only)\n\n");
  for (const Row& r : rows) {
    if (r.tokens == 8) continue;
    const bool decode = r.tokens == 1;
    const double ours = decode ? r.bytes / r.us : r.flops / r.us;
    const double dense = decode ? r.dense_bytes / r.dense_us : r.flops / r.dense_us;
    emit("- M=%d %dx%dx%d top-%d: %s >= 0.8 of our dense %s: %.2f -> %s\n", r.tokens, r.E, r.N, r.K, r.k,
                decode ? "copy-BW fraction" : "FLOP rate", decode ? "GEMV's" : "GEMM's", ours / dense,
                ours / dense >= 0.8 ? "met" : "not met");
  }
}

}  // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  const std::string mode = argc > 1 ? argv[1] : "";
  correctness();
  std::printf("checks: %d failed\n", check_failures);
  if (mode == "--checks-only") return check_failures ? 1 : 0;
  timings(mode == "--quick");
  if (const char* out = std::getenv("OUT")) {  // scripts/gpu_kernels.sh sets it
    const std::string path = std::string(out) + "/gather_qmm_kernels.md";
    if (FILE* f = std::fopen(path.c_str(), "w")) {
      std::fputs(markdown.c_str(), f);
      std::fclose(f);
      std::printf("written to %s\n", path.c_str());
    }
  }
  return check_failures ? 1 : 0;
}
