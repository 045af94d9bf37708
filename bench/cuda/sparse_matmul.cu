// The CUDA kernels of the sparse matmul on their own, without MLX: builds
// each format on the host from a random dense W, runs the kernels that
// csrc/sparse_matmul/cuda_plan.h chooses (as cuda.cpp launches them) on
// NaN-poisoned outputs, checks them against a float64 reference on the host,
// and times the decode kernels with CUDA events against the copy bandwidth.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        bench/cuda/sparse_matmul.cu -o /tmp/sparse_kernels && /tmp/sparse_kernels
//   /tmp/sparse_kernels --checks-only       (checks only)
//   compute-sanitizer /tmp/sparse_kernels --sanitize   (bfloat16 checks only)
//
// (scripts/gpu_kernels.sh sparse_matmul builds and runs it on the GPU machine.)
// Prints one line per check and per timing; exits non-zero if a check fails.
#include <map>

#include "common.cuh"
#include "sparse_matmul/cuda_plan.h"
#include "sparse_matmul/sparse_grad.cu"
#include "sparse_matmul/spmm_tc.cu"
#include "sparse_matmul/spmv.cu"

using mlx_ext::cuda::SpParams;
using mlx_ext::cuda::KernelLaunch;
namespace plan_ns = mlx_ext::cuda::sparse_plan;

namespace {

// Every kernel by its extern "C" name.
#define E(name) {#name, reinterpret_cast<const void*>(name)},
#define DECODE(F, DT) E(spmv_##F##_##DT##_m1) E(spmv_##F##_##DT##_m4) E(spmv_##F##_##DT##_m16) \
  E(spmv_##F##_##DT##_m1_xg) E(spmm_n_##F##_##DT##_m1) E(spmm_n_##F##_##DT##_m8)
#define FLOATS(F, DT) DECODE(F, DT) E(sampled_##F##_##DT)
#define ALL(DT) FLOATS(csr, DT) FLOATS(bitmask, DT) FLOATS(bsr, DT) FLOATS(nm4, DT) FLOATS(nm8, DT) \
  DECODE(nm4_q4, DT) DECODE(nm4_q8, DT) DECODE(nm8_q4, DT) DECODE(nm8_q8, DT) E(reduce_partials_##DT)
#define TC(DT) E(spmm_tc_nm24_##DT) E(spmm_tc_bitmask_##DT) E(spmm_tc_csr_##DT) E(spmm_tc_bsr64_##DT) E(spmm_tc_bsr32_##DT)
const std::map<std::string, const void*> kKernels = {ALL(float32) ALL(float16) ALL(bfloat16) E(bitmask_prefix)
                                                     TC(float16) TC(bfloat16)};

int g_sm_count = 0;

void launch(const KernelLaunch& k, SpParams p, cudaStream_t s = 0) {
  auto it = kKernels.find(k.kernel);
  if (it == kKernels.end()) {
    std::fprintf(stderr, "no kernel %s\n", k.kernel.c_str());
    std::exit(2);
  }
  if (k.smem_bytes > 48 * 1024)
    CHECK(cudaFuncSetAttribute(it->second, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem_bytes));
  void* args[] = {&p};
  CHECK(cudaLaunchKernel(it->second, dim3(unsigned(k.grid[0]), unsigned(k.grid[1]), unsigned(k.grid[2])),
                         dim3(k.threads), args, k.smem_bytes, s));
}

template <typename V>
void* upload(const std::vector<V>& v) {
  void* p = nullptr;
  CHECK(cudaMalloc(&p, std::max<size_t>(16, v.size() * sizeof(V))));
  if (!v.empty()) CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(V), cudaMemcpyHostToDevice));
  return p;
}

// Host rounding to the kernels' dtype (0 float32, 1 float16, 2 bfloat16).
float round_to(float v, int dt) {
  if (dt == 1) return __half2float(__float2half_rn(v));
  if (dt == 2) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}
void append(std::vector<uint8_t>& bytes, float v, int dt) {
  if (dt == 0) {
    uint8_t b[4];
    std::memcpy(b, &v, 4);
    bytes.insert(bytes.end(), b, b + 4);
  } else {
    uint16_t h;
    if (dt == 1) { __half x = __float2half_rn(v); std::memcpy(&h, &x, 2); }
    else { __nv_bfloat16 x = __float2bfloat16_rn(v); std::memcpy(&h, &x, 2); }
    bytes.push_back(uint8_t(h & 0xff)), bytes.push_back(uint8_t(h >> 8));
  }
}
const char* kDtype[3] = {"float32", "float16", "bfloat16"};

// Cheap host randomness (building a 14336 x 4096 W per copy).
struct Rng {
  uint64_t s;
  explicit Rng(uint32_t seed) : s(0x9e3779b97f4a7c15ull ^ (uint64_t(seed) << 17) ^ seed) {}
  uint32_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return uint32_t(s >> 32);
  }
  float unit() { return (next() >> 8) * (1.0f / 16777216.0f); }
  float val() { return 2.0f * unit() - 1.0f; }
};

