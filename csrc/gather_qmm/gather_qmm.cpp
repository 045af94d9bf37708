// The op function (validation, index broadcasting, graph building) and the
// Primitive's transforms. Kernels: cpu.cpp, metal.cpp, cuda.cpp.
#include "gather_qmm/gather_qmm.h"

#include <numeric>

#include "common/affine.h"
#include "common/checks.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = "gather_qmm";
constexpr const char* kSwiGLUOp = "gather_quantized_swiglu";
// Whether this build's GPU kernels take the fused SwiGLU node (CUDA's do).
#if defined(MLX_EXT_CUDA)
constexpr bool kFusedSwigluOnGpu = true;
#else
constexpr bool kFusedSwigluOnGpu = false;
#endif

mx::Shape batch_shape(const mx::array& a) { return mx::Shape(a.shape().begin(), a.shape().end() - 2); }

int64_t batch_size(const mx::array& a) {
  const auto b = batch_shape(a);
  return std::accumulate(b.begin(), b.end(), int64_t(1), std::multiplies<int64_t>());
}

// mx.gather_qmm's default for a missing index array (every matrix of a batch
// of shape `batch`, in order), broadcast to `index_shape` and flattened. It
// depends on shapes alone, so it is built here as a constant: no graph nodes
// per call (a decode step is a few microseconds of kernel per expert).
mx::array default_flat_indices(const mx::Shape& batch, const mx::Shape& index_shape) {
  const size_t lead = index_shape.size() - batch.size(); // broadcast aligns trailing dims
  std::vector<int64_t> stride(index_shape.size(), 0); // 0 on broadcast dims
  for (int64_t j = int64_t(batch.size()) - 1, step = 1; j >= 0; --j) {
    if (batch[j] != 1) stride[lead + j] = step;
    step *= batch[j];
  }
  int64_t size = 1;
  for (auto d : index_shape) size *= d;
  std::vector<uint32_t> flat(size);
  for (int64_t p = 0; p < size; ++p) {
    int64_t rest = p, value = 0;
    for (int64_t d = int64_t(index_shape.size()) - 1; d >= 0; --d) {
      value += (rest % index_shape[d]) * stride[d];
      rest /= index_shape[d];
    }
    flat[p] = uint32_t(value);
  }
  return mx::array(flat.begin(), {int(size)}, mx::uint32);
}

// TypeError unless integer; ValueError when its values are already known
// (an evaluated array) and one falls outside [0, limit). Values known only at
// run time are checked by the kernel (out-of-range pairs give NaN).
void check_indices(const char* op, const char* arg, const mx::array& idx, int64_t limit, const char* of) {
  if (!mx::issubdtype(idx.dtype(), mx::integer))
    type_error_(op, arg, " must have an integer dtype, got ", idx.dtype());
  if (!idx.is_available() || idx.size() == 0) return;
  auto lo = mx::min(mx::astype(idx, mx::int64, mx::Device::cpu), false, mx::Device::cpu);
  auto hi = mx::max(mx::astype(idx, mx::int64, mx::Device::cpu), false, mx::Device::cpu);
  mx::eval({lo, hi});
  if (lo.item<int64_t>() < 0 || hi.item<int64_t>() >= limit)
    value_error(op, arg, " holds values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(),
        "] but must lie in [0, ", limit, "): the number of matrices in the batch of ", of);
}

// The primitive's node: inputs as GatherQmm documents them.
mx::array gather_node(std::vector<mx::array> inputs, mx::Dtype out_type, int M, int N,
    int group_size, int bits, bool transpose, const mx::Stream& s, bool swiglu = false,
    bool sorted = false) {
  const int P = inputs[4].shape(0);
  const bool has_bias = !swiglu && inputs.size() > 6;
  return mx::array({P, M, N}, out_type,
      std::make_shared<GatherQmm>(s, group_size, bits, transpose, has_bias, swiglu, sorted),
      std::move(inputs));
}

