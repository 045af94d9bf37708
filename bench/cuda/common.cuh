// What every CUDA kernel bench (bench/cuda/<op>.cu) needs, whatever its
// operator: random device buffers, 16-bit values read on the host, NaN
// poisoning of outputs, float64 comparison reports and CUDA-event timing.
// Each bench is one translation unit, so all of it has internal linkage.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CHECK(call)                                                                    \
  do {                                                                                 \
    cudaError_t e_ = (call);                                                           \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

namespace {

__host__ __device__ uint32_t hash32(uint64_t i, uint32_t seed) {
  uint64_t z = i * 0x9e3779b97f4a7c15ull + seed * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return uint32_t(z ^ (z >> 31));
}

// Random bits, e.g. packed quantized weights.
__global__ void fill_words(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = hash32(i, seed);
}

__device__ void set_from_float(__half& out, float v) { out = __float2half_rn(v); }
__device__ void set_from_float(__nv_bfloat16& out, float v) { out = __float2bfloat16_rn(v); }

template <typename T>
__global__ void fill_values(T* p, size_t n, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    set_from_float(p[i], lo + (hi - lo) * (hash32(i, seed) >> 8) * (1.0f / 16777216.0f));
}

// Uniform values in [lo, hi) into a buffer of bfloat16 or float16 values.
void fill_16bit(uint16_t* p, size_t n, bool bf16, uint32_t seed, float lo, float hi) {
  if (bf16)
    fill_values<<<1024, 256>>>(reinterpret_cast<__nv_bfloat16*>(p), n, seed, lo, hi);
  else
    fill_values<<<1024, 256>>>(reinterpret_cast<__half*>(p), n, seed, lo, hi);
}

float to_host_float(uint16_t v, bool is_bf16) {
  if (is_bf16) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return __half2float(*reinterpret_cast<const __half*>(&v));
}

// All bytes 0xff: NaN in float16, bfloat16 and float32, so that an output
// the kernel never wrote fails its check.
void poison(void* p, size_t bytes) { CHECK(cudaMemset(p, 0xff, bytes)); }

// Calls f(index) for every index below total, or, when samples > 0, for
// `samples` of them spread by a hash (a float64 reference of a large output
// on the host would take minutes).
template <typename F>
void for_each_sample(int64_t total, int samples, F f) {
  const int64_t count = samples > 0 ? std::min<int64_t>(samples, total) : total;
  for (int64_t i = 0; i < count; ++i) f(samples > 0 ? int64_t(hash32(i, 7)) * 7919 % total : i);
}

// max |got - ref| / max |ref| over the values added; NaN if any got is NaN.
struct RelativeError {
  double max_err = 0.0, max_ref = 0.0;
  bool nan = false;
  void add(double got, double ref) {
    nan |= std::isnan(got);
    max_err = std::max(max_err, std::abs(got - ref));
    max_ref = std::max(max_ref, std::abs(ref));
  }
  double value() const { return nan ? NAN : max_err / std::max(max_ref, 1e-30); }
};

int check_failures = 0;

// One line per check; a failure (or NaN) counts towards the exit status.
void report_check(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;  // false for NaN
  check_failures += !ok;
  std::printf("check %s: max err / max |ref| %.2e %s\n", what.c_str(), err, ok ? "ok" : "FAILED");
}

// A CUDA graph of one kernel node per element of params (all independent),
// as MLX records a graph of calls.
template <typename Params>
cudaGraphExec_t kernel_graph(void (*fn)(Params), dim3 grid, dim3 block, int smem, std::vector<Params>& params) {
  cudaGraph_t g;
  CHECK(cudaGraphCreate(&g, 0));
  for (Params& p : params) {
    cudaKernelNodeParams kp{};
    void* args[] = {&p};
    kp.func = reinterpret_cast<void*>(fn);
    kp.gridDim = grid, kp.blockDim = block, kp.sharedMemBytes = smem, kp.kernelParams = args;
    cudaGraphNode_t node;
    CHECK(cudaGraphAddKernelNode(&node, g, nullptr, 0, &kp));
  }
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, g, 0));
  CHECK(cudaGraphDestroy(g));
  return exec;
}

// Median milliseconds of `reps` runs of round() on stream s, each timed with
// CUDA events, after one untimed run.
template <typename Round>
double median_round_ms(cudaStream_t s, Round round, int reps) {
  round();
  CHECK(cudaStreamSynchronize(s));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    CHECK(cudaEventRecord(a, s));
    round();
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK(cudaGetLastError());
  cudaEventDestroy(a), cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Device copy bandwidth in GB/s, bytes read + written: the median of 10
// cudaMemcpy device-to-device copies of 1 GiB after 2 warm-up copies.
double copy_gbps() {
  const size_t bytes = size_t(1) << 30;
  void *a, *b;
  CHECK(cudaMalloc(&a, bytes));
  CHECK(cudaMalloc(&b, bytes));
  CHECK(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(e0);
    CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float t;
    cudaEventElapsedTime(&t, e0, e1);
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaFree(a), cudaFree(b);
  return 2.0 * bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;
}

}  // namespace