// One sparse W built on the host, its dense float64 twin (zeros where not
// stored) and its arrays on the device.
struct SparseW {
  plan_ns::Problem pr;
  std::vector<double> dense; // (N, K)
  SpParams p{};
  size_t bytes = 0; // stored bytes (values, pattern, scales)
  int64_t stored = 0;
  std::vector<void*> buffers;
  void* keep(void* b) { buffers.push_back(b); return b; }
  ~SparseW() { for (void* b : buffers) cudaFree(b); }
};

// format: "csr16", "csr32", "bitmask", "bsr", "nm", "nmq"; density for the
// unstructured ones and BSR's blocks; block (bn, bk); n:m; bits.
SparseW* build(const std::string& format, int N, int K, int dt, double density, uint32_t seed,
               int bn = 32, int bk = 32, int n = 2, int m = 4, int bits = 0, int gs = 64, bool twin = true) {
  auto* w = new SparseW;
  Rng rng(seed);
  auto unit = [&](Rng& r) { return r.unit(); };
  auto val = [&](Rng& r) { return r.val(); };
  // The dense twin only for checks (timed copies are large).
  std::vector<double> sink(1);
  if (twin) w->dense.assign(size_t(N) * K, 0.0);
  auto dense = [&](size_t i) -> double& { return twin ? w->dense[i] : sink[0]; };
  w->pr = plan_ns::Problem{plan_ns::Format::csr, 1, N, K, kDtype[dt], dt == 0 ? 4 : 2};
  SpParams& p = w->p;
  p.N = N, p.K = K, p.block_n = bn, p.block_k = bk;
  std::vector<uint8_t> values;
  if (format == "csr16" || format == "csr32" || format == "bitmask") {
    const bool bitmask = format == "bitmask";
    const int words = (K + 31) / 32;
    std::vector<int32_t> ptr{0};
    std::vector<uint16_t> c16;
    std::vector<uint32_t> c32, mask(bitmask ? size_t(N) * words : 0);
    for (int r = 0; r < N; ++r) {
      for (int k = 0; k < K; ++k) {
        if (unit(rng) >= density) continue;
        const float v = round_to(val(rng), dt);
        dense(size_t(r) * K + k) = v;
        append(values, v, dt);
        if (bitmask) mask[size_t(r) * words + k / 32] |= 1u << (k % 32);
        else if (format == "csr16") c16.push_back(uint16_t(k));
        else c32.push_back(uint32_t(k));
      }
      ptr.push_back(int32_t(values.size() / (dt == 0 ? 4 : 2)));
    }
    w->pr.format = bitmask ? plan_ns::Format::bitmask : plan_ns::Format::csr;
    p.pattern = w->keep(bitmask ? upload(mask) : format == "csr16" ? upload(c16) : upload(c32));
    p.wide_columns = format == "csr32";
    p.row_ptr = static_cast<int32_t*>(w->keep(upload(ptr)));
    w->bytes = mask.size() * 4 + c16.size() * 2 + c32.size() * 4 + ptr.size() * 4;
  } else if (format == "bsr") {
    std::vector<int32_t> ptr{0}, cols;
    for (int br = 0; br < N / bn; ++br) {
      for (int kb = 0; kb < K / bk; ++kb) {
        if (unit(rng) >= density) continue;
        cols.push_back(kb);
        for (int r = 0; r < bn; ++r)
          for (int c = 0; c < bk; ++c) {
            const float v = round_to(val(rng), dt);
            dense(size_t(br * bn + r) * K + kb * bk + c) = v;
            append(values, v, dt);
          }
      }
      ptr.push_back(int32_t(cols.size()));
    }
    w->pr.format = plan_ns::Format::bsr;
    w->pr.block_n = bn, w->pr.block_k = bk;
    p.pattern = w->keep(upload(cols));
    p.row_ptr = static_cast<int32_t*>(w->keep(upload(ptr)));
    w->bytes = cols.size() * 4 + ptr.size() * 4;
  } else { // nm, nmq
    const int cb = m == 8 ? 4 : 2, kc = K / m * n, words = (kc * cb + 31) / 32;
    std::vector<uint32_t> codes(size_t(N) * words, 0u), wq;
    std::vector<uint8_t> sb_s, sb_b;
    std::vector<float> kept(kc);
    std::vector<int> col(kc);
    for (int r = 0; r < N; ++r) {
      for (int g = 0; g < K / m; ++g) { // n positions of m, ascending
        std::vector<int> pos(m);
        for (int i = 0; i < m; ++i) pos[i] = i;
        for (int i = m - 1; i > 0; --i) std::swap(pos[i], pos[rng.next() % (i + 1)]);
        std::sort(pos.begin(), pos.begin() + n);
        for (int t = 0; t < n; ++t) {
          const int i = g * n + t;
          codes[size_t(r) * words + i * cb / 32] |= uint32_t(pos[t]) << (i * cb % 32);
          col[i] = g * m + pos[t];
          kept[i] = val(rng);
        }
      }
      if (bits == 0) {
        for (int i = 0; i < kc; ++i) {
          const float v = round_to(kept[i], dt);
          dense(size_t(r) * K + col[i]) = v;
          append(values, v, dt);
        }
      } else {
        const int qmax = (1 << bits) - 1;
        std::vector<uint32_t> row(kc * bits / 32, 0u);
        for (int g0 = 0; g0 < kc; g0 += gs) {
          float lo = 1e30f, hi = -1e30f;
          for (int i = g0; i < g0 + gs; ++i) lo = std::min(lo, kept[i]), hi = std::max(hi, kept[i]);
          const float s = round_to((hi - lo) / qmax, dt), b = round_to(lo, dt);
          append(sb_s, s, dt), append(sb_b, b, dt);
          for (int i = g0; i < g0 + gs; ++i) {
            const int q = std::min(qmax, std::max(0, int(std::lround((kept[i] - b) / s))));
            row[i * bits / 32] |= uint32_t(q) << (i * bits % 32);
            dense(size_t(r) * K + col[i]) = double(s) * q + double(b);
          }
        }
        wq.insert(wq.end(), row.begin(), row.end());
      }
    }
    w->pr.format = plan_ns::Format::nm;
    w->pr.nm_n = n, w->pr.nm_m = m, w->pr.bits = bits;
    p.nm_n = n, p.nm_m = m, p.code_bits = cb, p.bits = bits, p.group_size = gs;
    p.pattern = w->keep(upload(codes));
    w->bytes = codes.size() * 4;
    if (bits) {
      p.values = w->keep(upload(wq));
      p.scales = w->keep(upload(sb_s));
      p.biases = w->keep(upload(sb_b));
      w->bytes += wq.size() * 4 + sb_s.size() + sb_b.size();
      w->stored = int64_t(N) * kc;
    }
  }
  if (!p.values) {
    p.values = w->keep(upload(values));
    w->bytes += values.size();
    w->stored = int64_t(values.size() / (dt == 0 ? 4 : 2));
  }
  w->p.vec = 0;
  return w;
}

