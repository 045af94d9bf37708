// MLX's NO_GPU list (gpu.h): the primitives without kernels for the GPU
// backend this build targets. Builds with no GPU backend (Linux CPU wheels)
// list every primitive; a Metal or CUDA build lists those whose metal.cpp /
// cuda.cpp does not exist yet. An op function refuses a GPU stream for them
// with a ValueError before any kernel runs (checks.h, kernel_stream).
#include "attention/attention.h"
#include "common/gpu.h"
#include "gather_qmm/gather_qmm.h"
#include "quantized_matmul/quantized_matmul.h"
#include "quantized_swiglu/quantized_swiglu.h"
#include "rms_norm/rms_norm.h"
#include "sparse_matmul/sparse_matmul.h"

namespace mlx_ext {

#if defined(MLX_EXT_METAL)
MLX_EXT_NO_GPU(QuantizedSwiGLU)
MLX_EXT_NO_GPU(RMSNorm)
#elif defined(MLX_EXT_CUDA)
MLX_EXT_NO_GPU(QuantizedSwiGLU)
MLX_EXT_NO_GPU(RMSNorm)
#else
MLX_EXT_NO_GPU(QuantizedMatmul)
MLX_EXT_NO_GPU_MULTI(ScaledDotProductAttention)
MLX_EXT_NO_GPU_MULTI(ScaledDotProductAttentionVjp)
MLX_EXT_NO_GPU(SparseMatmul)
MLX_EXT_NO_GPU(SparseSampledMatmul)
MLX_EXT_NO_GPU(GatherQmm)
MLX_EXT_NO_GPU(QuantizedSwiGLU)
MLX_EXT_NO_GPU(RMSNorm)
#endif

} // namespace mlx_ext
