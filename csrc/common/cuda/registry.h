// The CUDA kernels of every operator, by name: the embedded images
// (images.h) loaded once per device at its first GPU call, each kernel found
// by its extern "C" name. MLX_EXT_CUDA_LOG=<file> logs them for the tests
// that check every kernel runs.
#pragma once

#include <cuda.h>

#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace mlx_ext::cuda {

// Dynamic shared memory a kernel may take without opting in through
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (CUDA's default limit).
constexpr int kDefaultMaxDynamicSmem = 48 * 1024;

// The loaded modules of one device and the kernels they hold.
class Kernels {
 public:
  explicit Kernels(int device);

  bool has(const std::string& name) const { return functions_.count(name) > 0; }

  // The kernel `name`, allowed `smem_bytes` of dynamic shared memory (the
  // attribute is set at the first launch that needs more than the default).
  CUfunction get(const std::string& name, int smem_bytes);

 private:
  std::vector<CUmodule> modules_;
  std::unordered_map<std::string, CUfunction> functions_;
  std::set<std::string> smem_set_;
};

// The kernels of `device` (a CUDA device index), loaded at the first call.
Kernels& kernels(int device);

// Logs "launch <name>" the first time `name` is launched (MLX_EXT_CUDA_LOG).
void log_launch(const std::string& name);

} // namespace mlx_ext::cuda
