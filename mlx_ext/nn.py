"""Quantized layers that compute through ``mlx_ext.quantized_matmul``, and
``SparseLinear`` through ``mlx_ext.sparse_matmul``.

They subclass MLX's layers, so they hold the same parameters (``weight``,
``scales``, ``biases``, ``bias``) and attributes (``group_size``, ``bits``,
``mode``), load the same checkpoints and pass mlx-lm's ``isinstance`` checks;
only the matrix product differs, in every mode (affine, mxfp4, nvfp4, mxfp8).
"""

import mlx.core as mx
import mlx.nn as nn

from . import sparse
from ._ext import quantized_matmul, quantized_swiglu, rms_norm


MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")


def computes(mode: str) -> bool:
    """Whether ``mlx_ext.quantized_matmul`` computes ``mode`` (every backend
    has kernels for each of MODES)."""
    return mode in MODES


def _quantized_matmul(layer, x: mx.array, bias=None) -> mx.array:
    """x @ dequantize(layer.weight).T (+ bias) through mlx_ext."""
    return quantized_matmul(
        x,
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        bias=bias,
    )


class QuantizedLinear(nn.QuantizedLinear):
    """``mlx.nn.QuantizedLinear`` with the bias added inside the kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self, x, self.get("bias"))


class QuantizedSwiGLU(QuantizedLinear):
    """A quantized linear layer whose rows are a gate projection and then an
    up projection of one width I (its weight is (2 I, K)); returns
    silu(x @ gate.T) * (x @ up.T), shape (..., I)."""

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self or self.mode != "affine" or mx.default_device() != mx.cpu:
            gate, up = mx.split(_quantized_matmul(self, x, self.get("bias")), 2, axis=-1)
            return nn.silu(gate) * up
        return quantized_swiglu(x, self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)


class MLXQuantizedSwiGLU(nn.QuantizedLinear):
    """``QuantizedSwiGLU`` through MLX's own quantized matmul: what
    ``mlx_ext.unpatch`` swaps it for (and ``patch`` back)."""

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(super().__call__(x), 2, axis=-1)
        return nn.silu(gate) * up


class RMSNorm(nn.RMSNorm):
    """``mlx.nn.RMSNorm`` through ``mlx_ext.rms_norm`` on the CPU (one
    primitive where MLX's CPU backend runs a graph of several); MLX's own
    elsewhere."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        return rms_norm(x, self["weight"], self.eps)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``mlx.nn.QuantizedEmbedding`` whose ``as_linear`` (a tied LM head) runs
    through mlx_ext; row lookups stay MLX's gather + dequantize."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self, x)


class SparseLinear(nn.Module):
    """A Linear layer whose weight (N, K) is a container of ``mlx_ext.sparse``
    (``CSR``, ``Bitmask``, ``BSR`` or ``NM``), computed by
    ``mlx_ext.sparse_matmul`` with the bias added in the kernel."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias

    @property
    def output_dims(self) -> int:
        return self.weight.shape[0]

    @property
    def input_dims(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: mx.array) -> mx.array:
        return sparse.sparse_matmul(x, self.weight, self.get("bias"))

    @classmethod
    def from_linear(cls, layer, *, density=None, pattern=None, format=None, method="magnitude",
                    activation_norms=None, bits=None, group_size=None, block=32):
        """Prune an ``nn.Linear`` or ``nn.QuantizedLinear`` (dequantized) and
        store it sparse.

        Args:
            density (float): the fraction of each row kept, or
            pattern (str): ``"n:m"`` along K (2:4, 4:8).
            format (str): ``"nm"`` for a pattern; for a density ``"bitmask"``
                (the default from 30%), ``"csr"`` (the default below) or ``"bsr"``.
            method (str): ``"magnitude"`` or ``"wanda"`` (needs ``activation_norms``, (K,)).
            bits (int): 4 or 8 to quantize N:M values, 0 to keep them float; by
                default a quantized layer keeps its bits when they are 4 or 8.
            group_size (int): of the quantized N:M values (the layer's, else 64).
            block (int): BSR block size.
        """
        quantized = isinstance(layer, nn.QuantizedLinear)
        if quantized:
            w = mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"),
                              layer.group_size, layer.bits, mode=layer.mode)
        elif isinstance(layer, nn.Linear):
            w = layer["weight"]
        else:
            raise TypeError(f"[mlx_ext.nn.SparseLinear] from_linear needs an nn.Linear or "
                            f"nn.QuantizedLinear, got {type(layer).__name__}")
        mask = sparse.prune(w, density=density, pattern=pattern, method=method,
                            activation_norms=activation_norms)
        if format is None:
            format = "nm" if pattern is not None else "bitmask" if density >= 0.3 else "csr"
        if format == "nm":
            if pattern is None:
                raise ValueError("[mlx_ext.nn.SparseLinear] format='nm' needs pattern='n:m'")
            n, m = (int(p) for p in pattern.split(":"))
            if bits is None and quantized and layer.bits in (4, 8) and layer.mode == "affine":
                bits = layer.bits
            bits = bits or None  # 0: float values, even from a quantized layer
            kc = w.shape[1] // m * n
            if group_size is None:
                group_size = layer.group_size if quantized and kc % layer.group_size == 0 else 64
            weight = sparse.NM.from_dense(w, n, m, mask=mask, bits=bits, group_size=group_size)
        elif format == "bsr":
            weight = sparse.BSR.from_dense(w, block=block, mask=mask)
        elif format in ("csr", "bitmask"):
            weight = (sparse.CSR if format == "csr" else sparse.Bitmask).from_dense(w, mask=mask)
        else:
            raise ValueError(f"[mlx_ext.nn.SparseLinear] format must be 'csr', 'bitmask', 'bsr' "
                             f"or 'nm', got {format!r}")
        return cls(weight, layer.get("bias"))


def _quantized_switch_linear() -> type:
    """mlx-lm's ``QuantizedSwitchLinear`` (mixture-of-experts layers) with its
    gathered product, and the per-expert bias, through ``mlx_ext.gather_qmm``.
    Built on first use: mlx-lm is an optional dependency."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear as _MlxLmQuantizedSwitchLinear

    from ._ext import gather_qmm

    class QuantizedSwitchLinear(_MlxLmQuantizedSwitchLinear):
        """mlx-lm's ``QuantizedSwitchLinear``: x (..., 1, K) routed to the
        experts in ``indices`` (..., top_k), output (..., top_k, 1, N)."""

        MODES = ("affine",)  # gather_qmm's (the fp modes raise there)

        def __call__(self, x, indices, sorted_indices=False):
            return gather_qmm(
                x,
                self["weight"],
                self["scales"],
                self.get("biases"),
                rhs_indices=indices,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
                sorted_indices=sorted_indices,
                bias=self.get("bias"),
            )

    QuantizedSwitchLinear.__module__ = __name__
    return QuantizedSwitchLinear


def _switch_glu() -> type:
    """mlx-lm's ``SwitchGLU`` (a mixture of experts' SwiGLU MLP) with its
    gate and up projections and the activation as one
    ``mlx_ext.gather_quantized_swiglu``. Built on first use, like
    ``QuantizedSwitchLinear``."""
    from mlx_lm.models import switch_layers

    from ._ext import gather_quantized_swiglu

    class SwitchGLU(switch_layers.SwitchGLU):
        """x (..., K) routed to the experts in ``indices`` (..., top_k), output
        (..., top_k, K), as mlx-lm's ``SwitchGLU``: same modules and arrays
        (``gate_proj``, ``up_proj``, ``down_proj``), one primitive where mlx-lm
        runs two gathers and an elementwise op. ``mlx_ext.patch`` gives this
        class to the modules ``fusable`` accepts; ``unpatch`` takes it back."""

        @staticmethod
        def fusable(module) -> bool:
            """mlx-lm's SwitchGLU (exactly) whose activation is mlx-lm's SwiGLU
            and whose gate and up projections are ``mlx_ext.nn.QuantizedSwitchLinear``
            layers of one affine quantization, without bias."""
            if type(module) is not switch_layers.SwitchGLU or type(module.activation) is not switch_layers.SwiGLU:
                return False
            gate, up = module.gate_proj, module.up_proj
            ours = QuantizedSwitchLinear  # noqa: F821 - this module's lazily built class
            return (type(gate) is ours and type(up) is ours and gate.mode == up.mode == "affine"
                    and (gate.bits, gate.group_size) == (up.bits, up.group_size)
                    and "bias" not in gate and "bias" not in up
                    and gate["weight"].shape == up["weight"].shape)

        def __call__(self, x, indices):
            x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, K): one row per (token, expert) pair
            indices = mx.stop_gradient(indices)
            # mlx-lm's choice: from 64 pairs on, rows are sorted by expert (and
            # unsorted after the down projection).
            sort = indices.size >= 64
            idx, inverse = indices, None
            if sort:
                x, idx, inverse = switch_layers._gather_sort(x, indices)
            gate, up = self.gate_proj, self.up_proj
            hidden = gather_quantized_swiglu(
                x, gate["weight"], gate["scales"], gate["biases"], up["weight"], up["scales"], up["biases"],
                rhs_indices=idx, group_size=gate.group_size, bits=gate.bits, mode=gate.mode,
                sorted_indices=sort)
            out = self.down_proj(hidden, idx, sorted_indices=sort)
            if sort:
                out = switch_layers._scatter_unsort(out, inverse, indices.shape)
            return out.squeeze(-2)

    SwitchGLU.__module__ = __name__
    return SwitchGLU


_LAZY = {"QuantizedSwitchLinear": _quantized_switch_linear, "SwitchGLU": _switch_glu}


def __getattr__(name):
    if name in _LAZY:
        cls = globals()[name] = _LAZY[name]()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- Tensor parallelism (mx.distributed) -----------------------------------
# MLX's quantized sharded layers hold a rank's slice of a QuantizedLinear:
# all-to-sharded keeps output rows [r*N_out/n, (r+1)*N_out/n) of weight,
# scales, biases and bias (each rank computes its slice of the output, from
# the whole x); sharded-to-all keeps input columns (packed weight words and
# their groups' scales / biases; the bias whole): each rank multiplies its
# slice of x and the partial products are summed by one all_sum. These
# subclasses keep MLX's parameters, attributes (``group``, ``group_size``,
# ``bits``, ``mode``), constructors and collectives; only the product runs
# through ``mlx_ext.quantized_matmul``. ``from_quantized_linear`` (MLX's, on
# these classes) shards a whole ``QuantizedLinear``; ``mlx_ext.patch`` retypes
# MLX's own sharded layers after ``model.shard(group)``.


class QuantizedAllToShardedLinear(nn.QuantizedAllToShardedLinear):
    """``mlx.nn.QuantizedAllToShardedLinear`` through mlx_ext: no collective
    forward; backward, x's gradient summed over the group (MLX's
    ``sum_gradients``), since every rank's output slice depends on all of x."""

    def __call__(self, x: mx.array) -> mx.array:
        x = sum_gradients(self.group)(x)
        return _quantized_matmul(self, x, self.get("bias"))


class QuantizedShardedToAllLinear(nn.QuantizedShardedToAllLinear):
    """``mlx.nn.QuantizedShardedToAllLinear`` through mlx_ext: the partial
    products summed by ``mx.distributed.all_sum`` (every rank then holds the
    whole output), the bias added once, after the sum, as MLX does."""

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.distributed.all_sum(_quantized_matmul(self, x), group=self.group)
        return x + self["bias"] if "bias" in self else x


class SparseAllToShardedLinear(SparseLinear):
    """A ``SparseLinear`` holding a rank's rows of W (``mlx_ext.sparse.submatrix``)
    and of the bias: MLX's all-to-sharded collectives (no forward collective;
    x's gradient summed over the group), the product through ``sparse_matmul``."""

    def __init__(self, weight, bias=None, group=None):
        super().__init__(weight, bias)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return sparse.sparse_matmul(sum_gradients(self.group)(x), self.weight, self.get("bias"))


class SparseShardedToAllLinear(SparseLinear):
    """A ``SparseLinear`` holding a rank's input columns of W: the partial
    products summed by one ``all_sum``, the (whole) bias added once after it."""

    def __init__(self, weight, bias=None, group=None):
        super().__init__(weight, bias)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(sparse.sparse_matmul(x, self.weight), group=self.group)
        return y + self["bias"] if "bias" in self else y


class QuantizedAllToShardedSwiGLU(QuantizedAllToShardedLinear):
    """The GPT loop's fused gate/up layer (``QuantizedSwiGLU``) sharded
    all-to-sharded with two segments: a rank holds gate rows [r*I/n,
    (r+1)*I/n) and then the same up rows, so its output is its slice of the
    activation, as the down projection's (sharded-to-all) input expects."""

    def __call__(self, x: mx.array) -> mx.array:
        return QuantizedSwiGLU.__call__(self, sum_gradients(self.group)(x))


class MLXQuantizedAllToShardedSwiGLU(nn.QuantizedAllToShardedLinear):
    """``QuantizedAllToShardedSwiGLU`` through MLX's own layer (what
    ``mlx_ext.unpatch`` swaps it for)."""

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(super().__call__(x), 2, axis=-1)
        return nn.silu(gate) * up


def sum_gradients(group):
    """MLX's ``sum_gradients`` (the identity forward, an all_sum of the
    cotangent backward; the identity for a group of one)."""
    from mlx.nn.layers.distributed import sum_gradients as mlx_sum_gradients

    return mlx_sum_gradients(group)
