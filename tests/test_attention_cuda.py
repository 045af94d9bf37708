"""The CUDA kernels of mlx_ext.scaled_dot_product_attention against
tests/reference.py, on shapes that send each call to each kernel family
(csrc/attention/cuda_plan.h): the split-K CUDA-core kernel and its merge
(decode, float32, quantized K/V, head dims off the tensor-core list), the
mma.sync kernel (16 or more queries), and the backward (dq, dk, dv), with a
sliced cache whose capacity is not a multiple of 256 and a misaligned K. A
last test checks that every attention kernel in the built modules ran. Runs
only where MLX has a CUDA backend; no --device option is needed.
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
from .test_attention import assert_matches_reference, random_quantized_kv

HAS_CUDA = mx.is_available(mx.gpu) and hasattr(mx, "cuda") and mx.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs an MLX build with the CUDA backend")

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
sdpa = mlx_ext.scaled_dot_product_attention


def kv_pair(rng, shape, dtype, bits, group_size=64, capacity=None):
    """K and V of `shape` (B, Hkv, S, D), float or quantized; with `capacity`,
    slices [..., :S, :] of buffers of that many rows, as mlx-lm holds its cache."""
    b, h, s, d = shape
    full = (b, h, capacity or s, d)
    if bits:
        out = [random_quantized_kv(rng, full, bits, group_size, dtype) for _ in range(2)]
        return [tuple(x[:, :, :s] for x in t) for t in out]
    return [mx.array(rng.normal(size=full), dtype=dtype)[:, :, :s] for _ in range(2)]


def forward_case(dtype, bits, L, S, D, *, seed=0, capacity=None, **kwargs):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.normal(size=(2, 6, L, D)), dtype=dtype)
    k, v = kv_pair(rng, (2, 2, S, D), dtype, bits, capacity=capacity)
    extra = dict(bits=bits, group_size=64) if bits else {}
    out = sdpa(q, k, v, scale=D**-0.5, stream=mx.gpu, **kwargs, **extra)
    mx.eval(out)
    return out, (q, k, v, dict(scale=D**-0.5, **kwargs, **extra))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_decode(dtype, bits, D):
    out, (q, k, v, kw) = forward_case(dtype, bits, 1, 301, D, capacity=333)
    assert_matches_reference(out, q, k, v, **kw)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 96, 128, 192, 256])
def test_prefill_tensor_cores(dtype, D):
    out, (q, k, v, kw) = forward_case(dtype, 0, 70, 150, D, mask="causal")
    assert_matches_reference(out, q, k, v, **kw)


@pytest.mark.parametrize("L", [1, 5, 40])
def test_every_option(L):
    rng = np.random.default_rng(L)
    kw = dict(window=17, sinks=mx.array(rng.normal(size=6), dtype=mx.float32),
              kv_lengths=mx.array([90, 200], dtype=mx.int32))
    for dtype, bits in [(mx.bfloat16, 0), (mx.float32, 0), (mx.float16, 8)]:
        out, (q, k, v, all_kw) = forward_case(dtype, bits, L, 150, 128, seed=L, **kw)
        assert_matches_reference(out, q, k, v, **all_kw)
    mask = mx.array(rng.random((2, 1, L, 150)) < 0.6)
    out, (q, k, v, all_kw) = forward_case(mx.bfloat16, 0, L, 150, 128, mask=mask)
    assert_matches_reference(out, q, k, v, **all_kw)
    mask = mx.array(rng.normal(size=(L, 150)), dtype=mx.bfloat16)
    out, (q, k, v, all_kw) = forward_case(mx.bfloat16, 0, L, 150, 128, mask=mask)
    assert_matches_reference(out, q, k, v, **all_kw)


def test_misaligned_and_odd_head_dims():
    rng = np.random.default_rng(5)
    q = mx.array(rng.normal(size=(1, 4, 20, 72)), dtype=mx.bfloat16)
    k = mx.array(rng.normal(size=(1, 2, 50, 72)), dtype=mx.bfloat16)
    v = mx.array(rng.normal(size=(1, 2, 50, 72)), dtype=mx.bfloat16)
    flat = mx.concatenate([mx.zeros((3,), dtype=k.dtype), k.reshape(-1)])
    k_skewed = flat[3:].reshape(k.shape)  # 6 bytes past an aligned address
    out = sdpa(q, k_skewed, v, scale=0.1, mask="causal", stream=mx.gpu)
    assert_matches_reference(out, q, k, v, scale=0.1, mask="causal")


def gpu_and_cpu_grads(dtype, bits, L, S, D, **kwargs):
    rng = np.random.default_rng(7)
    q = mx.array(rng.normal(size=(2, 4, L, D)), dtype=dtype)
    k, v = kv_pair(rng, (2, 2, S, D), dtype, bits)
    cot = mx.array(rng.normal(size=q.shape), dtype=dtype)
    extra = dict(bits=bits, group_size=64) if bits else {}
    argnums = (0,) if bits else (0, 1, 2)

    def grads(stream):
        f = lambda q, k, v: (sdpa(q, k, v, scale=D**-0.5, stream=stream, **kwargs, **extra) * cot).sum()
        return mx.grad(f, argnums=argnums)(q, k, v)

    return grads(mx.gpu), grads(mx.cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_backward_agrees_with_the_cpu(dtype, bits, D):
    """The CPU backward is checked against finite differences of the reference
    (test_attention_transforms.py); the GPU's against it."""
    got, want = gpu_and_cpu_grads(dtype, bits, 37, 45, D, mask="causal",
                                  sinks=mx.array([0.5, -1.0, 2.0, 0.0]))
    tol = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}[dtype]
    for g, w in zip(got, want):
        g, w = ref.to_f64(g), ref.to_f64(w)
        assert np.abs(g - w).max() <= tol * max(np.abs(w).max(), 1e-6)


def run_all_cases():
    """One call of each attention kernel instance (decode, prefill, backward)."""
    for dtype in DTYPES:
        for bits in [0, 8, 4]:
            for D in [64, 128, 256]:
                forward_case(dtype, bits, 1, 100, D)
                mx.eval(gpu_and_cpu_grads(dtype, bits, 3, 20, D)[0])
    for dtype in [mx.float16, mx.bfloat16]:
        for D in [64, 96, 128, 192, 256]:
            forward_case(dtype, 0, 20, 40, D)


def test_every_cuda_kernel_runs(tmp_path):
    log = tmp_path / "kernels.log"
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-c", "import tests.test_attention_cuda as t; t.run_all_cases()"],
        env={**os.environ, "MLX_EXT_CUDA_LOG": str(log)}, cwd=root, check=True)
    lines = [line.split() for line in log.read_text().splitlines()]
    available = {name for what, name, *image in lines
                 if what == "available" and image[0].startswith("attention/")}
    launched = {name for what, name, *_ in lines if what == "launch"}
    assert len(available) > 70
    assert available - launched == set(), f"never launched: {sorted(available - launched)}"
