"""mlx_ext.quantized_matmul against mx.quantized_matmul and NumPy's dense
float32 matmul, side by side in one process, on the same inputs.

    python -m bench.bench_quantized_matmul            # the full table
    python -m bench.bench_quantized_matmul --quick    # a smoke run

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
import time

import numpy as np

import mlx.core as mx
import mlx_ext

from . import harness

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
    return harness.time_calls(
        lambda i: mx.eval(fn(x, *copies[i % len(copies)])), warmup=1, repeats=repeats
    )["median_s"]


def bench_shape(n, k, bits, dtype_name, rows, copy_bw, mlx_budget, repeats):
    dtype = DTYPES[dtype_name]
    one = quantized_copies(n, k, bits, dtype, 1)[0]
    q_bytes = sum(a.nbytes for a in one)
    copies = [one] + quantized_copies(n, k, bits, dtype, max(1, math.ceil(CACHE_BYTES / q_bytes)), seed=1)
    dense = [np.random.default_rng(i).standard_normal((n, k), dtype=np.float32)
             for i in range(max(2, math.ceil(CACHE_BYTES / (4 * n * k))))]
    ours = lambda x, w, s, b: mlx_ext.quantized_matmul(x, w, s, b, group_size=GROUP_SIZE, bits=bits)
    theirs = lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, group_size=GROUP_SIZE, bits=bits)
    results = []
    mlx_m1 = None
    for m in rows:
        x = mx.random.normal((m, k), key=mx.random.key(m)).astype(dtype)
        xn = np.array(x.astype(mx.float32))
        mx.eval(x)
        t_ours = time_mx(ours, copies, x, repeats)
        t_numpy = harness.time_calls(lambda i: xn @ dense[i % len(dense)].T, warmup=1,
                                     repeats=max(3, repeats // 3))["median_s"]
        time.sleep(0.3)  # let OpenBLAS's threads stop spinning before timing others
        t_mlx = None
        if m == 1 or (mlx_m1 is not None and mlx_m1 * m <= mlx_budget):
            slow = mlx_m1 is not None and mlx_m1 * m > 0.5
            t_mlx = time_mx(theirs, copies, x, 2 if slow or (m == 1 and dtype != mx.float32) else repeats)
            if m == 1:
                mlx_m1 = t_mlx
        flops = 2.0 * m * n * k
        row = {
            "N": n, "K": k, "M": m, "bits": bits, "group_size": GROUP_SIZE, "dtype": dtype_name,
            "mlx_ext_ms": 1e3 * t_ours,
            "mlx_ms": 1e3 * t_mlx if t_mlx else None,
            "numpy_f32_ms": 1e3 * t_numpy,
            "mlx_ext_GBps": q_bytes / t_ours / 1e9,
            "frac_copy_bw": q_bytes / t_ours / copy_bw,
            "mlx_ext_GFLOPs": flops / t_ours / 1e9,
            "numpy_GFLOPs": flops / t_numpy / 1e9,
            "vs_mlx": t_mlx / t_ours if t_mlx else None,
            "vs_numpy": t_numpy / t_ours,
            "mlx_note": "" if t_mlx else f"not run: ~{mlx_m1 * m:.0f} s/call",
        }
        results.append(row)
        print("  ".join(f"{key}={harness_fmt(val)}" for key, val in row.items()), flush=True)
    return results


def harness_fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def targets(rows, copy_bw):
    """The foundation issue's speed targets, checked against this run."""
    def find(**kw):
        return next(r for r in rows if all(r[k] == v for k, v in kw.items()))

    out = []
    gemv32 = find(N=14336, K=4096, M=1, bits=4, dtype="float32")
    gemv16 = find(N=14336, K=4096, M=1, bits=4, dtype="float16")
    out.append(("4-bit GEMV M=1 14336x4096 (f16) >= 70% of copy bandwidth",
                f"{gemv16['frac_copy_bw']:.0%} ({gemv16['mlx_ext_GBps']:.1f} GB/s of {copy_bw / 1e9:.1f})",
                gemv16["frac_copy_bw"] >= 0.70))
    out.append(("4-bit GEMV M=1 14336x4096 (f32) >= 70% of copy bandwidth",
                f"{gemv32['frac_copy_bw']:.0%} ({gemv32['mlx_ext_GBps']:.1f} GB/s)",
                gemv32["frac_copy_bw"] >= 0.70))
    for r, name in [(gemv32, "f32"), (gemv16, "f16")]:
        out.append((f"4-bit GEMV M=1 14336x4096 ({name}) >= 4x NumPy dense f32 GEMV",
                    f"{r['vs_numpy']:.1f}x", r["vs_numpy"] >= 4))
    out.append(("4-bit GEMV M=1 14336x4096 >= 30x mx.quantized_matmul, float32 activations",
                f"{gemv32['vs_mlx']:.0f}x", gemv32["vs_mlx"] >= 30))
    out.append(("4-bit GEMV M=1 14336x4096 >= 300x mx.quantized_matmul, float16 activations",
                f"{gemv16['vs_mlx']:.0f}x", gemv16["vs_mlx"] >= 300))
    for dtype in DTYPES:
        g = find(N=4096, K=4096, M=256, bits=4, dtype=dtype)
        frac = g["mlx_ext_GFLOPs"] / g["numpy_GFLOPs"]
        out.append((f"4-bit GEMM M=256 4096x4096 ({dtype}) >= 60% of NumPy f32 GEMM rate",
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    parser.add_argument("--mlx-budget", type=float, default=5.0,
                        help="skip MLX calls estimated to take longer (seconds)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
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
        checks = targets(results, bw["bytes_per_s"])
        markdown += "\n\n## Speed targets (foundation issue)\n\n" + "\n".join(
            f"- {'MET' if ok else 'NOT MET'}: {name}: {value}" for name, value, ok in checks)
        markdown += ("\n\nReproduce: `make bench` (or `.venv/bin/python -m bench.bench_quantized_matmul`)."
                     " group_size 64, device CPU, weights rotated over > 96 MiB.")
    folder = harness.write_results("quantized_matmul" + ("_quick" if args.quick else ""), info,
                                   results, markdown)
    print(markdown)
    print(f"\nwritten to {folder}")


if __name__ == "__main__":
    main()
