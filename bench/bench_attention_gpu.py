"""`python -m bench.bench_attention --device gpu`: mlx_ext.scaled_dot_product_attention
against mx.fast.scaled_dot_product_attention and mlx-lm's quantized attention on
MLX's CUDA backend, side by side in one process (the CUDA issue's table).

Shapes: B=1, Hq=32, Hkv=8, D=128, bfloat16. Decode (L=1) over a contiguous K/V
and over a slice [:, :, :S] of a buffer of S + 200 rows (a capacity that is not
a multiple of 256); 8-/4-bit K/V in mlx-lm's QuantizedKVCache format (group size
64, bfloat16 scales). Causal prefill L=S=8192 at D = 128, 192 and 256.
Backward (forward + gradient of q, k, v) causal at L=S=4096 and 4160.
Timing (bench/gpu.py): decode in pipelined rounds, one eval per round, K/V
rotated over >= 256 MiB of copies; prefill and backward two calls per eval.
GB/s counts the K/V bytes (codes, scales, biases) read once per call; copy BW
is bytes read + written; FLOP/s counts the causal half (4 L S D Hq / 2).
Peak: MLX's peak memory over one call above what was allocated before it.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx_ext
from mlx.utils import tree_flatten

from . import gpu, harness

HQ, HKV, D, GROUP_SIZE = 32, 8, 128, 64
DECODE_S = [4096, 32768, 131072]
QUANT_S = [32768, 131072]
PREFILL_D = [128, 192, 256]
PREFILL_L = 8192
BACKWARD_L = [4096, 4160]
DTYPE = mx.bfloat16

try:  # the baseline of the quantized rows; absent: those columns are left empty
    from mlx_lm.models.base import quantized_scaled_dot_product_attention
except ImportError:  # pragma: no cover
    quantized_scaled_dot_product_attention = None


def kv_copies(kv_len, bits, capacity=None):
    """Enough K/V pairs to exceed gpu.ROTATE_BYTES; each a float pair or two
    QuantizedKVCache tuples; with `capacity`, slices of larger buffers."""
    def one(seed):
        rows = capacity or kv_len
        kv = [mx.random.normal((1, HKV, rows, D), key=mx.random.key(seed + i)).astype(DTYPE) for i in (1, 2)]
        if bits:
            kv = [mx.quantize(x, group_size=GROUP_SIZE, bits=bits) for x in kv]
        if capacity:
            kv = [tuple(a[:, :, :kv_len] for a in x) if bits else x[:, :, :kv_len] for x in kv]
        mx.eval(kv)
        return kv

    first = one(0)
    nbytes = sum(a.nbytes for _, a in tree_flatten(first))  # a slice's: its S rows
    copies = [first] + [one(10 * c) for c in range(1, max(1, math.ceil(gpu.ROTATE_BYTES / nbytes)))]
    mx.eval([a.sum() for _, a in tree_flatten(copies)])  # every copy read once before timing
    return copies, nbytes


def time_decode(fn, copies):
    q = mx.random.normal((1, HQ, 1, D), key=mx.random.key(0)).astype(DTYPE)
    make = lambda j: fn(q, *copies[j % len(copies)])  # noqa: E731
    return gpu.gpu_time(make, gpu.calls_per_eval(make), pipelined=True)


def decode_rows(copy_bw):
    rows, fast = [], {}
    scale = D**-0.5
    for kv_len in DECODE_S:
        for layout in ["contiguous", "sliced"]:
            copies, nbytes = kv_copies(kv_len, 0, capacity=kv_len + 200 if layout == "sliced" else None)
            ours = time_decode(lambda q, k, v: mlx_ext.scaled_dot_product_attention(q, k, v, scale=scale), copies)
            theirs = time_decode(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), copies)
            if layout == "contiguous":
                fast[kv_len] = theirs
            rows.append({"case": f"decode S={kv_len}", "kv": f"bf16 {layout}", "ours_us": ours * 1e6,
                         "fast_us": theirs * 1e6, "fast_x": theirs / ours, "kv_GBps": nbytes / ours / 1e9,
                         "of_copy_bw": nbytes / ours / copy_bw})
            print(rows[-1], flush=True)
            del copies
    for kv_len in QUANT_S:
        for bits in [8, 4]:
            copies, nbytes = kv_copies(kv_len, bits)
            ours = time_decode(lambda q, k, v: mlx_ext.scaled_dot_product_attention(
                q, k, v, scale=scale, bits=bits, group_size=GROUP_SIZE), copies)
            row = {"case": f"decode S={kv_len}", "kv": f"{bits}-bit", "ours_us": ours * 1e6,
                   "of_fast_bf16": ours / fast[kv_len], "kv_GBps": nbytes / ours / 1e9,
                   "of_copy_bw": nbytes / ours / copy_bw}
            if quantized_scaled_dot_product_attention is not None:
                lm = time_decode(lambda q, k, v: quantized_scaled_dot_product_attention(
                    q, k, v, scale=scale, mask=None, group_size=GROUP_SIZE, bits=bits), copies)
                row.update(mlx_lm_us=lm * 1e6, mlx_lm_x=lm / ours)
            rows.append(row)
            print(row, flush=True)
            del copies
    return rows


def time_and_peak(fn):
    """(seconds per call, peak bytes of one call) of fn(), which returns arrays."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    peak = mx.get_peak_memory() - base
    return gpu.gpu_time(lambda j: fn(), calls=2, repeats=5), peak


