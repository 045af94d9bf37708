// The float formats MLX stores and the CPU kernels read and write. Kernels
// take raw pointers and this tag, never MLX types (they are compiled once per
// ISA, apart from MLX's headers).
#pragma once

namespace mlx_ext::cpu {

enum class FloatType : int { f32 = 0, f16 = 1, bf16 = 2 };

} // namespace mlx_ext::cpu
