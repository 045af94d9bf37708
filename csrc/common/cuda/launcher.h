// Records the kernels of one eval_gpu call in the stream's command encoder.
// MLX's CUDA encoder orders graph nodes by the buffers registered before each
// one, so every launch names the arrays it reads and writes, scratch buffers
// included. Every kernel takes one argument, the operator's params struct
// (plain C++ shared with its .cu files), passed by value.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

#include "common/cuda/kernel_launch.h"
#include "common/cuda/registry.h"
#include "common/cuda/row_copy_params.h"
#include "common/errors.h"
#include "common/math.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

namespace mlx_ext::cuda {

namespace mx = mlx::core;

class Launcher {
 public:
  // nullptr entries (an absent optional input) are skipped.
  using Arrays = std::initializer_list<const mx::array*>;

  // `op` names the operator in error messages ("[mlx_ext.<op>] ...").
  Launcher(mx::cu::CommandEncoder& enc, int device, const char* op)
      : enc_(enc), kernels_(kernels(device)), op_(op) {}

  bool has(const std::string& kernel) const { return kernels_.has(kernel); }

  template <typename Params>
  void operator()(const KernelLaunch& launch, Params params, Arrays reads, Arrays writes) {
    if (!grid_fits(launch)) runtime_error(op_, "problem too large for kernel ", launch.kernel);
    CUfunction fn = kernels_.get(launch.kernel, launch.smem_bytes);
    log_launch(launch.kernel);
    for (const auto* a : reads)
      if (a) enc_.set_input_array(*a);
    for (const auto* a : writes) enc_.set_output_array(*a);
    void* args[] = {&params};
    enc_.add_kernel_node_raw(fn,
        dim3(unsigned(launch.grid[0]), unsigned(launch.grid[1]), unsigned(launch.grid[2])),
        dim3(launch.threads), dim3(1, 1, 1), launch.smem_bytes, args);
  }

  // A scratch buffer of `bytes` (at least 4) that lives until the encoder's
  // work completes. A float32 array: its shape is clamped to an int, only its
  // bytes matter.
  // A row-contiguous copy of x (any strides and offset) in a fresh buffer
  // that lives until the encoder's work completes: for the inputs a kernel
  // cannot read in place (common/row_copy.cu says why there is no other copy).
  mx::array row_contiguous(const mx::array& x) {
    if (x.ndim() > kRowCopyMaxDims)
      runtime_error(op_, "cannot copy an input of ", x.ndim(), " dimensions (at most ", kRowCopyMaxDims, ")");
    mx::array copy(mx::allocator::malloc(std::max<size_t>(x.nbytes(), 1)), x.shape(), x.dtype());
    enc_.add_temporary(copy);
    if (x.size() == 0) return copy;
    RowCopyParams p{};
    p.src = mx::gpu_ptr<void>(x);
    p.dst = mx::gpu_ptr<void>(copy);
    p.size = int64_t(x.size());
    p.ndim = int(x.ndim());
    for (int d = 0; d < p.ndim; ++d) {
      p.shape[d] = x.shape(d);
      p.strides[d] = x.strides()[d];
    }
    KernelLaunch launch;
    launch.kernel = "row_copy_" + std::to_string(x.itemsize());
    launch.threads = 256;
    launch.grid[0] = std::min<int64_t>(ceil_div(p.size, launch.threads), 65536);
    (*this)(launch, p, {&x}, {&copy});
    return copy;
  }

  mx::array scratch(int64_t bytes) {
    const int64_t floats = std::max<int64_t>(1, ceil_div(bytes, 4));
    const int64_t shape = std::min<int64_t>(floats, std::numeric_limits<int32_t>::max());
    mx::array a(mx::allocator::malloc(floats * 4), {int(shape)}, mx::float32);
    enc_.add_temporary(a);
    return a;
  }

 private:
  mx::cu::CommandEncoder& enc_;
  Kernels& kernels_;
  const char* op_;
};

} // namespace mlx_ext::cuda