def prefill_rows():
    rows = []
    for head_dim in PREFILL_D:
        q, k, v = (mx.random.normal((1, h, PREFILL_L, head_dim), key=mx.random.key(i)).astype(DTYPE)
                   for i, h in enumerate([HQ, HKV, HKV]))
        mx.eval(q, k, v)
        scale = head_dim**-0.5
        flops = 4 * HQ * PREFILL_L * PREFILL_L * head_dim / 2
        ours, peak = time_and_peak(lambda: mlx_ext.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"))
        theirs, peak_fast = time_and_peak(lambda: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=scale, mask="causal"))
        rows.append({"case": f"causal prefill L=S={PREFILL_L} D={head_dim}", "kv": "bf16",
                     "ours_us": ours * 1e6, "fast_us": theirs * 1e6, "fast_x": theirs / ours,
                     "TFLOPs": flops / ours / 1e12, "fast_TFLOPs": flops / theirs / 1e12,
                     "peak_ours_MB": peak / 1e6, "peak_fast_MB": peak_fast / 1e6})
        print(rows[-1], flush=True)
    return rows


def backward_rows():
    rows = []
    for length in BACKWARD_L:
        q, k, v, cot = (mx.random.normal((1, h, length, D), key=mx.random.key(i)).astype(DTYPE)
                        for i, h in enumerate([HQ, HKV, HKV, HQ]))
        mx.eval(q, k, v, cot)

        def grads(sdpa):
            loss = lambda q, k, v: (sdpa(q, k, v, scale=D**-0.5, mask="causal") * cot).sum()  # noqa: E731
            return lambda: mx.grad(loss, argnums=(0, 1, 2))(q, k, v)

        ours, peak = time_and_peak(grads(mlx_ext.scaled_dot_product_attention))
        theirs, peak_fast = time_and_peak(grads(mx.fast.scaled_dot_product_attention))
        rows.append({"case": f"backward causal L=S={length}", "kv": "bf16", "ours_us": ours * 1e6,
                     "fast_us": theirs * 1e6, "fast_x": theirs / ours, "peak_ours_MB": peak / 1e6,
                     "peak_fast_MB": peak_fast / 1e6, "peak_ratio": peak / max(peak_fast, 1)})
        print(rows[-1], flush=True)
    return rows


