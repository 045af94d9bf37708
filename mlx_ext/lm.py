"""Run any mlx-lm model's quantized layers through mlx_ext, and back.

``patch`` swaps ``mlx.nn.QuantizedLinear`` and ``mlx.nn.QuantizedEmbedding``
(affine mode) for the ``mlx_ext.nn`` layers of the same names. Layers are
matched by *exact* type: subclasses (afm7's ``FusedQuantizedLinear``, ...) have
other semantics and are left alone, like ``QuantizedSwitchLinear`` (no gather
kernel yet) and the non-affine modes. The new layers hold the very same arrays.
"""

from collections import Counter
from dataclasses import dataclass, field

import mlx.nn as nn
from mlx.utils import tree_map_with_path

from . import nn as ext_nn

_TO_MLX_EXT = {
    nn.QuantizedLinear: ext_nn.QuantizedLinear,
    nn.QuantizedEmbedding: ext_nn.QuantizedEmbedding,
    ext_nn.MLXQuantizedSwiGLU: ext_nn.QuantizedSwiGLU,  # the GPT loop's fused gate/up (gpt/fuse.py)
}
_TO_MLX = {new: old for old, new in _TO_MLX_EXT.items()}


@dataclass
class PatchReport:
    """Layer counts by type name: ``replaced`` were swapped; ``left`` are the
    quantized layers (those holding ``scales``) that were not, with their mode
    where it is not affine."""

    replaced: Counter = field(default_factory=Counter)
    left: Counter = field(default_factory=Counter)

    def __str__(self):
        def listing(counts):
            return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"

        return f"replaced: {listing(self.replaced)}; left: {listing(self.left)}"


def patch(model: nn.Module) -> PatchReport:
    """Swap the model's MLX quantized layers for mlx_ext's, in place."""
    return _swap_layers(model, _TO_MLX_EXT)


def unpatch(model: nn.Module) -> PatchReport:
    """Swap mlx_ext's quantized layers back for MLX's, in place."""
    return _swap_layers(model, _TO_MLX)


def _swap_layers(model: nn.Module, swaps: dict) -> PatchReport:
    report = PatchReport()

    def swap(_path, layer):
        new_type = swaps.get(type(layer))
        if new_type is not None and layer.mode == "affine":
            report.replaced[type(layer).__name__] += 1
            return _retyped(layer, new_type)
        if "scales" in layer:
            mode = getattr(layer, "mode", "affine")
            name = type(layer).__name__
            report.left[name if mode == "affine" else f"{name}(mode={mode})"] += 1
        return layer

    leaves = tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    return report


def _retyped(layer: nn.Module, cls: type) -> nn.Module:
    """A frozen `cls` layer holding `layer`'s arrays (not copies) and attributes."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    dict.update(new, layer)
    new.__dict__.update((k, v) for k, v in vars(layer).items() if k != "_no_grad")
    new.freeze()
    return new
