// One kernel launch as an operator's plan describes it: which kernel, its
// grid, block and dynamic shared memory. Plain C++ (no CUDA or MLX types), so
// that an operator's kernel choice is a header tested on machines without a
// GPU; launcher.h records it in MLX's command encoder.
#pragma once

#include <cstdint>
#include <string>

namespace mlx_ext::cuda {

// CUDA's limits on a grid: 2^31 - 1 blocks along x, 65535 along y and z.
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridYZ = 65535;

struct KernelLaunch {
  std::string kernel; // the extern "C" name in the kernel images
  int64_t grid[3] = {1, 1, 1}; // blocks along x, y, z
  int threads = 0; // per block, along x
  int smem_bytes = 0; // dynamic shared memory per block
};

inline bool grid_fits(const KernelLaunch& launch) {
  return launch.grid[0] <= kMaxGridX && launch.grid[1] <= kMaxGridYZ &&
      launch.grid[2] <= kMaxGridYZ;
}

} // namespace mlx_ext::cuda
