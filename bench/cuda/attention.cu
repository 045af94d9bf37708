// The CUDA kernels of the attention on their own, without MLX: each case
// runs what csrc/attention/cuda_plan.h chooses (or a forced path) on random
// inputs, with NaN-poisoned outputs, and checks sampled rows (every row of
// small cases) against a float64 reference on the host; then times the
// issue's shapes with CUDA graphs of back-to-back calls (as MLX records them).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        bench/cuda/attention.cu -o /tmp/attention_kernels && /tmp/attention_kernels
//   ... --checks-only     the checks alone
//   ... --small           the checks on small shapes alone (for compute-sanitizer)
//   ... --decode-only     the checks, then the decode timings alone
// -DMLX_EXT_DEC_Q_ALL_GROUPS=1: the plan sends every group layout attn_dec_q
// can read to it (by default only group size 64, the one checked on a GPU).
//
// (scripts/gpu_kernels.sh attention builds and runs it on the GPU machine.)
// Prints one line per check and per timing; exits non-zero if a check fails.
#include <map>

#include "attention/attn_bwd.cu"
#include "attention/attn_dec_mma.cu"
#include "attention/attn_mma.cu"
#include "attention/attn_vec.cu"
#include "attention/cuda_plan.h"
#include "common.cuh"

using mlx_ext::ceil_div;
using mlx_ext::cuda::AttnParams;
using mlx_ext::cuda::KernelLaunch;
namespace plan_ns = mlx_ext::cuda::attn_plan;

