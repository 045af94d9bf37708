"""Load an mlx-lm / Hugging Face checkpoint directory (or hub id) into the
decoder, with every quantized layer an ``mlx_ext.nn`` layer.

A checkpoint with ``"quantization"`` in its config.json is read as it is: the
layers it stores with ``scales`` are quantized, each with the bits and group
size its shapes imply. Any other checkpoint is quantized on load (``bits``,
``group_size``), every linear layer and the embedding whose input width the
group size divides.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..lm import patch
from .model import Model, ModelArgs
from .tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "kjv-byte-llama"
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(path_or_hub_id: str | Path) -> Path:
    """A local directory as it is; otherwise a Hugging Face hub id, downloaded."""
    path = Path(path_or_hub_id)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(
            f"[mlx_ext.gpt] {path_or_hub_id!r} is not a local directory, and huggingface_hub "
            f"is not installed to download it as a hub id"
        ) from e
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=HUB_FILES))
    except Exception as e:
        raise ModelNotFoundError(
            f"[mlx_ext.gpt] {path_or_hub_id!r} is not a local directory and could not be "
            f"downloaded from the Hugging Face hub (offline, or no such repository): {e}"
        ) from e


def load(
    path_or_hub_id: str | Path = DEFAULT_MODEL,
    *,
    bits: int = 4,
    group_size: int = 64,
    dtype: mx.Dtype | None = None,
) -> tuple[Model, Tokenizer, dict]:
    """(model, tokenizer, config) of a checkpoint directory or hub id."""
    model_dir = resolve_model_path(path_or_hub_id)
    model, config = load_model(model_dir, bits=bits, group_size=group_size, dtype=dtype)
    return model, Tokenizer(model_dir, config), config


def load_model(
    model_dir: Path, *, bits: int = 4, group_size: int = 64, dtype: mx.Dtype | None = None
) -> tuple[Model, dict]:
    """(model, config). `bits`/`group_size` apply only to checkpoints stored
    unquantized; `dtype` casts the float parameters (scales included), which
    sets the activation dtype (default: the checkpoint's)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    model = Model(ModelArgs.from_config(config))
    weights = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    if not weights:
        raise FileNotFoundError(f"[mlx_ext.gpt] no *.safetensors in {model_dir}")
    weights = model.sanitize(weights)

    if "quantization" in config:
        nn.quantize(model, class_predicate=lambda path, layer: _stored_quantization(path, layer, weights))
        model.load_weights(list(weights.items()))
        cast_parameters(model, dtype)
    else:
        model.load_weights(list(weights.items()))
        cast_parameters(model, dtype)
        nn.quantize(
            model,
            group_size,
            bits,
            class_predicate=lambda _, layer: (
                hasattr(layer, "to_quantized") and layer.weight.shape[-1] % group_size == 0
            ),
        )
    report = patch(model)
    if report.left:
        raise ValueError(
            f"[mlx_ext.gpt] mlx_ext cannot run these layers ({report}); "
            f"only affine quantization is supported"
        )
    model.eval()
    mx.eval(model.parameters())
    return model, config


def _stored_quantization(path: str, layer: nn.Module, weights: dict) -> dict | bool:
    """Quantization of a layer as the checkpoint stores it (mlx-lm's rule:
    quantized iff it has scales), read from the packed shapes."""
    scales = weights.get(f"{path}.scales")
    if scales is None or not hasattr(layer, "to_quantized"):
        return False
    if scales.dtype == mx.uint8:
        raise ValueError(f"[mlx_ext.gpt] {path} is not affine-quantized; mlx_ext supports only affine")
    in_dims = layer.weight.shape[-1]
    bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
    return {"group_size": in_dims // scales.shape[-1], "bits": bits}


def cast_parameters(model: nn.Module, dtype: mx.Dtype | None) -> None:
    """Casts the float parameters (not the packed integer weights); None: no change."""
    if dtype is not None:
        model.update(tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()
        ))
