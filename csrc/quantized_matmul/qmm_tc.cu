// Tensor-core GEMM of the quantized matmul for transpose=True and more than a
// few rows of x (qmm_t_tc), with its prep kernels. W's integers are unpacked
// in shared memory into float16 / bfloat16, where they are exact; mma.sync
// multiplies them with x (exact too) into float32, and each group's partial
// product is scaled in float32: acc += s * (q . x) + b * sum(x). float32
// activations run as three bfloat16 planes whose products are summed.
#include "common/cuda/affine.cuh"
#include "quantized_matmul/cuda_params.h"

namespace mlx_ext::cuda {
namespace {

// The 32 values (4 * BITS bytes) of one piece of a row of W as 16 packed T
// pairs (values 2i, 2i+1), exact integers.
template <typename T, int BITS>
__device__ __forceinline__ void unpack_piece(const uint32_t (&w)[BITS], uint32_t (&out)[16]) {
  constexpr bool half = std::is_same_v<T, f16>;
  constexpr uint32_t magic = half ? 0x64006400u : 0x43004300u; // 1024 or 128 in both halves
  if constexpr (BITS == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = w[i] & 0x0f0f0f0fu, hi = (w[i] >> 4) & 0x0f0f0f0fu;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // bytes [lo_j, lo_j, hi_j, hi_j] -> halves (magic | lo_j, magic | hi_j)
        uint32_t u = (__byte_perm(lo, hi, j | (j << 4) | ((4 + j) << 8) | ((4 + j) << 12)) &
                      0x00ff00ffu) | magic;
        if constexpr (half) {
          __half2 h = __hsub2(*reinterpret_cast<__half2*>(&u), *reinterpret_cast<const __half2*>(&magic));
          out[4 * i + j] = *reinterpret_cast<uint32_t*>(&h);
        } else {
          __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&u),
                                     *reinterpret_cast<const __nv_bfloat162*>(&magic));
          out[4 * i + j] = *reinterpret_cast<uint32_t*>(&h);
        }
      }
    }
  } else if constexpr (BITS == 8 && half) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t u = __byte_perm(w[i], 0x64646464u, (2 * j) | (4 << 4) | ((2 * j + 1) << 8) | (4 << 12));
        __half2 h = __hsub2(*reinterpret_cast<__half2*>(&u), *reinterpret_cast<const __half2*>(&magic));
        out[2 * i + j] = *reinterpret_cast<uint32_t*>(&h);
      }
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float a = int_bits_to_float(__byte_perm(w[i], 0x4b000000u, 0x7540 + 2 * j));
        const float b = int_bits_to_float(__byte_perm(w[i], 0x4b000000u, 0x7540 + 2 * j + 1));
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        out[2 * i + j] = *reinterpret_cast<uint32_t*>(&h);
      }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      uint32_t u = (extract<BITS>(w, 2 * i) | (extract<BITS>(w, 2 * i + 1) << 16)) | magic;
      if constexpr (half) {
        __half2 h = __hsub2(*reinterpret_cast<__half2*>(&u), *reinterpret_cast<const __half2*>(&magic));
        out[i] = *reinterpret_cast<uint32_t*>(&h);
      } else {
        __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&u),
                                   *reinterpret_cast<const __nv_bfloat162*>(&magic));
        out[i] = *reinterpret_cast<uint32_t*>(&h);
      }
    }
  }
}

// load_piece, or zeros for rows past N.
template <int BITS>
__device__ __forceinline__ void load_piece_or_zero(const uint32_t* p, bool valid, uint32_t (&w)[BITS]) {
  if (valid) {
    load_piece<BITS>(p, w);
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = 0;
  }
}

// A tile of 16-bit values, ROWS x BK, rows of 16 chunks of 16 bytes; chunk c
// of row r lives at chunk c ^ (r % 8) so that ldmatrix's 8 rows hit 8
// different bank groups.
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * (BK / 8) + (chunk ^ (row & 7));
}

