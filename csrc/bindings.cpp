// Python bindings: one per public function, with its docstring; nothing else.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention/attention.h"
#include "common/cpu/isa.h"
#include "common/errors.h"
#include "common/gpu.h"
#include "common/cpu/thread_pool.h"
#include "gather_qmm/gather_qmm.h"
#include "quantized_matmul/quantized_matmul.h"
#include "quantized_swiglu/quantized_swiglu.h"
#include "rms_norm/rms_norm.h"
#include "sparse_matmul/sparse_matmul.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "mlx_ext native operators (import through the mlx_ext package)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const mlx_ext::type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def(
      "quantized_matmul",
      &mlx_ext::quantized_matmul,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a = nb::none(),
      "transpose"_a = true,
      "group_size"_a = nb::none(),
      "bits"_a = nb::none(),
      "mode"_a = "affine",
      nb::kw_only(),
      "bias"_a = nb::none(),
      "stream"_a = nb::none(),
      nb::sig(
          "def quantized_matmul(x: mlx.core.array, w: mlx.core.array, scales: mlx.core.array, "
          "biases: mlx.core.array | None = None, transpose: bool = True, "
          "group_size: int | None = None, bits: int | None = None, mode: str = 'affine', *, "
          "bias: mlx.core.array | None = None, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array"),
      R"(Matrix multiplication with a quantized matrix, fused with an optional bias.

Means exactly what ``mx.quantized_matmul`` means, in every mode (``"affine"``,
``"mxfp4"``, ``"nvfp4"``, ``"mxfp8"``), and reads weights packed by
``mx.quantize``: with ``transpose=True`` (the default) ``x @ dequantize(w).T``,
else ``x @ dequantize(w)``, then ``+ bias``.

