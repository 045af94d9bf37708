// The dtype part of kernel names, spelt as MLX spells dtypes (and names its
// own kernels: qmv_float16_gs64_b4), for the Metal and CUDA host code alike.
#pragma once

#include <stdexcept>

#include "mlx/dtype.h"

namespace mlx_ext {

inline const char* kernel_dtype_name(mlx::core::Dtype t) {
  if (t == mlx::core::float32) return "float32";
  if (t == mlx::core::float16) return "float16";
  if (t == mlx::core::bfloat16) return "bfloat16";
  throw std::invalid_argument("[mlx_ext] kernels take float32, float16 or bfloat16");
}

} // namespace mlx_ext
