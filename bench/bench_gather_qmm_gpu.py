"""`python -m bench.bench_gather_qmm --device gpu`: mlx_ext.gather_qmm on MLX's
CUDA backend beside mx.gather_qmm and our dense quantized matmul over the
same FLOPs, timed as bench/gpu.py describes (independent calls per mx.eval,
rotated routings).

Shapes, rows, routings and columns as the CPU bench (bench_gather_qmm.py's
docstring), with bfloat16 activations, scales and biases (the tensor-core
kernels' type). The dense baseline is mlx_ext.quantized_matmul of x (M, K)
with one (top_k N, K) matrix, rotated over >= bench/gpu.py's ROTATE_BYTES.
"""

from __future__ import annotations

import math

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx_ext

from . import gpu, harness
from .bench_gather_qmm import BITS, COLUMNS, GROUP_SIZE, ROWS, SHAPES, mlx_call, routings, targets

DTYPE = mx.bfloat16


def quantized(shape, seed):
    w = (mx.random.normal(shape, key=mx.random.key(seed)) * 0.02).astype(DTYPE)
    q = mx.quantize(w, group_size=GROUP_SIZE, bits=BITS)
    mx.eval(q)
    return q


def bench_shape(experts, n, k, top_k, rows, copy_bw):
    w, s, b = quantized((experts, n, k), 0)
    up = quantized((experts, n, k), 9)
    expert_bytes = (w.nbytes + s.nbytes + b.nbytes) // experts
    dense_one = quantized((top_k * n, k), 1)
    dense_bytes = sum(a.nbytes for a in dense_one)
    dense = [dense_one] + [quantized((top_k * n, k), 2 + i)
                           for i in range(math.ceil(gpu.ROTATE_BYTES / dense_bytes))]
    rng = np.random.default_rng(experts)
    results = []
    for m in rows:
        x = mx.random.normal((m, 1, 1, k), key=mx.random.key(m)).astype(DTYPE)
        x2 = x.reshape(m, k)
        count = max(2, math.ceil(experts / (m * top_k)))
        idx = routings(rng, experts, m, top_k, count)
        mx.eval(x, x2, idx)
        read = np.mean([len(np.unique(np.array(i))) for i in idx]) * expert_bytes
        flops = 2.0 * m * top_k * n * k
        kw = dict(group_size=GROUP_SIZE, bits=BITS)
        ours = lambda j: mlx_ext.gather_qmm(x, w, s, b, rhs_indices=idx[j % count], **kw)
        theirs = lambda j: mlx_call(x, w, s, b, idx[j % count])
        dense_call = lambda j: mlx_ext.quantized_matmul(x2, *dense[j % len(dense)], **kw)
        fused = lambda j: mlx_ext.gather_quantized_swiglu(x, w, s, b, *up, rhs_indices=idx[j % count], **kw)

        def unfused(j):
            g = mlx_ext.gather_qmm(x, w, s, b, rhs_indices=idx[j % count], **kw)
            u = mlx_ext.gather_qmm(x, *up, rhs_indices=idx[j % count], **kw)
            return nn.silu(g) * u

        a = ours(0)
        c = theirs(0).reshape(a.shape)  # mlx_call's sorted path returns the pairs flat
        err = float(mx.abs((a - c).astype(mx.float32)).max() /
                    mx.maximum(mx.abs(c.astype(mx.float32)).max(), 1e-30))
        calls = gpu.calls_per_eval(ours)
        t_ours = gpu.gpu_time(ours, calls)
        t_mlx = gpu.gpu_time(theirs, calls)
        t_dense = gpu.gpu_time(dense_call, calls)
        t_fused = gpu.gpu_time(fused, calls)
        t_unfused = gpu.gpu_time(unfused, calls)
        row = {
            "experts": experts, "N": n, "K": k, "top_k": top_k, "M": m, "calls_per_eval": calls,
            "mlx_ext_ms": 1e3 * t_ours, "mlx_ms": 1e3 * t_mlx, "dense_ms": 1e3 * t_dense,
            "vs_mlx": t_mlx / t_ours,
            "mlx_ext_GBps": read / t_ours / 1e9,
            "frac_copy_bw": read / t_ours / copy_bw,
            "dense_frac_copy_bw": dense_bytes / t_dense / copy_bw,
            "mlx_ext_GFLOPs": flops / t_ours / 1e9,
            "dense_GFLOPs": flops / t_dense / 1e9,
            "swiglu_fused_ms": 1e3 * t_fused,
            "swiglu_gain": t_unfused / t_fused,
            "mlx_note": f"max rel diff vs mx.gather_qmm {err:.1e}",
        }
        harness.print_row(row)
        results.append(row)
    return results


def main_gpu(args):
    info, bw = gpu.start()
    print(f"device copy bandwidth {bw['copy_GBps']:.0f} GB/s (read + write)", flush=True)
    shapes, rows = (SHAPES[:1], [1, 8]) if args.quick else (SHAPES, ROWS)
    results = []
    for shape in shapes:
        results += bench_shape(*shape, rows, bw["copy_GBps"] * 1e9)
    markdown = harness.markdown_table(results, [COLUMNS[0], *COLUMNS[1:5], ("calls_per_eval", "calls/eval"),
                                                *COLUMNS[5:]])
    markdown += "\n\n" + harness.render_targets("Speed targets (issue 16, CUDA)", targets(results))
    markdown += ("\n\nReproduce: `python -m bench.bench_gather_qmm --device gpu` (scripts/gpu_run.sh). "
                 "bfloat16 activations, scales and biases, 4-bit, group_size 64; time per call with "
                 "`calls/eval` independent calls per mx.eval (bench/gpu.py); dense copies rotated over "
                 ">= 256 MiB; GB/s counts the distinct experts a call reads once; copy BW is bytes read + "
                 "written.")
    name = "gather_qmm" + ("_quick" if args.quick else "")
    folder = harness.write_results(name, info, results, markdown)
    print(markdown)
    print(f"\nwritten to {folder}")
