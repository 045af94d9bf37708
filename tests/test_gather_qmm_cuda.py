"""The CUDA kernels of mlx_ext.gather_qmm and gather_quantized_swiglu against
tests/reference.py (float64), on shapes that send them to each path of
csrc/gather_qmm/cuda_plan.h: the decode kernel (P M <= 64 pair-rows), the
grouping pass + tiles (more pair-rows; 32-row tiles, 8 for 2-bit W), the
generic kernel (float32 x, transpose=False, 3-, 5-, 6-bit W, K not a
multiple of a lane's chunk), with adversarial routings: repeated experts,
experts with no rows, one expert with every row, indices out of range at run
time (NaN), several rows per pair, unsorted indices. Runs only where MLX has a
CUDA backend (stream=mx.gpu named; no --device option needed). The other
gather test files run on the GPU too under `pytest --device gpu`.
"""

import os

import numpy as np
import pytest

import mlx.core as mx
import mlx_ext

from . import reference as ref
from .test_gather_qmm import assert_matches_reference, random_experts
from .test_gather_swiglu import assert_matches_reference as assert_swiglu_matches

HAS_CUDA = mx.is_available(mx.gpu) and hasattr(mx, "cuda") and mx.cuda.is_available()
# The CUDA gather kernels are off unless MLX_EXT_CUDA_GATHER=1 (csrc/gather_qmm/cuda.cpp
# says why); scripts/gpu_run.sh sets it to test them.
ENABLED = os.environ.get("MLX_EXT_CUDA_GATHER") == "1"
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs an MLX build with the CUDA backend"),
    pytest.mark.skipif(not ENABLED, reason="the CUDA gather kernels are off (MLX_EXT_CUDA_GATHER=1 runs them)"),
]


def routings(rng, experts, tokens, top_k):
    """name -> (tokens, top_k) rhs: random distinct top-k, repeated experts in
    a token, one expert for everything, two experts only (the rest empty)."""
    distinct = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)])
    return {
        "top_k": distinct,
        "repeated": np.tile([1, 2], (tokens, top_k))[:, :top_k],
        "one_expert": np.full((tokens, top_k), experts - 1),
        "two_experts": rng.choice([0, experts // 2], size=(tokens, top_k)),
    }


# (tokens, top_k): decode (1x4, 8x4 = 32, 16x4 = 64 pair-rows) and tiles (17x4, 60x4).
SIZES = [(1, 4), (8, 4), (16, 4), (17, 4), (60, 4)]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("tokens,top_k", SIZES)
def test_tensor_core_paths(dtype, bits, tokens, top_k):
    rng = np.random.default_rng(bits * 100 + tokens)
    experts, n = 8, 200  # N not a multiple of 16
    k = {2: 320, 4: 320, 8: 224}[bits]  # a partial last span of 4 lane chunks
    gs = 32 if bits == 8 else 64
    w_q, scales, biases = random_experts(rng, experts, n, k, bits, gs, dtype)
    x = mx.array(rng.standard_normal((tokens, 1, 1, k)), dtype=dtype)
    bias = mx.array(rng.standard_normal((experts, n)), dtype=dtype)
    kw = dict(group_size=gs, bits=bits)
    for name, rhs in routings(rng, experts, tokens, top_k).items():
        out = mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array(rhs.astype(np.uint32)),
                                 bias=bias, stream=mx.gpu, **kw)
        assert out.shape == (tokens, top_k, 1, n), name
        assert_matches_reference(out, x, w_q, scales, biases, None, rhs, bias=bias, **kw)


@pytest.mark.parametrize("pairs", [10, 120])
@pytest.mark.parametrize("m", [1, 3])
def test_run_time_out_of_range_indices_give_nan(pairs, m):
    """Lazy indices (checked at run time only) past the batch of x or w: NaN
    rows, in the decode kernel and in the grouping pass (tiles)."""
    rng = np.random.default_rng(pairs + m)
    w_q, scales, biases = random_experts(rng, 5, 48, 256, 4, 64, mx.bfloat16)
    x = mx.array(rng.standard_normal((12, m, 256)), dtype=mx.bfloat16)
    lhs = rng.integers(0, 12, pairs)
    rhs = rng.integers(0, 5, pairs)
    rhs[::3] = 5 + np.arange(len(rhs[::3]))
    lhs[1] = 40
    lazy = lambda a: mx.array(a.astype(np.uint32)) + mx.array(0, dtype=mx.uint32)
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, lazy(lhs), lazy(rhs), stream=mx.gpu)
    assert_matches_reference(out, x, w_q, scales, biases, lhs, rhs)


