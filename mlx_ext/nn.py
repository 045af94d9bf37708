"""Quantized layers that compute through ``mlx_ext.quantized_matmul``.

They subclass MLX's layers, so they hold the same parameters (``weight``,
``scales``, ``biases``, ``bias``) and attributes (``group_size``, ``bits``,
``mode``), load the same checkpoints and pass mlx-lm's ``isinstance`` checks;
only the matrix product differs. Only ``mode="affine"`` computes (the op
raises ``ValueError`` for other modes).
"""

import mlx.core as mx
import mlx.nn as nn

from ._ext import quantized_matmul


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


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``mlx.nn.QuantizedEmbedding`` whose ``as_linear`` (a tied LM head) runs
    through mlx_ext; row lookups stay MLX's gather + dequantize."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self, x)
