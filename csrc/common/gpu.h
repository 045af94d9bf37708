// Which primitives have kernels for MLX's GPU backend in this build. Each
// primitive is declared once per build: MLX_EXT_HAS_GPU in its metal.cpp /
// cuda.cpp, or MLX_EXT_NO_GPU (MLX_EXT_NO_GPU_MULTI for a primitive with
// several outputs) in common/no_gpu.cpp, MLX's NO_GPU list (which
// also defines its eval_gpu, unreachable because op functions refuse GPU
// streams first: checks.h, kernel_stream).
#pragma once

#include <stdexcept>
#include <string>

namespace mlx_ext {

template <typename Primitive>
bool has_gpu_kernels();

} // namespace mlx_ext

#define MLX_EXT_HAS_GPU(Primitive)                   \
  template <>                                        \
  bool has_gpu_kernels<Primitive>() {                \
    return true;                                     \
  }

#define MLX_EXT_NO_GPU(Primitive)                                                        \
  template <>                                                                            \
  bool has_gpu_kernels<Primitive>() {                                                    \
    return false;                                                                        \
  }                                                                                      \
  void Primitive::eval_gpu(const std::vector<mlx::core::array>&, mlx::core::array&) {    \
    throw std::runtime_error(std::string("[mlx_ext] ") + name() +                        \
        " has no GPU kernels in this build of mlx_ext");                                 \
  }

#define MLX_EXT_NO_GPU_MULTI(Primitive)                                                  \
  template <>                                                                            \
  bool has_gpu_kernels<Primitive>() {                                                    \
    return false;                                                                        \
  }                                                                                      \
  void Primitive::eval_gpu(                                                              \
      const std::vector<mlx::core::array>&, std::vector<mlx::core::array>&) {            \
    throw std::runtime_error(std::string("[mlx_ext] ") + name() +                        \
        " has no GPU kernels in this build of mlx_ext");                                 \
  }
