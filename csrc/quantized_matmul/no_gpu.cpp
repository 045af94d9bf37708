// Builds without a GPU backend in MLX (Linux CPU wheels): the GPU path exists
// only to satisfy the Primitive interface; MLX never schedules it there.
#include "common/errors.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "[mlx_ext.quantized_matmul] this build of mlx_ext has no GPU kernels; use the CPU stream");
}

} // namespace mlx_ext
