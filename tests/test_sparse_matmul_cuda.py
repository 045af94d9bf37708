"""The CUDA kernels of mlx_ext.sparse_matmul against tests/reference.py.

Every format (CSR with 16- and 32-bit columns, Bitmask, BSR 32x32 and 64x64,
N:M 2:4, 3:4, 4:8 with float values and 2:4, 4:8 with 4- and 8-bit values) x
activation dtype runs on row counts that send it to each kernel family
(csrc/sparse_matmul/cuda_plan.h): the decode kernels with 1, 4 and 16 rows of x
per block, x read from global memory (a K too wide for shared memory), the
tensor-core prefill kernels (more than 32 rows, 16-bit types), the transposed
product (the x-gradient) and the sampled product (the values' gradient). A
second test checks that every kernel of the sparse matmul's images ran. Runs
only where MLX has a CUDA backend.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx_ext
from mlx_ext import sparse

from . import reference as ref

HAS_CUDA = mx.is_available(mx.gpu) and hasattr(mx, "cuda") and mx.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs an MLX build with the CUDA backend")

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
ROWS = [1, 3, 9, 40]  # decode with 1, 4 and 16 rows per block; prefill (16-bit x, K % 32 == 0)


def containers(rng, n, k, dtype, quantized=True):
    """name -> container of a random (n, k) W in `dtype` (quantized N:M too,
    when asked: K n / m a multiple of 64)."""
    w = mx.array(rng.standard_normal((n, k)) * 0.1, dtype=dtype)
    out = {
        "csr": sparse.CSR.from_dense(w, mask=rng.random((n, k)) < 0.3),
        "bitmask": sparse.Bitmask.from_dense(w, mask=rng.random((n, k)) < 0.5),
        "2:4": sparse.NM.from_dense(w, 2, 4),
        "3:4": sparse.NM.from_dense(w, 3, 4),
        "4:8": sparse.NM.from_dense(w, 4, 8),
    }
    if not quantized:
        return out
    out |= {
        "2:4 q4": sparse.NM.from_dense(w, 2, 4, bits=4, group_size=64),
        "2:4 q8": sparse.NM.from_dense(w, 2, 4, bits=8, group_size=64),
        "4:8 q4": sparse.NM.from_dense(w, 4, 8, bits=4, group_size=64),
        "4:8 q8": sparse.NM.from_dense(w, 4, 8, bits=8, group_size=64),
    }
    if n % 64 == 0 and k % 64 == 0:
        out["bsr32"] = sparse.BSR.from_dense(w, block=32, mask=rng.random((n // 32, k // 32)) < 0.4)
        out["bsr64"] = sparse.BSR.from_dense(w, block=64, mask=rng.random((n // 64, k // 64)) < 0.4)
    return out


def check_product(x, ws, bias=None):
    out = mlx_ext.sparse_matmul(x, ws, bias, stream=mx.gpu)
    expected = ref.sparse_matmul(x, ws, bias)
    scale = np.abs(ref.to_f64(x)) @ np.abs(ref.sparse_to_dense(ws)).T
    tol = ref.float32_accumulation_tolerance(expected, scale + 1e-6, roundings=ws.shape[1],
                                             out_dtype=out.dtype, rounded_operand=True)
    got = ref.to_f64(out)
    assert np.all(np.abs(got - expected) <= tol), (ws, x.shape, np.abs(got - expected).max())


def check_gradients(x, ws, values_too):
    """x-gradient (transposed product) and, values_too, the values' gradient
    (sampled product) of sum(sin(x W^T)) against float64."""
    import copy

    dense = ref.sparse_to_dense(ws)
    key = "data"

    def loss(x, values):
        ws2 = copy.copy(ws)
        if values_too:
            ws2[key] = values
        return mx.sum(mx.sin(mlx_ext.sparse_matmul(x, ws2, stream=mx.gpu).astype(mx.float32)))

    gx, gv = mx.grad(loss, argnums=(0, 1))(x, ws[key] if values_too else mx.zeros((1,)))
    x64 = ref.to_f64(x)
    g = np.cos(x64 @ dense.T)  # d loss / d out
    want_x = g @ dense
    rtol = 1e-4 if x.dtype == mx.float32 else 5e-2
    assert np.allclose(ref.to_f64(gx), want_x, rtol=rtol, atol=rtol * np.abs(want_x).max() + 1e-6)
    if values_too:
        stored = ref.sparse_to_dense(_with_values(ws, key, mx.ones_like(ws[key]))) != 0
        want_w = (g.T @ x64)[stored]
        got_w = _values_in_dense_order(ws, key, gv)
        assert np.allclose(got_w, want_w, rtol=rtol, atol=rtol * np.abs(want_w).max() + 1e-6)


def _with_values(ws, key, values):
    import copy

    out = copy.copy(ws)
    out[key] = values
    return out


def _values_in_dense_order(ws, key, values):
    """The stored values' gradient in row-major order of their (row, column)
    (CSR, Bitmask and N:M store them so; BSR block by block)."""
    import json

    if json.loads(ws["_layout"])["format"] != "bsr":
        return ref.to_f64(values).reshape(-1)
    dense = ref.sparse_to_dense(_with_values(ws, key, values))
    ones = ref.sparse_to_dense(_with_values(ws, key, mx.ones_like(ws[key]))) != 0
    return dense[ones]


def run_all_cases():
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        for name, ws in containers(rng, 192, 512, dtype).items():
            bias = mx.array(rng.standard_normal(192), dtype=dtype)
            for m in ROWS:
                x = mx.array(rng.standard_normal((m, 512)), dtype=dtype)
                check_product(x, ws, bias if m == 3 else None)
            for m in [1, 9]:  # spmm_n with 1 and 8 rows per thread; the sampled product
                check_gradients(mx.array(rng.standard_normal((m, 512)), dtype=dtype), ws, "q" not in name)
        # A K too wide for x in shared memory (the _xg kernels), and N:M with a
        # row length that is not a whole number of code words (scalar loads).
        wide = containers(rng, 8, 73728, dtype)
        w = mx.array(rng.standard_normal((32, 73728)) * 0.1, dtype=dtype)
        wide["bsr"] = sparse.BSR.from_dense(w, block=32, mask=rng.random((1, 2304)) < 0.2)
        for ws in wide.values():
            check_product(mx.array(rng.standard_normal((1, 73728)), dtype=dtype), ws)
        for name, ws in containers(rng, 24, 4096 + 8 * 3, dtype, quantized=False).items():
            check_product(mx.array(rng.standard_normal((2, 4096 + 24)), dtype=dtype), ws)
    # CSR with 32-bit columns (K > 65536).
    w = mx.array(rng.standard_normal((4, 70000)), dtype=mx.bfloat16)
    ws = sparse.CSR.from_dense(w, mask=rng.random((4, 70000)) < 0.1)
    for m in [1, 40]:
        check_product(mx.array(rng.standard_normal((m, 70000)), dtype=mx.bfloat16), ws)
    mx.synchronize()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_kernel_family(dtype):
    rng = np.random.default_rng(1)
    for name, ws in containers(rng, 128, 256, dtype).items():
        for m in ROWS:
            check_product(mx.array(rng.standard_normal((m, 256)), dtype=dtype), ws)


def test_every_cuda_kernel_runs(tmp_path):
    """Each kernel in the sparse matmul's images is launched by run_all_cases()."""
    log = tmp_path / "kernels.log"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", "import tests.test_sparse_matmul_cuda as t; t.run_all_cases()"],
                   env={**os.environ, "MLX_EXT_CUDA_LOG": str(log)}, cwd=root, check=True)
    lines = [line.split() for line in log.read_text().splitlines()]
    available = {name for what, name, *image in lines
                 if what == "available" and image[0].startswith("sparse_matmul/")}
    launched = {name for what, name, *_ in lines if what == "launch"}
    assert len(available) > 100
    assert available - launched == set(), f"never launched: {sorted(available - launched)}"
