"""mlx_ext.quantized_matmul against mx.quantized_matmul and NumPy's dense
float32 matmul, side by side in one process, on the same inputs.

    python -m bench.bench_quantized_matmul            # the full table
    python -m bench.bench_quantized_matmul --quick    # a smoke run
    python -m bench.bench_quantized_matmul --device gpu   # CUDA: see main_gpu
    python -m bench.bench_quantized_matmul --modes    # affine 4-bit vs mxfp4 / nvfp4 / mxfp8
    python -m bench.bench_quantized_matmul --modes --device gpu   # the same on CUDA

Bandwidth figures count the bytes of the quantized weights + scales + biases
read once per call, over the machine's copy bandwidth (bytes read + written,
measured in the same run). Weights rotate over enough copies to exceed the
last-level cache. MLX's CPU kernel is very slow for float16; a case whose
MLX call would take longer than --mlx-budget seconds (extrapolated linearly
in M from the M=1 call, which is always timed) is reported as not run.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

import mlx.core as mx
import mlx_ext

from . import gpu, harness
from .harness import Target
from .plot import Plot

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
ROWS = [1, 8, 32, 256]
BITS = [4, 8]
DTYPES = {"float32": mx.float32, "float16": mx.float16}
GROUP_SIZE = 64
CACHE_BYTES = 96 << 20  # rotate over more than the last-level cache


def quantized_copies(n, k, bits, dtype, count, seed=0):
    key = mx.random.key(seed)
    copies = []
    for i in range(count):
        w = mx.random.normal((n, k), key=mx.random.split(key, count)[i]).astype(dtype) * 0.02
        copies.append(mx.quantize(w, group_size=GROUP_SIZE, bits=bits))
    mx.eval(copies)
    return copies


def time_mx(fn, copies, x, repeats):
    call = lambda i: mx.eval(fn(x, *copies[i % len(copies)]))
    harness.read_each_once(call, len(copies))
    return harness.time_calls(call, warmup=1, repeats=repeats)["median_s"]


def bench_shape(n, k, bits, dtype_name, rows, copy_bw, mlx_budget, repeats):
    """Times the three implementations in turn on the same inputs: mlx_ext,
    then MLX, then NumPy (whose dense copies are allocated only for its turn:
    writing them slows the other two's memory streams for a while here)."""
    dtype = DTYPES[dtype_name]
    one = quantized_copies(n, k, bits, dtype, 1)[0]
    q_bytes = sum(a.nbytes for a in one)
    copies = [one] + quantized_copies(n, k, bits, dtype, max(1, math.ceil(CACHE_BYTES / q_bytes)), seed=1)
    ours = lambda x, w, s, b: mlx_ext.quantized_matmul(x, w, s, b, group_size=GROUP_SIZE, bits=bits)
    theirs = lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, group_size=GROUP_SIZE, bits=bits)
    xs = {m: mx.random.normal((m, k), key=mx.random.key(m)).astype(dtype) for m in rows}
    mx.eval(list(xs.values()))

    t_ours = {m: time_mx(ours, copies, xs[m], repeats) for m in rows}
    t_mlx, mlx_m1 = {}, None
    for m in rows:
        if m == 1 or (mlx_m1 is not None and mlx_m1 * m <= mlx_budget):
            slow = mlx_m1 is not None and mlx_m1 * m > 0.5
            few = slow or (m == 1 and dtype != mx.float32)
            t_mlx[m] = time_mx(theirs, copies, xs[m], 2 if few else repeats)
            mlx_m1 = mlx_m1 or t_mlx[m]
    dense = [np.random.default_rng(i).standard_normal((n, k), dtype=np.float32)
             for i in range(max(2, math.ceil(CACHE_BYTES / (4 * n * k))))]
    t_numpy = {}
    for m in rows:
        xn = np.array(xs[m].astype(mx.float32))
        call = lambda i: xn @ dense[i % len(dense)].T
        harness.read_each_once(call, len(dense))
        t_numpy[m] = harness.time_calls(call, warmup=1, repeats=max(3, repeats // 3))["median_s"]
    del dense
    time.sleep(0.3)  # let OpenBLAS's threads stop spinning before the next shape

    results = []
    for m in rows:
        flops = 2.0 * m * n * k
        mlx_t = t_mlx.get(m)
        row = {
            "N": n, "K": k, "M": m, "bits": bits, "group_size": GROUP_SIZE, "dtype": dtype_name,
            "mlx_ext_ms": 1e3 * t_ours[m],
            "mlx_ms": 1e3 * mlx_t if mlx_t else None,
            "numpy_f32_ms": 1e3 * t_numpy[m],
            "mlx_ext_GBps": q_bytes / t_ours[m] / 1e9,
            "frac_copy_bw": q_bytes / t_ours[m] / copy_bw,
            "mlx_ext_GFLOPs": flops / t_ours[m] / 1e9,
            "numpy_GFLOPs": flops / t_numpy[m] / 1e9,
            "vs_mlx": mlx_t / t_ours[m] if mlx_t else None,
            "vs_numpy": t_numpy[m] / t_ours[m],
            "mlx_note": "" if mlx_t else f"not run: ~{mlx_m1 * m:.0f} s/call",
        }
        results.append(row)
        harness.print_row(row)
    return results


def targets(rows, copy_bw):
    """The foundation issue's speed targets, checked against this run."""
    out = []
    gemv32 = harness.find_row(rows, N=14336, K=4096, M=1, bits=4, dtype="float32")
    gemv16 = harness.find_row(rows, N=14336, K=4096, M=1, bits=4, dtype="float16")
    out.append(Target("4-bit GEMV M=1 14336x4096 (f16) >= 70% of copy bandwidth",
                      f"{gemv16['frac_copy_bw']:.0%} ({gemv16['mlx_ext_GBps']:.1f} GB/s of "
                      f"{copy_bw / 1e9:.1f})",
                      gemv16["frac_copy_bw"] >= 0.70))
    out.append(Target("4-bit GEMV M=1 14336x4096 (f32) >= 70% of copy bandwidth",
                      f"{gemv32['frac_copy_bw']:.0%} ({gemv32['mlx_ext_GBps']:.1f} GB/s)",
                      gemv32["frac_copy_bw"] >= 0.70))
    for r, name in [(gemv32, "f32"), (gemv16, "f16")]:
        out.append(Target(f"4-bit GEMV M=1 14336x4096 ({name}) >= 4x NumPy dense f32 GEMV",
                          f"{r['vs_numpy']:.1f}x", r["vs_numpy"] >= 4))
    out.append(Target("4-bit GEMV M=1 14336x4096 >= 30x mx.quantized_matmul, float32 activations",
                      f"{gemv32['vs_mlx']:.0f}x", gemv32["vs_mlx"] >= 30))
    out.append(Target("4-bit GEMV M=1 14336x4096 >= 300x mx.quantized_matmul, float16 activations",
                      f"{gemv16['vs_mlx']:.0f}x", gemv16["vs_mlx"] >= 300))
    for dtype in DTYPES:
        g = harness.find_row(rows, N=4096, K=4096, M=256, bits=4, dtype=dtype)
        frac = g["mlx_ext_GFLOPs"] / g["numpy_GFLOPs"]
        out.append(Target(f"4-bit GEMM M=256 4096x4096 ({dtype}) >= 60% of NumPy f32 GEMM rate",
                          f"{frac:.0%} ({g['mlx_ext_GFLOPs']:.0f} of {g['numpy_GFLOPs']:.0f} GFLOP/s)",
                          frac >= 0.60))
    return out


COLUMNS = [
    ("dtype", "act dtype"), ("bits", "bits"), ("N", "N"), ("K", "K"), ("M", "M"),
    ("mlx_ext_ms", "mlx_ext ms"), ("mlx_ms", "mx.qmm ms"), ("numpy_f32_ms", "NumPy f32 ms"),
    ("vs_mlx", "x mx.qmm"), ("vs_numpy", "x NumPy"), ("mlx_ext_GBps", "GB/s"),
    ("frac_copy_bw", "of copy BW"), ("mlx_ext_GFLOPs", "GFLOP/s"), ("numpy_GFLOPs", "NumPy GFLOP/s"),
    ("mlx_note", "note"),
]
PLOT = Plot(x="M", lines=[("mlx_ext_ms", "mlx_ext"), ("mlx_ms", "mx.quantized_matmul"),
                          ("numpy_f32_ms", "NumPy f32 dense matmul")],
            panels=["dtype", "bits", "N", "K"], panel_title="{dtype} x, {bits}-bit W, N={N} K={K}",
            x_label="M (rows of x)", y_label="ms per call (missing: MLX not run, too slow)",
            panels_per_row=3)


# ---------------------------------------------------------------------------
# --modes: the fp modes (mxfp4, nvfp4, mxfp8) beside affine 4-bit gs64 on the
# CPU, each beside mx.quantized_matmul of the same mode, float32 activations.
# ---------------------------------------------------------------------------
MODES = ["affine", "mxfp4", "nvfp4", "mxfp8"]
MODE_SHAPES = [(14336, 4096), (4096, 4096)]  # (N, K)
MODE_ROWS = [1, 8, 256]  # decode, batched decode, a prefill chunk


def bench_mode_shape(n, k, rows, copy_bw, mlx_budget, repeats):
    """Every mode in turn on the same x, weights rotated over > CACHE_BYTES."""
    xs = {m: mx.random.normal((m, k), key=mx.random.key(m)) for m in rows}
    mx.eval(list(xs.values()))
    results = []
    for mode in MODES:
        w = [mx.random.normal((n, k), key=mx.random.key(100 + i)) * 0.02 for i in range(1)]
        one = mx.quantize(w[0], mode=mode)
        mx.eval(one)
        q_bytes = sum(a.nbytes for a in one)
        copies = [one] + [mx.quantize(mx.random.normal((n, k), key=mx.random.key(200 + i)) * 0.02, mode=mode)
                          for i in range(max(1, math.ceil(CACHE_BYTES / q_bytes)))]
        mx.eval(copies)
        ours = lambda x, *q: mlx_ext.quantized_matmul(x, *q, mode=mode)  # noqa: E731
        theirs = lambda x, *q: mx.quantized_matmul(x, *q, mode=mode)  # noqa: E731
        mlx_m1 = None
        for m in rows:
            t_ours = time_mx(ours, copies, xs[m], repeats)
            t_mlx = None
            if m == 1 or (mlx_m1 is not None and mlx_m1 * m <= mlx_budget):
                t_mlx = time_mx(theirs, copies, xs[m], 2 if mlx_m1 and mlx_m1 * m > 0.5 else repeats)
                mlx_m1 = mlx_m1 or t_mlx
            row = {
                "mode": mode, "N": n, "K": k, "M": m, "dtype": "float32",
                "mlx_ext_ms": 1e3 * t_ours, "mlx_ms": 1e3 * t_mlx if t_mlx else None,
                "vs_mlx": t_mlx / t_ours if t_mlx else None,
                "mlx_ext_GBps": q_bytes / t_ours / 1e9, "frac_copy_bw": q_bytes / t_ours / copy_bw,
                "mlx_ext_GFLOPs": 2.0 * m * n * k / t_ours / 1e9,
                "mlx_note": "" if t_mlx else f"not run: ~{mlx_m1 * m:.0f} s/call",
            }
            results.append(row)
            harness.print_row(row)
        del copies
    return results


def mode_targets(rows):
    """Issue 15: each fp mode's M=1 fraction of the copy bandwidth within 10%
    of affine 4-bit's (gs64, the mode's default), on the same shape and run."""
    out = []
    for n, k in MODE_SHAPES:
        affine = harness.find_row(rows, mode="affine", N=n, K=k, M=1)
        for mode in ("mxfp4", "mxfp8"):
            r = harness.find_row(rows, mode=mode, N=n, K=k, M=1)
            if affine and r:
                ratio = r["frac_copy_bw"] / affine["frac_copy_bw"]
                out.append(Target(f"{mode} GEMV M=1 {n}x{k} (f32) copy-BW fraction >= 90% of affine 4-bit's",
                                  f"{r['frac_copy_bw']:.0%} vs {affine['frac_copy_bw']:.0%} ({ratio:.0%})",
                                  ratio >= 0.9))
    return out


MODE_COLUMNS = [
    ("mode", "mode"), ("N", "N"), ("K", "K"), ("M", "M"), ("mlx_ext_ms", "mlx_ext ms"),
    ("mlx_ms", "mx.qmm ms"), ("vs_mlx", "x mx.qmm"), ("mlx_ext_GBps", "GB/s"),
    ("frac_copy_bw", "of copy BW"), ("mlx_ext_GFLOPs", "GFLOP/s"), ("mlx_note", "note"),
]
MODE_PLOT = Plot(x="M", lines=[("mlx_ext_ms", "mlx_ext"), ("mlx_ms", "mx.quantized_matmul")],
                 panels=["mode", "N", "K"], panel_title="{mode}, N={N} K={K} (float32 x)",
                 x_label="M (rows of x)", y_label="ms per call (missing: MLX not run, too slow)",
                 panels_per_row=4)


GPU_MODE_ROWS = [1, 8, 512]


def gpu_bench_modes(n, k, rows, copy_bw):
    """bfloat16 x on MLX's CUDA backend: every mode beside mx.quantized_matmul
    of the same mode, as gpu_bench_shape times them."""
    results = []
    for mode in MODES:
        w = mx.random.normal((n, k), key=mx.random.key(n + k)).astype(mx.bfloat16) * 0.02
        one = mx.quantize(w, mode=mode)
        q_bytes = sum(a.nbytes for a in one)
        copies = [mx.quantize(w + 1e-3 * i, mode=mode) for i in range(max(1, math.ceil(gpu.ROTATE_BYTES / q_bytes)))]
        mx.eval(copies)
        for m in rows:
            x = (mx.random.normal((m, k), key=mx.random.key(m)) * 0.5).astype(mx.bfloat16)
            mx.eval(x)
            ours = lambda j: mlx_ext.quantized_matmul(x, *copies[j % len(copies)], mode=mode)  # noqa: E731
            theirs = lambda j: mx.quantized_matmul(x, *copies[j % len(copies)], mode=mode)  # noqa: E731
            a, b = ours(0), theirs(0)
            err = float(mx.abs((a - b).astype(mx.float32)).max() /
                        mx.maximum(mx.abs(b.astype(mx.float32)).max(), 1e-30))
            calls = gpu.calls_per_eval(theirs)
            t_ours, t_mlx = gpu.gpu_time(ours, calls), gpu.gpu_time(theirs, calls)
            row = {"mode": mode, "N": n, "K": k, "M": m, "dtype": "bfloat16",
                   "mlx_ext_ms": 1e3 * t_ours, "mlx_ms": 1e3 * t_mlx, "vs_mlx": t_mlx / t_ours,
                   "mlx_ext_GBps": q_bytes / t_ours / 1e9, "frac_copy_bw": q_bytes / t_ours / copy_bw,
                   "mlx_ext_GFLOPs": 2.0 * m * n * k / t_ours / 1e9, "mlx_note": f"max rel diff {err:.1e}"}
            results.append(row)
            harness.print_row(row)
        del copies
    return results


def main_modes(args):
    if args.device == "gpu":
        info, bw = gpu.start()
        info["table"] = "modes"
        results = []
        for n, k in MODE_SHAPES:
            results += gpu_bench_modes(n, k, GPU_MODE_ROWS, bw["copy_GBps"] * 1e9)
        markdown = harness.markdown_table(results, MODE_COLUMNS)
        markdown += "\n\n" + harness.render_targets("Speed targets (issue 15, CUDA)", mode_targets(results))
        markdown += ("\n\nReproduce: `python -m bench.bench_quantized_matmul --modes --device gpu`. bfloat16 "
                     "activations; one eval per round (bench/gpu.py); weights rotated over >= 256 MiB.")
        folder = harness.write_results("quantized_matmul_modes", info, results, markdown, MODE_PLOT)
        print(markdown)
        print(f"\nwritten to {folder}")
        return
    mx.set_default_device(mx.cpu)
    info = harness.machine_info()
    info["table"] = "modes"
    info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    bw = harness.copy_bandwidth()
    info["copy_bandwidth_GBps"] = round(bw["bytes_per_s"] / 1e9, 2)
    print(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write, {bw['threads']} threads)")
    results = []
    for n, k in MODE_SHAPES:
        results += bench_mode_shape(n, k, MODE_ROWS, bw["bytes_per_s"], args.mlx_budget, args.repeats)
    markdown = harness.markdown_table(results, MODE_COLUMNS)
    markdown += "\n\n" + harness.render_targets("Speed targets (issue 15, CPU)", mode_targets(results))
    markdown += (f"\n\nLoad average at the start (1, 5, 15 min): {info['load_average_at_start']} on "
                 f"{os.cpu_count()} CPUs: other work on the machine skews every figure.")
    markdown += ("\n\nReproduce: `.venv/bin/python -m bench.bench_quantized_matmul --modes`. float32 "
                 "activations; affine is 4-bit gs64, the fp modes their own group sizes; GB/s counts "
                 "the packed weights and scales (and affine's biases) read once per call; copy BW is "
                 "bytes read + written; weights rotated over > 96 MiB.")
    folder = harness.write_results("quantized_matmul_modes", info, results, markdown, MODE_PLOT)
    print(markdown)
    print(f"\nwritten to {folder}")


# ---------------------------------------------------------------------------
# --device gpu: mlx_ext vs mx.quantized_matmul vs bfloat16 dense mx.matmul on
# MLX's CUDA backend, timed as bench/gpu.py describes.
# ---------------------------------------------------------------------------
GPU_SHAPES = SHAPES + [(128256, 4096)]  # (N, K); the last is an LM head
GPU_ROWS = [1, 8, 32, 512, 4096]


def gpu_call_floor():
    """The per-call floor (gpu.call_floor) of a tiny 4-bit GEMV, N = K = 256, M = 1."""
    w = mx.random.normal((256, 256)).astype(mx.bfloat16)
    q = mx.quantize(w, group_size=GROUP_SIZE, bits=4)
    x = mx.random.normal((1, 256)).astype(mx.bfloat16)
    mx.eval(q, x)
    return gpu.call_floor(lambda j: mlx_ext.quantized_matmul(x, *q, group_size=GROUP_SIZE, bits=4),
                          lambda j: mx.quantized_matmul(x, *q, group_size=GROUP_SIZE, bits=4))


def gpu_bench_shape(n, k, rows, copy_bw, bits_list):
    dtype = mx.bfloat16
    key = mx.random.key(n * 7 + k)
    dense_bytes = n * k * 2
    dense = [mx.random.normal((n, k), key=mx.random.split(key, 8)[i]).astype(dtype) * 0.02
             for i in range(max(1, min(4, math.ceil(gpu.ROTATE_BYTES / dense_bytes))))]
    mx.eval(dense)
    quantized = {}
    for bits in bits_list:
        one_bytes = n * k * bits // 8 + 2 * (n * k // GROUP_SIZE) * 2
        count = max(1, math.ceil(gpu.ROTATE_BYTES / one_bytes))
        quantized[bits] = [mx.quantize(dense[i % len(dense)] + 1e-3 * i, group_size=GROUP_SIZE,
                                       bits=bits) for i in range(count)]
        mx.eval(quantized[bits])
    results = []
    for m in rows:
        x = (mx.random.normal((m, k), key=mx.random.key(m)) * 0.5).astype(dtype)
        mx.eval(x)
        flops = 2.0 * m * n * k
        dense_make = lambda j: x @ dense[j % len(dense)].T
        dense_calls = gpu.calls_per_eval(dense_make)
        t_dense = gpu.gpu_time(dense_make, dense_calls)
        t_dense_p = gpu.gpu_time(dense_make, dense_calls, pipelined=True)
        for bits in bits_list:
            copies = quantized[bits]
            q_bytes = sum(a.nbytes for a in copies[0])
            ours = lambda j: mlx_ext.quantized_matmul(x, *copies[j % len(copies)],
                                                      group_size=GROUP_SIZE, bits=bits)
            theirs = lambda j: mx.quantized_matmul(x, *copies[j % len(copies)],
                                                   group_size=GROUP_SIZE, bits=bits)
            a, b = ours(0), theirs(0)
            err = float(mx.abs((a - b).astype(mx.float32)).max() /
                        mx.maximum(mx.abs(b.astype(mx.float32)).max(), 1e-30))
            calls = gpu.calls_per_eval(theirs)
            t_ours = gpu.gpu_time(ours, calls)
            t_mlx = gpu.gpu_time(theirs, calls)
            t_ours_p = gpu.gpu_time(ours, calls, pipelined=True)
            t_mlx_p = gpu.gpu_time(theirs, calls, pipelined=True)
            row = {
                "N": n, "K": k, "M": m, "bits": bits, "group_size": GROUP_SIZE, "dtype": "bfloat16",
                "calls_per_eval": calls,
                "mlx_ext_us": 1e6 * t_ours, "mlx_us": 1e6 * t_mlx, "bf16_us": 1e6 * t_dense,
                "vs_mlx": t_mlx / t_ours, "vs_bf16": t_dense / t_ours,
                "mlx_ext_GBps": q_bytes / t_ours / 1e9, "mlx_GBps": q_bytes / t_mlx / 1e9,
                "frac_copy_bw": q_bytes / t_ours / copy_bw,
                "mlx_ext_TFLOPs": flops / t_ours / 1e12, "mlx_TFLOPs": flops / t_mlx / 1e12,
                "bf16_TFLOPs": flops / t_dense / 1e12,
                "frac_bf16_rate": t_dense / t_ours,
                "p_mlx_ext_us": 1e6 * t_ours_p, "p_mlx_us": 1e6 * t_mlx_p, "p_bf16_us": 1e6 * t_dense_p,
                "p_vs_mlx": t_mlx_p / t_ours_p, "p_frac_copy_bw": q_bytes / t_ours_p / copy_bw,
                "p_frac_bf16_rate": t_dense_p / t_ours_p,
                "max_rel_diff_vs_mlx": err,
            }
            results.append(row)
            harness.print_row(row)
        del x
    return results


def gpu_targets(rows, copy_bw):
    """The CUDA issue's speed targets, checked against this run."""
    out = []
    gemv = harness.find_row(rows, N=14336, K=4096, M=1, bits=4)
    gemm = harness.find_row(rows, N=4096, K=14336, M=4096, bits=4)
    for how, p in [("one eval per round", ""), ("pipelined rounds", "p_")]:
        if gemv:
            us = gemv[p + "mlx_ext_us"]
            out.append(Target(f"4-bit gs64 GEMV M=1 14336x4096 >= 80% of the device copy bandwidth "
                              f"({how})",
                              f"{gemv[p + 'frac_copy_bw']:.0%} ({us:.1f} us per call, "
                              f"copy BW {copy_bw / 1e9:.0f} GB/s)",
                              gemv[p + "frac_copy_bw"] >= 0.80))
            out.append(Target(f"4-bit gs64 GEMV M=1 14336x4096 >= 3x mx.quantized_matmul ({how})",
                              f"{gemv[p + 'vs_mlx']:.2f}x ({us:.1f} vs {gemv[p + 'mlx_us']:.1f} us)",
                              gemv[p + "vs_mlx"] >= 3))
        if gemm:
            out.append(Target(f"4-bit gs64 GEMM M=4096 4096x14336 >= 60% of bf16 mx.matmul's rate "
                              f"({how})",
                              f"{gemm[p + 'frac_bf16_rate']:.0%} ({gemm[p + 'mlx_ext_us']:.0f} vs "
                              f"{gemm[p + 'bf16_us']:.0f} us)", gemm[p + "frac_bf16_rate"] >= 0.60))
    return out


GPU_COLUMNS = [
    ("bits", "bits"), ("N", "N"), ("K", "K"), ("M", "M"), ("calls_per_eval", "calls/eval"),
    ("mlx_ext_us", "mlx_ext us"), ("mlx_us", "mx.qmm us"), ("bf16_us", "bf16 mm us"),
    ("vs_mlx", "x mx.qmm"), ("vs_bf16", "x bf16 mm"), ("mlx_ext_GBps", "GB/s"),
    ("frac_copy_bw", "of copy BW"), ("mlx_ext_TFLOPs", "TFLOP/s"), ("mlx_TFLOPs", "mx.qmm TFLOP/s"),
    ("bf16_TFLOPs", "bf16 TFLOP/s"), ("p_mlx_ext_us", "pipelined: mlx_ext us"),
    ("p_mlx_us", "mx.qmm us"), ("p_bf16_us", "bf16 mm us"), ("p_vs_mlx", "x mx.qmm"),
    ("p_frac_copy_bw", "of copy BW"), ("p_frac_bf16_rate", "of bf16 rate"),
    ("max_rel_diff_vs_mlx", "max rel diff vs mx.qmm"),
]
GPU_PLOT = Plot(x="M", lines=[("mlx_ext_us", "mlx_ext"), ("mlx_us", "mx.quantized_matmul"),
                              ("bf16_us", "bf16 dense mx.matmul")],
                panels=["bits", "N", "K"], panel_title="bfloat16 x, {bits}-bit W, N={N} K={K}",
                x_label="M (rows of x)", y_label="us per call", variant=("p_", "pipelined rounds"),
                panels_per_row=2)


def plot_for(info):
    """The plot of a results file (python -m bench.plot), by the device it ran on."""
    if info.get("table") == "modes":
        return MODE_PLOT
    return GPU_PLOT if "gpu" in info else PLOT


def main_gpu(args):
    info, bw = gpu.start()
    print(f"device copy bandwidth {bw['copy_GBps']:.0f} GB/s (read + write): {bw}", flush=True)
    floor = gpu_call_floor()
    info.update({k: round(v, 2) for k, v in floor.items()})
    print(f"per-call floor (N = K = 256, {gpu.MAX_CALLS} calls per eval): {floor}", flush=True)
    shapes, rows, bits_list = ((GPU_SHAPES[1:2], [1, 512], [4]) if args.quick
                               else (GPU_SHAPES, GPU_ROWS, BITS))
    if args.rows:
        rows = [int(m) for m in args.rows.split(",")]
    results = []
    for n, k in shapes:
        results += gpu_bench_shape(n, k, rows, bw["copy_GBps"] * 1e9, bits_list)
    markdown = harness.markdown_table(results, GPU_COLUMNS)
    markdown += "\n\n" + harness.render_targets("Speed targets (CUDA issue)",
                                                 gpu_targets(results, bw["copy_GBps"] * 1e9))
    markdown += ("\n\nReproduce: `python -m bench.bench_quantized_matmul --device gpu` "
                 "(scripts/gpu_run.sh on the GPU machine). bfloat16 activations, scales and "
                 "biases; group_size 64; weights rotated over >= 256 MiB; time per call with "
                 "`calls/eval` independent calls per mx.eval, each eval waited for; 'pipelined': "
                 f"{gpu.PIPELINE_ROUNDS} rounds of `calls/eval` calls, each committed with "
                 "mx.async_eval while the GPU runs the previous round (as mlx-lm's generate loop "
                 "does), so MLX's per-call host cost overlaps the kernels; "
                 "GB/s counts the quantized weights, "
                 "scales and biases read once per call; copy BW is bytes read + written. "
                 f"Per-call floor (a 256x256 GEMV, {gpu.MAX_CALLS} calls per eval): mlx_ext "
                 f"{floor['floor_mlx_ext_us']:.1f} us, mx.quantized_matmul {floor['floor_mlx_us']:.1f} us.")
    name = "quantized_matmul" + ("_quick" if args.quick else "")
    if args.rows:
        name += "_m" + "-".join(str(m) for m in rows)
    folder = harness.write_results(name, info, results, markdown, GPU_PLOT)
    print(markdown)
    print(f"\nwritten to {folder}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--mlx-budget", type=float, default=5.0,
                        help="skip MLX calls estimated to take longer (seconds)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: MLX's CUDA backend, bfloat16 (see main_gpu)")
    parser.add_argument("--rows", help="gpu: only these M, comma-separated (e.g. 1,8)")
    parser.add_argument("--modes", action="store_true",
                        help="CPU: affine 4-bit beside mxfp4 / nvfp4 / mxfp8 (see main_modes)")
    args = parser.parse_args()
    if args.modes:
        return main_modes(args)
    if args.device == "gpu":
        return main_gpu(args)
    mx.set_default_device(mx.cpu)

    info = harness.machine_info()
    bw = harness.copy_bandwidth()
    info["copy_bandwidth_GBps"] = round(bw["bytes_per_s"] / 1e9, 2)
    info["copy_bandwidth_threads"] = bw["threads"]
    print(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write, {bw['threads']} threads)")

    shapes, rows, bits_list = (SHAPES[:1], [1, 32], [4]) if args.quick else (SHAPES, ROWS, BITS)
    results = []
    for dtype_name in DTYPES:
        for bits in bits_list:
            for n, k in shapes:
                results += bench_shape(n, k, bits, dtype_name, rows, bw["bytes_per_s"],
                                       args.mlx_budget, 3 if args.quick else args.repeats)
    markdown = harness.markdown_table(results, COLUMNS)
    if not args.quick:
        markdown += "\n\n" + harness.render_targets("Speed targets (foundation issue)",
                                                     targets(results, bw["bytes_per_s"]))
        markdown += ("\n\nReproduce: `make bench` (or `.venv/bin/python -m bench.bench_quantized_matmul`)."
                     " group_size 64, device CPU, weights rotated over > 96 MiB.")
    folder = harness.write_results("quantized_matmul" + ("_quick" if args.quick else ""), info,
                                   results, markdown, PLOT)
    print(markdown)
    print(f"\nwritten to {folder}")


if __name__ == "__main__":
    main()
