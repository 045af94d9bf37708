"""mlx_ext.rms_norm against tests/reference.py (float64) and mx.fast.rms_norm;
its gradients, vmap and errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx_ext

from . import reference as ref
from .test_quantized_matmul import DTYPES, make_x


@settings(deadline=None)
@given(
    d=st.integers(1, 700),
    rows=st.lists(st.integers(1, 40), max_size=2),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    with_weight=st.booleans(),
    epsilon=st.sampled_from([0.0, 1e-6, 1e-5, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(d, rows, dtype, layout, with_weight, epsilon, seed):
    rng = np.random.default_rng(seed)
    x = make_x(rng, tuple(rows) + (d,), dtype, layout)
    weight = mx.array(rng.standard_normal(d), dtype=dtype) if with_weight else None
    out = mlx_ext.rms_norm(x, weight, epsilon)
    assert out.dtype == dtype and out.shape == x.shape
    expected, tol = ref.rms_norm_with_tolerance(x, weight, epsilon, out_dtype=dtype)
    ref.assert_within_tolerance(out, expected, tol)


@pytest.mark.parametrize("rows", [1, 61, 3000])  # one decode row; many rows spread over threads
def test_agrees_with_mx_fast(rows):
    x = mx.random.normal((rows, 576), key=mx.random.key(rows))
    w = mx.random.normal((576,), key=mx.random.key(1))
    assert mx.allclose(mlx_ext.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6).item()


def fast(x, w):
    return mx.fast.rms_norm(x, w, 1e-5)


def ours(x, w):
    return mlx_ext.rms_norm(x, w, 1e-5)


def test_gradients_agree_with_mx_fast():
    x = mx.random.normal((3, 5, 48), key=mx.random.key(2))
    w = mx.random.normal((48,), key=mx.random.key(3))
    c = mx.random.normal((3, 5, 48), key=mx.random.key(4))
    got = mx.grad(lambda x, w: (ours(x, w) * c).sum(), argnums=(0, 1))(x, w)
    want = mx.grad(lambda x, w: (fast(x, w) * c).sum(), argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
        assert mx.allclose(g, e, rtol=1e-4, atol=1e-5).item()
    tx, tw = mx.random.normal(x.shape, key=mx.random.key(5)), mx.random.normal(w.shape, key=mx.random.key(6))
    got = mx.jvp(ours, [x, w], [tx, tw])[1][0]
    want = mx.jvp(fast, [x, w], [tx, tw])[1][0]
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-5).item()


def test_vjp_matches_finite_differences_of_the_reference():
    rng = np.random.default_rng(7)
    x, w, c = rng.standard_normal((2, 12)), rng.standard_normal(12), rng.standard_normal((2, 12))

    def loss(x64):
        out, _ = ref.rms_norm_with_tolerance(x64, w, 1e-5, out_dtype=mx.float32)
        return float((out * c).sum())

    _, (dx,) = mx.vjp(lambda x: ours(x, mx.array(w, mx.float32)), [mx.array(x, mx.float32)], [mx.array(c, mx.float32)])
    h = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = h
        numeric[index] = (loss(x + step) - loss(x - step)) / (2 * h)
    np.testing.assert_allclose(ref.to_f64(dx), numeric, rtol=1e-3, atol=1e-4)


def test_vmap_and_compile():
    x = mx.random.normal((4, 3, 32), key=mx.random.key(8))
    w = mx.random.normal((32,), key=mx.random.key(9))
    mapped = mx.vmap(lambda x: ours(x, w), in_axes=1, out_axes=1)(x)
    assert mx.allclose(mapped, ours(x, w)).item()
    assert mx.allclose(mx.compile(ours)(x, w), ours(x, w)).item()


@pytest.mark.parametrize("x,weight,epsilon,error,message", [
    (mx.zeros(()), None, 1e-5, ValueError, "scalar"),
    (mx.zeros((2, 8), mx.int32), None, 1e-5, TypeError, "x"),
    (mx.zeros((2, 8)), mx.zeros((7,)), 1e-5, ValueError, "weight must have shape"),
    (mx.zeros((2, 8)), mx.zeros((8,), mx.int32), 1e-5, TypeError, "weight"),
    (mx.zeros((2, 8)), None, -1.0, ValueError, "eps must be >= 0"),
])
def test_bad_input_fails_before_any_kernel(x, weight, epsilon, error, message):
    with pytest.raises(error, match=rf"^\[mlx_ext.rms_norm\].*{message}"):
        mlx_ext.rms_norm(x, weight, epsilon)
