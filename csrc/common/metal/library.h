// Host-side helpers shared by the Metal eval_gpu implementations (built only
// when MLX has Metal).
#pragma once

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>
#include <string>

#include "mlx/backend/metal/device.h"

namespace mlx_ext::metal {

// The directory of the loaded _ext module, where mlx_ext.metallib is
// installed beside it.
inline const std::string& current_binary_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&current_binary_dir), &info) || !info.dli_fname)
      throw std::runtime_error("[mlx_ext] cannot locate the _ext module (dladdr failed)");
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

// mlx_ext.metallib, loaded once per device by MLX.
inline MTL::Library* library(mlx::core::metal::Device& d) {
  return d.get_library("mlx_ext", current_binary_dir());
}

} // namespace mlx_ext::metal