// out[m, n] = sum_g (s[n, g] * sum_{k in g} x[m, k] q[n, k] + b[n, g] * x_sums[g, m]).
// Block: a BM x BN tile of out over all of K, in stages of BK = 128 k through
//   shared memory: x by cp.async (STAGES deep), W's packed words through
//   registers one stage ahead, unpacked into one of two q tiles (T integers)
//   while the tensor cores work on the other.
// Warp: (BM / WM) x (BN / WN) of the tile: FM x FN mma.m16n8k16 tiles, x as
//   operand A and q as operand B, both by ldmatrix; one float32 accumulator
//   set for the current group and one for the result.
// Thread: its mma fragments, PIECES pieces of 32 packed values per stage, and
//   the group epilogue of its accumulators.
// Needs K % 128 == 0, x and w 16-byte aligned, scales_t / biases_t / x_sums_t
// from the prep kernels. TOut float writes partial sums (the float32 planes).
template <typename T, typename TOut, int BITS, typename C>
__device__ __forceinline__ void qmm_t_tc(const QmmParams& p) {
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / C::WN, wn = warp % C::WN;
  const int64_t m0 = int64_t(blockIdx.y) * C::BM;
  const int n0 = blockIdx.x * C::BN;
  const int64_t M = p.M;
  const int N = p.N, K = p.K, gs = p.group_size, groups = BK / gs;
  const int stages_k = K / BK;
  const int64_t row_words = int64_t(K) * BITS / 32;
  const T* x = static_cast<const T*>(p.x);

  auto stage_x = [&](int s) { return reinterpret_cast<T*>(smem + s * C::STAGE_BYTES); };
  auto stage_s = [&](int s) { return reinterpret_cast<float*>(smem + s * C::STAGE_BYTES + C::X_BYTES); };
  auto stage_b = [&](int s) { return stage_s(s) + C::SB_FLOATS; };
  auto stage_xs = [&](int s) { return stage_s(s) + 2 * C::SB_FLOATS; };
  auto q_tile = [&](int i) { return reinterpret_cast<T*>(smem + C::STAGES * C::STAGE_BYTES + i * C::Q_BYTES); };

  // cp.async of stage kt: x tile, scales, biases and group sums of x.
  auto load_stage = [&](int kt) {
    const int s = kt % C::STAGES;
    T* xs = stage_x(s);
    for (int i = tid; i < C::BM * (BK / 8); i += C::THREADS) {
      const int r = i / (BK / 8), c = i % (BK / 8);
      const bool valid = m0 + r < M;
      const T* src = valid ? x + (m0 + r) * K + kt * BK + c * 8 : x;
      cp_async<16>(smem_u32(xs + swizzle(r, c) * 8), src, valid);
    }
    for (int i = tid; i < groups * (C::BN / 4); i += C::THREADS) {
      const int g = i / (C::BN / 4), c = i % (C::BN / 4);
      const bool valid = n0 + 4 * c < p.n_pad;
      const int64_t off = int64_t(kt * groups + g) * p.n_pad + n0 + 4 * c;
      cp_async<16>(smem_u32(stage_s(s) + g * C::BN + 4 * c), valid ? p.scales_t + off : p.scales_t, valid);
      cp_async<16>(smem_u32(stage_b(s) + g * C::BN + 4 * c), valid ? p.biases_t + off : p.biases_t, valid);
    }
    for (int i = tid; i < groups * (C::BM / 4); i += C::THREADS) {
      const int g = i / (C::BM / 4), c = i % (C::BM / 4);
      const bool valid = m0 + 4 * c < p.m_pad;
      const int64_t off = int64_t(kt * groups + g) * p.m_pad + m0 + 4 * c;
      cp_async<16>(smem_u32(stage_xs(s) + g * C::BM + 4 * c), valid ? p.x_sums_t + off : p.x_sums_t, valid);
    }
  };

  // This thread's pieces of W: piece u covers row (tid + u * THREADS) / 4 of
  // the tile, values 32 * ((tid + u * THREADS) % 4) .. + 32 of the stage.
  uint32_t raw[C::PIECES][BITS];
  auto stage_piece = [&](int u, int kt) {
    const int i = tid + u * C::THREADS, r = i / 4, c = i % 4;
    const bool valid = n0 + r < N;
    load_piece_or_zero<BITS>(p.w + (valid ? (n0 + r) * row_words : 0) + kt * (BK * BITS / 32) + c * BITS,
                             valid, raw[u]);
  };
  auto unpack = [&](int u, T* q) {
    const int i = tid + u * C::THREADS, r = i / 4, c = i % 4;
    uint32_t v[16];
    unpack_piece<T, BITS>(raw[u], v);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      *reinterpret_cast<uint4*>(q + swizzle(r, 4 * c + j) * 8) =
          make_uint4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
  };

  // Prologue: stages 0 .. STAGES-2 in flight, q tile 0 unpacked, stage 1's W in registers.
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < stages_k) load_stage(s);
    cp_async_commit();
  }
