"""mlx_ext.quantized_swiglu against tests/reference.py (float64): the stacked
gate/up product with silu(gate) * up in its epilogue; its gradients, vmap and
errors. Weights are random packed words with random scales and biases
(reference.random_quantized), so every code of every bit width occurs."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx.nn as nn
import mlx_ext

from . import reference as ref
from .test_quantized_matmul import BITS, DTYPES, GROUP_SIZES, make_x


@st.composite
def problems(draw):
    group_size = draw(st.sampled_from(GROUP_SIZES))
    return dict(
        bits=draw(st.sampled_from(BITS)),
        group_size=group_size,
        k=group_size * draw(st.integers(1, 4)),
        i=draw(st.integers(1, 70)),
        m=draw(st.sampled_from([1, 2, 3, 5, 11, 12, 13, 25])),  # GEMV below 12 rows, GEMM from 12
        batch=tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def assert_matches_reference(out, x, w_q, scales, biases, *, group_size, bits):
    expected, tol = ref.quantized_swiglu_with_tolerance(
        x, w_q, scales, biases, out_dtype=out.dtype, group_size=group_size, bits=bits
    )
    ref.assert_within_tolerance(out, expected, tol)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(p=problems())
def test_matches_reference(isa, p):
    rng = np.random.default_rng(p["seed"])
    w_q, scales, biases = ref.random_quantized(rng, 2 * p["i"], p["k"], p["bits"], p["group_size"], p["dtype"])
    # W / 4 (exact): gate * up stays within float16's range (65504) for K <= 512
    scales, biases = scales * 0.25, biases * 0.25
    x = make_x(rng, p["batch"] + (p["m"], p["k"]), p["dtype"], p["layout"])
    out = mlx_ext.quantized_swiglu(x, w_q, scales, biases, group_size=p["group_size"], bits=p["bits"])
    assert out.dtype == p["dtype"] and out.shape == p["batch"] + (p["m"], p["i"])
    assert_matches_reference(out, x, w_q, scales, biases, group_size=p["group_size"], bits=p["bits"])


@pytest.mark.parametrize("m", [1, 40, 700])
def test_layer_sized(m):
    """SmolLM2's MLP (K 576, I 1536, 4-bit g32), one decode row to a prefill
    whose epilogue spreads over threads."""
    rng = np.random.default_rng(m)
    w_q, scales, biases = ref.random_quantized(rng, 2 * 1536, 576, 4, 32, mx.float32)
    x = mx.array(rng.standard_normal((m, 576)), dtype=mx.float32)
    out = mlx_ext.quantized_swiglu(x, w_q, scales, biases, group_size=32, bits=4)
    assert_matches_reference(out, x, w_q, scales, biases, group_size=32, bits=4)


def unfused(x, w_q, scales, biases, group_size, bits):
    """The layer it replaces, in MLX's own differentiable ops."""
    half = w_q.shape[0] // 2
    gate = mx.quantized_matmul(x, w_q[:half], scales[:half], biases[:half], group_size=group_size, bits=bits)
    up = mx.quantized_matmul(x, w_q[half:], scales[half:], biases[half:], group_size=group_size, bits=bits)
    return nn.silu(gate) * up


def small_problem(seed=0, m=3, k=64, i=20, bits=4, group_size=32):
    rng = np.random.default_rng(seed)
    w_q, scales, biases = ref.random_quantized(rng, 2 * i, k, bits, group_size, mx.float32)
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    return x, w_q, scales, biases


