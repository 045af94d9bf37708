"""Fused projections: q/k/v as one quantized product, gate/up as one.

At one decode token a 576-wide product costs mostly per-call time (MLX's
dispatch, the thread pool's hand-off, x's group sums), not bytes, so three
products of the same x cost nearly three times one product of the three
matrices stacked. Quantized rows are independent (each row has its own
scales and biases), so stacking the packed rows (and the biases of a biased
layer) gives exactly the same outputs, in one call.

``fuse_projections`` replaces, in every decoder layer whose projections are
all ``mlx_ext.nn.QuantizedLinear`` of one bits / group size:
- ``q_proj``, ``k_proj``, ``v_proj`` by ``qkv_proj`` (rows: q, then k, then v);
- ``gate_proj``, ``up_proj`` by ``gate_up_proj`` (rows: gate, then up), run by
  ``mlx_ext.nn.QuantizedSwiGLU``: silu(gate) * up in the product's epilogue.
Other layers (float, sparse, mixed quantization) stay as they are.
"""

import mlx.core as mx
import mlx.nn as nn

from .. import nn as ext_nn


def _stackable(layers: list) -> bool:
    first = layers[0]
    return all(
        type(layer) is ext_nn.QuantizedLinear
        and (layer.bits, layer.group_size, layer.mode) == (first.bits, first.group_size, first.mode)
        and ("bias" in layer) == ("bias" in first)
        and layer.weight.dtype == first.weight.dtype
        for layer in layers
    )


def stack_rows(layers: list, cls=ext_nn.QuantizedLinear):
    """One layer of `cls` whose rows are the rows of `layers`, in order."""
    first = layers[0]
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    fused.group_size, fused.bits, fused.mode = first.group_size, first.bits, first.mode
    for name in ("weight", "scales", "biases", "bias"):
        if name in first:
            fused[name] = mx.concatenate([layer[name] for layer in layers], axis=0)
    fused.freeze()
    return fused


def fuse_projections(model) -> int:
    """Fuses in place (see the module's docstring); returns how many groups of
    projections it fused."""
    fused = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        names = ("q_proj", "k_proj", "v_proj")
        if all(n in attn for n in names) and _stackable([attn[n] for n in names]):
            attn.qkv_proj = stack_rows([attn.pop(n) for n in names])
            fused += 1
        names = ("gate_proj", "up_proj")
        if all(n in mlp for n in names) and _stackable([mlp[n] for n in names]):
            mlp.gate_up_proj = stack_rows([mlp.pop(n) for n in names], ext_nn.QuantizedSwiGLU)
            fused += 1
    mx.eval(model.parameters())
    return fused
