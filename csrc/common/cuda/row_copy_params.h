// Parameters of the row_copy_<bytes> kernels (common/row_copy.cu), plain C++
// shared with the host (launcher.h: Launcher::row_contiguous). They copy a
// strided view (any strides, any offset) into a fresh row-contiguous buffer.
// The CUDA builds have no other copy: MLX's copy kernels are not exported to
// extensions, and mx::contiguous in the graph keeps a row-contiguous view as
// it is, misaligned or not.
#pragma once

#include <cstdint>

namespace mlx_ext::cuda {

constexpr int kRowCopyMaxDims = 8;

struct RowCopyParams {
  const void* src; // the view's first element (its offset applied)
  void* dst; // row-contiguous, `size` elements
  int64_t size;
  int ndim;
  int64_t shape[kRowCopyMaxDims];
  int64_t strides[kRowCopyMaxDims]; // in elements
};

} // namespace mlx_ext::cuda
