// QuantizedMatmul::eval_gpu for MLX's CUDA backend: picks kernels of qmv.cu,
// qmv_tc.cu, qmm_tc.cu and qmm_wgmma.cu and records them in MLX's command
// encoder (common/cuda/launcher.h), which finds them in the images embedded
// in this library (common/cuda/registry.h).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "common/cuda/launcher.h"
#include "common/errors.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "common/math.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "quantized_matmul/cuda_params.h"
#include "quantized_matmul/quantized_matmul.h"

namespace mlx_ext {
namespace cuda {

namespace {

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// MLX_EXT_CUDA_WGMMA=0 turns the Hopper GEMM off (tests run the mma.sync
// GEMM on an H100 that way).
bool wgmma_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MLX_EXT_CUDA_WGMMA");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

// Rows of x per tile of qmv_n: 1, 2 or 4.
int qmv_n_tile(int64_t m) {
  return m <= 1 ? 1 : m <= 2 ? 2 : 4;
}

// The arrays of one call: inputs (x, w, scales, biases, bias or nullptr) and out.
struct Operands {
  const mx::array *x, *w, *scales, *biases, *bias, *out;
};

// transpose=True with K % 128 == 0 and more rows than a GEMV takes: the prep
// kernels, the tensor-core GEMM, and for float32 x the sum of its three planes.
void run_tensor_core(Launcher& launch, QmmParams p, const Operands& a, const std::string& t) {
  const int64_t M = p.M;
  const int G = p.K / p.group_size;
  const bool planes = a.out->dtype() == mx::float32;
  const int64_t rows = planes ? 3 * M : M;
  p.n_pad = int(ceil_div(p.N, 4) * 4);
  p.m_pad = int(ceil_div(rows, 4) * 4);
  auto scales_t = launch.scratch(int64_t(G) * p.n_pad * 4);
  auto biases_t = launch.scratch(int64_t(G) * p.n_pad * 4);
  auto x_sums_t = launch.scratch(int64_t(G) * p.m_pad * 4);
  auto x_planes = launch.scratch(planes ? rows * p.K * 2 : 0); // bfloat16
  p.scales_t = mx::gpu_ptr<float>(scales_t);
  p.biases_t = mx::gpu_ptr<float>(biases_t);
  p.x_sums_t = mx::gpu_ptr<float>(x_sums_t);
  p.x_planes = mx::gpu_ptr<void>(x_planes);
  launch({"qmm_prep_scales_" + t, {ceil_div(int64_t(G) * p.n_pad, 256), 1, 1}, 256, 0}, p, {a.scales, a.biases}, {&scales_t, &biases_t});
  launch({"qmm_prep_x_" + t, {ceil_div(int64_t(G) * p.m_pad * 32, 256), 1, 1}, 256, 0}, p, {a.x}, {&x_sums_t, &x_planes});

  QmmParams g = p;
  const bool small = rows <= 64;
  const int bm = small ? TcSmall::BM : TcLarge::BM, bn = small ? TcSmall::BN : TcLarge::BN;
  const int threads = small ? TcSmall::THREADS : TcLarge::THREADS;
  const int smem = small ? TcSmall::SMEM : TcLarge::SMEM;
  const std::string name = std::string("qmm_t_tc_") + (planes ? "planes" : t) + "_b" +
      std::to_string(p.bits) + (small ? "_s" : "_l");
  g.M = rows;
  if (!planes) {
    launch({name, {ceil_div(p.N, bn), ceil_div(rows, bm), 1}, threads, smem}, g, {a.x, a.w, &scales_t, &biases_t, &x_sums_t, a.bias}, {a.out});
    return;
  }
  auto partial = launch.scratch(rows * p.N * 4);
  g.x = p.x_planes;
  g.bias = nullptr;
  g.out = mx::gpu_ptr<void>(partial);
  launch({name, {ceil_div(p.N, bn), ceil_div(rows, bm), 1}, threads, smem}, g, {&x_planes, a.w, &scales_t, &biases_t, &x_sums_t}, {&partial});
  QmmParams r = p;
  r.x = g.out;
  r.parts = 3;
  launch({"reduce_partials_float32", {ceil_div(M * p.N, 256), 1, 1}, 256, 0}, r, {&partial, a.bias}, {a.out});
}

} // namespace
} // namespace cuda

MLX_EXT_HAS_GPU(QuantizedMatmul)

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  using namespace cuda;
  auto& s = stream();
  auto& enc = mx::cu::get_command_encoder(s);
  out.set_data(mx::allocator::malloc(out.nbytes()));

  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const int K = transpose_ ? int(int64_t(w.shape(1)) * 32 / bits_) : w.shape(0);
  const int N = out.ndim() ? out.shape(-1) : 1;
  const int64_t M = N ? out.size() / N : 0;
  if (M == 0 || N == 0) return;
  if (mx::cu::device(s.device).compute_capability_major() < 8)
    throw std::runtime_error(
        "[mlx_ext.quantized_matmul] the CUDA kernels need compute capability 8.0 or newer");

  const Operands a{&x, &w, &inputs[2], &inputs[3], has_bias_ ? &inputs[4] : nullptr, &out};
  QmmParams p{};
  p.x = mx::gpu_ptr<void>(x);
  p.w = mx::gpu_ptr<uint32_t>(w);
  p.scales = mx::gpu_ptr<void>(inputs[2]);
  p.biases = mx::gpu_ptr<void>(inputs[3]);
  p.bias = has_bias_ ? mx::gpu_ptr<void>(inputs[4]) : nullptr;
  p.out = mx::gpu_ptr<void>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.group_size = group_size_;
  p.bits = bits_;
  p.k_split = 1;