namespace {

// Every kernel by its name in the images (the plan's names).
std::map<std::string, const void*> kernel_table() {
  std::map<std::string, const void*> t;
#define VEC(NAME, BITS, DMAX) t["attn_vec_" #NAME "_b" #BITS "_d" #DMAX] = (const void*)attn_vec_##NAME##_b##BITS##_d##DMAX;
#define DQ(NAME, BITS, DMAX) t["attn_bwd_dq_" #NAME "_b" #BITS "_d" #DMAX] = (const void*)attn_bwd_dq_##NAME##_b##BITS##_d##DMAX;
#define PER_D(NAME, DMAX)                                                                 \
  VEC(NAME, 0, DMAX) VEC(NAME, 4, DMAX) VEC(NAME, 8, DMAX) DQ(NAME, 0, DMAX) DQ(NAME, 4, DMAX) \
  DQ(NAME, 8, DMAX) t["attn_bwd_dkv_" #NAME "_d" #DMAX] = (const void*)attn_bwd_dkv_##NAME##_d##DMAX;
#define PER_TYPE(NAME) \
  PER_D(NAME, 64) PER_D(NAME, 128) PER_D(NAME, 256) t["attn_merge_" #NAME] = (const void*)attn_merge_##NAME;
  PER_TYPE(float32) PER_TYPE(float16) PER_TYPE(bfloat16)
#define MMA(NAME, D) t["attn_mma_" #NAME "_d" #D] = (const void*)attn_mma_##NAME##_d##D;
#define MMA_D(NAME) MMA(NAME, 64) MMA(NAME, 96) MMA(NAME, 128) MMA(NAME, 192) MMA(NAME, 256)
  MMA_D(float16) MMA_D(bfloat16)
#define DEC(NAME, D)                                                                       \
  t["attn_dec_" #NAME "_b0_d" #D] = (const void*)attn_dec_##NAME##_b0_d##D;                  \
  t["attn_dec_" #NAME "_b8_d" #D] = (const void*)attn_dec_##NAME##_b8_d##D;                  \
  t["attn_dec_" #NAME "_b4_d" #D] = (const void*)attn_dec_##NAME##_b4_d##D;
#define DEC_D(NAME) DEC(NAME, 64) DEC(NAME, 128) DEC(NAME, 256)
  DEC_D(float16) DEC_D(bfloat16)
  return t;
}

void launch(const KernelLaunch& k, AttnParams p, cudaStream_t s = 0) {
  static const auto table = kernel_table();
  auto it = table.find(k.kernel);
  if (it == table.end()) {
    std::fprintf(stderr, "no kernel %s\n", k.kernel.c_str());
    std::exit(2);
  }
  static std::map<const void*, int> smem_set; // once per kernel, before any graph capture
  if (k.smem_bytes > 48 * 1024 && smem_set[it->second] < k.smem_bytes) {
    CHECK(cudaFuncSetAttribute(it->second, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem_bytes));
    smem_set[it->second] = k.smem_bytes;
  }
  void* args[] = {&p};
  CHECK(cudaLaunchKernel(it->second, dim3(unsigned(k.grid[0]), unsigned(k.grid[1]), unsigned(k.grid[2])),
                         dim3(k.threads), args, k.smem_bytes, s));
}

enum Dtype { F32 = 0, F16 = 1, BF16 = 2 };
const char* dtype_name(int t) { return t == F32 ? "float32" : t == F16 ? "float16" : "bfloat16"; }
int dtype_size(int t) { return t == F32 ? 4 : 2; }

struct Case {
  std::string name;
  int B = 1, Hq = 32, Hkv = 8, L = 1, S = 4096, D = 128;
  int dtype = BF16, bits = 0, gs = 64;
  bool causal = false;
  int window = 0;
  bool sinks = false, kv_lengths = false;
  int mask = 0; // 1 bool, 2 additive: shape (B, 1, L, S)
  int cap = 0; // rows per (batch, kv head) of the K/V buffers (>= S; 0: S)
  int force = -1; // -1: the plan's path; 1: the plan for a GPU below sm_80 (attn_vec)
  int dec_fill = 0; // attn_dec's target block count (0: the plan's, kDecFillBlocks)
  int copies = 1; // K/V sets rotated by the timing
};

// Uniform values in [lo, hi) of dtype t.
void fill(void* p, size_t n, int t, uint32_t seed, float lo, float hi) {
  if (t == F32) {
    std::vector<float> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = lo + (hi - lo) * (hash32(i, seed) >> 8) * (1.0f / 16777216.0f);
    CHECK(cudaMemcpy(p, h.data(), n * 4, cudaMemcpyHostToDevice));
  } else {
    fill_16bit(static_cast<uint16_t*>(p), n, t == BF16, seed, lo, hi);
  }
}

double host_value(const std::vector<uint8_t>& buf, int t, size_t i) {
  if (t == F32) {
    float f;
    std::memcpy(&f, buf.data() + 4 * i, 4);
    return f;
  }
  uint16_t v;
  std::memcpy(&v, buf.data() + 2 * i, 2);
  return to_host_float(v, t == BF16);
}

std::vector<uint8_t> to_host(const void* p, size_t bytes) {
  std::vector<uint8_t> h(bytes);
  CHECK(cudaMemcpy(h.data(), p, bytes, cudaMemcpyDeviceToHost));
  return h;
}

// Bytes of K and V one call reads (the S rows of every head, codes, scales and biases).
double kv_read_bytes(const Case& c) {
  const double rows = double(c.B) * c.Hkv * c.S;
  return 2 * rows * (c.bits ? c.D * c.bits / 8.0 + 2 * (c.D / c.gs) * dtype_size(c.dtype) : c.D * dtype_size(c.dtype));
}

struct Problem {
  Case c;
  int cap;
  void *q, *out, *dout, *dq, *dk, *dv;
  float *lse, *delta, *sinks, *mask_f;
  uint8_t* mask_b;
  int32_t* lens;
  std::vector<void*> kx, ks, kb, vx, vs, vb; // per copy
  float* partials = nullptr;
  size_t partial_bytes = 0;

  size_t q_elems() const { return size_t(c.B) * c.Hq * c.L * c.D; }
  size_t kv_rows() const { return size_t(c.B) * c.Hkv * cap; }
  size_t x_bytes() const { return c.bits ? kv_rows() * c.D * c.bits / 8 : kv_rows() * c.D * dtype_size(c.dtype); }
  size_t g_elems() const { return c.bits ? kv_rows() * (c.D / c.gs) : 0; }
  double kv_bytes() const { return kv_read_bytes(c); }

  explicit Problem(const Case& c_) : c(c_), cap(c_.cap ? c_.cap : c_.S) {
    const int ts = dtype_size(c.dtype);
    CHECK(cudaMalloc(&q, q_elems() * ts));
    CHECK(cudaMalloc(&out, q_elems() * ts));
    CHECK(cudaMalloc(&dout, q_elems() * ts));
    CHECK(cudaMalloc(&dq, q_elems() * ts));
    CHECK(cudaMalloc(&dk, size_t(c.B) * c.Hkv * c.S * c.D * ts + 16));
    CHECK(cudaMalloc(&dv, size_t(c.B) * c.Hkv * c.S * c.D * ts + 16));
    CHECK(cudaMalloc(&lse, q_elems() / c.D * 4));
    CHECK(cudaMalloc(&delta, q_elems() / c.D * 4));
    CHECK(cudaMalloc(&sinks, c.Hq * 4));
    CHECK(cudaMalloc(&lens, c.B * 4));
    const size_t mask_n = size_t(c.B) * c.L * c.S;
    CHECK(cudaMalloc(&mask_f, c.mask == 2 ? mask_n * 4 : 4));
    CHECK(cudaMalloc(&mask_b, c.mask == 1 ? mask_n : 1));
    fill(q, q_elems(), c.dtype, 1, -1.0f, 1.0f);
    fill(dout, q_elems(), c.dtype, 2, -1.0f, 1.0f);
    fill(sinks, c.Hq, F32, 3, -1.0f, 3.0f);
    std::vector<int32_t> hl(c.B);
    for (int b = 0; b < c.B; ++b) hl[b] = c.kv_lengths ? int(c.S - 1 - (hash32(b, 4) % (c.S / 2 + 1))) : c.S;
    if (c.kv_lengths && c.B > 1) hl[1] = c.S + 5; // clamped to S
    if (c.kv_lengths && c.B > 2) hl[2] = 0; // sees nothing
    CHECK(cudaMemcpy(lens, hl.data(), c.B * 4, cudaMemcpyHostToDevice));
    if (c.mask == 1) {
      std::vector<uint8_t> hm(mask_n);
      for (size_t i = 0; i < mask_n; ++i) hm[i] = hash32(i, 5) % 4 != 0;
      if (c.L > 0) std::fill(hm.begin(), hm.begin() + c.S, 0); // row 0 of batch 0 sees nothing
      CHECK(cudaMemcpy(mask_b, hm.data(), mask_n, cudaMemcpyHostToDevice));
    }
    if (c.mask == 2) fill(mask_f, mask_n, F32, 6, -3.0f, 1.0f);
    for (int k = 0; k < c.copies; ++k) {
      for (auto* v : {&kx, &vx}) {
        void* p;
        CHECK(cudaMalloc(&p, x_bytes()));
        if (c.bits)
          fill_words<<<1024, 256>>>(static_cast<uint32_t*>(p), x_bytes() / 4, 10 + 2 * k + (v == &vx));
        else
          fill(p, x_bytes() / ts, c.dtype, 10 + 2 * k + (v == &vx), -1.0f, 1.0f);
        v->push_back(p);
      }
      for (auto* v : {&ks, &kb, &vs, &vb}) {
        void* p = nullptr;
        if (c.bits) {
          CHECK(cudaMalloc(&p, g_elems() * ts));
          const bool scale = v == &ks || v == &vs;
          fill(p, g_elems(), c.dtype, 20 + 4 * k + int(v - &ks), scale ? 0.002f : -0.1f, scale ? 0.02f : 0.1f);
        }
        v->push_back(p);
      }
    }
    CHECK(cudaDeviceSynchronize());
  }

  AttnParams params(int copy) const {
    AttnParams p{};
    p.q = q;
    auto rows = [&](void* d) { return mlx_ext::cuda::AttnRows{d, int64_t(c.Hkv) * cap, cap}; };
    p.k = {rows(kx[copy]), rows(ks[copy]), rows(kb[copy])};
    p.v = {rows(vx[copy]), rows(vs[copy]), rows(vb[copy])};
    if (c.mask) {
      p.mask = c.mask == 1 ? static_cast<const void*>(mask_b) : mask_f;
      p.mask_is_bool = c.mask == 1;
      p.mask_strides[0] = int64_t(c.L) * c.S, p.mask_strides[1] = 0, p.mask_strides[2] = c.S, p.mask_strides[3] = 1;
    }
    p.sinks = c.sinks ? sinks : nullptr;
    p.kv_lengths = c.kv_lengths ? lens : nullptr;
    p.out = out, p.lse = lse;
    p.bwd_lse = lse, p.delta = delta, p.d_out = dout, p.dq = dq, p.dk = dk, p.dv = dv;
    p.B = c.B, p.Hq = c.Hq, p.Hkv = c.Hkv, p.L = c.L, p.S = c.S, p.D = c.D;
    p.scale = 1.0f / std::sqrt(float(c.D));
    p.causal = c.causal || c.window;
    p.window = c.window;
    p.bits = c.bits;
    p.group_size = c.gs;
    return p;
  }

  // The plan on an H100/H200, or (force == 1) the one for a GPU below sm_80,
  // which never takes the tensor-core kernel.
  plan_ns::Plan plan() const {
    const plan_ns::Problem pr{c.B, c.Hq, c.Hkv, c.L, c.S, c.D, c.bits, dtype_name(c.dtype), c.gs};
    return plan_ns::plan_forward(pr, {c.force == 1 ? 7 : 9, 0}, c.dec_fill ? c.dec_fill : plan_ns::kDecFillBlocks);
  }

  // The forward of copy `copy` on stream s (the vec path: kernel, then merge).
  void forward(const plan_ns::Plan& pl, int copy, cudaStream_t s = 0) {
    AttnParams p = params(copy);
    if (pl.path == plan_ns::Path::mma) {
      launch(pl.main, p, s);
      return;
    }
    // vec or dec: the split-K kernel, then attn_merge
    const size_t need = pl.partial_floats * 4;
    if (need > partial_bytes) {
      CHECK(cudaDeviceSynchronize());
      cudaFree(partials);
      CHECK(cudaMalloc(&partials, need));
      partial_bytes = need;
    }
    const int64_t rows = int64_t(c.B) * c.Hq * c.L;
    p.part_acc = partials;
    p.part_ml = partials + pl.chunks * rows * c.D;
    p.chunks = pl.chunks, p.chunk_len = pl.chunk_len;
    launch(pl.main, p, s);
    launch(pl.merge, p, s);
  }
  void backward(cudaStream_t s = 0) {
    const plan_ns::Problem pr{c.B, c.Hq, c.Hkv, c.L, c.S, c.D, c.bits, dtype_name(c.dtype)};
    const auto bp = plan_ns::plan_backward(pr);
    AttnParams p = params(0);
    launch(bp.dq, p, s);
    if (!c.bits) launch(bp.dkv, p, s);
  }

  // ---- the float64 reference on the host, from copies of copy 0's inputs
  struct Host {
    std::vector<uint8_t> q, kx, ks, kb, vx, vs, vb, dout, mask_b;
    std::vector<float> sinks, mask_f;
    std::vector<int32_t> lens;
  };
  Host host() const {
    Host h;
    const int ts = dtype_size(c.dtype);
    h.q = to_host(q, q_elems() * ts);
    h.dout = to_host(dout, q_elems() * ts);
    h.kx = to_host(kx[0], x_bytes());
    h.vx = to_host(vx[0], x_bytes());
    if (c.bits) {
      h.ks = to_host(ks[0], g_elems() * ts), h.kb = to_host(kb[0], g_elems() * ts);
      h.vs = to_host(vs[0], g_elems() * ts), h.vb = to_host(vb[0], g_elems() * ts);
    }
    h.sinks.resize(c.Hq);
    CHECK(cudaMemcpy(h.sinks.data(), sinks, c.Hq * 4, cudaMemcpyDeviceToHost));
    h.lens.resize(c.B);
    CHECK(cudaMemcpy(h.lens.data(), lens, c.B * 4, cudaMemcpyDeviceToHost));
    const size_t mask_n = size_t(c.B) * c.L * c.S;
    if (c.mask == 1) h.mask_b = to_host(mask_b, mask_n);
    if (c.mask == 2) {
      h.mask_f.resize(mask_n);
      CHECK(cudaMemcpy(h.mask_f.data(), mask_f, mask_n * 4, cudaMemcpyDeviceToHost));
    }
    return h;
  }
  // Value d of key j of (b, kv head h) in K (k = true) or V, dequantized.
  double kv(const Host& h, bool k, int b, int hk, int j, int d) const {
    const size_t row = (size_t(b) * c.Hkv + hk) * cap + j;
    const auto& x = k ? h.kx : h.vx;
    if (!c.bits) return host_value(x, c.dtype, row * c.D + d);
    const uint8_t byte = x[row * c.D * c.bits / 8 + d * c.bits / 8];
    const int code = c.bits == 8 ? byte : (d % 2 ? byte >> 4 : byte & 15);
    const size_t g = row * (c.D / c.gs) + d / c.gs;
    return host_value(k ? h.ks : h.vs, c.dtype, g) * code + host_value(k ? h.kb : h.vb, c.dtype, g);
  }
  // The probabilities of row (b, h, i) over the S keys (the sink's share
  // left out), its log-sum-exp; the row's visible keys.
  std::vector<double> probs(const Host& h, int b, int hq, int i, double* lse_out) const {
    const int hk = hq / (c.Hq / c.Hkv);
    const int len = std::min(std::max(h.lens[b], 0), c.S);
    const int len_used = c.kv_lengths ? len : c.S;
    int lo = 0, hi = len_used;
    if (c.causal || c.window) {
      const int pos = i + len_used - c.L;
      hi = std::min(hi, pos + 1);
      if (c.window) lo = std::max(0, pos + 1 - c.window);
    }
    const double scale = double(1.0f / std::sqrt(float(c.D))); // the kernels' float scale
    std::vector<double> logit(c.S, -INFINITY);
    double top = c.sinks ? double(h.sinks[hq]) : -INFINITY;
    const size_t qrow = ((size_t(b) * c.Hq + hq) * c.L + i) * c.D;
    for (int j = lo; j < hi; ++j) {
      const size_t mi = (size_t(b) * c.L + i) * c.S + j;
      if (c.mask == 1 && !h.mask_b[mi]) continue;
      double s = 0;
      for (int d = 0; d < c.D; ++d) s += host_value(h.q, c.dtype, qrow + d) * kv(h, true, b, hk, j, d);
      s *= scale;
      if (c.mask == 2) s += h.mask_f[mi];
      logit[j] = s;
      top = std::max(top, s);
    }
    std::vector<double> p(c.S, 0.0);
    if (top == -INFINITY) {
      *lse_out = -INFINITY;
      return p;
    }
    double total = c.sinks ? std::exp(double(h.sinks[hq]) - top) : 0.0;
    for (int j = 0; j < c.S; ++j)
      if (logit[j] != -INFINITY) total += p[j] = std::exp(logit[j] - top);
    for (double& v : p) v /= total;
    *lse_out = top + std::log(total);
    return p;
  }

  // Checks out and lse of `samples` rows (all when <= 0).
  void check_forward(const std::string& what, int samples, double tol) const {
    const Host h = host();
    const int ts = dtype_size(c.dtype);
    const auto ho = to_host(out, q_elems() * ts);
    std::vector<float> hl(q_elems() / c.D);
    CHECK(cudaMemcpy(hl.data(), lse, hl.size() * 4, cudaMemcpyDeviceToHost));
    RelativeError err, lerr;
    bool lse_inf_ok = true;
    const int64_t rows = int64_t(c.B) * c.Hq * c.L;
    for_each_sample(rows, samples, [&](int64_t r) {
      const int i = int(r % c.L), hq = int(r / c.L % c.Hq), b = int(r / c.L / c.Hq);
      double ref_lse;
      const auto p = probs(h, b, hq, i, &ref_lse);
      const int hk = hq / (c.Hq / c.Hkv);
      for (int d = 0; d < c.D; ++d) {
        double o = 0;
        for (int j = 0; j < c.S; ++j)
          if (p[j] != 0) o += p[j] * kv(h, false, b, hk, j, d);
        err.add(host_value(ho, c.dtype, size_t(r) * c.D + d), o);
      }
      if (ref_lse == -INFINITY) lse_inf_ok &= hl[r] == -INFINITY;
      else lerr.add(hl[r], ref_lse);
    });
    report_check(what + " out", err.value(), tol);
    report_check(what + " lse", lerr.nan ? NAN : lerr.max_err, 1e-3 * std::max(1.0, lerr.max_ref));
    report_check(what + " empty rows' lse = -inf", lse_inf_ok ? 0.0 : 1.0, 0.5);
  }

  // Checks dq (and dk, dv) against the float64 gradient, with lse and delta
  // from the float64 forward (written to the device first).
  void check_backward(const std::string& what, double tol) {
    const Host h = host();
    const int ts = dtype_size(c.dtype);
    const int64_t rows = int64_t(c.B) * c.Hq * c.L;
    std::vector<std::vector<double>> P(rows), O(rows);
    std::vector<float> hl(rows), hd(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const int i = int(r % c.L), hq = int(r / c.L % c.Hq), b = int(r / c.L / c.Hq), hk = hq / (c.Hq / c.Hkv);
      double l;
      P[r] = probs(h, b, hq, i, &l);
      hl[r] = float(l);
      O[r].assign(c.D, 0.0);
      double dl = 0;
      for (int d = 0; d < c.D; ++d) {
        for (int j = 0; j < c.S; ++j)
          if (P[r][j] != 0) O[r][d] += P[r][j] * kv(h, false, b, hk, j, d);
        dl += O[r][d] * host_value(h.dout, c.dtype, size_t(r) * c.D + d);
      }
      hd[r] = float(dl);
    }
    CHECK(cudaMemcpy(lse, hl.data(), rows * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(delta, hd.data(), rows * 4, cudaMemcpyHostToDevice));
    const size_t kv_elems = size_t(c.B) * c.Hkv * c.S * c.D;
    poison(dq, q_elems() * ts), poison(dk, kv_elems * ts), poison(dv, kv_elems * ts);
    backward();
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    const auto gq = to_host(dq, q_elems() * ts), gk = to_host(dk, kv_elems * ts), gv = to_host(dv, kv_elems * ts);
    const double scale = double(1.0f / std::sqrt(float(c.D)));
    std::vector<double> rq(q_elems(), 0.0), rk(kv_elems, 0.0), rv(kv_elems, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const int hq = int(r / c.L % c.Hq), b = int(r / c.L / c.Hq), hk = hq / (c.Hq / c.Hkv);
      for (int j = 0; j < c.S; ++j) {
        const double p = P[r][j];
        if (p == 0) continue;
        double dp = 0;
        for (int d = 0; d < c.D; ++d) dp += host_value(h.dout, c.dtype, size_t(r) * c.D + d) * kv(h, false, b, hk, j, d);
        const double ds = p * (dp - hd[r]);
        const size_t krow = ((size_t(b) * c.Hkv + hk) * c.S + j) * c.D;
        for (int d = 0; d < c.D; ++d) {
          rq[size_t(r) * c.D + d] += scale * ds * kv(h, true, b, hk, j, d);
          rk[krow + d] += scale * ds * host_value(h.q, c.dtype, size_t(r) * c.D + d);
          rv[krow + d] += p * host_value(h.dout, c.dtype, size_t(r) * c.D + d);
        }
      }
    }
    RelativeError eq, ek, ev;
    for (size_t i = 0; i < rq.size(); ++i) eq.add(host_value(gq, c.dtype, i), rq[i]);
    report_check(what + " dq", eq.value(), tol);
    if (c.bits) return;
    for (size_t i = 0; i < rk.size(); ++i) ek.add(host_value(gk, c.dtype, i), rk[i]), ev.add(host_value(gv, c.dtype, i), rv[i]);
    report_check(what + " dk", ek.value(), tol);
    report_check(what + " dv", ev.value(), tol);
  }
};

std::string describe(const Case& c, const plan_ns::Plan& pl) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s [%s B=%d Hq=%d Hkv=%d L=%d S=%d cap=%d D=%d bits=%d gs=%d%s%s%s%s%s%s] %s", c.name.c_str(),
                dtype_name(c.dtype), c.B, c.Hq, c.Hkv, c.L, c.S, c.cap ? c.cap : c.S, c.D, c.bits, c.gs,
                c.causal ? " causal" : "", c.window ? " window" : "", c.sinks ? " sinks" : "",
                c.kv_lengths ? " kv_lengths" : "", c.mask == 1 ? " bool-mask" : c.mask == 2 ? " add-mask" : "",
                c.force == 1 ? " forced-vec" : "", pl.main.kernel.c_str());
  return buf;
}

void check_case(const Case& c, int samples = 0, double tol = 2e-2) {
  Problem p(c);
  const auto pl = p.plan();
  poison(p.out, p.q_elems() * dtype_size(c.dtype));
  poison(p.lse, p.q_elems() / c.D * 4);
  p.forward(pl, 0);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  p.check_forward(describe(c, pl), samples, tol);
}

// Microseconds per call: a CUDA graph of `calls` forward calls rotating over
// the K/V copies (captured from the stream), median of `reps` replays.
double time_forward(Problem& p, const plan_ns::Plan& pl, int calls, int reps) {
  cudaStream_t s;
  CHECK(cudaStreamCreate(&s));
  p.forward(pl, 0, s); // allocates the partials outside the capture
  CHECK(cudaStreamSynchronize(s));
  cudaGraph_t g;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) p.forward(pl, i % p.c.copies, s);
  CHECK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, g, 0));
  const double ms = median_round_ms(s, [&] { CHECK(cudaGraphLaunch(exec, s)); }, reps);
  cudaGraphExecDestroy(exec), cudaGraphDestroy(g), cudaStreamDestroy(s);
  return ms * 1e3 / calls;
}

double time_backward(Problem& p, int reps) {
  cudaStream_t s;
  CHECK(cudaStreamCreate(&s));
  const double ms = median_round_ms(s, [&] { p.backward(s); }, reps);
  cudaStreamDestroy(s);
  return ms * 1e3;
}

} // namespace

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool small_only = mode == "--small";
  const bool quick = small_only || mode == "--checks-only";
  const bool decode_only = mode == "--decode-only";