#pragma unroll
  for (int u = 0; u < C::PIECES; ++u) {
    stage_piece(u, 0);
    unpack(u, q_tile(0));
    if (stages_k > 1) stage_piece(u, 1);
  }

  float acc[C::FM][C::FN][4] = {};
  const int row_a = wm * (C::BM / C::WM), col_b = wn * (C::BN / C::WN);
  // ldmatrix x4 lanes: lanes 8j..8j+7 address the rows of matrix j.
  const int lr = lane % 8, lj = lane / 8;

  for (int kt = 0; kt < stages_k; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    if (kt + C::STAGES - 1 < stages_k) load_stage(kt + C::STAGES - 1);
    cp_async_commit();

    const int s = kt % C::STAGES;
    const T* xt = stage_x(s);
    const T* qt = q_tile(kt % 2);
    T* q_next = q_tile((kt + 1) % 2);
    int step = 0; // k16 step within the stage, 0..7
    for (int g = 0; g < groups; ++g) {
      float part[C::FM][C::FN][4];
      for (int ks = 0; ks < gs / 16; ++ks, ++step) {
        const int kc = step * 2; // first 16-byte chunk of this k16 step
        uint32_t a[C::FM][4], b[C::FN][2];
#pragma unroll
        for (int fm = 0; fm < C::FM; ++fm)
          ldmatrix_x4(a[fm], xt + swizzle(row_a + 16 * fm + lr + 8 * (lj & 1), kc + (lj >> 1)) * 8);
#pragma unroll
        for (int fn = 0; fn < C::FN; fn += 2) {
          uint32_t r[4];
          ldmatrix_x4(r, qt + swizzle(col_b + 8 * fn + lr + 8 * (lj >> 1), kc + (lj & 1)) * 8);
          b[fn][0] = r[0], b[fn][1] = r[1], b[fn + 1][0] = r[2], b[fn + 1][1] = r[3];
        }
        const bool first = ks == 0;
#pragma unroll
        for (int fm = 0; fm < C::FM; ++fm)
#pragma unroll
          for (int fn = 0; fn < C::FN; ++fn) {
            if (first) {
              const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
              mma_m16n8k16<T>(part[fm][fn], a[fm], b[fn][0], b[fn][1], zero);
            } else {
              mma_m16n8k16<T>(part[fm][fn], a[fm], b[fn][0], b[fn][1], part[fm][fn]);
            }
          }
        // Spread the next stage's unpacking over the steps, then fetch the
        // stage after it into the freed registers.
#pragma unroll
        for (int u = 0; u < C::PIECES; ++u)
          if (step == u * (8 / C::PIECES) && kt + 1 < stages_k) {
            unpack(u, q_next);
            if (kt + 2 < stages_k) stage_piece(u, kt + 2);
          }
      }
      // Group epilogue: acc += s * part + b * sum(x), all float32.
      const float* sg = stage_s(s) + g * C::BN;
      const float* bg = stage_b(s) + g * C::BN;
      const float* xg = stage_xs(s) + g * C::BM;
#pragma unroll
      for (int fn = 0; fn < C::FN; ++fn) {
        const int n = col_b + 8 * fn + 2 * (lane % 4);
        const float2 sv = *reinterpret_cast<const float2*>(sg + n);
        const float2 bv = *reinterpret_cast<const float2*>(bg + n);
#pragma unroll
        for (int fm = 0; fm < C::FM; ++fm) {
          const int m = row_a + 16 * fm + lane / 4;
          const float x_lo = xg[m], x_hi = xg[m + 8];
          float* d = acc[fm][fn];
          d[0] = fmaf(sv.x, part[fm][fn][0], fmaf(bv.x, x_lo, d[0]));
          d[1] = fmaf(sv.y, part[fm][fn][1], fmaf(bv.y, x_lo, d[1]));
          d[2] = fmaf(sv.x, part[fm][fn][2], fmaf(bv.x, x_hi, d[2]));
          d[3] = fmaf(sv.y, part[fm][fn][3], fmaf(bv.y, x_hi, d[3]));
        }
      }
    }
  }

  // Store: accumulator element (m, n), (m, n+1) pairs; bias in the epilogue.
  TOut* out = static_cast<TOut*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int fm = 0; fm < C::FM; ++fm)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + row_a + 16 * fm + lane / 4 + 8 * h;
      if (m >= M) continue;