// Random 16-bit / float32 activations (M, cols) of dtype dt on the device and their float64 copy.
struct Dense {
  std::vector<double> host;
  void* dev = nullptr;
  Dense(int64_t rows, int cols, int dt, uint32_t seed) {
    Rng rng(seed);
    std::vector<uint8_t> bytes;
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float v = round_to(rng.val(), dt);
      host.push_back(v);
      append(bytes, v, dt);
    }
    dev = upload(bytes);
  }
  ~Dense() { cudaFree(dev); }
};

std::vector<double> download(const void* p, int64_t count, int dt) {
  std::vector<double> out(count);
  if (dt == 0) {
    std::vector<float> f(count);
    CHECK(cudaMemcpy(f.data(), p, count * 4, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < count; ++i) out[i] = f[i];
  } else {
    std::vector<uint16_t> h(count);
    CHECK(cudaMemcpy(h.data(), p, count * 2, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < count; ++i) out[i] = to_host_float(h[i], dt == 2);
  }
  return out;
}

// Records, as cuda.cpp does, the plan's kernels for out = x W^T (transpose) or x W.
struct Run {
  plan_ns::Plan plan;
  SpParams p;
  void* prefix = nullptr;
  void* partials = nullptr;
  Run(SparseW& w, int64_t M, bool transpose, const void* x, void* out, const void* bias, int force_mt = 0) {
    plan_ns::Problem pr = w.pr;
    pr.M = M, pr.transpose = transpose;
    pr.values_aligned = reinterpret_cast<uintptr_t>(w.p.values) % 16 == 0;
    plan = plan_ns::plan(pr, {9, 0, g_sm_count});
    if (force_mt && transpose) { // another decode variant than the plan's
      std::string& k = plan.main.kernel;
      k = k.substr(0, k.rfind("_m")) + (force_mt < 0 ? "_m1_xg" : "_m" + std::to_string(force_mt));
      plan.main.grid[1] = mlx_ext::ceil_div(M, force_mt < 0 ? 1 : force_mt);
      plan.main.smem_bytes = force_mt < 0 ? 0 : int(mlx_ext::cuda::spmv_x_bytes(w.p.K, force_mt * pr.dtype_bytes));
    }
    p = w.p;
    p.x = x, p.out = out, p.bias = bias, p.M = M, p.vec = plan.vec, p.slices = plan.slices;
    p.stored = w.stored;
    if (!plan.prep.kernel.empty()) {
      CHECK(cudaMalloc(&prefix, size_t(w.p.N) * ((w.p.K + 31) / 32) * 4));
      p.word_prefix = static_cast<int32_t*>(prefix);
    }
    if (plan.slices > 1) CHECK(cudaMalloc(&partials, size_t(plan.slices) * M * w.p.K * 4));
  }
  void operator()(cudaStream_t s = 0) {
    if (prefix) launch(plan.prep, p, s);
    if (plan.slices <= 1) return launch(plan.main, p, s);
    SpParams q = p, r = p;
    q.out = partials;
    launch(plan.main, q, s);
    r.x = partials, r.parts = plan.slices;
    launch(plan.reduce, r, s);
  }
  ~Run() { cudaFree(prefix), cudaFree(partials); }
};

std::string label(const std::string& what, const SparseW& w, int dt, int64_t M, const std::string& kernel) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%-8s %-8s M %4lld N %5d K %5d %s", what.c_str(), kDtype[dt], (long long)M,
                w.p.N, w.p.K, kernel.c_str());
  return buf;
}

