"""mlx_ext.scaled_dot_product_attention against mx.fast.scaled_dot_product_attention,
mlx-lm's quantized attention and NumPy, side by side in one process, on the
same inputs (CPU).

    python -m bench.bench_attention            # the issue's table
    python -m bench.bench_attention --quick    # a smoke run
    python -m bench.bench_attention --device gpu   # CUDA: bench/bench_attention_gpu.py

Decode rows: L=1, Hq=32, Hkv=8, D=128, K/V float32, float16, or 8-/4-bit
(mlx-lm's QuantizedKVCache format, group size 64, float16 scales, float16 q).
GB/s counts the K/V bytes (codes, scales and biases) read once per call, over
the machine's copy bandwidth (bytes read + written, measured in the same run).
Decode calls rotate over copies of K/V that together exceed the last-level
cache, each read once before timing (NumPy: one copy).
Prefill rows: causal L=S, float32; FLOP/s counts the causal half, 2 L S D Hq
multiply-adds, against NumPy's float32 GEMM rate. Peak: MLX's peak memory
over one call, above what was allocated before it (NumPy: tracemalloc).
NumPy computes in float32 on K/V converted (and K transposed) beforehand. A baseline whose first
call exceeds --budget seconds is timed from that one call.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import mlx.core as mx
import mlx_ext
from mlx.utils import tree_flatten
try:  # absent on machines that only run --device gpu's own rows without it
    from mlx_lm.models.base import quantized_scaled_dot_product_attention
except ImportError:  # pragma: no cover
    quantized_scaled_dot_product_attention = None

from . import harness

HQ, HKV, D, GROUP_SIZE = 32, 8, 128, 64
DECODE_S = [4096, 32768]
PREFILL_L = [512, 2048]
KV_KINDS = ["float32", "float16", "8-bit", "4-bit"]


def timed(fn, repeats, budget):
    """(median seconds, peak bytes) of fn(), which blocks until done."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    peak = mx.get_peak_memory() - base
    if first > budget:
        return first, peak
    return harness.time_calls(lambda _i: fn(), warmup=0, repeats=repeats)["median_s"], peak


def numpy_timed(fn, repeats, budget):
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if first > budget:
        return first, peak
    return harness.time_calls(lambda _i: fn(), warmup=0, repeats=repeats)["median_s"], peak


