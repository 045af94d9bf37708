"""One rank of the distributed tests: ``python -m tests.distributed_worker SCENARIO DIR``,
started by tests/distributed_launch.py as ranks of a ring group. Each rank
writes what it computed to DIR/rank<r>.npz (arrays) and DIR/rank<r>.json;
tests/test_distributed*.py compares them with the float64 reference and with
unsharded runs. One thread per rank (two ranks share this machine's 2 cores).

Scenarios:
- layers: the cases of DIR/cases.json on the arrays of DIR/inputs.npz; each a
  QuantizedLinear sharded by ``mlx_ext.nn``'s classes (through MLX's own
  ``from_quantized_linear``) and by MLX's classes then ``mlx_ext.patch``.
- mlx_lm: a tiny quantized mlx-lm llama (random weights) per mode, patched,
  ``model.shard(group)``, patched again; then mlx-lm's sharded_generate flow
  (``sharded_load`` + ``stream_generate``) on the embedded model, patched.
- gpt: the GPT loop on the embedded model, sharded with ``mlx_ext.shard``,
  greedy, against the same generation unsharded on this rank.
"""

import json
import sys
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.nn as nn

import mlx_ext
from mlx_ext import nn as ext_nn

GPT_PROMPT = "And God said unto Moses,"
GPT_TOKENS = 24


def save(out: Path, rank: int, arrays: dict, info: dict) -> None:
    np.savez(out / f"rank{rank}.npz", **{k: np.array(v.astype(mx.float32) if isinstance(v, mx.array)
                                                       and v.dtype != mx.float32 else v)
                                         for k, v in arrays.items()})
    (out / f"rank{rank}.json").write_text(json.dumps(info))


def full_layer(inputs, name: str, case: dict) -> nn.QuantizedLinear:
    w_q = mx.array(inputs[f"{name}/w_q"])
    scales = mx.array(inputs[f"{name}/scales"])
    n, k = w_q.shape[0], w_q.shape[1] * 32 // case["bits"]
    layer = nn.QuantizedLinear(k, n, bias=case["bias"], group_size=case["group_size"], bits=case["bits"],
                               mode=case["mode"])
    params = {"weight": w_q, "scales": scales}
    if case["mode"] == "affine":
        params["biases"] = mx.array(inputs[f"{name}/biases"])
    if case["bias"]:
        params["bias"] = mx.array(inputs[f"{name}/bias"])
    layer.update(params)
    return layer


def layers(group, out: Path) -> None:
    cases = json.loads((out / "cases.json").read_text())
    inputs = np.load(out / "inputs.npz")
    r, n = group.rank(), group.size()
    arrays, info = {}, {}
    for case in cases:
        name = case["name"]
        full = full_layer(inputs, name, case)
        x = mx.array(inputs[f"{name}/x"])
        if case["kind"] == "all-to-sharded":
            ours = ext_nn.QuantizedAllToShardedLinear.from_quantized_linear(full, group=group)
            theirs = nn.QuantizedAllToShardedLinear.from_quantized_linear(full, group=group)
            x_in = x
        else:
            ours = ext_nn.QuantizedShardedToAllLinear.from_quantized_linear(full, group=group)
            theirs = nn.QuantizedShardedToAllLinear.from_quantized_linear(full, group=group)
            k = x.shape[-1] // n
            x_in = x[..., r * k:(r + 1) * k]
        holder = nn.Module()
        holder.layer = theirs
        report = mlx_ext.patch(holder)
        arrays[f"{name}/y"] = ours(x_in)
        arrays[f"{name}/y_patched"] = holder.layer(x_in)
        info[name] = {"patched_type": type(holder.layer).__name__, "report": str(report)}
        mlx_ext.unpatch(holder)
        info[name]["unpatched_type"] = type(holder.layer).__name__
        if case["kind"] == "all-to-sharded":
            # the x gradient: each rank's slice of sum(y * cot), summed over
            # the group by sum_gradients, is the whole product's
            cot = mx.array(inputs[f"{name}/cot"])
            m = cot.shape[-1] // n
            cot = cot[..., r * m:(r + 1) * m]
            arrays[f"{name}/dx"] = mx.grad(lambda x: (ours(x) * cot).sum())(x)
    mx.eval(arrays)
    save(out, r, arrays, info)


