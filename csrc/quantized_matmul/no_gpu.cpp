// Builds without GPU kernels (Linux CPU wheels; Metal or CUDA builds before
// their kernels exist): the op function refuses GPU streams up front, so
// eval_gpu is unreachable through it.
#include "common/errors.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {

bool QuantizedMatmul::has_gpu_kernels() {
  return false;
}

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mlx_ext.quantized_matmul] this build of mlx_ext has no GPU kernels");
}

} // namespace mlx_ext
