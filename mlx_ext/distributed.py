"""Tensor parallelism for the GPT loop's model over ``mx.distributed``.

``shard(model, group)`` splits every decoder layer across the ranks of
`group` the way mlx-lm's ``Model.shard`` splits a Llama (Megatron-style):

- q/k/v and gate/up (or the fused ``qkv_proj`` / ``gate_up_proj`` of
  gpt/fuse.py, split per segment) become all-to-sharded: rank r keeps the
  rows of its KV heads (and of the query heads that share them) and of its
  slice of the MLP's intermediate width;
- o and down become sharded-to-all: rank r keeps the matching input columns,
  and one ``all_sum`` per layer gives every rank the whole output;
- ``n_heads`` / ``n_kv_heads`` (and ``model.args``, from which ``make_cache``
  sizes the KV cache) become the rank's, so attention
  (``mlx_ext.scaled_dot_product_attention``) runs per rank on its heads, and
  each rank's KV cache holds only them.

Unlike mlx-lm, the split need not be even: KV heads are dealt out as evenly
as they go (SmolLM2-135M's 3 KV heads over 2 ranks: 2 and 1, with their 6
and 3 query heads), and the intermediate width in whole quantization groups.
Every rank needs at least one KV head.

The embedding, the norms and the LM head stay whole on every rank (as in
mlx-lm): two all_sums per layer are the only communication. Quantized layers
become the ``mlx_ext.nn`` sharded layers (MLX's own where the model had been
``unpatch``-ed), float ``nn.Linear`` MLX's ``AllToShardedLinear`` /
``ShardedToAllLinear``, ``SparseLinear`` the ``mlx_ext.nn`` sparse sharded
layers (the rank's rows or columns in the same format: ``sparse.submatrix``).
"""

import dataclasses
from collections import Counter

import mlx.core as mx
import mlx.nn as nn

from . import nn as ext_nn
from . import sparse

# source layer type -> (all-to-sharded type, sharded-to-all type)
_SHARDED = {
    ext_nn.QuantizedLinear: (ext_nn.QuantizedAllToShardedLinear, ext_nn.QuantizedShardedToAllLinear),
    nn.QuantizedLinear: (nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear),
    ext_nn.QuantizedSwiGLU: (ext_nn.QuantizedAllToShardedSwiGLU, None),
    ext_nn.MLXQuantizedSwiGLU: (ext_nn.MLXQuantizedAllToShardedSwiGLU, None),
    nn.Linear: (nn.AllToShardedLinear, nn.ShardedToAllLinear),
}


def _error(message: str) -> ValueError:
    return ValueError(f"[mlx_ext.shard] {message}")


def deal(total: int, n: int, r: int) -> tuple[int, int]:
    """Rank r's [start, stop) of `total` units dealt to n ranks as evenly as
    they go (the first total % n ranks get one more)."""
    base, extra = divmod(total, n)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def _unit(layer) -> int:
    """The columns a sharded-to-all split must keep together: a quantization
    group, or a sparse format's (sparse.split_units)."""
    if isinstance(layer, ext_nn.SparseLinear):
        return sparse.split_units(layer.weight)[1]
    return layer.group_size if "scales" in layer else 1


def _in_dims(layer) -> int:
    return layer.weight.shape[-1] * 32 // layer.bits if "scales" in layer else layer.weight.shape[-1]


def _head_dim(args) -> int:
    """The model's head dim (mlx-lm's llama args leave it None: hidden / heads)."""
    return args.head_dim or args.hidden_size // args.num_attention_heads


@dataclasses.dataclass
class _Split:
    """One rank's share of a model's layers: row ranges of q, k (= v) and
    the intermediate width, and its head counts."""

    q: tuple[int, int]
    kv: tuple[int, int]
    inter: tuple[int, int]
    n_heads: int
    n_kv_heads: int


