// Stand-in for <fmt/format.h> when the system has no fmt: MLX 0.32's CUDA
// headers (mlx/backend/cuda/lru_cache.h) include it for one error message in a
// member template that mlx_ext never instantiates, and the mlx-cuda wheel does
// not ship fmt. A declaration is all that header needs to parse; cmake/cuda.cmake
// adds this folder only when no real fmt is found.
#pragma once

#include <string>

namespace fmt {
template <typename... Args>
std::string format(const char* format_string, Args&&... args);
} // namespace fmt
