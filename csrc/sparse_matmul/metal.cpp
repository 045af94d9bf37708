// SparseMatmul::eval_gpu and SparseSampledMatmul::eval_gpu on Metal: pick a
// kernel of metal/sparse_matmul.metal (metal_plan.h), specialize it for the
// bias epilogue and bind the format's arrays as
// metal/sparse_matmul_bindings.h says. x is converted to the output dtype
// first when it differs (the kernels read x and write out in one dtype T,
// the values in theirs).
#include <climits>
#include <string>

#include "../../metal/sparse_matmul_bindings.h"
#include "common/gpu.h"
#include "common/kernel_names.h"
#include "common/metal/library.h"
#include "mlx/backend/gpu/copy.h"
#include "mlx/backend/metal/device.h"
#include "sparse_matmul/metal_plan.h"
#include "sparse_matmul/sparse_matmul.h"

namespace mlx_ext {

MLX_EXT_HAS_GPU(SparseMatmul)
MLX_EXT_HAS_GPU(SparseSampledMatmul)

namespace {

namespace plan = metal::sparse_plan;

void check_sizes(int64_t M, const SparseLayout& l, int64_t stored) {
  if (M > INT_MAX || stored > INT_MAX)
    throw std::invalid_argument("[mlx_ext.sparse_matmul] the Metal kernels take M and the number "
        "of stored values below 2^31 (got M=" + std::to_string(M) + ", " + std::to_string(stored) +
        " stored values; N=" + std::to_string(l.N) + ", K=" + std::to_string(l.K) + ")");
}

// The values' dtype: of the values, or of quantized N:M's scales.
mx::Dtype value_dtype(const SparseLayout& l, const mx::array* arrays) {
  return arrays[l.quantized() ? 1 : 0].dtype();
}

int64_t stored_values(const SparseLayout& l, const mx::array* arrays) {
  if (l.format == SparseFormat::nm) return int64_t(l.N) * (l.K / l.m * l.n);
  return arrays[0].size();
}

std::string format_name(const SparseLayout& l, const mx::array* arrays) {
  const bool wide_columns = l.format == SparseFormat::csr && arrays[1].dtype() == mx::uint32;
  return plan::format_name(plan::Format(int(l.format)), wide_columns, l.bits, l.group_size);
}

SpmmShape shape_of(const SparseLayout& l, int64_t M) {
  return {int(M), l.N, l.K, l.block_n, l.block_k, l.n, l.m, int(plan::kSliceValues)};
}

// Binds the format's arrays (sparse_matmul.h's order) to their buffers;
// the values only when `with_values`.
void bind_format(mx::metal::CommandEncoder& enc, const SparseLayout& l, const mx::array* arrays,
    bool with_values) {
  if (l.format == SparseFormat::nm) {
    if (with_values) {
      enc.set_input_array(arrays[0], SPMM_BUFFER_VALUES);
      if (l.quantized()) {
        enc.set_input_array(arrays[1], SPMM_BUFFER_SCALES);
        enc.set_input_array(arrays[2], SPMM_BUFFER_BIASES);
      }
    }
    enc.set_input_array(arrays[l.value_arrays()], SPMM_BUFFER_PATTERN);
    return;
  }
  if (with_values) enc.set_input_array(arrays[0], SPMM_BUFFER_VALUES);
  enc.set_input_array(arrays[1], SPMM_BUFFER_PATTERN);
  enc.set_input_array(arrays[2], SPMM_BUFFER_ROW_PTR);
}

void dispatch(mx::metal::CommandEncoder& enc, const plan::Launch& launch) {
  enc.dispatch_threadgroups(MTL::Size(launch.groups[0], launch.groups[1], launch.groups[2]),
      MTL::Size(launch.threads, 1, 1));
}

} // namespace

void SparseMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const int64_t cols = out.shape(-1);
  const int64_t M = cols ? int64_t(out.size()) / cols : 0;
  if (M == 0) return;
  const SparseLayout& l = layout_;
  const mx::array* arrays = inputs.data() + 1;
  const int64_t stored = stored_values(l, arrays);
  check_sizes(M, l, stored);

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  mx::array x = inputs[0];
  if (x.dtype() != out.dtype()) {
    // float32 outputs of float16 / bfloat16 values from x of another dtype
    // (promote_types): the kernels read x in the output dtype.
    mx::array converted(x.shape(), out.dtype(), nullptr, {});
    mx::copy_gpu(x, converted, mx::CopyType::General, s);
    enc.add_temporary(converted);
    x = converted;
  }