#pragma unroll
      for (int fn = 0; fn < C::FN; ++fn) {
        const int n = n0 + col_b + 8 * fn + 2 * (lane % 4);
        float v0 = acc[fm][fn][2 * h], v1 = acc[fm][fn][2 * h + 1];
        if (bias) {
          if (n < N) v0 += to_float(bias[n]);
          if (n + 1 < N) v1 += to_float(bias[n + 1]);
        }
        TOut* dst = out + m * N + n;
        if (n + 1 < N && N % 2 == 0) {
          if constexpr (std::is_same_v<TOut, float>) {
            *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
          } else {
            TOut pair[2] = {from_float<TOut>(v0), from_float<TOut>(v1)};
            *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<uint32_t*>(pair);
          }
        } else {
          if (n < N) dst[0] = from_float<TOut>(v0);
          if (n + 1 < N) dst[1] = from_float<TOut>(v1);
        }
      }
    }
}

// scales_t[g, n] = scales[n, g] and biases_t likewise, as float; rows padded
// to n_pad with zeros. Thread: one (g, n). Block: 256 consecutive (g, n), n
// fastest; no warp-level work.
template <typename T>
__device__ __forceinline__ void qmm_prep_scales(const QmmParams& p) {
  const int G = p.K / p.group_size;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(G) * p.n_pad) return;
  const int g = int(idx / p.n_pad), n = int(idx % p.n_pad);
  const bool valid = n < p.N;
  float* s = const_cast<float*>(p.scales_t);
  float* b = const_cast<float*>(p.biases_t);
  s[idx] = valid ? to_float(static_cast<const T*>(p.scales)[int64_t(n) * G + g]) : 0.0f;
  b[idx] = valid ? to_float(static_cast<const T*>(p.biases)[int64_t(n) * G + g]) : 0.0f;
}

