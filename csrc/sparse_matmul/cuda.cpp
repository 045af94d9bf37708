// SparseMatmul::eval_gpu and SparseSampledMatmul::eval_gpu for MLX's CUDA
// backend: fill the kernels' parameters (cuda_params.h) from the format's
// arrays and launch what cuda_plan.h chooses, through MLX's command encoder
// (common/cuda/launcher.h). The kernels read one dtype for x, the values,
// bias and out: the op casts them to the output's dtype on GPU streams
// (sparse_matmul.cpp), exactly (the output's dtype holds each of them).
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "common/cuda/driver.h"
#include "common/cuda/launcher.h"
#include "common/errors.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "mlx/backend/cuda/device.h"
#include "sparse_matmul/cuda_params.h"
#include "sparse_matmul/cuda_plan.h"
#include "sparse_matmul/sparse_matmul.h"

namespace mlx_ext {
namespace cuda {
namespace {

constexpr const char* kOp = "sparse_matmul";

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// MLX_EXT_CUDA_SPARSE_TC=0 turns the tensor-core prefill kernels off (the
// decode kernels then take every row count, tiles of 16 rows of x).
bool tc_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MLX_EXT_CUDA_SPARSE_TC");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

int sm_count(int device) {
  static int count[64] = {};
  if (device >= 0 && device < 64 && count[device]) return count[device];
  const auto& d = driver();
  CUdevice dev;
  d.check(d.device_get(&dev, device), "cuDeviceGet");
  int n = 0;
  d.check(d.device_get_attribute(&n, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
  if (device >= 0 && device < 64) count[device] = n;
  return n;
}

sparse_plan::Format plan_format(SparseFormat f) {
  switch (f) {
    case SparseFormat::csr: return sparse_plan::Format::csr;
    case SparseFormat::bitmask: return sparse_plan::Format::bitmask;
    case SparseFormat::bsr: return sparse_plan::Format::bsr;
    case SparseFormat::nm: break;
  }
  return sparse_plan::Format::nm;
}

// The parameters and plan problem of W; `arrays` are the format's arrays
// (sparse_matmul.h), `dtype` the kernels' (the values', or the scales' for
// quantized N:M).
SpParams w_params(const SparseLayout& l, const mx::array* arrays) {
  SpParams p{};
  p.values = mx::gpu_ptr<void>(arrays[0]);
  p.N = l.N;
  p.K = l.K;
  p.block_n = l.block_n;
  p.block_k = l.block_k;
  if (l.format == SparseFormat::nm) {
    if (l.quantized()) {
      p.scales = mx::gpu_ptr<void>(arrays[1]);
      p.biases = mx::gpu_ptr<void>(arrays[2]);
    }
    p.pattern = mx::gpu_ptr<void>(arrays[l.value_arrays()]);
    p.nm_n = l.n;
    p.nm_m = l.m;
    p.code_bits = l.code_bits();
    p.bits = l.bits;
    p.group_size = l.group_size;
  } else {
    p.pattern = mx::gpu_ptr<void>(arrays[1]);
    p.row_ptr = mx::gpu_ptr<int32_t>(arrays[2]);
    p.wide_columns = arrays[1].dtype() == mx::uint32;
  }
  return p;
}

sparse_plan::Problem problem(const SparseLayout& l, const SpParams& p, int64_t M, mx::Dtype dtype) {
  sparse_plan::Problem pr{plan_format(l.format), M, l.N, l.K, kernel_dtype_name(dtype), int(mx::size_of(dtype))};
  pr.block_n = l.block_n;
  pr.block_k = l.block_k;
  pr.nm_n = l.n;
  pr.nm_m = l.m;
  pr.bits = l.bits;
  pr.values_aligned = aligned16(p.values);
  pr.pattern_aligned = aligned16(p.pattern);
  return pr;
}

// The number of arrays of the format (sparse_matmul.h).
int n_arrays(const SparseLayout& l) {
  return l.format == SparseFormat::nm ? 1 + l.value_arrays() : 3;
}

int64_t stored_values(const SparseLayout& l, const mx::array* arrays) {
  if (l.format == SparseFormat::nm) return int64_t(l.N) * (l.K / l.m * l.n);
  return arrays[0].size();
}

void check_cc(const mx::Stream& s) {
  auto& device = mx::cu::device(s.device);
  if (device.compute_capability_major() < sparse_plan::kMinComputeCapability)
    runtime_error(kOp, "the CUDA kernels need compute capability 8.0 or newer");
}

// Runs plan.prep (the Bitmask's word prefixes) into a scratch buffer.
void run_prep(Launcher& launch, const sparse_plan::Plan& plan, SpParams& p, const mx::array& mask,
    std::optional<mx::array>& prefix) {
  if (plan.prep.kernel.empty()) return;
  prefix = launch.scratch(int64_t(p.N) * ((p.K + 31) / 32) * 4);
  p.word_prefix = mx::gpu_ptr<int32_t>(*prefix);
  launch(plan.prep, p, {&mask}, {&*prefix});
}

} // namespace
} // namespace cuda

MLX_EXT_HAS_GPU(SparseMatmul)
MLX_EXT_HAS_GPU(SparseSampledMatmul)

void SparseMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  using namespace cuda;
  auto& s = stream();
  auto& enc = mx::cu::get_command_encoder(s);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const int cols = out.shape(-1);
  const int64_t M = cols ? out.size() / cols : 0;
  if (M == 0) return;
  check_cc(s);
  const SparseLayout& l = layout_;
  const mx::array* arrays = inputs.data() + 1;
  const mx::array& x = inputs[0];
  const mx::array* bias = has_bias_ ? &inputs.back() : nullptr;
  const mx::array& typed = arrays[l.quantized() ? 1 : 0];
  if (x.dtype() != out.dtype() || typed.dtype() != out.dtype() || (bias && bias->dtype() != out.dtype()))
    runtime_error(kOp, "the CUDA kernels take x, values and bias of the output's dtype");

