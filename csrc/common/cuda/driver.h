// The few CUDA driver functions the host code uses, looked up in the
// libcuda.so.1 that libmlx already loaded: no link-time dependency on the
// driver or its stub. libmlx links the CUDA runtime statically, so this
// library loads its kernels through the driver API (registry.h).
#pragma once

#include <cuda.h>

#include <string>

namespace mlx_ext::cuda {

struct Driver {
  CUresult (*ctx_get_current)(CUcontext*);
  CUresult (*ctx_set_current)(CUcontext);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*device_get_attribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*primary_ctx_retain)(CUcontext*, CUdevice);
  CUresult (*module_load_data)(CUmodule*, const void*);
  CUresult (*module_get_function_count)(unsigned int*, CUmodule);
  CUresult (*module_enumerate_functions)(CUfunction*, unsigned int, CUmodule);
  CUresult (*func_get_name)(const char**, CUfunction);
  CUresult (*func_set_attribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*get_error_string)(CUresult, const char**);

  Driver();

  // Throws "[mlx_ext] <what>: <the driver's message>" unless r is CUDA_SUCCESS.
  void check(CUresult r, const std::string& what) const;
};

// The driver's functions, looked up at the first call.
const Driver& driver();

} // namespace mlx_ext::cuda