double tol(int dt) { return dt == 0 ? 1e-5 : dt == 1 ? 2e-3 : 1.6e-2; }

void check_product(SparseW& w, int dt, int64_t M, bool transpose, bool with_bias, int force_mt = 0) {
  const int N = w.p.N, K = w.p.K, in = transpose ? K : N, outc = transpose ? N : K;
  Dense x(M, in, dt, 5), bias(1, outc, dt, 6);
  void* out;
  CHECK(cudaMalloc(&out, M * outc * (dt == 0 ? 4 : 2)));
  poison(out, M * outc * (dt == 0 ? 4 : 2));
  Run run(w, M, transpose, x.dev, out, with_bias ? bias.dev : nullptr, force_mt);
  run();
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  const auto got = download(out, M * outc, dt);
  RelativeError err;
  for (int64_t mi = 0; mi < M; ++mi)
    for (int j = 0; j < outc; ++j) {
      double ref = with_bias ? bias.host[j] : 0.0;
      for (int i = 0; i < in; ++i)
        ref += x.host[mi * in + i] * (transpose ? w.dense[size_t(j) * K + i] : w.dense[size_t(i) * K + j]);
      err.add(got[mi * outc + j], ref);
    }
  report_check(label(transpose ? "x W^T" : "x W", w, dt, M, run.plan.main.kernel), err.value(), tol(dt));
  cudaFree(out);
}

