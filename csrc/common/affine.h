// MLX's affine quantization format (mx.quantize(..., mode="affine")): w is
// uint32 (..., rows, cols * bits / 32), each row one little-endian bit
// stream of `bits`-bit values, low bits first; scales and biases are
// (..., rows, cols / group_size) in one float dtype, and each value is
// scale * q + bias of its group. The checks every op that reads it makes.
#pragma once

#include <utility>

#include "common/checks.h"

namespace mlx_ext {

inline bool valid_affine_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}

inline bool valid_affine_group_size(int group_size) {
  return group_size == 32 || group_size == 64 || group_size == 128;
}

// ValueError unless bits and group_size are ones MLX's affine mode accepts.
inline void check_affine_config(const char* op, int bits, int group_size) {
  if (!valid_affine_bits(bits))
    value_error(op, "bits=", bits, " is not supported; use one of 2, 3, 4, 5, 6, 8");
  if (!valid_affine_group_size(group_size))
    value_error(op, "group_size=", group_size, " is not supported; use one of 32, 64, 128");
}

// Logical (rows, cols) of a packed 2-D `w` after checking its dtype and that
// its rows hold a whole number of values.
inline std::pair<int, int> affine_matrix_shape(const char* op, const mx::array& w, int bits) {
  if (w.dtype() != mx::uint32)
    type_error_(op, "w must be uint32 (as packed by mx.quantize), got ", w.dtype());
  if (w.ndim() != 2) value_error(op, "w must be 2-D (rows, packed columns), got shape ", w.shape());
  const int64_t packed_cols = w.shape(-1);
  if ((packed_cols * 32) % bits != 0)
    value_error(op, "w with shape ", w.shape(), " cannot hold ", bits, "-bit values (",
        packed_cols, " uint32 words per row is not a whole number of values)");
  return {w.shape(0), int(packed_cols * 32 / bits)};
}

// Checks scales and biases of a (rows, cols) matrix quantized in groups of
// group_size along its rows; `cols_name` names cols in the message (K, N, D).
inline void check_affine_groups(const char* op, const mx::array& w, const mx::array& scales,
    const mx::array& biases, int rows, int cols, int group_size, const char* cols_name) {
  check_kernel_float(op, "scales", scales);
  if (biases.dtype() != scales.dtype())
    type_error_(op, "biases must have the dtype of scales (", scales.dtype(), "), got ",
        biases.dtype());
  if (cols % group_size != 0)
    value_error(op, cols_name, "=", cols, " (from w with shape ", w.shape(),
        ") is not a multiple of group_size=", group_size);
  const mx::Shape group_shape{rows, cols / group_size};
  if (scales.shape() != group_shape)
    value_error(op, "scales must have shape ", group_shape, ", got ", scales.shape());
  if (biases.shape() != group_shape)
    value_error(op, "biases must have shape ", group_shape, ", got ", biases.shape());
}

} // namespace mlx_ext
