// Which K/V arrays the attention kernels (CPU and Metal) read in place: those
// whose rows are contiguous within each (batch, head), as in a slice
// [..., :S, :] of a preallocated cache, with any batch and head strides
// (broadcasts included). Anything else is copied to contiguous rows first.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>

#include "mlx/array.h"

namespace mlx_ext {

// (batch, head) strides in rows of x (B, H, S, row), or nullopt.
inline std::optional<std::pair<int64_t, int64_t>> kv_row_strides(const mlx::core::array& x) {
  const auto& st = x.strides();
  const int64_t row = x.shape(3);
  auto in_rows = [&](int dim) -> int64_t {
    if (x.shape(dim) == 1) return 0;
    return st[dim] % row == 0 ? st[dim] / row : -1;
  };
  const int64_t bs = in_rows(0), hs = in_rows(1);
  if (st[3] == 1 && (x.shape(2) <= 1 || st[2] == row) && bs >= 0 && hs >= 0)
    return std::make_pair(bs, hs);
  return std::nullopt;
}

} // namespace mlx_ext
