"""mlx_ext.sparse_matmul against dense NumPy float32, mx.matmul (float32 and
float16), SciPy's CSR, mlx-sparse (when installed) and, for quantized N:M,
our own 4-bit quantized_matmul; side by side in one process, same inputs.

    python -m bench.bench_sparse_matmul            # the full table
    python -m bench.bench_sparse_matmul --quick    # 4096 x 4096, M in {1, 512}

GB/s counts the bytes the sparse format actually stores (values, indices,
masks, scales), read once per call, over the copy bandwidth measured in the
same run (bytes read + written). Every implementation rotates over enough
weight copies to exceed the last-level cache.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import mlx.core as mx
import mlx_ext
from mlx_ext import sparse

from . import harness

SHAPES = [(4096, 4096), (14336, 4096)]  # (N, K)
ROWS = [1, 8, 512]
CACHE_BYTES = 96 << 20
GROUP_SIZE = 64

# name -> builder of a container from a float16 w and a NumPy rng
CASES = {
    "Bitmask 50%": lambda w, rng: sparse.Bitmask.from_dense(w, mask=rng.random(w.shape) < 0.5),
    "CSR 50%": lambda w, rng: sparse.CSR.from_dense(w, mask=rng.random(w.shape) < 0.5),
    "CSR 10%": lambda w, rng: sparse.CSR.from_dense(w, mask=rng.random(w.shape) < 0.1),
    "CSR 5%": lambda w, rng: sparse.CSR.from_dense(w, mask=rng.random(w.shape) < 0.05),
    "2:4": lambda w, rng: sparse.NM.from_dense(w, 2, 4),
    "2:4 4-bit": lambda w, rng: sparse.NM.from_dense(w, 2, 4, bits=4, group_size=GROUP_SIZE),
    "BSR-32 10%": lambda w, rng: sparse.BSR.from_dense(
        w, block=32, mask=rng.random((w.shape[0] // 32, w.shape[1] // 32)) < 0.1),
}


def copies_for(nbytes):
    return max(2, math.ceil(CACHE_BYTES / max(nbytes, 1)))


def timed(fn, count, repeats):
    return harness.time_calls(lambda i: fn(i % count), warmup=1, repeats=repeats)["median_s"]


def bench_case(name, n, k, rows, repeats, baselines):
    rng = np.random.default_rng(0)
    w0 = mx.array(rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(mx.float16)
    first = CASES[name](w0, rng)
    nbytes = first.nbytes
    copies = [first] + [CASES[name](w0 + 0, rng) for _ in range(copies_for(nbytes) - 1)]
    mx.eval(copies)
    out = []
    for m in rows:
        x16 = mx.random.normal((m, k), key=mx.random.key(m)).astype(mx.float16)
        mx.eval(x16)
        t = timed(lambda i: mx.eval(mlx_ext.sparse_matmul(x16, copies[i])), len(copies), repeats)
        row = {"case": name, "N": n, "K": k, "M": m, "MB stored": nbytes / 2**20,
               "mlx_ext_ms": 1e3 * t, "GBps": nbytes / t / 1e9}
        for base, times in baselines.items():
            if m in times:
                row[f"x {base}"] = times[m] / t
        if name.startswith("CSR"):
            row["x scipy"] = scipy_time(copies, m, k, repeats) / t
        if name == "2:4 4-bit":
            row["x qmm 4-bit"] = qmm_time(w0, x16, repeats) / t
        out.append(row)
        print("  ".join(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}"
                        for key, v in row.items()), flush=True)
    return out


def scipy_time(copies, m, k, repeats):
    try:
        import scipy.sparse as sp
    except ImportError:
        return math.nan
    mats = []
    for ws in copies:
        n = ws.shape[0]
        mats.append(sp.csr_matrix((np.array(ws["data"].astype(mx.float32)),
                                   np.array(ws["indices"]).astype(np.int32), np.array(ws["indptr"])),
                                  shape=(n, k)))
    xt = np.random.default_rng(1).standard_normal((k, m), dtype=np.float32)
    return timed(lambda i: mats[i] @ xt, len(mats), max(3, repeats // 3))


def qmm_time(w0, x16, repeats):
    q = [mx.quantize(w0 + 0, group_size=GROUP_SIZE, bits=4) for _ in range(copies_for(w0.nbytes // 4))]
    mx.eval(q)
    return timed(lambda i: mx.eval(mlx_ext.quantized_matmul(x16, *q[i], group_size=GROUP_SIZE, bits=4)),
                 len(q), repeats)


def dense_baselines(n, k, rows, repeats):
    """Times of dense NumPy float32 and mx.matmul float32 / float16 per M."""
    out = {"NumPy f32": {}, "mx f32": {}, "mx f16": {}}
    dense = [np.random.default_rng(i).standard_normal((n, k), dtype=np.float32)
             for i in range(copies_for(4 * n * k))]
    for m in rows:
        x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
        out["NumPy f32"][m] = timed(lambda i: x @ dense[i].T, len(dense), max(3, repeats // 3))
    for dtype, key in [(mx.float32, "mx f32"), (mx.float16, "mx f16")]:
        ws = [mx.array(d).astype(dtype) for d in dense]
        mx.eval(ws)
        for m in rows:
            x = mx.random.normal((m, k)).astype(dtype)
            out[key][m] = timed(lambda i: mx.eval(x @ ws[i].T), len(ws), max(3, repeats // 3))
        del ws
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="write bench/results/<machine>/")
    args = parser.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = [1, 512] if args.quick else ROWS
    info = harness.machine_info()
    bw = harness.copy_bandwidth()
    print(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['threads']} threads)", flush=True)
    results = []
    for n, k in shapes:
        baselines = dense_baselines(n, k, rows, args.repeats)
        for name in CASES:
            for row in bench_case(name, n, k, rows, args.repeats, baselines):
                row["of copy BW"] = row["GBps"] * 1e9 / bw["bytes_per_s"]
                results.append(row)
    columns = [(c, c) for c in ["case", "N", "K", "M", "MB stored", "mlx_ext_ms", "GBps", "of copy BW",
                                "x NumPy f32", "x mx f32", "x mx f16", "x scipy", "x qmm 4-bit"]]
    table = harness.markdown_table(results, columns)
    print(table)
    if args.write:
        info["copy_bandwidth_Bps"] = bw["bytes_per_s"]
        harness.write_results("sparse_matmul", info, results, table)


if __name__ == "__main__":
    main()
