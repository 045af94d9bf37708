"""The CUDA kernels of mlx_ext.quantized_matmul against tests/reference.py.

Every bit width x group size x activation dtype x layout runs on shapes that
send it to each kernel family (csrc/quantized_matmul/cuda_plan.h picks them):
the tensor-core and the CUDA-core GEMVs for 1 and for 2-8 rows of x, the
tensor-core GEMV with 16- and 32-row blocks, the mma.sync GEMM with its small and large tiles (float32 x as bfloat16 planes),
the Hopper wgmma GEMM (H100), the transpose=False kernel
with and without K slices, the generic kernel (misaligned inputs), and the
fp modes' kernels (qmm_fp.cu). A
second test checks that every kernel in the built modules ran. Runs only
where MLX has a CUDA backend; no --device option is needed.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx_ext

from . import reference as ref
from .test_quantized_matmul import BITS, DTYPES, GROUP_SIZES, assert_matches_reference

HAS_CUDA = mx.is_available(mx.gpu) and hasattr(mx, "cuda") and mx.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs an MLX build with the CUDA backend")


def misaligned(array):
    """The same values in a buffer that starts 4 bytes past a 16-byte boundary."""
    flat = mx.concatenate([mx.zeros((1,), dtype=array.dtype), array.reshape(-1)])
    return flat[1:].reshape(array.shape)


def cuda_core_gemv_k(bits, group_size):
    """A K that sends float16 / bfloat16 GEMVs to the CUDA-core kernel (qmv_t)
    rather than the tensor-core one (qmv_tc, which takes K % (512 / bits) == 0
    for 2, 4 and 8 bits), or None where group_size rules every such K out."""
    chunk = {2: 64, 3: 128, 4: 32, 5: 128, 6: 128, 8: 32}[bits]  # qmv_t's K granule
    for k in range(group_size, 1025, group_size):
        if k % chunk == 0 and (bits not in (2, 4, 8) or k % (512 // bits)):
            return k
    return None


def cases(bits, group_size, transpose):
    """(M, K, N, misaligned input or None) per kernel family."""
    if transpose:
        k, n = 256, 71  # K % 128 == 0; N not a multiple of any tile
        # 1-8 rows: the GEMVs; 12 and 20: the GEMV with 16- and 32-row blocks
        # (4 and 8 bits), else the small mma.sync GEMM, which 40 rows reach
        # for every bit width; 100 and 300: the Hopper GEMM on an H100 (with N
        # and M past a tile), else the large mma.sync GEMM.
        out = [(1, k, n, None), (2, k, n, None), (3, k, n, None), (5, k, n, None),
               (12, k, n, None), (20, k, n, None), (40, k, n, None), (100, k, n, None),
               (300, 448, 300, None), (70, 64, n, None), (130, 128, n, None), (3, k, n, "x")]
        k_core = cuda_core_gemv_k(bits, group_size)
        if k_core:
            out += [(1, k_core, n, None), (5, k_core, n, None)]
        return [c for c in out if c[1] % group_size == 0]
    n = 3 * group_size
    # 1-3 rows: K sliced (float partials); 9 rows over 16: one slice, direct stores.
    return [(1, 40, n, None), (2, 40, n, None), (3, 40, n, None), (9, 16, n, None), (2, 40, n, "w")]


def run_case(bits, group_size, dtype, transpose, m, k, n, skew, seed):
    rng = np.random.default_rng(seed)
    rows, cols = (n, k) if transpose else (k, n)
    w_q, scales, biases = ref.random_quantized(rng, rows, cols, bits, group_size, dtype)
    x = mx.array(rng.standard_normal((m, k)), dtype=dtype)
    bias = mx.array(rng.standard_normal(n), dtype=dtype) if m % 2 else None
    if skew == "x":
        x = misaligned(x)
    elif skew == "w":
        w_q = misaligned(w_q)
    out = mlx_ext.quantized_matmul(x, w_q, scales, biases, transpose=transpose,
                                   group_size=group_size, bits=bits, bias=bias, stream=mx.gpu)
    mx.eval(out)
    return out, (x, w_q, scales, biases, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("transpose", [True, False])
def test_every_kernel_family(transpose, bits, group_size, dtype):
    for i, (m, k, n, skew) in enumerate(cases(bits, group_size, transpose)):
        out, (x, w_q, scales, biases, bias) = run_case(
            bits, group_size, dtype, transpose, m, k, n, skew, seed=bits * 1000 + group_size + i)
        assert out.dtype == dtype and out.shape == (m, n)
        # float16 / bfloat16 x: W rounded to x's type, transpose=True kernels
        # (the GEMVs and GEMMs on tensor cores; float32 x stays exact).
        assert_matches_reference(out, x, w_q, scales, biases, transpose=transpose,
                                 group_size=group_size, bits=bits, bias=bias,
                                 w_rounded=transpose and dtype != mx.float32)


def fp_cases(mode, transpose):
    """(M, K, N) for the fp modes' kernels (qmm_fp.cu): one and several rows,
    several 512-wide K runs (transpose), N not a multiple of 32 (nvfp4)."""
    group_size = ref.FP_MODES[mode][0]
    if transpose:
        return [(1, 33 * group_size, 40), (5, 3 * group_size, 13), (40, 17 * group_size, 33)]
    return [(1, 40, 3 * group_size), (5, 16, 5 * group_size), (40, 70, 3 * group_size)]


def run_fp_case(mode, dtype, transpose, m, k, n, seed):
    rng = np.random.default_rng(seed)
    w_q, scales = ref.random_fp_quantized(rng, (n, k) if transpose else (k, n), mode)
    x = mx.array(rng.standard_normal((m, k)), dtype=dtype)
    bias = mx.array(rng.standard_normal(n), dtype=dtype) if m % 2 else None
    out = mlx_ext.quantized_matmul(x, w_q, scales, transpose=transpose, mode=mode, bias=bias, stream=mx.gpu)
    mx.eval(out)
    return out, (x, w_q, scales, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", list(ref.FP_MODES))
@pytest.mark.parametrize("transpose", [True, False])
def test_fp_modes(transpose, mode, dtype):
    """mxfp4 / nvfp4 / mxfp8: exact float32 arithmetic for every activation type."""
    for i, (m, k, n) in enumerate(fp_cases(mode, transpose)):
        out, (x, w_q, scales, bias) = run_fp_case(mode, dtype, transpose, m, k, n, seed=i)
        assert out.dtype == dtype and out.shape == (m, n)
        expected, tol = ref.quantized_matmul_with_tolerance(x, w_q, scales, None, out_dtype=dtype,
                                                            transpose=transpose, mode=mode, bias=bias)
        ref.assert_within_tolerance(out, expected, tol, f"{mode} transpose={transpose} M={m} K={k} N={n}")


def run_all_cases():
    for transpose in [True, False]:
        for bits in BITS:
            for group_size in GROUP_SIZES:
                for dtype in DTYPES:
                    for m, k, n, skew in cases(bits, group_size, transpose):
                        run_case(bits, group_size, dtype, transpose, m, k, n, skew, seed=0)
        for mode in ref.FP_MODES:
            for dtype in DTYPES:
                for m, k, n in fp_cases(mode, transpose):
                    run_fp_case(mode, dtype, transpose, m, k, n, seed=0)


def test_mma_sync_gemm_where_wgmma_runs():
    """With the Hopper GEMM turned off (MLX_EXT_CUDA_WGMMA=0) the large
    mma.sync GEMM takes its float16 / bfloat16 shapes, and passes too."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k",
         "test_every_kernel_family and True and not float32"],
        env={**os.environ, "MLX_EXT_CUDA_WGMMA": "0"}, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_every_cuda_kernel_runs(tmp_path):
    """Each kernel in the loaded modules is launched by run_all_cases(), with
    and without the Hopper GEMM."""
    log = tmp_path / "kernels.log"
    root = Path(__file__).resolve().parent.parent
    for wgmma in ["1", "0"]:
        subprocess.run(
            [sys.executable, "-c", "import tests.test_quantized_matmul_cuda as t; t.run_all_cases()"],
            env={**os.environ, "MLX_EXT_CUDA_LOG": str(log), "MLX_EXT_CUDA_WGMMA": wgmma},
            cwd=root, check=True)
    lines = [line.split() for line in log.read_text().splitlines()]
    # The quantized matmul's kernels: other operators' images are loaded too.
    available = {name for what, name, *image in lines
                 if what == "available" and image[0].startswith("quantized_matmul/")}
    launched = {name for what, name, *_ in lines if what == "launch"}
    assert len(available) > 100
    assert available - launched == set(), f"never launched: {sorted(available - launched)}"