// silu(gate) * up as two plain gather nodes and MLX's elementwise ops, for
// inputs laid out as the fused node's (GatherQmm: x, gate w / scales /
// biases, lhs, rhs, up w / scales / biases) with x in place of input 0: the
// fused primitive's vjp / jvp, and GPU streams (no fused epilogue there yet).
mx::array unfused_swiglu(const std::vector<mx::array>& in, const mx::array& x, int group_size, int bits,
    bool sorted, const mx::Stream& s) {
  const int M = x.shape(1), N = in[1].shape(1);
  auto product = [&](int w) {
    auto node = gather_node({x, in[w], in[w + 1], in[w + 2], in[4], in[5]}, x.dtype(), M, N, group_size, bits,
        true, s, false, sorted);
    return mx::astype(node, mx::float32, s);
  };
  auto gate = product(1), up = product(6);
  return mx::astype(mx::multiply(mx::multiply(gate, mx::sigmoid(gate, s), s), up, s), x.dtype(), s);
}

// The checked, flattened inputs of one gather (as GatherQmm documents them),
// and what the node and the reshape of its output need.
struct Gather {
  std::vector<mx::array> inputs;
  mx::Dtype out_type;
  int M, N;
  mx::Shape out_shape; // broadcast indices' shape + (M, N)
  mx::Stream stream;
};