Args:
    x (array): input of shape ``(..., K)``; float32, float16 or bfloat16.
    w (array): uint32 packed weights from ``mx.quantize``, ``(..., rows,
        packed)``; leading batch dimensions broadcast against x's.
    scales (array): per-group scales, shape ``(..., rows, cols // group_size)``;
        uint8 in the fp modes.
    biases (array): per-group biases, same shape and dtype as ``scales``
        (affine only; None in the fp modes).
    transpose (bool): multiply by the transpose of the dequantized ``w``.
    group_size (int, optional): affine 32, 64 or 128; None takes the mode's
        (affine 64, mxfp4 32, nvfp4 16, mxfp8 32).
    bits (int, optional): affine 2, 3, 4, 5, 6 or 8; None takes the mode's
        (affine 4, mxfp4 4, nvfp4 4, mxfp8 8).
    mode (str): ``"affine"``, ``"mxfp4"``, ``"nvfp4"`` or ``"mxfp8"``.
    bias (array, optional): ``(N,)`` added to every output row in the kernel.
    stream: the stream or device to run on.

Returns:
    array: shape ``(..., N)``; dtype promoted from x, scales (and bias).
    Accumulation is float32 for every dtype.)");

  m.def(
      "quantized_swiglu",
      &mlx_ext::quantized_swiglu,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "group_size"_a = nb::none(),
      "bits"_a = nb::none(),
      "stream"_a = nb::none(),
      nb::sig(
          "def quantized_swiglu(x: mlx.core.array, w: mlx.core.array, scales: mlx.core.array, "
          "biases: mlx.core.array, *, group_size: int | None = None, bits: int | None = None, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array"),
      R"(SwiGLU's gate and up projections as one quantized product, the activation in its epilogue.

``w`` stacks the gate projection's rows over the up projection's, ``(2 I, K)``
packed by ``mx.quantize`` (affine); the result is
``silu(x @ gate.T) * (x @ up.T)`` with ``silu(g) = g * sigmoid(g)``: what
``nn.silu(quantized_matmul(x, w_gate, ...)) * quantized_matmul(x, w_up, ...)``
gives, in one call. CPU only for now.

Args:
    x (array): ``(..., K)``; float32, float16 or bfloat16.
    w (array): uint32 packed weights, ``(2 I, K * bits / 32)``.
    scales, biases (array): ``(2 I, K // group_size)``, one float dtype.
    group_size (int, optional): 32, 64 or 128 (default 64).
    bits (int, optional): 2, 3, 4, 5, 6 or 8 (default 4).
    stream: the stream or device to run on.

Returns:
    array: ``(..., I)``; dtype promoted from x and scales. The product
    accumulates in float32 and the epilogue runs in float32; differentiable
    with respect to x (vjp, jvp) and vmap over x.)");

  m.def(
      "rms_norm",
      &mlx_ext::rms_norm,
      "x"_a,
      "weight"_a.none(),
      "eps"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      nb::sig(
          "def rms_norm(x: mlx.core.array, weight: mlx.core.array | None, eps: float, *, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array"),
      R"(Root-mean-square normalization over the last axis, as ``mx.fast.rms_norm``.

``x * rsqrt(mean(x ** 2, axis=-1) + eps) * weight``, computed in float32 and
returned in x's dtype, as one CPU primitive (MLX's CPU backend runs
``mx.fast.rms_norm`` as a graph of several). CPU only for now.

Args:
    x (array): ``(..., D)``; float32, float16 or bfloat16.
    weight (array or None): ``(D,)``, cast to x's dtype; None: no scaling.
    eps (float): added to the mean square; >= 0.
    stream: the stream or device to run on.

Returns:
    array: x's shape and dtype. Differentiable (vjp, jvp) in x and weight;
    vmap over x.)");

  m.def(
      "scaled_dot_product_attention",
      &mlx_ext::scaled_dot_product_attention,
      "q"_a,
      "k"_a,
      "v"_a,
      nb::kw_only(),
      "scale"_a,
      "mask"_a = nb::none(),
      "sinks"_a = nb::none(),
      "window"_a = nb::none(),
      "kv_lengths"_a = nb::none(),
      "group_size"_a = 64,
      "bits"_a = nb::none(),
      "stream"_a = nb::none(),
      nb::sig(
          "def scaled_dot_product_attention(q: mlx.core.array, "
          "k: mlx.core.array | tuple[mlx.core.array, mlx.core.array, mlx.core.array], "
          "v: mlx.core.array | tuple[mlx.core.array, mlx.core.array, mlx.core.array], *, "
          "scale: float, mask: str | mlx.core.array | None = None, "
          "sinks: mlx.core.array | None = None, window: int | None = None, "
          "kv_lengths: mlx.core.array | None = None, group_size: int = 64, "
          "bits: int | None = None, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array"),
      R"(Fused scaled dot-product attention: ``softmax(scale * q @ k.T + mask) @ v``.

Means what ``mx.fast.scaled_dot_product_attention`` means for the arguments it
shares with it, and never materialises the ``L x S`` scores.

Args:
    q (array): ``(B, Hq, L, D)``; float32, float16 or bfloat16; D a multiple
        of 8 up to 256.
    k, v (array or tuple): ``(B, Hkv, S, D)`` with ``Hq % Hkv == 0`` (GQA,
        MQA), cast to q's dtype; or both the ``(w_q, scales, biases)`` tuples
        of mlx-lm's ``QuantizedKVCache`` (affine, quantized along D), read as
        packed codes.
    scale (float): multiplies ``q @ k.T``.
    mask: ``None``; ``"causal"`` (lower-right aligned: query i sees keys
        ``j <= i + S - L``; needs ``L <= S``); a bool array (True = attend) or
        an additive float array broadcastable to ``(B, Hq, L, S)``.
    sinks (array, optional): ``(Hq,)`` logits that join each row's softmax
        denominator only.
    window (int, optional): sliding window: each query sees at most the last
        ``window`` keys up to its causal position (implies causal).
    kv_lengths (array, optional): int32 ``(B,)``, the valid keys of each
        sequence of a right-padded cache; the causal position and window are
        then aligned to that length. Values outside ``[0, S]`` are clamped.
    group_size (int): of quantized K/V: 32, 64 or 128.
    bits (int, optional): of quantized K/V, 4 or 8 (default: from the packed
        width and D).
    stream: the stream or device to run on.

Returns:
    array: ``(B, Hq, L, D)`` in q's dtype. Softmax and accumulation in
    float32. A row that sees no key (all masked, no sink) is 0.)");

  m.def(
      "sparse_matmul_arrays",
      &mlx_ext::sparse_matmul,
      "x"_a,
      "format"_a,
      "arrays"_a,
      "shape"_a,
      nb::kw_only(),
      "block"_a = std::pair<int, int>{1, 1},
      "nm"_a = std::pair<int, int>{0, 0},
      "bits"_a = 0,
      "group_size"_a = 0,
      "bias"_a = nb::none(),
      "transpose"_a = true,
      "stream"_a = nb::none(),
      nb::sig(
          "def sparse_matmul_arrays(x: mlx.core.array, format: str, "
          "arrays: list[mlx.core.array], shape: tuple[int, int], *, "
          "block: tuple[int, int] = (1, 1), nm: tuple[int, int] = (0, 0), bits: int = 0, "
          "group_size: int = 0, bias: mlx.core.array | None = None, transpose: bool = True, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array"),
      R"(Matrix multiplication with a sparse matrix given by its arrays.

The arrays of ``mlx_ext.sparse``'s containers, which validate the pattern;
call ``mlx_ext.sparse_matmul(x, ws)`` instead. ``x @ W.T`` (``transpose=True``)
or ``x @ W``, then ``+ bias``, for W of ``shape`` ``(N, K)``.

Args:
    x (array): input of shape ``(..., K)`` (``(..., N)`` when not transposed);
        float32, float16 or bfloat16.
    format (str): ``"csr"``, ``"bitmask"``, ``"bsr"`` or ``"nm"``.
    arrays (list[array]): the format's arrays, values first.
    shape (tuple[int, int]): ``(N, K)``.
    block (tuple[int, int]): BSR block shape.
    nm (tuple[int, int]): ``(n, m)`` of the N:M format.
    bits (int): 4 or 8 for N:M values quantized with MLX's affine mode, else 0.
    group_size (int): the quantization group size along the compressed rows.
    bias (array, optional): added to every output row.
    transpose (bool): multiply by W's transpose.
    stream: the stream or device to run on.

Returns:
    array: dtype promoted from x, the values (or scales) and bias; accumulation
    is float32.)");

  m.def("get_num_threads", &mlx_ext::cpu::num_threads,
      "Number of threads the CPU kernels use (the caller included).");
  m.def("set_num_threads", &mlx_ext::cpu::set_num_threads, "n"_a,
      "Set the number of CPU kernel threads (default: cores, or MLX_EXT_NUM_THREADS).");
  m.def("get_cpu_isa", [] { return mlx_ext::cpu::isa_name(mlx_ext::cpu::current_isa()); },
      "Instruction set the CPU kernels use now: 'avx512', 'avx2', 'neon' or 'scalar'.");
  m.def("available_cpu_isas", &mlx_ext::cpu::available_isas,
      "Instruction sets compiled in and supported by this processor, best first.");
  m.def("set_cpu_isa", &mlx_ext::cpu::set_cpu_isa, "isa"_a,
      "Force the CPU kernels' instruction set ('auto' restores the best; also MLX_EXT_CPU_ISA).");
  m.def("gpu_kernels", [] {
        return std::map<std::string, bool>{
            {"quantized_matmul", mlx_ext::has_gpu_kernels<mlx_ext::QuantizedMatmul>()},
            {"scaled_dot_product_attention",
             mlx_ext::has_gpu_kernels<mlx_ext::ScaledDotProductAttention>()},
            {"sparse_matmul", mlx_ext::has_gpu_kernels<mlx_ext::SparseMatmul>()},
            {"gather_qmm", mlx_ext::has_gpu_kernels<mlx_ext::GatherQmm>()},
        };
      },
      "Which ops run on MLX's GPU stream in this build (the others raise there).");

  m.def(
      "gather_qmm",
      &mlx_ext::gather_qmm,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a = nb::none(),
      "lhs_indices"_a = nb::none(),
      "rhs_indices"_a = nb::none(),
      nb::kw_only(),
      "transpose"_a = true,
      "group_size"_a = nb::none(),
      "bits"_a = nb::none(),
      "mode"_a = "affine",
      "sorted_indices"_a = false,
      "bias"_a = nb::none(),
      "stream"_a = nb::none(),
      nb::sig(
          "def gather_qmm(x: mlx.core.array, w: mlx.core.array, scales: mlx.core.array, "
          "biases: mlx.core.array | None = None, lhs_indices: mlx.core.array | None = None, "
          "rhs_indices: mlx.core.array | None = None, *, transpose: bool = True, "
          "group_size: int | None = None, bits: int | None = None, mode: str = 'affine', "
          "sorted_indices: bool = False, bias: mlx.core.array | None = None, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array"),
      R"(Quantized matrix multiplication with matrix-level gather (mixture of experts).

Means what ``mx.gather_qmm`` means for ``mode="affine"``: ``lhs_indices`` and
``rhs_indices`` hold flat indices into the batch dimensions of ``x`` and ``w``;
they broadcast together, and each of their entries ``p`` gives the matrix
``x[lhs[p]] @ dequantize(w[rhs[p]]).T`` (``transpose=True``), plus
``bias[rhs[p]]``. A missing index array means every matrix of that batch in
order. The CPU kernel groups the pairs by matrix of ``w`` whether or not they
are sorted, so there ``sorted_indices`` changes nothing; on Metal it picks a
kernel that tiles many one-row pairs grouped by expert (correct for any
order, fast only when sorted).

Args:
    x (array): ``(..., M, K)``; float32, float16 or bfloat16.
    w (array): uint32 packed weights from ``mx.quantize``, ``(..., N, K*bits/32)``.
    scales (array): per-group scales, ``(..., N, K // group_size)``.
    biases (array): per-group biases, same shape and dtype as ``scales``.
    lhs_indices (array, optional): integer indices into the batch of ``x``.
    rhs_indices (array, optional): integer indices into the batch of ``w``.
    transpose (bool): multiply by the transpose of the dequantized matrices.
    group_size (int, optional): 32, 64 or 128; None takes the mode's default, 64.
    bits (int, optional): 2, 3, 4, 5, 6 or 8; None takes the mode's default, 4.
    mode (str): only ``"affine"``.
    sorted_indices (bool): a hint that ``rhs_indices`` is sorted.
    bias (array, optional): ``(N,)`` or one row per matrix of ``w``
        (``(..., N)``), added in the kernel.
    stream: the stream or device to run on (CPU only in this build).

Indices known when the op is called (evaluated arrays) must lie in range, else
ValueError; indices known only at run time that fall out of range read nothing
and give NaN in their output block.

Returns:
    array: ``broadcast(lhs_indices, rhs_indices).shape + (M, N)``; dtype
    promoted from x, scales (and bias). Accumulation is float32.)");

  m.def(
      "gather_quantized_swiglu",
      &mlx_ext::gather_quantized_swiglu,
      "x"_a,
      "w_gate"_a,
      "scales_gate"_a,
      "biases_gate"_a,
      "w_up"_a,
      "scales_up"_a,
      "biases_up"_a,
      "lhs_indices"_a = nb::none(),
      "rhs_indices"_a = nb::none(),
      nb::kw_only(),
      "group_size"_a = nb::none(),
      "bits"_a = nb::none(),
      "mode"_a = "affine",
      "sorted_indices"_a = false,
      "stream"_a = nb::none(),
      nb::sig(
          "def gather_quantized_swiglu(x: mlx.core.array, w_gate: mlx.core.array, "
          "scales_gate: mlx.core.array, biases_gate: mlx.core.array | None, w_up: mlx.core.array, "
          "scales_up: mlx.core.array, biases_up: mlx.core.array | None, "
          "lhs_indices: mlx.core.array | None = None, rhs_indices: mlx.core.array | None = None, *, "
          "group_size: int | None = None, bits: int | None = None, mode: str = 'affine', "
          "sorted_indices: bool = False, stream: mlx.core.Stream | mlx.core.Device | None = None) "
          "-> mlx.core.array"),
      R"(A SwiGLU over gathered experts: the gate and up projections of a mixture
of experts and the activation, in one primitive.

Computes ``silu(g) * u`` with ``g = gather_qmm(x, w_gate, scales_gate,
biases_gate, lhs_indices, rhs_indices)`` and ``u`` the same with the up
projections (``transpose=True``): mlx-lm's ``SwitchGLU`` before its down
projection. x is gathered and grouped by expert once for both products, and
the activation runs in float32 on their float32-accumulated results.

Args:
    x (array): ``(..., M, K)``; float32, float16 or bfloat16.
    w_gate, scales_gate, biases_gate (array): the gate projections, as for
        ``gather_qmm`` (``(..., N, K*bits/32)`` and ``(..., N, K // group_size)``).
    w_up, scales_up, biases_up (array): the up projections, the same shapes.
    lhs_indices, rhs_indices (array, optional): as for ``gather_qmm``.
    group_size, bits, mode, sorted_indices: as for ``gather_qmm`` (affine).
    stream: the stream or device to run on (CPU only in this build).

Returns:
    array: ``broadcast(lhs_indices, rhs_indices).shape + (M, N)``. Its vjp is
    with respect to x.)");
}