@pytest.mark.parametrize("pairs", [6, 90])
def test_several_rows_per_pair(pairs):
    rng = np.random.default_rng(pairs)
    w_q, scales, biases = random_experts(rng, 6, 77, 512, 4, 64, mx.bfloat16)
    x = mx.array(rng.standard_normal((10, 5, 512)), dtype=mx.bfloat16)
    lhs, rhs = rng.integers(0, 10, pairs), rng.integers(0, 6, pairs)
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, mx.array(lhs), mx.array(rhs), bias=mx.ones((77,), mx.bfloat16),
                             stream=mx.gpu)
    assert_matches_reference(out, x, w_q, scales, biases, lhs, rhs, bias=mx.ones((77,), mx.bfloat16))


@pytest.mark.parametrize("kw", [
    dict(dtype=mx.float32, bits=4, transpose=True),
    dict(dtype=mx.bfloat16, bits=4, transpose=False),
    dict(dtype=mx.float16, bits=3, transpose=True),
    dict(dtype=mx.bfloat16, bits=6, transpose=True),
])
@pytest.mark.parametrize("tokens", [2, 40])
def test_generic_kernel(kw, tokens):
    rng = np.random.default_rng(tokens)
    k, n = (192, 40) if kw["transpose"] else (40, 128)  # N a multiple of the group when not transposed
    rows, cols = (n, k) if kw["transpose"] else (k, n)
    w_q, scales, biases = random_experts(rng, 5, rows, cols, kw["bits"], 64, kw["dtype"])
    x = mx.array(rng.standard_normal((tokens, 1, 1, k)), dtype=kw["dtype"])
    rhs = np.stack([rng.permutation(5)[:3] for _ in range(tokens)])
    args = dict(transpose=kw["transpose"], group_size=64, bits=kw["bits"])
    out = mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=mx.array(rhs), stream=mx.gpu, **args)
    assert_matches_reference(out, x, w_q, scales, biases, None, rhs, **args)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("tokens", [1, 16, 50])
def test_fused_swiglu(dtype, tokens):
    """The SwiGLU epilogue in the decode, tiles and generic kernels."""
    rng = np.random.default_rng(tokens)
    k, n = 256, 72
    gate = random_experts(rng, 6, n, k, 4, 64, dtype)
    up = random_experts(rng, 6, n, k, 4, 64, dtype)
    idx = np.stack([rng.permutation(6)[:4] for _ in range(tokens)]).astype(np.uint32)
    x = mx.array(0.02 * rng.standard_normal((tokens, 1, 1, k)), dtype=dtype)  # no float16 overflow
    out = mlx_ext.gather_quantized_swiglu(x, *gate, *up, rhs_indices=mx.array(idx), stream=mx.gpu)
    assert_swiglu_matches(out, x, gate, up, None, idx, group_size=64, bits=4)


def test_vjp_runs_the_transposed_gather_on_the_gpu():
    """d/dx goes through GatherQmm with transpose=False (the generic kernel)."""
    rng = np.random.default_rng(1)
    w_q, scales, biases = random_experts(rng, 4, 40, 128, 4, 64, mx.float32)
    x = mx.array(rng.standard_normal((3, 1, 1, 128)), dtype=mx.float32)
    rhs = mx.array([[0, 2], [1, 3], [2, 2]], dtype=mx.uint32)
    f = lambda x, s: mlx_ext.gather_qmm(x, w_q, scales, biases, rhs_indices=rhs, stream=s).sum()
    g_gpu = mx.grad(lambda x: f(x, mx.gpu))(x)
    g_cpu = mx.grad(lambda x: f(x, mx.cpu))(x)
    np.testing.assert_allclose(np.array(g_gpu), np.array(g_cpu), rtol=1e-4, atol=1e-4)