Gather checked_gather(
    const char* op,
    const char* suffix, // of the weight arguments' names: "", "_gate" or "_up"
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const std::optional<mx::array>& lhs_indices,
    const std::optional<mx::array>& rhs_indices,
    bool transpose,
    std::optional<int> group_size_or_default,
    std::optional<int> bits_or_default,
    const std::string& mode,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {

  // The one place a quantization mode is chosen: other modes (fp formats)
  // plug in here with their own defaults and checks.
  if (mode != "affine")
    value_error(op, "mode='", mode, "' is not supported; mlx_ext implements mode='affine'");
  const int group_size = group_size_or_default.value_or(64);
  const int bits = bits_or_default.value_or(4);
  check_affine_config(op, bits, group_size);
  const std::string w_arg = std::string("w") + suffix, scales_arg = std::string("scales") + suffix,
                    biases_arg = std::string("biases") + suffix;
  if (!biases) value_error(op, biases_arg, " are required for mode='affine' (got None)");

  check_kernel_float(op, "x", x);
  if (x.ndim() < 2) value_error(op, "x must have at least two dimensions (..., M, K), got shape ", x.shape());
  if (w.dtype() != mx::uint32)
    type_error_(op, w_arg, " must be uint32 (as packed by mx.quantize), got ", w.dtype());
  if (w.ndim() < 2) value_error(op, w_arg, " must have at least two dimensions (..., rows, packed columns), got shape ", w.shape());
  const int64_t packed = w.shape(-1);
  if ((packed * 32) % bits != 0)
    value_error(op, w_arg, " with shape ", w.shape(), " cannot hold ", bits, "-bit values (", packed,
        " uint32 words per row is not a whole number of values)");
  const int rows = w.shape(-2);
  const int cols = int(packed * 32 / bits);
  const int K = transpose ? cols : rows;
  const int N = transpose ? rows : cols;
  if (x.shape(-1) != K)
    value_error(op, "x has inner dimension ", x.shape(-1), " (shape ", x.shape(), ") but ", w_arg, " with shape ",
        w.shape(), ", bits=", bits, ", transpose=", transpose ? "True" : "False", " expects ", K);
  if (cols % group_size != 0)
    value_error(op, transpose ? "K" : "N", "=", cols, " (from ", w_arg, " with shape ", w.shape(),
        ") is not a multiple of group_size=", group_size);
  check_kernel_float(op, scales_arg.c_str(), scales);
  if (biases->dtype() != scales.dtype())
    type_error_(op, biases_arg, " must have the dtype of ", scales_arg, " (", scales.dtype(), "), got ", biases->dtype());
  auto group_shape = batch_shape(w);
  group_shape.push_back(rows);
  group_shape.push_back(cols / group_size);
  if (scales.shape() != group_shape)
    value_error(op, scales_arg, " must have shape ", group_shape, ", got ", scales.shape());
  if (biases->shape() != group_shape)
    value_error(op, biases_arg, " must have shape ", group_shape, ", got ", biases->shape());

  const int64_t X = batch_size(x);
  const int64_t E = batch_size(w);
  if (lhs_indices) check_indices(op, "lhs_indices", *lhs_indices, X, "x");
  if (rhs_indices) check_indices(op, "rhs_indices", *rhs_indices, E, w_arg.c_str());

  mx::Dtype out_type = mx::promote_types(x.dtype(), scales.dtype());
  auto bias_expert_shape = batch_shape(w);
  bias_expert_shape.push_back(N);
  if (bias) {
    check_kernel_float(op, "bias", *bias);
    if (bias->shape() != mx::Shape{N} && bias->shape() != bias_expert_shape)
      value_error(op, "bias must have shape (", N, ",) or ", bias_expert_shape,
          " (one row per matrix of w), got ", bias->shape());
    out_type = mx::promote_types(out_type, bias->dtype());
  }

  const auto lhs_shape = lhs_indices ? lhs_indices->shape() : batch_shape(x);
  const auto rhs_shape = rhs_indices ? rhs_indices->shape() : batch_shape(w);
  mx::Shape index_shape;
  try {
    index_shape = mx::broadcast_shapes(lhs_shape, rhs_shape);
  } catch (const std::invalid_argument&) {
    value_error(op, "lhs_indices with shape ", lhs_shape, " and rhs_indices with shape ",
        rhs_shape, " do not broadcast together");
  }
  // Arguments first, then whether this stream has kernels.
  const auto stream = kernel_stream<GatherQmm>(op, s);
  // Negative values become large uint32 values: out of range, NaN (as above).
  auto flat = [&](const std::optional<mx::array>& idx, const mx::array& of) {
    if (!idx) return default_flat_indices(batch_shape(of), index_shape);
    auto u = mx::astype(mx::broadcast_to(*idx, index_shape, stream), mx::uint32, stream);
    return contiguous_input(mx::flatten(u, stream), stream);
  };
  const int M = x.shape(-2);
  std::vector<mx::array> inputs{
      kernel_input(mx::reshape(x, {-1, M, K}, stream), out_type, stream),
      contiguous_input(mx::reshape(w, {-1, rows, int(packed)}, stream), stream),
      kernel_input(mx::reshape(scales, {-1, rows, cols / group_size}, stream), out_type, stream),
      kernel_input(mx::reshape(*biases, {-1, rows, cols / group_size}, stream), out_type, stream),
      flat(lhs_indices, x),
      flat(rhs_indices, w)};
  if (bias) {
    auto b = bias->ndim() == 1 ? *bias : mx::reshape(*bias, {-1, N}, stream);
    inputs.push_back(kernel_input(b, out_type, stream));
  }
  auto out_shape = index_shape;
  out_shape.push_back(M);
  out_shape.push_back(N);
  return Gather{std::move(inputs), out_type, M, N, std::move(out_shape), stream};
}

} // namespace

mx::array gather_qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const std::optional<mx::array>& biases,
    const std::optional<mx::array>& lhs_indices,
    const std::optional<mx::array>& rhs_indices,
    bool transpose,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    bool sorted_indices, // a hint: picks the Metal kernel; the CPU groups by expert anyway
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {
  auto g = checked_gather(kOp, "", x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
      bias, s);
  auto out = gather_node(std::move(g.inputs), g.out_type, g.M, g.N, group_size.value_or(64), bits.value_or(4),
      transpose, g.stream, false, sorted_indices);
  return mx::reshape(out, std::move(g.out_shape), g.stream);
}

