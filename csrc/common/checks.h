// Validation and input preparation shared by the op functions: everything an
// op checks before it builds its graph node.
#pragma once

#include "common/errors.h"
#include "common/gpu.h"
#include "mlx/mlx.h"

namespace mlx_ext {

namespace mx = mlx::core;

// The float types every kernel reads and writes.
inline bool is_kernel_float(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

// TypeError unless `a` (argument `arg` of `op`) is float32, float16 or bfloat16.
inline void check_kernel_float(const char* op, const char* arg, const mx::array& a) {
  if (!is_kernel_float(a.dtype()))
    type_error_(op, arg, " must be float32, float16 or bfloat16, got ", a.dtype());
}

// The stream `s` names, refused up front when it is a GPU stream and this
// build has no GPU kernels for `Primitive` (gpu.h).
template <typename Primitive>
mx::Stream kernel_stream(const char* op, mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu && !has_gpu_kernels<Primitive>())
    value_error(op, "stream=", stream, " is a GPU stream but this build of mlx_ext has no GPU "
        "kernels for it; pass stream=mx.cpu");
  return stream;
}

// `a` as kernels read it: row-contiguous. Arrays already evaluated that way
// (weights, typically) are passed as they are, with no Contiguous node: a
// decode step then has one graph node per op instead of several.
inline mx::array contiguous_input(const mx::array& a, const mx::Stream& s) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, s);
}

// `a` cast to `dtype` and row-contiguous.
inline mx::array kernel_input(const mx::array& a, mx::Dtype dtype, const mx::Stream& s) {
  return contiguous_input(mx::astype(a, dtype, s), s);
}

} // namespace mlx_ext