def quantized_kinds(model) -> list[str]:
    """The package and type of every quantized module ("mlx.QuantizedLinear", ...)."""
    return sorted({f"{type(m).__module__.split('.')[0]}.{type(m).__name__}"
                   for _, m in model.named_modules() if "scales" in m})


def mlx_lm(group, out: Path) -> None:
    from mlx_lm import generate, load, stream_generate
    from mlx_lm.generate import generation_stream
    from mlx_lm.utils import sharded_load

    from mlx_ext.gpt import DEFAULT_MODEL

    from .lm_acceptance import build_quantized, greedy_tokens, prefill_and_decode
    from .test_lm_patch import LLAMA

    r = group.rank()
    arrays, info = {}, {}
    for mode in ("affine", "mxfp4"):
        model = build_quantized(LLAMA, mode)
        want = prefill_and_decode(model)
        want_tokens = greedy_tokens(model)
        mlx_ext.patch(model)
        model.shard(group)  # mlx-lm: rebuilds every quantized layer as MLX's sharded layers
        report = mlx_ext.patch(model)
        got = prefill_and_decode(model)
        info[mode] = {"report": str(report), "tokens": greedy_tokens(model), "want_tokens": want_tokens,
                      "kinds": quantized_kinds(model)}
        # generate_step leaves a step queued on mlx-lm's generation stream: its
        # all_sums must finish before others start on the default stream, or
        # the two ranks may pair collectives of different streams
        mx.synchronize(generation_stream)
        mlx_ext.unpatch(model)
        info[mode]["unpatched_kinds"] = quantized_kinds(model)
        unpatched = prefill_and_decode(model)
        for label, (prefill, decode) in (("want", want), ("got", got), ("unpatched", unpatched)):
            arrays[f"{mode}/{label}/prefill"], arrays[f"{mode}/{label}/decode"] = prefill, decode
    # an mlx-lm llama pruned by mlx_ext.sparsify, sharded by mlx_ext.shard
    # (mlx-lm's model.shard rebuilds only Linear and quantized layers)
    for label, kw in (("2:4", dict(pattern="2:4", bits=0)), ("50%", dict(density=0.5))):
        model = build_quantized(LLAMA, "affine")
        mlx_ext.sparsify(model, **kw)
        want = prefill_and_decode(model)
        counts = mlx_ext.shard(model, group)
        got = prefill_and_decode(model)
        info[f"sparse {label}"] = {"counts": dict(counts), "n_heads": model.model.layers[0].self_attn.n_heads}
        for step, w, g in zip(("prefill", "decode"), want, got):
            arrays[f"sparse {label}/want/{step}"], arrays[f"sparse {label}/got/{step}"] = w, g
    # mlx-lm's sharded_generate example, on a patched model
    prompt = "In the beginning God created"
    model, tokenizer = sharded_load(str(DEFAULT_MODEL))
    info["sharded_report"] = str(mlx_ext.patch(model))
    text = "".join(response.text for response in stream_generate(model, tokenizer, prompt, max_tokens=GPT_TOKENS))
    single, tokenizer = load(str(DEFAULT_MODEL))
    info["sharded_text"], info["single_text"] = text, generate(single, tokenizer, prompt, max_tokens=GPT_TOKENS)
    mx.eval(arrays)
    save(out, r, arrays, info)