mx::array gather_quantized_swiglu(
    const mx::array& x,
    const mx::array& w_gate,
    const mx::array& scales_gate,
    const std::optional<mx::array>& biases_gate,
    const mx::array& w_up,
    const mx::array& scales_up,
    const std::optional<mx::array>& biases_up,
    const std::optional<mx::array>& lhs_indices,
    const std::optional<mx::array>& rhs_indices,
    std::optional<int> group_size,
    std::optional<int> bits,
    const std::string& mode,
    bool sorted_indices,
    mx::StreamOrDevice s) {
  // Each projection is checked as a gather_qmm of its own, then the two must agree.
  auto gate = checked_gather(kSwiGLUOp, "_gate", x, w_gate, scales_gate, biases_gate, lhs_indices, rhs_indices, true, group_size,
      bits, mode, std::nullopt, s);
  auto up = checked_gather(kSwiGLUOp, "_up", x, w_up, scales_up, biases_up, lhs_indices, rhs_indices, true, group_size, bits,
      mode, std::nullopt, s);
  if (w_up.shape() != w_gate.shape())
    value_error(kSwiGLUOp, "w_up must have the shape of w_gate ", w_gate.shape(), ", got ",
        w_up.shape());
  if (up.out_type != gate.out_type)
    type_error_(kSwiGLUOp, "scales_up (", scales_up.dtype(), ") and scales_gate (",
        scales_gate.dtype(), ") give different output dtypes; use one dtype for both");
  auto inputs = std::move(gate.inputs);
  for (int i : {1, 2, 3}) inputs.push_back(up.inputs[i]);
  mx::array out = [&] {
    // Metal runs the two gathers and MLX's elementwise ops (its gather
    // kernels have no fused epilogue yet); the CPU and CUDA (cuda.cpp) run
    // the fused node.
    if (gate.stream.device == mx::Device::gpu && !kFusedSwigluOnGpu)
      return unfused_swiglu(inputs, inputs[0], group_size.value_or(64), bits.value_or(4), sorted_indices,
          gate.stream);
    return gather_node(std::move(inputs), gate.out_type, gate.M, gate.N, group_size.value_or(64),
        bits.value_or(4), true, gate.stream, true, sorted_indices);
  }();
  return mx::reshape(out, std::move(gate.out_shape), gate.stream);
}

// Inputs: 0 x (X, M, K), 1 w, 2 scales, 3 biases, 4 lhs (P,), 5 rhs (P,),
// 6 bias. The output and its cotangent are (P, M, N).
std::vector<mx::array> GatherQmm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto& s = stream();
  if (swiglu_) return swiglu_vjp(primals, cotangents[0], argnums);
  // Cotangents may be broadcast views (the vjp of a sum): the kernel reads
  // contiguous rows.
  const auto& cotan = cotangents[0];
  const auto& lhs = primals[4];
  const auto& rhs = primals[5];
  const int P = lhs.shape(0);
  // Scatters per-pair rows (P, ...) into `rows` slots at `idx`; an index out
  // of range (the forward pass gave NaN there) lands in one extra slot that
  // is dropped, so that nothing is written out of bounds.
  auto scatter_rows = [&](const mx::array& idx, const mx::array& per_pair, int rows) {
    auto safe = mx::minimum(idx, mx::array(uint32_t(rows), mx::uint32), s);
    auto shape = per_pair.shape();
    shape[0] = rows + 1;
    auto upd_shape = per_pair.shape();
    upd_shape.insert(upd_shape.begin() + 1, 1);
    auto acc = mx::scatter_add(mx::zeros(shape, per_pair.dtype(), s), {safe},
        mx::reshape(per_pair, upd_shape, s), {0}, s);
    auto stop = acc.shape();
    stop[0] = rows;
    mx::Shape start(stop.size(), 0);
    return mx::slice(acc, std::move(start), std::move(stop), s);
  };
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      // d/dx[l] = sum over the pairs p with lhs[p] = l of g[p] W[rhs[p]]: the
      // same gather with the matrix read the other way, one x per pair.
      const auto& x = primals[0];
      auto per_pair_x = mx::arange(P, mx::uint32, s);
      auto dpairs = gather_node({contiguous_input(cotan, s), primals[1], primals[2], primals[3], per_pair_x, rhs},
          x.dtype(), x.shape(1), x.shape(2), group_size_, bits_, !transpose_, s, false, sorted_);
      grads.push_back(scatter_rows(lhs, dpairs, x.shape(0)));
    } else if (arg == 6 && has_bias_) {
      const auto& bias = primals[6];
      auto per_pair = mx::sum(cotan, 1, false, s); // (P, N)
      grads.push_back(bias.ndim() == 1 ? mx::sum(per_pair, 0, false, s)
                                       : scatter_rows(rhs, per_pair, bias.shape(0)));
    } else if (arg == 4 || arg == 5) {
      value_error(kOp, "lhs_indices and rhs_indices are integer indices: they have no gradient");
    } else {
      value_error(kOp, "gradients with respect to the quantized weights (w, scales, biases) are "
          "not supported; differentiate with respect to x or bias");
    }
  }
  return grads;
}

