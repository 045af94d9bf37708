"""Run any mlx-lm model's quantized layers and attention through mlx_ext, and back.

``patch`` swaps ``mlx.nn.QuantizedLinear`` and ``mlx.nn.QuantizedEmbedding``
(of the modes each computes: ``MODES`` of the ``mlx_ext.nn`` layer) for the
``mlx_ext.nn`` layers of the same names, and, once mlx-lm is loaded, mlx-lm's
``QuantizedSwitchLinear`` (mixture-of-experts layers, affine mode) for
``mlx_ext.nn.QuantizedSwitchLinear``. Layers are matched by *exact* type:
subclasses (afm7's ``FusedQuantizedLinear``, ...) have other semantics and are
left alone. The new layers hold the very same arrays. MLX's quantized
sharded layers (``QuantizedAllToShardedLinear`` / ``QuantizedShardedToAllLinear``,
which mlx-lm's ``model.shard(group)`` builds from any non-``nn.Linear`` layer,
ours included) become mlx_ext's of the same names: patch after sharding.

It also routes the model's attention through ``mlx_ext.scaled_dot_product_attention``
(lm_attention.py says how).
"""

import sys
from collections import Counter
from dataclasses import dataclass, field

import mlx.nn as nn
from mlx.utils import tree_map_with_path

from . import lm_attention
from . import nn as ext_nn

_TO_MLX_EXT = {
    nn.QuantizedLinear: ext_nn.QuantizedLinear,
    nn.QuantizedEmbedding: ext_nn.QuantizedEmbedding,
    ext_nn.MLXQuantizedSwiGLU: ext_nn.QuantizedSwiGLU,  # the GPT loop's fused gate/up (gpt/fuse.py)
    # tensor parallelism: what model.shard(group) (mlx-lm) / mlx_ext.shard build
    nn.QuantizedAllToShardedLinear: ext_nn.QuantizedAllToShardedLinear,
    nn.QuantizedShardedToAllLinear: ext_nn.QuantizedShardedToAllLinear,
    ext_nn.MLXQuantizedAllToShardedSwiGLU: ext_nn.QuantizedAllToShardedSwiGLU,
}
_TO_MLX = {new: old for old, new in _TO_MLX_EXT.items()}


def _mlx_lm_swaps() -> dict:
    """mlx-lm's layers to swap, once mlx-lm is loaded (an optional
    dependency: a model holding them has imported their module)."""
    if "mlx_lm.models.switch_layers" not in sys.modules:
        return {}
    return {sys.modules["mlx_lm.models.switch_layers"].QuantizedSwitchLinear: ext_nn.QuantizedSwitchLinear}


@dataclass
class PatchReport:
    """Module counts by type name: ``replaced`` are the quantized layers
    swapped; ``left`` the quantized layers (those holding ``scales``) that were
    not, with their mode where it is not affine; ``fused`` the mixture-of-experts
    MLPs (mlx-lm ``SwitchGLU``) whose gate, up and SwiGLU now run as one
    ``mlx_ext.gather_quantized_swiglu`` (by ``unpatch``: unfused again);
    ``attention`` the attention modules whose mlx-lm
    ``scaled_dot_product_attention`` calls (plain and quantized KV caches) now
    run through mlx_ext (by ``unpatch``: back through MLX)."""

    replaced: Counter = field(default_factory=Counter)
    left: Counter = field(default_factory=Counter)
    attention: Counter = field(default_factory=Counter)
    fused: Counter = field(default_factory=Counter)

    def __str__(self):
        def listing(counts):
            return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"

        # `fused` is shown where a model has any (mixture-of-experts models).
        fused = f"; fused: {listing(self.fused)}" if self.fused else ""
        return (
            f"replaced: {listing(self.replaced)}; left: {listing(self.left)}{fused}; "
            f"attention: {listing(self.attention)}"
        )


def patch(model: nn.Module) -> PatchReport:
    """Swap the model's MLX quantized layers for mlx_ext's, fuse its
    mixture-of-experts SwiGLUs and route its attention through mlx_ext, in
    place."""
    report = _swap_layers(model, {**_TO_MLX_EXT, **_mlx_lm_swaps()})
    report.fused = _fuse_switch_glus(model)
    report.attention = lm_attention.route(model)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Swap mlx_ext's quantized layers back for MLX's and its attention back
    to MLX's, in place."""
    report = _swap_layers(model, {**_TO_MLX, **{new: old for old, new in _mlx_lm_swaps().items()}})
    report.fused = _unfuse_switch_glus(model)
    report.attention = lm_attention.unroute(model)
    return report


def _fuse_switch_glus(model: nn.Module) -> Counter:
    """mlx-lm SwitchGLU modules that ``mlx_ext.nn.SwitchGLU.fusable`` accepts
    take that class (the same modules and arrays; ``__class__`` only)."""
    fused = Counter()
    if "mlx_lm.models.switch_layers" not in sys.modules:
        return fused
    for module in model.modules():
        if ext_nn.SwitchGLU.fusable(module):
            module.__class__ = ext_nn.SwitchGLU
            fused["SwitchGLU"] += 1
    return fused


def _unfuse_switch_glus(model: nn.Module) -> Counter:
    unfused = Counter()
    if "mlx_lm.models.switch_layers" not in sys.modules:
        return unfused
    for module in model.modules():
        if type(module) is ext_nn.SwitchGLU:
            module.__class__ = sys.modules["mlx_lm.models.switch_layers"].SwitchGLU
            unfused["SwitchGLU"] += 1
    return unfused


def _swap_layers(model: nn.Module, swaps: dict) -> PatchReport:
    report = PatchReport()

    def swap(_path, layer):
        new_type = swaps.get(type(layer))
        if new_type is not None and layer.mode in getattr(new_type, "MODES", ext_nn.MODES):
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
