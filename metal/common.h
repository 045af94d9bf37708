// MSL helpers shared by the package's kernels.
#pragma once

#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#include <metal_stdlib>

namespace mlx_ext {

using namespace metal;

// One round of simd_reduce_scatter32: lanes whose bit `half_width` is set keep
// a[half_width .. 2 half_width), the others a[0 .. half_width); each adds its
// partner's copy of the half it keeps and moves it to a[0 .. half_width).
template <ushort half_width>
inline void simd_keep_half(thread float* a, ushort lane) {
  const bool upper = (lane & half_width) != 0;
#pragma clang loop unroll(full)
  for (ushort i = 0; i < half_width; ++i) {
    const float keep = upper ? a[i + half_width] : a[i];
    const float give = upper ? a[i] : a[i + half_width];
    a[i] = keep + simd_shuffle_xor(give, half_width);
  }
}

// Every lane holds a[0 .. 32), one partial sum per column. Afterwards a[0] of
// lane l is the simdgroup's total of column l: 31 shuffles, where 32 simd_sums
// would take 160 and leave every total on every lane.
inline void simd_reduce_scatter32(thread float* a, ushort lane) {
  simd_keep_half<16>(a, lane);
  simd_keep_half<8>(a, lane);
  simd_keep_half<4>(a, lane);
  simd_keep_half<2>(a, lane);
  simd_keep_half<1>(a, lane);
}

// (column, row) of the first of the two elements (row r, columns c and c + 1)
// that `lane` holds of an 8x8 simdgroup_matrix in thread_elements().
inline short2 simdgroup_matrix_coord(ushort lane) {
  const short quad = lane / 4;
  return short2((quad & 2) * 2 + (lane % 2) * 2, (quad & 4) + (lane / 2) % 4);
}

} // namespace mlx_ext
