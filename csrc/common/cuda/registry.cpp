// Loads the embedded kernel images through the driver (driver.h) and keeps
// the kernels of each device by name. Its messages say "[mlx_ext]": the
// registry holds the kernels of every operator.
#include "common/cuda/registry.h"

#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "common/cuda/driver.h"
#include "common/cuda/images.h"

namespace mlx_ext::cuda {

namespace {

// MLX_EXT_CUDA_LOG=<file>: every kernel the modules hold ("available <name>
// <op>/<kernel file>") and each kernel the first time it is launched
// ("launch <name>"), for the tests that check that every kernel of an
// operator runs.
class KernelLog {
 public:
  void available(const std::string& name, const char* image) {
    if (!path_) return;
    std::lock_guard<std::mutex> lock(mutex_);
    write_locked("available", name + ' ' + image);
  }
  void launch(const std::string& name) {
    if (!path_) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (launched_.insert(name).second) write_locked("launch", name);
  }

 private:
  void write_locked(const char* what, const std::string& name) {
    std::ofstream(path_, std::ios::app) << what << ' ' << name << '\n';
  }
  const char* path_ = std::getenv("MLX_EXT_CUDA_LOG");
  std::mutex mutex_;
  std::set<std::string> launched_;
};

KernelLog& kernel_log() {
  static KernelLog log;
  return log;
}

} // namespace

Kernels::Kernels(int device) {
  const auto& d = driver();
  CUcontext ctx = nullptr;
  d.check(d.ctx_get_current(&ctx), "cuCtxGetCurrent");
  if (!ctx) { // MLX makes its device current before eval_gpu; be safe anyway
    CUdevice dev;
    d.check(d.device_get(&dev, device), "cuDeviceGet");
    d.check(d.primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    d.check(d.ctx_set_current(ctx), "cuCtxSetCurrent");
  }
  for (int i = 0; i < embedded_image_count; ++i) {
    const EmbeddedImage& image = embedded_images[i];
    CUmodule module;
    const CUresult r = d.module_load_data(&module, image.fatbin);
    // An sm_90a image (the Hopper GEMM) on another GPU is skipped; its
    // kernels are then simply absent, and the operators' plans check for them.
    if (r == CUDA_ERROR_NO_BINARY_FOR_GPU && image.arch_specific) continue;
    d.check(r, std::string("loading the kernels of ") + image.name +
            " (see MLX_EXT_CUDA_ARCHITECTURES)");
    modules_.push_back(module);
    unsigned int count = 0;
    d.check(d.module_get_function_count(&count, module), "cuModuleGetFunctionCount");
    std::vector<CUfunction> fns(count);
    d.check(d.module_enumerate_functions(fns.data(), count, module), "cuModuleEnumerateFunctions");
    for (auto fn : fns) {
      const char* name = nullptr;
      d.check(d.func_get_name(&name, fn), "cuFuncGetName");
      // Kernel names are extern "C" and share one namespace across operators.
      if (!functions_.emplace(name, fn).second)
        throw std::runtime_error(std::string("[mlx_ext] two CUDA kernels are named ") + name +
            " (the second in " + image.name + ")");
      kernel_log().available(name, image.name);
    }
  }
}

CUfunction Kernels::get(const std::string& name, int smem_bytes) {
  auto it = functions_.find(name);
  if (it == functions_.end()) throw std::runtime_error("[mlx_ext] no CUDA kernel named " + name);
  if (smem_bytes > kDefaultMaxDynamicSmem && smem_set_.insert(name).second)
    driver().check(driver().func_set_attribute(
                       it->second, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes),
        "cuFuncSetAttribute");
  return it->second;
}

Kernels& kernels(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, std::unique_ptr<Kernels>> all;
  std::lock_guard<std::mutex> lock(mutex);
  auto& k = all[device];
  if (!k) k = std::make_unique<Kernels>(device);
  return *k;
}

void log_launch(const std::string& name) {
  kernel_log().launch(name);
}

} // namespace mlx_ext::cuda
