// The SwiGLU epilogue of the fused gate/up products on the CPU (the GPT
// loop's quantized_swiglu, gather_quantized_swiglu): out = silu(gate) * up,
// computed in float32 and stored in the output dtype, over `rows` rows of
// `cols` values each. Gate, up and out have their own row strides (in
// values), so one helper serves gate and up interleaved per row (2 I values:
// gate then up) and separate arrays; out may be gate itself (in place).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cpu/thread_pool.h"
#include "common/math.h"
#include "mlx/array.h"

namespace mlx_ext::cpu {

struct SwigluRows {
  int64_t rows, cols;
  int64_t gate_stride, up_stride, out_stride;
};

template <typename T>
void swiglu(const T* gate, const T* up, T* out, const SwigluRows& r) {
  auto run = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* g_row = gate + m * r.gate_stride;
      const T* u_row = up + m * r.up_stride;
      T* o_row = out + m * r.out_stride;
      for (int64_t i = 0; i < r.cols; ++i) {
        const float g = static_cast<float>(g_row[i]);
        o_row[i] = static_cast<T>(g / (1.0f + std::exp(-g)) * static_cast<float>(u_row[i]));
      }
    }
  };
  // A few thousand values per task: one decode step stays on this thread.
  const int64_t rows_per_task = std::max<int64_t>(1, 8192 / std::max<int64_t>(r.cols, 1));
  if (r.rows <= rows_per_task) return run(0, r.rows);
  parallel_for(ceil_div(r.rows, rows_per_task), [&](int64_t t) {
    run(t * rows_per_task, std::min(r.rows, (t + 1) * rows_per_task));
  });
}

// The same for arrays of `dtype` (float32, float16 or bfloat16) given untyped.
inline void swiglu(mlx::core::Dtype dtype, const void* gate, const void* up, void* out, const SwigluRows& r) {
  namespace mx = mlx::core;
  switch (dtype) {
    case mx::float16:
      return swiglu(static_cast<const mx::float16_t*>(gate), static_cast<const mx::float16_t*>(up),
          static_cast<mx::float16_t*>(out), r);
    case mx::bfloat16:
      return swiglu(static_cast<const mx::bfloat16_t*>(gate), static_cast<const mx::bfloat16_t*>(up),
          static_cast<mx::bfloat16_t*>(out), r);
    default:
      return swiglu(static_cast<const float*>(gate), static_cast<const float*>(up), static_cast<float*>(out), r);
  }
}

} // namespace mlx_ext::cpu
