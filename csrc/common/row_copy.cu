// row_copy_<1|2|4|8>: a strided view of elements of that many bytes copied
// into a row-contiguous buffer (common/cuda/row_copy_params.h), for the rare
// input no kernel can read in place (a view at an odd offset, say). One
// thread per element, grid-stride; the source offset is rebuilt from the
// element's row-major index, innermost dimension first.
#include "common/cuda/row_copy_params.h"

namespace {

template <typename T>
__device__ void row_copy(const mlx_ext::cuda::RowCopyParams& p) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.size;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = i, offset = 0;
    for (int d = p.ndim - 1; d >= 0; --d) {
      offset += (rest % p.shape[d]) * p.strides[d];
      rest /= p.shape[d];
    }
    dst[i] = src[offset];
  }
}

} // namespace

#define MLX_EXT_ROW_COPY(BYTES, T) \
  extern "C" __global__ void row_copy_##BYTES(const mlx_ext::cuda::RowCopyParams p) { row_copy<T>(p); }

MLX_EXT_ROW_COPY(1, unsigned char)
MLX_EXT_ROW_COPY(2, unsigned short)
MLX_EXT_ROW_COPY(4, unsigned int)
MLX_EXT_ROW_COPY(8, unsigned long long)
