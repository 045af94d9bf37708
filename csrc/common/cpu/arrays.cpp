#include "common/cpu/arrays.h"

#include <algorithm>

#include "common/cpu/thread_pool.h"
#include "common/math.h"

namespace mlx_ext::cpu {

namespace mx = mlx::core;

FloatType float_type(mx::Dtype t) {
  if (t == mx::float16) return FloatType::f16;
  if (t == mx::bfloat16) return FloatType::bf16;
  return FloatType::f32;
}

namespace {

template <typename T>
void convert(const T* src, float* dst, int64_t n) {
  // Chunks large enough that handing one out costs far less than converting it.
  constexpr int64_t kChunk = 1 << 16;
  parallel_for(ceil_div(n, kChunk), [&](int64_t t) {
    const int64_t end = std::min(n, (t + 1) * kChunk);
    for (int64_t i = t * kChunk; i < end; ++i) dst[i] = float(src[i]);
  });
}

} // namespace

const float* as_float32(const mx::array& a, std::vector<float>& storage) {
  if (a.dtype() == mx::float32) return a.data<float>();
  storage.resize(a.size());
  if (a.dtype() == mx::float16) {
    convert(a.data<mx::float16_t>(), storage.data(), a.size());
  } else {
    convert(a.data<mx::bfloat16_t>(), storage.data(), a.size());
  }
  return storage.data();
}

} // namespace mlx_ext::cpu
