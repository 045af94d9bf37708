"""Gradients of mlx_ext.sparse_matmul (vjp and jvp) w.r.t. x, the stored
values on their fixed pattern and bias, against central finite differences
of the same nonlinear loss computed in float64 by tests/reference.py, along
random directions."""

import zlib

import numpy as np
import pytest

import mlx.core as mx
import mlx_ext
from mlx_ext import sparse

from . import reference as ref

MAKERS = {
    "csr": lambda w: sparse.CSR.from_dense(w, density=0.4),
    "bitmask": lambda w: sparse.Bitmask.from_dense(w, density=0.5),
    "bsr": lambda w: sparse.BSR.from_dense(w, block=8, density=0.5),
    "nm": lambda w: sparse.NM.from_dense(w, 2, 4),
    "nm_q": lambda w: sparse.NM.from_dense(w, 2, 4, bits=8, group_size=32),
}
H = 1e-4


def loss_of(ws, matmul=mlx_ext.sparse_matmul, sin=mx.sin):
    """sum(sin(x @ W.T + b)) with W's stored values replaced by `values`."""
    def loss(x, values, b):
        ws_v = dict(ws)
        if values is not None:
            ws_v["data"] = values
        return sin(matmul(x, ws_v, b)).sum()
    return loss


def central_difference(f, args, i, direction):
    args = [None if a is None else ref.to_f64(a) for a in args]
    plus, minus = list(args), list(args)
    plus[i] = args[i] + H * ref.to_f64(direction)
    minus[i] = args[i] - H * ref.to_f64(direction)
    return (f(*plus) - f(*minus)) / (2 * H)


@pytest.mark.parametrize("fmt", list(MAKERS))
@pytest.mark.parametrize("batch", [(1,), (2, 9)])
def test_gradients_match_finite_differences(isa, fmt, batch):
    rng = np.random.default_rng(zlib.crc32(f"{fmt}{batch}".encode()))
    n, k = 16, 64
    w = mx.array(rng.standard_normal((n, k)), dtype=mx.float32)
    ws = MAKERS[fmt](w)
    x = mx.array(rng.standard_normal(batch + (k,)), dtype=mx.float32)
    bias = mx.array(rng.standard_normal(n), dtype=mx.float32)
    values = ws["data"] if "data" in ws else None
    args = [x, values, bias]
    f = loss_of(ws)
    argnums = [0, 2] if values is None else [0, 1, 2]
    grads = mx.grad(f, argnums=argnums)(*args)
    for i, g in zip(argnums, grads):
        direction = mx.array(rng.standard_normal(args[i].shape), dtype=mx.float32)
        expected = central_difference(loss_of(ws, ref.sparse_matmul, np.sin), args, i, direction)
        got = (g * direction).sum().item()
        # float32 rounding of the sum's terms, relative to their magnitudes.
        tol = 1e-5 * (mx.abs(g) * mx.abs(direction)).sum().item() + 1e-6
        assert got == pytest.approx(expected, rel=1e-4, abs=tol), f"argument {i}"
        def along(a, i=i):
            moved = list(args)
            moved[i] = a
            return [f(*moved)]

        _, (jvp,) = mx.jvp(along, [args[i]], [direction])
        assert jvp.item() == pytest.approx(expected, rel=1e-4, abs=tol), f"jvp of argument {i}"


@pytest.mark.parametrize("fmt", ["csr", "bitmask", "bsr", "nm"])
def test_value_gradient_is_the_sampled_product(isa, fmt):
    """d/dvalues of sum(G * (x @ W.T)) is (G.T @ x) sampled on the pattern."""
    rng = np.random.default_rng(7)
    n, k, m = 24, 32, 37
    ws = MAKERS[fmt](mx.array(rng.standard_normal((n, k)), dtype=mx.float16))
    x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
    g = mx.array(rng.standard_normal((m, n)), dtype=mx.float32)

    def f(values):
        ws_v = dict(ws)
        ws_v["data"] = values
        return (g * mlx_ext.sparse_matmul(x, ws_v)).sum()

    dvalues = mx.grad(f)(ws["data"])
    assert dvalues.dtype == mx.float16 and dvalues.shape == ws["data"].shape
    # Scatter the value gradient through the reference decoder: a pattern of
    # ones gives each value's position.
    ws_d = dict(ws)
    ws_d["data"] = dvalues
    got = ref.sparse_to_dense(ws_d)
    ws_1 = dict(ws)
    ws_1["data"] = mx.ones_like(ws["data"])
    stored = ref.sparse_to_dense(ws_1) != 0
    full = ref.to_f64(g).T @ ref.to_f64(x)
    expected = np.where(stored, full, 0.0)
    tol = 2 * m * 2.0**-24 * (np.abs(ref.to_f64(g)).T @ np.abs(ref.to_f64(x))) + 2.0**-11 * np.abs(full)
    assert np.all(np.abs(got - expected) <= tol)


@pytest.mark.parametrize("fmt", list(MAKERS))
def test_x_gradient_is_the_transposed_product(isa, fmt):
    """g @ W through the transposed pattern, for one row and for many."""
    rng = np.random.default_rng(8)
    n, k = 40, 64
    ws = MAKERS[fmt](mx.array(rng.standard_normal((n, k)), dtype=mx.bfloat16))
    dense = ref.sparse_to_dense(ws)
    for m in (1, 5, 50):
        x = mx.array(rng.standard_normal((m, k)), dtype=mx.float32)
        g = mx.array(rng.standard_normal((m, n)), dtype=mx.float32)
        _, (dx,) = mx.vjp(lambda x: [mlx_ext.sparse_matmul(x, ws)], [x], [g])
        expected = ref.to_f64(g) @ dense
        tol = 2 * (n + 2) * 2.0**-24 * (np.abs(ref.to_f64(g)) @ np.abs(dense)) + 1e-30
        assert np.all(np.abs(ref.to_f64(dx) - expected) <= tol), f"m={m}"