def _split(model, n: int, r: int) -> _Split:
    args = model.args
    hkv, hq, hd = args.num_key_value_heads, args.num_attention_heads, _head_dim(args)
    if hkv < n:
        raise _error(f"model.args.num_key_value_heads = {hkv} is fewer than the group size {n}: "
                     f"every rank needs a KV head")
    if hq % hkv:
        raise _error(f"model.args.num_attention_heads = {hq} is not a multiple of num_key_value_heads = {hkv}")
    per_kv = hq // hkv
    a, b = deal(hkv, n, r)
    mlp = model.model.layers[0].mlp
    down = mlp["down_proj"]
    unit = _unit(down)
    if args.intermediate_size % unit:
        raise _error(f"model.args.intermediate_size = {args.intermediate_size} is not a whole number of "
                     f"quantization groups ({unit})")
    i0, i1 = deal(args.intermediate_size // unit, n, r)
    if i0 == i1:
        raise _error(f"model.args.intermediate_size = {args.intermediate_size} has fewer quantization groups "
                     f"({unit}) than the group size {n}")
    return _Split((a * per_kv * hd, b * per_kv * hd), (a * hd, b * hd), (i0 * unit, i1 * unit),
                  (b - a) * per_kv, b - a)


def _plan(model, split: _Split) -> list:
    """(module, name, sharding, ranges) of every layer to shard, after
    checking that all of them can be: nothing is changed before this returns.
    ranges: the rank's [start, stop) rows of each segment (all-to-sharded),
    or its [start, stop) input columns (sharded-to-all)."""
    args = model.args
    hq, hkv = args.num_attention_heads * _head_dim(args), args.num_key_value_heads * _head_dim(args)
    inter = args.intermediate_size

    def shifted(rng, by):
        return rng[0] + by, rng[1] + by

    q, kv, i = split.q, split.kv, split.inter
    plan = []
    for li, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        candidates = [
            (attn, "qkv_proj", "all-to-sharded", [q, shifted(kv, hq), shifted(kv, hq + hkv)]),
            (attn, "q_proj", "all-to-sharded", [q]),
            (attn, "k_proj", "all-to-sharded", [kv]),
            (attn, "v_proj", "all-to-sharded", [kv]),
            (attn, "o_proj", "sharded-to-all", q),
            (mlp, "gate_up_proj", "all-to-sharded", [i, shifted(i, inter)]),
            (mlp, "gate_proj", "all-to-sharded", [i]),
            (mlp, "up_proj", "all-to-sharded", [i]),
            (mlp, "down_proj", "sharded-to-all", i),
        ]
        for module, name, sharding, ranges in candidates:
            if name in module:
                where = f"model.layers.{li}.{'self_attn' if module is attn else 'mlp'}.{name}"
                _check_layer(module[name], where, sharding, ranges)
                plan.append((module, name, sharding, ranges))
    return plan


def _check_layer(layer, where: str, sharding: str, ranges) -> None:
    if type(layer) is ext_nn.SparseLinear:
        w = layer.weight
        unit_n, unit_k = sparse.split_units(w)
        bounds, unit = ([b for r in ranges for b in r], unit_n) if sharding == "all-to-sharded" else (ranges, unit_k)
        if any(b % unit for b in bounds):
            raise _error(f"{where}: a {type(w).__name__} split at {bounds} cuts its "
                         f"{'blocks' if w.layout['format'] == 'bsr' else 'groups'} of {unit} "
                         f"{'rows' if sharding == 'all-to-sharded' else 'columns'}")
        return
    kinds = _SHARDED.get(type(layer))
    if kinds is None:
        raise _error(f"{where} is a {type(layer).__name__}, which shard does not know how to split")
    if sharding == "sharded-to-all":
        if kinds[1] is None:
            raise _error(f"{where}: a {type(layer).__name__} can only be sharded all-to-sharded")
        if ranges[0] % _unit(layer) or ranges[1] % _unit(layer):
            raise _error(f"{where}: the columns {ranges[0]}..{ranges[1]} of its input ({_in_dims(layer)}) "
                         f"are not whole quantization groups ({_unit(layer)}): the head dim must be a "
                         f"multiple of the group size")


def _rows(a: mx.array, ranges: list) -> mx.array:
    return mx.contiguous(mx.concatenate([a[start:stop] for start, stop in ranges], axis=0))


def _columns(a: mx.array, columns: tuple[int, int], in_dims: int) -> mx.array:
    """Columns [start, stop) of the logical input width in_dims, of an array
    whose last axis packs them (packed words, or one scale per group)."""
    width = a.shape[-1]  # start and stop are whole groups, so these divide exactly
    return mx.contiguous(a[..., columns[0] * width // in_dims : columns[1] * width // in_dims])


def _sharded_sparse(layer, sharding: str, ranges, group) -> nn.Module:
    """A SparseLinear's rows (all-to-sharded) or input columns (sharded-to-all)
    in its own format (mlx_ext.sparse.submatrix: the same stored pattern and values)."""
    bias = layer.get("bias")
    if sharding == "all-to-sharded":
        weight = sparse.submatrix(layer.weight, rows=ranges)
        bias = None if bias is None else _rows(bias, ranges)
        return ext_nn.SparseAllToShardedLinear(weight, bias, group)
    return ext_nn.SparseShardedToAllLinear(sparse.submatrix(layer.weight, cols=ranges), bias, group)


def _sharded_layer(layer, sharding: str, ranges, group) -> nn.Module:
    if type(layer) is ext_nn.SparseLinear:
        return _sharded_sparse(layer, sharding, ranges, group)
    all_to_sharded, sharded_to_all = _SHARDED[type(layer)]
    cls = all_to_sharded if sharding == "all-to-sharded" else sharded_to_all
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.group = group
    quantized = "scales" in layer
    if quantized:
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
    in_dims = _in_dims(layer)
    for name in ("weight", "scales", "biases", "bias"):
        if name not in layer:
            continue
        a = layer[name]
        if sharding == "all-to-sharded":
            new[name] = _rows(a, ranges)
        else:  # the bias is added whole, once, after the all_sum
            new[name] = a if name == "bias" else _columns(a, ranges, in_dims)
    if quantized:
        if "biases" not in new:
            new.biases = None  # as MLX's fp-mode layers hold it
        new.freeze()
    return new


def shard(model, group: mx.distributed.Group | None = None) -> Counter:
    """Shards a GPT-loop model (``mlx_ext.gpt.Model``), or an mlx-lm model of
    the same layout (llama-family: ``model.args``, ``self_attn.n_heads`` /
    ``n_kv_heads``, q/k/v/o and gate/up/down; e.g. one pruned by
    ``mlx_ext.sparsify``, which mlx-lm's ``model.shard`` cannot split) across `group` (default:
    ``mx.distributed.init()``) in place; returns the count of layers sharded
    by new type. A group of one leaves the model as it is.

    Raises ``ValueError`` naming the argument (before changing anything)
    when a rank would get no KV head or no intermediate group, when an o
    projection's split falls inside a quantization group (head dim not a
    multiple of the group size), and when a split would cut a sparse
    layer's BSR blocks or N:M groups."""
    group = group or mx.distributed.init()
    n = group.size()
    counts = Counter()
    if n == 1:
        return counts
    split = _split(model, n, group.rank())
    plan = _plan(model, split)
    for module, name, sharding, ranges in plan:
        module[name] = _sharded_layer(module[name], sharding, ranges, group)
        counts[type(module[name]).__name__] += 1
    for layer in model.model.layers:
        layer.self_attn.n_heads, layer.self_attn.n_kv_heads = split.n_heads, split.n_kv_heads
    model.args = dataclasses.replace(
        model.args, num_attention_heads=split.n_heads, num_key_value_heads=split.n_kv_heads,
        intermediate_size=split.inter[1] - split.inter[0],
    )
    mx.eval(model.parameters())
    return counts