  Launcher launch(enc, s.device.index, "quantized_matmul");
  const std::string t = kernel_dtype_name(out.dtype());
  const std::string b = "_b" + std::to_string(bits_);
  const bool aligned = aligned16(p.x) && aligned16(p.w);
  const int64_t elements = M * N;
  const Launcher::Arrays all_inputs{a.x, a.w, a.scales, a.biases, a.bias};

  if (transpose_) {
    // float16 / bfloat16 x: tensor-core kernels that round W to x's type as
    // MLX's do. float32 x: exact float32 kernels (the GEMM through planes).
    const bool half_x = out.dtype() != mx::float32;
    const bool sm90 = mx::cu::device(s.device).compute_capability_major() == 9 &&
        mx::cu::device(s.device).compute_capability_minor() == 0;
    // The tensor-core GEMV: 8 rows of x per block for 2-, 4- and 8-bit W; 16
    // or 32 rows (9 to 32 rows of x), W dequantized once for all of them, for
    // 4 and 8 bits. (For one row of 8-bit W the CUDA-core GEMV is faster on an
    // H200, 17.7 vs 20.7 us at 14336 x 4096, but slower on an H100, 30.7 vs
    // 22.0: bench/cuda/kernels.cu.)
    const bool four_or_eight = bits_ == 4 || bits_ == 8;
    const int qmv_tc_rows = M <= 8 && (bits_ == 2 || four_or_eight) ? 8
        : M <= 32 && four_or_eight                                   ? (M <= 16 ? 16 : 32)
                                                                     : 0;
    if (half_x && qmv_tc_rows && K > 0 && K % qmv_tc_k_multiple(bits_) == 0 && aligned) {
      const std::string rows = qmv_tc_rows == 8 ? "" : "_m" + std::to_string(qmv_tc_rows);
      launch({"qmv_tc_" + t + b + rows, {ceil_div(N, QMV_TC_ROWS), ceil_div(M, qmv_tc_rows), 1}, QMV_TC_THREADS, 0}, p, all_inputs, {&out});
      return;
    }
    const std::string wgmma = "qmm_t_wgmma_" + t + b;
    if (half_x && sm90 && M > 64 && K > 0 && K % WG_BK == 0 && aligned && wgmma_enabled() &&
        launch.has(wgmma)) {
      launch({wgmma, {ceil_div(N, WG_BN), ceil_div(M, WG_BM), 1}, WG_THREADS, wg_smem_bytes(bits_)}, p, all_inputs, {&out});
      return;
    }
    const bool qmv_ok = K > 0 && K % qmv_t_values_per_chunk(bits_) == 0 && aligned;
    const bool tc_ok = K > 0 && K % BK == 0 && aligned;
    if (qmv_ok && (M <= 8 || !tc_ok) && ceil_div(M, 8) <= 65535) {
      const int mt = M == 1 ? 1 : 8;
      const int rows = QMV_T_WARPS * qmv_t_rows_per_warp(bits_);
      launch({"qmv_t_" + t + b + "_m" + std::to_string(mt), {ceil_div(N, rows), ceil_div(M, mt), 1}, QMV_T_WARPS * 32, 0}, p, all_inputs, {&out});
    } else if (tc_ok) {
      run_tensor_core(launch, p, a, t);
    } else {
      launch({"qmm_generic_t_" + t, {ceil_div(elements, 256), 1, 1}, 256, 0}, p, all_inputs, {&out});
    }
    return;
  }

  const bool qmv_n_ok = K > 0 && aligned16(p.w) && ceil_div(M, 4) <= 65535;
  if (!qmv_n_ok) {
    launch({"qmm_generic_n_" + t, {ceil_div(elements, 256), 1, 1}, 256, 0}, p, all_inputs, {&out});
    return;
  }
  // Enough blocks to fill the GPU: slices of K (float partials) when the
  // columns and rows alone give too few.
  const int mt = qmv_n_tile(M);
  const int64_t blocks = ceil_div(N / 32, QMV_N_THREADS) * ceil_div(M, mt);
  p.k_split = int(std::min<int64_t>({ceil_div(1024, blocks), 64, std::max(1, K / 16)}));
  const std::string name = "qmv_n_" + t + b + "_m" + std::to_string(mt);
  const int64_t grid_x = ceil_div(N / 32, QMV_N_THREADS), grid_z = ceil_div(M, mt);
  if (p.k_split == 1) {
    launch({name, {grid_x, 1, grid_z}, QMV_N_THREADS, 0}, p, all_inputs, {&out});
    return;
  }
  auto partials = launch.scratch(p.k_split * elements * 4);
  QmmParams q = p;
  q.out = mx::gpu_ptr<void>(partials);
  launch({name, {grid_x, p.k_split, grid_z}, QMV_N_THREADS, 0}, q, all_inputs, {&partials});
  QmmParams r = p;
  r.x = q.out;
  r.parts = p.k_split;
  launch({"reduce_partials_" + t, {ceil_div(elements, 256), 1, 1}, 256, 0}, r, {&partials, a.bias}, {&out});
}

} // namespace mlx_ext