def test_vjp_matches_finite_differences_of_the_reference():
    x, w_q, scales, biases = small_problem()
    cotan = np.random.default_rng(1).standard_normal((3, 20))

    def loss(x64):
        out, _ = ref.quantized_swiglu_with_tolerance(x64, w_q, scales, biases, out_dtype=mx.float32,
                                                     group_size=32, bits=4)
        return float((out * cotan).sum())

    _, (dx,) = mx.vjp(lambda x: mlx_ext.quantized_swiglu(x, w_q, scales, biases, group_size=32, bits=4),
                      [x], [mx.array(cotan, dtype=mx.float32)])
    x64, h = ref.to_f64(x), 1e-5
    numeric = np.zeros_like(x64)
    for index in np.ndindex(*x64.shape):
        step = np.zeros_like(x64)
        step[index] = h
        numeric[index] = (loss(x64 + step) - loss(x64 - step)) / (2 * h)
    np.testing.assert_allclose(ref.to_f64(dx), numeric, rtol=1e-4, atol=1e-4 * np.abs(numeric).max())


def test_jvp_and_grad_agree_with_the_unfused_layer():
    x, w_q, scales, biases = small_problem(seed=2)
    tangent = mx.array(np.random.default_rng(3).standard_normal(x.shape), dtype=mx.float32)
    ours = mx.jvp(lambda x: mlx_ext.quantized_swiglu(x, w_q, scales, biases, group_size=32, bits=4),
                  [x], [tangent])[1][0]
    theirs = mx.jvp(lambda x: unfused(x, w_q, scales, biases, 32, 4), [x], [tangent])[1][0]
    assert mx.allclose(ours, theirs, rtol=1e-4, atol=1e-4).item()
    grad = mx.grad(lambda x: mlx_ext.quantized_swiglu(x, w_q, scales, biases, group_size=32, bits=4).sum())(x)
    want = mx.grad(lambda x: unfused(x, w_q, scales, biases, 32, 4).sum())(x)
    assert mx.allclose(grad, want, rtol=1e-4, atol=1e-4).item()


def test_vmap_and_compile():
    x, w_q, scales, biases = small_problem(seed=4)
    xs = mx.stack([x, 2 * x], axis=1)  # (3, 2, 64): map over axis 1

    def f(x):
        return mlx_ext.quantized_swiglu(x, w_q, scales, biases, group_size=32, bits=4)

    mapped = mx.vmap(f, in_axes=1)(xs)
    assert mx.allclose(mapped, mx.stack([f(x), f(2 * x)]), rtol=1e-6, atol=1e-6).item()
    assert mx.allclose(mx.compile(f)(x), f(x)).item()


def test_gradient_of_the_weights_is_refused():
    x, w_q, scales, biases = small_problem()
    with pytest.raises(ValueError, match=r"^\[mlx_ext.quantized_swiglu\].*with respect to x"):
        mx.grad(lambda s: mlx_ext.quantized_swiglu(x, w_q, s, biases, group_size=32, bits=4).sum())(scales)


@pytest.mark.parametrize("change,error,message", [
    (dict(bits=7), ValueError, "bits=7"),
    (dict(group_size=48), ValueError, "group_size=48"),
    (dict(w_rows=39), ValueError, "even number of rows"),
    (dict(k=128), ValueError, "x has inner dimension 128"),
    (dict(scales_rows=20), ValueError, "scales must have shape"),
    (dict(x_dtype=mx.int32), TypeError, "x"),
    (dict(w_dtype=mx.int32), TypeError, "w must be uint32"),
])
def test_bad_input_fails_before_any_kernel(change, error, message):
    x, w_q, scales, biases = small_problem()
    if "w_rows" in change:
        w_q, scales, biases = w_q[: change["w_rows"]], scales[: change["w_rows"]], biases[: change["w_rows"]]
    if "k" in change:
        x = mx.zeros((3, change["k"]))
    if "scales_rows" in change:
        scales = scales[: change["scales_rows"]]
    if "x_dtype" in change:
        x = x.astype(change["x_dtype"])
    if "w_dtype" in change:
        w_q = w_q.astype(change["w_dtype"])
    kwargs = dict(group_size=change.get("group_size", 32), bits=change.get("bits", 4))
    with pytest.raises(error, match=rf"^\[mlx_ext.quantized_swiglu\].*{message}"):
        mlx_ext.quantized_swiglu(x, w_q, scales, biases, **kwargs)
