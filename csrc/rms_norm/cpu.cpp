// RMSNorm::eval_cpu: one pass per row of D values, float32 inside: the sum
// of squares, then x * r * w written in x's dtype. Rows go to the thread pool
// in tasks of a few thousand values; a decode step's single row stays on the
// stream's thread (a hand-off would cost more than the row).
#include <cmath>

#include "common/cpu/thread_pool.h"
#include "common/math.h"
#include "mlx/backend/cpu/encoder.h"
#include "rms_norm/rms_norm.h"

namespace mlx_ext {
namespace {

template <typename T>
void normalize_rows(const T* x, const T* w, T* out, int64_t D, float eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * D;
    float sum = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
      const float v = static_cast<float>(row[i]);
      sum += v * v;
    }
    const float inv = 1.0f / std::sqrt(sum / float(D) + eps);
    T* dst = out + r * D;
    for (int64_t i = 0; i < D; ++i) {
      const float v = static_cast<float>(row[i]) * inv;
      dst[i] = static_cast<T>(w ? v * static_cast<float>(w[i]) : v);
    }
  }
}

template <typename T>
void normalize(const T* x, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  const int64_t per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  if (rows <= per_task) return normalize_rows(x, w, out, D, eps, 0, rows);
  cpu::parallel_for(ceil_div(rows, per_task), [&](int64_t t) {
    normalize_rows(x, w, out, D, eps, t * per_task, std::min(rows, (t + 1) * per_task));
  });
}

} // namespace

void RMSNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]),
                    w = has_weight_ ? std::optional<mx::array>(mx::array::unsafe_weak_copy(inputs[1]))
                                    : std::nullopt,
                    out = mx::array::unsafe_weak_copy(out), eps = eps_]() mutable {
    const int64_t D = x.shape(-1);
    const int64_t rows = D ? x.size() / D : 0;
    if (rows == 0) return;
    switch (x.dtype()) {
      case mx::float32:
        return normalize(x.data<float>(), w ? w->data<float>() : nullptr, out.data<float>(), rows, D, eps);
      case mx::float16:
        return normalize(x.data<mx::float16_t>(), w ? w->data<mx::float16_t>() : nullptr,
            out.data<mx::float16_t>(), rows, D, eps);
      default:
        return normalize(x.data<mx::bfloat16_t>(), w ? w->data<mx::bfloat16_t>() : nullptr,
            out.data<mx::bfloat16_t>(), rows, D, eps);
    }
  });
}

} // namespace mlx_ext
