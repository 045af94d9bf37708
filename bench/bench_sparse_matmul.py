"""mlx_ext.sparse_matmul against dense NumPy float32, mx.matmul (float32 and
float16), SciPy's CSR, mlx-sparse (when installed) and, for quantized N:M,
our own 4-bit quantized_matmul; side by side in one process, same inputs.

    python -m bench.bench_sparse_matmul --write    # the full table -> bench/results/<machine>/
    python -m bench.bench_sparse_matmul --quick    # 4096 x 4096, M in {1, 512}
    python -m bench.bench_sparse_matmul --no-mlx-sparse   # without installing mlx-sparse
    python -m bench.bench_sparse_matmul --device gpu --write   # CUDA (bench_sparse_matmul_gpu.py)

GB/s counts the bytes the sparse format actually stores (values, indices,
masks, scales), read once per call, over the copy bandwidth measured in the
same run (bytes read + written). Every implementation rotates over enough
weight copies to exceed the last-level cache (the size the OS reports).

mlx-sparse (PyPI) is installed for this run only, with pip --no-deps into a
temporary folder put on sys.path (never into .venv or `make test`); it is timed
on the CSR rows at M = 1 (its pure-MLX fallback takes seconds per call). SciPy is
single-threaded: it runs at M <= 8, and at M = 512 only for densities <= 10%.
Slow calls are timed fewer times (at least 3; see `timed`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

import mlx.core as mx
import mlx_ext
from mlx_ext import sparse

from . import harness

SHAPES = [(4096, 4096), (14336, 4096)]  # (N, K)
ROWS = [1, 8, 512]
MLX_SPARSE = "mlx-sparse==0.0.6b0"


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


def arrays_of(tree):
    """The arrays of containers: mx.eval does not look inside a container, so
    without this the first call on each copy would build it (lazily)."""
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]


def copies_for(nbytes):
    return max(2, harness.rotation_count(max(nbytes, 1)))


def timed(fn, count, repeats):
    """Median of `repeats` calls after a warm-up call on every copy, rotating
    over `count` copies; fewer (at least 3) when a call takes long, about 3 s
    in all, and one when the warm-up call took over 2 s."""
    import time

    t0 = time.perf_counter()
    fn(count - 1)
    first = time.perf_counter() - t0
    if first < 0.5:
        harness.read_each_once(fn, count - 1)  # every copy read once before timing
    repeats = max(1 if first > 2.0 else 3, min(repeats, int(3.0 / max(first, 1e-9))))
    return harness.time_calls(lambda i: fn(i % count), warmup=0, repeats=repeats)["median_s"]


def bench_case(name, n, k, rows, repeats, baselines):
    rng = np.random.default_rng(0)
    w0 = mx.array(rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(mx.float16)
    first = CASES[name](w0, rng)
    nbytes = first.nbytes
    mx.eval(arrays_of(first))
    copies = [first] + [copy.deepcopy(first) for _ in range(copies_for(nbytes) - 1)]
    mx.eval(arrays_of(copies))
    # One untimed call per copy: a copy's pattern is validated on its first use
    # (about 0.1 s at 4096 x 4096), which is not what this bench times.
    x1 = mx.zeros((1, k), dtype=mx.float16)
    for ws in copies:
        mx.eval(mlx_ext.sparse_matmul(x1, ws))
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
        if name.startswith("CSR") and (m <= 8 or first.density <= 0.1):
            row["x scipy"] = scipy_time(copies, m, k, repeats) / t
        if name.startswith("CSR") and m == 1 and MLX_SPARSE_MODULE.get("module"):
            row["x mlx-sparse"] = mlx_sparse_time(copies, x16, repeats) / t
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


MLX_SPARSE_MODULE = {}


def load_mlx_sparse():
    """mlx-sparse installed with --no-deps into a temporary folder for this
    process only; a line saying how it went (its CPU extension needs the MLX
    it was built against, else it runs its pure-MLX fallback)."""
    folder = tempfile.mkdtemp(prefix="mlx-sparse-")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", folder,
                           MLX_SPARSE], capture_output=True, text=True)
    if proc.returncode:
        return f"{MLX_SPARSE} did not install on this machine: {proc.stderr.strip().splitlines()[-1:]}"
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module("mlx_sparse")
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not fatal
        return f"{MLX_SPARSE} installed but does not import: {e!r}"
    MLX_SPARSE_MODULE["module"] = module
    cpu = getattr(module.capabilities, "cpu", None) in (True, "available")
    return (f"{MLX_SPARSE} installed (--no-deps, this run only) beside mlx {mx.__version__}; its compiled "
            f"CPU extension {'loads' if cpu else 'does not load (it asks for mlx<0.32)'}, so what is timed is "
            f"{'its CPU kernel' if cpu else 'its pure-MLX fallback'}")


def mlx_sparse_time(copies, x16, repeats):
    ms = MLX_SPARSE_MODULE["module"]
    mats = []
    for ws in copies:
        n, k = ws.shape
        mats.append(ms.csr_array((ws["data"].astype(mx.float32), ws["indices"].astype(mx.int32), ws["indptr"]),
                                 shape=(n, k)))
    xt = x16.astype(mx.float32).T
    mx.eval(xt)
    return timed(lambda i: mx.eval(ms.csr_matmul(mats[i], xt)), len(mats), repeats)


def qmm_time(w0, x16, repeats):
    q = [mx.quantize(w0 + 0, group_size=GROUP_SIZE, bits=4) for _ in range(copies_for(w0.nbytes // 4))]
    mx.eval(q)
    return timed(lambda i: mx.eval(mlx_ext.quantized_matmul(x16, *q[i], group_size=GROUP_SIZE, bits=4)),
                 len(q), repeats)


def dense_baselines(n, k, rows, repeats):
    """Times of dense NumPy float32 and mx.matmul float32 / float16 per M."""
    out = {"NumPy f32": {}, "mx f32": {}, "mx f16": {}}
    first = np.random.default_rng(0).standard_normal((n, k), dtype=np.float32)
    dense = [first] + [first.copy() for _ in range(copies_for(4 * n * k) - 1)]
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


def targets(results):
    """The issue's targets on this run (every shape measured must meet one)."""

    def rows(case, m):
        return [r for r in results if r["case"] == case and r["M"] == m]

    def check(name, case, m, tests):
        found = rows(case, m)
        if not found:
            return harness.Target(name, "not measured in this run", False)
        values, met = [], True
        for r in found:
            parts = []
            for key, want in tests:
                got = r.get(key, math.nan)
                met &= got >= want
                parts.append(f"{key} {got:.2f} (want >= {want})")
            values.append(f"{r['N']}x{r['K']}: " + ", ".join(parts))
        return harness.Target(name, "; ".join(values), met)

    return [
        check("M=1, Bitmask 50%, float16 values", "Bitmask 50%", 1, [("x NumPy f32", 3), ("of copy BW", 0.7)]),
        check("M=1, 2:4 with 4-bit values vs our 4-bit quantized_matmul", "2:4 4-bit", 1, [("x qmm 4-bit", 1.3)]),
        check("M=1, CSR 10%", "CSR 10%", 1, [("x NumPy f32", 4), ("x scipy", 3)]),
        check("M=1, CSR 5%", "CSR 5%", 1, [("x NumPy f32", 7), ("x scipy", 3)]),
        check("M=512, BSR-32 at 10% block density", "BSR-32 10%", 512, [("x NumPy f32", 5)]),
        check("M=512, CSR 5%", "CSR 5%", 512, [("x NumPy f32", 2)]),
        check("M=512, 2:4", "2:4", 512, [("x NumPy f32", 0.9)]),
    ]


