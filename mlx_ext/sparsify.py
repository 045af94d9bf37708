"""Prune a model's Linear layers in place: ``sparsify`` swaps each
``nn.Linear`` / ``nn.QuantizedLinear`` (and mlx_ext's ``QuantizedLinear``) for
an ``mlx_ext.nn.SparseLinear`` holding its pruned weight.

With ``method="wanda"`` the score of a weight is |w| times the L2 norm of its
input column over a calibration batch (Sun et al., "A Simple and Effective
Pruning Approach for LLMs"); the norms are collected in one forward pass of
the dense model (one-shot, not layer after layer).
"""

from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path, tree_unflatten

from . import nn as ext_nn

_PRUNABLE = (nn.Linear, nn.QuantizedLinear, ext_nn.QuantizedLinear)


@dataclass
class SparsifyReport:
    """Layer counts by type name: ``replaced`` were pruned and swapped;
    ``left`` are the Linear layers kept dense (skipped by name). Bytes of the
    weights of the replaced layers before and after."""

    replaced: Counter = field(default_factory=Counter)
    left: Counter = field(default_factory=Counter)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self):
        def listing(counts):
            return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"

        return (f"replaced: {listing(self.replaced)}; left: {listing(self.left)}; "
                f"weights {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB")


class _NormRecorder(nn.Module):
    """Passes x through `layer`, accumulating the sum of squares of each input column."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.sum_sq = None

    def __call__(self, x):
        cols = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        s = mx.sum(cols * cols, axis=0)
        self.sum_sq = s if self.sum_sq is None else self.sum_sq + s
        return self.layer(x)


def _run_calibration(model, calibration):
    if callable(calibration):
        return calibration(model)
    from .gpt import Model as GptModel

    if isinstance(model, GptModel):
        cache = model.make_cache()
        cache.reserve(*calibration.shape)
        return model(calibration, cache)
    return model(calibration)


def _weight_bytes(layer) -> int:
    return sum(v.nbytes for k, v in layer.items() if k in ("weight", "scales", "biases"))


def sparsify(model: nn.Module, *, pattern=None, density=None, method="magnitude",
             calibration=None, format=None, bits=None, skip=("lm_head",), **layer_kwargs) -> SparsifyReport:
    """Prune every Linear layer of `model` (but those whose path contains one
    of `skip`) to `pattern` ("2:4", "4:8") or `density`, in place.

    Args:
        method: ``"magnitude"`` or ``"wanda"``; Wanda needs ``calibration``:
            a (B, L) token array the model is run on (a GPT-loop or mlx-lm
            model), or a callable that runs the model.
        format, bits, **layer_kwargs: as ``SparseLinear.from_linear``.
    """
    if method == "wanda" and calibration is None:
        raise ValueError("[mlx_ext.sparsify] method='wanda' needs calibration tokens")
    report = SparsifyReport()

    def targets(path, layer):
        return type(layer) in _PRUNABLE and not any(s in path for s in skip)

    norms = {}
    if method == "wanda":
        recorders = {}
        tree_map_with_path(
            lambda p, m: recorders.setdefault(p, _NormRecorder(m)) if targets(p, m) else m,
            model.leaf_modules(), is_leaf=nn.Module.is_module)
        model.update_modules(tree_unflatten(list(recorders.items())))
        try:
            mx.eval(_run_calibration(model, calibration))
        finally:
            model.update_modules(tree_unflatten([(p, r.layer) for p, r in recorders.items()]))
        norms = {p: mx.sqrt(r.sum_sq) for p, r in recorders.items() if r.sum_sq is not None}

    def swap(path, layer):
        if not targets(path, layer):
            if type(layer) in _PRUNABLE:
                report.left[type(layer).__name__] += 1
            return layer
        new = ext_nn.SparseLinear.from_linear(
            layer, pattern=pattern, density=density, method=method,
            activation_norms=norms.get(path), format=format, bits=bits, **layer_kwargs)
        report.replaced[type(layer).__name__] += 1
        report.bytes_before += _weight_bytes(layer)
        report.bytes_after += new.weight.nbytes
        new.freeze()
        return new

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return report


def parse_sparsity(text: str) -> dict:
    """``--sparsity``'s value as ``sparsify`` keywords: ``"n:m"`` (n < m, a
    pattern along K) -> ``{"pattern": "n:m"}``; a fraction s in (0, 1) of the
    weights removed -> ``{"density": 1 - s}``. ValueError otherwise."""
    if ":" in text:
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"[mlx_ext.sparsify] sparsity must be 'n:m' with 0 < n < m, got {text!r}")
        return {"pattern": f"{int(n)}:{int(m)}"}
    try:
        s = float(text)
    except ValueError:
        raise ValueError(f"[mlx_ext.sparsify] sparsity must be 'n:m' or a fraction in (0, 1), "
                         f"got {text!r}") from None
    if not 0.0 < s < 1.0:
        raise ValueError(f"[mlx_ext.sparsify] sparsity must be a fraction in (0, 1), got {text!r}")
    return {"density": 1.0 - s}


def calibration_split(tokenizer, length: int = 256):
    """The package's held-out English text (mlx_ext.gpt.HELD_OUT_TEXT) split
    by tokens: its first `length` tokens as a (1, length) calibration batch for
    Wanda, and the rest as text (for a perplexity that calibration did not see)."""
    from .gpt import HELD_OUT_TEXT

    ids = tokenizer.encode(HELD_OUT_TEXT.read_text())
    length = min(length, len(ids) // 2)
    return mx.array([ids[:length]]), tokenizer.decode(ids[length:])


def prune_model(model, tokenizer, sparsity: str, *, format=None, bits=None,
                method="wanda") -> SparsifyReport:
    """``python -m mlx_ext.generate --sparsity``: prune a GPT-loop model in
    place to `sparsity` (see ``parse_sparsity``), Wanda calibrated on the
    held-out text's first tokens (``calibration_split``)."""
    calibration = calibration_split(tokenizer)[0] if method == "wanda" else None
    return sparsify(model, **parse_sparsity(sparsity), method=method, calibration=calibration,
                    format=format, bits=bits)
