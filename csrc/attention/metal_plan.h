// Which kernels of metal/attention.metal run an attention call, and on what
// grids. Pure C++ (no MLX, no Metal) so that the emulator tests call it too
// (tests/metal_harness.py, Planner): one definition of the plan.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/math.h"

namespace mlx_ext::metal::attention_plan {

// The instantiated head dim that runs head dim D (a multiple of 8 up to 256,
// as the op takes): the smallest of 64, 80, 96, 128, 192, 256 at or above D;
// the kernels zero the columns past D. 0 for a D above 256.
inline int64_t kernel_head_dim(int64_t D) {
  for (int64_t k : {64, 80, 96, 128, 192, 256})
    if (D <= k) return k;
  return 0;
}

// At most this many query rows take the decode (vector) kernel, which reads
// each K/V row once for 8 query rows; more take the tiled prefill kernel.
// Not tuned on hardware.
constexpr int64_t kDecodeMaxQueries = 8;
// Rows of attn_decode's threadgroup (query rows of one kv head) and keys a
// split-K chunk holds at least.
constexpr int64_t kDecodeRows = 8;
constexpr int64_t kMinChunkKeys = 256;
// Rows of attn_prefill's threadgroup; rows (dq) and keys (dkv) of the
// backward kernels' threadgroups.
constexpr int64_t kPrefillRows = 32;
constexpr int64_t kBackwardRows = 4;
constexpr int threads = 128; // every kernel but attn_merge (32)

struct Launch {
  const char* kernel; // attn_decode, attn_merge, attn_prefill, attn_dq, attn_dkv
  int64_t groups[3]; // threadgroups per grid dimension
  int threads; // threads per threadgroup, along x
};

// GPU cores from MLX's architecture name (its last letter: p phone / iPad,
// g base, s Pro / Max, d Ultra); a rough count, only for the split choice.
inline int64_t gpu_cores(char architecture_class) {
  switch (architecture_class) {
    case 'p': return 6;
    case 's': return 32;
    case 'd': return 64;
    default: return 10;
  }
}

// Key chunks of a decode call: 1 (one pass) while its threadgroups occupy
// the GPU (two per core) or S is short; else enough chunks of at least
// kMinChunkKeys keys to fill it (split-K, then attn_merge).
inline int64_t decode_chunks(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S,
    int64_t cores) {
  const int64_t groups = B * Hkv * ceil_div(Hq / Hkv * L, kDecodeRows);
  const int64_t most = S / kMinChunkKeys;
  if (most < 2 || groups >= 2 * cores) return 1;
  const int64_t wanted = ceil_div(2 * cores, groups);
  return wanted < most ? wanted : most;
}

inline bool decode(int64_t L) { return L <= kDecodeMaxQueries; }

// The forward's main kernel: attn_decode over `chunks` key chunks, or attn_prefill.
inline Launch forward(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t chunks) {
  if (decode(L))
    return {"attn_decode", {chunks, Hkv * ceil_div(Hq / Hkv * L, kDecodeRows), B}, threads};
  return {"attn_prefill", {ceil_div(L, kPrefillRows), Hq, B}, threads};
}

// Split-K pass 2: one simdgroup per query row.
inline Launch merge(int64_t B, int64_t Hq, int64_t L) { return {"attn_merge", {B * Hq * L, 1, 1}, 32}; }

inline Launch backward_dq(int64_t B, int64_t Hq, int64_t L) {
  return {"attn_dq", {ceil_div(L, kBackwardRows), Hq, B}, threads};
}

inline Launch backward_dkv(int64_t B, int64_t Hkv, int64_t S) {
  return {"attn_dkv", {ceil_div(S, kBackwardRows), Hkv, B}, threads};
}

// The host name: <kernel>_<type>_d<kernel_head_dim(D)>, and _q<bits> for
// quantized K/V in the kernels that read K/V (attn_decode, attn_prefill, attn_dq).
inline std::string kernel_name(const Launch& launch, const char* type_name, int64_t D, int bits) {
  std::string name =
      std::string(launch.kernel) + "_" + type_name + "_d" + std::to_string(kernel_head_dim(D));
  const std::string kernel = launch.kernel;
  if (bits != 0 && kernel != "attn_merge" && kernel != "attn_dkv") name += "_q" + std::to_string(bits);
  return name;
}

} // namespace mlx_ext::metal::attention_plan