  // ---- correctness: every kernel family, mask kind and K/V format, ragged shapes
  auto small = [](std::string name) {
    Case c;
    c.name = name, c.B = 2, c.Hq = 6, c.Hkv = 2, c.L = 1, c.S = 333, c.D = 128;
    return c;
  };
  for (int t : {BF16, F16, F32})
    for (int bits : {0, 8, 4})
      for (int D : {64, 96, 128, 256}) {
        Case c = small("decode");
        c.dtype = t, c.bits = bits, c.D = D, c.gs = D % 64 ? 32 : 64;
        check_case(c);
      }
  for (int bits : {0, 8, 4}) {
    Case c = small("decode sliced cache");
    c.bits = bits, c.cap = 400, c.S = 301, c.L = 3, c.sinks = true, c.kv_lengths = true, c.causal = true, c.B = 3;
    check_case(c);
    c.name = "decode window", c.window = 40, c.sinks = false;
    check_case(c);
    c.name = "decode bool mask", c.window = 0, c.causal = false, c.mask = 1;
    check_case(c);
    c.name = "decode additive mask", c.mask = 2, c.sinks = true;
    check_case(c);
  }
  // attn_dec's row blocks: G L rows of one kv head per block of 16 (G = 8,
  // L = 3: two blocks, the second part empty), f16, every option at once.
  for (int t : {BF16, F16})
    for (int bits : {8, 4})
      for (int D : {64, 128, 256})
        for (int gs : {32, 64, 128}) { // attn_dec_q's group layouts (the others: attn_vec)
          if (gs > D) continue;
          Case c = small("decode quantized groups");
          c.dtype = t, c.bits = bits, c.D = D, c.gs = gs, c.S = 203;
          check_case(c);
        }
  for (int t : {BF16, F16})
    for (int bits : {0, 8, 4})
    for (int D : {64, 128, 256}) {
      Case c = small("decode rows");
      c.dtype = t, c.bits = bits, c.gs = 32 * (1 + (bits == 4)), c.D = D, c.Hq = 16, c.Hkv = 2, c.L = 3, c.S = 1000, c.cap = 1037;
      check_case(c);
      c.name = "decode rows all", c.causal = true, c.window = 300, c.sinks = true, c.kv_lengths = true, c.B = 3;
      check_case(c);
      c.name = "decode rows add-mask", c.window = 0, c.causal = false, c.mask = 2;
      check_case(c);
      c.name = "decode rows L=8 bool-mask", c.L = 8, c.Hq = 2, c.Hkv = 1, c.mask = 1, c.S = 77, c.cap = 0;
      check_case(c);
    }
  for (int t : {BF16, F16})
    for (int D : {64, 96, 128, 192, 256}) {
      Case c;
      c.name = "prefill mma causal", c.dtype = t, c.B = 2, c.Hq = 4, c.Hkv = 2, c.L = 100, c.S = 157, c.D = D;
      c.causal = true;
      check_case(c);
      c.name = "prefill mma plain", c.causal = false, c.L = 70, c.cap = 170;
      check_case(c);
    }
  {
    Case c;
    c.name = "prefill mma all", c.B = 3, c.Hq = 4, c.Hkv = 1, c.L = 130, c.S = 200, c.D = 128, c.cap = 210;
    c.window = 50, c.sinks = true, c.kv_lengths = true;
    check_case(c);
    c.name = "prefill mma bool mask", c.window = 0, c.mask = 1;
    check_case(c);
    c.name = "prefill mma additive mask", c.mask = 2, c.causal = true;
    check_case(c);
    c.name = "prefill vec (forced) additive mask";
    c.force = 1;
    check_case(c);
    c.name = "prefill float32 (vec)", c.force = -1, c.dtype = F32, c.mask = 0;
    check_case(c);
    c.name = "prefill 8-bit (vec)", c.dtype = BF16, c.bits = 8;
    check_case(c);
  }
  for (int t : {BF16, F32})
    for (int bits : {0, 4}) {
      Case c;
      c.name = "backward", c.dtype = t, c.bits = bits, c.B = 2, c.Hq = 4, c.Hkv = 2, c.L = 37, c.S = 45, c.D = 64;
      c.causal = true, c.sinks = true, c.kv_lengths = true, c.cap = 50;
      Problem p(c);
      p.check_backward("backward [" + std::string(dtype_name(t)) + " bits=" + std::to_string(bits) +
                       " causal sinks kv_lengths]", 3e-2);
      Case m = c;
      m.name = "backward mask", m.causal = false, m.window = 0, m.mask = 2, m.kv_lengths = false, m.D = 128, m.L = 20;
      Problem pm(m);
      pm.check_backward("backward [" + std::string(dtype_name(t)) + " bits=" + std::to_string(bits) + " D=128 add-mask]", 3e-2);
    }
  {
    Case c;
    c.name = "backward window", c.B = 1, c.Hq = 2, c.Hkv = 1, c.L = 50, c.S = 80, c.D = 256, c.window = 9;
    Problem p(c);
    p.check_backward("backward [bfloat16 D=256 window]", 3e-2);
  }
  // The issue's shapes, sampled rows.
  for (int S : small_only ? std::vector<int>{} : std::vector<int>{4096, 32768, 131072})
    for (int bits : {0, 8, 4}) {
      Case c;
      c.name = "decode issue shape", c.S = S, c.bits = bits;
      check_case(c, 8);
      if (bits == 0) {
        c.name = "decode issue shape, sliced (cap = S + 100)", c.cap = S + 100;
        check_case(c, 8);
      }
    }
  if (!small_only) {
    Case c;
    c.name = "prefill issue shape", c.L = c.S = 8192, c.causal = true;
    check_case(c, 16);
  }
  std::printf("checks: %d failed\n", check_failures);
  if (quick) return check_failures ? 1 : 0;

