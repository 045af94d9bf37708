// SparseMatmul::eval_cpu and SparseSampledMatmul::eval_cpu: convert x (and g)
// to float32 once and hand the problem to the CPU driver (cpu_driver.cpp) on
// the stream's thread.
#include <cstring>
#include <vector>

#include "common/cpu/arrays.h"
#include "mlx/backend/cpu/encoder.h"
#include "sparse_matmul/cpu_driver.h"
#include "sparse_matmul/sparse_matmul.h"

namespace mlx_ext {
namespace {

// The kernels' view of the format's arrays (sparse_matmul.h lays them out);
// `arrays` are the inputs after x (or after g and x).
cpu::SparseW sparse_w(const SparseLayout& l, const mx::array* arrays) {
  cpu::SparseW w{};
  w.kind = static_cast<cpu::SparseKind>(l.format);
  w.N = l.N;
  w.K = l.K;
  w.values = arrays[0].data<void>();
  w.value_type = cpu::float_type(arrays[l.quantized() ? 1 : 0].dtype());
  if (l.format == SparseFormat::nm) {
    if (l.quantized()) {
      w.scales = arrays[1].data<void>();
      w.biases = arrays[2].data<void>();
    }
    w.pattern = arrays[l.value_arrays()].data<void>();
    w.n = l.n;
    w.m = l.m;
    w.code_bits = l.code_bits();
    w.bits = l.bits;
    w.group_size = l.group_size;
  } else {
    w.pattern = arrays[1].data<void>();
    w.row_ptr = arrays[2].data<int32_t>();
    w.wide_columns = arrays[1].dtype() == mx::uint32;
    w.block_n = l.block_n;
    w.block_k = l.block_k;
  }
  return w;
}

void prepare(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
}

std::vector<mx::array> weak_copies(const std::vector<mx::array>& inputs) {
  std::vector<mx::array> copies;
  for (const auto& in : inputs) copies.push_back(mx::array::unsafe_weak_copy(in));
  return copies;
}

} // namespace

void SparseMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare(stream(), inputs, out);
  mx::cpu::get_command_encoder(stream()).dispatch(
      [inputs = weak_copies(inputs), out = mx::array::unsafe_weak_copy(out), l = layout_,
          transpose = transpose_, has_bias = has_bias_]() mutable {
        const int64_t N = out.shape(-1);
        const int64_t M = N ? out.size() / N : 0;
        if (M == 0) return;
        std::vector<float> x_storage;
        const float* x = cpu::as_float32(inputs[0], x_storage);
        const cpu::SparseOut o{out.data<void>(), cpu::float_type(out.dtype()),
            has_bias ? inputs.back().data<void>() : nullptr};
        cpu::run_sparse_matmul(cpu::sparse_matmul_kernels_for(cpu::current_isa()),
            sparse_w(l, inputs.data() + 1), x, M, o, transpose);
      });
}

void SparseSampledMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  prepare(stream(), inputs, out);
  mx::cpu::get_command_encoder(stream()).dispatch(
      [inputs = weak_copies(inputs), out = mx::array::unsafe_weak_copy(out), l = layout_]() mutable {
        if (out.size() == 0) return;
        const int64_t M = inputs[0].shape(0);
        if (M == 0) {
          std::memset(out.data<void>(), 0, out.nbytes());
          return;
        }
        cpu::run_sparse_sampled(cpu::sparse_matmul_kernels_for(cpu::current_isa()),
            sparse_w(l, inputs.data() + 2), inputs[0].data<float>(), inputs[1].data<float>(), M,
            out.data<void>());
      });
}

} // namespace mlx_ext