// The fused SwiGLU's transforms through its unfused form: the two gathers
// (this primitive without swiglu) and the activation in MLX ops, whose own
// vjp / jvp MLX then derives. Only x (input 0) has derivatives.
std::vector<mx::array> GatherQmm::swiglu_vjp(
    const std::vector<mx::array>& primals, const mx::array& cotan, const std::vector<int>& argnums) {
  for (int arg : argnums)
    if (arg != 0) value_error(kSwiGLUOp, "gradients are only defined with respect to x");
  auto fn = [&](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{unfused_swiglu(primals, in[0], group_size_, bits_, sorted_, stream())};
  };
  auto [outs, grads] = mx::vjp(fn, {primals[0]}, {cotan});
  return grads;
}

std::vector<mx::array> GatherQmm::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  const auto& s = stream();
  if (swiglu_) {
    if (argnums.size() != 1 || argnums[0] != 0)
      value_error(kSwiGLUOp, "derivatives are only defined with respect to x");
    auto fn = [&](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{unfused_swiglu(primals, in[0], group_size_, bits_, sorted_, stream())};
    };
    auto [outs, jvps] = mx::jvp(fn, {primals[0]}, {tangents[0]});
    return jvps;
  }
  const int M = primals[0].shape(1);
  const int N = output_shapes(primals)[0][2];
  std::optional<mx::array> out;
  for (size_t i = 0; i < argnums.size(); ++i) {
    mx::array term = [&] {
      if (argnums[i] == 0) {
        auto inputs = primals;
        inputs.erase(inputs.begin() + 6, inputs.end());
        inputs[0] = kernel_input(tangents[i], primals[0].dtype(), s);
        return gather_node(std::move(inputs), primals[0].dtype(), M, N, group_size_, bits_,
            transpose_, s, false, sorted_);
      }
      if (argnums[i] == 6 && has_bias_) {
        const auto& t = tangents[i];
        auto rows = t.ndim() == 1 ? mx::broadcast_to(t, {primals[4].shape(0), N}, s)
                                  : mx::take(t, primals[5], 0, s);
        return mx::expand_dims(rows, 1, s);
      }
      value_error(kOp, "derivatives are only defined with respect to x and bias");
    }();
    out = out ? mx::add(*out, term, s) : term;
  }
  auto shape = output_shapes(primals)[0];
  return {mx::astype(mx::broadcast_to(*out, shape, s), primals[0].dtype(), s)};
}

bool GatherQmm::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatherQmm&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_ && transpose_ == o.transpose_ &&
      has_bias_ == o.has_bias_ && swiglu_ == o.swiglu_ &&
      sorted_ == o.sorted_;
}

std::vector<mx::Shape> GatherQmm::output_shapes(const std::vector<mx::array>& inputs) {
  const auto& w = inputs[1];
  const int N = transpose_ ? w.shape(1) : int(int64_t(w.shape(2)) * 32 / bits_);
  return {{inputs[4].shape(0), inputs[0].shape(1), N}};
}

} // namespace mlx_ext