COLUMNS = [
    ("case", "case"), ("kv", "K/V"), ("ours_us", "mlx_ext us"), ("fast_us", "mx.fast us"),
    ("fast_x", "mx.fast / mlx_ext"), ("of_fast_bf16", "mlx_ext / mx.fast bf16"),
    ("mlx_lm_us", "mlx-lm quantized us"), ("mlx_lm_x", "mlx-lm / mlx_ext"),
    ("kv_GBps", "K/V GB/s"), ("of_copy_bw", "of copy BW"), ("TFLOPs", "mlx_ext TFLOP/s"),
    ("fast_TFLOPs", "mx.fast TFLOP/s"), ("peak_ours_MB", "peak mlx_ext MB"),
    ("peak_fast_MB", "peak mx.fast MB"), ("peak_ratio", "peak mlx_ext / mx.fast"),
]


def targets(rows):
    """The CUDA issue's targets, each met or not on this run."""
    by = {(r["case"], r["kv"]): r for r in rows}
    out = []

    def add(name, row, key, fmt, ok):
        if row and row.get(key) is not None:
            out.append(harness.Target(name, fmt.format(row[key]), ok(row[key])))

    add("decode 4K bf16 <= 0.5x mx.fast's time", by.get(("decode S=4096", "bf16 contiguous")), "fast_x",
        "mx.fast / mlx_ext = {:.2f}x", lambda x: x >= 2.0)
    for s, limit in [(32768, 0.85), (131072, 0.9)]:
        for layout in ["contiguous", "sliced"]:
            add(f"decode {s // 1024}K bf16 ({layout}) >= {limit} of copy BW", by.get((f"decode S={s}", f"bf16 {layout}")),
                "of_copy_bw", "{:.2f}", lambda x, limit=limit: x >= limit)
    for s in QUANT_S:
        for bits, limit in [(8, 0.6), (4, 0.35)]:
            r = by.get((f"decode S={s}", f"{bits}-bit"))
            add(f"decode {s // 1024}K {bits}-bit <= {limit}x mx.fast on bf16", r, "of_fast_bf16", "{:.2f}x",
                lambda x, limit=limit: x <= limit)
            add(f"decode {s // 1024}K {bits}-bit >= 5x mlx-lm's quantized attention", r, "mlx_lm_x", "{:.1f}x",
                lambda x: x >= 5)
    add("causal prefill 8K D=128 >= 0.9x mx.fast's FLOP rate", by.get((f"causal prefill L=S={PREFILL_L} D=128", "bf16")),
        "fast_x", "{:.2f}x", lambda x: x >= 0.9)
    for head_dim in [192, 256]:
        add(f"causal prefill 8K D={head_dim} >= 3x mx.fast", by.get((f"causal prefill L=S={PREFILL_L} D={head_dim}", "bf16")),
            "fast_x", "{:.2f}x", lambda x: x >= 3)
    add("backward 4K causal <= 1.5x MLX's time", by.get(("backward causal L=S=4096", "bf16")), "fast_x",
        "MLX / mlx_ext = {:.2f}x", lambda x: x >= 1 / 1.5)
    r = by.get(("backward causal L=S=4160", "bf16"))
    add("backward 4160 causal >= 4x MLX's unfused vjp", r, "fast_x", "{:.2f}x", lambda x: x >= 4)
    add("backward 4160 causal peak <= 1/5 of MLX's", r, "peak_ratio", "{:.3f}", lambda x: x <= 0.2)
    return out


def main_gpu(args):
    info, bw = gpu.start()
    print(f"device copy bandwidth {bw['copy_GBps']:.0f} GB/s (read + write): {bw}", flush=True)
    rows = decode_rows(bw["copy_GBps"] * 1e9)
    if not args.quick:
        rows += prefill_rows() + backward_rows()
    markdown = harness.markdown_table(rows, COLUMNS)
    markdown += "\n\n" + harness.render_targets("Speed targets (CUDA issue)", targets(rows))
    markdown += "\n\nReproduce: `python -m bench.bench_attention --device gpu`. " + " ".join(
        __doc__.split("\n\n")[1].split())
    folder = harness.write_results("attention" + ("_quick" if args.quick else ""), info, rows, markdown)
    print(markdown)
    print(f"\nwritten to {folder}")
