// Host-side glue between MLX arrays and the CPU kernels, which take raw
// pointers and a FloatType tag.
#pragma once

#include <vector>

#include "common/cpu/float_type.h"
#include "mlx/array.h"

namespace mlx_ext::cpu {

// The tag of float32, float16 or bfloat16 (the op functions admit no other).
FloatType float_type(mlx::core::Dtype t);

// A contiguous, evaluated array as float32 values: its own data when it
// already is float32, else a copy converted on the thread pool into
// `storage`.
const float* as_float32(const mlx::core::array& a, std::vector<float>& storage);

} // namespace mlx_ext::cpu