  const auto launch = plan::plan(plan::Format(int(l.format)), M, l.N, l.K, stored, transpose_);
  const std::string name = plan::kernel_name(launch, format_name(l, arrays),
      kernel_dtype_name(out.dtype()), kernel_dtype_name(value_dtype(l, arrays)));
  bool has_bias = has_bias_;
  const mx::metal::MTLFCList constants = {
      {&has_bias, MTL::DataType::DataTypeBool, SPMM_FC_HAS_BIAS}};
  auto* kernel = d.get_kernel(
      name, metal::library(d), name + (has_bias ? "_bias" : "_nobias"), constants);

  const bool split = std::string(launch.kernel) == "mv_split";
  mx::array partials({split ? int(plan::split_partials(M, stored)) : 0}, mx::float32, nullptr, {});
  enc.set_compute_pipeline_state(kernel);
  bind_format(enc, l, arrays, true);
  enc.set_input_array(x, SPMM_BUFFER_X);
  enc.set_output_array(out, SPMM_BUFFER_OUT);
  if (has_bias_) enc.set_input_array(inputs.back(), SPMM_BUFFER_BIAS);
  enc.set_bytes(shape_of(l, M), SPMM_BUFFER_SHAPE);
  if (split) {
    // Scratch of the rows across slices, read by the fix-up below.
    partials.set_data(mx::allocator::malloc(partials.nbytes()));
    enc.add_temporary(partials);
    enc.set_output_array(partials, SPMM_BUFFER_PARTIALS);
  }
  dispatch(enc, launch);
  if (!split) return;

  const std::string fixup = plan::split_fixup_name(kernel_dtype_name(out.dtype()));
  enc.set_compute_pipeline_state(d.get_kernel(
      fixup, metal::library(d), fixup + (has_bias ? "_bias" : "_nobias"), constants));
  enc.set_input_array(arrays[2], SPMM_BUFFER_ROW_PTR);
  enc.set_output_array(out, SPMM_BUFFER_OUT);
  if (has_bias_) enc.set_input_array(inputs.back(), SPMM_BUFFER_BIAS);
  enc.set_bytes(shape_of(l, M), SPMM_BUFFER_SHAPE);
  enc.set_input_array(partials, SPMM_BUFFER_PARTIALS);
  dispatch(enc, plan::plan_split_fixup(M, l.N));
}

void SparseSampledMatmul::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const SparseLayout& l = layout_;
  auto& s = stream();
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) return;
  const auto& g = inputs[0];
  const auto& x = inputs[1];
  const int64_t M = g.shape(0);
  if (M == 0) { // an empty sum: zeros
    mx::fill_gpu(mx::array(0.0f, out.dtype()), out, s);
    return;
  }
  const mx::array* arrays = inputs.data() + 2;
  check_sizes(M, l, out.size());

  auto& d = mx::metal::device(s.device);
  const std::string name = plan::sampled_kernel_name(
      format_name(l, arrays), kernel_dtype_name(out.dtype()));
  auto* kernel = d.get_kernel(name, metal::library(d));
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel);
  bind_format(enc, l, arrays, false);
  enc.set_input_array(g, SPMM_BUFFER_G);
  enc.set_input_array(x, SPMM_BUFFER_X);
  enc.set_output_array(out, SPMM_BUFFER_OUT);
  enc.set_bytes(shape_of(l, M), SPMM_BUFFER_SHAPE);
  dispatch(enc, plan::plan_sampled(l.N));
}

} // namespace mlx_ext
