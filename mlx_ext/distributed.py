"""Tensor parallelism for the GPT loop's model over ``mx.distributed``.

``shard(model, group)`` splits every decoder layer across the ranks of
`group` the way mlx-lm's ``Model.shard`` splits a Llama (Megatron-style):

- q/k/v and gate/up (or the fused ``qkv_proj`` / ``gate_up_proj`` of
  gpt/fuse.py, split per segment) become all-to-sharded: rank r keeps rows
  [r*N/n, (r+1)*N/n) of each segment, i.e. heads [r*H/n, (r+1)*H/n) of q, k
  and v and that slice of the MLP's intermediate width;
- o and down become sharded-to-all: rank r keeps the matching input columns
  and one ``all_sum`` per layer gives every rank the whole output;
- ``n_heads`` / ``n_kv_heads`` (and ``model.args``, from which ``make_cache``
  sizes the KV cache) are divided, so attention (``mlx_ext.scaled_dot_product_attention``)
  runs per rank on its heads, and each rank's KV cache holds only them.

The embedding, the norms and the LM head stay whole on every rank (as in
mlx-lm): two all_sums per layer are the only communication. Quantized layers
become the ``mlx_ext.nn`` sharded layers (MLX's own where the model had been
``unpatch``-ed), float ``nn.Linear`` MLX's ``AllToShardedLinear`` /
``ShardedToAllLinear``. ``SparseLinear`` layers are refused (see ``shard``).
"""

import dataclasses
from collections import Counter

import mlx.core as mx
import mlx.nn as nn

from . import nn as ext_nn

# source layer type -> (all-to-sharded type, sharded-to-all type)
_SHARDED = {
    ext_nn.QuantizedLinear: (ext_nn.QuantizedAllToShardedLinear, ext_nn.QuantizedShardedToAllLinear),
    nn.QuantizedLinear: (nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear),
    ext_nn.QuantizedSwiGLU: (ext_nn.QuantizedAllToShardedSwiGLU, None),
    ext_nn.MLXQuantizedSwiGLU: (ext_nn.MLXQuantizedAllToShardedSwiGLU, None),
}


def _error(message: str) -> ValueError:
    return ValueError(f"[mlx_ext.shard] {message}")


def _plan(model, n: int) -> list:
    """(module, name, sharding, row segments) of every layer to shard, after
    checking that all of them can be: nothing is changed before this returns."""
    args = model.args
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(args, name) % n:
            raise _error(f"model.args.{name} = {getattr(args, name)} is not divisible by the group size {n}")
    hq, hkv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    inter = args.intermediate_size
    plan = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        candidates = [
            (attn, "qkv_proj", "all-to-sharded", [hq, hkv, hkv]),
            (attn, "q_proj", "all-to-sharded", [hq]),
            (attn, "k_proj", "all-to-sharded", [hkv]),
            (attn, "v_proj", "all-to-sharded", [hkv]),
            (attn, "o_proj", "sharded-to-all", None),
            (mlp, "gate_up_proj", "all-to-sharded", [inter, inter]),
            (mlp, "gate_proj", "all-to-sharded", [inter]),
            (mlp, "up_proj", "all-to-sharded", [inter]),
            (mlp, "down_proj", "sharded-to-all", None),
        ]
        for module, name, sharding, segments in candidates:
            if name not in module:
                continue
            where = f"model.layers.{i}.{'self_attn' if module is attn else 'mlp'}.{name}"
            _check_layer(module[name], where, sharding, n)
            plan.append((module, name, sharding, segments))
    return plan