  SpParams p = w_params(l, arrays);
  p.x = mx::gpu_ptr<void>(x);
  p.bias = bias ? mx::gpu_ptr<void>(*bias) : nullptr;
  p.out = mx::gpu_ptr<void>(out);
  p.M = M;
  p.stored = stored_values(l, arrays);
  auto pr = problem(l, p, M, out.dtype());
  pr.transpose = transpose_;
  pr.x_aligned = aligned16(p.x);
  auto& device = mx::cu::device(s.device);
  const auto plan = sparse_plan::plan(pr, {device.compute_capability_major(),
      device.compute_capability_minor(), sm_count(device.cuda_device()), tc_enabled()});
  p.vec = plan.vec;
  p.slices = plan.slices;

  Launcher launch(enc, s.device.index, kOp);
  std::optional<mx::array> prefix;
  run_prep(launch, plan, p, arrays[1], prefix);
  const int n = n_arrays(l);
  auto record = [&](const KernelLaunch& k, const SpParams& q, const mx::array& target) {
    launch(k, q, {&x, &arrays[0], &arrays[1], n > 2 ? &arrays[2] : nullptr, n > 3 ? &arrays[3] : nullptr,
        bias, prefix ? &*prefix : nullptr}, {&target});
  };
  if (plan.slices <= 1) {
    record(plan.main, p, out);
    return;
  }
  auto partials = launch.scratch(int64_t(plan.slices) * M * l.K * 4);
  SpParams q = p;
  q.out = mx::gpu_ptr<void>(partials);
  record(plan.main, q, partials);
  SpParams r = p;
  r.x = q.out;
  r.parts = plan.slices;
  launch(plan.reduce, r, {&partials, bias}, {&out});
}

void SparseSampledMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  using namespace cuda;
  auto& s = stream();
  auto& enc = mx::cu::get_command_encoder(s);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) return;
  check_cc(s);
  const SparseLayout& l = layout_;
  const mx::array& g = inputs[0];
  const mx::array& x = inputs[1];
  const mx::array* arrays = inputs.data() + 2;
  SpParams p = w_params(l, arrays);
  p.g = mx::gpu_ptr<float>(g);
  p.xf = mx::gpu_ptr<float>(x);
  p.out = mx::gpu_ptr<void>(out);
  p.M = g.shape(0);
  p.stored = stored_values(l, arrays);
  const auto pr = problem(l, p, p.M, out.dtype());
  const auto plan = sparse_plan::plan_sampled(pr, p.stored);
  Launcher launch(enc, s.device.index, kOp);
  std::optional<mx::array> prefix;
  run_prep(launch, plan, p, arrays[1], prefix);
  // M == 0: every sum is empty, the kernel writes zeros.
  launch(plan.main, p, {&g, &x, &arrays[0], &arrays[1], n_arrays(l) > 2 ? &arrays[2] : nullptr,
      prefix ? &*prefix : nullptr}, {&out});
}

} // namespace mlx_ext