def load_average():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-mlx-sparse", action="store_true", help="do not install and time mlx-sparse")
    parser.add_argument("--write", action="store_true", help="write bench/results/<machine>/")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), metavar="CASE",
                        help=f"only these cases (default all: {', '.join(CASES)})")
    parser.add_argument("--rows", nargs="+", type=int, help=f"only these M (default {ROWS})")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: MLX's CUDA backend, bench/bench_sparse_matmul_gpu.py")
    parser.add_argument("--smoke", action="store_true", help="with --device gpu: tiny shapes, any device")
    args = parser.parse_args()
    if args.device == "gpu":
        from . import bench_sparse_matmul_gpu

        return bench_sparse_matmul_gpu.main(args)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = args.rows or ([1, 512] if args.quick else ROWS)
    cases = args.cases or list(CASES)
    info = harness.machine_info()
    info["load_average_before"] = load_average()
    mlx_sparse_note = "not run (--no-mlx-sparse)" if args.no_mlx_sparse else load_mlx_sparse()
    print(mlx_sparse_note, flush=True)
    bw = harness.copy_bandwidth()
    print(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['threads']} threads)", flush=True)
    results = []
    for n, k in shapes:
        baselines = dense_baselines(n, k, rows, args.repeats)
        for name in cases:
            for row in bench_case(name, n, k, rows, args.repeats, baselines):
                row["of copy BW"] = row["GBps"] * 1e9 / bw["bytes_per_s"]
                results.append(row)
        # Written after each shape: a long run stopped part way keeps what it measured.
        report(args, info, bw, mlx_sparse_note, results)


def report(args, info, bw, mlx_sparse_note, results):
    info["load_average_after"] = load_average()
    columns = [(c, c) for c in ["case", "N", "K", "M", "MB stored", "mlx_ext_ms", "GBps", "of copy BW",
                                "x NumPy f32", "x mx f32", "x mx f16", "x scipy", "x mlx-sparse",
                                "x qmm 4-bit"]]
    notes = (
        f"Weights float16 (values of every format; 4-bit affine with group size {GROUP_SIZE} for "
        f"'2:4 4-bit' and for quantized_matmul), x float16; 'x B' = time of B / time of "
        f"mlx_ext.sparse_matmul (> 1: ours faster). Dense NumPy and mx f32 use float32 weights. GB/s: "
        f"bytes the format stores, read once per call; 'of copy BW': that over the copy bandwidth "
        f"measured in this run ({bw['bytes_per_s'] / 1e9:.1f} GB/s read + written, "
        f"{bw['threads']} threads). Weight copies rotated: at least 1.1x the reported last-level cache "
        f"({harness.last_level_cache_bytes() >> 20} MiB) per implementation. mlx-sparse: {mlx_sparse_note}. "
        f"Empty cells: not run (see the module docstring). Load average (1, 5, 15 min) before "
        f"{info['load_average_before']}, after {info['load_average_after']}: the machine's 2 cores "
        f"are shared, so every time here is noisy."
    )
    table = harness.markdown_table(results, columns)
    target_text = harness.render_targets("Targets (issue 14)", targets(results))
    print(table)
    print(target_text)
    if args.write:
        info["copy_bandwidth_Bps"] = bw["bytes_per_s"]
        folder = harness.write_results("sparse_matmul", info, results, f"{notes}\n\n{table}\n\n{target_text}")
        print(f"written to {folder}")


if __name__ == "__main__":
    main()
