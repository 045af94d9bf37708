"""Where the time of one decode step goes: a profile by op, and MLX's graph overhead.

MLX's CPU backend has no per-op profiler, so the profile is built in three steps:

1. **The step's ops.** One decode step (``compiled_decode_step``'s function,
   at the bench's position: after a 512-token prompt) is built lazily and
   written out with ``mx.export_to_dot``; its nodes are counted by primitive
   (``mlx_ext::QuantizedMatmul`` by weight shape).
2. **Each op kind in isolation.** For each kind, `CHAIN` copies of the op at
   the step's shapes are built into one graph (each on the previous one's
   output where the shapes allow, so none can run early) and only ``mx.eval``
   is timed: its cost per op is what a compiled step pays for it, kernel plus
   MLX's per-op cost (scheduling, allocation, the stream's dispatch).
3. **MLX's graph overhead.** The same chain of a no-op-sized op (adding two
   1-element arrays) gives MLX's per-op cost alone; times the number of ops
   in the step, it is the share of the step that no kernel can win back.

4. **Each piece in place.** Isolated timings miss what a piece costs inside
   the compiled step (fusion, buffer donation, cache effects) and swing with
   the load of a shared machine, so the step is also timed with one piece
   removed at a time (RoPE, RMSNorm, attention, the cache writes), the runs
   interleaved: the difference is that piece's cost where it runs.

The estimated step (sum of count x time per op) is printed beside the measured
one (1 / decode tokens/s of ``gpt.generate``, the bench's definition). Tables
go to bench/results/<machine>/gpt_decode_profile.{md,json}.

    python -m bench.profile_decode [--model smollm2] [--dtype float32]
"""

import argparse
import collections
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import mlx_ext
import mlx_ext.gpt.cache as gpt_cache
import mlx_ext.nn as ext_nn
import mlx_ext.gpt.model as gpt_model
from mlx_ext import gpt
from mlx_ext.gpt.rope import RoPE

from .bench_gpt import prompt_ids
from .harness import machine_info, markdown_table, write_results

CHAIN = 200


def step_ops(model, prompt_tokens: int) -> collections.Counter:
    """Primitive -> count in one decode step's graph at position prompt_tokens."""
    cache = model.make_cache()
    model(mx.zeros((1, prompt_tokens), mx.int32), cache)
    mx.eval(cache.keys, cache.values)
    cache.reserve(1, 1)
    token = mx.zeros((1, 1), mx.int32)
    decoding = gpt.cache.KVCache.decoding(cache.keys, cache.values, mx.array(cache.offset, mx.int32))
    logits = model(token, decoding)[:, -1]
    with tempfile.TemporaryDirectory() as folder:
        dot = Path(folder) / "step.dot"
        mx.export_to_dot(str(dot), logits, *decoding.keys, *decoding.values)
        text = dot.read_text()
    counts = collections.Counter()
    for label in re.findall(r'label ="([^"]+)"', text) + re.findall(r'label="([^"]+)"', text):
        if label and not label[0].isdigit() and "(" not in label:
            counts[label] += 1
    return counts


def eval_time_per_op(build, chain: int = CHAIN, repeats: int = 7) -> float:
    """Median seconds per op of mx.eval over `chain` ops that build(n) returns
    (already built: only the evaluation is timed)."""
    times = []
    for _ in range(repeats):
        outs = build(chain)
        mx.eval(outs[:0])
        start = time.perf_counter()
        mx.eval(outs)
        times.append((time.perf_counter() - start) / chain)
    return statistics.median(times)


def chained(op, x):
    def build(n):
        outs, y = [], x
        for _ in range(n):
            y = op(y)
            outs.append(y)
        return outs
    return build


def chained_last(op, x):
    """A chain whose intermediate results are dropped as it goes (only the last
    is kept): a buffer updated in place (slice_update) can then be donated, as
    in the decode step."""
    def build(n):
        y = x
        for _ in range(n):
            y = op(y)
        return [y] * n  # n references to one result: eval_time_per_op divides by n
    return build


def independent(op):
    def build(n):
        return [op() for _ in range(n)]
    return build


