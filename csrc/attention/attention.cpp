// The op function: validation, input preparation, graph building.
// Transforms: transforms.cpp. Kernels: cpu.cpp.
#include "attention/attention.h"

#include <string>

#include "attention/kv_strides.h"
#include "common/affine.h"
#include "common/checks.h"

namespace mlx_ext {
namespace {

constexpr const char* kOp = kAttentionOp;

// The head dims the CPU kernels take.
constexpr int kMaxHeadDim = 256;

struct Dims {
  int B, Hq, Hkv, L, S, D;
};

void check_rank4(const char* arg, const mx::array& a, const char* layout) {
  if (a.ndim() != 4) value_error(kOp, arg, " must have shape ", layout, ", got ", a.shape());
}

// A float k or v against q: rank, dtype, and the dims it shares with q and the other.
void check_float_kv(const char* arg, const mx::array& a, const Dims& d) {
  check_rank4(arg, a, "(B, Hkv, S, D)");
  check_kernel_float(kOp, arg, a);
  if (a.shape(0) != d.B)
    value_error(kOp, arg, " has batch size ", a.shape(0), " (shape ", a.shape(), ") but q has ", d.B);
  if (a.shape(3) != d.D)
    value_error(kOp, arg, " has head dim ", a.shape(3), " (shape ", a.shape(), ") but q has D=", d.D);
}

// One (w_q, scales, biases) tuple of a QuantizedKVCache: codes (B, Hkv, S,
// D * bits / 32) uint32, scales and biases (B, Hkv, S, D / group_size).
void check_quantized_kv(const char* arg, const std::vector<mx::array>& t, const Dims& d,
    int bits, int group_size) {
  if (t.size() != 3)
    value_error(kOp, arg, " must be an array or a (w_q, scales, biases) tuple, got a tuple of ",
        t.size());
  const auto& w = t[0];
  if (w.dtype() != mx::uint32)
    type_error_(kOp, arg, "[0] (w_q) must be uint32 (as packed by mx.quantize), got ", w.dtype());
  check_rank4(arg, w, "(B, Hkv, S, D * bits / 32) for w_q");
  const int packed = d.D * bits / 32;
  const mx::Shape w_shape{d.B, w.shape(1), w.shape(2), packed};
  if (w.shape() != w_shape)
    value_error(kOp, arg, "[0] (w_q) must have shape ", w_shape, " for q's B=", d.B, ", D=", d.D,
        " and bits=", bits, ", got ", w.shape());
  const mx::Shape group_shape{d.B, w.shape(1), w.shape(2), d.D / group_size};
  for (int i : {1, 2}) {
    const char* name = i == 1 ? "scales" : "biases";
    if (!is_kernel_float(t[i].dtype()))
      type_error_(kOp, arg, "[", i, "] (", name, ") must be float32, float16 or bfloat16, got ",
          t[i].dtype());
    if (t[i].shape() != group_shape)
      value_error(kOp, arg, "[", i, "] (", name, ") must have shape ", group_shape,
          " for group_size=", group_size, ", got ", t[i].shape());
  }
  if (t[2].dtype() != t[1].dtype())
    type_error_(kOp, arg, "[2] (biases) must have the dtype of ", arg, "[1] (scales), ",
        t[1].dtype(), ", got ", t[2].dtype());
}

// bits of a quantized K/V: the given value, checked against the packed width
// of k's codes, or that width's value when bits is None.
int quantized_bits(const std::vector<mx::array>& k, std::optional<int> bits, int D) {
  if (k.empty() || k[0].ndim() != 4) return bits.value_or(0);
  const int64_t packed_bits = int64_t(k[0].shape(3)) * 32;
  if (!bits) {
    if (packed_bits % D != 0 || (packed_bits / D != 4 && packed_bits / D != 8))
      value_error(kOp, "k[0] (w_q) has ", k[0].shape(3), " uint32 words per row, which is neither "
          "4 nor 8 bits per value for q's D=", D, "; pass bits=");
    return int(packed_bits / D);
  }
  if (*bits != 4 && *bits != 8)
    value_error(kOp, "bits=", *bits, " is not supported; quantized K/V take bits 4 or 8");
  return *bits;
}

// A mask array's dtype, rank and broadcast against (B, Hq, L, S).
void check_mask(const mx::array& m, const Dims& d) {
  if (m.dtype() != mx::bool_ && !is_kernel_float(m.dtype()))
    type_error_(kOp, "mask must be bool (True = attend) or a float additive mask "
        "(float32, float16, bfloat16), got ", m.dtype());
  if (m.ndim() > 4)
    value_error(kOp, "mask must have at most 4 dimensions, got shape ", m.shape());
  mx::Shape shape(4 - m.ndim(), 1);
  shape.insert(shape.end(), m.shape().begin(), m.shape().end());
  const mx::Shape target{d.B, d.Hq, d.L, d.S};
  for (int i = 0; i < 4; ++i)
    if (shape[i] != 1 && shape[i] != target[i])
      value_error(kOp, "mask with shape ", m.shape(), " does not broadcast to (B, Hq, L, S) = ",
          target);
}

// Whether the GPU kernels can read K/V (or their codes, scales, biases) x in
// place, known while the graph is built: rows of D contiguous, batch and head
// strides whole rows (kv_strides.h, as cuda.cpp / metal.cpp read it). True for an evaluated
// array laid out so, and for a lazy slice of an evaluated row-contiguous
// buffer that keeps the last axis whole (mlx-lm's KV caches, read
// [..., :offset, :] each step).
bool kv_rows_in_place(const mx::array& x) {
  if (x.ndim() != 4) return false;
  if (x.is_available()) return kv_row_strides(x).has_value();
  if (!x.has_primitive()) return false;
  // By name: MLX's typeinfo is not exported to extensions (no dynamic_cast).
  if (std::string(x.primitive().name()) != "Slice") return false;
  const auto& in = x.inputs()[0];
  const auto [start, end, strides] = static_cast<const mx::Slice&>(x.primitive()).state();
  for (auto step : strides)
    if (step != 1) return false;
  return in.is_available() && in.flags().row_contiguous && start[3] == 0 && end[3] == in.shape(3);
}

// K/V as the op passes them: unchanged on the CPU (cpu.cpp copies what it
// cannot read in place) and where the GPU kernels read them in place, else
// made row-contiguous in the graph (MLX's copy kernels are not exported to
// extensions; the CUDA eval_gpu copies only what still cannot be read in
// place, such as a view at an odd offset, with its own kernel).
mx::array kv_input(const mx::array& x, const mx::Stream& s) {
  if (s.device != mx::Device::gpu || kv_rows_in_place(x)) return x;
  return mx::contiguous(x, false, s);
}

// The mask as the kernels read it (checked first): (Bm, Hm, Lm, Sm), each dim 1 or q's.
mx::array prepare_mask(const mx::array& m, const mx::Stream& s) {
  mx::Shape shape(4 - m.ndim(), 1);
  shape.insert(shape.end(), m.shape().begin(), m.shape().end());
  auto r = mx::reshape(m, shape, s);
  return m.dtype() == mx::bool_ ? contiguous_input(r, s) : kernel_input(r, mx::float32, s);
}

} // namespace

AttentionInputs::AttentionInputs(const AttentionConfig& c) {
  n_kv = c.quantized() ? 3 : 1;
  k = 1;
  v = k + n_kv;
  int next = v + n_kv;
  const bool has_mask = c.mask == MaskKind::boolean || c.mask == MaskKind::additive;
  mask = has_mask ? next++ : -1;
  sinks = c.has_sinks ? next++ : -1;
  kv_lengths = c.has_kv_lengths ? next++ : -1;
  count = next;
}

mx::array scaled_dot_product_attention(
    const mx::array& q,
    const KvInput& k,
    const KvInput& v,
    float scale,
    const std::optional<MaskInput>& mask,
    const std::optional<mx::array>& sinks,
    std::optional<int> window,
    const std::optional<mx::array>& kv_lengths,
    int group_size,
    std::optional<int> bits,
    mx::StreamOrDevice s) {
  check_rank4("q", q, "(B, Hq, L, D)");
  check_kernel_float(kOp, "q", q);
  Dims d{q.shape(0), q.shape(1), 0, q.shape(2), 0, q.shape(3)};
  if (d.D % 8 != 0 || d.D < 8 || d.D > kMaxHeadDim)
    value_error(kOp, "q has head dim D=", d.D, "; the kernels take multiples of 8 up to ",
        kMaxHeadDim);

  const bool k_quantized = std::holds_alternative<std::vector<mx::array>>(k);
  const bool v_quantized = std::holds_alternative<std::vector<mx::array>>(v);
  if (k_quantized != v_quantized)
    value_error(kOp, "k and v must both be arrays or both be (w_q, scales, biases) tuples; got ",
        k_quantized ? "a tuple for k and an array for v" : "an array for k and a tuple for v");

  AttentionConfig c{};
  c.scale = scale;
  c.group_size = group_size;
  if (k_quantized) {
    const auto& kt = std::get<std::vector<mx::array>>(k);
    const auto& vt = std::get<std::vector<mx::array>>(v);
    c.bits = quantized_bits(kt, bits, d.D);
    check_affine_config(kOp, c.bits, group_size);
    if (d.D % group_size != 0)
      value_error(kOp, "q's head dim D=", d.D, " is not a multiple of group_size=", group_size);
    check_quantized_kv("k", kt, d, c.bits, group_size);
    check_quantized_kv("v", vt, d, c.bits, group_size);
  } else {
    if (bits)
      value_error(kOp, "bits=", *bits, " is only for quantized k and v ((w_q, scales, biases) "
          "tuples); k and v are arrays");
    check_float_kv("k", std::get<mx::array>(k), d);
    check_float_kv("v", std::get<mx::array>(v), d);
  }
  const auto& k0 = k_quantized ? std::get<std::vector<mx::array>>(k)[0] : std::get<mx::array>(k);
  const auto& v0 = v_quantized ? std::get<std::vector<mx::array>>(v)[0] : std::get<mx::array>(v);
  d.Hkv = k0.shape(1);
  d.S = k0.shape(2);
  if (v0.shape(1) != d.Hkv || v0.shape(2) != d.S)
    value_error(kOp, "v has ", v0.shape(1), " heads and S=", v0.shape(2), " keys (shape ",
        v0.shape(), ") but k has ", d.Hkv, " and S=", d.S, " (shape ", k0.shape(), ")");
  if (d.Hkv == 0 || d.Hq % d.Hkv != 0)
    value_error(kOp, "q's ", d.Hq, " heads are not a multiple of k's ", d.Hkv,
        " heads (Hq % Hkv must be 0)");

  c.mask = MaskKind::none;
  if (mask) {
    if (const auto* m = std::get_if<std::string>(&*mask)) {
      if (*m != "causal")
        value_error(kOp, "mask='", *m, "' is not supported; the only string mask is 'causal'");
      c.mask = MaskKind::causal;
    } else {
      c.mask = std::get<mx::array>(*mask).dtype() == mx::bool_ ? MaskKind::boolean
                                                               : MaskKind::additive;
    }
  }
  if (window) {
    if (*window < 1) value_error(kOp, "window=", *window, " must be >= 1");
    c.window = *window;
  }
  if (c.causal() && d.L > d.S)
    value_error(kOp, c.mask == MaskKind::causal ? "mask='causal'" : "window",
        " needs L <= S (queries are the last L positions of the keys), got L=", d.L, " and S=",
        d.S);
  if (sinks) {
    check_kernel_float(kOp, "sinks", *sinks);
    if (sinks->shape() != mx::Shape{d.Hq})
      value_error(kOp, "sinks must have shape (Hq,) = (", d.Hq, ",), got ", sinks->shape());
    c.has_sinks = true;
  }
  if (kv_lengths) {
    if (kv_lengths->dtype() != mx::int32)
      type_error_(kOp, "kv_lengths must be int32, got ", kv_lengths->dtype());
    if (kv_lengths->shape() != mx::Shape{d.B})
      value_error(kOp, "kv_lengths must have shape (B,) = (", d.B, ",), got ",
          kv_lengths->shape());
    c.has_kv_lengths = true;
  }

  if (c.mask == MaskKind::boolean || c.mask == MaskKind::additive)
    check_mask(std::get<mx::array>(*mask), d);
  // Arguments first, then whether this stream has kernels.
  const auto stream = kernel_stream<ScaledDotProductAttention>(kOp, s);
  // K and V are passed as they are (cast to q's dtype): the kernels read a
  // slice of a cache in place (cpu.cpp: kv_rows; on a GPU see kv_input).
  std::vector<mx::array> inputs{contiguous_input(q, stream)};
  for (const auto* kv : {&k, &v}) {
    if (c.quantized()) {
      const auto& t = std::get<std::vector<mx::array>>(*kv);
      inputs.push_back(kv_input(t[0], stream));
      inputs.push_back(kv_input(mx::astype(t[1], q.dtype(), stream), stream));
      inputs.push_back(kv_input(mx::astype(t[2], q.dtype(), stream), stream));
    } else {
      inputs.push_back(kv_input(mx::astype(std::get<mx::array>(*kv), q.dtype(), stream), stream));
    }
  }
  if (c.mask == MaskKind::boolean || c.mask == MaskKind::additive)
    inputs.push_back(prepare_mask(std::get<mx::array>(*mask), stream));
  if (sinks) inputs.push_back(kernel_input(*sinks, mx::float32, stream));
  if (kv_lengths) inputs.push_back(contiguous_input(*kv_lengths, stream));

  return attention_node(std::move(inputs), c, stream)[0];
}

std::vector<mx::array> attention_node(
    std::vector<mx::array> inputs, const AttentionConfig& config, const mx::Stream& s) {
  const auto& q = inputs[0];
  auto shapes = std::vector<mx::Shape>{q.shape(), {q.shape(0), q.shape(1), q.shape(2)}};
  auto dtypes = std::vector<mx::Dtype>{q.dtype(), mx::float32};
  return mx::array::make_arrays(std::move(shapes), std::move(dtypes),
      std::make_shared<ScaledDotProductAttention>(s, config), std::move(inputs));
}

} // namespace mlx_ext
