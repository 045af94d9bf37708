// Integer helpers for sizes and grids, usable from host code, CPU kernels,
// and CUDA and Metal-plan code alike (plain C++, constexpr).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MLX_EXT_HOST_DEVICE __host__ __device__
#else
#define MLX_EXT_HOST_DEVICE
#endif

namespace mlx_ext {

// ceil(a / b) for a >= 0, b > 0.
constexpr MLX_EXT_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The smallest multiple of b that is >= a, for a >= 0, b > 0.
constexpr MLX_EXT_HOST_DEVICE int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

// The length of about `tasks` ranges splitting [0, n) whose bounds are
// multiples of `align` (at least align).
constexpr int64_t chunk_size(int64_t n, int64_t tasks, int64_t align) {
  const int64_t length = round_up(ceil_div(n, tasks > 1 ? tasks : 1), align);
  return length > align ? length : align;
}

} // namespace mlx_ext