  // ---- timings (kernel-only: no MLX, graphs of back-to-back calls)
  const double bw = copy_gbps();
  std::printf("\ncopy bandwidth %.0f GB/s (cudaMemcpy device to device, read + write)\n\n", bw);
  std::printf("| case | kernel | S | us/call | K/V GB/s | of copy BW | TFLOP/s |\n|---|---|---|---|---|---|---|\n");
  const double l2 = prop.l2CacheSize;
  struct Variant {
    int bits, sliced, force, fill;
  };
  // bf16 and 8- / 4-bit K/V (group size 64) on the plan's kernels (attn_dec,
  // attn_dec_q), bf16 sliced, each on attn_vec as before (the same run's
  // comparison), attn_dec with half and twice the plan's blocks.
  const std::vector<Variant> variants = {{0, 0, -1, 0}, {0, 1, -1, 0}, {8, 0, -1, 0}, {4, 0, -1, 0},
      {0, 0, 1, 0}, {8, 0, 1, 0}, {4, 0, 1, 0}, {0, 0, -1, 132}, {0, 0, -1, 528}};
  for (const Variant& va : variants)
    for (int S : {4096, 32768, 131072}) {
        const int bits = va.bits, sliced = va.sliced;
        Case c;
        c.name = bits ? std::to_string(bits) + "-bit decode" : sliced ? "bf16 decode, sliced cache (cap = S + 100)" : "bf16 decode";
        if (va.force == 1) c.name += " (attn_vec, as before)";
        if (va.fill) c.name += " (" + std::to_string(va.fill) + " blocks)";
        c.S = S, c.bits = bits, c.cap = sliced ? S + 100 : 0, c.force = va.force, c.dec_fill = va.fill;
        c.copies = int(std::max(1.0, std::ceil(4 * l2 / kv_read_bytes(c)))); // rotated past the L2
        Problem p(c);
        const auto pl = p.plan();
        const double us = time_forward(p, pl, 32, 15);
        std::printf("| %s | %s (%d chunks) | %d | %.1f | %.0f | %.2f | |\n", c.name.c_str(), pl.main.kernel.c_str(),
                    pl.chunks, S, us, p.kv_bytes() / us / 1e3, p.kv_bytes() / us / 1e3 / bw);
        std::fflush(stdout);
      }
  if (decode_only) return check_failures ? 1 : 0;
  for (int D : {128, 192, 256})
    for (int L : {2048, 8192}) {
      Case c;
      c.name = "causal prefill", c.L = c.S = L, c.D = D, c.causal = true;
      Problem p(c);
      const auto pl = p.plan();
      const double us = time_forward(p, pl, 4, 7);
      const double flops = 4.0 * c.Hq * double(L) * L * D / 2;
      std::printf("| %s D=%d | %s | %d | %.1f | | | %.1f |\n", c.name.c_str(), D, pl.main.kernel.c_str(), L, us,
                  flops / us / 1e6);
      std::fflush(stdout);
    }
  {
    Case c;
    c.name = "backward causal (CUDA cores)", c.L = c.S = 4096, c.causal = true;
    Problem p(c);
    const double us = time_backward(p, 3);
    std::printf("| %s | attn_bwd_dq + attn_bwd_dkv | %d | %.1f | | | %.1f |\n", c.name.c_str(), c.S, us,
                10.0 * c.Hq * double(c.L) * c.S * c.D / 2 / us / 1e6);
  }
  return check_failures ? 1 : 0;
}
