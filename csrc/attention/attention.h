// mlx_ext.scaled_dot_product_attention: softmax(scale * q k^T + mask) v with
// the meaning of mx.fast.scaled_dot_product_attention (GQA/MQA, "causal"
// lower-right aligned, bool/additive masks, sinks), plus sliding windows,
// per-sequence key lengths and K/V in mlx-lm's quantized KV-cache format.
// The L x S scores are never materialised.
#pragma once

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlx_ext {

namespace mx = mlx::core;

// The op's name in error messages: "[mlx_ext.scaled_dot_product_attention] ...".
inline constexpr const char* kAttentionOp = "scaled_dot_product_attention";

// k or v: a float array (B, Hkv, S, D), or the (w_q, scales, biases) tuple of
// mlx-lm's QuantizedKVCache, quantized along D.
using KvInput = std::variant<mx::array, std::vector<mx::array>>;
using MaskInput = std::variant<std::string, mx::array>;

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
    mx::StreamOrDevice s = {});

enum class MaskKind : int { none = 0, causal = 1, boolean = 2, additive = 3 };

// Everything about one attention call that is not an array. A GPU kernel
// consumes the same state and the same inputs as the CPU one.
struct AttentionConfig {
  float scale;
  MaskKind mask; // boolean / additive: an input of shape (Bm, Hm, L, S), Bm in {1, B}, Hm in {1, Hq}
  int window; // 0: none; else each query sees keys (p - window, p], p its causal position
  bool has_sinks; // input (Hq,) float32
  bool has_kv_lengths; // input (B,) int32, clamped to [0, S] by the kernels
  int bits; // 0: float K/V; 4 or 8: each of K and V is (codes, scales, biases)
  int group_size;

  bool quantized() const { return bits != 0; }
  bool causal() const { return mask == MaskKind::causal || window > 0; }
  bool operator==(const AttentionConfig& o) const {
    return scale == o.scale && mask == o.mask && window == o.window && has_sinks == o.has_sinks &&
        has_kv_lengths == o.has_kv_lengths && bits == o.bits && group_size == o.group_size;
  }
};

// Positions of the optional inputs after q and the K and V arrays
// (q, k, v, or q, k_q, k_s, k_b, v_q, v_s, v_b), in this order: mask, sinks,
// kv_lengths; -1 when absent.
struct AttentionInputs {
  int k, v, n_kv; // first index of K and of V; arrays per K or V (1 or 3)
  int mask, sinks, kv_lengths, count;
  explicit AttentionInputs(const AttentionConfig& c);
};

// The primitive's node over inputs prepared as the op function prepares them
// (AttentionInputs order): {out, lse}.
std::vector<mx::array> attention_node(
    std::vector<mx::array> inputs, const AttentionConfig& config, const mx::Stream& s);

// Outputs: out (B, Hq, L, D) in q's dtype, and the log-sum-exp of each row's
// logits (B, Hq, L) float32 (sinks included; -inf for a row that sees no key),
// which the backward uses to recompute probabilities without the scores.
class ScaledDotProductAttention : public mx::Primitive {
 public:
  ScaledDotProductAttention(mx::Stream stream, AttentionConfig config)
      : mx::Primitive(stream), config_(config) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  const char* name() const override { return "mlx_ext::ScaledDotProductAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  const AttentionConfig& config() const { return config_; }

 private:
  AttentionConfig config_;
};

// The fused backward: inputs are the forward's, then its lse, delta (B, Hq,
// L) float32 = sum(d_out * out, -1), and d_out, the cotangent of out;
// outputs dq, and dk, dv for float K/V, in q's dtype.
class ScaledDotProductAttentionVjp : public mx::Primitive {
 public:
  ScaledDotProductAttentionVjp(mx::Stream stream, AttentionConfig config)
      : mx::Primitive(stream), config_(config) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  const char* name() const override { return "mlx_ext::ScaledDotProductAttentionVjp"; }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  AttentionConfig config_;
};

} // namespace mlx_ext