// x_sums_t[g, m] = sum of x[m, k] over group g (rows padded to m_pad with
// zeros). For float32 x (PLANES), first splits x into three bfloat16 planes
// hi + mid + lo (x_planes rows m, M + m, 2M + m) and sums each plane: the GEMM
// then runs on 3M rows of bfloat16. Thread: every 32nd value of one group.
// Warp: one (m, g), summed with shuffles. Block: 8 consecutive (m, g), m fastest.
template <typename T, bool PLANES>
__device__ __forceinline__ void qmm_prep_x(const QmmParams& p) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int G = p.K / p.group_size;
  const int64_t rows = PLANES ? 3 * p.M : p.M; // rows of the GEMM's x
  if (warp >= int64_t(G) * p.m_pad) return;
  const int g = int(warp / p.m_pad);
  const int64_t m = warp % p.m_pad;
  float* sums = const_cast<float*>(p.x_sums_t);
  if constexpr (PLANES) {
    // m indexes the 3M plane rows here: plane m / M of row m % M.
    if (m >= rows) {
      if (lane == 0) sums[warp] = 0.0f;
      return;
    }
    const int plane = int(m / p.M);
    const int64_t row = m % p.M;
    const float* x = static_cast<const float*>(p.x) + row * p.K;
    bf16* planes = static_cast<bf16*>(p.x_planes) + m * p.K;
    float sum = 0.0f;
    for (int k = g * p.group_size + lane; k < (g + 1) * p.group_size; k += 32) {
      float v = x[k];
      bf16 piece = __float2bfloat16_rn(v);
      for (int i = 0; i < plane; ++i) {
        v -= __bfloat162float(piece);
        piece = __float2bfloat16_rn(v);
      }
      planes[k] = piece;
      sum += __bfloat162float(piece);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) sums[warp] = sum;
  } else {
    float sum = 0.0f;
    if (m < rows) {
      const T* x = static_cast<const T*>(p.x) + m * p.K;
      for (int k = g * p.group_size + lane; k < (g + 1) * p.group_size; k += 32) sum += to_float(x[k]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) sums[warp] = sum;
  }
}

} // namespace
} // namespace mlx_ext::cuda

using mlx_ext::cuda::bf16;
using mlx_ext::cuda::f16;
using mlx_ext::cuda::QmmParams;
using mlx_ext::cuda::TcLarge;
using mlx_ext::cuda::TcSmall;

// Names: qmm_t_tc_<x type, as MLX spells it>_b<bits>_<l|s> (large or small tile);
// qmm_t_tc_planes_...: bfloat16 planes of float32 x, float partial sums out.
#define QMM_TC(T, TOUT, NAME, BITS, CFG, SUFFIX)                                                      \
  extern "C" __global__ void __launch_bounds__(CFG::THREADS) qmm_t_tc_##NAME##_b##BITS##_##SUFFIX( \
      const QmmParams p) {                                                                         \
    mlx_ext::cuda::qmm_t_tc<T, TOUT, BITS, CFG>(p);                                                \
  }
#define QMM_TC_BITS(BITS)                               \
  QMM_TC(f16, f16, float16, BITS, TcLarge, l)           \
  QMM_TC(f16, f16, float16, BITS, TcSmall, s)           \
  QMM_TC(bf16, bf16, bfloat16, BITS, TcLarge, l)        \
  QMM_TC(bf16, bf16, bfloat16, BITS, TcSmall, s)        \
  QMM_TC(bf16, float, planes, BITS, TcLarge, l)         \
  QMM_TC(bf16, float, planes, BITS, TcSmall, s)
QMM_TC_BITS(2)
QMM_TC_BITS(3)
QMM_TC_BITS(4)
QMM_TC_BITS(5)
QMM_TC_BITS(6)
QMM_TC_BITS(8)

#define QMM_PREP(T, NAME, PLANES)                                                          \
  extern "C" __global__ void __launch_bounds__(256) qmm_prep_scales_##NAME(const QmmParams p) { \
    mlx_ext::cuda::qmm_prep_scales<T>(p);                                                  \
  }                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) qmm_prep_x_##NAME(const QmmParams p) {  \
    mlx_ext::cuda::qmm_prep_x<T, PLANES>(p);                                               \
  }
QMM_PREP(float, float32, true)
QMM_PREP(f16, float16, false)
QMM_PREP(bf16, bfloat16, false)