def op_timings(model, prompt_tokens: int) -> dict:
    """What the step calls, by kind: name -> (seconds per call, calls per step).
    Each kind is one call of the model's code (an RMSNorm, a RoPE, attention
    with its mask, ...), which on MLX's CPU may be several primitives."""
    args, dtype = model.args, model.dtype
    d, hd, layers = args.hidden_size, args.head_dim, args.num_hidden_layers
    cache = model.make_cache()
    capacity = -(-(prompt_tokens + 1) // gpt.cache.BLOCK) * gpt.cache.BLOCK
    kv = mx.random.normal((1, args.num_key_value_heads, capacity, hd)).astype(cache.dtype)
    q = mx.random.normal((1, args.num_attention_heads, 1, hd)).astype(cache.dtype)
    h = mx.random.normal((1, 1, d)).astype(dtype)
    layer = model.model.layers[0]
    norm, rope = layer.input_layernorm, layer.self_attn.rope
    offset = mx.array(prompt_tokens, mx.int32)
    hidden = mx.random.normal((1, 1, args.intermediate_size)).astype(dtype)
    tables = rope.tables(offset, 1)
    mx.eval(tables)

    lengths = (offset + 1).reshape(1)

    def attention():  # as the model's decode step calls it
        return mlx_ext.scaled_dot_product_attention(q, kv, kv, scale=hd**-0.5, kv_lengths=lengths)

    t = {
        "RMSNorm": (eval_time_per_op(chained(norm, h)), 2 * layers + 1),
        "RoPE tables (cos, sin; once per step)": (eval_time_per_op(independent(lambda: rope.tables(offset, 1))), 1),
        "RoPE (q or k, from the tables)": (eval_time_per_op(chained(lambda y: rope.apply(y, tables), q)), 2 * layers),
        "attention (mlx_ext.scaled_dot_product_attention)": (eval_time_per_op(independent(attention)), layers),
        "cache write (slice_update)": (eval_time_per_op(chained_last(
            lambda c: mx.slice_update(c, q[:, : args.num_key_value_heads], offset.reshape(1), axes=(2,)), kv)),
            2 * layers),
        "residual add": (eval_time_per_op(chained(lambda y: y + h, h)), 2 * layers),
    }
    if "gate_up_proj" not in layer.mlp:  # else SwiGLU is in the fused product's epilogue
        t["silu(gate) * up"] = (eval_time_per_op(chained(lambda y: nn.silu(y) * hidden, hidden)), layers)
    for name, (linear, per_step) in qmm_layers(model).items():
        x = mx.random.normal((1, 1, linear.weight.shape[1] * 32 // linear.bits)).astype(dtype)
        t[name] = (eval_time_per_op(independent(lambda linear=linear, x=x: linear(x)), chain=60), per_step)
    return t


def qmm_layers(model) -> dict:
    """'QuantizedMatmul <roles> <N>x<K>' -> (one such layer, how many a step runs)."""
    layer = model.model.layers[0]
    found = {}
    for name, module in layer.named_modules():
        if hasattr(module, "scales") and name:
            found.setdefault(tuple(module.weight.shape), []).append((name.split(".")[-1], module))
    layers = {}
    for shape, named in found.items():
        module = named[0][1]
        roles = "+".join(n for n, _ in named)
        key = f"{type(module).__name__} {roles} {shape[0]}x{shape[1] * 32 // module.bits}"
        layers[key] = (module, len(named) * model.args.num_hidden_layers)
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    call = head if "lm_head" in model else head.as_linear

    class Head:
        weight, bits = head.weight, head.bits

        def __call__(self, x):
            return call(x)

    layers[f"QuantizedMatmul (tied) lm_head {head.weight.shape[0]}x{head.weight.shape[1] * 32 // head.bits}"] = (Head(), 1)
    return layers


def in_place_costs(model, prompt, max_tokens: int, rounds: int = 3) -> dict:
    """Variant -> (median ms per decode step with one piece removed (or the
    full step's), median over rounds of the full step's time minus the
    variant's): the variants interleaved round by round, the differences
    paired within a round (a shared machine's load moves between rounds more
    than within one)."""
    original = dict(apply=RoPE.apply, norm=ext_nn.RMSNorm.__call__, attend=gpt_model.attend,
                    update=gpt_cache.KVCache.update_and_fetch)

    def no_cache_write(cache, layer, keys, values):
        if isinstance(cache.offset, int):
            return original["update"](cache, layer, keys, values)
        lengths = mx.broadcast_to(cache.offset.astype(mx.int32) + 1, (keys.shape[0],))
        return gpt_cache.Attend(cache.keys[layer], cache.values[layer], None, lengths)

    variants = {
        "full step": {},
        "without RoPE": {"apply": lambda self, x, tables: x},
        "without RMSNorm": {"norm": lambda self, x: x},
        "without attention": {"attend": lambda q, a, scale, cache: q},
        "without the cache writes": {"update": no_cache_write},
    }
    times = {name: [] for name in variants}  # per round, so that differences pair up
    try:
        for _ in range(rounds):
            for name, change in variants.items():
                RoPE.apply = change.get("apply", original["apply"])
                ext_nn.RMSNorm.__call__ = change.get("norm", original["norm"])
                gpt_model.attend = change.get("attend", original["attend"])
                gpt_cache.KVCache.update_and_fetch = change.get("update", original["update"])
                gpt.generate(model, _NoText(), prompt, max_tokens=2)
                run = gpt.generate(model, _NoText(), prompt, max_tokens=max_tokens)
                times[name].append(1e3 / run.stats.generation_tps)
    finally:
        RoPE.apply, ext_nn.RMSNorm.__call__ = original["apply"], original["norm"]
        gpt_model.attend, gpt_cache.KVCache.update_and_fetch = original["attend"], original["update"]
    full = times["full step"]
    return {name: (statistics.median(v), statistics.median(f - t for f, t in zip(full, v)))
            for name, v in times.items()}


class _NoText:
    """gpt.generate's tokenizer when only timing matters (token ids in, nothing decoded)."""
    eos_token_ids = ()

    def stream(self):
        return self

    def add(self, token):
        return ""

    def decode(self, tokens):
        return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    model, tokenizer = gpt.load(args.model, dtype=getattr(mx, args.dtype))
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    gpt.generate(model, tokenizer, prompt, max_tokens=4)
    runs = [gpt.generate(model, tokenizer, prompt, max_tokens=args.max_tokens) for _ in range(5)]
    tps = statistics.median(r.stats.generation_tps for r in runs)
    step_ms = 1e3 / tps
    counts = step_ops(model, args.prompt_tokens)
    overhead = eval_time_per_op(chained(lambda y: y + 1.0, mx.array([1.0])))
    times = op_timings(model, args.prompt_tokens)
    n_ops = sum(counts.values())
    rows, total = [], 0.0
    for kind, (seconds, n) in sorted(times.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        total += n * seconds
        rows.append({"call": kind, "per_step": n, "us_per_call": seconds * 1e6,
                     "ms_per_step": n * seconds * 1e3, "share_of_step": n * seconds * 1e3 / step_ms})
    in_place = in_place_costs(model, prompt, args.max_tokens)
    full = in_place["full step"][0]
    place_rows = [{"variant": name, "ms_per_step": ms, "piece_ms": piece, "piece_share": piece / full}
                  for name, (ms, piece) in in_place.items()]
    graph = ", ".join(f"{k} {v}" for k, v in counts.most_common())
    markdown = (
        f"{args.model}, {args.dtype}, decode after a {args.prompt_tokens}-token prompt, "
        f"{mlx_ext.get_num_threads()} threads, load average at the start {load} (a shared machine: "
        f"the figures move by 20-50% between runs). Method: bench/profile_decode.py's docstring.\n\n"
        f"decode {tps:.1f} tokens/s = {step_ms:.2f} ms per step. The step's graph before "
        f"mx.compile: {n_ops} primitives ({graph}).\n\n"
        f"## Each call in isolation (a chain of it in one graph)\n\n"
        + markdown_table(rows, [("call", "call"), ("per_step", "per step"), ("us_per_call", "us/call"),
                                ("ms_per_step", "ms/step"), ("share_of_step", "of step")])
        + f"\n\nSum of the calls {total * 1e3:.2f} ms of {step_ms:.2f} ms measured. MLX's per-primitive "
        f"cost (a chained 1-element add): {overhead * 1e6:.2f} us; x {n_ops} primitives = "
        f"{n_ops * overhead * 1e3:.2f} ms ({n_ops * overhead * 1e3 / step_ms:.0%} of the step, an upper "
        f"bound: mx.compile fuses the elementwise ones).\n\n"
        f"## Each piece in place (the step timed without it, interleaved)\n\n"
        + markdown_table(place_rows, [("variant", "variant"), ("ms_per_step", "ms/step"),
                                      ("piece_ms", "the piece, ms (paired median)"), ("piece_share", "of the step")])
    )
    print(markdown)
    info = machine_info()
    info["load_average_1_5_15_min"] = load
    folder = write_results("gpt_decode_profile", info, rows + place_rows, markdown)
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
