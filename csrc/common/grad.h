// Pieces of the ops' vjps that every op with a fused bias shares.
#pragma once

#include <vector>

#include "mlx/mlx.h"

namespace mlx_ext {

// The gradient of a bias (n,) added to every row of out (..., n): the
// cotangent summed over its leading axes, in the bias's dtype.
inline mlx::core::array bias_grad(const mlx::core::array& cotan, mlx::core::Dtype bias_dtype,
    const mlx::core::Stream& s) {
  std::vector<int> axes(cotan.ndim() - 1);
  for (int i = 0; i < int(axes.size()); ++i) axes[i] = i;
  auto db = axes.empty() ? cotan : mlx::core::sum(cotan, axes, false, s);
  return mlx::core::astype(db, bias_dtype, s);
}

} // namespace mlx_ext
