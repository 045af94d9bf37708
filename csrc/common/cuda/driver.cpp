// Looks up the driver functions of driver.h in libcuda.so.1. Its messages
// say "[mlx_ext]": the driver serves the kernels of every operator.
#include "common/cuda/driver.h"

#include <dlfcn.h>

#include <stdexcept>
#include <type_traits>

namespace mlx_ext::cuda {

Driver::Driver() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) throw std::runtime_error("[mlx_ext] cannot load libcuda.so.1");
  auto sym = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
    if (!fn) throw std::runtime_error(std::string("[mlx_ext] libcuda.so.1 lacks ") + name);
  };
  sym(ctx_get_current, "cuCtxGetCurrent");
  sym(ctx_set_current, "cuCtxSetCurrent");
  sym(device_get, "cuDeviceGet");
  sym(device_get_attribute, "cuDeviceGetAttribute");
  sym(primary_ctx_retain, "cuDevicePrimaryCtxRetain");
  sym(module_load_data, "cuModuleLoadData");
  sym(module_get_function_count, "cuModuleGetFunctionCount");
  sym(module_enumerate_functions, "cuModuleEnumerateFunctions");
  sym(func_get_name, "cuFuncGetName");
  sym(func_set_attribute, "cuFuncSetAttribute");
  sym(get_error_string, "cuGetErrorString");
}

void Driver::check(CUresult r, const std::string& what) const {
  if (r == CUDA_SUCCESS) return;
  const char* msg = "unknown error";
  get_error_string(r, &msg);
  throw std::runtime_error("[mlx_ext] " + what + ": " + msg);
}

const Driver& driver() {
  static const Driver d;
  return d;
}

} // namespace mlx_ext::cuda