void check_sampled(SparseW& w, int dt, int64_t M) {
  const int N = w.p.N, K = w.p.K;
  Dense g(M, N, 0, 7), x(M, K, 0, 8);
  plan_ns::Problem pr = w.pr;
  pr.M = M;
  const auto plan = plan_ns::plan_sampled(pr, w.stored);
  void* out;
  CHECK(cudaMalloc(&out, w.stored * (dt == 0 ? 4 : 2)));
  poison(out, w.stored * (dt == 0 ? 4 : 2));
  SpParams p = w.p;
  p.g = static_cast<const float*>(g.dev), p.xf = static_cast<const float*>(x.dev), p.out = out, p.M = M;
  p.stored = w.stored;
  void* prefix = nullptr;
  if (!plan.prep.kernel.empty()) {
    CHECK(cudaMalloc(&prefix, size_t(N) * ((K + 31) / 32) * 4));
    p.word_prefix = static_cast<int32_t*>(prefix);
    launch(plan.prep, p);
  }
  launch(plan.main, p);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  const auto got = download(out, w.stored, dt);
  // The stored values in the format's order: row-major over the stored
  // positions for CSR, Bitmask and N:M (nonzero dense entries, as values are
  // drawn away from zero), block by block for BSR.
  RelativeError err;
  int64_t j = 0;
  auto add = [&](int r, int c) {
    double ref = 0.0;
    for (int64_t mi = 0; mi < M; ++mi) ref += g.host[mi * N + r] * x.host[mi * K + c];
    if (j < w.stored) err.add(got[j], round_to(float(ref), dt));
    ++j;
  };
  if (w.pr.format == plan_ns::Format::bsr) {
    std::vector<int32_t> ptr(N / w.p.block_n + 1), cols(w.stored / (w.p.block_n * w.p.block_k));
    CHECK(cudaMemcpy(ptr.data(), w.p.row_ptr, ptr.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(cols.data(), w.p.pattern, cols.size() * 4, cudaMemcpyDeviceToHost));
    for (int br = 0; br + 1 < int(ptr.size()); ++br)
      for (int b = ptr[br]; b < ptr[br + 1]; ++b)
        for (int r = 0; r < w.p.block_n; ++r)
          for (int c = 0; c < w.p.block_k; ++c) add(br * w.p.block_n + r, cols[b] * w.p.block_k + c);
  } else {
    for (int r = 0; r < N; ++r)
      for (int c = 0; c < K; ++c)
        if (w.dense[size_t(r) * K + c] != 0.0) add(r, c);
  }
  report_check(label("sampled", w, dt, M, plan.main.kernel), j == w.stored ? err.value() : NAN, tol(dt));
  cudaFree(out), cudaFree(prefix);
}

struct Case {
  std::string name, format;
  double density;
  int bn, bk, n, m, bits;
};

// Median microseconds per call of the plan's kernels for M rows, rotating
// over enough copies of W to exceed the L2 (each call one graph-free launch
// sequence on one stream, `calls` per timed round).
double time_us(std::vector<SparseW*>& ws, int64_t M, const void* x, void* out, int dt, std::string& kernel) {
  std::vector<Run*> runs;
  for (auto* w : ws) runs.push_back(new Run(*w, M, true, x, out, nullptr));
  kernel = runs[0]->plan.main.kernel;
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const int calls = M > 256 ? 4 : 24;
  const double ms = median_round_ms(s, [&] { for (int i = 0; i < calls; ++i) (*runs[i % runs.size()])(s); }, M > 256 ? 5 : 15);
  cudaStreamDestroy(s);
  for (auto* r : runs) delete r;
  return 1e3 * ms / calls;
}

}  // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  g_sm_count = prop.multiProcessorCount;
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  // --checks-only: all checks, no timings; --sanitize: the bfloat16 checks
  // only (every kernel family, at compute-sanitizer's pace).
  const bool sanitize = argc > 1 && std::string(argv[1]) == "--sanitize";
  const bool quick = sanitize || (argc > 1 && std::string(argv[1]) == "--checks-only");

  // Correctness: every format, dtype and kernel family on ragged shapes.
  const std::vector<Case> cases = {
      {"csr16", "csr16", 0.3, 0, 0, 0, 0, 0}, {"csr32", "csr32", 0.1, 0, 0, 0, 0, 0},
      {"bitmask", "bitmask", 0.5, 0, 0, 0, 0, 0}, {"bsr16x32", "bsr", 0.3, 16, 32, 0, 0, 0},
      {"bsr8x12", "bsr", 0.5, 8, 12, 0, 0, 0}, {"bsr32x64", "bsr", 0.4, 32, 64, 0, 0, 0},
      {"bsr64x32", "bsr", 0.4, 64, 32, 0, 0, 0}, {"2:4", "nm", 0, 0, 0, 2, 4, 0},
      {"3:8", "nm", 0, 0, 0, 3, 8, 0}, {"1:4", "nm", 0, 0, 0, 1, 4, 0},
      {"2:4 q4", "nmq", 0, 0, 0, 2, 4, 4}, {"2:4 q8", "nmq", 0, 0, 0, 2, 4, 8}, {"4:8 q4", "nmq", 0, 0, 0, 4, 8, 4}};
  for (int dt : {2, 1, 0})
    for (const auto& c : cases)
      for (auto [N, K] : {std::pair{96, 768}, std::pair{37, 1024}, std::pair{192, 512}}) {
        if (sanitize && dt != 2) continue;
        if (c.format == "bsr" && (N % c.bn || K % c.bk)) continue;
        if (c.format == "nmq" && (K / c.m * c.n) % 64) continue;
        SparseW* w = build(c.format, N, K, dt, c.density, 1, c.bn, c.bk, c.n, c.m, c.bits);
        for (int64_t M : {1, 3, 16, 21, 40, 150}) check_product(*w, dt, M, true, M == 3 || M == 150);
        check_product(*w, dt, 5, true, false, -1);  // x from global memory
        check_product(*w, dt, 2, true, false, 16);
        if (dt == 2 || c.format != "nmq") {
          for (int64_t M : {1, 7, 40}) check_product(*w, dt, M, false, M == 7);
        }
        if (c.format != "nmq")
          for (int64_t M : {1, 9}) check_sampled(*w, dt, M);
        delete w;
      }
  std::printf("checks: %d failed\n", check_failures);
  if (quick) return check_failures ? 1 : 0;

  // Decode timings, bfloat16, against the copy bandwidth: dense bf16 reads
  // 2 N K bytes, so "x dense@BW" is the speed-up over a dense GEMV that ran
  // at the full copy bandwidth (MLX's ran at 0.92 of it, issue 20).
  const double bw = copy_gbps();
  std::printf("\ncopy bandwidth %.0f GB/s (cudaMemcpy device to device, read + write)\n\n", bw);
  std::printf("| case | M | N | K | kernel | us/call | MB | GB/s | of copy BW | x dense@BW | dense-equiv TFLOP/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  const std::vector<Case> timed = {
      {"Bitmask 50%", "bitmask", 0.5, 0, 0, 0, 0, 0}, {"CSR 50%", "csr16", 0.5, 0, 0, 0, 0, 0},
      {"CSR 10%", "csr16", 0.1, 0, 0, 0, 0, 0}, {"CSR 5%", "csr16", 0.05, 0, 0, 0, 0, 0},
      {"2:4", "nm", 0, 0, 0, 2, 4, 0}, {"2:4 4-bit", "nmq", 0, 0, 0, 2, 4, 4},
      {"BSR-64 10%", "bsr", 0.1, 64, 64, 0, 0, 0}};
  for (auto [N, K] : {std::pair{14336, 4096}, std::pair{4096, 4096}})
    for (const auto& c : timed) {
      std::vector<SparseW*> ws;
      size_t total = 0;
      for (int i = 0; total < 150e6 && i < 4; ++i) {
        ws.push_back(build(c.format, N, K, 2, c.density, 10 + i, c.bn, c.bk, c.n, c.m, c.bits, 64, false));
        total += ws.back()->bytes;
      }
      for (int64_t M : {1, 16, 2048}) {
        Dense x(M, K, 2, 3);
        void* out;
        CHECK(cudaMalloc(&out, M * N * 2));
        std::string kernel;
        const double us = time_us(ws, M, x.dev, out, 2, kernel);
        const double bytes = ws[0]->bytes, dense_us = 2.0 * N * K / (bw * 1e3);
        std::printf("| %s | %lld | %d | %d | %s | %.1f | %.1f | %.0f | %.2f | %.2f | %.1f |\n", c.name.c_str(), (long long)M,
                    N, K, kernel.c_str(), us, bytes / 1e6, bytes / us / 1e3, bytes / us / 1e3 / bw, dense_us / us,
                    2.0 * M * N * K / us / 1e6);
        std::fflush(stdout);
        cudaFree(out);
      }
      for (auto* w : ws) delete w;
    }
  return check_failures ? 1 : 0;
}