def gpt(group, out: Path) -> None:
    from mlx_ext import gpt as gpt_loop

    r = group.rank()
    info = {}
    for label, kw in (("fused", {}), ("unfused", {"fuse": False}), ("kv4", {"kv_bits": 4})):
        model, tokenizer = gpt_loop.load(**kw)
        single = gpt_loop.generate(model, tokenizer, GPT_PROMPT, max_tokens=GPT_TOKENS).tokens
        counts = mlx_ext.shard(model, group)
        sharded = gpt_loop.generate(model, tokenizer, GPT_PROMPT, max_tokens=GPT_TOKENS).tokens
        cache = model.make_cache()
        info[label] = {"single": single, "sharded": sharded, "counts": dict(counts),
                       "kv_heads": cache.kv_heads, "n_heads": model.model.layers[0].self_attn.n_heads}
    # pruned: every projection a SparseLinear, each format (and quantized N:M values)
    model, tokenizer = gpt_loop.load(fuse=False)
    sparse_model(model)
    single = gpt_loop.generate(model, tokenizer, GPT_PROMPT, max_tokens=GPT_TOKENS).tokens
    counts = mlx_ext.shard(model, group)
    sharded = gpt_loop.generate(model, tokenizer, GPT_PROMPT, max_tokens=GPT_TOKENS).tokens
    layer = model.model.layers[0]
    info["sparse"] = {"single": single, "sharded": sharded, "counts": dict(counts),
                      "kv_heads": model.make_cache().kv_heads, "n_heads": layer.self_attn.n_heads,
                      "formats": [type(layer.self_attn[n].weight).__name__ for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                      + [type(layer.mlp[n].weight).__name__ for n in ("gate_proj", "up_proj", "down_proj")],
                      "nnz": [layer.self_attn.q_proj.weight.nnz, layer.mlp.down_proj.weight.nnz]}
    # an uneven split (SmolLM2-135M's head layout, scaled down): 9 query
    # heads on 3 KV heads -> 6 + 3 and 2 + 1; 5 intermediate groups -> 3 + 2
    arrays = {}
    for label, fuse, bits in (("uneven", True, 4), ("uneven-unfused", False, 4), ("uneven-float", True, None)):
        model = uneven_model(fuse, bits)
        prompt = list(range(1, 9))
        arrays[f"{label}/single"] = model(mx.array([prompt]))
        single = list(gpt_loop.generate_tokens(model, prompt, max_tokens=8, sampler=gpt_loop.make_sampler()))
        counts = mlx_ext.shard(model, group)
        arrays[f"{label}/sharded"] = model(mx.array([prompt]))
        sharded = list(gpt_loop.generate_tokens(model, prompt, max_tokens=8, sampler=gpt_loop.make_sampler()))
        info[label] = {"single": single, "sharded": sharded, "counts": dict(counts),
                       "kv_heads": model.make_cache().kv_heads, "n_heads": model.model.layers[0].self_attn.n_heads,
                       "intermediate": model.args.intermediate_size}
    mx.eval(arrays)
    save(out, r, arrays, info)


# The formats of sparse_model's projections: N:M with 4-bit values (q, down),
# CSR (k), Bitmask (v, up), BSR (o), N:M with float values (gate).
SPARSE = {"q_proj": dict(pattern="2:4", bits=4), "k_proj": dict(density=0.5, format="csr"),
          "v_proj": dict(density=0.5, format="bitmask"), "o_proj": dict(density=0.5, format="bsr", block=32),
          "gate_proj": dict(pattern="2:4", bits=0), "up_proj": dict(density=0.5, format="bitmask"),
          "down_proj": dict(pattern="2:4", bits=4)}


def sparse_model(model) -> None:
    """Every projection of the (unfused) GPT-loop model pruned to SPARSE's format."""
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for name, kw in SPARSE.items():
                if name in module:
                    module[name] = mlx_ext.nn.SparseLinear.from_linear(module[name], **kw)


UNEVEN = {"model_type": "llama", "vocab_size": 64, "hidden_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 32, "intermediate_size": 160,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def uneven_model(fuse: bool, bits: int | None):
    """A random llama of UNEVEN's shape, `bits`-bit in groups of 32 (None:
    float nn.Linear layers), the same on every rank (seeded)."""
    from mlx.utils import tree_flatten

    from mlx_ext.gpt.load import build_model
    from mlx_ext.gpt.model import Model, ModelArgs

    mx.random.seed(19)
    weights = dict(tree_flatten(Model(ModelArgs.from_config(UNEVEN)).parameters()))
    return build_model(UNEVEN, weights, requantize=bits is not None, bits=bits or 4, group_size=32, dtype=None,
                       fuse=fuse)


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    mlx_ext.set_num_threads(1)
    group = mx.distributed.init(backend="ring", strict=True)
    {"layers": layers, "mlx_lm": mlx_lm, "gpt": gpt}[scenario](group, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
