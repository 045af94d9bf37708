// MLX's NO_GPU list (gpu.h): the primitives without kernels for the GPU
// backend this build targets. Every primitive is listed for builds with no
// GPU backend (Linux CPU wheels); a Metal or CUDA build lists those whose
// metal.cpp / cuda.cpp does not exist yet.
#include "common/gpu.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {

#if !defined(MLX_EXT_METAL) && !defined(MLX_EXT_CUDA)
MLX_EXT_NO_GPU(QuantizedMatmul)
#endif

} // namespace mlx_ext
