"""mlx_ext.gather_qmm against mx.gather_qmm and against our own dense
quantized matmul doing the same FLOPs, side by side in one process.

    python -m bench.bench_gather_qmm            # the full table (~3 min)
    python -m bench.bench_gather_qmm --quick    # a smoke run
    python -m bench.bench_gather_qmm --device gpu   # CUDA (bench_gather_qmm_gpu.py)

Shapes (issue 16): 128 experts of N=768 x K=2048 routed top-8 (Qwen3-30B-A3B
like) and 32 experts of 2880 x 2880 routed top-4 (GPT-OSS-20B like); 4-bit,
group 64, float32 activations and scales (MLX's CPU kernels are far slower
still with float16). x is (M, 1, 1, K) with (M, top_k) expert indices, as
mlx-lm's SwitchGLU passes them; mx.gather_qmm gets them sorted where mlx-lm
sorts (M * top_k >= 64), mlx_ext unsorted always (it groups by expert).

The dense baseline is mlx_ext.quantized_matmul of x (M, K) with one
(top_k * N, K) matrix: the same FLOPs at every M and, at M=1, the same bytes
as the top_k experts a token reads. "GB/s" counts the bytes of the distinct
experts a call reads (weights + scales + biases) once; copy BW is bytes read +
written, measured in the same run. Call i routes to experts shifted by
i * M * top_k, so consecutive calls read other experts (the whole set exceeds
96 MiB), and the dense matrices rotate over > 96 MiB.

"SwiGLU fused ms" times mlx_ext.gather_quantized_swiglu (SwitchGLU's gate, up
and activation in one primitive, with a second stack of experts as up) and
"x SwiGLU unfused" the two mlx_ext.gather_qmm calls and MLX's silu * up over it.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx_ext

from . import harness
from .harness import Target

SHAPES = [(128, 768, 2048, 8), (32, 2880, 2880, 4)]  # (experts, N, K, top_k)
ROWS = [1, 8, 512]
BITS, GROUP_SIZE = 4, 64
CACHE_BYTES = 96 << 20
MLX_SORTS_FROM = 64  # mlx-lm's SwitchGLU sorts the pairs when indices.size >= 64


def quantized(shape, seed):
    w = mx.random.normal(shape, key=mx.random.key(seed)) * 0.02
    q = mx.quantize(w, group_size=GROUP_SIZE, bits=BITS)
    mx.eval(q)
    return q


def routings(rng, experts, m, top_k, calls):
    """`calls` routings (m, top_k), distinct experts per token, call i shifted by i * m * top_k."""
    base = np.stack([rng.permutation(experts)[:top_k] for _ in range(m)])
    return [mx.array(((base + i * m * top_k) % experts).astype(np.uint32)) for i in range(calls)]


def mlx_call(x, w, s, b, idx):
    """mx.gather_qmm as mlx-lm's SwitchGLU calls it (sorted from 64 pairs)."""
    if idx.size < MLX_SORTS_FROM:
        return mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=GROUP_SIZE, bits=BITS)
    flat = idx.flatten()
    order = mx.argsort(flat)
    xs = x.reshape(-1, 1, x.shape[-1])[order // idx.shape[-1]]
    out = mx.gather_qmm(xs, w, s, b, rhs_indices=flat[order], transpose=True, group_size=GROUP_SIZE,
                        bits=BITS, sorted_indices=True)
    return out[mx.argsort(order)]


def bench_shape(experts, n, k, top_k, rows, copy_bw, mlx_budget, repeats):
    w, s, b = quantized((experts, n, k), 0)
    up = quantized((experts, n, k), 9)  # a second stack: the SwiGLU's up projections (w is the gate)
    expert_bytes = (w.nbytes + s.nbytes + b.nbytes) // experts
    dense_one = quantized((top_k * n, k), 1)
    dense_bytes = sum(a.nbytes for a in dense_one)
    dense = [dense_one] + [quantized((top_k * n, k), 2 + i)
                           for i in range(math.ceil(CACHE_BYTES / dense_bytes))]
    rng = np.random.default_rng(experts)
    results, mlx_per_pair = [], None
    for m in rows:
        x = mx.random.normal((m, 1, 1, k), key=mx.random.key(m))
        x2 = x.reshape(m, k)
        calls = max(2, math.ceil(experts / (m * top_k)))
        idx = routings(rng, experts, m, top_k, calls)
        mx.eval(x, x2, idx)
        read = np.mean([len(np.unique(np.array(i))) for i in idx]) * expert_bytes
        flops = 2.0 * m * top_k * n * k

        ours = lambda i: mx.eval(mlx_ext.gather_qmm(x, w, s, b, rhs_indices=idx[i % calls],
                                                    group_size=GROUP_SIZE, bits=BITS))
        dense_call = lambda i: mx.eval(mlx_ext.quantized_matmul(x2, *dense[i % len(dense)],
                                                                group_size=GROUP_SIZE, bits=BITS))
        # SwitchGLU's gate, up and activation: fused, and as two gathers + MLX's silu * up.
        fused = lambda i: mx.eval(mlx_ext.gather_quantized_swiglu(x, w, s, b, *up, rhs_indices=idx[i % calls],
                                                                  group_size=GROUP_SIZE, bits=BITS))
        # Every routing (all experts of both stacks) and every dense copy read
        # once before any timing (harness.read_each_once says why).
        harness.read_each_once(fused, calls)
        harness.read_each_once(dense_call, len(dense))
        t_ours = harness.time_calls(ours, warmup=1, repeats=repeats)["median_s"]

        def unfused(i):
            kw = dict(rhs_indices=idx[i % calls], group_size=GROUP_SIZE, bits=BITS)
            g, u = mlx_ext.gather_qmm(x, w, s, b, **kw), mlx_ext.gather_qmm(x, *up, **kw)
            mx.eval(nn.silu(g) * u)

        t_fused = harness.time_calls(fused, warmup=1, repeats=repeats)["median_s"]
        t_unfused = harness.time_calls(unfused, warmup=1, repeats=repeats)["median_s"]
        t_dense = harness.time_calls(dense_call, warmup=1, repeats=repeats)["median_s"]
        pairs = m * top_k
        t_mlx = None
        if mlx_per_pair is None or mlx_per_pair * pairs <= mlx_budget:
            theirs = lambda i: mx.eval(mlx_call(x, w, s, b, idx[i % calls]))
            few = mlx_per_pair is not None and mlx_per_pair * pairs > 0.5
            t_mlx = harness.time_calls(theirs, warmup=0 if few else 1, repeats=2 if few else repeats)["median_s"]
            mlx_per_pair = t_mlx / pairs
        row = {
            "experts": experts, "N": n, "K": k, "top_k": top_k, "M": m,
            "mlx_ext_ms": 1e3 * t_ours,
            "mlx_ms": 1e3 * t_mlx if t_mlx else None,
            "dense_ms": 1e3 * t_dense,
            "vs_mlx": t_mlx / t_ours if t_mlx else None,
            "mlx_ext_GBps": read / t_ours / 1e9,
            "frac_copy_bw": read / t_ours / copy_bw,
            "dense_frac_copy_bw": dense_bytes / t_dense / copy_bw,
            "mlx_ext_GFLOPs": flops / t_ours / 1e9,
            "dense_GFLOPs": flops / t_dense / 1e9,
            "swiglu_fused_ms": 1e3 * t_fused,
            "swiglu_gain": t_unfused / t_fused,
            "mlx_note": "" if t_mlx else f"not run: ~{mlx_per_pair * pairs:.0f} s/call",
        }
        harness.print_row(row)
        results.append(row)
    return results


def targets(rows):
    out = []
    for experts, n, k, top_k in SHAPES:
        shape = f"{experts}x{n}x{k} top-{top_k}"
        r = harness.find_row(rows, experts=experts, M=1)
        if r:
            frac = r["frac_copy_bw"] / r["dense_frac_copy_bw"]
            out.append(Target(f"M=1 {shape}: expert weights at >= 0.8 of the copy-BW fraction of our dense GEMV",
                              f"{frac:.2f} ({r['frac_copy_bw']:.0%} vs {r['dense_frac_copy_bw']:.0%} of copy BW)",
                              frac >= 0.8))
        r = harness.find_row(rows, experts=experts, M=512)
        if r:
            frac = r["mlx_ext_GFLOPs"] / r["dense_GFLOPs"]
            out.append(Target(f"M=512 {shape}: >= 0.8 of our dense GEMM rate",
                              f"{frac:.2f} ({r['mlx_ext_GFLOPs']:.0f} vs {r['dense_GFLOPs']:.0f} GFLOP/s)",
                              frac >= 0.8))
    return out


COLUMNS = [
    ("experts", "E"), ("N", "N"), ("K", "K"), ("top_k", "top-k"), ("M", "M"),
    ("mlx_ext_ms", "mlx_ext ms"), ("mlx_ms", "mx.gather_qmm ms"), ("dense_ms", "dense qmm ms"),
    ("vs_mlx", "x mx"), ("mlx_ext_GBps", "GB/s"), ("frac_copy_bw", "of copy BW"),
    ("dense_frac_copy_bw", "dense of copy BW"), ("mlx_ext_GFLOPs", "GFLOP/s"),
    ("dense_GFLOPs", "dense GFLOP/s"), ("swiglu_fused_ms", "SwiGLU fused ms"),
    ("swiglu_gain", "x SwiGLU unfused"), ("mlx_note", "note"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first shape, M=1 and 8, few repeats")
    parser.add_argument("--mlx-budget", type=float, default=3.0,
                        help="skip mx.gather_qmm calls estimated to take longer (seconds)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: MLX's CUDA backend (bench_gather_qmm_gpu.py)")
    args = parser.parse_args()
    if args.device == "gpu":
        from .bench_gather_qmm_gpu import main_gpu

        return main_gpu(args)
    mx.set_default_device(mx.cpu)

    info = harness.machine_info()
    bw = harness.copy_bandwidth()
    info["copy_bandwidth_GBps"] = round(bw["bytes_per_s"] / 1e9, 2)
    info["copy_bandwidth_threads"] = bw["threads"]
    print(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (read + write, {bw['threads']} threads)")
    shapes, rows = (SHAPES[:1], [1, 8]) if args.quick else (SHAPES, ROWS)
    results = []
    for shape in shapes:
        results += bench_shape(*shape, rows, bw["bytes_per_s"], args.mlx_budget, 3 if args.quick else args.repeats)
    markdown = harness.markdown_table(results, COLUMNS)
    markdown += "\n\n" + harness.render_targets("Speed targets (issue 16, CPU)", targets(results))
    markdown += ("\n\nReproduce: `.venv/bin/python -m bench.bench_gather_qmm`. 4-bit, group_size 64, "
                 "float32 activations and scales, device CPU; see the script's docstring for what "
                 "each column counts.")
    name = "gather_qmm" + ("_quick" if args.quick else "")
    folder = harness.write_results(name, info, results, markdown)
    print(markdown)
    print(f"\nwritten to {folder}")


if __name__ == "__main__":
    main()