def numpy_attention(q, k_t, v, scale, causal):
    """q (Hq, L, D), k_t (Hkv, D, S) and v (Hkv, S, D) float32, contiguous (a
    transposed view would take NumPy's slow non-BLAS matmul loop): the float32
    reference, GQA by reshaping."""
    hq, length, _ = q.shape
    hkv, _, kv_len = k_t.shape
    qg = q.reshape(hkv, hq // hkv * length, D) * np.float32(scale)
    scores = qg @ k_t
    if causal:
        rows = np.tile(np.arange(length), hq // hkv)[:, None] + kv_len - length
        scores = np.where(np.arange(kv_len)[None, :] <= rows, scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores @ v).reshape(hq, length, D)


def numpy_gemm_rate(n=2048):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    t = harness.time_calls(lambda _i: a @ a, warmup=1, repeats=5)["median_s"]
    return 2 * n**3 / t


def finish_row(row, ours, numpy_fn, repeats, budget):
    """Adds the NumPy column to `row` and gives its peaks in MB."""
    t, row["peak_numpy_MB"] = numpy_timed(numpy_fn, repeats, budget)
    row["numpy_ms"], row["numpy_x"] = t * 1e3, t / ours
    for key in [c for c in row if c.startswith("peak_")]:
        row[key] = row[key] / 1e6
    return row


def decode_kv(kv_len, kind, seed):
    """One K/V pair of the row's kind: float arrays, or QuantizedKVCache tuples."""
    kv = [mx.random.normal((1, HKV, kv_len, D), key=mx.random.key(seed + i)) for i in (1, 2)]
    if kind in ("float32", "float16"):
        pair = tuple(x.astype(getattr(mx, kind)) for x in kv)
    else:
        bits = int(kind.split("-")[0])
        pair = tuple(mx.quantize(x.astype(mx.float16), group_size=GROUP_SIZE, bits=bits) for x in kv)
    mx.eval(pair)
    return pair


def decode_row(kv_len, kind, copy_bw, repeats, budget):
    """Every timed call reads the next of enough K/V copies to exceed the
    last-level cache, as a decode step over many layers would."""
    q = mx.random.normal((1, HQ, 1, D), key=mx.random.key(0))
    scale = D**-0.5
    quantized = kind not in ("float32", "float16")
    bits = int(kind.split("-")[0]) if quantized else None
    q = q.astype(mx.float16 if quantized else getattr(mx, kind))
    first = decode_kv(kv_len, kind, 0)
    kv_bytes = sum(a.nbytes for _, a in tree_flatten(first))
    copies = [first] + [decode_kv(kv_len, kind, 10 * c) for c in range(1, harness.rotation_count(kv_bytes))]
    # Read every copy once before timing, as a cache is read by earlier decode
    # steps: a buffer's first read after its creation is slower (4K float32:
    # 3.4 ms on the first pass over 17 copies, 2.1 ms on later ones).
    mx.eval(q, [a.sum() for _, a in tree_flatten(copies)])
    row = {"case": f"decode S={kv_len}", "kv": kind, "kv_MB": kv_bytes / 1e6, "copies": len(copies)}

    def rotating(fn):
        calls = iter(range(1 << 30))
        return lambda: mx.eval(fn(*copies[next(calls) % len(copies)]))

    ours, row["peak_ours_MB"] = timed(rotating(lambda k, v: mlx_ext.scaled_dot_product_attention(
        q, k, v, scale=scale, bits=bits)), repeats, budget)
    row["ours_ms"] = ours * 1e3
    row["kv_GBps"] = kv_bytes / ours / 1e9
    row["of_copy_bw"] = kv_bytes / ours / copy_bw
    if bits is None:
        t, row["peak_fast_MB"] = timed(rotating(lambda k, v: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=scale)), repeats, budget)
        row["fast_ms"], row["fast_x"] = t * 1e3, t / ours
    else:
        t, row["peak_mlx_lm_MB"] = timed(rotating(lambda k, v: quantized_scaled_dot_product_attention(
            q, k, v, scale=scale, mask=None, group_size=GROUP_SIZE, bits=bits)), repeats, budget)
        row["mlx_lm_ms"], row["mlx_lm_x"] = t * 1e3, t / ours
    k, v = first
    del copies
    if quantized:
        k, v = (mx.dequantize(*x, group_size=GROUP_SIZE, bits=bits) for x in (k, v))
    np_k, np_v = (np.array(x.astype(mx.float32))[0] for x in (k, v))
    np_k = np.ascontiguousarray(np_k.transpose(0, 2, 1))
    np_q = np.array(q.astype(mx.float32))[0]
    return finish_row(row, ours, lambda: numpy_attention(np_q, np_k, np_v, scale, False), repeats, budget)


def prefill_row(length, gemm_rate, repeats, budget):
    q = mx.random.normal((1, HQ, length, D), key=mx.random.key(0))
    k, v = (mx.random.normal((1, HKV, length, D), key=mx.random.key(i)) for i in (1, 2))
    mx.eval(q, k, v)
    scale = D**-0.5
    flops = 2 * length * length * D * HQ  # causal half of 2 matmuls of 2 L S D
    row = {"case": f"prefill causal L=S={length}", "kv": "float32"}
    ours, row["peak_ours_MB"] = timed(lambda: mx.eval(mlx_ext.scaled_dot_product_attention(
        q, k, v, scale=scale, mask="causal")), repeats, budget)
    row["ours_ms"] = ours * 1e3
    row["GFLOPs"] = flops / ours / 1e9
    row["of_numpy_gemm"] = flops / ours / gemm_rate
    t, row["peak_fast_MB"] = timed(lambda: mx.eval(mx.fast.scaled_dot_product_attention(
        q, k, v, scale=scale, mask="causal")), repeats, budget)
    row["fast_ms"], row["fast_x"] = t * 1e3, t / ours
    np_q, np_k, np_v = (np.array(x)[0] for x in (q, k, v))
    np_k = np.ascontiguousarray(np_k.transpose(0, 2, 1))
    return finish_row(row, ours, lambda: numpy_attention(np_q, np_k, np_v, scale, True), repeats, budget)


COLUMNS = [
    ("case", "case"), ("kv", "K/V"), ("copies", "K/V copies"), ("ours_ms", "mlx_ext ms"),
    ("fast_ms", "mx.fast ms"), ("fast_x", "mx.fast / mlx_ext"),
    ("mlx_lm_ms", "mlx-lm quantized ms"), ("mlx_lm_x", "mlx-lm / mlx_ext"),
    ("numpy_ms", "NumPy ms"), ("numpy_x", "NumPy / mlx_ext"),
    ("kv_GBps", "K/V GB/s"), ("of_copy_bw", "of copy BW"),
    ("GFLOPs", "GFLOP/s"), ("of_numpy_gemm", "of NumPy GEMM"),
    ("peak_ours_MB", "peak mlx_ext MB"), ("peak_fast_MB", "peak mx.fast MB"),
    ("peak_mlx_lm_MB", "peak mlx-lm MB"), ("peak_numpy_MB", "peak NumPy MB"),
]


def targets(rows, copy_bw):
    """The issue's targets on this machine: (name, value, met)."""
    by = {(r["case"], r["kv"]): r for r in rows}
    checks = []
    f32 = by.get(("decode S=32768", "float32"))
    if f32:
        checks.append(("decode S=32K float32 reads K+V at >= 0.7 of copy BW",
                       f"{f32['of_copy_bw']:.2f}", f32["of_copy_bw"] >= 0.7))
    f16 = by.get(("decode S=32768", "float16"))
    for kind, limit in (("8-bit", 0.6), ("4-bit", 0.35)):
        r = by.get(("decode S=32768", kind))
        if r and f16:
            ratio = r["ours_ms"] / f16["ours_ms"]
            checks.append((f"decode 32K {kind} KV <= {limit}x our float16 time", f"{ratio:.2f}x",
                           ratio <= limit))
        if r:
            checks.append((f"decode 32K {kind} KV >= 5x mlx-lm's quantized attention",
                           f"{r['mlx_lm_x']:.1f}x", r["mlx_lm_x"] >= 5))
    p = by.get(("prefill causal L=S=2048", "float32"))
    if p:
        checks.append(("causal prefill 2K >= 3x mx.fast", f"{p['fast_x']:.1f}x", p["fast_x"] >= 3))
        checks.append(("causal prefill 2K >= 40% of NumPy's GEMM rate", f"{p['of_numpy_gemm']:.2f}",
                       p["of_numpy_gemm"] >= 0.4))
        ratio = p["peak_ours_MB"] / max(p["peak_fast_MB"], 1e-9)
        checks.append(("causal prefill 2K peak <= 1/10 of mx.fast's", f"{ratio:.3f}", ratio <= 0.1))
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small sizes only, few repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=10.0,
                        help="time a baseline from one call when that call takes longer (seconds)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: MLX's CUDA backend, bfloat16 (bench/bench_attention_gpu.py)")
    args = parser.parse_args()
    if args.device == "gpu":
        from .bench_attention_gpu import main_gpu

        return main_gpu(args)
    mx.set_default_device(mx.cpu)

    info = harness.machine_info()
    bw = harness.copy_bandwidth()
    info["copy_bandwidth_GBps"] = round(bw["bytes_per_s"] / 1e9, 2)
    gemm = numpy_gemm_rate()
    info["numpy_gemm_GFLOPs"] = round(gemm / 1e9, 1)
    print(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s, NumPy GEMM {gemm / 1e9:.1f} GFLOP/s",
          flush=True)
    repeats = 3 if args.quick else args.repeats
    rows = []
    for kv_len in DECODE_S[:1] if args.quick else DECODE_S:
        for kind in KV_KINDS:
            rows.append(decode_row(kv_len, kind, bw["bytes_per_s"], repeats, args.budget))
            print(rows[-1], flush=True)
    for length in PREFILL_L[:1] if args.quick else PREFILL_L:
        rows.append(prefill_row(length, gemm, repeats, args.budget))
        print(rows[-1], flush=True)
    markdown = harness.markdown_table(rows, COLUMNS)
    if not args.quick:
        markdown += "\n\n## Speed targets (attention issue)\n\n" + "\n".join(
            f"- {'MET' if ok else 'NOT MET'}: {name}: {value}"
            for name, value, ok in targets(rows, bw["bytes_per_s"]))
    markdown += ("\n\nReproduce: `.venv/bin/python -m bench.bench_attention`. "
                 + " ".join(__doc__.split("\n\n")[2].split()))
    folder = harness.write_results("attention" + ("_quick" if args.quick else ""), info, rows, markdown)
    print(markdown)
    print(f"\nwritten to {folder}")


if __name__ == "__main__":
    main()