def _check_layer(layer, where: str, sharding: str, n: int) -> None:
    if isinstance(layer, ext_nn.SparseLinear):
        raise _error(
            f"{where} is a SparseLinear ({type(layer.weight).__name__}): sparse layers are not sharded "
            f"(their formats have no per-rank row / column split, and pruned rows and columns carry "
            f"unequal work per rank); shard the dense model, or run the pruned one on one machine")
    if type(layer) not in _SHARDED and type(layer) is not nn.Linear:
        raise _error(f"{where} is a {type(layer).__name__}, which shard does not know how to split")
    if _SHARDED.get(type(layer), (None, True))[1] is None and sharding == "sharded-to-all":
        raise _error(f"{where}: a {type(layer).__name__} can only be sharded all-to-sharded")
    if sharding == "sharded-to-all":
        k = layer.weight.shape[-1] * 32 // layer.bits if "scales" in layer else layer.weight.shape[-1]
        unit = layer.group_size if "scales" in layer else 1
        if k % (n * unit):
            raise _error(f"{where}: its input width {k} does not split into {n} parts of whole "
                         f"quantization groups ({unit})")


def _rows(a: mx.array, segments: list, n: int, r: int) -> mx.array:
    """Rank r's rows: the r-th n-th of each segment (row counts), concatenated."""
    parts, start = [], 0
    for seg in segments:
        step = seg // n
        parts.append(a[start + r * step : start + (r + 1) * step])
        start += seg
    return mx.contiguous(mx.concatenate(parts, axis=0))


def _columns(a: mx.array, n: int, r: int) -> mx.array:
    step = a.shape[-1] // n
    return mx.contiguous(a[..., r * step : (r + 1) * step])


def _sharded_layer(layer, sharding: str, segments, group) -> nn.Module:
    n, r = group.size(), group.rank()
    if type(layer) is nn.Linear:
        if sharding == "sharded-to-all":
            return nn.ShardedToAllLinear.from_linear(layer, group=group)
        return _float_all_to_sharded(layer, segments, group)
    all_to_sharded, sharded_to_all = _SHARDED[type(layer)]
    cls = all_to_sharded if sharding == "all-to-sharded" else sharded_to_all
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.group_size, new.bits, new.mode, new.group = layer.group_size, layer.bits, layer.mode, group
    for name in ("weight", "scales", "biases", "bias"):
        if name not in layer:
            continue
        a = layer[name]
        if sharding == "all-to-sharded":
            new[name] = _rows(a, segments, n, r)
        else:  # the bias is added whole, once, after the all_sum
            new[name] = a if name == "bias" else _columns(a, n, r)
    if "biases" not in new:
        new.biases = None  # as MLX's fp-mode layers hold it
    new.freeze()
    return new


def _float_all_to_sharded(layer, segments, group):
    """MLX's AllToShardedLinear holding rank r's rows of each segment."""
    n, r = group.size(), group.rank()
    new = nn.AllToShardedLinear.__new__(nn.AllToShardedLinear)
    nn.Module.__init__(new)
    new.group = group
    new.weight = _rows(layer.weight, segments, n, r)
    if "bias" in layer:
        new.bias = _rows(layer.bias, segments, n, r)
    return new


def shard(model, group: mx.distributed.Group | None = None) -> Counter:
    """Shards a GPT-loop model (``mlx_ext.gpt.Model``) across `group` (default:
    ``mx.distributed.init()``) in place; returns the count of layers sharded
    by new type. A group of one leaves the model as it is.

    Raises ``ValueError`` (before changing anything) when the head counts or
    the intermediate width are not divisible by the group size, when an o /
    down projection's input does not split into whole quantization groups,
    and for ``SparseLinear`` layers: their formats (CSR, Bitmask, BSR, N:M)
    have no per-rank split, so prune after choosing one machine, not before
    sharding."""
    group = group or mx.distributed.init()
    n = group.size()
    counts = Counter()
    if n == 1:
        return counts
    plan = _plan(model, n)
    for module, name, sharding, segments in plan:
        module[name] = _sharded_layer(module[name], sharding, segments, group)
        counts[type(module[name]).__name__] += 1
    for layer in model.model.layers:
        layer.self_attn.n_heads //= n
        layer.self_attn.n_kv_heads //= n
    model.args = dataclasses.replace(
        model.args,
        num_attention_heads=model.args.num_attention_heads // n,
        num_key_value_heads=model.args.num_key_value_heads // n,
        intermediate_size=model.args.intermediate_size // n,
    )
    model.group = group
    mx.eval(model.parameters())
    return counts
